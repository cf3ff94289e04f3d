"""Dataset-level verdicts: is the generator copying its training set, and how often?

- :func:`data_copying_test` — Meehan, Chaudhuri & Dasgupta (AISTATS 2020), test C_T. The training
  set T is cut into cells by k-means (scikit-learn ``KMeans`` fitted on T); in each cell the
  nearest-training-image distances of the generated images Q are compared with those of held-out
  real images P by a Mann-Whitney U test, Z_U < 0 meaning generated images sit closer to the
  training images than fresh real images do. C_T is the held-out-mass-weighted mean of the cells'
  Z_U over the cells holding enough generated images (the paper's Pi_tau). Under the null (Q
  drawn like P) each Z_U is ~N(0, 1), so z = sum(w Z_U) / sqrt(sum w^2) is ~N(0, 1): p = Phi(z)
  (one-sided, copying). A bootstrap over P and Q gives a CI for C_T.
- :func:`memorisation_rate` — the share of generated images whose nearest training image is a
  copy, with a Wilson CI. A *copy* is a verified match when local-feature verification exists
  (more RANSAC inliers than 99% of held-out real images get against the training set, and at
  least 10), otherwise a generated image closer to its nearest training image than
  ``quantile`` (default 1%) of held-out real images are to theirs: fresh samples from the
  training distribution give a rate near ``quantile``, which is reported beside it.

Embeddings are L2-normalised first; distances are Euclidean (monotone in cosine).
"""

from __future__ import annotations

import math
from typing import Any

from ganprint.errors import GanprintError


def _np(x):
    import numpy as np

    x = x.detach().cpu().numpy() if hasattr(x, "detach") else np.asarray(x)
    return np.asarray(x, dtype=np.float64)


def _unit(x):
    import numpy as np

    x = _np(x)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def nn_distance(queries, train):
    """float64 [n]: Euclidean distance of each query [n, D] to its nearest row of train [m, D]."""
    import numpy as np
    import torch

    q = torch.as_tensor(queries, dtype=torch.float64)
    t = torch.as_tensor(train, dtype=torch.float64)
    out = np.empty(len(q))
    for s in range(0, len(q), 4096):
        out[s:s + 4096] = torch.cdist(q[s:s + 4096], t).min(1).values.numpy()
    return out


def _mw_z(lq, lp) -> float:
    """Mann-Whitney z of Q's distances over P's: < 0 when Q is closer to the training set."""
    from scipy.stats import mannwhitneyu

    n1, n2 = len(lq), len(lp)
    u = float(mannwhitneyu(lq, lp, alternative="two-sided").statistic)  # U of the first sample
    return (u - n1 * n2 / 2.0) / math.sqrt(n1 * n2 * (n1 + n2 + 1) / 12.0)


