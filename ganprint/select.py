"""Honest automatic selection among membership scores: rank by repeated stratified k-fold CV,
choose one, and estimate the whole choose-then-fit procedure by nested CV.

Candidates are score columns on the same labelled images: X [N, F] (higher = more likely a
member), y [N] in {0, 1}.  Column j is typically one (feature space, attack) pair; any other score
(e.g. a copy-verification score) joins simply as another column.  Two combined candidates are
added when F >= 2, both built on the training part only:

- ``mean(top-m)``: the mean of the z-scored top-m columns (by AUC on the training part): no
  fitted weights, the low-variance combination;
- ``stack(top-m)``: StandardScaler + LogisticRegression with strong L2 (``C`` small) on those
  columns (the issue's "regularised stacking of the few best").

The procedure ``choose-then-fit`` on a labelled set (X, y):

1. every candidate's AUC on the validation folds of RepeatedStratifiedKFold (and kappa of the cut
   chosen on the training folds, applied to the validation fold);
2. the best mean CV AUC wins, but **differences within noise go to the simpler candidate**: a
   combination is only chosen if the best single column is more than ``noise`` corrected
   standard errors below it (one-standard-error rule; the SE of the paired fold-wise difference
   with the Nadeau-Bengio correction for overlapping training sets); and the single columns
   within ``noise`` SEs of the best are not told apart by these labels, so with ``window`` (the
   default) they are averaged, the mean of their z-scores (Occam's window; a column repeating
   another's values counts once), instead of betting on the one that ranked first by chance;
3. the winner is refit on all of (X, y): its columns, z-scoring/logistic weights, and the cut
   "score >= t" maximising Cohen's kappa (for the combinations: on out-of-fold scores).

:func:`select` runs it on the full labelled set and, with ``nested=True``, evaluates the *whole
procedure* by an outer RepeatedStratifiedKFold: each outer training part runs steps 1-3 from
scratch (its own inner CV, its own choice), and the fitted procedure is scored on the outer test
fold it never saw.  Mean and a corrected-t 95% CI (Nadeau & Bengio 2003) of those outer AUCs and
kappas are the honest estimate; the in-sample number is never reported as one.  The pooled
out-of-fold scores of the first outer repeat also test whether there is membership signal at all
(one-sided rank test, over near-duplicate groups): where it is not significant, the choice among
candidates is a guess at this dev size, and the report says so.

Public API:

- ``SelectConfig`` (folds, repeats, outer_folds, outer_repeats, top, C, noise, window, seed)
- ``select(X, y, names, config=None, nested=True) -> Selection``
  (``.chosen``, ``.candidates`` [CandidateCV], ``.procedure``, ``.nested``, ``.to_dict()``,
  ``.score(X_new) -> float64 [M]``, ``.decide(X_new) -> int64 [M]``)
- ``choose(X, y, names, config) -> (Choice, reason, [CandidateCV])`` and
  ``fit_procedure(X, y, choice, names, config) -> Procedure`` (steps 1-2 and 3)
- ``nested_cv(X, y, names, config, splits=None) -> NestedEstimate`` (AUC / kappa with CIs, and
  ``.signal_p`` / ``.signal``: is there membership signal on the labelled images at all?)
- ``oof_rank_pvalue(y, oof, groups)`` and ``ecdf_position``: that test, also used by ganprint.audit.
- ``CandidateScores`` + ``candidate_matrix``: named score vectors (dev / test / null) -> matrices.

Every entry point takes ``groups`` (int [N], default None = every image alone): given, all CV
splits (inner, outer, the cut of a combination) are StratifiedGroupKFold, so near-duplicate images
of one patient are never on both sides of a split.

Deterministic: same inputs + same ``seed`` -> same choice, fit and estimate.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

from ganprint.errors import GanprintError

MEAN, STACK, SINGLE = "mean", "stack", "single"


@dataclass(frozen=True)
class SelectConfig:
    """Parameters of the selection procedure (all have safe defaults for 40-500 labelled images)."""

    folds: int = 5  # inner CV (ranking): RepeatedStratifiedKFold(folds, repeats)
    repeats: int = 4
    outer_folds: int = 5  # nested CV (the estimate): RepeatedStratifiedKFold(outer_folds, outer_repeats)
    outer_repeats: int = 2
    top: int = 3  # columns in the combinations
    C: float = 0.05  # inverse L2 strength of the stacker (on standardised scores)
    noise: float = 1.0  # one-standard-error rule: combinations must beat the best single by this many SEs
    # Occam's window: the single candidates within ``noise`` SEs of the best are averaged (mean of
    # their z-scores) instead of betting on the one that happened to rank first; False: the best alone
    window: bool = True
    seed: int = 0

    def validate(self) -> "SelectConfig":
        for key in ("folds", "outer_folds"):
            if getattr(self, key) < 2:
                raise GanprintError(f"selection: {key}={getattr(self, key)} must be at least 2")
        for key in ("repeats", "outer_repeats", "top"):
            if getattr(self, key) < 1:
                raise GanprintError(f"selection: {key}={getattr(self, key)} must be at least 1")
        if not (self.C > 0 and math.isfinite(self.C)):
            raise GanprintError(f"selection: C={self.C} must be a positive number")
        if not (self.noise >= 0 and math.isfinite(self.noise)):
            raise GanprintError(f"selection: noise={self.noise} must be >= 0")
        return self


# ---------------------------------------------------------------------------------------------
# candidates as named score vectors


@dataclass
class CandidateScores:
    """One candidate: scores of the labelled images (``dev`` [N]), of the images to label
    (``test`` [M] or None) and of known non-members scored the same way as ``test`` (``null``
    [K] or None, for conformal p-values).  ``info``: JSON-able description (feature space, attack...)."""

    name: str
    dev: Any
    test: Any = None
    null: Any = None
    null_self: Any = None  # int [M]: the null row that is test image i (leave-one-out), -1 none
    info: dict[str, Any] = field(default_factory=dict)


def candidate_matrix(cands: Sequence[CandidateScores]):
    """(X_dev [N, F], X_test [M, F] or None, names [F]) from candidates of equal lengths."""
    import numpy as np

    if not cands:
        raise GanprintError("selection: no candidate scores")
    names = [c.name for c in cands]
    if len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise GanprintError(f"selection: candidate name '{dup}' appears twice")
    X = np.column_stack([np.asarray(c.dev, dtype=np.float64) for c in cands])
    tests = [c.test for c in cands]
    Xt = None
    if all(t is not None for t in tests):
        lens = {len(t) for t in tests}
        if len(lens) != 1:
            raise GanprintError("selection: candidates score different numbers of test images")
        Xt = np.column_stack([np.asarray(t, dtype=np.float64) for t in tests])
    return X, Xt, names


# ---------------------------------------------------------------------------------------------
# small numeric helpers


def _auc_columns(y, S):
    """ROC AUC of every column of S [n, c] against y [n] (Mann-Whitney, ties 1/2) -> float64 [c]."""
    import numpy as np
    from scipy.stats import rankdata

    y = np.asarray(y).astype(bool)
    n1, n0 = int(y.sum()), int((~y).sum())
    if n1 == 0 or n0 == 0:
        return np.full(S.shape[1], np.nan)
    r = rankdata(S, axis=0)
    return (r[y].sum(0) - n1 * (n1 + 1) / 2.0) / (n1 * n0)


def kappa_cut(scores, y) -> tuple[float, float]:
    """(t, kappa): the cut "score >= t" maximising Cohen's kappa on (scores, y); among equally good
    intervals of cuts the middle one, t the midpoint between the neighbouring scores."""
    import numpy as np

    from ganprint.metrics import kappa_scan

    cuts, kap = kappa_scan(np.asarray(y), scores)
    best = np.flatnonzero(kap >= kap.max() - 1e-12)
    j = int(best[len(best) // 2])
    thr = float(cuts[j])
    if 0 < j < len(cuts) - 1:
        mid = 0.5 * (cuts[j] + cuts[j + 1])
        if cuts[j + 1] < mid <= cuts[j]:
            thr = float(mid)
    return thr, float(kap[j])


def _kappa(y, pred) -> float:
    import numpy as np

    from ganprint.metrics import kappa_from_counts

    y, p = np.asarray(y).astype(bool), np.asarray(pred).astype(bool)
    k = kappa_from_counts((y & p).sum(), (~y & p).sum(), (y & ~p).sum(), (~y & ~p).sum())
    k = float(k)
    return 0.0 if math.isnan(k) else k


class _RepeatedStratifiedGroupKFold:
    """StratifiedGroupKFold repeated with shuffled seeds: a group (e.g. near-duplicate slices of
    one patient) is never split between training and validation folds."""

    def __init__(self, n_splits: int, n_repeats: int, random_state: int, groups):
        self.cvargs = {"n_splits": n_splits}
        self.n_repeats, self.random_state, self.groups = n_repeats, random_state, groups

    def split(self, X, y):
        import numpy as np
        from sklearn.model_selection import StratifiedGroupKFold

        rng = np.random.RandomState(self.random_state)
        for _ in range(self.n_repeats):
            cv = StratifiedGroupKFold(n_splits=self.cvargs["n_splits"], shuffle=True,
                                      random_state=int(rng.randint(2**31 - 1)))
            yield from cv.split(X, y, self.groups)


def _splitter(y, folds: int, repeats: int, seed: int, groups=None):
    """RepeatedStratifiedKFold with at most as many folds as the minority class has images (groups:
    int [N] or None; given, folds never split a group and the count is of groups per class)."""
    import numpy as np
    from sklearn.model_selection import RepeatedStratifiedKFold

    y = np.asarray(y, dtype=np.int64)
    if groups is None:
        minority = int(np.bincount(y, minlength=2).min())
    else:
        g = np.asarray(groups)
        minority = min(len(np.unique(g[y == c])) for c in (0, 1))
    k = min(folds, minority)
    if k < 2:
        raise GanprintError(f"selection: needs at least 2 members and 2 non-members per split, got {minority} "
                            "in the smaller class; label more dev images")
    if groups is None:
        return RepeatedStratifiedKFold(n_splits=k, n_repeats=repeats, random_state=seed)
    return _RepeatedStratifiedGroupKFold(k, repeats, seed, np.asarray(groups))


def _corrected_ci(values, n_train: float, n_test: float, level: float = 0.95, bounds=(-1.0, 1.0)):
    """Mean and Nadeau-Bengio corrected-t CI (clipped to ``bounds``) of J fold values from repeated CV."""
    import numpy as np
    from scipy.stats import t as student

    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    J = len(v)
    if J == 0:
        return None, None
    mean = float(v.mean())
    if J < 2:
        return mean, None
    var = float(v.var(ddof=1))
    se = math.sqrt((1.0 / J + n_test / max(n_train, 1.0)) * var)
    h = float(student.ppf(0.5 + level / 2, J - 1)) * se
    return mean, [max(bounds[0], mean - h), min(bounds[1], mean + h)]


SIGNAL_ALPHA = 0.01  # membership signal on the labelled images: out-of-fold rank test p below this


def ecdf_position(ref_sorted, s):
    """Share of ``ref_sorted`` [K] (ascending) below each of s [M] (ties half) -> float64 [M]: a
    scale shared by procedures fitted on different folds (their raw scores are not comparable)."""
    import numpy as np

    lo = np.searchsorted(ref_sorted, s, side="left")
    hi = np.searchsorted(ref_sorted, s, side="right")
    return (lo + hi) / (2.0 * max(len(ref_sorted), 1))


def oof_rank_pvalue(y, oof, groups=None) -> float:
    """One-sided Mann-Whitney p-value of "members score higher" on pooled out-of-fold scores oof [n]
    (y [n] in {0, 1}): each fold's held-out scores come from a procedure fitted without them (folds
    keep groups whole), so under no signal the two classes' scores are exchangeable.  With
    ``groups`` [n] the test is over groups, not images: the unit is (group, label) with its mean
    out-of-fold score, because near-duplicate slices of one patient are one piece of evidence."""
    import numpy as np
    import pandas as pd
    from scipy.stats import mannwhitneyu

    y = np.asarray(y).astype(np.int64)
    oof = np.asarray(oof, dtype=np.float64)
    if groups is not None:
        unit = pd.DataFrame({"g": np.asarray(groups), "y": y, "s": oof}).groupby(["g", "y"], sort=True)["s"].mean()
        y = unit.index.get_level_values("y").to_numpy()
        oof = unit.to_numpy()
    yb = y.astype(bool)
    return float(mannwhitneyu(oof[yb], oof[~yb], alternative="greater").pvalue)


def signal_sentence(p: float | None, unit: str = "image", alpha: float = SIGNAL_ALPHA) -> str:
    """The line a user reads about :attr:`NestedEstimate.signal_p` (also from its JSON form)."""
    if p is None:
        return "membership signal on the labelled images: not tested"
    what = "near-duplicate groups" if unit != "image" else "images"
    if p < alpha:
        return f"membership signal on the labelled images: significant (out-of-fold rank test over {what}, p = {p:.2g})"
    return (f"membership signal on the labelled images: not significant (out-of-fold rank test over {what}, "
            f"p = {p:.2g} >= {alpha:g}): at this dev size the choice among candidates is a guess")


# ---------------------------------------------------------------------------------------------
# fitted procedures


@dataclass
class Procedure:
    """A fitted candidate: ``score(X)`` float64 [M] from the columns ``columns`` of X [M, F],
    ``decide(X)`` = score >= ``threshold``."""

    kind: str  # single | mean | stack
    name: str
    columns: list[int]
    threshold: float
    center: list[float] | None = None  # mean / stack: z-scoring of the columns (training part)
    scale: list[float] | None = None
    coef: list[float] | None = None  # stack: logistic weights on z-scored columns
    intercept: float | None = None
    train_kappa: float | None = None  # kappa of the cut where it was chosen (in-sample / OOF)
    inputs: list[str] | None = None  # window: the names of its columns (best CV AUC first)

    def score(self, X):
        import numpy as np

        X = np.asarray(X, dtype=np.float64)
        Z = X[:, self.columns]
        if self.kind == SINGLE:
            return Z[:, 0].copy()
        Z = (Z - np.asarray(self.center)) / np.asarray(self.scale)
        if self.kind == MEAN:
            return Z.mean(1)
        z = Z @ np.asarray(self.coef) + float(self.intercept)
        return 1.0 / (1.0 + np.exp(-z))

    def decide(self, X):
        import numpy as np

        return (self.score(X) >= self.threshold).astype(np.int64)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _top_columns(X, y, top: int) -> list[int]:
    import numpy as np

    auc = _auc_columns(y, X)
    order = np.lexsort((np.arange(len(auc)), -np.nan_to_num(auc, nan=0.0)))  # AUC desc, then column
    return [int(j) for j in order[:min(top, X.shape[1])]]


def _zscore_params(Z):
    import numpy as np

    c = Z.mean(0)
    s = Z.std(0)
    s = np.where(s > 1e-12, s, 1.0)  # a constant column contributes nothing, never a division by 0
    return c, s


def _fit_combo(kind: str, X, y, cfg: SelectConfig, name: str) -> Procedure:
    """mean / stack on the top columns of (X, y); threshold not set yet."""
    import numpy as np
    from sklearn.linear_model import LogisticRegression

    cols = _top_columns(X, y, cfg.top)
    c, s = _zscore_params(X[:, cols])
    proc = Procedure(kind, name, cols, 0.0, center=c.tolist(), scale=s.tolist())
    if kind == STACK:
        Z = (X[:, cols] - c) / s
        lr = LogisticRegression(C=cfg.C, solver="newton-cholesky", max_iter=100).fit(Z, np.asarray(y, dtype=np.int64))
        proc.coef = [float(v) for v in lr.coef_[0]]
        proc.intercept = float(lr.intercept_[0])
    return proc


def _combos(F: int, cfg: SelectConfig) -> list[tuple[str, str]]:
    if F < 2:
        return []
    m = min(cfg.top, F)
    return [(MEAN, f"mean(top{m})"), (STACK, f"stack(top{m})")]


def candidate_names(names: Sequence[str], cfg: SelectConfig) -> list[str]:
    """Singles first (in the given order), then the combinations."""
    return list(names) + [n for _, n in _combos(len(names), cfg)]


@dataclass(frozen=True)
class Choice:
    """What step 2 chose: candidate ``index`` (0..F-1 single columns, then the combinations), or
    the window: the mean of the z-scored single columns ``columns`` (best CV AUC first)."""

    index: int | None
    columns: tuple[int, ...] = ()
    name: str = ""

    @property
    def is_window(self) -> bool:
        return self.index is None


def _fit_window(columns: Sequence[int], X, names: Sequence[str], name: str) -> Procedure:
    """The window's procedure on X: z-scoring of its columns (no weights); threshold not set yet."""
    cols = [int(c) for c in columns]
    c, s = _zscore_params(X[:, cols])
    return Procedure(MEAN, name, cols, 0.0, center=c.tolist(), scale=s.tolist(), inputs=[names[j] for j in cols])


