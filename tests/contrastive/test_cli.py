"""`ganprint train` and `ganprint embed --checkpoint` through the CLI; torchrun with 2 ranks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from ganprint.artifacts import read_artifact
from ganprint.checkpoint import read_checkpoint_meta
from ganprint.cli.main import app

TINY = ["--backbone", "test_resnet", "--weights", "none", "--image-size", "32", "--proj-hidden", "32",
        "--batch-size", "4", "--max-steps", "2", "--num-neg-samples", "2", "--threads", "2"]


def run(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A dev folder and a checkpoint trained on it through the CLI."""
    from conftest import make_imageclef

    root = make_imageclef(tmp_path_factory.mktemp("cli") / "dev",
                          (("generated", 4), ("real_used", 3), ("real_not_used", 2)), size=40, seed=300)
    out = root.parent / "run"
    res = run("train", root, "--out", out, *TINY, "-q")
    assert res.exit_code == 0, res.stderr
    return root, Path(res.stdout.strip())


def test_train_cli_writes_checkpoint_and_resolved_config(trained):
    root, ckpt = trained
    assert ckpt.name == "checkpoint.safetensors" and ckpt.is_file()
    meta = read_checkpoint_meta(ckpt)
    assert meta["backbone"] == "test_resnet" and meta["dim"] == 256 and meta["step"] == 2
    assert meta["config"]["batch_size"] == 4 and meta["config"]["loss_alpha"] == 0.7  # preset value kept
    saved = (ckpt.parent / "config.toml").read_text()
    assert "batch_size = 4" in saved and f'data = "{root.resolve()}"' in saved
    lines = (ckpt.parent / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(ln)["step"] for ln in lines] == [1, 2]


def test_print_config_and_bad_option(tmp_path):
    res = run("train", "--print-config", "--sim-threshold", "0.42", "--no-aug-flip")
    assert res.exit_code == 0
    assert "sim_threshold = 0.42" in res.stdout and "aug_flip = false" in res.stdout
    assert 'backbone = "efficientnet_lite0"' in res.stdout  # the cpu-small preset is the default
    res = run("train", "--print-config", "--bn-mode", "sync")
    assert res.exit_code == 2 and "bn_mode" in res.stderr and "Traceback" not in res.stderr
    res = run("train", "--print-config", "--config", tmp_path / "nope.toml")
    assert res.exit_code == 2 and "no such config file" in res.stderr


def test_embed_with_checkpoint(trained, tmp_path):
    root, ckpt = trained
    meta = read_checkpoint_meta(ckpt)
    # no --image-size / --weights: taken from the checkpoint
    res = run("embed", root / "generated", "--out", tmp_path / "ft", "--backbone", "test_resnet",
              "--checkpoint", ckpt, "-q", "--workers", "0")
    assert res.exit_code == 0, res.stderr
    art = read_artifact(tmp_path / "ft", kind="embeddings")
    emb = art.tensor("embeddings")
    assert emb.shape == (4, 256)
    torch.testing.assert_close(emb.norm(dim=1), torch.ones(4))
    prov = art.provenance
    assert prov["checkpoint"]["digest"] == meta["digest"] and prov["dim"] == 256
    assert prov["checkpoint"]["backbone"] == "test_resnet" and prov["preprocess"]["size"] == 32

    base = run("embed", root / "generated", "--out", tmp_path / "raw", "--backbone", "test_resnet",
               "--weights", "none", "--image-size", "32", "-q", "--workers", "0")
    assert base.exit_code == 0, base.stderr
    raw = read_artifact(tmp_path / "raw", kind="embeddings").provenance
    assert raw["checkpoint"] is None and raw["weights_digest"] != prov["weights_digest"]


def test_embed_refuses_checkpoint_of_another_backbone(trained, tmp_path):
    root, ckpt = trained
    res = run("embed", root / "generated", "--out", tmp_path / "x", "--backbone", "test_efficientnet",
              "--checkpoint", ckpt, "-q")
    assert res.exit_code == 2
    assert "trained from backbone 'test_resnet'" in res.stderr and "--backbone test_resnet" in res.stderr
    res = run("embed", root / "generated", "--out", tmp_path / "x", "--backbone", "test_resnet",
              "--image-size", "48", "--checkpoint", ckpt, "-q")
    assert res.exit_code == 2 and "--image-size 32" in res.stderr


