"""Similarity: streaming exact top-k vs the full matrix, artifacts, comparability checks."""

from __future__ import annotations

import sys

import numpy as np
import pandas as pd
import pytest
import torch

from ganprint.artifacts import base_provenance, read_artifact, write_artifact
from ganprint.errors import ArtifactError, GanprintError
from ganprint.similarity import (
    check_comparable,
    compute_similarity,
    count_at_least,
    faiss_topk,
    run_simmatrix,
    topk_search,
)

PREP = {"size": 32, "mean": [0.5] * 3, "std": [0.5] * 3, "interpolation": "bicubic", "color": "rgb"}


def make_emb(path, x, subsets, labels=None, ids=None, backbone="test_resnet", weights_digest="w0",
             checkpoint=None, preprocess=None, sha=None):
    """A minimal embeddings artifact like `ganprint embed` writes."""
    x = torch.as_tensor(np.asarray(x), dtype=torch.float32)
    n = len(x)
    ids = ids or [f"{s or 'img'}_{i:03d}" for i, s in enumerate(subsets)]
    if labels is None:
        labels = [{"real_used": 1, "real_not_used": 0}.get(s) for s in subsets]
    table = pd.DataFrame({
        "row": np.arange(n), "image_id": ids, "path": [f"/x/{i}.png" for i in ids],
        "relpath": [f"{i}.png" for i in ids], "subset": subsets, "split": [None] * n,
        "label": pd.array(labels, dtype="Int8"), "sha256": sha or [f"h{i}" for i in ids],
        "width": [32] * n, "height": [32] * n,
    })
    prov = base_provenance("embeddings", "embed", backbone=backbone, timm_name=backbone, weights="none",
                           weights_source="seeded", weights_digest=weights_digest,
                           preprocess=preprocess or PREP, dim=int(x.shape[1]), checkpoint=checkpoint,
                           inputs_hash="ih", seed=0, device="cpu", cache_key="ck", skipped=0,
                           subsets=sorted({str(s) for s in subsets}), rows=n)
    return write_artifact(path, {"embeddings": x}, table, prov)


def _naive(q, k, metric):
    if metric == "cosine":
        q, k = torch.nn.functional.normalize(q, dim=1), torch.nn.functional.normalize(k, dim=1)
        return q @ k.t()
    return -torch.cdist(q.double(), k.double()).float()


@pytest.mark.parametrize("metric", ["cosine", "l2"])
@pytest.mark.parametrize("nq,nk,block,chunk", [(130, 1500, 64, 8), (157, 450, 50, 4), (40, 25, 7, 2), (64, 64, 1000, 64)])
def test_streaming_topk_equals_full_matrix(metric, nq, nk, block, chunk):
    g = torch.Generator().manual_seed(nq * 7 + nk)
    q, keys = torch.randn(nq, 12, generator=g), torch.randn(nk, 12, generator=g)
    sim = _naive(q, keys, metric)
    for k in (1, 5):
        res, kres, full = topk_search(q, keys, k, metric=metric, block=block, chunk=chunk, key_k=k, matrix=True)
        ref = sim.topk(k, dim=1)
        assert torch.equal(res.indices, ref.indices)
        assert torch.allclose(res.values, ref.values, atol=1e-4)
        kref = sim.t().topk(k, dim=1)
        assert torch.equal(kres.indices, kref.indices)
        assert torch.allclose(kres.values, kref.values, atol=1e-4)
        assert full.shape == (nk, nq) and torch.allclose(full, sim.t(), atol=1e-4)


def test_exclude_skips_one_pair_per_row():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(90, 8, generator=g)
    res, _, _ = topk_search(x, x, 3, block=16, chunk=4, exclude=torch.arange(90))
    sim = _naive(x, x, "cosine")
    sim.fill_diagonal_(-float("inf"))
    assert torch.equal(res.indices, sim.topk(3, dim=1).indices)
    assert not (res.indices == torch.arange(90)[:, None]).any()