def _fit(index, X, y, names: Sequence[str], cfg: SelectConfig, *, cut: bool = True, groups=None) -> Procedure:
    """Fit ``index`` (a :class:`Choice`, or a candidate index: 0..F-1 single columns, then the
    combinations) on (X, y)."""
    import numpy as np

    F = X.shape[1]
    if isinstance(index, Choice):
        if index.is_window:
            # no fitted weights and columns fixed by the choice: the in-sample cut is a single's
            proc = _fit_window(index.columns, X, names, index.name)
            if cut:
                proc.threshold, proc.train_kappa = kappa_cut(proc.score(X), y)
            return proc
        index = index.index
    if index < F:
        proc = Procedure(SINGLE, names[index], [index], 0.0)
        if cut:
            proc.threshold, proc.train_kappa = kappa_cut(X[:, index], y)
        return proc
    kind, name = _combos(F, cfg)[index - F]
    proc = _fit_combo(kind, X, y, cfg, name)
    if cut:
        # the cut of a fitted combination comes from out-of-fold scores, not from its own fit
        oof = np.zeros(len(y))
        inner = _splitter(y, cfg.folds, 1, cfg.seed, groups)
        for tr, va in inner.split(X, y):
            part = _fit_combo(kind, X[tr], y[tr], cfg, name)
            oof[va] = part.score(X[va])
        # z-scores / probabilities of different folds are on one scale: the OOF cut transfers
        proc.threshold, proc.train_kappa = kappa_cut(oof, y)
    return proc


