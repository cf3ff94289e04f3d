"""Metrics for membership decisions: Cohen's kappa (primary), accuracy, precision, recall, F1,
ROC AUC, TPR at a low FPR, and seeded bootstrap 95% CIs for kappa and AUC.

Point metrics come from scikit-learn.  The bootstrap draws multinomial resampling weights
[B, n] once and evaluates kappa and AUC for all B resamples with array arithmetic (weighted
confusion counts; Mann-Whitney AUC with ties counted 1/2), which equals recomputing the
metrics on each resampled data set and is ~100x faster than a Python loop.

Labels: 1 = member (used for training), 0 = non-member.  Scores: higher = more likely member.
"""

from __future__ import annotations

import math
from typing import Any

from ganprint.errors import GanprintError


def _as_binary(y, name: str):
    import numpy as np

    a = np.asarray(y)
    if a.ndim != 1:
        raise GanprintError(f"{name}: expected a 1-d array, got shape {a.shape}")
    if a.dtype.kind == "f" and not np.isfinite(a).all():
        raise GanprintError(f"{name}: contains missing or non-finite values")
    if len(a) and not np.isin(a, (0, 1)).all():
        bad = sorted(set(np.unique(a).tolist()) - {0, 1})[:3]
        raise GanprintError(f"{name}: labels must be 0 or 1, found {bad}")
    return a.astype(np.int64)


def kappa_from_counts(tp, fp, fn, tn):
    """Cohen's kappa from (possibly weighted, array-valued) confusion counts; nan where the
    expected agreement is 1 (both raters constant and equal), like scikit-learn."""
    import numpy as np

    tp, fp, fn, tn = (np.asarray(x, dtype=np.float64) for x in (tp, fp, fn, tn))
    n = tp + fp + fn + tn
    with np.errstate(invalid="ignore", divide="ignore"):
        po = (tp + tn) / n
        pe = ((tp + fp) * (tp + fn) + (fn + tn) * (fp + tn)) / (n * n)
        k = (po - pe) / (1.0 - pe)
    return np.where(np.isclose(pe, 1.0), np.nan, k)


def weighted_auc(y_true, scores, weights):
    """ROC AUC for each row of ``weights`` [B, n] (sample weights; e.g. bootstrap counts).

    y_true [n] in {0, 1}, scores [n].  Ties between a member and a non-member count 1/2.
    Returns float64 [B]; nan where a row has no weight on one class.
    """
    import numpy as np

    y = np.asarray(y_true).astype(bool)
    s = np.asarray(scores, dtype=np.float64)
    w = np.atleast_2d(np.asarray(weights, dtype=np.float64))
    order = np.argsort(s, kind="stable")
    s_sorted = s[order]
    starts = np.flatnonzero(np.r_[True, s_sorted[1:] != s_sorted[:-1]])  # tie groups
    ws = w[:, order]
    pos = np.add.reduceat(ws * y[order], starts, axis=1)  # [B, groups]
    neg = np.add.reduceat(ws * ~y[order], starts, axis=1)
    neg_below = np.cumsum(neg, axis=1) - neg
    num = (pos * (neg_below + 0.5 * neg)).sum(1)
    den = pos.sum(1) * neg.sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / den, np.nan)


def tpr_at_fpr(y_true, scores, max_fpr: float = 0.01) -> float:
    """Largest TPR over thresholds whose FPR <= ``max_fpr`` (Carlini et al. 2022's low-FPR view)."""
    import numpy as np
    from sklearn.metrics import roc_curve

    fpr, tpr, _ = roc_curve(np.asarray(y_true), np.asarray(scores, dtype=np.float64), drop_intermediate=False)
    ok = fpr <= max_fpr + 1e-12
    return float(tpr[ok].max()) if ok.any() else 0.0


def kappa_scan(y_true, scores):
    """Kappa of every cut "label 1 iff score >= t" over the distinct scores.

    Returns (cuts float64 [U + 1] descending: each distinct score, then one above the maximum
    (all 0) first; kappas float64 [U + 1], nan -> 0).  ``cuts[0]`` labels nothing 1.
    """
    import numpy as np

    y = _as_binary(y_true, "labels").astype(bool)
    s = np.asarray(scores, dtype=np.float64)
    order = np.argsort(-s, kind="stable")
    s_sorted, y_sorted = s[order], y[order]
    # last index of each tie group (descending): cutting there labels the whole group 1
    ends = np.flatnonzero(np.r_[s_sorted[1:] != s_sorted[:-1], True])
    tp = np.r_[0, np.cumsum(y_sorted)[ends]]
    fp = np.r_[0, np.cumsum(~y_sorted)[ends]]
    P, N = y.sum(), (~y).sum()
    kap = np.nan_to_num(kappa_from_counts(tp, fp, P - tp, N - fp), nan=0.0)
    top = np.nextafter(s_sorted[0], np.inf) if len(s) else 0.0
    cuts = np.r_[top, s_sorted[ends]]
    return cuts, kap


