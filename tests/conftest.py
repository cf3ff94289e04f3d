"""Shared fixtures: tiny images built in tmp_path, real DICOM files from pydicom-data."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never wait on an unreachable model hub
os.environ.setdefault("OMP_NUM_THREADS", "2")

import numpy as np
import pytest


def write_png(path, arr, mode=None):
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr, mode=mode).save(path) if mode else Image.fromarray(arr).save(path)
    return path


def random_gray(seed: int, size: int = 48) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (size, size), dtype=np.uint8)


@pytest.fixture
def png_folder(tmp_path):
    """Six small grayscale PNGs in ``tmp_path/imgs``."""
    folder = tmp_path / "imgs"
    for i in range(6):
        write_png(folder / f"img_{i:02d}.png", random_gray(i))
    return folder


def make_imageclef(root, counts=(("generated", 4), ("real_used", 3), ("real_not_used", 3)), size: int = 48,
                   seed: int = 100):
    """Write an ImageCLEF layout of random gray PNGs under ``root``; returns ``root``."""
    k = 0
    for subset, n in counts:
        for i in range(n):
            write_png(root / subset / f"{subset}_{i:03d}.png", random_gray(seed + k, size))
            k += 1
    return root


@pytest.fixture
def imageclef_folder(tmp_path):
    """A tiny ImageCLEF dev layout: generated/ (4), real_used/ (3), real_not_used/ (3)."""
    return make_imageclef(tmp_path / "dev")


def dicom_data_dir():
    import importlib.util

    spec = importlib.util.find_spec("data_store")  # the pydicom-data wheel
    if spec is None or not spec.submodule_search_locations:
        return None
    from pathlib import Path

    d = Path(list(spec.submodule_search_locations)[0]) / "data"
    return d if d.is_dir() else None


@pytest.fixture
def dicom_files():
    """Real CT/MR/X-ray DICOM files bundled by pydicom-data (uncompressed ones)."""
    d = dicom_data_dir()
    if d is None:
        pytest.skip("pydicom-data is not installed")
    names = ["693_UNCI.dcm", "MR2_UNCI.dcm", "RG1_UNCI.dcm", "MR-SIEMENS-DICOM-WithOverlays.dcm", "RG3_UNCI.dcm"]
    files = [d / n for n in names if (d / n).exists()]
    assert len(files) >= 4
    return files