# ---------------------------------------------------------------------------------------------
# ranking and choice


@dataclass
class CandidateCV:
    """CV result of one candidate on the labelled images (validation folds only)."""

    name: str
    kind: str
    auc_mean: float
    auc_sd: float
    kappa_mean: float | None
    se_vs_best: float | None = None  # corrected SE of the paired AUC difference to the best
    within_noise: bool | None = None
    n_splits: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _cv_scores(X, y, names, cfg: SelectConfig, with_kappa: bool, groups=None):
    """AUC [S, C] (and kappa [S, C]) of every candidate on every validation fold."""
    import numpy as np

    F = X.shape[1]
    combos = _combos(F, cfg)
    splitter = _splitter(y, cfg.folds, cfg.repeats, cfg.seed, groups)
    aucs, kaps, sizes = [], [], []
    for tr, va in splitter.split(X, y):
        Xtr, ytr, Xva, yva = X[tr], y[tr], X[va], y[va]
        S_va = [Xva]
        procs = []
        for kind, name in combos:
            p = _fit_combo(kind, Xtr, ytr, cfg, name)
            procs.append(p)
            S_va.append(p.score(Xva)[:, None])
        S_va = np.concatenate(S_va, axis=1)
        aucs.append(_auc_columns(yva, S_va))
        sizes.append((len(tr), len(va)))
        if with_kappa:
            row = []
            for j in range(F):
                t, _ = kappa_cut(Xtr[:, j], ytr)
                row.append(_kappa(yva, Xva[:, j] >= t))
            for p in procs:
                t, _ = kappa_cut(p.score(Xtr), ytr)  # inner: in-sample cut of the training part
                row.append(_kappa(yva, p.score(Xva) >= t))
            kaps.append(row)
    n_tr = float(np.mean([a for a, _ in sizes]))
    n_va = float(np.mean([b for _, b in sizes]))
    return np.asarray(aucs), (np.asarray(kaps) if with_kappa else None), n_tr, n_va


