"""Meehan et al.'s data-copying test and the memorisation rate on seeded simulations."""

from __future__ import annotations

import numpy as np
import pytest

from ganprint.datacopy import data_copying_test, memorisation_rate, wilson_ci
from ganprint.errors import GanprintError


def _mixture(rng, n, d=8, centres=None):
    centres = rng.normal(size=(4, d)) * 3 if centres is None else centres
    return centres[rng.integers(0, len(centres), n)] + rng.normal(size=(n, d)), centres


def test_copying_generator_gives_strongly_negative_z():
    rng = np.random.default_rng(0)
    train, c = _mixture(rng, 200)
    held, _ = _mixture(rng, 200, centres=c)
    gen = train[rng.integers(0, 200, 300)] + 0.05 * rng.normal(size=(300, 8))  # near-copies
    res = data_copying_test(train, held, gen, seed=0, bootstrap=50)
    assert res["z"] < -8 and res["ct"] < -3
    assert res["p"] < 1e-6
    assert res["ct_ci"][1] < 0
    assert len(res["cells_used"]) >= 2


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_independent_sample_gives_small_z(seed):
    rng = np.random.default_rng(seed)
    train, c = _mixture(rng, 200)
    held, _ = _mixture(rng, 200, centres=c)
    gen, _ = _mixture(rng, 300, centres=c)
    res = data_copying_test(train, held, gen, seed=0, bootstrap=0)
    assert abs(res["z"]) < 2.5
    assert res["p"] > 0.005


def test_deterministic_and_refuses_tiny_inputs():
    rng = np.random.default_rng(5)
    train, c = _mixture(rng, 60)
    held, _ = _mixture(rng, 60, centres=c)
    gen, _ = _mixture(rng, 60, centres=c)
    assert data_copying_test(train, held, gen, seed=3, bootstrap=20) == data_copying_test(train, held, gen, seed=3,
                                                                                            bootstrap=20)
    with pytest.raises(GanprintError, match="needs"):
        data_copying_test(train, held[:2], gen)


def test_memorisation_rate():
    rng = np.random.default_rng(7)
    train, c = _mixture(rng, 150)
    held, _ = _mixture(rng, 400, centres=c)
    copies = train[:60] + 1e-3 * rng.normal(size=(60, 8))
    fresh, _ = _mixture(rng, 240, centres=c)
    res = memorisation_rate(train, held, np.vstack([copies, fresh]))
    assert res["copies"] >= 60 and res["rate"] >= 0.2
    assert res["ci"][0] < res["rate"] < res["ci"][1]
    null = memorisation_rate(train, held, fresh)
    assert null["rate"] < 0.06 and null["rate_under_null"] == 0.01
    verified = memorisation_rate(None, None, fresh, verified_inliers=np.r_[np.full(10, 40), np.zeros(230)])
    assert verified["copies"] == 10 and verified["rate_under_null"] is None


def test_wilson_ci_matches_known_value():
    lo, hi = wilson_ci(5, 50)
    assert lo == pytest.approx(0.0435, abs=1e-3) and hi == pytest.approx(0.2136, abs=1e-3)
