"""Artifact pairs: round trip, provenance, atomicity, validation on read."""

from __future__ import annotations

import io
import os

import pandas as pd
import pytest
import torch

from ganprint.artifacts import (
    artifact_paths,
    base_provenance,
    read_artifact,
    read_provenance,
    resolve_artifact_arg,
    write_artifact,
)
from ganprint.errors import ArtifactError


def _write(base, n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g)
    table = pd.DataFrame({"row": range(n), "image_id": [f"i{k}" for k in range(n)]})
    return write_artifact(base, {"embeddings": x}, table, base_provenance("embeddings", "test", rows=n)), x


def test_round_trip(tmp_path):
    base, x = _write(tmp_path / "a.safetensors")
    assert base == tmp_path / "a"
    art = read_artifact(tmp_path / "a.parquet", kind="embeddings")
    assert torch.equal(art.tensor("embeddings"), x)
    assert list(art.table.image_id) == ["i0", "i1", "i2"]
    assert art.provenance["stage"] == "test" and art.provenance["ganprint_version"]
    assert read_provenance(base)["pair_id"] == art.provenance["pair_id"]
    with pytest.raises(ArtifactError, match="expected 'similarity'"):
        read_artifact(base, kind="similarity")


def test_mismatched_pair_refused(tmp_path):
    _write(tmp_path / "a", seed=0)
    _write(tmp_path / "b", seed=1)
    os.replace(tmp_path / "b.parquet", tmp_path / "a.parquet")
    with pytest.raises(ArtifactError, match="belongs to a different run"):
        read_artifact(tmp_path / "a")


def test_missing_and_garbage(tmp_path):
    with pytest.raises(ArtifactError, match="artifact not found"):
        read_artifact(tmp_path / "nope")
    (tmp_path / "g.safetensors").write_bytes(b"garbage")
    with pytest.raises(ArtifactError, match="not a valid safetensors"):
        read_artifact(tmp_path / "g")


def test_unwritable_leaves_nothing(tmp_path):
    (tmp_path / "afile").write_text("x")
    with pytest.raises(ArtifactError, match="is a file, not a folder"):
        _write(tmp_path / "afile" / "emb")
    with pytest.raises(ArtifactError, match="does not exist"):
        _write(tmp_path / "nodir" / "emb")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]


def test_stdin_path(tmp_path):
    base, _ = _write(tmp_path / "a")
    assert resolve_artifact_arg("-", io.StringIO(f"{base}\n")) == base
    with pytest.raises(ArtifactError, match="stdin"):
        resolve_artifact_arg("-", io.StringIO(""))
    t, p = artifact_paths(base)
    assert t.exists() and p.exists()