def _check_inputs(X, y, names):
    import numpy as np

    X = np.asarray(X, dtype=np.float64)
    y = np.asarray(y)
    if X.ndim != 2 or X.shape[1] == 0:
        raise GanprintError(f"selection: expected scores [N, F] with F >= 1, got shape {X.shape}")
    if y.shape != (X.shape[0],):
        raise GanprintError(f"selection: {X.shape[0]} score rows but {y.shape} labels")
    if len(names) != X.shape[1]:
        raise GanprintError(f"selection: {X.shape[1]} score columns but {len(names)} names")
    if not np.isfinite(X).all():
        j = int(np.flatnonzero(~np.isfinite(X).all(0))[0])
        raise GanprintError(f"selection: candidate '{names[j]}' has non-finite scores")
    if not np.isin(y, (0, 1)).all():
        raise GanprintError("selection: labels must be 0 or 1")
    return X, y.astype(np.int64)


def _check_groups(groups, n: int):
    import numpy as np

    if groups is None:
        return None
    g = np.asarray(groups)
    if g.shape != (n,):
        raise GanprintError(f"selection: {n} score rows but groups of shape {g.shape}")
    return g


def choose(X, y, names: Sequence[str], config: SelectConfig | None = None, *, with_kappa: bool = True,
           groups=None):
    """Steps 1-2 on (X [N, F], y [N]) -> (:class:`Choice`, reason, [CandidateCV] in candidate order).
    ``groups`` int [N] or None: folds keep each group (near-duplicates) whole."""
    import numpy as np

    cfg = (config or SelectConfig()).validate()
    X, y = _check_inputs(X, y, names)
    F = X.shape[1]
    all_names = candidate_names(names, cfg)
    kinds = [SINGLE] * F + [k for k, _ in _combos(F, cfg)]
    A, K, n_tr, n_va = _cv_scores(X, y, names, cfg, with_kappa, _check_groups(groups, len(y)))
    A = np.nan_to_num(A, nan=0.5)
    J = A.shape[0]
    mean = A.mean(0)
    # ties: the earlier candidate (singles before combinations, given order) wins
    best = int(np.lexsort((np.arange(len(mean)), -np.round(mean, 12)))[0])
    se = np.zeros(len(mean))
    for c in range(len(mean)):
        d = A[:, best] - A[:, c]
        se[c] = math.sqrt((1.0 / J + n_va / n_tr) * float(d.var(ddof=1))) if J > 1 else 0.0
    within = mean >= mean[best] - cfg.noise * se - 1e-12
    singles = [c for c in range(F) if within[c]]
    if kinds[best] == SINGLE:
        idx, reason = best, "best mean CV AUC"
    elif singles:
        idx = max(singles, key=lambda c: (round(float(mean[c]), 12), -c))
        reason = (f"best single: {all_names[best]} is within {cfg.noise:g} SE of it "
                  f"(CV AUC {mean[best]:.3f} vs {mean[idx]:.3f})")
    else:
        idx, reason = best, f"best mean CV AUC, more than {cfg.noise:g} SE above every single score"
    choice = Choice(idx, (idx,) if idx < F else (), all_names[idx])
    window = _window_columns(X, singles, mean) if cfg.window and idx < F else []
    if len(window) >= 2:
        choice = Choice(None, tuple(window), f"window({len(window)})")
        reason = (f"mean of the {len(window)} single candidates within {cfg.noise:g} SE of the best "
                  f"(CV AUC {mean[window[-1]]:.3f} to {mean[window[0]]:.3f}; best {all_names[best]})")
    cands = []
    for c in range(len(mean)):
        cands.append(CandidateCV(all_names[c], kinds[c], float(mean[c]), float(A[:, c].std(ddof=1)) if J > 1 else 0.0,
                                 float(K[:, c].mean()) if K is not None else None, float(se[c]), bool(within[c]), J))
    return choice, reason, cands