def test_count_at_least_matches_matrix():
    g = torch.Generator().manual_seed(2)
    q, keys = torch.randn(50, 6, generator=g), torch.randn(333, 6, generator=g)
    for metric in ("cosine", "l2"):
        sim = _naive(q, keys, metric)
        thr = sim.max(1).values - 0.3
        got = count_at_least(q, keys, thr, metric=metric, block=20)
        assert torch.equal(got, (sim >= thr[:, None]).sum(1))


def test_faiss_engine_matches_torch():
    pytest.importorskip("faiss")
    g = torch.Generator().manual_seed(3)
    q, keys = torch.randn(60, 16, generator=g), torch.randn(400, 16, generator=g)
    for metric in ("cosine", "l2"):
        a, _, _ = topk_search(q, keys, 4, metric=metric, block=16)
        b = faiss_topk(q, keys, 4, metric=metric)
        assert torch.equal(a.indices, b.indices)
        assert torch.allclose(a.values, b.values, atol=1e-4)
    ex = torch.randint(0, 400, (60,), generator=g)
    a, _, _ = topk_search(q, keys, 4, exclude=ex)
    assert torch.equal(a.indices, faiss_topk(q, keys, 4, exclude=ex).indices)


def test_faiss_missing_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "faiss", None)
    with pytest.raises(GanprintError, match="pip install faiss-cpu"):
        faiss_topk(torch.randn(3, 4), torch.randn(5, 4), 2)


def test_compute_similarity_full_auto_and_realref():
    g = torch.Generator().manual_seed(4)
    gen, real, ref = torch.randn(30, 5, generator=g), torch.randn(9, 5, generator=g), torch.randn(7, 5, generator=g)
    t = compute_similarity(gen, real, k=4)
    assert set(t) >= {"real_topk_values", "real_topk_indices", "gen_topk_values", "gen_topk_indices",
                      "matrix", "realref_topk_values", "realref_topk_indices"}
    assert t["matrix"].shape == (30, 9)
    assert torch.allclose(t["matrix"], _naive(gen, real, "cosine"), atol=1e-5)
    assert t["real_topk_values"].shape == (9, 4) and t["gen_topk_values"].shape == (30, 4)
    rr = _naive(real, real, "cosine").fill_diagonal_(-float("inf")).topk(4, dim=1)
    assert torch.equal(t["realref_topk_indices"], rr.indices)
    t2 = compute_similarity(gen, real, ref=ref, ref_exclude=torch.tensor([2] + [-1] * 8), k=4, full=False)
    assert "matrix" not in t2
    d = _naive(real, ref, "cosine")
    d[0, 2] = -float("inf")
    assert torch.equal(t2["realref_topk_indices"], d.topk(4, dim=1).indices)
    with pytest.raises(GanprintError, match="--metric"):
        compute_similarity(gen, real, metric="dot")


def _dataset(tmp_path, name="dev", seed=0, **kw):
    rng = np.random.default_rng(seed)
    subsets = ["generated"] * 20 + ["real_used"] * 4 + ["real_not_used"] * 4
    return make_emb(tmp_path / name, rng.normal(size=(28, 6)), subsets, **kw)


def test_run_simmatrix_dataset_artifact(tmp_path):
    base = _dataset(tmp_path)
    res = run_simmatrix(tmp_path / "sim", dataset=base, k=3, device="cpu")
    art = read_artifact(res.base, kind="similarity")
    assert (res.n_generated, res.n_real, res.k, res.full) == (20, 8, 3, True)
    assert list(art.table.columns) == ["image_id", "subset", "label", "emb_row", "max_sim", "mean_topk"]
    assert art.table["label"].tolist() == [1] * 4 + [0] * 4
    assert art.tensors["gen_rows"].tolist() == list(range(20))
    assert art.tensors["real_rows"].tolist() == list(range(20, 28))
    emb = read_artifact(base).tensors["embeddings"]
    sim = _naive(emb[20:], emb[:20], "cosine")
    assert torch.allclose(art.tensors["real_topk_values"], sim.topk(3, dim=1).values, atol=1e-5)
    assert np.allclose(art.table["max_sim"], sim.max(1).values.numpy(), atol=1e-6)
    p = art.provenance
    assert p["metric"] == "cosine" and p["k"] == 3 and p["generated"]["path"] == str(base.resolve())
    assert p["reference"] is None and p["backbone"] == "test_resnet"


