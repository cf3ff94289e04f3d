"""`ganprint embed` / `info` through the CLI: output, exit codes, one-line errors, no leftovers."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from ganprint.cli.main import app

runner = CliRunner()
TINY = ["--backbone", "test_resnet", "--image-size", "32", "--workers", "0", "-q"]


def _no_artifacts(folder):
    left = [p.name for p in folder.iterdir() if p.suffix in (".safetensors", ".parquet", ".tmp") or ".tmp" in p.name]
    return left == []


def test_embed_and_info(png_folder, tmp_path):
    r = runner.invoke(app, ["embed", str(png_folder), "--out", str(tmp_path / "e"), *TINY])
    assert r.exit_code == 0, r.stderr
    assert r.stdout.strip() == str(tmp_path / "e")
    r = runner.invoke(app, ["info", str(tmp_path / "e"), "--json"])
    assert r.exit_code == 0
    info = json.loads(r.stdout)
    assert info["tensors"]["embeddings"]["shape"] == [6, 96]
    assert info["provenance"]["backbone"] == "test_resnet"
    r = runner.invoke(app, ["embed", str(png_folder), "--out", str(tmp_path / "e"), *TINY, "--json"])
    assert json.loads(r.stdout)["reused"] is True


def _err(r):
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.exit_code == 2, (r.exit_code, r.stdout, r.stderr)
    assert len(lines) == 1 and lines[0].startswith("Error: "), r.stderr
    return lines[0]


def test_bad_inputs_one_line_errors(png_folder, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    # corrupt / truncated image
    data = (png_folder / "img_00.png").read_bytes()
    (png_folder / "img_00.png").write_bytes(data[: len(data) // 2])
    msg = _err(runner.invoke(app, ["embed", str(png_folder), "--out", str(out / "e"), *TINY]))
    assert "img_00.png: corrupt or truncated image" in msg and "--skip-bad" in msg
    assert _no_artifacts(out)
    r = runner.invoke(app, ["embed", str(png_folder), "--out", str(out / "e"), *TINY, "--skip-bad"])
    assert r.exit_code == 0 and "skipped" in r.stderr and "img_00.png" in r.stderr
    # non-image file
    (png_folder / "notes.txt").write_text("x")
    msg = _err(runner.invoke(app, ["embed", str(png_folder), "--out", str(out / "f"), *TINY]))
    assert "notes.txt: not an image file" in msg
    # empty folder
    (tmp_path / "empty").mkdir()
    msg = _err(runner.invoke(app, ["embed", str(tmp_path / "empty"), "--out", str(out / "g"), *TINY]))
    assert "empty: folder holds no images" in msg
    # unknown backbone
    msg = _err(runner.invoke(app, ["embed", str(tmp_path / "empty"), "--out", str(out / "g"), "-b", "resnet5O"]))
    assert "unknown backbone 'resnet5O'; choose one of" in msg and "efficientnet_lite0" in msg
    # unwritable output
    (tmp_path / "afile").write_text("x")
    msg = _err(runner.invoke(app, ["embed", str(png_folder / "img_01.png"), "--out", str(tmp_path / "afile" / "e"), *TINY]))
    assert "afile: is a file, not a folder; choose another --out" in msg
    msg = _err(runner.invoke(app, ["embed", str(png_folder / "img_01.png"), "--out", "/proc/ganprint-test", *TINY]))
    assert "/proc: output folder is not writable" in msg
    assert not [p for p in out.iterdir() if ".tmp" in p.name]


def test_missing_weights_offline(png_folder, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    msg = _err(runner.invoke(app, ["embed", str(png_folder), "--out", str(tmp_path / "e"), "-b", "resnet50", "-q"]))
    assert "resnet50" in msg and "--weights PATH" in msg
    msg = _err(runner.invoke(app, ["embed", str(png_folder), "--out", str(tmp_path / "e"), *TINY,
                                   "--weights", str(tmp_path / "w.safetensors")]))
    assert "w.safetensors: weights file not found" in msg
    assert not list(tmp_path.glob("e.*"))


def test_help_does_not_import_torch():
    code = "import sys, ganprint.cli.main; print(sorted(m for m in ('torch', 'timm', 'numpy', 'pandas') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_python_dash_m_and_completion():
    env = {**os.environ, "_GANPRINT_COMPLETE": "complete_bash", "COMP_WORDS": "ganprint embed x --backbone efficientnet_", "COMP_CWORD": "4"}
    r = subprocess.run([sys.executable, "-m", "ganprint"], env=env, capture_output=True, text=True)
    assert set(r.stdout.split()) >= {"efficientnet_lite0", "efficientnet_b0"}
    r = subprocess.run([sys.executable, "-m", "ganprint", "--version"], capture_output=True, text=True)
    assert r.stdout.startswith("ganprint ")