def _window_columns(X, singles: Sequence[int], mean) -> list[int]:
    """The window's columns: ``singles`` by mean CV AUC (descending, then column), a column whose
    values repeat an earlier one's left out (the same score twice would count double)."""
    import numpy as np

    order = sorted(singles, key=lambda c: (-round(float(mean[c]), 12), c))
    out, seen = [], set()
    for c in order:
        key = np.ascontiguousarray(X[:, c]).tobytes()
        if key not in seen:
            seen.add(key)
            out.append(int(c))
    return out


def fit_procedure(X, y, index, names: Sequence[str], config: SelectConfig | None = None,
                  groups=None) -> Procedure:
    """Step 3: refit ``index`` (a :class:`Choice` from :func:`choose`, or a candidate index) on all
    of (X, y), with its kappa-optimal cut."""
    cfg = (config or SelectConfig()).validate()
    X, y = _check_inputs(X, y, names)
    return _fit(index, X, y, names, cfg, groups=_check_groups(groups, len(y)))


# ---------------------------------------------------------------------------------------------
# nested CV


@dataclass
class NestedEstimate:
    """Outer-fold AUC / kappa of the whole choose-then-fit procedure (never in-sample)."""

    auc_mean: float | None
    auc_ci: list[float] | None
    kappa_mean: float | None
    kappa_ci: list[float] | None
    n_splits: int
    folds: int
    repeats: int
    chosen: list[str]  # the candidate chosen in each outer training part
    auc_folds: list[float]
    kappa_folds: list[float]
    method: str = "nested RepeatedStratifiedKFold; 95% CI: Nadeau-Bengio corrected t"
    # is there membership signal at all?  One-sided Mann-Whitney test of the pooled out-of-fold
    # scores of the first outer repeat (ecdf positions against each fold's training non-members),
    # over near-duplicate groups when given; None when the outer splits are not a partition
    signal_p: float | None = None
    signal_unit: str = "image"
    signal_alpha: float = SIGNAL_ALPHA

    @property
    def signal(self) -> bool | None:
        """True when the labelled images show membership signal (``signal_p`` < ``signal_alpha``)."""
        return None if self.signal_p is None else bool(self.signal_p < self.signal_alpha)

    def signal_text(self) -> str:
        """One line: is the choice informed, or a guess at this dev size?"""
        return signal_sentence(self.signal_p, self.signal_unit, self.signal_alpha)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "signal": self.signal}

    def choice_counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for c in self.chosen:
            out[c] = out.get(c, 0) + 1
        return dict(sorted(out.items(), key=lambda kv: -kv[1]))


