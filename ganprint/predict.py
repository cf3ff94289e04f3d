"""``predict`` stage: similarity artifact -> attack scores -> 0/1 decisions -> scores artifact
and a validated ImageCLEF submission CSV.

Decision rules (exactly one):

- ``threshold``  label 1 iff score >= T (the seed's fixed cut, e.g. 0.6 on max cosine);
- ``calibrate``  T chosen on a *labelled* dev similarity artifact to maximise Cohen's kappa
                 there (the same attack and parameters are run on it); T is the midpoint of
                 the best interval of cuts, ties between equally good intervals go to the middle
                 one; the dev kappa is reported;
- ``quantile``   label 1 the top ``round((1 - Q) * R)`` images by score;
- ``balanced``   quantile 0.5: the top half;
- ``fdr``        Benjamini-Hochberg at level Q on conformal p-values (ganprint.conformal): needs
                 known non-members scored the same way, i.e. a similarity artifact made with
                 ``simmatrix --reference`` (its reference images are scored against the same
                 generated set, each left out of its own reference set) or one whose real images
                 include labelled non-members (dev data: those rows, leave-one-out).

p-values are computed (column ``pvalue``, BH-adjusted ``qvalue``) whenever such non-members exist.

``attack="auto"`` (:func:`predict_auto`): every registered attack on every feature space (one
similarity artifact per space, all of the same real images) is a candidate; ganprint.select
chooses one by repeated stratified CV on labelled dev artifacts and reports the nested-CV
estimate of the whole choice.

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
from ganprint.errors import GanprintError

RULES = ("threshold", "calibrate", "quantile", "balanced", "fdr")


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
    from ganprint.candidates import check_dev_pair

    check_dev_pair(test_prov, dev_prov, test_name, dev_name)


@dataclass
class Prediction:
    """Scores and decisions for the real images of one similarity artifact (or, for ``auto``,
    of the real images common to several)."""

    image_ids: list[str]
    scores: Any  # float64 [R]
    decision: Decision
    attack: str
    params: dict[str, Any]
    truth: Any = None  # float64 [R], nan = unknown; None when no label is known
    similarity_path: str | None = None
    similarity_provenance: dict[str, Any] = field(default_factory=dict)
    pvalues: Any = None  # float64 [R] conformal p-values vs known non-members, or None
    pvalue_info: dict[str, Any] | None = None
    selection: dict[str, Any] | None = None  # auto: every candidate's CV result, the choice, nested CV
    sources: list[dict[str, Any]] | None = None  # auto: the feature spaces (test + dev artifacts)

    @property
    def labels(self):
        return self.decision.labels


def _choose_rule(threshold, calibrate, quantile, balanced, fdr, *, auto: bool = False) -> str:
    chosen = [name for name, on in (("threshold", threshold is not None), ("calibrate", calibrate is not None and not auto),
                                    ("quantile", quantile is not None), ("balanced", balanced),
                                    ("fdr", fdr is not None)) if on]
    if auto and "threshold" in chosen:
        raise GanprintError("--attack auto: --threshold is not allowed (scores of different candidates have different "
                            "scales); use the fitted cut (default), --fdr Q, --quantile Q or --balanced")
    if len(chosen) > 1:
        raise GanprintError(f"choose one decision rule, got {' and '.join('--' + c for c in chosen)}")
    if not chosen:
        if auto:
            return "calibrate"
        raise GanprintError("choose a decision rule: --threshold T, --calibrate DEV, --quantile Q, --balanced or --fdr Q")
    return chosen[0]


def _pvalues(null, scores):
    """(p [R], info) from NullScores, or (None, None)."""
    from ganprint.conformal import conformal_pvalues

    if null is None:
        return None, None
    return conformal_pvalues(scores, null.scores, null.self_index), null.info()


def _fdr_decision(pvalues, q: float, source: str, reason: str | None = None) -> Decision:
    """BH flags at level q over the images to label (the null rows are not in the family)."""
    import numpy as np

    from ganprint.conformal import bh_flags, check_q

    q = check_q(q)
    if pvalues is None and reason:
        raise GanprintError(f"{source}: --fdr: {reason}; embed more known non-members with the test images")
    if pvalues is None:
        raise GanprintError(f"{source}: --fdr needs known non-members scored the same way: run simmatrix with "
                            "--reference EMB (embeddings whose label-0 rows, e.g. the dev real_not_used images, "
                            "are known non-members)")
    return Decision(bh_flags(pvalues, q).astype(np.int64), "fdr", None, quantile=q)


def predict(
    sim,
    attack: str = "max_sim",
    params: Mapping[str, Any] | None = None,
    *,
    threshold: float | None = None,
    calibrate=None,
    quantile: float | None = None,
    balanced: bool = False,
    fdr: float | None = None,
) -> Prediction:
    """Run ``attack`` on similarity artifact ``sim`` (path or Artifact) and apply one rule.

    ``calibrate``: a labelled dev similarity artifact (path or Artifact); ``fdr``: BH level Q on the
    conformal p-values (needs known non-members, see the module doc).
    """
    import numpy as np

    from ganprint.artifacts import Artifact
    from ganprint.attacks import resolved_params
    from ganprint.candidates import check_no_label_leak, null_scores, output_rows

    if attack == "auto":
        return predict_auto([sim], [calibrate] if calibrate is not None else [], quantile=quantile,
                            balanced=balanced, fdr=fdr, threshold=threshold)
    rule = _choose_rule(threshold, calibrate, quantile, balanced, fdr)
    params = resolved_params(attack, params)
    art = sim if isinstance(sim, Artifact) else load_similarity(sim)
    name = f"{art.base}.safetensors"
    ctx, scores = attack_scores(art, attack, params)
    ids = [str(i) for i in art.table["image_id"].tolist()]
    try:
        pvalues, pinfo = _pvalues(null_scores(art, ctx, attack, params, scores), scores)
    except GanprintError as exc:
        if rule == "fdr":
            raise
        pvalues, pinfo = None, {"null": None, "reason": str(exc)}
    # known non-members added to a test artifact are the null, not images to label
    keep = output_rows(art.table)
    scores, ids = scores[keep], [ids[i] for i in keep]
    pvalues = None if pvalues is None else pvalues[keep]
    truth_all = _truth(art.table)
    truth_out = None if truth_all is None else truth_all[keep]
    if rule == "threshold":
        dec = Decision(decide_threshold(scores, float(threshold)), rule, float(threshold))
    elif rule in ("fdr", "quantile", "balanced"):
        dec = _uncalibrated_decision(rule, scores, ids, pvalues, fdr, quantile, name)
    else:
        dev = calibrate if isinstance(calibrate, Artifact) else load_similarity(calibrate)
        dev_name = f"{dev.base}.safetensors"
        _check_dev(art.provenance, dev.provenance, name, dev_name)
        check_no_label_leak(dev)
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
    return Prediction(ids, scores, dec, attack, params, truth_out, str(Path(art.base).resolve()),
                      dict(art.provenance), pvalues, pinfo)


def predict_auto(
    sims,
    calibrate,
    *,
    attacks: list[str] | None = None,
    config=None,
    quantile: float | None = None,
    balanced: bool = False,
    fdr: float | None = None,
    threshold: float | None = None,
    nested: bool = True,
    null_fraction: float | None = None,
) -> Prediction:
    """Automatic selection (ganprint.select) over every (feature space, attack) candidate.

    ``sims``: similarity artifacts (paths or Artifacts) of the images to label, one per feature
    space, all of the same real images; ``calibrate``: the labelled dev similarity artifact of each
    of those feature spaces (any order).  ``config``: ganprint.select.SelectConfig.  Decision: the
    chosen procedure's kappa-optimal cut fitted on dev (default), ``fdr`` Q (BH on conformal
    p-values), ``quantile`` or ``balanced``.

    p-values: the known non-members of the test artifacts (the null) that are also labelled dev
    images are split (ganprint.conformal.calibration_split, seeded by ``config.seed``): a share
    ``null_fraction`` of them, whole near-duplicate groups, is held out of selection and is the
    null; the rest enters selection and leaves the null.  Known non-members that are not dev images
    (a reference pool) always calibrate; ``null_fraction`` None (auto) is 0 when there are such
    images, else 0.5.  The split is recorded under ``selection.calibration_split``.
    """
    import numpy as np

    from ganprint.candidates import collect, load_spaces
    from ganprint.conformal import calibration_split
    from ganprint.select import SINGLE, SelectConfig, candidate_matrix, select

    rule = _choose_rule(threshold, None, quantile, balanced, fdr, auto=True)
    cfg = config or SelectConfig()
    spaces, test_ids, dev_ids = load_spaces(list(sims), list(calibrate or []))
    cands, skipped = collect(spaces, attacks=attacks)
    X_dev, X_test, names = candidate_matrix(cands)
    y = _truth(spaces[0].dev.table)
    if y is None:
        raise GanprintError(f"{spaces[0].dev.base}.safetensors: has no labels; --calibrate needs a dev set with "
                            "real_used/ and real_not_used/ images")
    y = y[spaces[0].dev_order]
    known = np.isfinite(y)
    yk = y[known].astype(np.int64)
    kid = [i for i, k in zip(dev_ids, known) if k]
    groups, ginfo = _dev_groups(spaces, known, yk)
    # the known non-members that calibrate the p-values must not take part in the selection
    null0 = next((c.null for c in cands if c.null is not None), None)
    # selection keeps enough near-duplicate groups of each class for its nested CV
    split = calibration_split(kid, yk, groups, null0.ids if null0 is not None else [], null_fraction, cfg.seed,
                              min_groups=max(2, cfg.folds))
    sm = split.selection if split.ok else np.ones(len(yk), dtype=bool)
    g_sel, ginfo = _restrict_groups(groups, ginfo, sm, yk)
    sel = select(X_dev[known][sm], yk[sm], names, cfg, nested=nested, groups=g_sel)
    proc = sel.procedure
    scores = sel.score(X_test)
    used = [cands[j] for j in proc.columns]
    pvalues, pinfo = _calibrated_pvalues(cands, used, split, proc, scores, X_test.shape[1])
    # known non-members added to the test artifacts are the null, not images to label
    from ganprint.candidates import output_rows

    t0 = spaces[0].test
    out_ids = {str(t0.table["image_id"].iloc[int(r)]) for r in output_rows(t0.table)}
    keep = np.asarray([n for n, i in enumerate(test_ids) if i in out_ids], dtype=np.int64)
    X_test, scores, test_ids = X_test[keep], scores[keep], [test_ids[n] for n in keep]
    pvalues = None if pvalues is None else pvalues[keep]
    name = "+".join(f"{s.test.base}" for s in spaces)
    if rule in ("fdr", "quantile", "balanced"):
        dec = _uncalibrated_decision(rule, scores, test_ids, pvalues, fdr, quantile, name,
                                     (pinfo or {}).get("reason"))
    else:
        dec = Decision(sel.decide(X_test), "calibrate", float(proc.threshold),
                       dev={"paths": [str(Path(s.dev.base).resolve()) for s in spaces], "n": int(sm.sum()),
                            "n_pos": int(yk[sm].sum())})
    info = sel.to_dict()
    info["candidate_info"] = {c.name: c.info for c in cands}
    info["skipped"] = skipped
    info["groups"] = ginfo
    info["calibration_split"] = split.info
    chosen_space = next((s for s in spaces if s.name == used[0].info.get("space")), spaces[0])
    truth = _truth(spaces[0].test.table)
    if truth is not None:
        truth = truth[spaces[0].test_order][keep]
    params = dict(used[0].info.get("params") or {}) if proc.kind == SINGLE else {}
    return Prediction(test_ids, scores, dec, "auto", params, truth, str(Path(chosen_space.test.base).resolve()),
                      dict(chosen_space.test.provenance), pvalues, pinfo, info,
                      [s.describe() for s in spaces])


def _calibrated_pvalues(cands, used, split, proc, scores, F: int):
    """(p [M], info) of the chosen procedure's test ``scores`` against the null scores of the
    calibration images (``split.calibration_ids``) in every column it uses; (None, info or None)."""
    import numpy as np

    from ganprint.conformal import conformal_pvalues

    nulls = [c.null for c in used]
    if not nulls or any(n is None for n in nulls):
        return None, None
    if not split.ok:
        return None, {"null": None, "reason": split.info.get("reason")}
    ref = nulls[0]
    if any(n.ids != ref.ids or n.source != ref.source for n in nulls):
        return None, {"null": None, "reason": "the chosen candidate's columns have null scores of different images"}
    cal = set(split.calibration_ids)
    rows = np.asarray([r for r, i in enumerate(ref.ids) if i in cal], dtype=np.int64)
    if len(rows) == 0:
        return None, {"null": None, "reason": "no calibration image among the chosen candidate's null images"}
    N = np.full((len(rows), F), np.nan)
    for j, c in enumerate(cands):  # every column with null scores of the same images
        if c.null is not None and c.null.ids == ref.ids and c.null.source == ref.source:
            N[:, j] = np.asarray(c.null.scores, dtype=np.float64)[rows]
    remap = np.full(len(ref.ids), -1, dtype=np.int64)
    remap[rows] = np.arange(len(rows))
    si = np.asarray(ref.self_index, dtype=np.int64)
    self_index = np.where(si >= 0, remap[np.maximum(si, 0)], -1)  # a test image that is a calibration image
    p = conformal_pvalues(scores, proc.score(N), self_index)
    return p, {**ref.info(), "n_null": int(len(rows)), "n_left_out": int((self_index >= 0).sum()),
               "n_null_offered": int(len(ref.ids)), "split": "calibration_split"}


def _uncalibrated_decision(rule: str, scores, ids, pvalues, fdr, quantile, name: str,
                           reason: str | None = None) -> "Decision":
    """The rules that need no dev labels: ``fdr`` (BH on the p-values), ``quantile``, ``balanced``."""
    if rule == "fdr":
        return _fdr_decision(pvalues, fdr, name, reason)
    q = 0.5 if rule == "balanced" else float(quantile)
    labels, thr = decide_quantile(scores, q, ids)
    return Decision(labels, rule, thr, quantile=q)


def _dev_groups(spaces, known, y):
    """Near-duplicate groups (ganprint.groups) of the labelled dev images [n] from every space's dev
    real embeddings, so that selection's CV never splits neighbouring slices of one patient.
    (None, why) where an embeddings artifact is not at hand or too few groups would remain."""
    import numpy as np

    from ganprint.groups import near_duplicate_groups

    embs = []
    for sp in spaces:
        try:
            emb = sp.context("dev").embeddings("real")
        except GanprintError as exc:
            return None, {"rule": None, "reason": str(exc)}
        embs.append(np.asarray(emb, dtype=np.float32)[np.asarray(sp.dev_order)][known])
    g = near_duplicate_groups(embs)
    per_class = [len(np.unique(g[y == c])) for c in (0, 1)]
    info = {"rule": "near_duplicate_groups(k=10, ratio=0.25)", "n": int(len(g)), "n_groups": int(len(np.unique(g))),
            "groups_per_class": per_class}
    if min(per_class) < 2:
        return None, {**info, "rule": None, "reason": "fewer than 2 groups in a class: every image its own group"}
    return g, info


def _restrict_groups(groups, info, mask, y):
    """The groups of the rows ``mask`` that enter selection, with their counts; None (every image
    alone) when fewer than 2 groups of a class remain."""
    import numpy as np

    if groups is None:
        return None, info
    g = np.asarray(groups)[mask]
    per_class = [len(np.unique(g[y[mask] == c])) for c in (0, 1)]
    out = {**info, "n": int(len(g)), "n_groups": int(len(np.unique(g))), "groups_per_class": per_class}
    if min(per_class) < 2:
        return None, {**out, "rule": None, "reason": "fewer than 2 groups in a class: every image its own group"}
    return g, out


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
    if pred.pvalues is not None:
        from ganprint.conformal import bh_adjust

        table["pvalue"] = np.asarray(pred.pvalues, dtype=np.float64)
        table["qvalue"] = bh_adjust(pred.pvalues)
    return table


def write_scores(pred: Prediction, out: str | os.PathLike) -> Path:
    """The scores artifact (docs/ARTIFACTS.md): table + tensor ``scores`` float32 [R]."""
    import torch

    from ganprint.artifacts import base_provenance, write_artifact

    d = pred.decision
    extra: dict[str, Any] = {}
    if pred.selection is not None:
        extra["selection"] = pred.selection
        extra["sources"] = pred.sources
    prov = base_provenance(
        "scores", "predict",
        attack=pred.attack,
        params=pred.params,
        rule=d.rule,
        threshold=d.threshold,
        quantile=d.quantile if d.rule != "fdr" else None,
        fdr=d.quantile if d.rule == "fdr" else None,
        dev_kappa=d.dev_kappa,
        dev=d.dev,
        pvalues=pred.pvalue_info,
        similarity_path=pred.similarity_path,
        similarity=pred.similarity_provenance,
        rows=len(pred.image_ids),
        **extra,
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
    fdr: float | None = None,
    config=None,
    null_fraction: float | None = None,
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
    if attack == "auto":
        if params:
            raise GanprintError("--attack auto: --param is not allowed (every attack runs with its defaults)")
        sims = list(sim) if isinstance(sim, (list, tuple)) else [sim]
        devs = list(calibrate) if isinstance(calibrate, (list, tuple)) else ([] if calibrate is None else [calibrate])
        pred = predict_auto(sims, devs, config=config, threshold=threshold, quantile=quantile, balanced=balanced,
                            fdr=fdr, null_fraction=null_fraction)
    else:
        if isinstance(sim, (list, tuple)) or isinstance(calibrate, (list, tuple)):
            sims = list(sim) if isinstance(sim, (list, tuple)) else [sim]
            devs = list(calibrate) if isinstance(calibrate, (list, tuple)) else [calibrate]
            if len(sims) > 1 or len(devs) > 1:
                raise GanprintError(f"{len(sims)} similarity and {len(devs)} --calibrate artifacts: several feature "
                                    "spaces need --attack auto")
            sim, calibrate = sims[0], devs[0]
        pred = predict(sim, attack, params, threshold=threshold, calibrate=calibrate, quantile=quantile,
                       balanced=balanced, fdr=fdr)
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
