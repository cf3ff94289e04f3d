"""Approximate top-k with faiss' inverted-file index (``simmatrix --engine faiss-ivf``).

For searches an exact engine cannot finish on one machine.  The keys are clustered into
``nlist`` lists (k-means, faiss' seeded trainer); a query scans the ``nprobe`` lists nearest to
it.  ``nprobe`` is not a guess: it starts at ``nlist / 64`` and doubles until the recall@k
against the exact search, on a *calibration* sample of queries, reaches the target (0.99 by
default).  The recall is then measured again on a disjoint *held-out* sample (the number
reported and stored in the artifact's provenance: the calibration recall is in-sample).
Scores of the neighbours found are exact (the flat lists keep the float32 vectors); what can
be missed is a neighbour in a list not probed.

Tensor shapes: queries [Q, D], keys [K, D] float32, prepared (unit-norm for cosine).
"""

from __future__ import annotations

import math
from typing import Any, Callable

from ganprint.errors import GanprintError
from ganprint.tiles import _one_thread

DEFAULT_RECALL = 0.99
CALIBRATION = 512  # queries used to choose nprobe
HOLDOUT = 1024  # further queries on which the recall is reported
KMEANS_ITERATIONS = 10  # lists for a search need no converged clustering (faiss: 25 by default)
MAX_POINTS_PER_LIST = 64  # k-means training sample per list (faiss caps at 256; 64 trains 4x faster, enough for the lists)


MAX_SCAN = 0.25  # probing more than this share of the lists cannot beat the exact search: run that instead


