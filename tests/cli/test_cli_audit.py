"""`ganprint audit` / `ganprint report` through the CLI: outputs, verdicts, bad inputs."""

from __future__ import annotations

import json

import pandas as pd
import pytest
from typer.testing import CliRunner

from audit_data import audit_args, make_audit_folders
from conftest import make_imageclef
from ganprint.cli.main import app
from ganprint.submission import read_submission

runner = CliRunner()


def test_audit_json_outputs_and_report_rerender(tmp_path):
    f = make_audit_folders(tmp_path / "d")
    run = tmp_path / "run"
    res = runner.invoke(app, audit_args(f, run, "--json"))
    assert res.exit_code == 0, res.stderr
    s = json.loads(res.stdout)
    assert s["verdict"].startswith("data copying:") and s["copying"]  # every member is copied once
    assert "; membership signal: AUC" in s["verdict"]
    assert s["datacopy"]["copy_test"]["k"] == 12 and s["datacopy"]["memorisation"]["copies"] >= 12
    assert s["nested"]["auc"] > 0.8
    rep = json.loads((run / "report.json").read_text())
    assert any(c["name"].startswith("sift/") for c in rep["selection"]["candidates"])  # verification ran
    # the chosen score, or the best of the window's scores, is a pixel one
    proc = rep["selection"]["procedure"]
    assert (proc.get("inputs") or [s["chosen"]])[0].startswith("pixels/"), rep["selection"]["reason"]
    for name in ("submission.csv", "scores.parquet", "report.json", "report.html", "figures/roc.png",
                 "figures/scores.png", "figures/pvalues.png"):
        assert (run / name).is_file(), name
    ids, labels = read_submission(run / "submission.csv")[:2]
    assert sorted(ids) == sorted(p.stem for p in f["unknown"].iterdir())
    df = pd.read_parquet(run / "scores.parquet")
    assert len(df) == 12 + 12 + 6 and df["p_value"].between(0, 1).all()
    assert df.loc[df.role == "unknown", "q_value"].notna().all()
    html = (run / "report.html").read_text()
    assert s["verdict"].split(";")[0] in html and "http://" not in html and "https://" not in html
    # re-render from the run's artifacts
    (run / "report.html").unlink()
    res = runner.invoke(app, ["report", str(run)])
    assert res.exit_code == 0, res.stderr
    assert res.stdout.strip() == str(run / "report.html") and (run / "report.html").exists()


def test_null_generator_says_no_significant_signal(tmp_path):
    f = make_audit_folders(tmp_path / "d", copying=False, n_known=30, n_unknown=10, n_generated=40)
    res = runner.invoke(app, audit_args(f, tmp_path / "run", "--json", "--no-verify"))
    assert res.exit_code == 0, res.stderr
    s = json.loads(res.stdout)
    assert s["verdict"].startswith("no significant membership signal"), s["verdict"]
    assert s["flags"]["n_flagged"] == 0
    rep = json.loads((tmp_path / "run" / "report.json").read_text())
    assert not any(c["name"].startswith("sift/") for c in rep["selection"]["candidates"])
    assert all(m["inliers"] is None for c in rep["gallery"] for m in c["matches"])


def test_imageclef_root(tmp_path):
    root = tmp_path / "clef"
    make_imageclef(root / "dev", counts=(("generated", 8), ("real_used", 6), ("real_not_used", 6)), size=16)
    make_imageclef(root / "test", counts=(("generated", 8), ("real_unknown", 5)), size=16, seed=300)
    res = runner.invoke(app, ["audit", str(root), "--out", str(tmp_path / "run"), "-b", "pixels", "--bootstrap", "20",
                              "--repeats", "1", "--folds", "3", "-q", "--json"])
    assert res.exit_code == 0, res.stderr
    s = json.loads(res.stdout)
    assert s["counts"] == {"generated": 8, "members": 6, "non_members": 6, "unknown": 5, "test_generated": 8}
    ids, _ = read_submission(tmp_path / "run" / "submission.csv")[:2]
    assert sorted(ids) == [f"real_unknown_{i:03d}" for i in range(5)]


def _bad(tmp_path, args, match):
    res = runner.invoke(app, args)
    assert res.exit_code != 0
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: "), res.stderr
    assert match in lines[0], lines[0]
    assert "Traceback" not in res.stderr
    assert not (tmp_path / "run").exists()
    return lines[0]


def test_bad_inputs_give_one_line_errors_and_no_run(tmp_path):
    f = make_audit_folders(tmp_path / "d", n_known=3, n_unknown=2, n_generated=4, size=16)
    run = tmp_path / "run"
    # missing folder
    args = audit_args(f, run)
    args[args.index("--members") + 1] = str(tmp_path / "nope")
    _bad(tmp_path, args, "no such folder")
    # empty folder
    (tmp_path / "empty").mkdir()
    args = audit_args(f, run)
    args[args.index("--non-members") + 1] = str(tmp_path / "empty")
    _bad(tmp_path, args, "holds no images")
    # an ImageCLEF root with neither labels nor a reference
    clef = make_imageclef(tmp_path / "clef", counts=(("generated", 3), ("real_unknown", 3)), size=16)
    _bad(tmp_path, ["audit", str(clef), "--out", str(run), "-b", "pixels"], "no labels and no reference")
    # not an ImageCLEF layout at all
    _bad(tmp_path, ["audit", str(f["members"]), "--out", str(run), "-b", "pixels"], "not an ImageCLEF layout")
    # images of the wrong kind: a text file, a corrupt PNG
    (f["generated"] / "notes.txt").write_text("hello")
    _bad(tmp_path, audit_args(f, run), "not an image file")
    (f["generated"] / "notes.txt").unlink()
    (f["members"] / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    _bad(tmp_path, audit_args(f, run), "broken.png")
    (f["members"] / "broken.png").unlink()
    # bad option
    _bad(tmp_path, audit_args(f, run, "--fdr", "1.5"), "--fdr")
    # --out that is some other folder
    other = tmp_path / "other"
    other.mkdir()
    (other / "x.txt").write_text("x")
    res = runner.invoke(app, audit_args(f, other))
    assert res.exit_code != 0 and "is not an audit run" in res.stderr and not (other / "report.html").exists()


def test_report_on_a_non_run(tmp_path):
    res = runner.invoke(app, ["report", str(tmp_path)])
    assert res.exit_code == 2 and res.stderr.startswith("Error: ") and "not an audit run" in res.stderr
