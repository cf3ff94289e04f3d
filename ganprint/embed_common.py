"""Pieces shared by the embedding stages (global backbones in ``ganprint.embed``, local features
in ``ganprint.local_features``): content hashes of the inputs and the stage's outcome."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ganprint.artifacts import digest_json, sha256_file
from ganprint.data import ImageRecord


def hash_records(records: list[ImageRecord]) -> list[str]:
    """sha256 of each file's bytes (threads: hashing releases the GIL)."""
    with ThreadPoolExecutor(max_workers=min(8, (os.cpu_count() or 1) * 2)) as pool:
        return list(pool.map(lambda r: sha256_file(r.path), records))


def inputs_digest(records: list[ImageRecord], hashes: list[str]) -> str:
    return digest_json([[r.relpath, r.subset, h] for r, h in zip(records, hashes)])


@dataclass
class EmbedOutcome:
    base: Path
    reused: bool
    rows: int
    dim: int
    skipped: list[dict]
    seconds: float
    images_per_s: float
    provenance: dict[str, Any]
    warnings: list[str] = field(default_factory=list)


def collect_bad(records: list[ImageRecord], bad: dict[int, str], skip_bad: bool, skipped: list[dict]) -> None:
    """Raise for the first bad image (``bad``: record index -> reason) unless ``skip_bad``; else list
    every bad image in ``skipped``."""
    from ganprint.errors import BadImageError

    if not bad:
        return
    if not skip_bad:
        first = min(bad)
        raise BadImageError(records[first].path, bad[first])
    for i in sorted(bad):
        skipped.append({"path": records[i].path, "reason": bad[i]})
