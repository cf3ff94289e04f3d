"""ganprint.fusion: the mixture of experts (consistent forward, gate, training, artifacts) and stacking."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from ganprint.artifacts import base_provenance, read_artifact, write_artifact
from ganprint.errors import GanprintError

# small model + 1 thread: each training run takes about a second even on a busy 2-core machine
SMALL = dict(dim=32, gate_hidden=64, heads=8, batch_size=16, threads=1)
N_GEN, N_USED, N_NOT = 24, 12, 12


def make_expert(path, backbone, d, seed, noise, order=None, n_rows=None):
    """An embeddings artifact of a tiny dev set: generated images are noisy copies of real_used ones
    (``noise`` sets how visible that is in this expert's features)."""
    g = torch.Generator().manual_seed(seed)
    used = torch.randn(N_USED, d, generator=g)
    notused = torch.randn(N_NOT, d, generator=g)
    gen = used[torch.arange(N_GEN) % N_USED] + noise * torch.randn(N_GEN, d, generator=g)
    x = torch.cat([gen, used, notused])
    subsets = ["generated"] * N_GEN + ["real_used"] * N_USED + ["real_not_used"] * N_NOT
    ids = [f"{s}_{i:03d}" for i, s in enumerate(subsets)]
    table = pd.DataFrame({
        "row": range(len(ids)), "image_id": ids, "path": [f"/data/{i}.png" for i in ids], "relpath": ids,
        "subset": subsets, "split": "dev",
        "label": pd.array([None] * N_GEN + [1] * N_USED + [0] * N_NOT, dtype="Int8"),
        "sha256": [f"{i:064x}" for i in range(len(ids))], "width": 32, "height": 32,
    })
    if order is not None:
        x, table = x[order], table.iloc[order].reset_index(drop=True)
    if n_rows is not None:
        x, table = x[:n_rows], table.iloc[:n_rows].reset_index(drop=True)
    prov = base_provenance("embeddings", "embed", backbone=backbone, timm_name=backbone, weights="imagenet",
                           weights_source="test", weights_digest="digest-" + backbone,
                           preprocess={"size": 32, "mean": [0.5], "std": [0.5]}, dim=d, checkpoint=None,
                           inputs_hash="inputs", rows=len(table), seed=0, device="cpu", skipped=0,
                           subsets=sorted(set(subsets)))
    return write_artifact(path, {"embeddings": x.contiguous()}, table, prov, table_meta={"skipped": []})


@pytest.fixture
def experts(tmp_path):
    return [make_expert(tmp_path / "e_a", "alpha", 24, 0, 0.5),
            make_expert(tmp_path / "e_b", "beta", 40, 1, 2.0)]


# ---------------------------------------------------------------------------------------------
# model


def test_gate_sums_to_one_and_outputs_are_normalised():
    from ganprint.fusion.moe import MoEFusion

    torch.manual_seed(0)
    model = MoEFusion([24, 40, 16], dim=32, gate_hidden=64, heads=8)
    feats = [torch.randn(10, 24) * 5, torch.randn(10, 40), torch.randn(10, 16) + 3]
    out = model(feats)
    assert out.gate.shape == (10, 3) and out.z.shape == (10, 32) and out.tau.shape == (10,)
    assert torch.allclose(out.gate.sum(1), torch.ones(10), atol=1e-6)
    assert bool((out.gate > 0).all())
    assert torch.allclose(out.z.norm(dim=1), torch.ones(10), atol=1e-5)
    assert bool(((out.tau > 0.05) & (out.tau < 0.2)).all())
    # the attention is on the path: changing its weights changes the output
    with torch.no_grad():
        model.attn.out.weight.add_(0.5)
    assert not torch.allclose(model(feats).z, out.z)


def test_train_and_inference_forward_agree():
    from ganprint.fusion.moe import MoEFusion, fuse_features

    torch.manual_seed(1)
    model = MoEFusion([24, 40], dim=32, gate_hidden=64, heads=8)
    feats = [torch.randn(37, 24), torch.randn(37, 40)]
    model.train()
    z_train = model(feats)
    inf = fuse_features(model, feats)
    inf_chunked = fuse_features(model, feats, batch_size=8)
    model.eval()
    z_eval = model(feats)
    for a, b in ((z_train.z, inf.z), (z_train.gate, inf.gate), (z_train.tau, inf.tau), (z_eval.z, inf.z)):
        assert torch.allclose(a, b, atol=1e-6)
    assert torch.allclose(inf.z, inf_chunked.z, atol=1e-6)


def test_every_parameter_is_trained(experts, tmp_path):
    """All projections, gate, attention and tau head move after one optimizer step."""
    from ganprint.fusion.moe import MoEFusion, load_moe, train_moe

    train_moe(experts, tmp_path / "w1", steps=1, warmup_steps=0, **SMALL)
    trained, meta = load_moe(tmp_path / "w1.safetensors")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        init = MoEFusion([24, 40], dim=32, gate_hidden=64, heads=8)
    init_state = init.state_dict()
    same = [k for k, v in trained.state_dict().items() if torch.equal(v, init_state[k])]
    assert same == []
    assert meta["model"]["in_dims"] == [24, 40]


# ---------------------------------------------------------------------------------------------
# training, artifacts, apply


def test_short_training_decreases_loss_and_writes_artifacts(experts, tmp_path):
    from ganprint.fusion.moe import train_moe

    res = train_moe(experts, tmp_path / "w", out=tmp_path / "fused", steps=30, **SMALL)
    assert res.loss_end < res.loss_start * 0.8, (res.loss_start, res.loss_end)
    assert np.mean(res.history[-5:]) < np.mean(res.history[:5])
    assert len(res.mean_gate) == 2 and abs(sum(res.mean_gate) - 1) < 1e-4
    assert res.weights == tmp_path / "w.safetensors" and res.weights.exists()

    fused = read_artifact(tmp_path / "fused", kind="embeddings")
    src = read_artifact(experts[0], kind="embeddings")
    assert fused.tensor("embeddings").shape == (N_GEN + N_USED + N_NOT, 32)
    pd.testing.assert_frame_equal(fused.table, src.table)
    p = fused.provenance
    assert p["backbone"] == "moe(alpha+beta)"
    assert p["weights_digest"] == res.digest == p["checkpoint"]["digest"]
    assert p["dim"] == 32 and p["stage"] == "fuse" and p["inputs_hash"] == "inputs"
    assert [e["backbone"] for e in p["fusion"]["experts"]] == ["alpha", "beta"]

    # same inputs + seed -> same weights and embeddings
    res2 = train_moe(experts, tmp_path / "w2", out=tmp_path / "fused2", steps=30, **SMALL)
    assert res2.digest == res.digest
    assert torch.equal(read_artifact(tmp_path / "fused2").tensor("embeddings"), fused.tensor("embeddings"))


def test_momentum_keys_and_queue_train(experts, tmp_path):
    from ganprint.fusion.moe import train_moe

    res = train_moe(experts, tmp_path / "w", steps=20, key_encoder="momentum", momentum=0.9, queue_size=32,
                    neg_per_anchor=4, sim_threshold=-1.0, **SMALL)
    assert res.loss_end < res.loss_start
    assert "not selective" in res.pools["warning"] and res.pools["min"] == N_USED


def test_apply_reproduces_training_fusion_and_checks_experts(experts, tmp_path):
    from ganprint.fusion.moe import apply_moe, train_moe

    res = train_moe(experts, tmp_path / "w", out=tmp_path / "fused", steps=5, **SMALL)
    app = apply_moe(res.weights, experts, tmp_path / "applied")
    a = read_artifact(tmp_path / "applied", kind="embeddings")
    b = read_artifact(tmp_path / "fused", kind="embeddings")
    assert torch.equal(a.tensor("embeddings"), b.tensor("embeddings"))
    assert app.mean_gate == res.mean_gate and app.digest == res.digest
    for key in ("backbone", "weights_digest", "preprocess"):
        assert a.provenance[key] == b.provenance[key]
    assert a.provenance["checkpoint"]["digest"] == b.provenance["checkpoint"]["digest"]

    with pytest.raises(GanprintError, match="expert 1 has backbone beta"):
        apply_moe(res.weights, experts[::-1], tmp_path / "x")
    other = make_expert(tmp_path / "e_c", "gamma", 40, 1, 2.0)
    with pytest.raises(GanprintError, match="e_c.*gamma"):
        apply_moe(res.weights, [experts[0], other], tmp_path / "x")
    with pytest.raises(GanprintError, match="trained on 2 experts"):
        apply_moe(res.weights, [experts[0], experts[1], experts[1]], tmp_path / "x")
    with pytest.raises(GanprintError, match="not found"):
        apply_moe(tmp_path / "nope.safetensors", experts, tmp_path / "x")


def test_mismatched_manifests_refused(experts, tmp_path):
    from ganprint.fusion.moe import apply_moe, train_moe

    n = N_GEN + N_USED + N_NOT
    shuffled = make_expert(tmp_path / "e_shuf", "beta", 40, 1, 2.0, order=list(range(1, n)) + [0])
    with pytest.raises(GanprintError) as exc:
        train_moe([experts[0], shuffled], tmp_path / "w", steps=1, **SMALL)
    msg = str(exc.value)
    assert "e_a" in msg and "e_shuf" in msg and "row 0" in msg and "\n" not in msg
    short = make_expert(tmp_path / "e_short", "beta", 40, 1, 2.0, n_rows=n - 3)
    with pytest.raises(GanprintError, match="e_a and .*e_short.*rows"):
        train_moe([experts[0], short], tmp_path / "w", steps=1, **SMALL)
    res = train_moe(experts, tmp_path / "w", steps=1, **SMALL)
    with pytest.raises(GanprintError, match="manifests differ"):
        apply_moe(res.weights, [experts[0], shuffled], tmp_path / "x")
    with pytest.raises(GanprintError, match="at least 2"):
        train_moe(experts[:1], tmp_path / "w", steps=1, **SMALL)


def test_training_needs_the_dev_subsets(tmp_path):
    from ganprint.fusion.moe import train_moe

    n = N_GEN + N_USED  # no real_not_used rows
    a = make_expert(tmp_path / "a", "alpha", 24, 0, 0.5, n_rows=n)
    b = make_expert(tmp_path / "b", "beta", 40, 1, 2.0, n_rows=n)
    with pytest.raises(GanprintError, match="no 'real_not_used' images"):
        train_moe([a, b], tmp_path / "w", steps=1, **SMALL)
    with pytest.raises(GanprintError, match="divisible by heads"):
        train_moe([a, b], tmp_path / "w", steps=1, dim=30, heads=8)


def test_positive_pools_threshold_and_top_up():
    from ganprint.fusion.moe import positive_pools

    used = [torch.eye(4), torch.eye(4)]
    gen = [torch.tensor([[1.0, 0.9, 0, 0], [0, 0, 0, 1.0]]), torch.tensor([[1.0, 0.9, 0, 0], [0, 0, 0, 1.0]])]
    order, size = positive_pools(gen, used, threshold=0.6, min_pos=1)
    assert size.tolist() == [2, 1]
    assert order[0, :2].tolist() == [0, 1] and order[1, 0].item() == 3
    _, size = positive_pools(gen, used, threshold=0.99, min_pos=3)
    assert size.tolist() == [3, 3]


# ---------------------------------------------------------------------------------------------
# stacking


def write_scores(path, ids, scores, labels=None, attack="maxsim", backbone="alpha"):
    table = pd.DataFrame({"image_id": ids, "score": np.asarray(scores, dtype=np.float64),
                          "label_pred": (np.asarray(scores) > np.median(scores)).astype(np.int8)})
    if labels is not None:
        table["label"] = pd.array(labels, dtype="Int8")
    prov = base_provenance("scores", "predict", attack=attack, rule="threshold", threshold=0.0, rows=len(ids),
                           similarity={"real": {"backbone": backbone, "weights_digest": "w-" + backbone}})
    return write_artifact(path, {"scores": torch.as_tensor(np.asarray(scores), dtype=torch.float32)}, table, prov)


@pytest.fixture
def score_sets(tmp_path):
    rng = np.random.default_rng(0)
    n_dev, n_test, f = 60, 25, 3
    y = np.array([0, 1] * (n_dev // 2))
    X_dev = rng.normal(size=(n_dev, f)) + np.outer(y, [2.0, 0.6, 0.0])
    X_dev[:, 2] *= 10  # different scales: standardisation matters
    X_test = rng.normal(size=(n_test, f))
    X_test[:, 2] *= 10
    dev_ids = [f"real_{i:03d}" for i in range(n_dev)]
    test_ids = [f"real_unknown_{i:03d}" for i in range(n_test)]
    feats = [("maxsim", "alpha"), ("gleaks", "alpha"), ("maxsim", "beta")]
    dev, test = [], []
    for j, (att, bb) in enumerate(feats):
        perm = rng.permutation(n_dev) if j else np.arange(n_dev)  # rows in another order: join by image_id
        dev.append(write_scores(tmp_path / f"dev_{j}", [dev_ids[i] for i in perm], X_dev[perm, j], y[perm], att, bb))
        tperm = rng.permutation(n_test) if j == 2 else np.arange(n_test)
        test.append(write_scores(tmp_path / f"test_{j}", [test_ids[i] for i in tperm], X_test[tperm, j], None, att, bb))
    return dict(dev=dev, test=test, X_dev=X_dev, y=y, X_test=X_test, test_ids=test_ids)


def test_stack_reproduces_sklearn(score_sets, tmp_path):
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from ganprint.fusion.stack import stack_scores

    s = score_sets
    res = stack_scores(s["dev"], s["test"], tmp_path / "stacked")
    ref = make_pipeline(StandardScaler(), LogisticRegression()).fit(s["X_dev"], s["y"])
    np.testing.assert_allclose(res.coef, ref[-1].coef_[0], rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(res.intercept, ref[-1].intercept_[0], rtol=1e-6, atol=1e-8)
    p_ref = ref.predict_proba(s["X_test"])[:, 1]

    art = read_artifact(tmp_path / "stacked", kind="scores")
    assert art.table["image_id"].tolist() == s["test_ids"]
    np.testing.assert_allclose(art.table["score"].to_numpy(), p_ref, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(art.tensor("scores").numpy(), p_ref, rtol=1e-5, atol=1e-6)
    assert art.table["label_pred"].tolist() == (p_ref >= 0.5).astype(int).tolist()
    assert "label" not in art.table.columns
    assert res.features == ["maxsim@alpha", "gleaks@alpha", "maxsim@beta"]
    assert res.rule == "prob" and res.threshold == 0.5
    assert art.provenance["attack"] == "stack" and art.provenance["rule"] == "threshold"
    assert res.dev_cv_auc is not None and res.dev_fit_auc > 0.7
    assert res.coef[0] > abs(res.coef[2])  # the informative feature dominates


def test_stack_kappa_rule_uses_out_of_fold_cut(score_sets, tmp_path):
    from ganprint.fusion.stack import stack_scores

    s = score_sets
    res = stack_scores(s["dev"], s["test"], tmp_path / "stacked", rule="kappa")
    art = read_artifact(tmp_path / "stacked", kind="scores")
    assert art.provenance["rule"] == "calibrate" and art.provenance["threshold"] == res.threshold
    assert art.table["label_pred"].tolist() == (art.table["score"] >= res.threshold).astype(int).tolist()
    again = stack_scores(s["dev"], s["test"], tmp_path / "stacked2", rule="kappa")
    assert again.threshold == res.threshold and again.dev_cv_kappa == res.dev_cv_kappa


def test_stack_refusals(score_sets, tmp_path):
    from ganprint.fusion.stack import stack_scores

    s = score_sets
    ids = s["test_ids"][:-1] + ["someone_else"]
    odd = write_scores(tmp_path / "odd", ids, s["X_test"][:, 1], None, "gleaks", "alpha")
    with pytest.raises(GanprintError, match="test_0 and .*odd: test scores cover different images"):
        stack_scores(s["dev"], [s["test"][0], odd, s["test"][2]], tmp_path / "x")
    with pytest.raises(GanprintError, match="different features"):
        stack_scores(s["dev"], s["test"][::-1], tmp_path / "x")
    with pytest.raises(GanprintError, match="one test artifact per dev artifact"):
        stack_scores(s["dev"], s["test"][:2], tmp_path / "x")
    with pytest.raises(GanprintError, match="no label column"):
        stack_scores(s["test"], s["test"], tmp_path / "x")
    emb = make_expert(tmp_path / "emb", "alpha", 8, 0, 1.0)
    with pytest.raises(GanprintError, match="expected 'scores'"):
        stack_scores([emb], [s["test"][0]], tmp_path / "x")
