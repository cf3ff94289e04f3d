"""Conformal p-values and BH."""

import numpy as np
import pytest
from scipy import stats

from ganprint.conformal import bh_adjust, bh_flags, conformal_pvalues, realised_fdr
from ganprint.errors import GanprintError


def test_formula_small_case():
    ref = np.array([0.1, 0.2, 0.2, 0.5])
    p = conformal_pvalues([0.2, 0.6, 0.0], ref)
    # #{ref >= 0.2} = 3 -> 4/5; none >= 0.6 -> 1/5; all >= 0 -> 5/5
    np.testing.assert_allclose(p, [4 / 5, 1 / 5, 5 / 5])


def test_leave_one_out_excludes_self():
    ref = np.array([0.1, 0.2, 0.3, 0.4])
    p = conformal_pvalues(ref, ref, self_index=np.arange(4))
    # image j: #{others >= ref_j} over 3 others: 0.4 -> 0, 0.1 -> 3
    np.testing.assert_allclose(p, [(1 + 3) / 4, (1 + 2) / 4, (1 + 1) / 4, (1 + 0) / 4])
    mixed = conformal_pvalues([0.4, 0.45], ref, self_index=[3, -1])
    np.testing.assert_allclose(mixed, [1 / 4, 1 / 5])


def test_uniform_under_exchangeability():
    """Non-members exchangeable with the reference: p is uniform on {1/(m+1), ..., 1} (KS test)."""
    rng = np.random.default_rng(0)
    m, n_sim = 49, 4000
    ps = []
    for _ in range(n_sim):
        x = rng.standard_normal(m + 1)
        ps.append(conformal_pvalues(x[:1], x[1:])[0])
    ps = np.asarray(ps)
    # discrete uniform: compare with a continuous uniform after jittering inside each atom
    jitter = ps - rng.uniform(0, 1 / (m + 1), size=len(ps))
    assert stats.kstest(jitter, "uniform").pvalue > 0.01
    # and a shifted (member-like) score is not uniform: the test can fail
    shifted = np.asarray([conformal_pvalues(rng.standard_normal(1) + 1.0, rng.standard_normal(m))[0]
                          for _ in range(2000)])
    assert stats.kstest(shifted - rng.uniform(0, 1 / (m + 1), size=2000), "uniform").pvalue < 1e-6


def test_leave_one_out_uniform():
    rng = np.random.default_rng(1)
    ps = []
    for _ in range(400):
        ref = rng.standard_normal(20)
        ps.append(conformal_pvalues(ref, ref, self_index=np.arange(20)))
    ps = np.concatenate(ps)
    # each p is uniform on {1/20, ..., 20/20}: its mean is (1 + 20) / 2 / 20
    assert abs(ps.mean() - 21 / 40) < 0.01


def test_bh_matches_scipy_and_textbook():
    rng = np.random.default_rng(2)
    p = np.r_[rng.uniform(0, 0.01, 10), rng.uniform(0, 1, 90)]
    np.testing.assert_allclose(bh_adjust(p), stats.false_discovery_control(p, method="bh"))
    q = 0.1
    # textbook step-up: reject the k smallest, k = max{i : p_(i) <= i q / n}
    order = np.sort(p)
    ok = np.flatnonzero(order <= q * np.arange(1, len(p) + 1) / len(p))
    k = ok.max() + 1 if len(ok) else 0
    flags = bh_flags(p, q)
    assert flags.sum() == k
    assert set(np.flatnonzero(flags)) == set(np.argsort(p, kind="stable")[:k])


def test_bh_rejects_bad_q_and_p():
    with pytest.raises(GanprintError, match="--fdr"):
        bh_flags([0.1, 0.2], 1.5)
    with pytest.raises(GanprintError):
        bh_adjust([0.5, 2.0])
    with pytest.raises(GanprintError):
        conformal_pvalues([0.1], [])


def test_fdr_control_on_simulation():
    """Mixed members/non-members: mean realised FDR of BH on conformal p-values <= q (+ noise)."""
    rng = np.random.default_rng(3)
    fdrs = []
    for _ in range(300):
        ref = rng.standard_normal(100)
        y = (rng.uniform(size=60) < 0.3).astype(int)
        s = rng.standard_normal(60) + 2.5 * y
        fdr, _ = realised_fdr(bh_flags(conformal_pvalues(s, ref), 0.1), y)
        fdrs.append(fdr)
    assert np.mean(fdrs) <= 0.1 + 0.02


def test_realised_fdr():
    fdr, rec = realised_fdr([1, 1, 0, 1], [1, 0, 1, 1])
    assert fdr == pytest.approx(1 / 3) and rec == pytest.approx(2 / 3)
    assert realised_fdr([0, 0], [0, 1]) == (0.0, 0.0)