def default_cells(n_train: int, n_heldout: int) -> int:
    """About 20 held-out images per cell, between 1 and 10 cells."""
    return max(1, min(10, min(n_train, n_heldout) // 20))


def _ct(cells_p, lp, cells_q, lq, k: int, min_count: int, tau: float):
    import numpy as np

    n, m = len(lp), len(lq)
    zs, ws, used = [], [], []
    for c in range(k):
        ip, iq = cells_p == c, cells_q == c
        if ip.sum() < min_count or iq.sum() < max(min_count, tau * m):
            continue
        zs.append(_mw_z(lq[iq], lp[ip]))
        ws.append(ip.sum() / n)
        used.append(c)
    if not zs:
        return None
    z, w = np.asarray(zs), np.asarray(ws)
    return float((w * z).sum() / w.sum()), float((w * z).sum() / math.sqrt((w ** 2).sum())), used, zs, ws


def data_copying_test(train, heldout, generated, *, cells: int | None = None, seed: int = 0, bootstrap: int = 200,
                      min_count: int = 3, tau: float = 0.0, ci: float = 0.95) -> dict[str, Any]:
    """Meehan et al.'s C_T. train [m, D], heldout [n, D], generated [g, D] (tensors or arrays).

    Returns ``{ct, z, p, ct_ci, cells, cells_used, cell_z, cell_weight, n_train, n_heldout,
    n_generated}``; ``ct`` < 0 and small ``p``: data copying."""
    import numpy as np
    from scipy.stats import norm
    from sklearn.cluster import KMeans

    T, P, Q = _unit(train), _unit(heldout), _unit(generated)
    if len(T) < 2 or len(P) < min_count or len(Q) < min_count:
        raise GanprintError(f"the data-copying test needs >= 2 training, >= {min_count} held-out and >= {min_count} "
                            f"generated images, got {len(T)}, {len(P)} and {len(Q)}")
    k = cells or default_cells(len(T), len(P))
    km = KMeans(n_clusters=k, n_init=10, random_state=seed).fit(T)
    cp, cq = km.predict(P), km.predict(Q)
    lp, lq = nn_distance(P, T), nn_distance(Q, T)
    res = _ct(cp, lp, cq, lq, k, min_count, tau)
    if res is None:
        raise GanprintError("the data-copying test found no cell with enough held-out and generated images; "
                            "pass fewer cells")
    ct, z, used, zs, ws = res
    boot = []
    rng = np.random.default_rng(seed)
    for _ in range(bootstrap):
        ip, iq = rng.integers(0, len(P), len(P)), rng.integers(0, len(Q), len(Q))
        r = _ct(cp[ip], lp[ip], cq[iq], lq[iq], k, min_count, tau)
        if r is not None:
            boot.append(r[0])
    lo, hi = 100 * (1 - ci) / 2, 100 * (1 + ci) / 2
    return {
        "ct": ct, "z": z, "p": float(norm.cdf(z)),
        "ct_ci": [float(v) for v in np.percentile(boot, [lo, hi])] if boot else None,
        "cells": int(k), "cells_used": [int(c) for c in used], "cell_z": [float(v) for v in zs],
        "cell_weight": [float(v) for v in ws],
        "n_train": int(len(T)), "n_heldout": int(len(P)), "n_generated": int(len(Q)),
        "method": "Meehan et al. 2020 C_T, KMeans cells on the training set, Mann-Whitney U per cell",
    }


def wilson_ci(k: int, n: int, ci: float = 0.95) -> list[float] | None:
    from scipy.stats import binomtest

    if n == 0:
        return None
    r = binomtest(int(k), int(n)).proportion_ci(confidence_level=ci, method="wilson")
    return [float(r.low), float(r.high)]


def memorisation_rate(train, heldout, generated, *, quantile: float = 0.01, verified_inliers=None,
                      heldout_inliers=None, min_inliers: int = 10) -> dict[str, Any]:
    """Share of generated images whose nearest training image is a copy (see the module docstring).

    ``verified_inliers`` int [g]: each generated image's most RANSAC inliers against a training
    image, when verification ran; a copy then means more inliers than ``1 - quantile`` of the
    held-out real images get against the training set (``heldout_inliers`` [n]) and at least
    ``min_inliers``. Without verification: the global-distance rule of the module docstring."""
    import numpy as np

    if verified_inliers is not None:
        inl = np.asarray(verified_inliers, dtype=np.float64)
        cut = float(min_inliers)
        null = None
        if heldout_inliers is not None and len(heldout_inliers):
            cut = max(cut, float(np.quantile(np.asarray(heldout_inliers, dtype=np.float64), 1 - quantile)))
            null = quantile
        copies = inl > cut if null is not None else inl >= cut
        rule = (f"verified match with {'more than' if null is not None else 'at least'} {cut:g} RANSAC inliers"
                + (f" (more than {1 - quantile:.0%} of held-out real images get)" if null is not None else ""))
    else:
        Q = _unit(generated)
        T, P = _unit(train), _unit(heldout)
        lp, lq = nn_distance(P, T), nn_distance(Q, T)
        cut = float(np.quantile(lp, quantile))
        copies = lq < cut
        rule = (f"nearest training image closer than {quantile:.0%} of held-out real images are to theirs "
                f"(distance < {cut:.4f})")
        null = quantile
    k, n = int(copies.sum()), int(len(copies))
    return {"rate": k / n if n else 0.0, "ci": wilson_ci(k, n), "copies": k, "n_generated": n, "rule": rule,
            "rate_under_null": null, "verified": verified_inliers is not None}


def dataset_verdicts(train, heldout, generated, *, seed: int = 0, bootstrap: int = 200,
                     verified_inliers=None, heldout_inliers=None) -> dict[str, Any]:
    """``{"ct": data_copying_test(...), "memorisation": memorisation_rate(...)}``."""
    return {"ct": data_copying_test(train, heldout, generated, seed=seed, bootstrap=min(bootstrap, 500)),
            "memorisation": memorisation_rate(train, heldout, generated, verified_inliers=verified_inliers,
                                              heldout_inliers=heldout_inliers)}
