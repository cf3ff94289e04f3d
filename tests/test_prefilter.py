"""bf16 prefilter: the error bound holds, the certified search equals the float32 one exactly."""

from __future__ import annotations

import math

import pytest
import torch

from ganprint import prefilter
from ganprint.errors import GanprintError
from ganprint.prefilter import U, bf16_topk, prepare
from ganprint.similarity import FULL_AUTO_MAX, KEY_BLOCK_FACTOR, compute_similarity, resolve_precision, topk_search


def unit(n, d, seed, scale=None):  # scale: truthy for a wide dynamic range
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    if scale is not None:  # a wide dynamic range per coordinate: rounding errors differ a lot by row
        x = x * torch.logspace(-3, 1, d)[torch.randperm(d, generator=g)]
    return torch.nn.functional.normalize(x, dim=1)


def clustered(n, d, seed, spread):
    """Unit vectors around one direction: cosines crowd inside the bf16 error band."""
    g = torch.Generator().manual_seed(seed)
    c = torch.randn(1, d, generator=g)
    return torch.nn.functional.normalize(c + spread * torch.randn(n, d, generator=g), dim=1)


@pytest.mark.parametrize("data", ["random", "wide", "crowded"])
def test_error_bound_holds_for_every_pair(data):
    if data == "crowded":  # cosines ~0.9: the keys are centred before rounding
        q, k = clustered(300, 96, 0, 0.3), clustered(2000, 96, 0, 0.3)
    else:
        q, k = unit(300, 96, 0, data == "wide" or None), unit(2000, 96, 1, data == "wide" or None)
    q16, k16, mu, delta = prepare(q, k)
    approx = torch.mm(q16, k16.t()).double()  # the same bf16 product the search uses
    exact = q.double() @ (k.double() - mu.double()).t()
    err = (approx - exact).abs()
    excess = err - (delta.unsqueeze(1) + U * approx.abs())
    assert float(excess.max()) <= 0.0
    # and the bound is not vacuous: far below the spread of the cosines (~0.1 at D=96 for random vectors)
    assert float(delta.max()) < 0.02
    # nor absurdly loose: the worst observed error uses a fair share of it
    assert float((err / (delta.unsqueeze(1) + U * approx.abs())).max()) > 0.05


def test_centring_shrinks_the_bound_for_crowded_embeddings():
    q, k = clustered(100, 96, 0, 0.3), clustered(2000, 96, 0, 0.3)
    assert float((q @ k.t()).mean()) > 0.8
    _, _, mu, centred = prepare(q, k)
    assert float(mu.norm()) > 0.8
    # without centring the bound would be ~0.004 (unit keys); centred keys are much shorter
    assert float(centred.max()) < 0.5 * 0.0041


@pytest.mark.parametrize("nq,nk,k,block", [(130, 1500, 10, 64), (157, 4099, 5, 50), (40, 25, 3, 7), (64, 700, 1, 16),
                                           (33, 9000, 20, 32)])
def test_bf16_search_equals_fp32_search(nq, nk, k, block):
    q, keys = unit(nq, 64, 2, "wide"), unit(nk, 64, 3, "wide")
    a, ak, _ = topk_search(q, keys, k, block=block, key_k=k, prepared=True, precision="bf16")
    b, bk, _ = topk_search(q, keys, k, block=block, key_k=k, prepared=True, precision="fp32")
    assert torch.equal(a.indices, b.indices)
    assert torch.allclose(a.values, b.values, atol=1e-6, rtol=0)
    assert torch.equal(ak.indices, bk.indices)
    assert torch.allclose(ak.values, bk.values, atol=1e-6, rtol=0)


def test_bf16_search_with_exclude_equals_fp32():
    x = unit(300, 48, 4)
    ex = torch.arange(300)
    ex[::7] = -1
    a, _, _ = topk_search(x, x, 6, block=40, exclude=ex, prepared=True, precision="bf16")
    b, _, _ = topk_search(x, x, 6, block=40, exclude=ex, prepared=True, precision="fp32")
    assert torch.equal(a.indices, b.indices)
    assert not bool((a.indices[ex >= 0] == ex[ex >= 0].unsqueeze(1)).any())
    assert bool((a.indices[ex < 0, 0] == torch.arange(300)[ex < 0]).all())  # not excluded: itself first


