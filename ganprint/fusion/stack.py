"""Score-level stacking: a logistic regression over several attacks' scores, fit on dev labels.

Inputs are ``scores`` artifacts (written by ``predict``; table ``image_id, score, label_pred``
plus ``label`` when known; tensor ``scores`` [R]):

- ``dev_paths``: F labelled scores artifacts of the dev set's real images, one per feature
  (an attack on a backbone), e.g. max-sim on ResNet50, GAN-Leaks on DINOv2, ...;
- ``test_paths``: the F matching scores artifacts of the test set, in the same order.

Within each set the artifacts are joined by ``image_id``; their id sets must be equal (refused
otherwise).  ``dev_paths[j]`` and ``test_paths[j]`` must describe the same feature (same attack
and backbone where their provenance says so).  Labels come from the dev tables' ``label`` column.

Model (:func:`fit_stacker`): ``StandardScaler`` then scikit-learn ``LogisticRegression(C=1.0,
lbfgs)`` on X_dev [N, F] -> P(member); applied to X_test [M, F].  The output is an ordinary
``scores`` artifact of the test set: ``score`` = probability, ``label_pred`` = 0/1 by ``rule``:

- ``"prob"`` (default): ``score >= 0.5``.  Logistic regression is fit to the dev prevalence, so
  0.5 is its own decision boundary; nothing is tuned on the data that was fit.
- ``"kappa"``: the cut that maximises Cohen's kappa on *out-of-fold* dev probabilities
  (stratified ``cv``-fold cross-validation, seeded), never on the in-sample fit.

Honesty numbers reported with the coefficients: out-of-fold dev AUC and kappa (at the chosen
cut; for ``"kappa"`` that kappa is optimistic, the cut having been chosen on the same
probabilities) next to the in-sample AUC.  Coefficients are in standardised units (per standard
deviation of each feature on dev), so their sizes are comparable.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ganprint.artifacts import (Artifact, base_provenance, ensure_writable, read_artifact, releases_output_claim,
                                write_artifact)
from ganprint.errors import ArtifactError, GanprintError

RULES = ("prob", "kappa")


# ---------------------------------------------------------------------------------------------
# reading scores artifacts


def read_scores(path: str | os.PathLike) -> Artifact:
    """A ``scores`` artifact with its table checked: ``image_id`` (unique) and finite ``score``."""
    art = read_artifact(path, kind="scores")
    t = art.table
    for col in ("image_id", "score"):
        if t is None or col not in t.columns:
            raise ArtifactError(f"{art.base}: scores table has no '{col}' column; re-run predict")
    ids = t["image_id"].astype(str)
    dup = ids[ids.duplicated()]
    if len(dup):
        raise ArtifactError(f"{art.base}: image_id {dup.iloc[0]} appears more than once; re-run predict")
    s = t["score"].to_numpy(dtype=np.float64)
    if not np.isfinite(s).all():
        bad = ids[~np.isfinite(s)].iloc[0]
        raise ArtifactError(f"{art.base}: score of {bad} is not finite; re-run predict or drop this attack")
    return art


def feature_identity(prov: dict[str, Any]) -> dict[str, Any]:
    """What a scores artifact measures: attack and (when recorded) the feature space."""
    sim = prov.get("similarity") if isinstance(prov.get("similarity"), dict) else {}
    side = sim.get("real") if isinstance(sim.get("real"), dict) else {}
    ckpt = side.get("checkpoint", prov.get("checkpoint"))
    return {
        "attack": prov.get("attack"),
        "backbone": side.get("backbone", prov.get("backbone")),
        "weights_digest": side.get("weights_digest", prov.get("weights_digest")),
        "checkpoint": ckpt.get("digest") if isinstance(ckpt, dict) else ckpt,
    }


def feature_name(art: Artifact) -> str:
    ident = feature_identity(art.provenance)
    if ident["attack"] is None and ident["backbone"] is None:
        return art.base.name
    return "@".join(str(v) for v in (ident["attack"], ident["backbone"]) if v is not None)


def _join(arts: Sequence[Artifact], role: str) -> tuple[list[str], np.ndarray]:
    """Join F scores artifacts by image_id -> (ids in the first artifact's order, X [N, F] float64)."""
    ref = arts[0]
    ids = ref.table["image_id"].astype(str).tolist()
    ref_set = set(ids)
    cols = []
    for art in arts:
        t = art.table
        a_ids = t["image_id"].astype(str)
        a_set = set(a_ids)
        if a_set != ref_set:
            only_ref, only_a = sorted(ref_set - a_set), sorted(a_set - ref_set)
            parts = []
            if only_ref:
                parts.append(f"{len(only_ref)} only in the first, e.g. {only_ref[0]}")
            if only_a:
                parts.append(f"{len(only_a)} only in the second, e.g. {only_a[0]}")
            raise ArtifactError(f"{ref.base} and {art.base}: {role} scores cover different images "
                                f"({'; '.join(parts)}); score the same {role} images with every attack")
        s = t["score"].to_numpy(dtype=np.float64)
        if a_ids.tolist() != ids:
            pos = {i: n for n, i in enumerate(a_ids)}
            s = s[[pos[i] for i in ids]]
        cols.append(s)
    return ids, np.stack(cols, axis=1)


def _dev_labels(arts: Sequence[Artifact], ids: list[str]) -> np.ndarray:
    """Labels [N] int from the dev tables (every dev artifact that has labels must agree)."""
    import pandas as pd

    labels = None
    source = None
    for art in arts:
        t = art.table
        if "label" not in t.columns:
            continue
        lab = dict(zip(t["image_id"].astype(str), t["label"]))
        vals = [lab[i] for i in ids]
        missing = [i for i, v in zip(ids, vals) if pd.isna(v)]
        if missing:
            raise GanprintError(f"{art.base}: {len(missing)} dev images have no label (e.g. {missing[0]}); "
                                "stacking is fit on labelled dev scores (real_used / real_not_used)")
        arr = np.asarray([int(v) for v in vals])
        if labels is None:
            labels, source = arr, art.base
        elif not np.array_equal(arr, labels):
            i = int(np.nonzero(arr != labels)[0][0])
            raise ArtifactError(f"{source} and {art.base}: labels disagree for {ids[i]}; score the same dev set")
    if labels is None:
        raise GanprintError(f"{arts[0].base}: dev scores have no label column; pass scores of the labelled dev set "
                            "(predict on real_used / real_not_used)")
    if not set(np.unique(labels)) <= {0, 1}:
        raise GanprintError(f"{source}: labels must be 0 or 1; re-run predict on the dev set")
    if len(np.unique(labels)) < 2:
        raise GanprintError(f"{source}: every dev label is {int(labels[0])}; stacking needs members and non-members")
    return labels


# ---------------------------------------------------------------------------------------------
# model


def fit_stacker(X: np.ndarray, y: np.ndarray, C: float = 1.0):
    """``StandardScaler -> LogisticRegression(C)`` fitted on X [N, F], y [N] (a scikit-learn Pipeline)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    return make_pipeline(StandardScaler(), LogisticRegression(C=C, max_iter=1000)).fit(X, y)


def _kappa(y: np.ndarray, pred: np.ndarray) -> float:
    from sklearn.metrics import cohen_kappa_score

    if len(np.unique(pred)) < 2 and len(np.unique(y)) < 2:
        return 0.0
    k = cohen_kappa_score(y, pred)
    return 0.0 if np.isnan(k) else float(k)


def kappa_cut(y: np.ndarray, p: np.ndarray) -> tuple[float, float]:
    """The threshold t maximising kappa of ``p >= t`` -> (t, kappa); ties go to the t nearest 0.5."""
    best = (0.5, _kappa(y, (p >= 0.5).astype(int)))
    for t in np.unique(p):
        k = _kappa(y, (p >= t).astype(int))
        if k > best[1] + 1e-12 or (abs(k - best[1]) <= 1e-12 and abs(t - 0.5) < abs(best[0] - 0.5)):
            best = (float(t), k)
    return best


def _oof_probs(X: np.ndarray, y: np.ndarray, C: float, cv: int, seed: int) -> np.ndarray | None:
    """Out-of-fold probabilities from stratified ``cv``-fold cross-validation (None if too few)."""
    from sklearn.model_selection import StratifiedKFold

    folds = min(cv, int(np.bincount(y).min()))
    if folds < 2:
        return None
    p = np.zeros(len(y))
    for tr, te in StratifiedKFold(folds, shuffle=True, random_state=seed).split(X, y):
        p[te] = fit_stacker(X[tr], y[tr], C).predict_proba(X[te])[:, 1]
    return p


@dataclass
class StackResult:
    """What :func:`stack_scores` fit and wrote. ``coef`` is per standardised feature."""

    scores: Path
    features: list[str]
    coef: list[float]
    intercept: float
    scaler_mean: list[float]
    scaler_scale: list[float]
    rule: str
    threshold: float
    dev_rows: int
    test_rows: int
    dev_members: int
    dev_fit_auc: float
    dev_cv_auc: float | None
    dev_cv_kappa: float | None
    cv_folds: int
    test_positive: int

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["scores"] = str(self.scores)
        return d


@releases_output_claim("out")
def stack_scores(
    dev_paths: Sequence[str | os.PathLike],
    test_paths: Sequence[str | os.PathLike],
    out: str | os.PathLike,
    rule: str = "prob",
    C: float = 1.0,
    cv: int = 5,
    seed: int = 0,
) -> StackResult:
    """Fit the stacker on the dev scores, apply it to the test scores, write a scores artifact ``out``.

    ``dev_paths[j]`` and ``test_paths[j]`` are the same attack on the same backbone (feature j).
    ``rule``: ``"prob"`` (label 1 at probability >= 0.5) or ``"kappa"`` (cut maximising kappa on
    out-of-fold dev probabilities).  Same inputs + seed -> same output."""
    import pandas as pd
    import torch
    from sklearn.metrics import roc_auc_score

    if rule not in RULES:
        raise GanprintError(f"--rule {rule}: not one of {', '.join(RULES)}")
    if C <= 0:
        raise GanprintError(f"--C {C}: must be positive")
    if not dev_paths:
        raise GanprintError("fuse stack: no dev scores given; pass --dev once per attack/backbone")
    if len(dev_paths) != len(test_paths):
        raise GanprintError(f"fuse stack: {len(dev_paths)} dev and {len(test_paths)} test scores artifacts; "
                            "pass one test artifact per dev artifact, in the same order")
    ensure_writable(out)
    dev = [read_scores(p) for p in dev_paths]
    test = [read_scores(p) for p in test_paths]
    for d, t in zip(dev, test):
        a, b = feature_identity(d.provenance), feature_identity(t.provenance)
        diff = [k for k in a if a[k] is not None and b[k] is not None and a[k] != b[k]]
        if diff:
            k = diff[0]
            raise ArtifactError(f"{d.base} and {t.base}: dev and test scores are different features ({k} "
                                f"{str(a[k])[:12]} vs {str(b[k])[:12]}); pass --dev and --test in matching order")
    dev_ids, X_dev = _join(dev, "dev")
    y = _dev_labels(dev, dev_ids)
    test_ids, X_test = _join(test, "test")

    model = fit_stacker(X_dev, y, C)
    scaler, lr = model[0], model[-1]
    p_dev = model.predict_proba(X_dev)[:, 1]
    p_test = model.predict_proba(X_test)[:, 1]
    oof = _oof_probs(X_dev, y, C, cv, seed)
    if rule == "kappa":
        if oof is None:
            raise GanprintError(f"{dev[0].base}: too few dev images of one class for cross-validation; use --rule prob")
        threshold, _ = kappa_cut(y, oof)
    else:
        threshold = 0.5
    cv_auc = float(roc_auc_score(y, oof)) if oof is not None else None
    cv_kappa = _kappa(y, (oof >= threshold).astype(int)) if oof is not None else None
    label_pred = (p_test >= threshold).astype(np.int8)

    table = pd.DataFrame({"image_id": test_ids, "score": p_test, "label_pred": label_pred})
    t0 = test[0].table
    if "label" in t0.columns and t0["label"].notna().any():
        lab = dict(zip(t0["image_id"].astype(str), t0["label"]))
        table["label"] = pd.array([lab[i] for i in test_ids], dtype="Int8")
    names = [feature_name(a) for a in dev]
    stack_info = {
        "features": names,
        "coef": [float(c) for c in lr.coef_[0]],
        "intercept": float(lr.intercept_[0]),
        "scaler_mean": [float(v) for v in scaler.mean_],
        "scaler_scale": [float(v) for v in scaler.scale_],
        "C": C,
        "model": "StandardScaler + LogisticRegression(lbfgs)",
        "dev_rows": len(dev_ids),
        "dev_fit_auc": float(roc_auc_score(y, p_dev)),
        "dev_cv_auc": cv_auc,
        "dev_cv_kappa": cv_kappa,
    }
    prov = base_provenance(
        "scores", "fuse",
        attack="stack",
        rule="threshold" if rule == "prob" else "calibrate",
        threshold=float(threshold),
        dev_kappa=cv_kappa,
        rows=len(test_ids),
        seed=seed,
        similarity=None,
        stack=stack_info,
        sources={"dev": [{"artifact": str(a.base), **feature_identity(a.provenance)} for a in dev],
                 "test": [{"artifact": str(a.base), **feature_identity(a.provenance)} for a in test]},
    )
    base = write_artifact(out, {"scores": torch.as_tensor(p_test, dtype=torch.float32)}, table, prov)
    return StackResult(
        scores=base, features=names, coef=stack_info["coef"], intercept=stack_info["intercept"],
        scaler_mean=stack_info["scaler_mean"], scaler_scale=stack_info["scaler_scale"], rule=rule,
        threshold=float(threshold), dev_rows=len(dev_ids), test_rows=len(test_ids), dev_members=int(y.sum()),
        dev_fit_auc=stack_info["dev_fit_auc"], dev_cv_auc=cv_auc, dev_cv_kappa=cv_kappa,
        cv_folds=0 if oof is None else min(cv, int(np.bincount(y).min())), test_positive=int(label_pred.sum()),
    )
