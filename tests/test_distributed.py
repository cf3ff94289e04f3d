"""Data-parallel embed and simmatrix under torchrun (CPU, gloo, 2 processes) equal one process;
a rank that fails makes the whole run fail cleanly."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from ganprint.artifacts import artifact_paths, base_provenance, read_artifact, write_artifact
from ganprint.cli.main import app
from ganprint.distributed import batch_shard_bounds, merge_topk, shard_bounds
from conftest import make_imageclef

TORCHRUN = Path(sys.executable).parent / "torchrun"
TINY = ["-b", "test_resnet", "--weights", "none", "--image-size", "32", "--batch-size", "4", "--workers", "0"]


def torchrun(*args, timeout=180):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "GANPRINT_DIST_TIMEOUT": "60"}
    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "TORCHELASTIC_RUN_ID"):
        env.pop(var, None)
    return subprocess.run([str(TORCHRUN), "--standalone", "--nproc-per-node", "2", "-m", "ganprint", *map(str, args)],
                          capture_output=True, text=True, env=env, timeout=timeout)


def assert_same_artifact(a, b):
    a, b = read_artifact(a), read_artifact(b)
    assert sorted(a.tensors) == sorted(b.tensors)
    for name in a.tensors:
        assert torch.equal(a.tensors[name], b.tensors[name]), name
    assert a.provenance == b.provenance
    assert a.table.equals(b.table)


def test_shards_are_disjoint_cover_and_batch_aligned():
    for n, world, batch in [(17, 2, 4), (5, 3, 2), (0, 2, 4), (100, 7, 8)]:
        plain = [shard_bounds(n, r, world) for r in range(world)]
        batched = [batch_shard_bounds(n, batch, r, world) for r in range(world)]
        for bounds in (plain, batched):
            assert bounds[0][0] == 0 and bounds[-1][1] == n
            assert all(bounds[r][1] == bounds[r + 1][0] for r in range(world - 1))
        assert all(lo % batch == 0 for lo, _ in batched)


def test_merge_topk_equals_topk_of_the_union():
    g = torch.Generator().manual_seed(0)
    vals = torch.randn(20, 50, generator=g)
    parts_v, parts_i = [], []
    for lo, hi in [(0, 17), (17, 33), (33, 50)]:  # three ranks' shards of the 50 keys
        v, i = vals[:, lo:hi].topk(5, dim=1)
        parts_v.append(v)
        parts_i.append(i + lo)
    parts_v.append(torch.full((20, 5), -float("inf")))  # a padded rank (fewer keys than k)
    parts_i.append(torch.full((20, 5), -1, dtype=torch.long))
    mv, mi = merge_topk(parts_v, parts_i, 5)
    ev, ei = vals.topk(5, dim=1)
    assert torch.equal(mi, ei) and torch.equal(mv, ev)
    # equal values: the lower index first, wherever the ranks put them
    tv, ti = merge_topk([torch.tensor([[1.0, 0.5]]), torch.tensor([[1.0, 0.2]])],
                        [torch.tensor([[7, 8]]), torch.tensor([[3, 4]])], 3)
    assert ti.tolist() == [[3, 7, 8]] and tv.tolist() == [[1.0, 1.0, 0.5]]


@pytest.fixture(scope="module")
def dev_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist") / "dev"
    # 17 images, batches of 4: rank 0 embeds batches 0-1, rank 1 batches 2-4 (the last one short)
    return make_imageclef(root, counts=(("generated", 9), ("real_used", 4), ("real_not_used", 4)), size=40)


@pytest.fixture
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_torchrun_embed_equals_one_process_bit_for_bit(dev_root, tmp_path, one_thread):
    # bit for bit against one process with the ranks' thread count (torchrun: 1 each): oneDNN's
    # convolutions round differently with another count (~3e-7 here), sharded or not
    single = CliRunner().invoke(app, ["embed", str(dev_root), "-o", str(tmp_path / "one"), *TINY, "-q"])
    assert single.exit_code == 0, single.stderr
    proc = torchrun("embed", dev_root, "-o", tmp_path / "two", *TINY, "--json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count('"artifact"') == 1  # rank 0 alone reports
    assert "rank 0 of 2" in proc.stderr  # and shows the progress
    assert_same_artifact(tmp_path / "one", tmp_path / "two")


def test_torchrun_embed_rank_with_corrupt_image_fails_the_run(dev_root, tmp_path):
    bad_root = tmp_path / "bad"
    import shutil

    shutil.copytree(dev_root, bad_root)
    broken = bad_root / "real_used" / "real_used_002.png"  # row 15 of 17: rank 1's shard
    broken.write_bytes(b"not a png")
    proc = torchrun("embed", bad_root, "-o", tmp_path / "out", *TINY, "-q", timeout=120)
    assert proc.returncode != 0
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("Error:")]
    assert len(errors) == 1 and str(broken) in errors[0] and "--skip-bad" in errors[0], proc.stderr[-3000:]
    # no traceback from ganprint's ranks (torchrun's agent prints its own failure summary)
    assert not [ln for ln in proc.stderr.splitlines() if ln.strip().startswith("File ") and "/ganprint/" in ln]
    assert not any(p.exists() for p in artifact_paths(tmp_path / "out"))
    assert not list(tmp_path.glob("out*")) and not list(tmp_path.glob(".*tmp*"))


def _random_embeddings(path, n_gen, n_real, dim=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    emb = torch.randn(n_gen + n_real, dim, generator=g)
    half = n_real // 2
    subset = ["generated"] * n_gen + ["real_used"] * half + ["real_not_used"] * (n_real - half)
    table = pd.DataFrame({
        "row": range(len(subset)), "image_id": [f"i{i:05d}" for i in range(len(subset))], "subset": subset,
        "label": pd.array([None] * n_gen + [1] * half + [0] * (n_real - half), dtype="Int8"),
        "sha256": [f"{i:064x}" for i in range(len(subset))]})
    prov = base_provenance("embeddings", "embed", backbone="test", weights_digest="w", preprocess={},
                           checkpoint=None, rows=len(subset), dim=dim, inputs_hash="h")
    write_artifact(path, {"embeddings": emb}, table, prov)
    return path


@pytest.mark.parametrize("extra", [["--full"], ["--no-full", "--precision", "bf16"]])
def test_torchrun_simmatrix_equals_one_process(tmp_path, extra):
    emb = _random_embeddings(tmp_path / "emb", 1501, 61)
    opts = ["--device", "cpu", "--block", "32", "-q", *extra]  # several tiles per rank
    single = CliRunner().invoke(app, ["simmatrix", str(emb), "-o", str(tmp_path / "one"), *opts])
    assert single.exit_code == 0, single.stderr
    proc = torchrun("simmatrix", emb, "-o", tmp_path / "two", *opts)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_same_artifact(tmp_path / "one", tmp_path / "two")  # top-k merged exactly: same indices, same values


def _rank_fails(rank, world, init, out):
    import torch.distributed as dist

    from ganprint.distributed import Group, RankFailed

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    group = Group(rank, world, rank, torch.device("cpu"), True, True, "gloo")
    parts = group.gather_rows(torch.arange(rank + 2), dst=None)  # uneven sizes
    assert [p.tolist() for p in parts] == [[0, 1], [0, 1, 2]]

    def stage():
        if rank == 1:  # outside any check: its error must still reach the others' next check
            raise ValueError("boom on rank 1")
        return group.run(lambda: "shard done")

    try:
        group.run(stage)
        result = "no error"
    except RankFailed as exc:
        result = f"RankFailed {exc.rank}: {exc}"
    except ValueError as exc:
        result = f"own {exc}"
    Path(out, f"rank{rank}").write_text(result)
    dist.destroy_process_group()


def test_a_failing_rank_fails_every_rank_without_a_hang(tmp_path):
    import torch.multiprocessing as mp

    init = f"file://{tmp_path / 'rendezvous'}"
    mp.spawn(_rank_fails, args=(2, init, str(tmp_path)), nprocs=2, join=True)
    assert (tmp_path / "rank1").read_text() == "own boom on rank 1"
    assert (tmp_path / "rank0").read_text() == "RankFailed 1: rank 1: ValueError: boom on rank 1"
