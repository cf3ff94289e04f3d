"""The demo pipeline end to end on a tiny synthetic benchmark (tiny backbones)."""

from __future__ import annotations

import json

from ganprint.attacks import attack_names
from ganprint.demo import full_demo


def test_full_demo_tiny(tmp_path):
    res = full_demo(tmp_path / "demo", backbones=("pixels", "test_resnet"),
                    synth=dict(size=32, gan_res=32, steps=30, dev_generated=24, test_generated=24, dev_real=8, test_real=8),
                    bootstrap=20, progress=False, moe_steps=10)
    rows = res["rows"]
    feats = {r["features"] for r in rows}
    assert {"pixels", "test_resnet"} <= feats
    assert any(f.startswith("stack(") for f in feats) and any(f.startswith("moe(") for f in feats)
    # every attack appears for every backbone, plus the seed's fixed-cut row
    for bb in ("pixels", "test_resnet"):
        assert {r["attack"] for r in rows if r["features"] == bb and r["rule"] == "dev-calibrated"} == {n for n in attack_names() if not n.startswith("verify_")}
    assert sum(r["rule"].startswith("seed") for r in rows) == 1
    for r in rows:
        assert r["n"] == 16  # 8 members + 8 non-members in the test split
        assert r["auc"] is None or 0.0 <= r["auc"] <= 1.0
        assert -1.0 <= r["kappa"] <= 1.0
    saved = json.loads((tmp_path / "demo" / "results.json").read_text())
    assert len(saved) == len(rows) and "_y" not in saved[0]
    # the demo ends with an audit of the same benchmark
    aud = res["audit"]
    assert aud.html.is_file() and aud.report["verdict"] in aud.html.read_text()
    assert aud.report["counts"]["unknown"] == 16 and (aud.run / "submission.csv").is_file()
    assert 0.0 <= res["audit_test"]["auc"] <= 1.0
    png = res["plot"].read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    # a second run reuses the dataset and the embeddings (same inputs) and gives the same numbers
    again = full_demo(tmp_path / "demo", backbones=("pixels", "test_resnet"),
                      synth=dict(size=32, gan_res=32, steps=30, dev_generated=24, test_generated=24, dev_real=8, test_real=8),
                      bootstrap=20, progress=False, moe_steps=10)
    assert [r["auc"] for r in again["rows"]] == [r["auc"] for r in rows]
