"""`ganprint fuse moe` / `ganprint fuse stack` through the CLI: moe train / apply, stack, one-line errors."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from typer.testing import CliRunner

from ganprint.artifacts import read_artifact
from ganprint.cli.main import app

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from test_fusion import make_expert, write_scores  # noqa: E402  (fixtures builders of the library tests)

runner = CliRunner()
SMALL = ["--dim", "32", "--batch-size", "16", "--threads", "1", "-q"]


def _err(r) -> str:
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.exit_code == 2, (r.exit_code, r.stdout, r.stderr)
    assert len(lines) == 1 and lines[0].startswith("Error: "), r.stderr
    return lines[0]


def test_fuse_moe_train_apply_json(tmp_path):
    a = make_expert(tmp_path / "a", "alpha", 24, 0, 0.5)
    b = make_expert(tmp_path / "b", "beta", 40, 1, 2.0)
    r = runner.invoke(app, ["fuse", "moe", str(a), str(b), "--out", str(tmp_path / "f"),
                            "--steps", "5", "--json", *SMALL])
    assert r.exit_code == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["experts"] == ["alpha", "beta"]
    assert set(info["mean_gate_by_expert"]) == {"alpha", "beta"}
    assert abs(sum(info["mean_gate"]) - 1) < 1e-4
    assert info["weights"] == str(tmp_path / "f.moe.safetensors")
    assert read_artifact(tmp_path / "f", kind="embeddings").provenance["backbone"] == "moe(alpha+beta)"

    r = runner.invoke(app, ["fuse", "moe", "--apply", info["weights"], str(a), str(b), "--out", str(tmp_path / "g"), "-q"])
    assert r.exit_code == 0, r.stderr
    assert r.stdout.strip() == str(tmp_path / "g")
    assert read_artifact(tmp_path / "g", kind="embeddings").tensor("embeddings").shape == (48, 32)
    r = runner.invoke(app, ["fuse", "moe", "--apply", info["weights"], str(a), str(b), "--out", str(tmp_path / "g2"), "--json"])
    assert r.exit_code == 0, r.stderr
    assert json.loads(r.stdout)["mean_gate_by_expert"] == info["mean_gate_by_expert"]

    assert "expert 1 has backbone beta" in _err(
        runner.invoke(app, ["fuse", "moe", "--apply", info["weights"], str(b), str(a), "--out", str(tmp_path / "h")]))
    assert "training options" in _err(
        runner.invoke(app, ["fuse", "moe", "--apply", info["weights"], str(a), str(b), "--steps", "3", "--out", str(tmp_path / "h")]))


def test_fuse_moe_mismatched_manifests_one_line(tmp_path):
    a = make_expert(tmp_path / "a", "alpha", 24, 0, 0.5)
    b = make_expert(tmp_path / "b", "beta", 40, 1, 2.0, order=list(range(47, -1, -1)))
    line = _err(runner.invoke(app, ["fuse", "moe", str(a), str(b), "--out", str(tmp_path / "f"), *SMALL]))
    assert str(a) in line and str(b) in line and "manifests differ" in line
    assert not (tmp_path / "f.safetensors").exists()


def test_fuse_stack_json(tmp_path):
    ids = [f"r{i}" for i in range(20)]
    y = [0, 1] * 10
    dev = [write_scores(tmp_path / f"d{j}", ids, [(i % 7) + 3 * (j + 1) * y[i] for i in range(20)], y, f"att{j}", "alpha")
           for j in range(2)]
    test = [write_scores(tmp_path / f"t{j}", ids[:7], list(range(7)), None, f"att{j}", "alpha") for j in range(2)]
    r = runner.invoke(app, ["fuse", "stack", "--dev", str(dev[0]), "--dev", str(dev[1]),
                            "--test", str(test[0]), "--test", str(test[1]), "--out", str(tmp_path / "s"), "--json", "-q"])
    assert r.exit_code == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["features"] == ["att0@alpha", "att1@alpha"] and len(info["coef"]) == 2
    art = read_artifact(tmp_path / "s", kind="scores")
    assert art.table.columns.tolist() == ["image_id", "score", "label_pred"]

    r = runner.invoke(app, ["fuse", "stack", str(dev[0]), "--out", str(tmp_path / "x")])
    assert r.exit_code == 2 and "unexpected extra argument" in r.stderr.lower()  # moe's inputs are not stack's
    r = runner.invoke(app, ["fuse", "stack", "--dim", "8", "--out", str(tmp_path / "x")])
    assert r.exit_code == 2 and "no such option" in r.stderr.lower()
    assert "one test artifact per dev artifact" in _err(runner.invoke(
        app, ["fuse", "stack", "--dev", str(dev[0]), "--dev", str(dev[1]), "--test", str(test[0]),
              "--out", str(tmp_path / "x")]))


def test_fuse_subcommands_each_have_their_own_help():
    r = runner.invoke(app, ["fuse", "--help"])
    assert r.exit_code == 0 and "moe" in r.stdout and "stack" in r.stdout
    moe = runner.invoke(app, ["fuse", "moe", "--help"]).stdout
    stack = runner.invoke(app, ["fuse", "stack", "--help"]).stdout
    assert "--apply" in moe and "--steps" in moe and "--dev" not in moe and "--rule" not in moe
    assert "--dev" in stack and "--rule" in stack and "--apply" not in stack and "--steps" not in stack
    assert "moe:" not in moe and "stack:" not in stack  # no "this option is for the other method" notes


def test_info_reads_fusion_weights(tmp_path):
    a = make_expert(tmp_path / "a", "alpha", 24, 0, 0.5)
    b = make_expert(tmp_path / "b", "beta", 40, 1, 2.0)
    r = runner.invoke(app, ["fuse", "moe", str(a), str(b), "--out", str(tmp_path / "f"), "--steps", "2", "--json", *SMALL])
    assert r.exit_code == 0, r.stderr
    w = json.loads(r.stdout)["weights"]
    r = runner.invoke(app, ["info", w, "--json"])
    assert r.exit_code == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["provenance"]["kind"] == "moe_weights" and info["tensors"] and info["table"]["rows"] == 0
