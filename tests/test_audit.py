"""ganprint.audit library pieces: p-values, BH, selection by nested CV, the run folder."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from scipy.stats import false_discovery_control, kstest

from audit_data import make_audit_folders
from ganprint.audit import (
    AuditOptions,
    bh_flags,
    conformal_pvalues,
    resolve_inputs,
    run_audit,
    select_fallback,
)
from ganprint.errors import GanprintError


def test_conformal_pvalues_brute_force_and_leave_one_out():
    rng = np.random.default_rng(0)
    ref = rng.normal(size=15)
    s = np.r_[rng.normal(size=5), ref[:3]]
    self_in = np.r_[np.full(5, -1), 0, 1, 2]
    p = conformal_pvalues(s, ref, self_in)
    for i in range(8):
        others = ref if self_in[i] < 0 else np.delete(ref, self_in[i])
        assert p[i] == pytest.approx((1 + (others >= s[i]).sum()) / (len(others) + 1))


def test_conformal_pvalues_uniform_under_exchangeability():
    rng = np.random.default_rng(1)
    ps = []
    for _ in range(400):
        x = rng.normal(size=21)
        ps.append(conformal_pvalues(x[:1], x[1:])[0])
    assert kstest(ps, "uniform").pvalue > 0.01
    # with ties broken at random the discrete p-value is super-uniform: P(p <= a) <= a
    ps = np.asarray(ps)
    for a in (0.05, 0.1, 0.5):
        assert (ps <= a).mean() <= a + 0.04


def test_bh_matches_scipy():
    p = np.array([0.001, 0.02, 0.03, 0.2, 0.5, 0.04])
    adj, flags = bh_flags(p, 0.1)
    assert np.allclose(adj, false_discovery_control(p))
    assert flags.tolist() == (false_discovery_control(p) <= 0.1).tolist()


def test_selection_picks_the_signal_and_is_deterministic():
    rng = np.random.default_rng(2)
    y = np.r_[np.ones(30), np.zeros(30)].astype(int)
    S = rng.normal(size=(6, 60))
    S[4] += 1.5 * y  # the informative candidate
    names = [f"c{i}" for i in range(6)]
    a = select_fallback(S, y, names, folds=5, repeats=2, seed=0, bootstrap=100)
    b = select_fallback(S, y, names, folds=5, repeats=2, seed=0, bootstrap=100)
    assert a["chosen"] == "c4"
    assert a["nested"] == b["nested"] and np.array_equal(a["oof_score"], b["oof_score"])
    assert a["nested"]["auc"] > 0.75 and a["nested"]["auc_ci"][0] > 0.5


def test_nested_cv_is_not_fooled_by_many_noise_candidates():
    """The best of 60 noise scores looks good in-sample; the nested estimate must not."""
    rng = np.random.default_rng(3)
    y = np.r_[np.ones(20), np.zeros(20)].astype(int)
    S = rng.normal(size=(60, 40))
    res = select_fallback(S, y, [f"n{i}" for i in range(60)], folds=5, repeats=2, seed=0, bootstrap=100)
    best_in_sample = max(r["auc_all"] for r in res["candidates"])
    assert best_in_sample > 0.7
    assert res["nested"]["auc"] < 0.65
    assert res["nested"]["auc_ci"][0] < 0.5


def test_selection_refuses_one_class():
    with pytest.raises(GanprintError, match="at least 2 members"):
        select_fallback(np.zeros((2, 5)), np.array([1, 1, 1, 1, 0]), ["a", "b"])


def test_inputs_need_non_members_and_members(tmp_path):
    f = make_audit_folders(tmp_path / "d", n_known=3, n_unknown=2, n_generated=4, size=16)
    with pytest.raises(GanprintError, match="no labels and no reference"):
        resolve_inputs(generated=f["generated"], members=f["members"], unknown=f["unknown"])
    with pytest.raises(GanprintError, match="no known members"):
        resolve_inputs(generated=f["generated"], non_members=f["non_members"])
    with pytest.raises(GanprintError, match="not both"):
        resolve_inputs(tmp_path, generated=f["generated"])


def test_run_audit_library_and_cache(tmp_path):
    f = make_audit_folders(tmp_path / "d")
    opts = AuditOptions(backbones=("pixels",), bootstrap=30, repeats=1, folds=3, gallery=4)
    inp = lambda: resolve_inputs(generated=f["generated"], members=f["members"], non_members=f["non_members"],  # noqa: E731
                                 unknown=f["unknown"])
    res = run_audit(tmp_path / "run", inp(), opts, progress=False)
    rep = json.loads((tmp_path / "run" / "report.json").read_text())
    assert rep["significant"] and "; membership signal: AUC" in rep["verdict"]
    assert rep["copying"] and rep["verdict"].startswith("data copying: 12 of 12 member groups")
    assert set(rep["stages_seconds"]) >= {"inputs", "embed", "similarity+attacks", "selection", "pvalues",
                                          "datacopy", "report"}
    assert not any(rep["stages_cached"].values())
    assert rep["gallery"] and rep["gallery"][0]["matches"][0]["value"] > 0.9  # a copy of the real image
    assert not (tmp_path / ".run.partial").exists()
    again = run_audit(tmp_path / "run", inp(), opts, progress=False)
    assert all(again.report["stages_cached"].values())
    assert again.report["selection"] == res.report["selection"]
    assert again.report["datacopy"] == res.report["datacopy"]
    # the unknown images' null: known non-members held out of selection (whole groups), never in it
    split = rep["selection"]["calibration_split"]
    assert split["n_calibration"] > 0 and split["n_calibration"] == rep["flags"]["n_null"]
    assert split["n_selection"] == rep["selection"]["nested"]["n"] < 24
    assert split["n_selection"] + split["n_held_out_of_selection"] == 24
    df = pd.read_parquet(tmp_path / "run" / "scores.parquet")
    held = df[(df["role"] == "non_members") & df["oof_score"].isna()]
    assert len(held) == split["n_calibration"]  # held out: no out-of-fold score, selection never saw them
    unk = df[df["role"] == "unknown"]
    ref = np.sort(held["score"].to_numpy())
    expect = (1 + len(ref) - np.searchsorted(ref, unk["score"].to_numpy(), side="left")) / (len(ref) + 1)
    np.testing.assert_allclose(unk["p_value"].to_numpy(), expect)


def _grouped_null_scores(seed, n_pat=30, per=4, cands=3):
    """S [cands, R]: no signal, but each patient's ``per`` slices score (almost) alike."""
    rng = np.random.default_rng(seed)
    pid = np.repeat(np.arange(2 * n_pat), per)
    y = (pid < n_pat).astype(np.int64)
    S = rng.standard_normal((cands, 2 * n_pat))[:, pid] + 0.01 * rng.standard_normal((cands, len(pid)))
    return S, y, pid


