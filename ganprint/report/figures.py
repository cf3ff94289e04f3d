"""Figures of the report (matplotlib, Agg backend), written atomically as PNG."""

from __future__ import annotations

import os
from pathlib import Path

ROLE_COLOR = {"members": "tab:red", "non_members": "tab:blue", "unknown": "tab:gray"}
ROLE_NAME = {"members": "members", "non_members": "non-members", "unknown": "unknown"}


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    tmp = path.with_name(f".{path.name}.tmp")
    fig.savefig(tmp, dpi=100, format="png")
    _plt().close(fig)
    os.replace(tmp, path)
    return path


def roc_band(path: Path, y, scores, *, bootstrap: int = 500, seed: int = 0, auc=None, auc_ci=None) -> Path:
    """ROC of out-of-fold scores with a pointwise 95% bootstrap band (resampled images)."""
    import numpy as np
    from sklearn.metrics import roc_curve

    plt = _plt()
    y = np.asarray(y).astype(int)
    s = np.asarray(scores, dtype=np.float64)
    grid = np.linspace(0, 1, 101)
    fig, ax = plt.subplots(figsize=(4.6, 4.2))
    if 0 < y.sum() < len(y):
        rng = np.random.default_rng(seed)
        curves = []
        for _ in range(bootstrap):
            i = rng.integers(0, len(y), len(y))
            if 0 < y[i].sum() < len(i):
                f, t, _ = roc_curve(y[i], s[i])
                curves.append(np.interp(grid, f, t))
        if curves:
            lo, hi = np.percentile(np.asarray(curves), [2.5, 97.5], axis=0)
            ax.fill_between(grid, lo, hi, color="tab:orange", alpha=0.25, lw=0, label="95% bootstrap band")
        f, t, _ = roc_curve(y, s)
        lab = "nested CV" if auc is None else f"nested CV, AUC {auc:.2f}" + (
            f" [{auc_ci[0]:.2f}, {auc_ci[1]:.2f}]" if auc_ci else "")
        ax.plot(f, t, color="tab:orange", lw=2, label=lab)
    ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=1, label="chance")
    ax.set(xlabel="false positive rate", ylabel="true positive rate", title="ROC (out-of-fold)", xlim=(0, 1),
           ylim=(0, 1.01))
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    return _save(fig, path)


def score_hist(path: Path, scores, roles, title: str = "") -> Path:
    import numpy as np

    plt = _plt()
    s = np.asarray(scores, dtype=np.float64)
    roles = np.asarray(roles)
    fig, ax = plt.subplots(figsize=(4.6, 4.2))
    bins = np.histogram_bin_edges(s, bins=min(40, max(5, len(s) // 6)))
    for role in ("non_members", "members", "unknown"):
        m = roles == role
        if m.any():
            ax.hist(s[m], bins=bins, alpha=0.55, density=True, color=ROLE_COLOR[role],
                    label=f"{ROLE_NAME[role]} (n={int(m.sum())})")
    ax.set(xlabel="score (higher = member)", ylabel="density", title=title or "scores by class")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, path)


def pvalue_hist(path: Path, pvalues, roles, q: float) -> Path:
    import numpy as np

    plt = _plt()
    p = np.asarray(pvalues, dtype=np.float64)
    roles = np.asarray(roles)
    fig, ax = plt.subplots(figsize=(4.6, 4.2))
    bins = np.linspace(0, 1, 21)
    for role in ("non_members", "members", "unknown"):
        m = roles == role
        if m.any():
            ax.hist(p[m], bins=bins, alpha=0.55, density=True, color=ROLE_COLOR[role],
                    label=f"{ROLE_NAME[role]} (n={int(m.sum())})" + (" leave-one-out" if role == "non_members" else ""))
    ax.axhline(1.0, color="grey", ls="--", lw=1, label="uniform (null)")
    ax.set(xlabel="conformal p-value", ylabel="density", title=f"p-values (BH at FDR {q:g})")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, path)
