"""predict: decision rules, calibration on a dev artifact, scores artifact + submission CSV."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import cohen_kappa_score
from test_similarity import make_emb  # same folder, pytest puts it on sys.path

from ganprint.artifacts import read_artifact
from ganprint.errors import ArtifactError, GanprintError
from ganprint.predict import (
    calibrate_threshold,
    decide_quantile,
    decide_threshold,
    predict,
    run_predict,
)
from ganprint.similarity import run_simmatrix
from ganprint.submission import SubmissionError

SUBSETS = ["generated"] * 30 + ["real_used"] * 5 + ["real_not_used"] * 5


def _sim(tmp_path, name="dev", seed=0, **kw):
    """Members are near-copies of generated images, so the attack has signal."""
    rng = np.random.default_rng(seed)
    gen = rng.normal(size=(30, 6))
    used = gen[:5] + 0.1 * rng.normal(size=(5, 6))
    x = np.concatenate([gen, used, rng.normal(size=(5, 6))])
    emb = make_emb(tmp_path / f"{name}_emb", x, SUBSETS, ids=[f"{name}_{i:03d}" for i in range(40)], **kw)
    return run_simmatrix(tmp_path / f"{name}_sim", dataset=emb, k=3, device="cpu").base


def test_threshold_rule():
    assert decide_threshold([0.1, 0.6, 0.7], 0.6).tolist() == [0, 1, 1]
    with pytest.raises(GanprintError):
        decide_threshold([0.1], float("nan"))


def test_quantile_rule_counts_and_breaks_ties_by_id_not_order():
    labels, thr = decide_quantile([0.1, 0.9, 0.5, 0.3], 0.5)
    assert labels.tolist() == [0, 1, 1, 0] and thr == 0.5
    assert decide_quantile([1, 2, 3, 4, 5], 0.5)[0].sum() == 3  # round half up: the top half
    assert decide_quantile([1, 2, 3], 1.0)[0].sum() == 0
    ids = [f"img_{i}" for i in range(40)]
    lab, _ = decide_quantile(np.zeros(40), 0.5, ids)
    assert lab.sum() == 20
    assert lab[:20].sum() != 20  # not simply the first half of the input order
    assert decide_quantile(np.zeros(40), 0.5, ids)[0].tolist() == lab.tolist()  # deterministic
    with pytest.raises(GanprintError, match="--quantile"):
        decide_quantile([1.0], 1.5)


def test_calibration_maximises_dev_kappa_by_hand():
    s = np.array([0.1, 0.2, 0.3, 0.4, 0.5, 0.6])
    y = np.array([0, 0, 1, 0, 1, 1])
    thr, kap = calibrate_threshold(s, y)
    # best: label 1 for s >= 0.5 (kappa 2/3) or s >= 0.3 (kappa 2/3): middle of equals -> one of them
    best = max(cohen_kappa_score(y, (s >= c).astype(int)) for c in s)
    assert kap == pytest.approx(best)
    assert cohen_kappa_score(y, (s >= thr).astype(int)) == pytest.approx(best)
    assert thr not in s  # a midpoint between two dev scores
    thr2, kap2 = calibrate_threshold([0.2, 0.8], [0, 1])
    assert 0.2 < thr2 <= 0.8 and kap2 == pytest.approx(1.0)
    with pytest.raises(GanprintError, match="both"):
        calibrate_threshold([0.1, 0.2], [1, 1])


def test_rule_is_required_and_unique(tmp_path):
    sim = _sim(tmp_path)
    with pytest.raises(GanprintError, match="choose a decision rule"):
        predict(sim)
    with pytest.raises(GanprintError, match="--threshold and --balanced"):
        predict(sim, threshold=0.5, balanced=True)


def test_run_predict_writes_scores_artifact_and_submission(tmp_path):
    sim = _sim(tmp_path)
    res = run_predict(sim, tmp_path / "scores", "max_sim", balanced=True)
    art = read_artifact(res.base, kind="scores")
    t = art.table
    # labelled non-members among the real images: conformal p-values against them (leave-one-out)
    assert list(t.columns) == ["image_id", "score", "label_pred", "label", "pvalue", "qvalue"]
    assert t["label_pred"].sum() == 5 and t["label"].tolist() == [1] * 5 + [0] * 5
    assert art.tensors["scores"].shape == (10,)
    p = art.provenance
    assert (p["attack"], p["rule"], p["quantile"]) == ("max_sim", "balanced", 0.5)
    assert p["similarity"]["kind"] == "similarity"
    assert res.submission == tmp_path / "scores.csv"
    lines = res.submission.read_text().splitlines()
    assert len(lines) == 10 and lines[0].startswith("dev_030,")
    assert {ln.split(",")[1] for ln in lines} <= {"0", "1"}
    # near-copies of generated images score highest: the members are found
    assert t["label_pred"].tolist() == t["label"].tolist()


def test_calibrate_on_dev_applies_to_test(tmp_path):
    dev, test = _sim(tmp_path, "dev", 0), _sim(tmp_path, "test", 1)
    pred = predict(test, "gan_leaks", calibrate=dev)
    d = pred.decision
    assert d.rule == "calibrate" and d.dev_kappa == pytest.approx(1.0) and d.dev["n"] == 10
    assert pred.labels.tolist() == (pred.scores >= d.threshold).astype(int).tolist()


def test_calibrate_refuses_other_backbone_or_unlabelled_dev(tmp_path):
    dev = _sim(tmp_path, "dev", 0, backbone="test_vit")
    test = _sim(tmp_path, "test", 1)
    with pytest.raises(ArtifactError, match="not comparable"):
        predict(test, calibrate=dev)
    rng = np.random.default_rng(2)
    emb = make_emb(tmp_path / "u", rng.normal(size=(12, 6)), ["generated"] * 8 + ["real_unknown"] * 4)
    unl = run_simmatrix(tmp_path / "u_sim", dataset=emb, device="cpu").base
    with pytest.raises(GanprintError, match="no labels"):
        predict(test, calibrate=unl)


def test_invalid_submission_writes_nothing(tmp_path):
    rng = np.random.default_rng(3)
    ids = [f"g{i}" for i in range(8)] + ["dup", "dup", "x.y"]
    emb = make_emb(tmp_path / "e", rng.normal(size=(11, 4)), ["generated"] * 8 + ["real_unknown"] * 3, ids=ids)
    sim = run_simmatrix(tmp_path / "s", dataset=emb, device="cpu").base
    with pytest.raises(SubmissionError) as ei:
        run_predict(sim, tmp_path / "scores", threshold=0.5)
    assert ei.value.rule == "duplicate"
    assert not (tmp_path / "scores.safetensors").exists() and not (tmp_path / "scores.csv").exists()


def test_header_variant_and_custom_path(tmp_path):
    sim = _sim(tmp_path)
    res = run_predict(sim, tmp_path / "scores", "topk_mean", {"k": 2}, threshold=0.0, header=True,
                      submission=tmp_path / "run1.csv")
    assert res.submission.read_text().startswith("original_image,label\n")
    assert read_artifact(res.base).provenance["params"] == {"k": 2}


def test_same_inputs_same_outputs(tmp_path):
    sim = _sim(tmp_path)
    a = run_predict(sim, tmp_path / "a", "domias", balanced=True)
    b = run_predict(sim, tmp_path / "b", "domias", balanced=True)
    assert a.submission.read_bytes() == b.submission.read_bytes()
    assert (tmp_path / "a.safetensors").read_bytes() == (tmp_path / "b.safetensors").read_bytes()


def _outputs(folder):
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(("pred", ".pred")))


def test_predict_is_all_or_nothing(tmp_path, monkeypatch):
    import errno
    import os

    import ganprint.predict as P

    sim = _sim(tmp_path)
    calls = []
    real_predict = P.predict
    monkeypatch.setattr(P, "predict", lambda *a, **k: calls.append(1) or real_predict(*a, **k))
    # the submission folder is missing: refused before any work, nothing written
    with pytest.raises(GanprintError, match="folder does not exist"):
        run_predict(sim, tmp_path / "pred", "max_sim", balanced=True, submission=tmp_path / "nope" / "s.csv")
    assert calls == [] and _outputs(tmp_path) == []
    # the disk fills while the CSV is written: no scores artifact either, no temp file
    real_fdopen = os.fdopen

    class Full:
        def __init__(self, fh):
            self.fh = fh

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.fh.close()

        def write(self, text):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fdopen", lambda fd, *a, **k: Full(real_fdopen(fd, *a, **k)))
    with pytest.raises(GanprintError, match="No space left on device"):
        run_predict(sim, tmp_path / "pred", "max_sim", balanced=True)
    monkeypatch.setattr(os, "fdopen", real_fdopen)
    assert _outputs(tmp_path) == []
    # and a full disk on the artifact leaves no CSV
    import safetensors.torch

    def full(*a, **k):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    with pytest.raises(GanprintError, match="No space left on device"):
        run_predict(sim, tmp_path / "pred", "max_sim", balanced=True)
    assert _outputs(tmp_path) == []
    monkeypatch.undo()
    run_predict(sim, tmp_path / "pred", "max_sim", balanced=True)
    assert _outputs(tmp_path) == ["pred.csv", "pred.parquet", "pred.safetensors"]


def _edit_provenance(base, edit):
    """Rewrite an artifact's provenance in both files, keeping its tensors and pair_id (an edit by hand)."""
    import json

    import pyarrow.parquet as pq
    from safetensors import safe_open
    from safetensors.torch import save_file

    tpath, ppath = str(base) + ".safetensors", str(base) + ".parquet"
    with safe_open(tpath, framework="pt") as fh:
        tensors = {k: fh.get_tensor(k) for k in fh.keys()}
        prov = json.loads(fh.metadata()["ganprint"])
    edit(prov)
    save_file(tensors, tpath, metadata={"ganprint": json.dumps(prov, sort_keys=True)})
    t = pq.read_table(ppath)
    meta = dict(t.schema.metadata)
    meta[b"ganprint"] = json.dumps(prov, sort_keys=True).encode()
    pq.write_table(t.replace_schema_metadata(meta), ppath)


@pytest.mark.parametrize("which", ["other", "smaller"])
def test_edited_provenance_cannot_redirect_the_embeddings(tmp_path, which):
    from ganprint.artifacts import read_provenance

    sim = _sim(tmp_path, "dev")
    rng = np.random.default_rng(9)
    n = 40 if which == "other" else 12
    other = make_emb(tmp_path / "other_emb", rng.normal(size=(n, 6)), (SUBSETS if n == 40 else ["generated"] * 12))
    oprov = read_provenance(other)

    def redirect(prov):
        for role in ("generated", "real"):
            prov[role]["path"] = str(other)
            prov[role]["pair_id"] = oprov["pair_id"]

    before = run_predict(sim, tmp_path / "a", "domias", balanced=True).prediction.labels.tolist()
    _edit_provenance(sim, redirect)
    with pytest.raises(ArtifactError, match="corrupt or edited"):
        run_predict(sim, tmp_path / "b", "domias", balanced=True)
    assert before and not list(tmp_path.glob("b.*"))