def nested_cv(X, y, names: Sequence[str], config: SelectConfig | None = None, splits=None,
              groups=None) -> NestedEstimate:
    """Evaluate choose-then-fit by outer CV.  ``splits``: (train, test) index pairs to use instead
    of the outer RepeatedStratifiedKFold.  Each outer training part sees only its own labels."""
    import numpy as np

    cfg = (config or SelectConfig()).validate()
    X, y = _check_inputs(X, y, names)
    groups = _check_groups(groups, len(y))
    if splits is None:
        outer = _splitter(y, cfg.outer_folds, cfg.outer_repeats, cfg.seed + 1, groups)
        splits = list(outer.split(X, y))
        folds = outer.cvargs["n_splits"]
    else:
        splits = list(splits)
        folds = 0
    aucs, kaps, chosen, n_tr, n_te = [], [], [], [], []
    # the first outer repeat: its test folds partition the images (checked below)
    first = max(folds, 1) if folds else len(splits)
    oof, seen = np.zeros(len(y)), np.zeros(len(y), dtype=np.int64)
    for i, (tr, te) in enumerate(splits):
        ytr = y[tr]
        gtr = None if groups is None else groups[tr]
        idx, _, _ = choose(X[tr], ytr, names, cfg, with_kappa=False, groups=gtr)
        proc = _fit(idx, X[tr], ytr, names, cfg, groups=gtr)
        s = proc.score(X[te])
        if i < first:
            oof[te] = ecdf_position(np.sort(proc.score(X[tr])[ytr == 0]), s)
            seen[te] += 1
        aucs.append(float(_auc_columns(y[te], s[:, None])[0]))
        kaps.append(_kappa(y[te], s >= proc.threshold))
        chosen.append(idx.name)
        n_tr.append(len(tr))
        n_te.append(len(te))
    a_mean, a_ci = _corrected_ci(aucs, float(np.mean(n_tr)), float(np.mean(n_te)), bounds=(0.0, 1.0))
    k_mean, k_ci = _corrected_ci(kaps, float(np.mean(n_tr)), float(np.mean(n_te)))
    p = oof_rank_pvalue(y, oof, groups) if np.all(seen == 1) else None
    return NestedEstimate(a_mean, a_ci, k_mean, k_ci, len(splits), folds, cfg.outer_repeats if folds else 0,
                          chosen, aucs, kaps, signal_p=p, signal_unit="image" if groups is None else "group")


