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


def _disk_full(*args, **kwargs):
    from safetensors import SafetensorError

    # the text safetensors gives on a full disk (measured on a full tmpfs)
    raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")


def _disk_full_oserror(*args, **kwargs):
    import errno

    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@pytest.mark.parametrize("writer", [_disk_full, _disk_full_oserror])
def test_full_disk_on_safetensors_write_is_one_clean_error(tmp_path, monkeypatch, writer):
    import safetensors.torch

    from ganprint.checkpoint import save_checkpoint

    monkeypatch.setattr(safetensors.torch, "save_file", writer)
    with pytest.raises(ArtifactError) as ei:
        write_artifact(tmp_path / "a", {"x": torch.zeros(3)}, pd.DataFrame({"i": [1, 2, 3]}), {"kind": "t"})
    assert "No space left on device" in str(ei.value) and str(tmp_path / "a") in str(ei.value)
    with pytest.raises(ArtifactError) as ei:
        save_checkpoint(tmp_path / "c.safetensors", {"x": torch.zeros(3)}, {"kind": "checkpoint"})
    assert "c.safetensors: cannot write checkpoint (No space left on device)" in str(ei.value)
    assert list(tmp_path.iterdir()) == []  # no output, no temp file


def test_full_disk_from_the_cli(png_folder, tmp_path, monkeypatch):
    import safetensors.torch
    from typer.testing import CliRunner

    from ganprint.cli.main import app

    monkeypatch.setattr(safetensors.torch, "save_file", _disk_full)
    out = tmp_path / "out"
    out.mkdir()
    r = CliRunner().invoke(app, ["embed", str(png_folder), "--out", str(out / "e"), "--backbone", "test_resnet",
                                 "--image-size", "32", "--workers", "0", "-q"])
    assert r.exit_code == 2, r.exception
    assert r.stderr == f"Error: {out / 'e'}: cannot write artifact (No space left on device); choose another --out\n"
    assert list(out.iterdir()) == []


def test_outputs_follow_the_umask(tmp_path):
    from ganprint.artifacts import atomic_path

    old = os.umask(0o027)
    try:
        base = write_artifact(tmp_path / "a", {"x": torch.zeros(3)}, pd.DataFrame({"i": [1, 2, 3]}), {"kind": "t"})
        with atomic_path(tmp_path / "f.txt") as tmp:
            open(tmp, "w").write("x")
    finally:
        os.umask(old)
    for p in (tmp_path / "a.safetensors", tmp_path / "a.parquet", tmp_path / "f.txt"):
        assert (p.stat().st_mode & 0o777) == 0o640, p
    assert base == tmp_path / "a"


class LockHolder:
    """Holds the output lock of ``base`` from another thread (as another run would) until closed."""

    def __init__(self, base):
        import threading

        from ganprint.artifacts import output_lock

        self.taken, self.done = threading.Event(), threading.Event()

        def hold():
            with output_lock(base):
                self.taken.set()
                self.done.wait(60)

        self.thread = threading.Thread(target=hold, daemon=True)
        self.thread.start()
        assert self.taken.wait(10)

    def close(self):
        self.done.set()
        self.thread.join(10)


def test_second_writer_gets_a_clear_error_and_nothing_is_mixed(tmp_path):
    from ganprint.artifacts import ensure_writable, lock_path, release_output_lock

    base = tmp_path / "a"
    holder = LockHolder(base)
    try:
        with pytest.raises(ArtifactError) as ei:
            _write(base)
        assert f"another ganprint process (pid {os.getpid()}) is writing this output" in str(ei.value)
        with pytest.raises(ArtifactError, match="another ganprint process"):  # refused before any work, too
            ensure_writable(base)
        assert sorted(p.name for p in tmp_path.iterdir()) == [".a.lock"]
    finally:
        holder.close()
    assert not lock_path(base).exists()
    # a stage claims its output at the start and keeps it while it computes
    ensure_writable(base)
    other = []
    import threading

    t = threading.Thread(target=lambda: other.append(pytest.raises(ArtifactError, _write, base)))
    t.start()
    t.join()
    assert other and lock_path(base).exists()
    _write(base)  # this thread's write ends its claim
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.parquet", "a.safetensors"]
    release_output_lock(base)  # no-op: nothing held


def _hammer(args):
    base, seed, n = args
    outcomes = []
    for k in range(n):
        try:
            _write(base, n=64, seed=seed * 1000 + k)
            outcomes.append("ok")
        except ArtifactError as exc:
            assert "another ganprint process" in str(exc), str(exc)
            outcomes.append("busy")
    return outcomes


def test_concurrent_writers_never_leave_a_mismatched_pair(tmp_path):
    import multiprocessing as mp

    base = tmp_path / "a"
    ctx = mp.get_context("fork")
    with ctx.Pool(4) as pool:
        outcomes = sum(pool.map(_hammer, [(base, s, 25) for s in range(4)]), [])
    assert "ok" in outcomes
    art = read_artifact(base)  # tensors and table of the same write
    assert art.table["image_id"].tolist() == [f"i{k}" for k in range(64)]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.parquet", "a.safetensors"]