def _nan_to_none(x):
    if x is None:
        return None
    x = float(x)
    return None if math.isnan(x) else x


def evaluate(y_true, y_pred, scores=None, *, bootstrap: int = 1000, seed: int = 0, max_fpr: float = 0.01,
             ci: float = 0.95) -> dict[str, Any]:
    """All metrics of predictions ``y_pred`` [n] (0/1) and optional ``scores`` [n] vs ``y_true`` [n].

    Returns a JSON-able dict: n, n_pos, n_neg, n_pred_pos, kappa, accuracy, precision, recall, f1,
    auc, tpr_at_fpr (at ``max_fpr``), kappa_ci and auc_ci ([lo, hi] from ``bootstrap`` seeded
    resamples; None when bootstrap=0), bootstrap, seed.  Undefined values are None.
    """
    import numpy as np
    from sklearn.metrics import (
        accuracy_score,
        cohen_kappa_score,
        f1_score,
        precision_score,
        recall_score,
        roc_auc_score,
    )

    y = _as_binary(y_true, "truth labels")
    p = _as_binary(y_pred, "predicted labels")
    if len(y) != len(p):
        raise GanprintError(f"{len(y)} truth labels but {len(p)} predictions")
    if len(y) == 0:
        raise GanprintError("nothing to score: no image has both a prediction and a truth label")
    s = None
    if scores is not None:
        s = np.asarray(scores, dtype=np.float64)
        if s.shape != y.shape:
            raise GanprintError(f"{len(y)} truth labels but {len(s)} scores")
        if not np.isfinite(s).all():
            raise GanprintError("scores contain non-finite values")
    if bootstrap < 0:
        raise GanprintError(f"--bootstrap {bootstrap}: must be >= 0")
    both = len(np.unique(y)) == 2
    res: dict[str, Any] = {
        "n": int(len(y)),
        "n_pos": int(y.sum()),
        "n_neg": int((1 - y).sum()),
        "n_pred_pos": int(p.sum()),
        "kappa": _nan_to_none(cohen_kappa_score(y, p)) if len(np.unique(np.r_[y, p])) > 1 else None,
        "accuracy": float(accuracy_score(y, p)),
        "precision": float(precision_score(y, p, zero_division=0)),
        "recall": float(recall_score(y, p, zero_division=0)),
        "f1": float(f1_score(y, p, zero_division=0)),
        "auc": float(roc_auc_score(y, s)) if (s is not None and both) else None,
        "tpr_at_fpr": tpr_at_fpr(y, s, max_fpr) if (s is not None and both) else None,
        "max_fpr": max_fpr,
        "kappa_ci": None,
        "auc_ci": None,
        "bootstrap": int(bootstrap),
        "seed": int(seed),
    }
    if bootstrap > 0:
        rng = np.random.default_rng(seed)
        n = len(y)
        lo, hi = 100 * (1 - ci) / 2, 100 * (1 + ci) / 2
        kaps, aucs = [], []
        for start in range(0, bootstrap, 2000):  # bound the [B, n] weight block
            b = min(2000, bootstrap - start)
            w = rng.multinomial(n, np.full(n, 1.0 / n), size=b).astype(np.float64)
            tp = w @ (y * p)
            fp = w @ ((1 - y) * p)
            fn = w @ (y * (1 - p))
            tn = w @ ((1 - y) * (1 - p))
            kaps.append(kappa_from_counts(tp, fp, fn, tn))
            if s is not None:
                aucs.append(weighted_auc(y, s, w))
        kap = np.concatenate(kaps)
        if np.isfinite(kap).any():
            res["kappa_ci"] = [float(v) for v in np.nanpercentile(kap, [lo, hi])]
        if aucs:
            auc = np.concatenate(aucs)
            if np.isfinite(auc).any():
                res["auc_ci"] = [float(v) for v in np.nanpercentile(auc, [lo, hi])]
    return res


# ---------------------------------------------------------------------------------------------
# the ``score`` stage: predictions (CSV or scores artifact) vs truth (CSV or labelled artifact)


def _is_csv(arg) -> bool:
    from pathlib import Path

    return str(arg).lower().endswith((".csv", ".txt")) or (Path(str(arg)).is_file() and
                                                           not str(arg).endswith((".safetensors", ".parquet")))


