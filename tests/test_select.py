"""Selection: deterministic, honest (nested CV never sees the outer test labels), sensible."""

import numpy as np
import pytest

from ganprint.errors import GanprintError
from ganprint.select import Choice, SelectConfig, choose, fit_procedure, nested_cv, select

FAST = SelectConfig(folds=4, repeats=2, outer_folds=4, outer_repeats=1)


def _data(n=80, seed=0, strengths=(1.5, 0.8, 0.0, 0.0)):
    rng = np.random.default_rng(seed)
    y = np.r_[np.ones(n // 2), np.zeros(n - n // 2)].astype(int)
    X = np.column_stack([rng.standard_normal(n) + s * y for s in strengths])
    return X, y, [f"c{j}" for j in range(X.shape[1])]


def test_picks_the_informative_column_and_estimates_honestly():
    X, y, names = _data(120)
    sel = select(X, y, names, FAST)
    assert sel.chosen == "c0"
    assert [c.name for c in sel.candidates][:4] == names
    assert {"mean(top3)", "stack(top3)"} <= {c.name for c in sel.candidates}
    est = sel.nested
    assert est is not None and est.n_splits == 4 and len(est.chosen) == 4
    assert 0.75 < est.auc_mean < 0.95  # true AUC of N(1.5, 1) vs N(0, 1) is 0.86
    assert est.auc_ci[0] < est.auc_mean < est.auc_ci[1]
    # decisions on new data use the cut fitted on the labelled set
    Xn, yn, _ = _data(200, seed=5)
    lab = sel.decide(Xn)
    assert set(np.unique(lab)) == {0, 1}
    assert (lab == yn).mean() > 0.65


def test_noise_only_gives_chance_estimate():
    X, y, names = _data(80, seed=1, strengths=(0, 0, 0, 0, 0, 0))
    sel = select(X, y, names, FAST)
    # the in-sample best column looks good; the nested estimate does not
    assert sel.nested.auc_mean < 0.62
    best_cv = max(c.auc_mean for c in sel.candidates)
    assert best_cv > sel.nested.auc_mean


def test_deterministic_for_a_seed():
    X, y, names = _data(90, seed=2, strengths=(0.6, 0.5, 0.4))
    a = select(X, y, names, FAST).to_dict()
    b = select(X, y, names, FAST).to_dict()
    assert a == b
    c = select(X, y, names, SelectConfig(folds=4, repeats=2, outer_folds=4, outer_repeats=1, seed=7)).to_dict()
    assert c["nested"]["auc_folds"] != a["nested"]["auc_folds"]


def test_nested_cv_never_sees_outer_test_labels():
    """Changing the labels of an outer test fold must not change what its training part chose or
    fitted; a leaky procedure (choosing on all labels) would change, as the control shows."""
    from sklearn.model_selection import StratifiedKFold

    X, y, names = _data(80, seed=3, strengths=(0.9, 0.9, 0.3))
    splits = list(StratifiedKFold(4, shuffle=True, random_state=0).split(X, y))
    base = nested_cv(X, y, names, FAST, splits=splits)
    tr, te = splits[0]
    y2 = y.copy()
    # make the test fold favour column 1 strongly (relabel by column 1's ranking)
    order = te[np.argsort(-X[te, 1])]
    y2[order[: len(te) // 2]], y2[order[len(te) // 2:]] = 1, 0
    # control: a choice made on all labels does react to these test labels
    full_a, _, _ = choose(X, y, names, FAST, with_kappa=False)
    full_b, _, _ = choose(X, y2, names, FAST, with_kappa=False)
    leaky_changes = full_a != full_b or fit_procedure(X, y, full_a, names, FAST).threshold != \
        fit_procedure(X, y2, full_b, names, FAST).threshold
    assert leaky_changes
    other = nested_cv(X, y2, names, FAST, splits=splits)
    assert other.chosen[0] == base.chosen[0]
    # the procedure fitted on fold 0's training part is the same: only the evaluation moves
    assert other.auc_folds[0] != base.auc_folds[0]
    idx_a, _, _ = choose(X[tr], y[tr], names, FAST, with_kappa=False)
    idx_b, _, _ = choose(X[tr], y2[tr], names, FAST, with_kappa=False)
    assert idx_a == idx_b and isinstance(idx_a, Choice)
    assert fit_procedure(X[tr], y[tr], idx_a, names, FAST) == fit_procedure(X[tr], y2[tr], idx_b, names, FAST)


def test_combination_needs_to_beat_singles_beyond_noise():
    # two equally informative independent columns: the mean beats each single clearly
    X, y, names = _data(300, seed=4, strengths=(0.8, 0.8, 0.8, 0.8))
    idx, reason, cands = choose(X, y, names, FAST)
    assert not idx.is_window and cands[idx.index].kind in ("mean", "stack"), reason
    # with a huge noise allowance the best single wins (without the window) ...
    idx2, reason2, _ = choose(X, y, names, SelectConfig(folds=4, repeats=2, noise=100.0, window=False))
    assert idx2.index < 4 and "single" in reason2
    # ... and with it, every single is within noise: their mean
    idx3, reason3, c3 = choose(X, y, names, SelectConfig(folds=4, repeats=2, noise=100.0))
    assert idx3.is_window and sorted(idx3.columns) == [0, 1, 2, 3] and idx3.name == "window(4)", reason3
    aucs = {c.name: c.auc_mean for c in c3}
    assert [aucs[names[j]] for j in idx3.columns] == sorted(aucs[n] for n in names)[::-1]  # best first


def test_window_averages_the_candidates_within_noise_once_each():
    """Occam's window: columns within noise of the best are averaged as z-scores, a repeated
    column counts once, and a column far below the best stays out."""
    rng = np.random.default_rng(11)
    n = 160
    y = np.r_[np.ones(n // 2), np.zeros(n // 2)].astype(int)
    a = rng.standard_normal(n) + 0.9 * y
    b = a + 0.3 * rng.standard_normal(n)  # a second view of the same evidence: no combination beats them
    X = np.column_stack([a, b, a.copy(), rng.standard_normal(n) - 0.5 * y])  # c2 repeats c0, c3 is anti
    names = ["a", "b", "a_again", "anti"]
    cfg = SelectConfig(folds=4, repeats=2, noise=3.0)
    sel = select(X, y, names, cfg, nested=False)
    assert sel.choice.is_window and set(sel.choice.columns) == {0, 1}, sel.reason
    proc = sel.procedure
    assert proc.kind == "mean" and sorted(proc.inputs) == ["a", "b"]
    z = (X[:, proc.columns] - proc.center) / proc.scale
    np.testing.assert_allclose(sel.score(X), z.mean(1))
    assert "within 3 SE" in sel.reason and sel.chosen == "window(2)"
    # the same procedure refits on other data with the same columns
    half = np.r_[0:40, 80:120]
    part = fit_procedure(X[half], y[half], sel.choice, names, cfg)
    assert part.columns == proc.columns and part.center != proc.center


def test_bad_inputs():
    X, y, names = _data(40)
    with pytest.raises(GanprintError, match="non-finite"):
        Xb = X.copy()
        Xb[0, 1] = np.nan
        select(Xb, y, names, FAST)
    with pytest.raises(GanprintError, match="at least 2 members"):
        select(X[:21], np.r_[np.zeros(20), 1].astype(int), names, FAST)
    with pytest.raises(GanprintError, match="names"):
        select(X, y, names[:2], FAST)


def _grouped_null(n_pat=30, per=4, seed=0):
    """Null data of patients: ``per`` near-duplicate images per patient, a patient in one class."""
    rng = np.random.default_rng(seed)
    pid = np.repeat(np.arange(2 * n_pat), per)
    y = (pid < n_pat).astype(int)
    X = rng.standard_normal((2 * n_pat, 3))[pid] + 0.01 * rng.standard_normal((len(pid), 3))
    return X, y, pid, ["a", "b", "c"]


def test_grouped_folds_never_split_a_group():
    from ganprint.select import _splitter

    X, y, pid, _ = _grouped_null()
    splits = list(_splitter(y, 5, 2, 0, pid).split(X, y))
    assert len(splits) == 10
    for tr, te in splits:
        assert not set(pid[tr]) & set(pid[te])
        assert 0 < y[te].mean() < 1
    # without groups, today's behaviour: some fold splits a patient
    assert any(set(pid[tr]) & set(pid[te]) for tr, te in _splitter(y, 5, 2, 0).split(X, y))


def test_select_with_groups_is_deterministic_and_checks_shape():
    X, y, pid, names = _grouped_null()
    a = select(X, y, names, FAST, groups=pid).to_dict()
    b = select(X, y, names, FAST, groups=pid).to_dict()
    assert a == b
    with pytest.raises(GanprintError, match="groups"):
        select(X, y, names, FAST, groups=pid[:-1])


def test_signal_test_finds_signal_and_says_so():
    X, y, names = _data(120)
    est = select(X, y, names, FAST).nested
    assert est.signal_p is not None and est.signal_p < 1e-4 and est.signal is True
    assert "significant" in est.signal_text() and "not significant" not in est.signal_text()
    d = est.to_dict()
    assert d["signal"] is True and d["signal_unit"] == "image" and d["signal_alpha"] == 0.01


def test_signal_test_is_calibrated_under_no_signal():
    """Pure noise candidates: the best of them looks good in-sample, yet the out-of-fold rank test
    rejects at about its level (a test of the in-sample best column would reject far more often)."""
    from scipy.stats import kstest

    cfg = SelectConfig(folds=3, repeats=1, outer_folds=3, outer_repeats=1)
    ps, insample = [], []
    for seed in range(60):
        X, y, names = _data(48, seed=100 + seed, strengths=(0, 0, 0, 0, 0))
        est = nested_cv(X, y, names, cfg)
        ps.append(est.signal_p)
        from ganprint.select import oof_rank_pvalue

        best = int(np.argmax([np.mean(X[y == 1, j]) - np.mean(X[y == 0, j]) for j in range(X.shape[1])]))
        insample.append(oof_rank_pvalue(y, X[:, best]))
    ps = np.asarray(ps)
    assert np.mean(ps < 0.1) <= 0.2
    assert kstest(ps, "uniform").pvalue > 0.001
    assert np.mean(np.asarray(insample) < 0.1) > 0.25  # the control: choosing on the same labels


def test_signal_test_over_groups_and_not_for_overlapping_splits():
    X, y, names = _data(80, seed=4, strengths=(1.2, 0.0))
    groups = np.arange(80) // 2
    est = nested_cv(X, y, names, FAST, groups=groups)
    assert est.signal_unit == "group" and est.signal
    # splits that are not one partition of the images: no test rather than a wrong one
    splits = [(np.arange(40, 80), np.arange(0, 40)), (np.arange(20, 80), np.arange(0, 20))]
    y2 = np.r_[np.tile([1, 0], 40)]
    assert nested_cv(X, y2, names, FAST, splits=splits).signal_p is None
    assert "not tested" in nested_cv(X, y2, names, FAST, splits=splits).signal_text()