def test_group_level_rank_test_is_calibrated_where_the_image_level_one_is_not():
    """Near-duplicates of one patient fool a rank test over images, not one over groups."""
    from ganprint.select import oof_rank_pvalue

    p_img, p_grp = [], []
    for seed in range(300):
        S, y, pid = _grouped_null_scores(seed, per=6, cands=1)
        p_img.append(oof_rank_pvalue(y, S[0]))
        p_grp.append(oof_rank_pvalue(y, S[0], pid))
    assert np.mean(np.array(p_img) < 0.05) > 0.15  # ~0.25 in theory: n counted 6 times
    assert np.mean(np.array(p_grp) < 0.05) < 0.09
    assert kstest(p_grp, "uniform").pvalue > 0.01


def test_audit_selection_with_groups_on_a_grouped_null():
    """The whole selection + verdict p-value on null patients: grouped CV and the group-level test
    reject at about the nominal rate, the ungrouped ones far more often."""
    from ganprint.audit import _select

    opts = AuditOptions(folds=4, repeats=1, bootstrap=0)
    rej = {"img": 0, "grp": 0}
    runs = 12
    for seed in range(runs):
        S, y, pid = _grouped_null_scores(100 + seed, per=5)
        lab = np.ones(len(y), dtype=bool)
        rej["img"] += _select(S, lab, y, ["a", "b", "c"], opts)[0]["nested"]["p_value"] < 0.05
        res = _select(S, lab, y, ["a", "b", "c"], opts, pid)[0]
        assert res["nested"]["n_groups"] == 60
        rej["grp"] += res["nested"]["p_value"] < 0.05
    assert rej["img"] >= 3, rej  # 4 of 12 when written
    assert rej["grp"] <= 1, rej  # 0 of 12 when written; 12 x 0.05 = 0.6 expected


def test_audit_with_too_few_non_members_to_hold_out_says_its_p_values_are_optimistic(tmp_path):
    f = make_audit_folders(tmp_path / "d", n_known=4, n_unknown=4, n_generated=12, size=16)
    opts = AuditOptions(backbones=("pixels",), bootstrap=0, repeats=1, folds=4, gallery=0, verify=False)
    res = run_audit(tmp_path / "run", resolve_inputs(generated=f["generated"], members=f["members"],
                                                     non_members=f["non_members"], unknown=f["unknown"]),
                    opts, progress=False)
    split = res.report["selection"]["calibration_split"]
    # 4 non-members cannot keep 4 groups (folds) in selection and give some to the null: all of them
    # are the null, and the report says what that costs
    assert "optimistic" in split["null"] and res.report["flags"]["n_null"] == 4
    assert res.report["selection"]["nested"]["n"] == 8
