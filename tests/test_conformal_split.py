"""Selection / calibration split of the known non-members (ganprint.conformal.calibration_split),
and why it is needed: a null that also chose the score function gives anti-conservative p-values."""

import numpy as np
import pytest
from scipy import stats

from ganprint.conformal import calibration_split, conformal_pvalues
from ganprint.errors import GanprintError
from ganprint.select import SelectConfig, select


def _dev(n_pos=10, n_neg=20, pairs=True):
    ids = [f"m{i:02d}" for i in range(n_pos)] + [f"n{i:02d}" for i in range(n_neg)]
    y = np.r_[np.ones(n_pos), np.zeros(n_neg)].astype(int)
    g = np.arange(n_pos + n_neg) // 2 if pairs else None  # two slices per patient
    return ids, y, g


def test_split_is_disjoint_whole_groups_and_deterministic():
    ids, y, g = _dev()
    null = [i for i in ids if i.startswith("n")] + ["extra0", "extra1"]  # two known non-members not in dev
    a = calibration_split(ids, y, g, null, 0.5, seed=3)
    assert a.ok
    cal = set(a.calibration_ids)
    sel_ids = {i for i, k in zip(ids, a.selection) if k}
    assert not cal & sel_ids  # no calibration image enters selection
    assert {"extra0", "extra1"} <= cal  # outside the dev set: always calibration
    assert a.info["n_calibration_from_dev"] == 10 and a.info["n_selection_nonmembers"] == 10
    for v in np.unique(g):  # a near-duplicate group is on one side only
        assert len(set(a.selection[g == v])) == 1
    assert all(a.selection[y == 1])  # members all stay in selection
    # deterministic for a seed, independent of the input order, other seed -> other split
    b = calibration_split(ids, y, g, null, 0.5, seed=3)
    assert b.calibration_ids == a.calibration_ids and (b.selection == a.selection).all()
    perm = np.random.default_rng(0).permutation(len(ids))
    c = calibration_split([ids[i] for i in perm], y[perm], g[perm], null[::-1], 0.5, seed=3)
    assert c.calibration_ids == a.calibration_ids
    assert calibration_split(ids, y, g, null, 0.5, seed=4).calibration_ids != a.calibration_ids
    assert a.info["calibration_ids"] == a.calibration_ids and a.info["seed"] == 3


def test_split_keeps_enough_for_selection_and_checks_fraction():
    ids, y, g = _dev(n_pos=4, n_neg=4)  # 2 groups of non-members: selection needs both
    res = calibration_split(ids, y, g, [i for i in ids if i.startswith("n")], 0.5)
    assert not res.ok and "too few" in res.info["reason"] and res.selection.all()
    # without groups, 4 single non-members: 2 go to calibration, 2 stay
    res = calibration_split(ids, y, None, [i for i in ids if i.startswith("n")], 0.5)
    assert res.ok and len(res.calibration_ids) == 2 and (~res.selection).sum() == 2
    # a null disjoint from the dev set needs no split
    res = calibration_split(ids, y, g, ["x1", "x2", "x3"], 0.5)
    assert res.ok and res.selection.all() and res.calibration_ids == ["x1", "x2", "x3"]
    for bad in (-0.1, 1.0, 1.5):
        with pytest.raises(GanprintError, match="--null-fraction"):
            calibration_split(ids, y, g, ids, bad)


def test_auto_fraction_keeps_every_dev_image_in_selection_when_a_reference_pool_calibrates():
    ids, y, g = _dev()
    dev_null = [i for i in ids if i.startswith("n")]
    pool = [f"ref{i:03d}" for i in range(30)]
    # auto with a pool outside the dev set: the pool alone calibrates, selection keeps everything
    a = calibration_split(ids, y, g, dev_null + pool, None, seed=1)
    assert a.ok and a.selection.all() and a.calibration_ids == sorted(pool)
    assert a.info["fraction"] == 0.0 and "outside the dev set" in a.info["fraction_reason"]
    assert not set(a.calibration_ids) & set(ids)
    # auto without one: half of the dev set's non-members are held out, as with 0.5
    b = calibration_split(ids, y, g, dev_null, None, seed=1)
    c = calibration_split(ids, y, g, dev_null, 0.5, seed=1)
    assert b.info["fraction"] == 0.5 and b.calibration_ids == c.calibration_ids and b.calibration_ids
    # an explicit share still splits the dev non-members, and the pool calibrates too
    d = calibration_split(ids, y, g, dev_null + pool, 0.5, seed=1)
    assert set(pool) < set(d.calibration_ids) and not d.selection.all()
    # 0 without a pool: nothing may calibrate
    e = calibration_split(ids, y, g, dev_null, 0.0)
    assert not e.ok and e.selection.all() and "no p-values" in e.info["reason"]


def _world(rng, F=12, n_pos=20, n_neg=40, n_test=20, rho=0.3):
    """Global null: F noise scores, no member signal.  Each image has a per-column effect seen in
    the dev context and, with small noise, in the test context (the null images are the dev
    non-members scored again with the test images)."""
    n = n_pos + n_neg
    a = rng.standard_normal((n, F))
    dev = a + rho * rng.standard_normal((n, F))
    null_test_ctx = a[n_pos:] + rho * rng.standard_normal((n_neg, F))
    fresh = rng.standard_normal((n_test, F)) * np.sqrt(1 + rho**2)  # fresh test non-members
    y = np.r_[np.ones(n_pos), np.zeros(n_neg)].astype(int)
    return dev, y, null_test_ctx, fresh


CFG = SelectConfig(folds=3, repeats=1, top=2, noise=0.0)


def _jittered(ps, m):
    return ps - np.random.default_rng(9).uniform(0, 1 / (m + 1), size=len(ps))


def test_held_out_null_gives_uniform_pvalues_and_a_leaky_null_does_not():
    rng = np.random.default_rng(0)
    F, n_pos, n_neg = 12, 20, 40
    ids = [f"m{i}" for i in range(n_pos)] + [f"n{i}" for i in range(n_neg)]
    null_ids = ids[n_pos:]
    split_p, leak_p = [], []
    for rep in range(120):
        dev, y, null_t, fresh = _world(rng, F, n_pos, n_neg)
        names = [f"c{j}" for j in range(F)]
        # leaky: selection on every dev image, the same non-members as the null
        s = select(dev, y, names, CFG, nested=False)
        leak_p.append(conformal_pvalues(s.score(fresh), s.score(null_t)))
        # the fix: the calibration non-members never reach selection
        sp = calibration_split(ids, y, None, null_ids, 0.5, seed=rep)
        s = select(dev[sp.selection], y[sp.selection], names, CFG, nested=False)
        cal = np.isin(null_ids, sp.calibration_ids)
        split_p.append(conformal_pvalues(s.score(fresh), s.score(null_t[cal])))
    split_p, leak_p = np.concatenate(split_p), np.concatenate(leak_p)
    m_split, m_leak = n_neg // 2, n_neg
    # the fresh non-members' p-values against a held-out null: uniform (KS, jittered atoms)
    assert stats.kstest(_jittered(split_p, m_split), "uniform").pvalue > 0.01
    assert (split_p <= 0.1).mean() <= 0.1 + 0.02
    # against the null that chose the candidate: too small -- this check fails if the null leaks
    assert (leak_p <= 0.1).mean() > 0.12
    assert stats.kstest(_jittered(leak_p, m_leak), "uniform").pvalue < 1e-3