def test_crowded_rows_are_searched_again_and_stay_exact():
    """Keys so alike that more than ``cap`` of them sit inside a row's error band: the row is not
    certified, bf16_topk hands it back, and topk_search's float32 pass makes it exact."""
    q = clustered(50, 64, 5, 0.02)
    keys = clustered(10, 64, 5, 0.02).repeat(300, 1)  # every key 300 times: ties fill any band
    stats = {}
    _, _, redo = bf16_topk(q, keys, 5, block=16, key_factor=KEY_BLOCK_FACTOR, cap=8)
    assert len(redo) > 0
    a, _, _ = topk_search(q, keys, 5, block=16, prepared=True, precision="bf16", stats=stats)
    b, _, _ = topk_search(q, keys, 5, block=16, prepared=True, precision="fp32")
    assert stats["redone"] > 0
    assert stats["gave_up_at_row"] == 16  # after the first block of 16 rows, the rest went to float32
    stats = {}
    many = clustered(600, 64, 6, 0.02)
    c, _, _ = topk_search(many, keys, 5, block=1024, prepared=True, precision="bf16", stats=stats)
    assert stats["gave_up_at_row"] == 64  # the first (pilot) block is min(64, block) rows
    assert torch.equal(c.values, topk_search(many, keys, 5, block=1024, prepared=True, precision="fp32")[0].values)
    assert torch.equal(a.indices, b.indices)
    assert torch.allclose(a.values, b.values, atol=1e-6, rtol=0)


def test_random_rows_are_certified_with_few_rescored_keys():
    q, keys = unit(256, 128, 6), unit(20000, 128, 7)
    stats = {}
    a, _, _ = topk_search(q, keys, 10, prepared=True, precision="bf16", stats=stats)
    b, _, _ = topk_search(q, keys, 10, prepared=True, precision="fp32")
    assert torch.equal(a.indices, b.indices)
    assert stats["redone"] == 0
    # the band keeps a few tens of keys per row out of 20000: re-scoring is cheap
    assert 10 <= stats["rescored"] / 256 < 100


def test_cut_rows_keep_at_least_k_finite_values():
    q, keys = unit(20, 32, 8), unit(100, 32, 9)
    v, i, redo = bf16_topk(q, keys, 10, block=8, key_factor=2, cap=1000)
    assert len(redo) == 0
    assert bool(torch.isfinite(v).all()) and bool((i >= 0).all())
    assert bool((v[:, :-1] >= v[:, 1:]).all())  # sorted, descending


def test_threshold_rounds_down_and_handles_minus_inf():
    low = torch.tensor([0.3, -0.2, -math.inf, 1e-9], dtype=torch.float64)
    delta = torch.full((4,), 0.004, dtype=torch.float64)
    th = prefilter._threshold(low, delta)
    assert th.dtype == torch.float32
    assert math.isinf(float(th[2])) and float(th[2]) < 0
    for a, lo, d in zip(th[[0, 1, 3]].double(), low[[0, 1, 3]], delta[[0, 1, 3]]):
        # a key scoring just below the threshold cannot reach the lower bound
        below = float(torch.nextafter(a.float(), torch.tensor(-math.inf)))
        assert below + float(d) + U * abs(below) < float(lo)


