"""The evidence gallery: for each flagged (or top-scoring) real image, the real image beside its
nearest generated images, their similarity, the verified inlier count and the difference image
after alignment (the recovered transform when verification ran; otherwise an unaligned
difference, said so on the card). Thumbnails are PNG files under ``RUN/figures/gallery``."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ganprint.datacopy import best_alignment
from ganprint.datacopy import thumbnail as _thumb


def _align(gen, transform, frame: int):
    """The generated thumbnail [T, T] resampled into the real image's frame.

    ``transform`` [2, 3] maps real-image pixels to generated-image pixels in a ``frame``-px square
    (ganprint.verify's convention); at thumbnail scale only its shift changes."""
    import cv2
    import numpy as np

    m = np.asarray(transform, dtype=np.float64).reshape(2, 3).copy()
    m[:, 2] *= gen.shape[0] / float(frame)
    return cv2.warpAffine(gen, m, (gen.shape[1], gen.shape[0]), flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                          borderMode=cv2.BORDER_REPLICATE)


def _features(path: str, kind: str, memo: dict):
    """(keypoints, descriptors) of one image file as ``embed --backbone KIND`` extracts them;
    memoised, because each card verifies its real image against several generated images."""
    from ganprint.data import load_image
    from ganprint.local_features import DEFAULT_MAX_KEYPOINTS, DEFAULT_SIZE, extract, get_local_kind

    key = (path, kind)
    if key not in memo:
        memo[key] = extract(load_image(path), get_local_kind(kind), DEFAULT_MAX_KEYPOINTS, DEFAULT_SIZE)
    return memo[key]


def _verify(real_path: str, gen_path: str, kind: str, memo: dict | None = None):
    """(inliers, transform [2, 3] or None, frame px) of the pair by ganprint.verify (what
    ``verify_images`` does, with each image's features extracted once)."""
    from ganprint.local_features import DEFAULT_SIZE, get_local_kind
    from ganprint.verify import verify_pair

    memo = {} if memo is None else memo
    ka, da = _features(real_path, kind, memo)
    kb, db = _features(gen_path, kind, memo)
    m = verify_pair(ka, da, kb, db, norm=get_local_kind(kind).norm)
    return m.inliers, m.transform, DEFAULT_SIZE


def _save_png(arr, path: Path) -> str:
    import numpy as np
    from PIL import Image

    a = (np.clip(arr, 0, 1) * 255 + 0.5).astype(np.uint8)
    tmp = path.with_name(f".{path.name}.tmp")
    Image.fromarray(a).save(tmp, format="PNG", optimize=True)
    os.replace(tmp, path)
    return path.name


def gallery_order(df, target_role: str, copies=None, min_p: float | None = None):
    """Row indices of ``df`` (role, flag, p_value, score[, copy, copy_p, copy_stat]) of the target
    set, in the gallery's order, with each row's evidence tier:

    0 ``verified copy``: its best-aligned generated image is significant against the known
      non-members (copy p-value, BH at the run's FDR), by copy p-value then aligned correlation;
    1 ``flagged``: a membership flag (BH on the chosen attack), by p-value then score;
    2 ``copy candidate``: aligned better than every known non-member (the smallest copy p-value
      the reference allows) but not significant after BH, by aligned correlation;
    3 the rest by membership p-value, then score.

    The pictures are the evidence, so a proven copy comes before a statistical flag."""
    import numpy as np

    pool = np.flatnonzero((df["role"] == target_role).to_numpy())
    flag = df["flag"].to_numpy(dtype=bool)
    p = df["p_value"].to_numpy(dtype=np.float64)
    sc = df["score"].to_numpy(dtype=np.float64)
    if copies is None:
        cp = np.ones(len(df))
        cs = np.zeros(len(df))
        copy = np.zeros(len(df), dtype=bool)
    else:
        cp, cs = np.asarray(copies["p"], dtype=np.float64), np.asarray(copies["stat"], dtype=np.float64)
        copy = np.asarray(copies["copy"]).astype(bool)
    floor = -1.0 if min_p is None else float(min_p) + 1e-12

    def key(i):
        if copy[i]:
            return (0, cp[i], -cs[i], 0.0, 0.0)
        if flag[i]:
            return (1, p[i], -sc[i], 0.0, 0.0)
        if cp[i] <= floor:
            return (2, -cs[i], p[i], -sc[i], 0.0)
        return (3, p[i], -sc[i], cp[i], -cs[i])

    order = sorted(pool, key=lambda i: (key(i), int(i)))
    return order, [key(i)[0] for i in order]


TIERS = {0: "verified copy", 1: "flagged", 2: "copy candidate", 3: None}


def build_gallery(folder: Path, scores_df, real_table, gen_paths: dict[str, list[str]], nn_idx, nn_val, *,
                  n: int = 12, target_role: str = "unknown", matches: int = 3, verify_kind: str | None = None,
                  value_name: str = "similarity", copies: dict | None = None,
                  copy_min_p: float | None = None) -> list[dict[str, Any]]:
    """Write the gallery's PNGs into ``folder`` and return one card dict per real image, in the
    order of :func:`gallery_order`.

    ``nn_idx`` int [R, >=3] / ``nn_val`` [R, >=3]: nearest generated images (index into the
    generated set of the row's split) and their similarity (``value_name``). ``copies`` (the
    audit's aligned-copy evidence: ``cand`` [R, C], ``cc`` [R, C], ``stat``/``p``/``q``/``copy``
    [R]): the card then shows the ``matches`` best-aligned candidates, value = their aligned
    correlation. With ``verify_kind`` (sift / orb) each shown pair is verified (ganprint.verify):
    its inlier count and recovered transform are shown, and the difference is taken after the
    better of the ECC alignments started from the identity and from the verified fit."""
    import numpy as np

    folder.mkdir(parents=True, exist_ok=True)
    if n == 0 or (nn_idx is None and copies is None):
        return []
    df = scores_df.reset_index(drop=True)
    order, tiers = gallery_order(df, target_role, copies, copy_min_p)
    memo: dict = {}
    cards = []
    for rank, (i, tier) in enumerate(zip(order[:n], tiers[:n])):
        split = df["split"][i]
        gens = gen_paths.get("test_generated" if split == "test" and "test_generated" in gen_paths else "generated")
        real = _thumb(real_table["path"][i])
        card = {"image_id": str(df["image_id"][i]), "role": str(df["role"][i]), "score": float(df["score"][i]),
                "p_value": float(df["p_value"][i]), "q_value": None if np.isnan(df["q_value"][i]) else float(df["q_value"][i]),
                "flag": bool(df["flag"][i]), "tier": int(tier), "evidence": TIERS[int(tier)],
                "label": None if df["label"].isna()[i] else int(df["label"][i]),
                "real": _save_png(real, folder / f"{rank:03d}_real.png"), "matches": []}
        if copies is not None:
            cc_i = np.asarray(copies["cc"][i], dtype=np.float64)
            cand_i = np.asarray(copies["cand"][i], dtype=np.int64)
            ok = (cand_i >= 0) & np.isfinite(cc_i)
            js = [int(j) for j in np.flatnonzero(ok)[np.argsort(-cc_i[ok], kind="stable")]]
            shown = [(int(cand_i[j]), float(cc_i[j]), "aligned correlation") for j in js[:matches]]
            q = copies["q"][i]
            card.update({"copy": bool(copies["copy"][i]), "copy_p": float(copies["p"][i]),
                         "copy_q": None if np.isnan(q) else float(q), "copy_stat": float(copies["stat"][i])})
        else:
            shown = [(int(nn_idx[i, j]), float(nn_val[i, j]), value_name) for j in range(min(matches, nn_idx.shape[1]))
                     if int(nn_idx[i, j]) >= 0]
        for j, (g, value, vname) in enumerate(shown):
            gen = _thumb(gens[g])
            inl, tr, frame = (None, None, None) if verify_kind is None else _verify(real_table["path"][i], gens[g],
                                                                                    verify_kind, memo)
            ok = tr is not None and np.isfinite(np.asarray(tr, dtype=np.float64)).all()
            align = verify_kind is not None or copies is not None
            warp, start, cc = best_alignment(real, gen, tr if ok else None, frame) if align else (None, None, None)
            aligned = _align(gen, warp, real.shape[0]) if warp is not None else gen
            diff = np.abs(real - aligned)
            card["matches"].append({
                "generated": Path(gens[g]).stem, "value": value, "value_name": vname,
                "inliers": inl, "transform": [float(v) for v in np.asarray(tr).reshape(-1)] if ok else None,
                "frame": frame, "aligned": warp is not None,
                "alignment": None if warp is None else {"warp": [float(v) for v in warp.reshape(-1)], "from": start,
                                                        "ecc": cc if np.isfinite(cc) else None,
                                                        "frame": int(real.shape[0])},
                "img": _save_png(gen, folder / f"{rank:03d}_g{j}.png"),
                "diff": _save_png(1.0 - np.clip(diff * 2.0, 0, 1), folder / f"{rank:03d}_d{j}.png"),
            })
        cards.append(card)
    return cards