def nlist_for(n: int) -> int:
    """Lists for ``n`` keys: ~sqrt(n) (faiss suggests 1-16 sqrt(n)), at least 39 keys per list.

    The fixed costs grow with nlist (k-means on 64 nlist points: ~nlist^2; assigning the keys:
    n nlist), the scan shrinks with it; at 1M keys 2 sqrt(n) lists made training and adding
    alone ~20% of an exact search's time, sqrt(n) halves that for the same scanned share."""
    return max(1, min(int(math.sqrt(n)), n // 39))


def _faiss():
    try:
        import faiss
    except ImportError:
        raise GanprintError("--engine faiss-ivf: faiss is not installed; pip install faiss-cpu "
                            "(or use --engine exact)") from None
    return faiss


def _search(index, q, k: int, exclude, metric: str, lists=None):
    """(values float32 [n, k], indices int64 [n, k]) of one faiss search; ``exclude`` int64 [n]
    or None: a key per row to leave out (searched with one more, then dropped).  ``lists`` int64
    [n, >= nprobe]: each query's nearest lists, best first, when computed already (else faiss'
    quantizer finds them).  Fewer than k results (few keys in the probed lists) leave -inf / -1."""
    import numpy as np

    extra = 0 if exclude is None else 1
    if lists is None:
        d, i = index.search(q, k + extra)
    else:
        pre = np.ascontiguousarray(lists[:, : index.nprobe], dtype=np.int64)
        d, i = index.search_preassigned(q, k + extra, pre, np.zeros(pre.shape, dtype=np.float32))
    d = d.astype(np.float32)
    if metric == "l2":
        d = np.where(i >= 0, -np.sqrt(np.maximum(d, 0.0)), -np.inf).astype(np.float32)
    else:
        d = np.where(i >= 0, d, -np.inf).astype(np.float32)
    if exclude is not None:
        keep = i != np.asarray(exclude).reshape(-1, 1)
        keep[keep.all(1), -1] = False  # drop the excluded column where present, else the last
        d = d[keep].reshape(len(q), k)
        i = i[keep].reshape(len(q), k)
    return d, i


def _grouped_search(queries, keys, k: int, probes, order, starts, counts, exclude, search):
    """(values float32 [n, k] descending, indices int64 [n, k]): each query's top-k among the keys
    of its probed lists, scanned list by list: the queries probing a list against its keys in one
    exact top-k call (``search``: products over all those queries at once), not query by query.

    probes int64 [n, p]: lists per query; ``order`` int64 [K]: key indices sorted by list, list j
    at ``starts[j] .. starts[j] + counts[j]``; ``exclude`` int64 [n] or None."""
    import torch

    n, p = probes.shape
    qi = torch.arange(n).repeat_interleave(p)
    slot = torch.arange(p).repeat(n)
    li = probes.reshape(-1)
    o = torch.argsort(li, stable=True)
    qi, slot, li = qi[o], slot[o], li[o]
    lc = torch.bincount(li, minlength=len(counts))
    ls = torch.cumsum(lc, 0) - lc
    out_v = torch.full((n, p * k), -math.inf)
    out_i = torch.full((n, p * k), -1, dtype=torch.long)
    inv = None
    if exclude is not None:
        inv = torch.empty_like(order)
        inv[order] = torch.arange(len(order))
    with _one_thread("cpu"):  # many small ops: on one thread, no barrier per op
        _scan_lists(queries, keys, k, qi, slot, lc, ls, starts, counts, order, inv, exclude, search, out_v, out_i)
    sv, so = torch.sort(out_v, dim=1, descending=True, stable=True)
    return sv[:, :k].contiguous(), out_i.gather(1, so[:, :k])


def _scan_lists(queries, keys, k, qi, slot, lc, ls, starts, counts, order, inv, exclude, search, out_v, out_i):
    import torch

    lc_l, ls_l, st_l, ct_l = (x.tolist() for x in (lc, ls, starts, counts))
    for j in range(len(ct_l)):
        if lc_l[j] == 0 or ct_l[j] == 0:
            continue
        a, c = st_l[j], ct_l[j]
        rows = qi[ls_l[j]:ls_l[j] + lc_l[j]]
        sl = slot[ls_l[j]:ls_l[j] + lc_l[j]]
        kidx = order[a:a + c]
        ex = None
        if exclude is not None:
            e = exclude[rows]
            pos = inv[e.clamp(min=0)] - a
            ex = torch.where((e >= 0) & (pos >= 0) & (pos < c), pos, torch.full_like(pos, -1))
            if c - int((ex >= 0).any()) < 1:
                continue
        v, i = search(queries[rows], keys[kidx], min(k, c), ex)
        cols = sl.unsqueeze(1) * k + torch.arange(v.shape[1])
        out_v[rows.unsqueeze(1), cols] = v
        out_i[rows.unsqueeze(1), cols] = torch.where(i >= 0, kidx[i.clamp(min=0)], torch.full_like(i, -1))


def _recall(approx, exact) -> float:
    """Mean over rows of |approx_row & exact_row| / k (exact rows: index sets of the exact top-k)."""
    import numpy as np

    if len(exact) == 0:
        return 1.0
    hits = [len(set(a.tolist()) & set(e.tolist()) - {-1}) / max(1, int((e >= 0).sum())) for a, e in zip(approx, exact)]
    return float(np.mean(hits))


def ivf_topk(queries, keys, k: int, *, metric: str = "cosine", exclude=None,
             exact: Callable[[Any], Any], recall: float = DEFAULT_RECALL, nprobe: int | None = None,
             seed: int = 0, threads: int | None = None, search: Callable[[Any, Any, int], Any] | None = None):
    """Approximate top-k of ``keys`` for every query.

    ``exact(rows)`` int64 [n] -> (values float32 [n, k], indices int64 [n, k]): the exact top-k
    of those query rows (the caller's exact engine, the same exclusion applied).  ``nprobe`` None:
    calibrated to reach ``recall``; when that would take more than ``MAX_SCAN`` of the lists (data
    without cluster structure, e.g. uniform random vectors) the inverted file cannot beat the
    exact search, which then answers every query (``info["fallback"]``: why; recall 1).  Returns
    (values float32 [Q, k] descending, indices int64 [Q, k], info) where info holds nlist, nprobe,
    the held-out recall@k and the sample sizes.
    ``search(x, y, n, exclude)`` -> (values [len(x), n], indices [len(x), n]) (optional): the
    caller's exact engine (``exclude``: int64 [len(x)] or None).  With it faiss only trains the
    lists (k-means); the engine assigns the keys, ranks each query's lists as faiss' flat
    quantizer would, and scans the probed lists list by list (:func:`_grouped_search`), the
    products of all queries probing a list in one call — faiss' IVFFlat scan streams each
    query's lists from memory on its own, which measured ~3.6 GFLOP/s on 2 cores.
    """
    import numpy as np
    import torch

    faiss = _faiss()
    if threads is not None:
        faiss.omp_set_num_threads(threads)
    if not 0.0 < recall <= 1.0:
        raise GanprintError(f"--ivf-recall {recall}: must be in (0, 1]")
    q = np.ascontiguousarray(queries.numpy(), dtype=np.float32)
    kk = np.ascontiguousarray(keys.numpy(), dtype=np.float32)
    nq, nk, dim = q.shape[0], kk.shape[0], kk.shape[1]
    nlist = nlist_for(nk)
    mtype = faiss.METRIC_INNER_PRODUCT if metric == "cosine" else faiss.METRIC_L2
    quantizer = faiss.IndexFlatIP(dim) if metric == "cosine" else faiss.IndexFlatL2(dim)
    index = faiss.IndexIVFFlat(quantizer, dim, nlist, mtype)
    index.cp.seed = 1234 + seed
    index.cp.max_points_per_centroid = MAX_POINTS_PER_LIST
    index.cp.niter = KMEANS_ITERATIONS
    rng = np.random.default_rng(seed)
    train = kk if nk <= nlist * MAX_POINTS_PER_LIST else kk[np.sort(rng.choice(nk, nlist * MAX_POINTS_PER_LIST,
                                                                              replace=False))]
    index.train(train)
    cent = torch.from_numpy(index.quantizer.reconstruct_n(0, index.nlist)) if search is not None else None
    if search is not None:  # assign the keys with the caller's engine: one exact top-1 search
        assign = search(keys, cent, 1, None)[1][:, 0]
        order = torch.argsort(assign, stable=True)
        counts = torch.bincount(assign, minlength=nlist)
        starts = torch.cumsum(counts, 0) - counts
    else:
        index.add(kk)
    ex = None if exclude is None else np.asarray(torch.as_tensor(exclude, dtype=torch.long).numpy())

    lists = None
    if search is not None:  # every query's lists, best first, as many as calibration may probe
        depth = max(1, nlist // 64)  # the deepest nprobe calibration tries (below MAX_SCAN of the lists)
        while depth * 2 <= MAX_SCAN * nlist:
            depth *= 2
        depth = min(nlist, depth if nprobe is None else max(depth, int(nprobe)))
        lists = search(queries, cent, depth, None)[1]
    ex_t = None if exclude is None else torch.as_tensor(exclude, dtype=torch.long)

    def scan(rows, probe):
        """(values, indices) numpy of the rows' search at nprobe ``probe``."""
        if lists is not None and probe <= lists.shape[1]:
            r = torch.as_tensor(rows, dtype=torch.long)
            v, i = _grouped_search(queries[r], keys, k, lists[r, :probe].contiguous(), order, starts, counts,
                                   None if ex_t is None else ex_t[r], search)
            return v.numpy(), i.numpy()
        if index.ntotal == 0:
            index.add(kk)  # deeper than prepared (an explicit nprobe): faiss' own scan
        index.nprobe = probe
        return _search(index, q[rows], k, None if ex is None else ex[rows], metric)

    perm = rng.permutation(nq)
    n_cal = min(CALIBRATION, nq // 3)
    cal, hold = perm[:n_cal], perm[n_cal:n_cal + HOLDOUT]
    truth = exact(torch.from_numpy(np.concatenate([cal, hold]).astype(np.int64)))[1]
    truth = np.asarray(torch.as_tensor(truth).numpy())
    t_cal, t_hold = truth[:n_cal], truth[n_cal:]

    cal_recall = None
    fallback = None
    if nprobe is None:
        nprobe = max(1, nlist // 64)
        while True:
            index.nprobe = nprobe
            if n_cal == 0:
                nprobe = nlist  # nothing to calibrate on: probe every list (an exhaustive search)
                break
            _, ci = scan(cal, nprobe)
            cal_recall = _recall(ci, t_cal)
            if cal_recall >= recall or nprobe >= nlist:
                break
            if nlist > 1 and nprobe * 2 > MAX_SCAN * nlist:
                fallback = (f"recall@{k} {cal_recall:.3f} < {recall} at nprobe {nprobe} of {nlist} lists; probing more "
                            f"than {MAX_SCAN:.0%} of them cannot beat the exact search, which answered every query")
                break
            nprobe = min(nlist, nprobe * 2)
    nprobe = max(1, min(int(nprobe), nlist))
    if fallback is not None:
        v, i = exact(torch.arange(nq, dtype=torch.long))
        d, i = np.asarray(torch.as_tensor(v).numpy(), dtype=np.float32), np.asarray(torch.as_tensor(i).numpy())
    else:
        d, i = scan(np.arange(nq), nprobe)
    info = {
        "nlist": nlist, "nprobe": nprobe, "recall_target": recall,
        "recall_at_k": round(_recall(i[hold], t_hold), 5), "recall_sample": int(len(hold)),
        "calibration_recall": None if cal_recall is None else round(cal_recall, 5), "calibration_sample": int(n_cal),
        "k": k, "seed": seed, "fallback": fallback,
    }
    return torch.from_numpy(np.ascontiguousarray(d)), torch.from_numpy(i.astype(np.int64)), info
