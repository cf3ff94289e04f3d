"""Metrics vs scikit-learn; the vectorised bootstrap vs a plain loop; the score stage."""

from __future__ import annotations

import json

import numpy as np
import pytest
from sklearn.metrics import (
    accuracy_score,
    cohen_kappa_score,
    f1_score,
    precision_score,
    recall_score,
    roc_auc_score,
)

from ganprint.errors import GanprintError
from ganprint.metrics import (
    evaluate,
    kappa_from_counts,
    kappa_scan,
    run_score,
    tpr_at_fpr,
    weighted_auc,
)


def _data(seed=0, n=60):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    s = y * 0.8 + rng.normal(size=n)
    s[:6] = np.round(s[:6])  # a few ties
    p = (s > 0.3).astype(int)
    return y, p, s


def test_point_metrics_match_sklearn():
    y, p, s = _data()
    r = evaluate(y, p, s, bootstrap=0)
    assert r["kappa"] == pytest.approx(cohen_kappa_score(y, p))
    assert r["accuracy"] == pytest.approx(accuracy_score(y, p))
    assert r["precision"] == pytest.approx(precision_score(y, p))
    assert r["recall"] == pytest.approx(recall_score(y, p))
    assert r["f1"] == pytest.approx(f1_score(y, p))
    assert r["auc"] == pytest.approx(roc_auc_score(y, s))
    assert (r["n"], r["n_pos"], r["n_pred_pos"]) == (60, int(y.sum()), int(p.sum()))
    assert r["kappa_ci"] is None and r["auc_ci"] is None
    json.dumps(r)


def test_kappa_from_counts_matches_sklearn():
    y, p, _ = _data(1)
    tp, fp = int(((y == 1) & (p == 1)).sum()), int(((y == 0) & (p == 1)).sum())
    fn, tn = int(((y == 1) & (p == 0)).sum()), int(((y == 0) & (p == 0)).sum())
    assert kappa_from_counts(tp, fp, fn, tn) == pytest.approx(cohen_kappa_score(y, p))
    assert np.isnan(kappa_from_counts(0, 0, 0, 10))
    # balanced classes and balanced predictions: kappa = 2 acc - 1
    assert kappa_from_counts(30, 20, 20, 30) == pytest.approx(2 * 0.6 - 1)


def test_weighted_auc_equals_auc_of_resampled_data():
    y, _, s = _data(2)
    rng = np.random.default_rng(0)
    w = rng.multinomial(len(y), np.full(len(y), 1 / len(y)), size=5)
    got = weighted_auc(y, s, w)
    for b in range(5):
        idx = np.repeat(np.arange(len(y)), w[b])
        assert got[b] == pytest.approx(roc_auc_score(y[idx], s[idx]))
    assert weighted_auc(y, s, np.ones(len(y)))[0] == pytest.approx(roc_auc_score(y, s))


def test_bootstrap_cis_equal_a_plain_loop_and_are_seeded():
    y, p, s = _data(3, n=40)
    r = evaluate(y, p, s, bootstrap=60, seed=7)
    rng = np.random.default_rng(7)
    w = rng.multinomial(40, np.full(40, 1 / 40), size=60)
    kap, auc = [], []
    for b in range(60):
        idx = np.repeat(np.arange(40), w[b])
        kap.append(cohen_kappa_score(y[idx], p[idx]))
        auc.append(roc_auc_score(y[idx], s[idx]) if len(set(y[idx])) == 2 else np.nan)
    assert r["kappa_ci"] == pytest.approx(list(np.nanpercentile(kap, [2.5, 97.5])))
    assert r["auc_ci"] == pytest.approx(list(np.nanpercentile(auc, [2.5, 97.5])))
    assert evaluate(y, p, s, bootstrap=60, seed=7) == r
    assert evaluate(y, p, s, bootstrap=60, seed=8)["auc_ci"] != r["auc_ci"]


def test_tpr_at_low_fpr_by_hand():
    y = np.array([1, 1, 1, 1, 0, 0, 0, 0])
    s = np.array([0.9, 0.8, 0.3, 0.2, 0.85, 0.1, 0.05, 0.0])
    assert tpr_at_fpr(y, s, 0.01) == pytest.approx(0.25)  # only 0.9 is above every non-member
    assert tpr_at_fpr(y, s, 0.25) == pytest.approx(1.0)
    assert evaluate(y, (s > 0.5).astype(int), s, bootstrap=0)["tpr_at_fpr"] == pytest.approx(0.25)


def test_kappa_scan_matches_brute_force():
    y, _, s = _data(4, n=30)
    cuts, kap = kappa_scan(y, s)
    assert cuts[0] > s.max() and kap[0] == 0.0
    assert len(cuts) == len(np.unique(s)) + 1
    for c, k in zip(cuts[1:], kap[1:]):
        want = cohen_kappa_score(y, (s >= c).astype(int))
        assert k == pytest.approx(0.0 if np.isnan(want) else want)