def test_run_simmatrix_separate_artifacts_and_reference(tmp_path):
    rng = np.random.default_rng(5)
    g = make_emb(tmp_path / "g", rng.normal(size=(15, 4)), [None] * 15)
    r = make_emb(tmp_path / "r", rng.normal(size=(6, 4)), [None] * 6, ids=[f"x{i}" for i in range(6)])
    # the reference shares image x1 (same content hash) with the real set; only label-0 rows are used
    ref = make_emb(tmp_path / "ref", rng.normal(size=(5, 4)), ["real_not_used"] * 3 + ["real_used"] * 2,
                   sha=["hx1", "q1", "q2", "q3", "q4"])
    res = run_simmatrix(tmp_path / "sim", generated=g, real=r, reference=ref, k=2, full=False, device="cpu")
    art = read_artifact(res.base)
    assert "matrix" not in art.tensors
    assert art.tensors["ref_rows"].tolist() == [0, 1, 2]
    assert art.tensors["realref_exclude"].tolist() == [-1, 0, -1, -1, -1, -1]
    assert 0 not in art.tensors["realref_topk_indices"][1].tolist()
    assert art.provenance["reference"]["rows"] == 3


@pytest.mark.parametrize("field,value,word", [("backbone", "test_vit", "backbone"),
                                              ("weights_digest", "other", "weights_digest"),
                                              ("checkpoint", {"digest": "abc"}, "checkpoint"),
                                              ("preprocess", {**PREP, "size": 64}, "preprocess")])
def test_mismatched_embeddings_are_refused(tmp_path, field, value, word):
    rng = np.random.default_rng(6)
    g = make_emb(tmp_path / "gen", rng.normal(size=(5, 4)), ["generated"] * 5)
    r = make_emb(tmp_path / "real", rng.normal(size=(3, 4)), ["real_unknown"] * 3, **{field: value})
    with pytest.raises(ArtifactError) as ei:
        run_simmatrix(tmp_path / "sim", generated=g, real=r, device="cpu")
    msg = str(ei.value)
    assert "\n" not in msg and word in msg
    assert "gen.safetensors" in msg and "real.safetensors" in msg
    assert not (tmp_path / "sim.safetensors").exists()


def test_check_comparable_accepts_equal_provenance():
    p = {"backbone": "a", "weights_digest": "w", "preprocess": PREP, "checkpoint": {"digest": "d", "path": "/x"}}
    check_comparable(p, "a", {**p, "checkpoint": {"digest": "d", "path": "/elsewhere"}}, "b")


def test_run_simmatrix_argument_errors(tmp_path):
    base = _dataset(tmp_path)
    with pytest.raises(GanprintError, match="either"):
        run_simmatrix(tmp_path / "s", dataset=base, generated=base, real=base)
    with pytest.raises(GanprintError, match="DATASET"):
        run_simmatrix(tmp_path / "s", generated=base)
    only_gen = make_emb(tmp_path / "og", np.ones((3, 2)), ["generated"] * 3)
    with pytest.raises(GanprintError, match="real_"):
        run_simmatrix(tmp_path / "s", dataset=only_gen)
    with pytest.raises(GanprintError, match="--k"):
        run_simmatrix(tmp_path / "s", dataset=base, k=0)


# ---------------------------------------------------------------------------------------------
# the float32 CPU path: group maxima, single-threaded workers (ganprint.tiles.block_topk)