def load_predictions(arg, header: bool = False) -> dict[str, Any]:
    """{ids, labels int64 [n], scores float64 [n] or None, truth float64 [n] (nan unknown) or None,
    source, provenance}.  ``arg``: a submission CSV (``header``: the seed's variant with a header
    line) or a scores artifact."""
    import numpy as np

    from ganprint.artifacts import read_artifact
    from ganprint.submission import read_submission

    if _is_csv(arg):
        ids, labels = read_submission(arg, header=header)
        return {"ids": ids, "labels": np.asarray(labels, dtype=np.int64), "scores": None, "truth": None,
                "source": str(arg), "provenance": None}
    art = read_artifact(arg)
    if art.kind != "scores":
        raise GanprintError(f"{art.base}.safetensors: is a '{art.kind}' artifact; predictions are a submission "
                            "CSV or the scores artifact of `ganprint predict`")
    t = art.table
    truth = None
    if "label" in t.columns:
        truth = t["label"].astype("Float64").to_numpy(dtype=np.float64, na_value=np.nan)
    return {"ids": [str(i) for i in t["image_id"]], "labels": t["label_pred"].to_numpy().astype(np.int64),
            "scores": t["score"].to_numpy().astype(np.float64), "truth": truth, "source": f"{art.base}.safetensors",
            "provenance": art.provenance}


def load_truth(arg) -> tuple[list[str], Any, str]:
    """(ids, labels int64 [n], source) from a CSV ``image_id,label`` or any artifact whose table
    has ``image_id`` and ``label`` (embeddings, similarity, scores); unlabelled rows are dropped."""
    import numpy as np

    from ganprint.artifacts import read_artifact
    from ganprint.submission import read_submission

    if _is_csv(arg):
        ids, labels = read_submission(arg, header=None)
        return ids, np.asarray(labels, dtype=np.int64), str(arg)
    art = read_artifact(arg)
    t = art.table
    src = f"{art.base}.safetensors"
    if t is None or "label" not in t.columns or "image_id" not in t.columns:
        raise GanprintError(f"{src}: has no image_id/label columns; pass a CSV image_id,label or a labelled artifact")
    lab = t["label"].astype("Float64").to_numpy(dtype=np.float64, na_value=np.nan)
    keep = np.isfinite(lab)
    if not keep.any():
        raise GanprintError(f"{src}: no image has a known label; pass a labelled dev set (real_used/, real_not_used/)")
    ids = [str(i) for i, k in zip(t["image_id"], keep) if k]
    seen: set[str] = set()
    for i in ids:
        if i in seen:
            raise GanprintError(f"{src}: image id '{i}' appears twice among the labelled images; ids must be unique")
        seen.add(i)
    return ids, lab[keep].astype(np.int64), src


def _refuse_duplicates(ids, source: str) -> None:
    """Ids must be unique once compared as scoring compares them (without image extensions)."""
    from ganprint.submission import strip_extension

    first: dict[str, str] = {}
    for i in ids:
        key = strip_extension(str(i))
        if key in first:
            same = first[key] == str(i)
            what = f"image id {str(i)!r} appears twice" if same else \
                f"image ids {first[key]!r} and {str(i)!r} both name the image {key!r}"
            raise GanprintError(f"{source}: {what}; each image must be scored once")
        first[key] = str(i)


def match_truth(pred_ids, truth_ids, truth_labels, pred_source: str, truth_source: str):
    """int64 [n] truth label of each prediction (ids compared without image extensions)."""
    import numpy as np

    from ganprint.submission import strip_extension

    _refuse_duplicates(truth_ids, truth_source)
    table = {strip_extension(i): int(v) for i, v in zip(truth_ids, truth_labels)}
    keys = [strip_extension(i) for i in pred_ids]
    missing = [i for i in keys if i not in table]
    if missing:
        raise GanprintError(f"{pred_source}: {len(missing)} predicted id(s) have no label in {truth_source}, e.g. "
                            f"{missing[:3]}; score against the truth of the same images")
    pset = set(keys)
    unpredicted = [i for i in table if i not in pset]
    if unpredicted:
        raise GanprintError(f"{pred_source}: no prediction for {len(unpredicted)} labelled image(s) of "
                            f"{truth_source}, e.g. {unpredicted[:3]}; predict every image")
    return np.asarray([table[i] for i in keys], dtype=np.int64)


