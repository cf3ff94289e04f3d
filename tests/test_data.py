"""Image discovery and decoding: formats, layouts, order, bad files."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from conftest import random_gray, write_png
from ganprint.data import decode_image, discover, load_image
from ganprint.errors import BadImageError, GanprintError


def test_discover_sorted_and_layout(imageclef_folder):
    records, skipped = discover([str(imageclef_folder)])
    assert skipped == []
    rel = [r.relpath for r in records]
    assert rel == sorted(rel)
    assert len(records) == 10
    by_subset = {r.subset for r in records}
    assert by_subset == {"generated", "real_used", "real_not_used"}
    for r in records:
        assert r.split == "dev"
        assert r.label == {"generated": None, "real_used": 1, "real_not_used": 0}[r.subset]
        assert not r.image_id.endswith(".png") and r.image_id in r.relpath


def test_discover_stdin_file_list(png_folder):
    files = sorted(png_folder.glob("*.png"))
    stdin = io.StringIO("\n".join(str(f) for f in files[::-1][:3]) + "\n\n")
    records, _ = discover(["-"], stdin=stdin)
    # order of a file list is the order given
    assert [r.image_id for r in records] == [f.stem for f in files[::-1][:3]]


def test_discover_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(GanprintError, match="holds no images"):
        discover([str(tmp_path / "empty")])
    with pytest.raises(GanprintError, match="no such file or folder"):
        discover([str(tmp_path / "missing")])
    (tmp_path / "mixed").mkdir()
    write_png(tmp_path / "mixed" / "a.png", random_gray(0))
    (tmp_path / "mixed" / "notes.txt").write_text("hello")
    with pytest.raises(BadImageError, match=r"notes\.txt: not an image file"):
        discover([str(tmp_path / "mixed")])
    recs, skipped = discover([str(tmp_path / "mixed")], skip_bad=True)
    assert [r.image_id for r in recs] == ["a"]
    assert skipped[0]["path"].endswith("notes.txt")


def _encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def test_palette_png_goes_through_palette():
    gray = random_gray(3, 32)
    # palette maps index i -> gray level 255 - i, so the indices are *not* the intensities
    idx = (255 - gray).astype(np.uint8)
    img = Image.fromarray(idx, mode="L").convert("P")
    img.putpalette([v for i in range(256) for v in (255 - i,) * 3])
    img = Image.frombytes("P", (32, 32), idx.tobytes())
    img.putpalette([v for i in range(256) for v in (255 - i,) * 3])
    out = decode_image(_encode(img, "PNG"), "x.png")
    assert out.shape == (32, 32) and out.dtype == np.uint8
    np.testing.assert_array_equal(out, gray)


def test_16bit_gray_rgba_rgb_jpeg_tiff_bmp():
    a16 = (np.arange(64 * 64, dtype=np.uint32).reshape(64, 64) * 7 + 1000).astype(np.uint16)
    out = decode_image(_encode(Image.fromarray(a16), "PNG"), "x.png")
    assert out.dtype == np.uint8 and out.min() == 0 and out.max() == 255
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[..., 0] = 200
    rgba[..., 3] = 128
    out = decode_image(_encode(Image.fromarray(rgba, "RGBA"), "PNG"), "x.png")
    assert out.shape == (8, 8, 3) and abs(int(out[0, 0, 0]) - 100) <= 1 and out[0, 0, 1] == 0
    gray = random_gray(1, 16)
    for fmt in ("TIFF", "BMP"):
        np.testing.assert_array_equal(decode_image(_encode(Image.fromarray(gray), fmt), "x"), gray)
    rgb = np.stack([gray] * 3, axis=2)
    out = decode_image(_encode(Image.fromarray(rgb), "JPEG", quality=95), "x.jpg")
    assert out.shape == (16, 16, 3)


def test_truncated_and_empty(tmp_path):
    data = _encode(Image.fromarray(random_gray(0, 64)), "PNG")
    with pytest.raises(BadImageError, match="corrupt or truncated"):
        decode_image(data[: len(data) // 2], str(tmp_path / "t.png"))
    with pytest.raises(BadImageError, match="empty file"):
        decode_image(b"", "e.png")


def test_dicom_rescale_and_window(dicom_files):
    import pydicom

    ct = next(f for f in dicom_files if f.name == "693_UNCI.dcm")
    ds = pydicom.dcmread(ct)
    out = load_image(str(ct))
    assert out.shape == ds.pixel_array.shape and out.dtype == np.uint8
    # a real CT slice uses the whole 8-bit range after windowing, with air dark
    assert out.min() == 0 and out.max() == 255
    assert out[0, 0] < 50


def test_dicom_monochrome1_inverted(dicom_files):
    import pydicom

    cr = next(f for f in dicom_files if f.name == "RG1_UNCI.dcm")
    ds = pydicom.dcmread(cr)
    assert ds.PhotometricInterpretation == "MONOCHROME1"
    out = load_image(str(cr)).astype(float)
    raw = ds.pixel_array.astype(float)
    # inverted: correlation between raw values and output is negative
    assert np.corrcoef(raw[::8, ::8].ravel(), out[::8, ::8].ravel())[0, 1] < -0.5
