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
"""

from __future__ import annotations

from typing import Any

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