def test_resolve_precision(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setattr(prefilter, "bf16_faster", lambda: (True, "test"))
    assert resolve_precision("auto", "cosine", cpu, size=FULL_AUTO_MAX) == "bf16"
    assert resolve_precision("auto", "cosine", cpu, size=FULL_AUTO_MAX - 1) == "fp32"  # small: fp32 is fast
    assert resolve_precision("auto", "cosine", cpu, matrix=True, size=10 ** 9) == "fp32"
    assert resolve_precision("auto", "l2", cpu, size=10 ** 9) == "fp32"
    assert resolve_precision("auto", "cosine", torch.device("cuda"), size=10 ** 9) == "fp32"
    assert resolve_precision("bf16", "cosine", cpu, size=10) == "bf16"
    assert resolve_precision("bf16", "cosine", cpu, matrix=True) == "fp32"  # a stored matrix is float32
    monkeypatch.setattr(prefilter, "bf16_faster", lambda: (False, "test"))
    assert resolve_precision("auto", "cosine", cpu, size=10 ** 9) == "fp32"  # bf16 slower on this CPU
    with pytest.raises(GanprintError, match="--precision bf16 works with --metric cosine only"):
        resolve_precision("bf16", "l2", cpu)
    with pytest.raises(GanprintError, match="CPU path"):
        resolve_precision("bf16", "cosine", torch.device("cuda"))
    with pytest.raises(GanprintError, match="--precision half: unknown; use one of auto, fp32, bf16"):
        resolve_precision("half", "cosine", cpu)


def test_compute_similarity_same_tensors_in_both_precisions():
    gen, real = unit(700, 40, 10, "wide"), unit(120, 40, 11, "wide")
    a = compute_similarity(gen, real, k=4, full=False, precision="bf16", block=32)
    b = compute_similarity(gen, real, k=4, full=False, precision="fp32", block=32)
    assert a.keys() == b.keys()
    for name in a:
        if name.endswith("indices"):
            assert torch.equal(a[name], b[name]), name
        else:
            assert torch.allclose(a[name], b[name], atol=1e-6, rtol=0), name


def test_cnn_like_embeddings_match_float64_truth():
    """Non-negative features crowding around one direction (cosines ~0.65 +- 0.01, like pooled
    CNN features): centring keeps the band narrow, every row is certified, and the top-k is the
    float64 one."""
    g = torch.Generator().manual_seed(12)
    base = torch.randn(1, 256, generator=g).abs()

    def feats(n):
        return torch.nn.functional.normalize(torch.relu(base + torch.randn(n, 256, generator=g)), dim=1)

    q, keys = feats(200), feats(6000)
    cos = q @ keys.t()
    assert float(cos.mean()) > 0.5 and float(cos.std()) < 0.05
    stats = {}
    a, _, _ = topk_search(q, keys, 10, block=64, prepared=True, precision="bf16", stats=stats)
    assert stats["redone"] == 0
    truth = (q.double() @ keys.double().t()).topk(10, dim=1)
    assert torch.equal(a.indices.sort(1).values, truth.indices.sort(1).values)
    assert torch.allclose(a.values.double(), truth.values, atol=1e-6, rtol=0)


def test_keys_prepared_once_serve_every_query_slice(monkeypatch):
    """One prepare_keys for the whole search; slices of queries searched with it = one search."""
    q, keys = unit(300, 64, 20), unit(3000, 64, 21)
    whole, _, _ = topk_search(q, keys, 10, block=32, prepared=True, precision="bf16")
    calls = []
    real_prepare = prefilter.prepare_keys
    monkeypatch.setattr(prefilter, "prepare_keys", lambda x: calls.append(len(x)) or real_prepare(x))
    pk = prefilter.prepare_keys(keys)
    parts = [topk_search(q[s:s + 70], keys, 10, block=32, prepared=True, precision="bf16", key_prep=pk)[0]
             for s in range(0, 300, 70)]
    assert calls == [3000]  # the keys were centred and rounded once, not once per slice
    assert torch.equal(torch.cat([p.indices for p in parts]), whole.indices)
    assert torch.equal(torch.cat([p.values for p in parts]), whole.values)
    with pytest.raises(ValueError, match="prepared keys"):
        bf16_topk(q, keys[:100], 5, block=32, key_factor=4, prepared=pk)


def test_bf16_rule():
    """auto's CPU rule: bf16 only where its products beat float32 (AMX; AMD AVX512-BF16)."""
    assert prefilter.bf16_rule("GenuineIntel", True, True)[0]
    assert prefilter.bf16_rule("AuthenticAMD", True, False)[0]
    assert not prefilter.bf16_rule("GenuineIntel", True, False)[0]  # vdpbf16ps at half the FMA rate
    assert not prefilter.bf16_rule("AuthenticAMD", False, False)[0]
    assert not prefilter.bf16_rule("", False, False)[0]
    f = prefilter.cpu_features()
    assert set(f) == {"vendor", "avx512_bf16", "amx_bf16"}
    assert prefilter.bf16_faster() == prefilter.bf16_rule(**f)  # deterministic: no timing in it
