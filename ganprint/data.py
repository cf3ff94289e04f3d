"""Finding and decoding images: folders, file lists, stdin; PNG/JPEG/TIFF/BMP/DICOM.

Every image is decoded to a uint8 array, [H, W] for grayscale or [H, W, 3] for colour:

- PNG palette ("colormap") images go through their palette to grayscale (the 2025 task data);
- 16-bit grayscale is scaled from its own min..max to 0..255;
- RGBA is composited on black;
- DICOM gets its modality LUT (rescale slope/intercept), then the file's first VOI window
  (WindowCenter/Width) or, without one, a 0.5-99.5 percentile window; MONOCHROME1 is inverted;
  a multi-frame file gives its middle frame.

Order is deterministic: inputs in the order given, files inside a folder sorted by relative path.
ImageCLEF layouts are recognised from the nearest ancestor folder named ``generated``,
``real_used`` (label 1), ``real_not_used`` (label 0) or ``real_unknown``.
"""

from __future__ import annotations

import errno
import io
import os
import stat
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import numpy as np

from ganprint.errors import BadImageError, GanprintError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".dcm", ".dicom", ".dic"}
DICOM_SUFFIXES = {".dcm", ".dicom", ".dic"}
SUBSET_LABELS: dict[str, int | None] = {
    "generated": None,
    "real_used": 1,
    "real_not_used": 0,
    "real_unknown": None,
}


@dataclass(frozen=True)
class ImageRecord:
    """One input image. ``image_id`` is the file name without extension (the submission id)."""

    path: str  # absolute path
    relpath: str  # relative to the root it was found under (file name for single files)
    image_id: str
    subset: str | None  # generated / real_used / real_not_used / real_unknown / None
    label: int | None  # 1 = member, 0 = non-member, None = unknown
    split: str | None  # name of the folder above the subset folder (e.g. dev, test)


def _layout_of(path: Path) -> tuple[str | None, int | None, str | None]:
    for i, part in enumerate(reversed(path.parts[:-1])):
        if part in SUBSET_LABELS:
            parents = path.parts[: len(path.parts) - 1 - i - 1]
            split = parents[-1] if parents else None
            return part, SUBSET_LABELS[part], split
    return None, None, None


def _is_dicom_file(path: Path) -> bool:
    try:
        with open(path, "rb") as fh:
            fh.seek(128)
            return fh.read(4) == b"DICM"
    except OSError:
        return False


def _record(path: Path, relpath: str) -> ImageRecord:
    subset, label, split = _layout_of(path)
    stem = path.name
    for suf in reversed(path.suffixes[-1:]):
        if suf.lower() in IMAGE_SUFFIXES:
            stem = stem[: -len(suf)]
    return ImageRecord(str(path), relpath, stem, subset, label, split)


def _walk(root: Path) -> Iterable[Path]:
    """Every non-hidden entry below ``root``, following symlinked folders but entering each real
    folder (device, inode) once, so symlink loops end.  Yields file-like entries only (anything
    that is not a folder: regular files, FIFOs, devices, broken links); :func:`_check_file` sorts
    them out without opening them."""
    seen: set[tuple[int, int]] = set()
    stack = [root]
    while stack:
        folder = stack.pop()
        try:
            st = folder.stat()
        except OSError:
            continue
        if (st.st_dev, st.st_ino) in seen:
            continue
        seen.add((st.st_dev, st.st_ino))
        try:
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError:
            continue
        subdirs = []
        for e in entries:
            if e.name.startswith("."):
                continue
            try:
                is_dir = e.is_dir(follow_symlinks=True)
            except OSError:
                is_dir = False
            if is_dir:
                subdirs.append(Path(e.path))
            else:
                yield Path(e.path)
        stack.extend(reversed(subdirs))


def _check_file(path: Path) -> str | None:
    """Why ``path`` cannot be an image file without opening it (a FIFO would block, ``/dev/zero``
    never ends), or None for a regular file."""
    try:
        st = path.stat()
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return "symbolic link loop (the link points back to itself)"
        if path.is_symlink():
            return "broken symbolic link (its target does not exist)"
        return f"cannot read file ({exc.strerror})"
    if stat.S_ISREG(st.st_mode):
        return None
    if stat.S_ISFIFO(st.st_mode):
        kind = "a FIFO (named pipe)"
    elif stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
        kind = "a device"
    elif stat.S_ISSOCK(st.st_mode):
        kind = "a socket"
    else:
        kind = "a special file"
    return f"not a regular file ({kind}); only image files are read"