def _ref_topk(q, keys, k, metric="cosine", exclude=None):
    """float64 truth: (values [Q, k] descending, indices [Q, k]; ties: the lower key index)."""
    qd, kd = q.double(), keys.double()
    if metric == "cosine":
        s = torch.nn.functional.normalize(qd, dim=1) @ torch.nn.functional.normalize(kd, dim=1).T
    else:
        s = -torch.cdist(qd, kd)
    if exclude is not None:
        r = (exclude >= 0).nonzero().squeeze(1)
        s[r, exclude[r]] = -float("inf")
    v, i = torch.sort(s, dim=1, descending=True, stable=True)
    return v[:, :k], i[:, :k]


@pytest.mark.parametrize("metric", ["cosine", "l2"])
@pytest.mark.parametrize("nq,nk,block", [(300, 5000, 64), (5, 3000, 1024), (1, 7, 4), (40, 2600, 16)])
def test_cpu_fp32_topk_equals_float64(metric, nq, nk, block):
    """Group-maximum selection over sub-tiles, tails and key-range splits gives the float64 top-k."""
    g = torch.Generator().manual_seed(nq + nk)
    q, keys = torch.randn(nq, 24, generator=g), torch.randn(nk, 24, generator=g)
    ex = torch.randint(-1, nk, (nq,), generator=g)
    k = min(10, nk - 1)
    for e in (None, ex):
        got, _, _ = topk_search(q, keys, k, metric=metric, block=block, exclude=e, precision="fp32")
        rv, ri = _ref_topk(q, keys, k, metric, e)
        assert torch.allclose(got.values.double(), rv, atol=2e-6)
        gap = (rv[:, :-1] - rv[:, 1:]).abs().min(1).values  # rows without near-ties: indices too
        clear = gap > 1e-5
        assert clear.sum() > 0
        assert torch.equal(got.indices[clear], ri[clear])
        if e is not None:
            assert not (got.indices == e.unsqueeze(1)).any()


def test_cpu_fp32_topk_ties_and_threads():
    """Duplicated keys tie exactly: the lower key index comes first, and the result does not depend
    on the number of threads (each product is one single-threaded call on a fixed tile)."""
    g = torch.Generator().manual_seed(3)
    keys = torch.randn(40000, 16, generator=g)
    keys[30000:30005] = keys[7]  # five exact copies of key 7, after it
    q = torch.cat([keys[7:8] + 0.01 * torch.randn(1, 16, generator=g), torch.randn(99, 16, generator=g)])
    n = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one, _, _ = topk_search(q, keys, 8, precision="fp32", block=64)
        first = topk_search(q[:1], keys, 8, precision="fp32", block=64)[0]
        torch.set_num_threads(2)
        two, _, _ = topk_search(q, keys, 8, precision="fp32", block=64)
        split = topk_search(q[:1], keys, 8, precision="fp32", block=64)[0]  # one query block: key ranges split
    finally:
        torch.set_num_threads(n)
    assert torch.equal(one.indices, two.indices) and torch.equal(one.values, two.values)
    assert torch.equal(first.indices, split.indices) and torch.equal(first.indices, one.indices[:1])
    assert one.indices[0, :6].tolist() == [7, 30000, 30001, 30002, 30003, 30004]
    assert torch.get_num_threads() == n


def test_block_topk_crowded_and_narrow():
    """Every score equal (each group hits) and tiles narrower than a group: still the exact top-k."""
    from ganprint.tiles import block_topk

    n, nk, k = 6, 3000, 5
    for width in (1000, 4096, 100):
        buf = torch.empty(n * width)

        def tile_fn(k0, k1, out):
            out.fill_(0.5)

        v, i = block_topk(n, nk, k, tile_fn, width, buf, sub=256)
        assert torch.equal(v, torch.full((n, k), 0.5))
        assert i.tolist() == [list(range(k))] * n
