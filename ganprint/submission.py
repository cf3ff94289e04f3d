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
        unknown = [i for i in ids if i not in exp_set]
        if unknown:
            raise SubmissionError("unknown", f"{source}: {len(unknown)} id(s) are not test images, e.g. "
                                             f"{_preview(unknown)}; remove them")
        missing = [e for e in exp if e not in seen]
        if missing:
            raise SubmissionError("missing", f"{source}: {len(missing)} test image(s) have no line, e.g. "
                                             f"{_preview(missing)}; label every test image")
    return out


def render_submission(ids: Sequence[str], labels: Sequence[int], header: bool = False) -> str:
    lines = ([HEADER] if header else []) + [f"{i},{int(lab)}" for i, lab in zip(ids, labels)]
    return "\n".join(lines) + "\n"


def check_submission_path(path: str | os.PathLike) -> Path:
    """Fail before any work when the submission cannot be written at ``path``."""
    from ganprint.artifacts import ensure_writable

    path = Path(path)
    if path.is_dir():
        raise GanprintError(f"{path}: is a folder; pass a file name for --submission")
    if not path.parent.is_dir():
        raise GanprintError(f"{path.parent}: folder does not exist; create it or choose another --submission")
    ensure_writable(path.parent / "probe", claim=False)
    return path


class StagedSubmission:
    """A validated submission written to a temp file next to ``path``; :meth:`commit` renames it
    into place, :meth:`discard` deletes it (so a caller can write several outputs all or nothing)."""

    def __init__(self, path: Path, tmp: str):
        self.path, self.tmp = path, tmp

    def commit(self) -> Path:
        from ganprint.artifacts import follow_umask

        try:
            follow_umask(self.tmp)
            os.replace(self.tmp, self.path)
        except OSError as exc:
            self.discard()
            raise GanprintError(f"{self.path}: cannot write the submission ({exc.strerror or exc}); "
                                "choose another --submission") from exc
        return self.path

    def discard(self) -> None:
        try:
            os.unlink(self.tmp)
        except OSError:
            pass


def stage_submission(path: str | os.PathLike, ids: Sequence[str], labels: Sequence, *, header: bool = False,
                     expected: Iterable[str] | None = None) -> StagedSubmission:
    """Validate, then write to a temp file beside ``path`` (nothing at ``path`` yet)."""
    import tempfile

    path = Path(path)
    labs = validate_submission(ids, labels, header=header, expected=expected, source=str(path))
    check_submission_path(path)
    text = render_submission([str(i) for i in ids], labs, header)
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as fh:
            fh.write(text)
    except OSError as exc:
        if tmp is not None:
            StagedSubmission(path, tmp).discard()
        raise GanprintError(f"{path}: cannot write the submission ({exc.strerror or exc}); "
                            "choose another --submission") from exc
    return StagedSubmission(path, tmp)


def write_submission(path: str | os.PathLike, ids: Sequence[str], labels: Sequence, *, header: bool = False,
                     expected: Iterable[str] | None = None) -> Path:
    """Validate, then write atomically (temp file + rename); returns the path."""
    return stage_submission(path, ids, labels, header=header, expected=expected).commit()


_HEADERS = (HEADER, "image_id,label", "id,label")
_BOM = "\ufeff"


def _parse_label(field: str):
    """The organisers' rule: ``int(field.strip())`` must give 0 or 1 (so ``+1`` and ``\\t1`` pass,
    ``1.0`` and ``1e0`` do not).  Returns the int, or the raw field when it breaks the rule."""
    try:
        v = int(field.strip())
    except ValueError:
        return field
    return v if v in (0, 1) else field


def read_submission(path: str | os.PathLike, *, header: bool | None = False,
                    expected: Iterable[str] | None = None) -> tuple[list[str], list[int]]:
    """Read and validate a submission CSV exactly as the organisers' validator does, with
    ganprint's messages.  Returns (ids, labels).

    Their validator (ImageCLEFmed GANs 2023, task 1) opens the file as text (universal newlines),
    splits each line on commas with no quoting, requires two fields, strips whitespace around
    both and parses the label with ``int()``.  So trailing spaces, a missing final newline,
    ``+1`` and a tab before the label are accepted; a UTF-8 byte-order mark (it becomes part of
    the first id), a header line, ids with an extension, ``1.0``, empty lines, duplicates and
    unknown or missing ids are rejected.

    ``header``: False (the organisers' format) rejects a header line; True requires the seed's
    header ``original_image,label`` (ids as given, extensions allowed); None detects it (truth CSVs).
    """
    import csv

    path = Path(path)
    try:
        with open(path, encoding="utf-8", newline=None) as fh:
            rows = list(csv.reader(fh, delimiter=",", quoting=csv.QUOTE_NONE))
    except FileNotFoundError:
        raise GanprintError(f"{path}: not found; check the path") from None
    except IsADirectoryError:
        raise GanprintError(f"{path}: is a folder, not a CSV file; pass the submission CSV") from None
    except UnicodeDecodeError as exc:
        raise GanprintError(f"{path}: is not UTF-8 text ({exc.reason} at byte {exc.start}); "
                            "pass a CSV file saved as UTF-8") from None
    except (OSError, csv.Error) as exc:
        raise GanprintError(f"{path}: cannot read as CSV text ({getattr(exc, 'strerror', None) or exc}); "
                            "pass a CSV file") from None
    if not rows:
        raise SubmissionError("empty", f"{path}: is empty; a submission needs one line per test image")
    if rows[0] and rows[0][0].startswith(_BOM):
        raise SubmissionError("bom", f"{path}: starts with a UTF-8 byte-order mark, which the organisers' "
                                     "validator reads as part of the first image id; save the file without BOM")
    first = ",".join(f.strip() for f in rows[0]).lower()
    has_header = first in _HEADERS
    if header is None:
        header = has_header
    elif header and not has_header:
        raise SubmissionError("header", f"{path}: first line is not the header '{HEADER}'")
    elif not header and has_header:
        raise SubmissionError("header", f"{path}: line 1 is a header line {','.join(rows[0])!r}; the organisers' "
                                        "format has none: remove it (or pass --header for the seed's variant)")
    body = rows[1:] if header else rows
    ids: list[str] = []
    labels: list = []
    for n, row in enumerate(body, start=2 if header else 1):
        if not row or (len(row) == 1 and not row[0].strip()):
            raise SubmissionError("empty_line", f"{path}: line {n} is empty; remove empty lines")
        if len(row) != 2:
            raise SubmissionError("columns", f"{path}: line {n} has {len(row)} fields {','.join(row)!r}, "
                                             "expected 2: <image_id>,<0|1>")
        ids.append(row[0].strip())
        labels.append(_parse_label(row[1]))
    validate_submission(ids, labels, header=header, expected=expected, source=str(path))
    return ids, [int(v) for v in labels]
