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


def _warp(img, transform):
    """Apply a 2x3 affine (in thumbnail pixels) to img [H, W]."""
    import cv2
    import numpy as np

    m = np.asarray(transform, dtype=np.float64).reshape(2, 3)
    return cv2.warpAffine(img, m, (img.shape[1], img.shape[0]), flags=cv2.INTER_LINEAR,
                          borderMode=cv2.BORDER_REPLICATE)


def _save_png(arr, path: Path) -> str:
    import numpy as np
    from PIL import Image

    a = (np.clip(arr, 0, 1) * 255 + 0.5).astype(np.uint8)
    tmp = path.with_name(f".{path.name}.tmp")
    Image.fromarray(a).save(tmp, format="PNG", optimize=True)
    os.replace(tmp, path)
    return path.name


def build_gallery(folder: Path, scores_df, real_table, gen_paths: dict[str, list[str]], nn_idx, nn_val, *,
                  n: int = 12, target_role: str = "unknown", matches: int = 3, transforms=None,
                  inliers=None) -> list[dict[str, Any]]:
    """Write the gallery's PNGs into ``folder`` and return one card dict per real image.

    ``nn_idx`` int [R, >=3] / ``nn_val`` [R, >=3]: nearest generated images (index into the
    generated set of the row's split) and their similarity; ``transforms`` float [R, 3, 2, 3]
    and ``inliers`` int [R, 3] from verification, or None."""
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
            tr = None if transforms is None else np.asarray(transforms[i, j])
            aligned = gen if tr is None or not np.isfinite(tr).all() else _warp(gen, tr)
            diff = np.abs(real - aligned)
            card["matches"].append({
                "generated": Path(gens[g]).stem, "similarity": float(nn_val[i, j]),
                "inliers": None if inliers is None else int(inliers[i, j]),
                "transform": None if tr is None else [float(v) for v in tr.reshape(-1)],
                "aligned": tr is not None,
                "img": _save_png(gen, folder / f"{rank:03d}_g{j}.png"),
                "diff": _save_png(1.0 - np.clip(diff * 2.0, 0, 1), folder / f"{rank:03d}_d{j}.png"),
            })
        cards.append(card)
    return cards
