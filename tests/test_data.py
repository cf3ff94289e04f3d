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


# --- hostile folders: nothing may hang, every bad entry gets a clear, skippable error ------------

import contextlib
import os
import signal
import struct
import zlib


@contextlib.contextmanager
def deadline(seconds: int):
    """Fail (instead of hanging the suite) when the block runs longer than ``seconds``."""
    def _timeout(signum, frame):
        raise TimeoutError(f"still running after {seconds} s (hang)")

    old = signal.signal(signal.SIGALRM, _timeout)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def bomb_png() -> bytes:
    """A tiny valid-looking PNG that claims 100000 x 100000 gray pixels."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", 100000, 100000, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b"")


def test_symlink_loops_are_walked_once(png_folder):
    os.symlink("..", png_folder / "up")           # loop 1: back to the parent
    os.symlink(".", png_folder / "self")          # loop 2: to itself
    (png_folder / "sub").mkdir()
    os.symlink("../..", png_folder / "sub" / "top")
    with deadline(20):
        recs, skipped = discover([str(png_folder)])
    assert sorted(r.image_id for r in recs) == [f"img_{i:02d}" for i in range(6)]
    assert skipped == []


@pytest.mark.parametrize("kind", ["fifo", "dev_zero", "self_loop", "broken"])
def test_special_files_named_png_are_refused_not_opened(png_folder, kind):
    bad = png_folder / "evil.png"
    if kind == "fifo":
        os.mkfifo(bad)
        why = "not a regular file (a FIFO"
    elif kind == "dev_zero":
        os.symlink("/dev/zero", bad)
        why = "not a regular file (a device)"
    elif kind == "self_loop":
        os.symlink(bad.name, bad)
        why = "symbolic link loop"
    else:
        os.symlink("nowhere.png", bad)
        why = "broken symbolic link"
    with deadline(20):
        with pytest.raises(BadImageError) as ei:
            discover([str(png_folder)])
        assert why in str(ei.value) and "evil.png" in str(ei.value) and "not an image file" not in str(ei.value)
        recs, skipped = discover([str(png_folder)], skip_bad=True)
        assert len(recs) == 6 and [s["path"] for s in skipped] == [str(bad)] and why in skipped[0]["reason"]
        with pytest.raises(BadImageError):  # named directly too
            discover([str(bad)])
        assert discover([str(bad), str(png_folder / "img_00.png")], skip_bad=True)[1][0]["reason"] == skipped[0]["reason"]


def test_decompression_bomb_is_a_clear_bad_image():
    data = bomb_png()
    assert len(data) < 100
    with deadline(20):
        with pytest.raises(BadImageError) as ei:
            decode_image(data, "bomb.png")
    assert "bomb.png: claims more pixels than the decompression-bomb limit" in str(ei.value)
    assert "--skip-bad" in str(ei.value)


def run_cli(args, timeout: int = 120):
    """``ganprint ARGS`` in a child process killed after ``timeout`` s: a hang fails the test
    (a blocked open() in a worker thread would outlive any in-process alarm)."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root), "HF_HUB_OFFLINE": "1"}
    try:
        return subprocess.run([sys.executable, "-m", "ganprint", *map(str, args)], capture_output=True, text=True,
                              timeout=timeout, env=env, cwd=root)
    except subprocess.TimeoutExpired:
        pytest.fail(f"ganprint {' '.join(map(str, args))} still running after {timeout} s (hang)")


def test_embed_skips_the_bomb_and_survives_fifo_and_loops(png_folder, tmp_path):
    (png_folder / "bomb.png").write_bytes(bomb_png())
    os.mkfifo(png_folder / "pipe.png")
    os.symlink("/dev/zero", png_folder / "zero.png")
    os.symlink("..", png_folder / "up")
    os.symlink(".", png_folder / "self")
    out = tmp_path / "e"
    args = ["embed", png_folder, "--out", out, "--backbone", "test_resnet", "--image-size", "32", "--workers", "0", "-q"]
    r = run_cli(args)
    assert r.returncode == 2 and r.stderr.startswith("Error: ") and r.stderr.count("\n") == 1, r.stderr
    assert not list(tmp_path.glob("e.*")) and not list(tmp_path.glob(".e.*"))
    r = run_cli([*args, "--skip-bad", "--json"])
    assert r.returncode == 0, r.stderr
    import json

    res = json.loads(r.stdout)
    assert res["rows"] == 6
    reasons = " ".join(s["reason"] for s in res["skipped"])
    assert "decompression-bomb" in reasons and "FIFO" in reasons and "device" in reasons
