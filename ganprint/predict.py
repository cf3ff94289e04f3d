"""``predict`` stage: similarity artifact -> attack scores -> 0/1 decisions -> scores artifact
and a validated ImageCLEF submission CSV.

Decision rules (exactly one):

- ``threshold``  label 1 iff score >= T (the seed's fixed cut, e.g. 0.6 on max cosine);
- ``calibrate``  T chosen on a *labelled* dev similarity artifact to maximise Cohen's kappa
                 there (the same attack and parameters are run on it); T is the midpoint of
                 the best interval of cuts, ties between equally good intervals go to the middle
                 one; the dev kappa is reported;
- ``quantile``   label 1 the top ``round((1 - Q) * R)`` images by score;
- ``balanced``   quantile 0.5: the top half.

Rank-based rules break score ties by a digest of the image id, never by input order: the
input order follows the folder layout (real_used before real_not_used on dev data), and
breaking ties by it would leak the labels into the decisions.
"""

from __future__ import annotations

import hashlib
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from ganprint.artifacts import releases_output_claim
from ganprint.errors import ArtifactError, GanprintError

RULES = ("threshold", "calibrate", "quantile", "balanced")


@dataclass
class Decision:
    """labels int64 [R] (1 = member) and how they were decided."""

    labels: Any
    rule: str
    threshold: float | None
    quantile: float | None = None
    dev_kappa: float | None = None
    dev: dict[str, Any] | None = None


def decide_threshold(scores, threshold: float):
    """int64 [R]: 1 iff score >= threshold."""
    import numpy as np

    if not math.isfinite(threshold):
        raise GanprintError(f"--threshold {threshold}: must be a finite number")
    return (np.asarray(scores, dtype=np.float64) >= threshold).astype(np.int64)


def _tie_keys(image_ids) -> list[int]:
    return [int.from_bytes(hashlib.sha256(str(i).encode()).digest()[:8], "big") for i in image_ids]


def decide_quantile(scores, quantile: float, image_ids=None):
    """Label 1 the top ``round((1 - quantile) * R)`` scores; ties broken by a digest of the image
    id (input order when ``image_ids`` is None).  Returns (labels int64 [R], lowest score labelled 1)."""
    import numpy as np

    if not 0.0 <= quantile <= 1.0:
        raise GanprintError(f"--quantile {quantile}: must be in [0, 1]")
    s = np.asarray(scores, dtype=np.float64)
    n = len(s)
    n1 = int(math.floor((1.0 - quantile) * n + 0.5))
    tie = np.arange(n) if image_ids is None else np.asarray(_tie_keys(image_ids), dtype=np.uint64)
    order = np.lexsort((tie, -s))  # by score descending, then the tie key
    labels = np.zeros(n, dtype=np.int64)
    labels[order[:n1]] = 1
    thr = float(s[order[n1 - 1]]) if n1 > 0 else (float(np.nextafter(s.max(), np.inf)) if n else 0.0)
    return labels, thr