# ---------------------------------------------------------------------------------------------
# the whole thing


@dataclass
class Selection:
    """The choice on the full labelled set, every candidate's CV result, and the nested estimate."""

    names: list[str]  # the F input columns
    chosen: str
    reason: str
    procedure: Procedure
    candidates: list[CandidateCV]
    nested: NestedEstimate | None
    config: SelectConfig
    n: int
    n_pos: int
    choice: Choice | None = None  # what was chosen, for refitting the same procedure elsewhere

    def score(self, X):
        """float64 [M]: the chosen procedure's scores of X [M, F] (same columns as the dev X)."""
        import numpy as np

        X = np.asarray(X, dtype=np.float64)
        if X.ndim != 2 or X.shape[1] != len(self.names):
            raise GanprintError(f"selection: expected scores with {len(self.names)} columns, got shape {X.shape}")
        return self.procedure.score(X)

    def decide(self, X):
        """int64 [M]: score >= the cut fitted on the labelled set."""
        import numpy as np

        return (self.score(X) >= self.procedure.threshold).astype(np.int64)

    def to_dict(self) -> dict[str, Any]:
        return {
            "chosen": self.chosen,
            "reason": self.reason,
            "procedure": self.procedure.to_dict(),
            "candidates": [c.to_dict() for c in self.candidates],
            "nested": None if self.nested is None else {**self.nested.to_dict(),
                                                        "choice_counts": self.nested.choice_counts()},
            "config": asdict(self.config),
            "n": self.n,
            "n_pos": self.n_pos,
            "inputs": list(self.names),
        }


def select(X, y, names: Sequence[str], config: SelectConfig | None = None, *, nested: bool = True,
           groups=None) -> Selection:
    """Choose among the columns of X [N, F] (+ combinations) on labels y [N]; see the module doc.
    ``groups`` int [N] or None (every image its own group): images of one group (near-duplicate
    slices of a patient) are never on both sides of any CV split, inner or outer."""
    cfg = (config or SelectConfig()).validate()
    X, y = _check_inputs(X, y, names)
    groups = _check_groups(groups, len(y))
    idx, reason, cands = choose(X, y, names, cfg, groups=groups)
    proc = _fit(idx, X, y, names, cfg, groups=groups)
    est = nested_cv(X, y, names, cfg, groups=groups) if nested else None
    return Selection(list(names), idx.name, reason, proc, cands, est, cfg,
                     int(len(y)), int(y.sum()), idx)
