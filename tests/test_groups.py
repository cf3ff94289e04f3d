"""Near-duplicate groups from real x real similarity (ganprint.groups)."""

import numpy as np
from sklearn.metrics import adjusted_rand_score

from ganprint.groups import near_duplicate_groups


def _patients(n_pat, per, d=64, jitter=0.01, seed=0):
    rng = np.random.default_rng(seed)
    centre = rng.normal(size=(n_pat, d))
    pid = np.repeat(np.arange(n_pat), per)
    x = centre[pid] + jitter * rng.normal(size=(len(pid), d))
    perm = rng.permutation(len(pid))  # file order says nothing about the patient
    return x[perm].astype(np.float32), pid[perm]


def test_recovers_patients_of_neighbouring_slices():
    x, pid = _patients(40, 3)
    g = near_duplicate_groups([x])
    assert adjusted_rand_score(pid, g) == 1.0
    assert g.max() + 1 == 40


def test_independent_images_stay_alone_and_union_over_spaces():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(120, 32)).astype(np.float32)
    assert len(np.unique(near_duplicate_groups([x]))) == 120
    # a pair that is a near-duplicate in a second feature space only is joined
    y = rng.normal(size=(120, 32)).astype(np.float32)
    y[7] = y[3] + 1e-3
    g = near_duplicate_groups([x, y])
    assert g[7] == g[3] and len(np.unique(g)) == 119


def test_deterministic_ids():
    x, _ = _patients(20, 2, seed=3)
    a, b = near_duplicate_groups([x]), near_duplicate_groups([x.copy()])
    assert np.array_equal(a, b) and a[0] == 0