def test_apply_checkpoint_library(trained):
    from ganprint.backbones import load_backbone
    from ganprint.contrastive.restore import apply_checkpoint

    _, ckpt = trained
    loaded = load_backbone("test_resnet", "none", 32)
    model, prov = apply_checkpoint(loaded, ckpt)
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    x = torch.randn(3, 3, 32, 32)
    z = model(x)
    assert z.shape == (3, prov["dim"]) == (3, 256) and set(prov) >= {"digest", "dim", "path", "backbone"}
    assert (z < 0).any()  # projection output, not a ReLU'd feature


def test_torchrun_two_ranks_hold_identical_weights(trained, tmp_path):
    """2 processes, gloo on CPU: DDP gradients, all-gathered queue, EMA -> the same state."""
    root, _ = trained
    torchrun = Path(sys.executable).parent / "torchrun"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    env.pop("WORLD_SIZE", None)
    proc = subprocess.run(
        [str(torchrun), "--standalone", "--nproc-per-node", "2", "-m", "ganprint", "train", str(root),
         "--out", str(tmp_path / "ddp"), *TINY[:-2], "--threads", "1", "--max-steps", "3", "--json", "-q"],
        capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout)
    assert summary["world_size"] == 2 and summary["step"] == 3
    meta = read_checkpoint_meta(tmp_path / "ddp" / "checkpoint.safetensors")
    assert meta["world_size"] == 2 and len(meta["rank_digests"]) == 2
    assert meta["rank_digests"][0] == meta["rank_digests"][1] and meta["ranks_consistent"]
    assert meta["plan"]["batch"] == 4  # 2 anchors per rank


def test_train_without_data_fails_fast(tmp_path):
    res = run("train", "--out", tmp_path / "o", "-q")
    assert res.exit_code == 2 and "no training data" in res.stderr
    res = run("train", tmp_path / "missing", "--out", tmp_path / "o", "-q")
    assert res.exit_code == 2 and "no such folder" in res.stderr
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("text,needle", [
    ("lr = nan\n", "lr = nan must be a finite number"),
    ("lr = inf\n", "lr = inf must be a finite number"),
    ("epochs = inf\n", "epochs = inf must be a finite number"),
    ("epochs = nan\n", "epochs = nan must be a finite number"),
    ("grad_clip = nan\n", "grad_clip = nan must be a finite number"),
    ("weight_decay = nan\n", "weight_decay = nan must be a finite number"),
    ("momentum = -inf\n", "momentum = -inf must be a finite number"),
    ("backbone = \"resnet5O\"\n", "backbone = 'resnet5O' is not a known backbone"),
    (b"# caf\xe9\nlr = 0.1\n", "is not UTF-8 text"),
])
def test_bad_config_values_are_one_line_errors_naming_the_file(tmp_path, text, needle):
    from conftest import make_imageclef

    data = make_imageclef(tmp_path / "dev", (("generated", 2), ("real_used", 2)), size=16)
    cfg = tmp_path / "bad.toml"
    cfg.write_bytes(text if isinstance(text, bytes) else text.encode())
    res = run("train", data, "--config", cfg, "--out", tmp_path / "o", "-q")
    assert res.exit_code == 2, (res.exit_code, res.stderr, res.exception)
    assert res.stderr.startswith(f"Error: {cfg}: ") and needle in res.stderr and res.stderr.count("\n") == 1
    assert not (tmp_path / "o").exists()


def test_failed_setup_leaves_no_output_folder(tmp_path):
    from conftest import make_imageclef

    data = make_imageclef(tmp_path / "dev", (("real_used", 2),), size=16)  # no generated images
    res = run("train", data, "--out", tmp_path / "o", *TINY, "-q")
    assert res.exit_code == 2 and res.stderr.startswith("Error: ") and res.stderr.count("\n") == 1, res.stderr
    assert not (tmp_path / "o").exists()


def test_info_reads_a_valid_checkpoint_and_refuses_a_damaged_one(trained, tmp_path):
    _, ckpt = trained
    res = run("info", ckpt, "--json")
    assert res.exit_code == 0, res.stderr
    info = json.loads(res.stdout)
    assert info["provenance"]["kind"] == "checkpoint" and info["tensors"]["state.step"]["shape"] == []
    # damage one weight (same size, valid safetensors): the recorded digest catches it
    from safetensors.torch import load_file, save_file
    from safetensors import safe_open

    with safe_open(str(ckpt), framework="pt") as fh:
        meta = fh.metadata()
    tensors = load_file(str(ckpt))
    name = next(k for k in sorted(tensors) if k.startswith("online.") and tensors[k].is_floating_point())
    tensors[name] = tensors[name] + 1
    bad = tmp_path / "bad.safetensors"
    save_file(tensors, str(bad), metadata=meta)
    res = run("info", bad)
    assert res.exit_code == 2 and "do not match the digest" in res.stderr and res.stderr.count("\n") == 1
