"""The embed stage: determinism, manifest alignment, provenance, cache reuse, real DICOM similarity."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ganprint.artifacts import read_artifact
from ganprint.embed import run_embed
from ganprint.errors import BadImageError

TINY = dict(backbone="test_resnet", image_size=32, batch_size=4, workers=0, progress=False)


def test_embed_twice_bit_identical_and_aligned(imageclef_folder, tmp_path):
    a = run_embed([str(imageclef_folder)], tmp_path / "a", **TINY)
    b = run_embed([str(imageclef_folder)], tmp_path / "b", **TINY, force=True)
    ea = read_artifact(a.base, kind="embeddings")
    eb = read_artifact(b.base, kind="embeddings")
    assert torch.equal(ea.tensor("embeddings"), eb.tensor("embeddings"))
    assert ea.tensor("embeddings").shape == (10, 96)
    # row i of the manifest names the image of tensor row i: re-embed each file alone
    for i in (0, 5, 9):
        path = ea.table.path[i]
        one = run_embed([path], tmp_path / f"one{i}", **TINY)
        x1 = read_artifact(one.base).tensor("embeddings")[0]
        assert torch.allclose(x1, ea.tensor("embeddings")[i], atol=1e-5)
    prov = ea.provenance
    for key in ("backbone", "weights_digest", "preprocess", "inputs_hash", "cache_key"):
        assert prov[key]
    assert prov["preprocess"]["size"] == 32
    assert list(ea.table.subset.unique()) == ["generated", "real_not_used", "real_used"]
    assert ea.table.label.isna().sum() == 4 and int(ea.table.label.sum()) == 3


def test_workers_give_same_result(png_folder, tmp_path):
    a = run_embed([str(png_folder)], tmp_path / "a", **TINY)
    b = run_embed([str(png_folder)], tmp_path / "b", **{**TINY, "workers": 2})
    assert torch.equal(read_artifact(a.base).tensor("embeddings"), read_artifact(b.base).tensor("embeddings"))


def test_cache_reuse_and_invalidation(png_folder, tmp_path):
    first = run_embed([str(png_folder)], tmp_path / "e", **TINY)
    assert not first.reused
    again = run_embed([str(png_folder)], tmp_path / "e", **TINY)
    assert again.reused
    # changing one image's content changes the key
    from PIL import Image

    p = sorted(png_folder.glob("*.png"))[0]
    Image.fromarray(np.zeros((48, 48), np.uint8)).save(p)
    changed = run_embed([str(png_folder)], tmp_path / "e", **TINY)
    assert not changed.reused
    other_size = run_embed([str(png_folder)], tmp_path / "e", **{**TINY, "image_size": 40})
    assert not other_size.reused


def test_skip_bad_records_in_manifest(png_folder, tmp_path):
    bad = png_folder / "zz_bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 20)
    with pytest.raises(BadImageError, match="zz_bad.png"):
        run_embed([str(png_folder)], tmp_path / "e", **TINY)
    assert not list(tmp_path.glob("e.*"))
    res = run_embed([str(png_folder)], tmp_path / "e", **TINY, skip_bad=True)
    art = read_artifact(res.base)
    assert len(art.table) == 6 and "zz_bad" not in set(art.table.image_id)
    assert art.table_meta["skipped"][0]["path"].endswith("zz_bad.png")
    assert art.provenance["skipped"] == 1


def _flip_dicom(src, dst):
    import pydicom

    ds = pydicom.dcmread(src)
    ds.PixelData = np.ascontiguousarray(ds.pixel_array[:, ::-1]).tobytes()
    ds.save_as(dst)


def test_lite0_flip_closer_than_other_dicom(dicom_files, tmp_path):
    """Acceptance 4: with the offline ImageNet EfficientNet-Lite0, a real DICOM image and its
    horizontal flip are more similar than any two different DICOM images."""
    folder = tmp_path / "dcm"
    folder.mkdir()
    for f in dicom_files:
        (folder / f.name).write_bytes(f.read_bytes())
        _flip_dicom(f, folder / f"{f.stem}_flip.dcm")
    res = run_embed([str(folder)], tmp_path / "e", backbone="efficientnet_lite0", batch_size=16, workers=0,
                    progress=False)
    art = read_artifact(res.base)
    x = torch.nn.functional.normalize(art.tensor("embeddings"), dim=1)
    ids = list(art.table.image_id)
    sim = x @ x.T
    originals = [i for i, n in enumerate(ids) if not n.endswith("_flip")]
    for i in originals:
        j = ids.index(ids[i] + "_flip")
        others = [sim[i, k].item() for k in originals if k != i]
        assert sim[i, j].item() > max(others), (ids[i], sim[i, j].item(), max(others))
