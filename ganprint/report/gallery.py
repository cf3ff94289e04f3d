"""The evidence gallery: for each flagged (or top-scoring) real image, the real image beside its
nearest generated images, their similarity, the verified inlier count and the difference image
after alignment (the recovered transform when verification ran; otherwise an unaligned
difference, said so on the card). Thumbnails are PNG files under ``RUN/figures/gallery``."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

THUMB = 128


def _thumb(path: str, size: int = THUMB):
    """float32 [size, size] gray in 0..1 (square-resized)."""
    import numpy as np
    from PIL import Image

    from ganprint.data import load_image, to_gray

    g = to_gray(load_image(path))
    im = Image.fromarray(g).resize((size, size), Image.BILINEAR)
    return np.asarray(im, dtype=np.float32) / 255.0


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


def _ecc(real, gen, init):
    """(correlation, warp [2, 3]) of cv2.findTransformECC (Euclidean: rotation + shift) of gen onto
    real from ``init``; (-inf, init) when it does not converge."""
    import cv2
    import numpy as np

    w = np.asarray(init, dtype=np.float32).reshape(2, 3).copy()
    try:
        cc, w = cv2.findTransformECC(real.astype(np.float32), gen.astype(np.float32), w, cv2.MOTION_EUCLIDEAN,
                                     (cv2.TERM_CRITERIA_COUNT | cv2.TERM_CRITERIA_EPS, 60, 1e-5), None, 5)
    except cv2.error:
        return -np.inf, np.asarray(init, dtype=np.float64).reshape(2, 3)
    return float(cc), w.astype(np.float64)


def best_alignment(real, gen, verified=None, frame: int | None = None):
    """The transform [2, 3] (thumbnail pixels, real -> generated) that best aligns ``gen`` onto
    ``real`` [T, T]: intensity-based ECC refinement started from the identity and from the
    verified transform (converted to thumbnail scale), whichever correlates better; plus where
    it started. Verification on symmetric anatomy can lock onto a wrong but consistent fit, and
    ECC alone can miss large shifts; trying both keeps the better one."""
    import numpy as np

    starts = [("identity", np.eye(2, 3))]
    if verified is not None and np.isfinite(np.asarray(verified, dtype=np.float64)).all():
        v = np.asarray(verified, dtype=np.float64).reshape(2, 3).copy()
        v[:, 2] *= real.shape[0] / float(frame)
        starts.append(("verified", v))
    best = max(((*_ecc(real, gen, w), name) for name, w in starts), key=lambda t: t[0])
    return best[1], best[2], best[0]


def _verify(real_path: str, gen_path: str, kind: str):
    """(inliers, transform [2, 3] or None, frame px) of the pair by ganprint.verify."""
    from ganprint.data import load_image
    from ganprint.local_features import DEFAULT_SIZE
    from ganprint.verify import verify_images

    m = verify_images(load_image(real_path), load_image(gen_path), kind=kind)
    return m.inliers, m.transform, DEFAULT_SIZE


def _save_png(arr, path: Path) -> str:
    import numpy as np
    from PIL import Image

    a = (np.clip(arr, 0, 1) * 255 + 0.5).astype(np.uint8)
    tmp = path.with_name(f".{path.name}.tmp")
    Image.fromarray(a).save(tmp, format="PNG", optimize=True)
    os.replace(tmp, path)
    return path.name


def build_gallery(folder: Path, scores_df, real_table, gen_paths: dict[str, list[str]], nn_idx, nn_val, *,
                  n: int = 12, target_role: str = "unknown", matches: int = 3, verify_kind: str | None = None,
                  value_name: str = "similarity") -> list[dict[str, Any]]:
    """Write the gallery's PNGs into ``folder`` and return one card dict per real image.

    ``nn_idx`` int [R, >=3] / ``nn_val`` [R, >=3]: nearest generated images (index into the
    generated set of the row's split) and their similarity (``value_name``); with
    ``verify_kind`` (sift / orb) each shown pair is verified (ganprint.verify): its inlier count
    and recovered transform are shown and the difference is taken after alignment."""
    import numpy as np

    folder.mkdir(parents=True, exist_ok=True)
    if nn_idx is None or n == 0:
        return []
    df = scores_df.reset_index(drop=True)
    pool = np.flatnonzero((df["role"] == target_role).to_numpy())
    order = sorted(pool, key=lambda i: (not bool(df["flag"][i]), float(df["p_value"][i]), -float(df["score"][i])))
    cards = []
    for rank, i in enumerate(order[:n]):
        split = df["split"][i]
        gens = gen_paths.get("test_generated" if split == "test" and "test_generated" in gen_paths else "generated")
        real = _thumb(real_table["path"][i])
        card = {"image_id": str(df["image_id"][i]), "role": str(df["role"][i]), "score": float(df["score"][i]),
                "p_value": float(df["p_value"][i]), "q_value": None if np.isnan(df["q_value"][i]) else float(df["q_value"][i]),
                "flag": bool(df["flag"][i]),
                "label": None if df["label"].isna()[i] else int(df["label"][i]),
                "real": _save_png(real, folder / f"{rank:03d}_real.png"), "matches": []}
        for j in range(min(matches, nn_idx.shape[1])):
            g = int(nn_idx[i, j])
            if g < 0:
                continue
            gen = _thumb(gens[g])
            inl, tr, frame = (None, None, None) if verify_kind is None else _verify(real_table["path"][i], gens[g],
                                                                                    verify_kind)
            ok = tr is not None and np.isfinite(np.asarray(tr, dtype=np.float64)).all()
            warp, start, cc = best_alignment(real, gen, tr if ok else None, frame) if verify_kind else (None, None, None)
            aligned = _align(gen, warp, real.shape[0]) if warp is not None else gen
            diff = np.abs(real - aligned)
            card["matches"].append({
                "generated": Path(gens[g]).stem, "value": float(nn_val[i, j]), "value_name": value_name,
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
