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

Aligned-copy evidence (what the audit uses when OpenCV is present):

- :func:`aligned_correlations` — for each real image and each of its candidate generated images,
  the ECC correlation (OpenCV ``findTransformECC``, Euclidean motion, coarse to fine) after
  aligning the generated image onto the real one: near 1 for a rotated / shifted / re-contrasted
  copy, lower for a merely similar image.
- :func:`copy_evidence` — per image, the best of those correlations, its conformal p-value against
  the same statistic of the known non-members, Benjamini-Hochberg over the tested images: the
  *verified copies* (FDR-controlled).
- :func:`members_copy_test` — exact test of "the generator copies its training set": how many
  member groups beat every non-member group, p = C(M, k) / C(M + N, k) under exchangeability.
- :func:`copy_memorisation_rate` — the share of generated images aligned onto a member better than
  any known non-member is aligned onto any generated image (Wilson CI; a lower bound).
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


# ---------------------------------------------------------------------------------------------
# aligned-copy evidence: per real image, how well its best candidate generated image aligns onto it

THUMB = 128
STAT_SIZE = 64  # px of the copy statistic's alignment: 4x cheaper than THUMB, separates copies as well


def thumbnail(path: str, size: int = THUMB):
    """float32 [size, size] gray in 0..1 (square-resized) of the image file ``path``."""
    import numpy as np
    from PIL import Image

    from ganprint.data import load_image, to_gray

    g = to_gray(load_image(path))
    im = Image.fromarray(g).resize((size, size), Image.BILINEAR)
    return np.asarray(im, dtype=np.float32) / 255.0


def ecc_align(real, gen, init, iterations: int = 60):
    """(correlation, warp [2, 3]) of cv2.findTransformECC (Euclidean: rotation + shift) of ``gen``
    onto ``real`` (both [T, T]) from ``init``; (-inf, init) when it does not converge. The
    correlation is ECC's zero-mean normalised one, so it ignores brightness and contrast."""
    import cv2
    import numpy as np

    w = np.asarray(init, dtype=np.float32).reshape(2, 3).copy()
    try:
        cc, w = cv2.findTransformECC(real.astype(np.float32), gen.astype(np.float32), w, cv2.MOTION_EUCLIDEAN,
                                     (cv2.TERM_CRITERIA_COUNT | cv2.TERM_CRITERIA_EPS, iterations, 1e-5), None, 5)
    except cv2.error:
        return -np.inf, np.asarray(init, dtype=np.float64).reshape(2, 3)
    return float(cc), w.astype(np.float64)


def coarse_to_fine(real, gen, init=None, coarse: int = 32):
    """(correlation, warp [2, 3]) of ECC run first on ``coarse``-px copies (a wider capture range
    for shifts and rotations, and cheap), then refined at full size from that warp."""
    import cv2
    import numpy as np

    T = real.shape[0]
    w0 = np.eye(2, 3) if init is None else np.asarray(init, dtype=np.float64).reshape(2, 3).copy()
    if coarse and T > coarse:
        f = coarse / float(T)
        small = lambda a: cv2.resize(a, (coarse, coarse), interpolation=cv2.INTER_AREA)  # noqa: E731
        wc = w0.copy()
        wc[:, 2] *= f
        cc, wc = ecc_align(small(real), small(gen), wc, iterations=40)
        if np.isfinite(cc):
            w0 = wc.copy()
            w0[:, 2] /= f
    return ecc_align(real, gen, w0)


def best_alignment(real, gen, verified=None, frame: int | None = None):
    """(warp [2, 3] in thumbnail pixels, real -> generated; where it started; correlation) that
    best aligns ``gen`` onto ``real`` [T, T]: coarse-to-fine ECC from the identity, and ECC from
    the verified (local-feature) transform converted to thumbnail scale when there is one;
    whichever correlates better. Verification on symmetric anatomy can lock onto a wrong but
    consistent fit, and ECC alone can miss large shifts; trying both keeps the better one."""
    import numpy as np

    cands = [(*coarse_to_fine(real, gen), "identity")]
    if verified is not None and frame and np.isfinite(np.asarray(verified, dtype=np.float64)).all():
        v = np.asarray(verified, dtype=np.float64).reshape(2, 3).copy()
        v[:, 2] *= real.shape[0] / float(frame)
        cands.append((*ecc_align(real, gen, v), "verified"))
    best = max(cands, key=lambda t: t[0])
    return best[1], best[2], best[0]


