"""Tiny audit datasets: smooth random images, a generator that copies its training images or not."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def _smooth(rng, size: int) -> np.ndarray:
    from scipy.ndimage import gaussian_filter

    a = gaussian_filter(rng.normal(size=(size, size)), size / 12)
    return (a - a.min()) / (a.max() - a.min() + 1e-9)


def _save(a: np.ndarray, path: Path) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray((np.clip(a, 0, 1) * 255).astype(np.uint8)).save(path)


def make_audit_folders(root: Path, *, copying: bool = True, n_known: int = 12, n_unknown: int = 6,
                       n_generated: int = 30, size: int = 24, seed: int = 0) -> dict[str, Path]:
    """generated/, members/, non_members/, unknown/ under ``root``.

    The training set = members + the first n_unknown/2 unknown images; a copying generator emits
    each training image with a little noise (the rest of its output is fresh), a non-copying one
    only fresh images from the same distribution."""
    rng = np.random.default_rng(seed)
    half = n_unknown // 2
    train = [_smooth(rng, size) for _ in range(n_known + half)]
    held = [_smooth(rng, size) for _ in range(n_known + n_unknown - half)]
    for i, a in enumerate(train[:n_known]):
        _save(a, root / "members" / f"m{i:03d}.png")
    for i, a in enumerate(held[:n_known]):
        _save(a, root / "non_members" / f"n{i:03d}.png")
    for i, a in enumerate(train[n_known:]):
        _save(a, root / "unknown" / f"u_in{i:03d}.png")
    for i, a in enumerate(held[n_known:]):
        _save(a, root / "unknown" / f"u_out{i:03d}.png")
    for i in range(n_generated):
        a = train[i] + 0.08 * _smooth(rng, size) if copying and i < len(train) else _smooth(rng, size)
        _save(a, root / "generated" / f"g{i:03d}.png")
    return {k: root / k for k in ("generated", "members", "non_members", "unknown")}


def audit_args(folders: dict[str, Path], out: Path, *extra: str) -> list[str]:
    return ["audit", "--generated", str(folders["generated"]), "--members", str(folders["members"]),
            "--non-members", str(folders["non_members"]), "--unknown", str(folders["unknown"]), "--out", str(out),
            "-b", "pixels", "--bootstrap", "50", "--repeats", "1", "--folds", "3", "-q", *extra]