def _reject(path: Path, skip_bad: bool, skipped: list[dict]) -> bool:
    """True when ``path`` is not an image file to read (recorded in ``skipped`` under skip_bad,
    else BadImageError)."""
    reason = _check_file(path)
    if reason is None and path.suffix.lower() not in IMAGE_SUFFIXES and not _is_dicom_file(path):
        reason = "not an image file (expected PNG, JPEG, TIFF, BMP or DICOM)"
    if reason is None:
        return False
    if skip_bad:
        skipped.append({"path": str(path), "reason": reason})
        return True
    raise BadImageError(str(path), reason)


def discover(inputs: list[str], stdin=None, skip_bad: bool = False) -> tuple[list[ImageRecord], list[dict]]:
    """Expand folders / files / ``-`` (paths on stdin) into image records.

    Returns ``(records, skipped)``; ``skipped`` lists ``{"path", "reason"}`` for non-image files
    dropped under ``skip_bad``. Raises :class:`GanprintError` for missing paths or no images, and
    :class:`BadImageError` for a non-image file when ``skip_bad`` is false.
    """
    if not inputs:
        raise GanprintError("no input given; pass image folders or files, or - to read paths from stdin")
    expanded: list[str] = []
    for item in inputs:
        if item == "-":
            stream = stdin if stdin is not None else sys.stdin
            expanded.extend(ln.strip() for ln in stream.read().splitlines() if ln.strip())
        else:
            expanded.append(item)
    records: list[ImageRecord] = []
    skipped: list[dict] = []
    seen: set[str] = set()
    for item in expanded:
        p = Path(item).expanduser()
        if not p.exists() and not p.is_symlink():
            raise GanprintError(f"{item}: no such file or folder; check the path")
        if p.is_dir():
            root = p.resolve()
            files = sorted(_walk(root), key=lambda f: f.relative_to(root).as_posix())
            found = 0
            for f in files:
                rel = f.relative_to(root).as_posix()
                if _reject(f, skip_bad, skipped):
                    continue
                key = str(f.resolve())
                if key in seen:
                    continue
                seen.add(key)
                records.append(_record(f.resolve(), rel))
                found += 1
            if found == 0:
                raise GanprintError(f"{item}: folder holds no images; point to a folder with PNG, JPEG, TIFF, BMP or DICOM files")
        else:
            if _reject(p, skip_bad, skipped):
                continue
            f = p.resolve()
            if str(f) in seen:
                continue
            seen.add(str(f))
            records.append(_record(f, f.name))
    if not records:
        raise GanprintError("no images found in the inputs; pass image folders or files")
    return records, skipped


# ---------------------------------------------------------------------------------------------
# decoding