def test_evaluate_errors_and_degenerate_cases():
    with pytest.raises(GanprintError, match="0 or 1"):
        evaluate([0, 2], [0, 1])
    with pytest.raises(GanprintError, match="2 truth labels but 3"):
        evaluate([0, 1], [0, 1, 1])
    with pytest.raises(GanprintError, match="nothing to score"):
        evaluate([], [])
    r = evaluate([1, 1, 1], [1, 1, 1], [0.2, 0.3, 0.4], bootstrap=20)
    assert r["kappa"] is None and r["auc"] is None and r["auc_ci"] is None
    json.dumps(r)


def _write(path, text):
    path.write_text(text)
    return path


def test_run_score_csv_against_truth_csv(tmp_path):
    pred = _write(tmp_path / "pred.csv", "a,1\nb,0\nc,1\nd,0\n")
    truth = _write(tmp_path / "truth.csv", "image_id,label\na.png,1\nb.png,1\nc.png,0\nd.png,0\n")
    r = run_score(pred, truth, bootstrap=0)
    assert r["accuracy"] == 0.5 and r["kappa"] == pytest.approx(0.0) and r["auc"] is None
    with pytest.raises(GanprintError, match="--plot needs scores"):
        run_score(pred, truth, bootstrap=0, plot=tmp_path / "x.png")
    short = _write(tmp_path / "short.csv", "a,1\nb,0\n")
    with pytest.raises(GanprintError, match="no prediction for 2"):
        run_score(short, truth, bootstrap=0)
    extra = _write(tmp_path / "extra.csv", "a,1\nb,0\nc,1\nd,0\ne,1\n")
    with pytest.raises(GanprintError, match="have no label"):
        run_score(extra, truth, bootstrap=0)
    with pytest.raises(GanprintError, match="no truth labels"):
        run_score(pred, None)


def test_plot_writes_png(tmp_path):
    from ganprint.metrics import plot_scores

    y, _, s = _data(5)
    out = tmp_path / "roc.png"
    plot_scores(out, y, s, {"auc": 0.7}, title="t")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in tmp_path.iterdir()] == ["roc.png"]


def _scores_artifact(base, ids, labels, truth=None):
    import pandas as pd
    import torch

    from ganprint.artifacts import base_provenance, write_artifact

    t = pd.DataFrame({"image_id": ids, "score": np.linspace(0, 1, len(ids)), "label_pred": np.asarray(labels, np.int8)})
    if truth is not None:
        t["label"] = pd.array(truth, dtype="Int8")
    return write_artifact(base, {"scores": torch.as_tensor(t["score"].to_numpy().copy(), dtype=torch.float32)}, t,
                          base_provenance("scores", "predict", rows=len(ids)))


def test_score_refuses_duplicate_ids_after_normalisation(tmp_path):
    truth = _write(tmp_path / "truth.csv", "a,1\nb,0\nc,1\nd,0\ne,1\nx,1\n")
    # the seed's header variant: x.png and x.PNG are the same image once the extension is dropped
    pred = _write(tmp_path / "p.csv", "original_image,label\na.png,1\nb.png,0\nc.png,1\nd.png,0\ne.png,1\n"
                                      "x.png,1\nx.PNG,0\n")
    with pytest.raises(GanprintError, match="image ids 'x.png' and 'x.PNG' both name the image 'x'"):
        run_score(pred, truth, bootstrap=0, header=True)
    # a scores artifact with a repeated id: 6 rows for 5 images
    ids = ["a", "b", "c", "d", "e", "a"]
    art = _scores_artifact(tmp_path / "s", ids, [1, 0, 1, 0, 1, 1], truth=[1, 0, 1, 0, 1, 1])
    with pytest.raises(GanprintError, match="image id 'a' appears twice"):
        run_score(art, truth, bootstrap=0)
    with pytest.raises(GanprintError, match="image id 'a' appears twice"):
        run_score(art, None, bootstrap=0)
    dup_truth = _write(tmp_path / "t2.csv", "original_image,label\na.png,1\na.PNG,1\n")
    with pytest.raises(GanprintError, match="both name the image"):
        run_score(_write(tmp_path / "p2.csv", "a,1\n"), dup_truth, bootstrap=0)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), 2.0, 0.0, -0.1, 1.0])
def test_score_max_fpr_must_be_a_rate(tmp_path, bad):
    pred = _write(tmp_path / "p.csv", "a,1\nb,0\n")
    with pytest.raises(GanprintError, match="--max-fpr"):
        run_score(pred, pred, bootstrap=0, max_fpr=bad)
