"""ImageCLEFmedical GANs submission CSV: validate, write (atomically), read.

The organisers' format (the default): **no header**; one line ``<image_id>,<0|1>`` per test
image, the id being the file name *without* extension; every test id exactly once, no unknown id,
no duplicate, no empty line; the label the integer 0 or 1.  ``header=True`` gives the seed's
variant: a first line ``original_image,label`` and ids as given (extensions allowed).

Every rule has its own error (:class:`SubmissionError` with a ``rule`` code) raised *before*
anything is written.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Iterable, Sequence

from ganprint.artifacts import atomic_path
from ganprint.errors import GanprintError

HEADER = "original_image,label"
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".dcm", ".dicom", ".dic", ".gif", ".webp")
_BAD_ID_CHARS = re.compile(r"[,\s\"']")


class SubmissionError(GanprintError):
    """A submission that breaks one rule; ``rule`` names it (e.g. ``duplicate``)."""

    def __init__(self, rule: str, message: str):
        self.rule = rule
        super().__init__(message)


def _preview(items: Sequence[str], n: int = 3) -> str:
    shown = ", ".join(repr(x) for x in list(items)[:n])
    return shown + (f" (+{len(items) - n} more)" if len(items) > n else "")


def strip_extension(image_id: str) -> str:
    """``x.png`` -> ``x`` for known image extensions (case-insensitive); else unchanged."""
    low = image_id.lower()
    for ext in IMAGE_EXTENSIONS:
        if low.endswith(ext) and len(image_id) > len(ext):
            return image_id[: -len(ext)]
    return image_id


def validate_submission(ids: Sequence[str], labels: Sequence, *, header: bool = False,
                        expected: Iterable[str] | None = None, source: str = "submission") -> list[int]:
    """Check ids and labels against the rules; return the labels as Python ints.

    ``expected``: the test ids (each must appear exactly once).  Raises SubmissionError.
    """
    import numpy as np

    ids = [str(i) for i in ids]
    labels = list(labels)
    if len(ids) != len(labels):
        raise SubmissionError("length", f"{source}: {len(ids)} ids but {len(labels)} labels")
    if not ids:
        raise SubmissionError("empty", f"{source}: no rows; a submission needs one line per test image")
    bad = [i for i in ids if not i or _BAD_ID_CHARS.search(i)]
    if bad:
        raise SubmissionError("bad_id", f"{source}: image id(s) {_preview(bad)} are empty or contain a comma, "
                                        "quote or whitespace; ids are plain file names")
    if not header:
        ext = [i for i in ids if strip_extension(i) != i]
        if ext:
            raise SubmissionError("extension", f"{source}: image id(s) {_preview(ext)} carry a file extension; "
                                               "ids are file names without extension (e.g. 'real_unknown_0001')")
    seen: set[str] = set()
    dup: list[str] = []
    for i in ids:
        if i in seen and i not in dup:
            dup.append(i)
        seen.add(i)
    if dup:
        raise SubmissionError("duplicate", f"{source}: image id(s) {_preview(dup)} appear more than once; "
                                           "each test image exactly once")
    out: list[int] = []
    for i, lab in zip(ids, labels):
        ok = isinstance(lab, (int, np.integer)) and not isinstance(lab, (bool, np.bool_)) and int(lab) in (0, 1)
        if not ok:
            raise SubmissionError("label", f"{source}: label {lab!r} of '{i}' is not the integer 0 or 1")
        out.append(int(lab))
    if expected is not None:
        exp = [str(e) for e in expected]
        exp_set = set(exp)
        missing = [e for e in exp if e not in seen]
        if missing:
            raise SubmissionError("missing", f"{source}: {len(missing)} test image(s) have no line, e.g. "
                                             f"{_preview(missing)}; label every test image")
        unknown = [i for i in ids if i not in exp_set]
        if unknown:
            raise SubmissionError("unknown", f"{source}: {len(unknown)} id(s) are not test images, e.g. "
                                             f"{_preview(unknown)}; remove them")
    return out


def render_submission(ids: Sequence[str], labels: Sequence[int], header: bool = False) -> str:
    lines = ([HEADER] if header else []) + [f"{i},{int(lab)}" for i, lab in zip(ids, labels)]
    return "\n".join(lines) + "\n"


def write_submission(path: str | os.PathLike, ids: Sequence[str], labels: Sequence, *, header: bool = False,
                     expected: Iterable[str] | None = None) -> Path:
    """Validate, then write atomically (temp file + rename); returns the path."""
    path = Path(path)
    labs = validate_submission(ids, labels, header=header, expected=expected, source=str(path))
    folder = path.parent
    if not folder.is_dir():
        raise GanprintError(f"{folder}: folder does not exist; create it or choose another --submission")
    text = render_submission([str(i) for i in ids], labs, header)
    with atomic_path(path, "the submission", "choose another --submission") as tmp:
        with open(tmp, "w", encoding="utf-8", newline="\n") as fh:
            fh.write(text)
    return path


def read_submission(path: str | os.PathLike, *, header: bool | None = None,
                    expected: Iterable[str] | None = None) -> tuple[list[str], list[int]]:
    """Read and validate a submission CSV; ``header`` None detects the seed's header line.

    Returns (ids, labels).  The same rules as writing, plus: no empty line, two fields a line,
    labels written ``0`` or ``1``.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise GanprintError(f"{path}: not found; check the path") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise GanprintError(f"{path}: cannot read as UTF-8 text ({exc}); pass a CSV file") from None
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()  # the final newline
    lines = [ln[:-1] if ln.endswith("\r") else ln for ln in lines]
    if not lines:
        raise SubmissionError("empty", f"{path}: is empty; a submission needs one line per test image")
    first = lines[0].strip().lower()
    has_header = first in (HEADER, "image_id,label", "id,label")
    if header is None:
        header = has_header
    elif header and not has_header:
        raise SubmissionError("header", f"{path}: first line is not the header '{HEADER}'")
    elif not header and has_header:
        raise SubmissionError("header", f"{path}: starts with a header line '{lines[0]}'; the format has none")
    body = lines[1:] if header else lines
    ids: list[str] = []
    labels: list = []
    for n, ln in enumerate(body, start=2 if header else 1):
        if not ln.strip():
            raise SubmissionError("empty_line", f"{path}: line {n} is empty; remove empty lines")
        parts = ln.split(",")
        if len(parts) != 2:
            raise SubmissionError("columns", f"{path}: line {n} has {len(parts)} fields, expected 2 (id,label)")
        ids.append(parts[0])
        lab = parts[1]
        labels.append(int(lab) if lab in ("0", "1") else lab)
    validate_submission(ids, labels, header=header, expected=expected, source=str(path))
    return ids, [int(v) for v in labels]