def _to_uint8_range(arr: np.ndarray, lo: float, hi: float) -> np.ndarray:
    arr = arr.astype(np.float64)
    if hi <= lo:
        hi = lo + 1.0
    out = (arr - lo) / (hi - lo)
    return (np.clip(out, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def _decode_dicom(data: bytes, path: str) -> np.ndarray:
    import pydicom
    from pydicom.pixels import apply_modality_lut

    try:
        ds = pydicom.dcmread(io.BytesIO(data), force=True)
        arr = ds.pixel_array
    except Exception as exc:
        raise BadImageError(path, f"cannot decode DICOM pixel data ({type(exc).__name__}: {exc})") from exc
    frames = int(getattr(ds, "NumberOfFrames", 1) or 1)
    photometric = str(getattr(ds, "PhotometricInterpretation", "MONOCHROME2")).upper()
    samples = int(getattr(ds, "SamplesPerPixel", 1) or 1)
    if frames > 1:
        arr = arr[frames // 2]
    if photometric == "PALETTE COLOR":
        from pydicom.pixels import apply_color_lut

        rgb = apply_color_lut(arr, ds)
        return (rgb.astype(np.float64) / 257.0 + 0.5).astype(np.uint8) if rgb.dtype != np.uint8 else rgb
    if samples == 3:
        if photometric.startswith("YBR"):
            from pydicom.pixels import convert_color_space

            arr = convert_color_space(arr, photometric, "RGB")
        return _to_uint8_range(arr, float(arr.min()), float(arr.max())) if arr.dtype != np.uint8 else arr
    arr = apply_modality_lut(arr, ds).astype(np.float64)
    center = getattr(ds, "WindowCenter", None)
    width = getattr(ds, "WindowWidth", None)
    lo = hi = None
    if center is not None and width is not None:
        try:
            c = float(center[0] if isinstance(center, pydicom.multival.MultiValue) else center)
            w = float(width[0] if isinstance(width, pydicom.multival.MultiValue) else width)
            if w > 1:
                lo, hi = c - w / 2.0, c + w / 2.0
        except (TypeError, ValueError):
            lo = hi = None
    if lo is None:
        lo, hi = (float(v) for v in np.percentile(arr, [0.5, 99.5]))
    out = _to_uint8_range(arr, lo, hi)
    if photometric == "MONOCHROME1":
        out = 255 - out
    return out


def _decode_pil(data: bytes, path: str) -> np.ndarray:
    import warnings

    from PIL import Image, UnidentifiedImageError

    try:
        with warnings.catch_warnings():
            # past PIL's pixel limit a file is refused before its pixels are allocated: a few
            # bytes can claim 100000 x 100000 pixels (a decompression bomb)
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            img.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise BadImageError(path, f"claims more pixels than the decompression-bomb limit of "
                                  f"{Image.MAX_IMAGE_PIXELS} ({exc})") from exc
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise BadImageError(path, f"corrupt or truncated image ({exc})") from exc
    mode = img.mode
    if mode == "P" and "transparency" not in img.info:
        pal = img.getpalette() or []
        pal = np.asarray(pal + [0] * (768 - len(pal)), dtype=np.uint8)[:768].reshape(256, 3)
        idx = np.asarray(img)
        if (pal[:, 0] == pal[:, 1]).all() and (pal[:, 1] == pal[:, 2]).all():
            # a gray palette (the ImageCLEF 2025 PNGs): one table look-up, no RGB detour
            return np.ascontiguousarray(pal[:, 0][idx])
    if mode == "P" or mode == "PA":
        img = img.convert("RGBA") if "transparency" in img.info or mode == "PA" else img.convert("RGB")
        mode = img.mode
        if mode == "RGB":
            rgb = np.asarray(img)
            if (rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 1] == rgb[..., 2]).all():
                return np.ascontiguousarray(rgb[..., 0])
            return np.asarray(img.convert("L"))
    if mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(img).astype(np.float64)
        return _to_uint8_range(arr, float(arr.min()), float(arr.max()))
    if mode in ("L", "1"):
        return np.asarray(img.convert("L"))
    if mode == "LA":
        arr = np.asarray(img).astype(np.float64)
        return (arr[..., 0] * arr[..., 1] / 255.0 + 0.5).astype(np.uint8)
    if mode in ("RGBA",):
        arr = np.asarray(img).astype(np.float64)
        rgb = arr[..., :3] * (arr[..., 3:4] / 255.0)
        return (rgb + 0.5).astype(np.uint8)
    return np.asarray(img.convert("RGB"))


def decode_image(data: bytes, path: str) -> np.ndarray:
    """Decode file bytes to uint8 [H, W] (gray) or [H, W, 3] (RGB)."""
    if not data:
        raise BadImageError(path, "empty file")
    is_dicom = Path(path).suffix.lower() in DICOM_SUFFIXES or (len(data) > 132 and data[128:132] == b"DICM")
    arr = _decode_dicom(data, path) if is_dicom else _decode_pil(data, path)
    if arr.ndim not in (2, 3) or arr.shape[0] < 1 or arr.shape[1] < 1:
        raise BadImageError(path, f"unsupported image shape {arr.shape}")
    return np.ascontiguousarray(arr)


def load_image(path: str) -> np.ndarray:
    try:
        with open(path, "rb") as fh:
            data = fh.read()
    except OSError as exc:
        raise BadImageError(path, f"cannot read file ({exc.strerror})") from exc
    return decode_image(data, path)


def to_gray(arr: np.ndarray) -> np.ndarray:
    """uint8 [H, W] luminance (ITU-R 601, as PIL's ``convert('L')``)."""
    if arr.ndim == 2:
        return arr
    f = arr.astype(np.float64)
    return (f[..., 0] * 0.299 + f[..., 1] * 0.587 + f[..., 2] * 0.114 + 0.5).astype(np.uint8)


def to_rgb(arr: np.ndarray) -> np.ndarray:
    """uint8 [H, W, 3]; grayscale is replicated, as ImageNet backbones expect."""
    if arr.ndim == 3:
        return arr
    return np.repeat(arr[..., None], 3, axis=2)