def aligned_correlations(real_paths: list[str], gen_paths: list[list[str]], candidates, *,
                         size: int = STAT_SIZE, threads: int | None = None) -> tuple[Any, Any]:
    """For each real image i and each candidate generated image ``candidates[i, j]`` (an index into
    ``gen_paths[i]``, -1 = none): the ECC correlation after the best Euclidean alignment
    (:func:`coarse_to_fine` from the identity) of ``size``-px thumbnails. Real images run in
    ``threads`` threads (default: torch's thread count; OpenCV releases the GIL), each pair
    independent of the others, so the result does not depend on the thread count.

    Returns (cc float64 [R, C], NaN where no candidate; warp float64 [R, C, 6], ``size``-px frame)."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    import numpy as np

    cand = np.asarray(candidates, dtype=np.int64)
    R, C = cand.shape
    cc = np.full((R, C), np.nan)
    warp = np.full((R, C, 6), np.nan)
    cache: dict[str, Any] = {}
    lock = threading.Lock()

    def th(p):
        with lock:
            hit = cache.get(p)
        if hit is None:
            hit = thumbnail(p, size)
            with lock:
                cache[p] = hit
        return hit

    def row(i):
        if not (cand[i] >= 0).any():
            return
        real = thumbnail(real_paths[i], size)
        for j in range(C):
            g = int(cand[i, j])
            if g < 0:
                continue
            c, w = coarse_to_fine(real, th(gen_paths[i][g]), coarse=size // 2)
            if np.isfinite(c):
                cc[i, j], warp[i, j] = c, w.reshape(-1)

    if threads is None:
        import torch

        threads = torch.get_num_threads()
    if threads <= 1:
        for i in range(R):
            row(i)
    else:
        with ThreadPoolExecutor(max_workers=threads) as ex:
            list(ex.map(row, range(R)))
    return cc, warp


def copy_evidence(cc, null_rows, target_rows, q: float) -> dict[str, Any]:
    """Per-image copy evidence from aligned correlations ``cc`` [R, C] (see
    :func:`aligned_correlations`): the statistic is each image's best aligned correlation
    ``stat`` [R]; its conformal p-value is taken against the same statistic of the known
    non-members (``null_rows``, each left out of its own reference), and Benjamini-Hochberg at
    ``q`` over ``target_rows`` marks the *verified copies* (FDR-controlled: an image of the
    target set that is not in the training set is exchangeable with the known non-members).

    Returns ``{stat [R], p [R], q [R] (NaN off target), copy bool [R], cut, n_null, min_p}``
    (numpy arrays)."""
    import numpy as np

    from ganprint.conformal import bh_adjust

    cc = np.asarray(cc, dtype=np.float64)
    stat = np.where(np.isfinite(cc).any(1), np.nanmax(np.where(np.isfinite(cc), cc, -np.inf), axis=1), -1.0)
    null_rows = np.asarray(null_rows, dtype=np.int64)
    target_rows = np.asarray(target_rows, dtype=np.int64)
    self_idx = np.full(len(stat), -1)
    self_idx[null_rows] = np.arange(len(null_rows))
    from ganprint.conformal import conformal_pvalues

    p = conformal_pvalues(stat, stat[null_rows], self_idx)
    qv = np.full(len(stat), np.nan)
    copy = np.zeros(len(stat), dtype=bool)
    if len(target_rows):
        qv[target_rows] = bh_adjust(p[target_rows])
        copy[target_rows] = qv[target_rows] <= q
    return {"stat": stat, "p": p, "q": qv, "copy": copy, "cut": float(stat[null_rows].max()),
            "n_null": int(len(null_rows)), "min_p": 1.0 / (len(null_rows) + 1)}


def members_copy_test(stat_members, stat_nonmembers, groups_members=None, groups_nonmembers=None) -> dict[str, Any]:
    """Exact test of "the generator copies its training set": K = the number of member units
    whose best aligned correlation exceeds that of every known non-member unit (a unit = one
    near-duplicate group, its statistic the max over its images, so a patient counts once).
    Under no copying members and non-members are exchangeable, and the K highest of the M + N
    units are all members with probability C(M, K) / C(M + N, K): that is the p-value.

    Returns ``{k, m, n, p, cut, unit}``."""
    import numpy as np
    import pandas as pd
    from scipy.stats import hypergeom

    def units(s, g):
        s = np.asarray(s, dtype=np.float64)
        if g is None:
            return s
        return pd.Series(s).groupby(np.asarray(g)).max().to_numpy()

    um, un = units(stat_members, groups_members), units(stat_nonmembers, groups_nonmembers)
    cut = float(un.max()) if len(un) else float("inf")
    k = int((um > cut).sum())
    m, n = len(um), len(un)
    p = float(hypergeom.pmf(k, m + n, m, k)) if k > 0 else 1.0
    return {"k": k, "m": int(m), "n": int(n), "p": p, "cut": cut,
            "unit": "near-duplicate group" if groups_members is not None else "image",
            "method": "exact: the k best-aligned units all members, C(M,k)/C(M+N,k) under exchangeability"}


def copy_memorisation_rate(member_cc, member_cands, n_generated: int, cut: float) -> dict[str, Any]:
    """Share of the ``n_generated`` generated images that are a verified copy of a member: one of
    a member's candidates (``member_cands`` int [M, C], indices into the generated set) whose
    aligned correlation (``member_cc`` [M, C]) exceeds ``cut`` = the best aligned correlation any
    known non-member reaches. A lower bound: only each member's C candidates are aligned."""
    import numpy as np

    cc = np.asarray(member_cc, dtype=np.float64)
    cand = np.asarray(member_cands, dtype=np.int64)
    hit = np.isfinite(cc) & (cc > cut) & (cand >= 0)
    copies = np.unique(cand[hit])
    k = int(len(copies))
    return {"rate": k / n_generated if n_generated else 0.0, "ci": wilson_ci(k, n_generated), "copies": k,
            "n_generated": int(n_generated), "verified": True, "rate_under_null": None,
            "copy_ids": [int(c) for c in copies],
            "rule": (f"a generated image aligned onto a member (ECC, rotation + shift) with correlation above "
                     f"{cut:.4f}, the best any known non-member reaches (lower bound: each member's nearest "
                     f"{cand.shape[1] if cand.ndim == 2 else 0} candidates checked)")}
