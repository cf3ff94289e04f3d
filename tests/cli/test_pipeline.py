"""The stages chained through pipes, and the CLI's error handling for simmatrix/predict/score."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys

import numpy as np
import torch
from typer.testing import CliRunner

from ganprint.artifacts import read_artifact
from ganprint.cli.main import app


def _env():
    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONPATH=os.getcwd())
    return env


def test_embed_simmatrix_predict_score_pipeline(imageclef_folder, tmp_path):
    gp = f"{shlex.quote(sys.executable)} -m ganprint"
    t = shlex.quote(str(tmp_path))
    cmd = (f"{gp} embed {shlex.quote(str(imageclef_folder))} -o {t}/emb --backbone test_resnet --image-size 32 --workers 0 -q"
           f" | {gp} simmatrix - -o {t}/sim -q"
           f" | {gp} predict - -o {t}/scores --attack gan_leaks_cal --balanced -q"
           f" | {gp} score - --bootstrap 50 --json")
    r = subprocess.run(["bash", "-o", "pipefail", "-c", cmd], capture_output=True, text=True, env=_env(), timeout=240)
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    assert (res["n"], res["n_pos"], res["n_neg"], res["n_pred_pos"]) == (6, 3, 3, 3)
    assert res["attack"] == "gan_leaks_cal" and res["auc"] is not None and res["kappa_ci"] is not None
    lines = (tmp_path / "scores.csv").read_text().splitlines()
    assert sorted(ln.split(",")[0] for ln in lines) == [f"real_not_used_{i:03d}" for i in range(3)] + \
        [f"real_used_{i:03d}" for i in range(3)]


def _make_emb(tmp_path, name, backbone, subsets):
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
    try:
        from test_similarity import make_emb
    finally:
        sys.path.pop(0)
    rng = np.random.default_rng(len(name))
    return make_emb(tmp_path / name, rng.normal(size=(len(subsets), 5)), subsets, backbone=backbone)


def test_mismatched_backbones_refused_by_the_cli(tmp_path):
    g = _make_emb(tmp_path, "gen", "test_resnet", ["generated"] * 6)
    r = _make_emb(tmp_path, "real", "test_vit", ["real_unknown"] * 3)
    res = CliRunner().invoke(app, ["simmatrix", "--generated", str(g), "--real", str(r), "-o", str(tmp_path / "s")])
    assert res.exit_code == 2
    err = res.stderr.strip()
    assert err.startswith("Error:") and "\n" not in err
    assert "gen.safetensors" in err and "real.safetensors" in err and "test_resnet vs test_vit" in err
    assert res.stdout == ""


def test_cli_predict_score_and_errors(tmp_path):
    ds = _make_emb(tmp_path, "dev", "test_resnet", ["generated"] * 10 + ["real_used"] * 3 + ["real_not_used"] * 3)
    runner = CliRunner()
    res = runner.invoke(app, ["simmatrix", str(ds), "-o", str(tmp_path / "sim"), "--metric", "l2", "--json"])
    assert res.exit_code == 0, res.stderr
    assert json.loads(res.stdout)["full"] is True
    sim = str(tmp_path / "sim")
    res = runner.invoke(app, ["predict", sim, "-o", str(tmp_path / "p")])
    assert res.exit_code == 2 and "choose a decision rule" in res.stderr
    res = runner.invoke(app, ["predict", sim, "-o", str(tmp_path / "p"), "--attack", "nope", "--balanced"])
    assert res.exit_code == 2 and "unknown attack" in res.stderr
    res = runner.invoke(app, ["predict", sim, "-o", str(tmp_path / "p"), "-a", "topk_mean", "-p", "k=2",
                              "--calibrate", sim])
    assert res.exit_code == 0, res.stderr
    assert res.stdout.strip() == str(tmp_path / "p")
    assert "dev kappa" in res.stderr and "optimistic" in res.stderr
    res = runner.invoke(app, ["score", str(tmp_path / "p"), "--bootstrap", "20", "--plot", str(tmp_path / "roc.png")])
    assert res.exit_code == 0, res.stderr
    assert "Cohen's kappa" in res.stdout and (tmp_path / "roc.png").exists()
    res = runner.invoke(app, ["score", str(tmp_path / "p.csv"), "--truth", str(ds), "--json", "--bootstrap", "0"])
    assert res.exit_code == 0, res.stderr
    assert json.loads(res.stdout)["n"] == 6
    res = runner.invoke(app, ["predict", "--list-attacks", "--json"])
    assert res.exit_code == 0 and "domias" in [a["name"] for a in json.loads(res.stdout)]


def test_faiss_engine_missing_is_a_clear_error(tmp_path, monkeypatch):
    ds = _make_emb(tmp_path, "dev", "test_resnet", ["generated"] * 4 + ["real_unknown"] * 2)
    monkeypatch.setitem(sys.modules, "faiss", None)
    res = CliRunner().invoke(app, ["simmatrix", str(ds), "-o", str(tmp_path / "s"), "--engine", "faiss"])
    assert res.exit_code == 2 and "pip install faiss-cpu" in res.stderr


def test_cli_simmatrix_precision(tmp_path):
    ds = _make_emb(tmp_path, "dev", "test_resnet", ["generated"] * 12 + ["real_used"] * 3 + ["real_not_used"] * 3)
    runner = CliRunner()
    out = {}
    for prec in ("bf16", "fp32"):
        res = runner.invoke(app, ["simmatrix", str(ds), "-o", str(tmp_path / prec), "--precision", prec, "--no-full",
                                  "-k", "4", "-q"])
        assert res.exit_code == 0, res.stderr
        out[prec] = read_artifact(tmp_path / prec, kind="similarity")
    assert out["bf16"].provenance["precision"] == "bf16" and out["fp32"].provenance["precision"] == "fp32"
    res = runner.invoke(app, ["simmatrix", str(ds), "-o", str(tmp_path / "j"), "--precision", "bf16", "--json"])
    assert res.exit_code == 0 and json.loads(res.stdout)["precision"] == "fp32"  # small: the full matrix, float32
    assert "bf16 tiles" not in res.stderr
    assert torch.equal(out["bf16"].tensors["real_topk_indices"], out["fp32"].tensors["real_topk_indices"])
    assert torch.equal(out["bf16"].tensors["gen_topk_indices"], out["fp32"].tensors["gen_topk_indices"])
    res = runner.invoke(app, ["simmatrix", str(ds), "-o", str(tmp_path / "l2"), "--metric", "l2", "--precision", "bf16"])
    err = res.stderr.strip()
    assert res.exit_code == 2 and err.startswith("Error:") and "\n" not in err and "--metric cosine only" in err
    assert not (tmp_path / "l2.safetensors").exists() and not (tmp_path / "l2.parquet").exists()
    res = runner.invoke(app, ["simmatrix", str(ds), "-o", str(tmp_path / "x"), "--precision", "fp16"])
    assert res.exit_code == 2 and "--precision fp16: unknown" in res.stderr
