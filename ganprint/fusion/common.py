"""Helpers shared by the fusion methods: reading experts, row alignment, expert identity.

Experts are embeddings artifacts of the *same images in the same order*: their manifests must
agree row by row on ``image_id`` and ``sha256`` (content).  Fusing misaligned rows would mix the
features of different images silently (one of the paper code's defects: ``os.listdir`` order
differed between scripts), so it is refused.
"""

from __future__ import annotations

import os
from typing import Any, Sequence

from ganprint.artifacts import Artifact, read_artifact
from ganprint.errors import ArtifactError, GanprintError

ALIGN_COLUMNS = ("image_id", "sha256")


def expert_identity(prov: dict[str, Any]) -> dict[str, Any]:
    """What defines an expert's feature space (the embeddings comparability key, plus width)."""
    from ganprint.similarity import comparable_key

    return {**comparable_key(prov), "dim": prov.get("dim")}


def expert_record(art: Artifact) -> dict[str, Any]:
    """Identity of one expert plus where it came from (stored in the fusion weights' metadata)."""
    rec = expert_identity(art.provenance)
    rec["timm_name"] = art.provenance.get("timm_name")
    rec["artifact"] = str(art.base)
    rec["dim"] = int(art.tensor("embeddings").shape[1])
    return rec


def short(value: Any) -> str:
    return "none" if value is None else str(value)[:12]


def read_experts(paths: Sequence[str | os.PathLike]) -> list[Artifact]:
    """Read K >= 2 embeddings artifacts and check that their rows describe the same images."""
    if len(paths) < 2:
        raise GanprintError(f"fuse moe needs at least 2 embeddings artifacts, got {len(paths)}; "
                            "pass one artifact per backbone (expert)")
    arts = [read_artifact(p, kind="embeddings") for p in paths]
    for art in arts:
        emb = art.tensor("embeddings")
        if emb.dim() != 2 or emb.shape[0] == 0:
            raise ArtifactError(f"{art.base}: embeddings tensor is {tuple(emb.shape)}, expected [N, D] with N >= 1; "
                                "re-run embed")
    check_aligned(arts)
    return arts


def check_aligned(arts: Sequence[Artifact]) -> None:
    """Raise a one-line :class:`ArtifactError` naming both files unless every manifest matches the
    first one row by row (same ``image_id`` and ``sha256`` in the same order)."""
    ref = arts[0]
    for art in arts[1:]:
        _check_pair(ref, art)


def _check_pair(a: Artifact, b: Artifact) -> None:
    na, nb = a.tensor("embeddings").shape[0], b.tensor("embeddings").shape[0]
    fix = "embed the same images (same folders, same --skip-bad) for every expert"
    if na != nb:
        raise ArtifactError(f"{a.base} and {b.base}: manifests differ ({na} vs {nb} rows); {fix}")
    cols = [c for c in ALIGN_COLUMNS if a.table is not None and b.table is not None
            and c in a.table.columns and c in b.table.columns]
    if "image_id" not in cols:
        raise ArtifactError(f"{a.base} and {b.base}: manifest has no image_id column; re-run embed")
    for col in cols:
        va = a.table[col].astype(str).tolist()
        vb = b.table[col].astype(str).tolist()
        if va != vb:
            i = next(i for i, (x, y) in enumerate(zip(va, vb)) if x != y)
            x, y = (short(va[i]), short(vb[i])) if col == "sha256" else (va[i], vb[i])
            raise ArtifactError(f"{a.base} and {b.base}: manifests differ at row {i} ({col} {x} vs {y}); {fix}")


def by_expert(names: Sequence[str], values: Sequence[float]) -> dict[str, float]:
    """``{expert name: value}``; names that repeat (same backbone twice) get a ``#k`` position suffix."""
    dup = len(set(names)) != len(names)
    return {(f"{n}#{i + 1}" if dup else n): v for i, (n, v) in enumerate(zip(names, values))}