def plot_scores(path, y_true, scores, result: dict[str, Any] | None = None, title: str = "") -> None:
    """ROC curve and per-class score histograms to a PNG (matplotlib Agg), written atomically."""
    import os
    import tempfile
    from pathlib import Path

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from sklearn.metrics import roc_curve

    path = Path(path)
    if not path.parent.is_dir():
        raise GanprintError(f"{path.parent}: folder does not exist; choose another --plot")
    y = np.asarray(y_true).astype(bool)
    s = np.asarray(scores, dtype=np.float64)
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4.2))
    if y.any() and (~y).any():
        fpr, tpr, _ = roc_curve(y, s)
        auc = (result or {}).get("auc")
        a1.plot(fpr, tpr, lw=2, label=f"AUC {auc:.3f}" if auc is not None else "ROC")
    a1.plot([0, 1], [0, 1], ls="--", color="grey", lw=1, label="chance")
    a1.set(xlabel="false positive rate", ylabel="true positive rate", title="ROC", xlim=(0, 1), ylim=(0, 1.01))
    a1.legend(loc="lower right")
    bins = np.histogram_bin_edges(s, bins=min(40, max(5, len(s) // 5)))
    a2.hist(s[~y], bins=bins, alpha=0.6, label=f"non-member (n={int((~y).sum())})", color="tab:blue")
    a2.hist(s[y], bins=bins, alpha=0.6, label=f"member (n={int(y.sum())})", color="tab:red")
    a2.set(xlabel="score (higher = member)", ylabel="images", title="scores by class")
    a2.legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".png", dir=path.parent)
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=110, format="png")
        from ganprint.artifacts import follow_umask

        follow_umask(tmp)
        os.replace(tmp, path)
    except OSError as exc:
        raise GanprintError(f"{path}: cannot write the plot ({exc.strerror or exc}); choose another --plot") from exc
    finally:
        plt.close(fig)
        if os.path.exists(tmp):
            os.unlink(tmp)


def run_score(predictions, truth=None, *, bootstrap: int = 1000, seed: int = 0, max_fpr: float = 0.01,
              plot=None, header: bool = False) -> dict[str, Any]:
    """Evaluate ``predictions`` (CSV or scores artifact) against ``truth`` (CSV or labelled
    artifact; None: the labels stored in the scores artifact).  Returns :func:`evaluate`'s dict
    plus ``predictions``, ``truth`` and, for scores artifacts, ``attack`` and ``rule``."""
    import math

    import numpy as np

    if not (isinstance(max_fpr, (int, float)) and math.isfinite(max_fpr) and 0 < max_fpr < 1):
        raise GanprintError(f"--max-fpr {max_fpr}: must be a false-positive rate strictly between 0 and 1 "
                            "(e.g. 0.01)")
    if bootstrap < 0:
        raise GanprintError(f"--bootstrap {bootstrap}: must be 0 (no CIs) or a positive number of resamples")
    pred = load_predictions(predictions, header=header)
    _refuse_duplicates(pred["ids"], pred["source"])
    if truth is None:
        if pred["truth"] is None or not np.isfinite(pred["truth"]).all():
            raise GanprintError(f"{pred['source']}: no truth labels stored for every image; pass --truth "
                                "(a CSV image_id,label or a labelled embeddings/similarity artifact)")
        y = pred["truth"].astype(np.int64)
        truth_src = pred["source"]
    else:
        tids, tlab, truth_src = load_truth(truth)
        y = match_truth(pred["ids"], tids, tlab, pred["source"], truth_src)
    res = evaluate(y, pred["labels"], pred["scores"], bootstrap=bootstrap, seed=seed, max_fpr=max_fpr)
    res["predictions"] = pred["source"]
    res["truth"] = truth_src
    prov = pred["provenance"] or {}
    # realised false discovery rate of the images labelled 1 (flagged): false flags / flags
    n_flag = int(np.asarray(pred["labels"]).sum())
    res["fdr_realised"] = float(((np.asarray(pred["labels"]) == 1) & (y == 0)).sum() / n_flag) if n_flag else 0.0
    res["fdr_target"] = None
    if prov:
        res["attack"] = prov.get("attack")
        res["rule"] = prov.get("rule")
        res["threshold"] = prov.get("threshold")
        res["fdr_target"] = prov.get("fdr")
        if isinstance(prov.get("selection"), dict):
            sel = prov["selection"]
            res["chosen"] = sel.get("chosen")
            res["nested"] = {k: (sel.get("nested") or {}).get(k)
                             for k in ("auc_mean", "auc_ci", "kappa_mean", "kappa_ci", "signal_p", "signal")}
    if plot is not None:
        if pred["scores"] is None:
            raise GanprintError(f"--plot needs scores; {pred['source']} is a CSV of labels, pass the scores "
                                "artifact of `ganprint predict` instead")
        plot_scores(plot, y, pred["scores"], res, title=str(res.get("attack") or ""))
        res["plot"] = str(plot)
    return res