def calibrate_threshold(dev_scores, dev_labels) -> tuple[float, float]:
    """(threshold, dev kappa): the cut "score >= T" that maximises Cohen's kappa on the dev set."""
    import numpy as np

    from ganprint.metrics import kappa_scan

    y = np.asarray(dev_labels)
    if len(np.unique(y)) < 2:
        raise GanprintError("--calibrate: the dev set needs both members (1) and non-members (0)")
    cuts, kap = kappa_scan(y, dev_scores)
    best = np.flatnonzero(kap >= kap.max() - 1e-12)
    j = int(best[len(best) // 2])
    thr = float(cuts[j])
    if 0 < j < len(cuts) - 1:
        mid = 0.5 * (cuts[j] + cuts[j + 1])
        if cuts[j + 1] < mid <= cuts[j]:  # any cut in (next, this] labels the dev set alike
            thr = float(mid)
    return thr, float(kap[j])


# ---------------------------------------------------------------------------------------------


def load_similarity(path: str | os.PathLike):
    from ganprint.artifacts import read_artifact

    return read_artifact(path, kind="similarity")


def attack_scores(sim, attack: str = "max_sim", params: Mapping[str, Any] | None = None):
    """(context, scores float64 [R]) of ``attack`` on a similarity artifact (path or Artifact)."""
    from ganprint.artifacts import Artifact
    from ganprint.attacks import AttackContext, run_attack

    art = sim if isinstance(sim, Artifact) else load_similarity(sim)
    ctx = AttackContext.from_artifact(art)
    return ctx, run_attack(attack, ctx, params)


def _truth(table):
    """float64 [R] labels with nan for unknown, or None when none is known."""
    import numpy as np

    if table is None or "label" not in table.columns:
        return None
    lab = table["label"].astype("Float64").to_numpy(dtype=np.float64, na_value=np.nan)
    return lab if np.isfinite(lab).any() else None


def _check_dev(test_prov: Mapping[str, Any], dev_prov: Mapping[str, Any], test_name: str, dev_name: str) -> None:
    from ganprint.similarity import check_comparable

    check_comparable(dict(test_prov.get("generated") or test_prov), test_name,
                     dict(dev_prov.get("generated") or dev_prov), dev_name)
    if test_prov.get("metric") != dev_prov.get("metric"):
        raise ArtifactError(f"{test_name} and {dev_name}: metrics differ ({test_prov.get('metric')} vs "
                            f"{dev_prov.get('metric')}); run simmatrix with the same --metric")


@dataclass
class Prediction:
    """Scores and decisions for the real images of one similarity artifact."""

    image_ids: list[str]
    scores: Any  # float64 [R]
    decision: Decision
    attack: str
    params: dict[str, Any]
    truth: Any = None  # float64 [R], nan = unknown; None when no label is known
    similarity_path: str | None = None
    similarity_provenance: dict[str, Any] = field(default_factory=dict)

    @property
    def labels(self):
        return self.decision.labels


def predict(
    sim,
    attack: str = "max_sim",
    params: Mapping[str, Any] | None = None,
    *,
    threshold: float | None = None,
    calibrate=None,
    quantile: float | None = None,
    balanced: bool = False,
) -> Prediction:
    """Run ``attack`` on similarity artifact ``sim`` (path or Artifact) and apply one rule.

    ``calibrate``: a labelled dev similarity artifact (path or Artifact).
    """
    import numpy as np

    from ganprint.artifacts import Artifact
    from ganprint.attacks import resolved_params

    chosen = [name for name, on in (("threshold", threshold is not None), ("calibrate", calibrate is not None),
                                    ("quantile", quantile is not None), ("balanced", balanced)) if on]
    if len(chosen) > 1:
        raise GanprintError(f"choose one decision rule, got {' and '.join('--' + c for c in chosen)}")
    if not chosen:
        raise GanprintError("choose a decision rule: --threshold T, --calibrate DEV, --quantile Q or --balanced")
    rule = chosen[0]
    params = resolved_params(attack, params)
    art = sim if isinstance(sim, Artifact) else load_similarity(sim)
    name = f"{art.base}.safetensors"
    _, scores = attack_scores(art, attack, params)
    ids = [str(i) for i in art.table["image_id"].tolist()]
    if rule == "threshold":
        dec = Decision(decide_threshold(scores, float(threshold)), rule, float(threshold))
    elif rule in ("quantile", "balanced"):
        q = 0.5 if rule == "balanced" else float(quantile)
        labels, thr = decide_quantile(scores, q, ids)
        dec = Decision(labels, rule, thr, quantile=q)
    else:
        dev = calibrate if isinstance(calibrate, Artifact) else load_similarity(calibrate)
        dev_name = f"{dev.base}.safetensors"
        _check_dev(art.provenance, dev.provenance, name, dev_name)
        _, dev_scores = attack_scores(dev, attack, params)
        truth = _truth(dev.table)
        if truth is None:
            raise GanprintError(f"{dev_name}: has no labels; --calibrate needs a dev set with real_used/ and "
                                "real_not_used/ images")
        known = np.isfinite(truth)
        thr, kap = calibrate_threshold(dev_scores[known], truth[known].astype(np.int64))
        dec = Decision(decide_threshold(scores, thr), rule, thr, dev_kappa=kap,
                       dev={"path": str(Path(dev.base).resolve()), "n": int(known.sum()),
                            "n_pos": int(truth[known].sum()), "pair_id": dev.provenance.get("pair_id"),
                            # the cut was tuned on the very images it labels: the dev kappa is optimistic
                            "same_as_test": dev.provenance.get("pair_id") == art.provenance.get("pair_id")})
    return Prediction(ids, scores, dec, attack, params, _truth(art.table), str(Path(art.base).resolve()),
                      dict(art.provenance))


def scores_table(pred: Prediction):
    import numpy as np
    import pandas as pd

    table = pd.DataFrame({
        "image_id": pred.image_ids,
        "score": np.asarray(pred.scores, dtype=np.float64),
        "label_pred": np.asarray(pred.labels, dtype=np.int8),
    })
    if pred.truth is not None:
        table["label"] = pd.array([None if math.isnan(v) else int(v) for v in pred.truth], dtype="Int8")
    return table


def write_scores(pred: Prediction, out: str | os.PathLike) -> Path:
    """The scores artifact (docs/ARTIFACTS.md): table + tensor ``scores`` float32 [R]."""
    import torch

    from ganprint.artifacts import base_provenance, write_artifact

    d = pred.decision
    prov = base_provenance(
        "scores", "predict",
        attack=pred.attack,
        params=pred.params,
        rule=d.rule,
        threshold=d.threshold,
        quantile=d.quantile,
        dev_kappa=d.dev_kappa,
        dev=d.dev,
        similarity_path=pred.similarity_path,
        similarity=pred.similarity_provenance,
        rows=len(pred.image_ids),
    )
    return write_artifact(out, {"scores": torch.as_tensor(pred.scores, dtype=torch.float32)}, scores_table(pred), prov)


@dataclass
class PredictOutcome:
    base: Path
    submission: Path | None
    prediction: Prediction
    seconds: float

    @property
    def n_pos(self) -> int:
        return int(self.prediction.labels.sum())


@releases_output_claim("out")
def run_predict(
    sim,
    out: str | os.PathLike,
    attack: str = "max_sim",
    params: Mapping[str, Any] | None = None,
    *,
    threshold: float | None = None,
    calibrate=None,
    quantile: float | None = None,
    balanced: bool = False,
    submission: str | os.PathLike | None = None,
    header: bool = False,
    write_csv: bool = True,
) -> PredictOutcome:
    """predict + write the scores artifact ``out`` and the submission CSV (default ``OUT.csv``).

    The CSV is validated before anything is written."""
    from ganprint.artifacts import artifact_base, artifact_paths, ensure_writable
    from ganprint.submission import check_submission_path, stage_submission

    t0 = time.perf_counter()
    # every output checked (and the scores artifact claimed) before any work; then written all or nothing
    ensure_writable(out)
    csv_path = None
    if write_csv:
        csv_path = check_submission_path(Path(submission) if submission is not None
                                         else Path(str(artifact_base(out)) + ".csv"))
    pred = predict(sim, attack, params, threshold=threshold, calibrate=calibrate, quantile=quantile,
                   balanced=balanced)
    staged = None
    if csv_path is not None:
        staged = stage_submission(csv_path, pred.image_ids, pred.labels.tolist(), header=header,
                                  expected=pred.image_ids)
    try:
        base = write_scores(pred, out)
    except BaseException:
        if staged is not None:
            staged.discard()
        raise
    if staged is not None:
        try:
            staged.commit()
        except BaseException:
            for f in artifact_paths(base):
                f.unlink(missing_ok=True)
            raise
    return PredictOutcome(base, csv_path, pred, time.perf_counter() - t0)
