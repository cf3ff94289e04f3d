"""faiss-ivf (ganprint.ivf): lists sized for the fixed costs; no structure -> the exact search answers."""

from __future__ import annotations

import pytest
import torch

from ganprint.ivf import MAX_SCAN, ivf_topk, nlist_for
from ganprint.similarity import topk_search

pytest.importorskip("faiss")


def _unit(x):
    return torch.nn.functional.normalize(x, dim=1)


def _exact(q, keys, k):
    def exact(rows):
        r, _, _ = topk_search(q[rows], keys, k, prepared=True, precision="fp32")
        return r.values, r.indices
    return exact


def test_nlist_for():
    assert nlist_for(1_000_000) == 1000
    assert nlist_for(100) == 2 and nlist_for(10) == 1


def test_uniform_vectors_fall_back_to_exact():
    """Random unit vectors in 64-d have no lists to exploit: 0.99 recall needs most of them, so the
    exact search answers and says why; the result is the exact top-k."""
    g = torch.Generator().manual_seed(0)
    q, keys = _unit(torch.randn(1600, 64, generator=g)), _unit(torch.randn(20000, 64, generator=g))
    v, i, info = ivf_topk(q, keys, 10, exact=_exact(q, keys, 10))
    truth, _, _ = topk_search(q, keys, 10, prepared=True, precision="fp32")
    assert info["fallback"] and "exact search" in info["fallback"]
    assert info["nprobe"] <= MAX_SCAN * info["nlist"]
    assert torch.equal(i, truth.indices) and torch.equal(v, truth.values)
    assert info["recall_at_k"] == 1.0


def test_clustered_vectors_use_the_lists():
    g = torch.Generator().manual_seed(1)
    centres = _unit(torch.randn(50, 64, generator=g))

    def around(n):
        return _unit(centres[torch.randint(0, 50, (n,), generator=g)] + 0.05 * torch.randn(n, 64, generator=g))

    q, keys = around(1600), around(20000)
    v, i, info = ivf_topk(q, keys, 10, exact=_exact(q, keys, 10))
    assert info["fallback"] is None and info["nprobe"] <= MAX_SCAN * info["nlist"]
    assert info["recall_at_k"] >= 0.99
