"""Conformal p-values against known non-members, and Benjamini-Hochberg FDR control.

A membership score s (higher = more likely a member) of a real image is compared with the
scores of *known non-members* computed the same way (same attack, same generated set):

    p = (1 + #{j : ref_j >= s}) / (n_ref + 1)

If the image is itself a non-member exchangeable with the reference images, p is
super-uniform (P(p <= a) <= a for every a), whatever the score's distribution.  Such p-values
are PRDS, so Benjamini-Hochberg on them controls the false discovery rate (Bates, Candes, Lei,
Romano, Sesia 2023, "Testing for outliers with conformal p-values").  When the image is one of
the reference images, it is left out of its own reference set (``self_index``).

Public API (numpy in, numpy out; no torch):

- :func:`conformal_pvalues` (scores [n], ref [m], self_index [n] or None) -> p float64 [n]
- :func:`bh_adjust` (p [n]) -> BH-adjusted p-values (q-values) [n] (scipy's ``false_discovery_control``)
- :func:`bh_flags` (p [n], q) -> bool [n]: the BH discoveries at level q
- :func:`realised_fdr` (flags [n], truth [n]) -> (fdr, recall): false flags / flags, flagged members / members
- :func:`calibration_split` (dev ids, labels, groups, null ids, fraction, seed) -> :class:`CalibrationSplit`:
  which known non-members calibrate the p-values and which labelled dev images enter selection

Selection and calibration must not share images.  The guarantee above holds for a *fixed* score
function; ``predict --attack auto`` chooses the score function on labelled dev images, and when the
known non-members of the null are among them, the choice favours candidates under which exactly
those images score low: the null is then too low and the p-values of fresh non-members too small
(realised FDR 0.17 and 0.23 at Q = 0.1 on two synth runs).  :func:`calibration_split` holds a
seeded part of them out of selection (whole near-duplicate groups, so that no sibling slice of a
calibration image is seen by selection); only that part is the null.  Given the selection, the
calibration images and the test non-members are exchangeable again.  What else exchangeability
needs, and how ganprint provides it: the null images are scored in the test images' own context
(embedded with them: same generated set, the other real images as reference, each image left out
of its own comparisons), and a near-duplicate group (neighbouring slices of one patient) is
either all calibration or all selection, so a calibration image, like a test image, has its
siblings among the scored real images.  Ties count against the image.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

from ganprint.errors import GanprintError


def conformal_pvalues(scores, ref_scores, self_index=None):
    """p_i = (1 + #{j != self_index[i] : ref_j >= s_i}) / (n_ref_i + 1), float64 [n].

    ``scores`` [n]: scores to test; ``ref_scores`` [m]: scores of known non-members (m >= 1);
    ``self_index`` int [n]: the reference row that *is* image i (left out: n_ref_i = m - 1), or -1.
    Ties count against the image (>=), which keeps p super-uniform.
    """
    import numpy as np

    s = np.asarray(scores, dtype=np.float64).ravel()
    ref = np.asarray(ref_scores, dtype=np.float64).ravel()
    if len(ref) == 0:
        raise GanprintError("conformal p-values need at least one known non-member score")
    if not (np.isfinite(s).all() and np.isfinite(ref).all()):
        raise GanprintError("conformal p-values: scores contain non-finite values")
    srt = np.sort(ref)
    ge = len(srt) - np.searchsorted(srt, s, side="left")  # #{ref >= s}
    n_ref = np.full(len(s), float(len(srt)))
    if self_index is not None:
        idx = np.asarray(self_index, dtype=np.int64).ravel()
        if idx.shape != s.shape:
            raise GanprintError(f"self_index has {len(idx)} entries for {len(s)} scores")
        if (idx >= len(ref)).any():
            raise GanprintError("self_index points past the reference scores")
        own = idx >= 0
        if own.any():
            if len(ref) < 2:
                raise GanprintError("leave-one-out p-values need at least two known non-members")
            # the image's own reference score is >= itself only if it is the same score (or larger)
            ge = ge - (own & (ref[np.where(own, idx, 0)] >= s)).astype(ge.dtype)
            n_ref = n_ref - own
    return (1.0 + ge) / (n_ref + 1.0)


def bh_adjust(pvalues):
    """Benjamini-Hochberg adjusted p-values (float64 [n]): image i is a discovery at level q iff
    adjusted_i <= q.  scipy.stats.false_discovery_control(method='bh')."""
    import numpy as np
    from scipy.stats import false_discovery_control

    p = np.asarray(pvalues, dtype=np.float64).ravel()
    if len(p) == 0:
        return p
    if not ((p >= 0) & (p <= 1)).all():
        raise GanprintError("p-values must lie in [0, 1]")
    return np.asarray(false_discovery_control(p, method="bh"), dtype=np.float64)


def check_q(q: float) -> float:
    import math

    if not (isinstance(q, (int, float)) and math.isfinite(q) and 0.0 < q < 1.0):
        raise GanprintError(f"--fdr {q}: the target false discovery rate must be in (0, 1), e.g. 0.1")
    return float(q)


def bh_flags(pvalues, q: float):
    """bool [n]: Benjamini-Hochberg discoveries at FDR level ``q`` (0 < q < 1)."""
    q = check_q(q)
    return bh_adjust(pvalues) <= q


def realised_fdr(flags, truth) -> tuple[float, float | None]:
    """(false flags / flags (0 when nothing is flagged), flagged members / members (None without members))."""
    import numpy as np

    f = np.asarray(flags).astype(bool).ravel()
    y = np.asarray(truth).astype(np.int64).ravel()
    if f.shape != y.shape:
        raise GanprintError(f"{len(f)} flags but {len(y)} truth labels")
    n_flag = int(f.sum())
    fdr = float((f & (y == 0)).sum() / n_flag) if n_flag else 0.0
    n_pos = int((y == 1).sum())
    recall = float((f & (y == 1)).sum() / n_pos) if n_pos else None
    return fdr, recall


def summary(pvalues, q: float | None = None) -> dict[str, Any]:
    """JSON-able summary: n, min p, and (with q) the number of BH discoveries."""
    import numpy as np

    p = np.asarray(pvalues, dtype=np.float64)
    out: dict[str, Any] = {"n": int(len(p)), "min_p": float(p.min()) if len(p) else None}
    if q is not None:
        out["q"] = float(q)
        out["n_flagged"] = int(bh_flags(p, q).sum())
    return out


# ---------------------------------------------------------------------------------------------
# selection / calibration split of the known non-members


@dataclass
class CalibrationSplit:
    """``selection`` bool [n]: labelled dev rows that may enter selection; ``calibration_ids``: the
    null images whose scores calibrate the p-values (none of them, nor a near-duplicate of one, is
    in selection); ``ok`` False (with ``info['reason']``) when no valid split exists."""

    selection: Any
    calibration_ids: list[str]
    ok: bool
    info: dict[str, Any] = field(default_factory=dict)


def _group_key(seed: int, ids: Sequence[str]) -> bytes:
    import hashlib

    # by content of the ids, not their position: the split does not depend on the input order
    return hashlib.sha256(f"{int(seed)}|{min(ids)}".encode()).digest()


AUTO_FRACTION = 0.5  # the held-out share when no known non-member lies outside the dev set


def resolve_fraction(fraction: float | None, n_outside: int) -> tuple[float, str]:
    """(the share of the dev set's known non-members held out of selection, why).

    ``None`` (auto): 0 when known non-members outside the labelled dev set are offered (a reference
    pool: they calibrate without costing selection a single labelled image), else 0.5."""
    if fraction is None:
        if n_outside:
            return 0.0, (f"auto: {n_outside} known non-members outside the dev set calibrate; every labelled "
                         "dev image enters selection")
        return AUTO_FRACTION, (f"auto: no known non-member outside the dev set; {AUTO_FRACTION:g} of the dev "
                               "set's are held out of selection to calibrate")
    if not (0.0 <= float(fraction) < 1.0):
        raise GanprintError(f"--null-fraction {fraction}: the share of known non-members held out of selection to "
                            "calibrate the p-values must be in [0, 1), e.g. 0.5 (or auto)")
    return float(fraction), "given"


def calibration_split(dev_ids, labels, groups, null_ids, fraction: float | None = None, seed: int = 0,
                      min_groups: int = 2) -> CalibrationSplit:
    """Split the known non-members between selection and p-value calibration.

    ``dev_ids`` [n] / ``labels`` [n] (0/1): the labelled dev images; ``groups`` int [n] or None
    (near-duplicate groups; None = every image alone); ``null_ids``: the images whose scores, in
    the test context, form the null.  Null images that are not labelled dev images never influence
    selection and always calibrate.  Of the groups holding a null image that is a dev image, a
    seeded share (``fraction`` of those images, whole groups, ordered by a digest of seed and
    ids) is held out: its dev rows leave selection, its null images calibrate; the others stay in
    selection and leave the null.  Selection keeps at least ``min_groups`` groups of each class.
    ``fraction`` None: :func:`resolve_fraction`'s rule.
    """
    import numpy as np

    ids = [str(i) for i in dev_ids]
    y = np.asarray(labels, dtype=np.int64)
    n = len(ids)
    g = np.arange(n) if groups is None else np.asarray(groups)
    nulls = [str(i) for i in null_ids]
    dev_pos = {i: r for r, i in enumerate(ids)}
    overlap = [dev_pos[i] for i in nulls if i in dev_pos]
    outside = [i for i in nulls if i not in dev_pos]
    fraction, why = resolve_fraction(fraction, len(outside))
    info: dict[str, Any] = {"rule": "known non-members that are labelled dev images: a seeded share of their "
                                    "near-duplicate groups calibrates the p-values, the rest enters selection",
                            "fraction": float(fraction), "fraction_reason": why, "seed": int(seed), "n_null": len(nulls),
                            "n_null_outside_dev": len(outside), "n_null_in_dev": len(overlap)}
    keep = np.ones(n, dtype=bool)
    if not overlap or fraction == 0.0:
        if not outside:
            info.update({"n_calibration": 0, "n_selection": n, "n_held_out_of_selection": 0, "calibration_ids": [],
                         "reason": ("no known non-members offered" if not nulls else
                                    "--null-fraction 0 keeps every dev non-member in selection and no known "
                                    "non-member lies outside the dev set") + "; no p-values"})
            return CalibrationSplit(keep, [], False, info)
        info.update({"n_calibration": len(outside), "n_selection": n, "n_held_out_of_selection": 0,
                     "n_selection_nonmembers": int((y == 0).sum()), "calibration_ids": sorted(outside)})
        return CalibrationSplit(keep, sorted(outside), True, info)
    in_null = np.zeros(n, dtype=bool)
    in_null[overlap] = True
    cand = sorted({int(v) for v in g[in_null]},
                  key=lambda v: _group_key(seed, [ids[r] for r in np.flatnonzero(g == v)]))
    target = int(round(float(fraction) * len(overlap)))

    def groups_left(mask, c):
        return len(np.unique(g[mask & (y == c)]))

    chosen: list[int] = []
    held = 0
    for v in cand:
        if held >= target:
            break
        rows = g == v
        trial = keep & ~rows
        if min(groups_left(trial, 0), groups_left(trial, 1)) < min_groups:
            continue  # selection would lose a class: keep this group there
        keep, held = trial, held + int((rows & in_null).sum())
        chosen.append(v)
    cal_dev = [ids[r] for r in overlap if not keep[r]]
    cal = sorted(set(cal_dev) | set(outside))
    info.update({"n_calibration": len(cal), "n_calibration_from_dev": len(cal_dev), "n_selection": int(keep.sum()),
                 "n_held_out_of_selection": int((~keep).sum()),
                 "n_selection_nonmembers": int((keep & (y == 0)).sum()), "calibration_ids": cal})
    if not cal:
        info["reason"] = (f"too few known non-members to hold some out of selection ({len(overlap)} in the dev set, "
                          f"selection needs {min_groups} near-duplicate groups of each class); no p-values")
        return CalibrationSplit(np.ones(n, dtype=bool), [], False, info)
    return CalibrationSplit(keep, cal, True, info)
