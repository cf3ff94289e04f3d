"""Tile helpers shared by the exact searches (:mod:`ganprint.similarity`, :mod:`ganprint.prefilter`).

A bottom module: it imports no other ganprint module, so both searches can use it without
importing each other.
"""

from __future__ import annotations

import contextlib
import math


@contextlib.contextmanager
def _one_thread(device):
    """Run the selection on one thread.  With two, each of its ~10 small ops ends in a barrier,
    and when other jobs share the cores a descheduled partner thread makes every barrier cost a
    time slice: on a loaded 2-core box the selection cost 1.48x the matmul with two threads,
    1.19x with one (the matmul keeps both)."""
    import torch

    if getattr(device, "type", device) != "cpu":
        yield
        return
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def _tiles(n: int, size: int):
    """(start, stop) of consecutive slices of ``range(n)``, ``size`` long (the last may be shorter)."""
    for s in range(0, n, size):
        yield s, min(n, s + size)


GROUPS = 128  # column groups per sub-tile for the group-maximum pass (contiguous: the max vectorises)
SUB = 1024  # keys per sub-tile: [512, 1024] float32 is 2 MiB, read back from the core's cache


def block_topk(n: int, nk: int, k: int, tile_fn, kblock: int, buf, *, k_start: int = 0, exclude=None,
               groups: int = GROUPS, sub: int = SUB):
    """Exact top-k over keys ``k_start .. k_start + nk`` for one block of ``n`` query rows, on the
    calling thread: (values float32 [n, k] descending, key indices int64 [n, k]; -inf / -1 where a
    row has fewer than k finite scores).  Ties: the lower key index first.

    ``tile_fn(k0, k1, out)`` writes the scores [n, k1 - k0] of keys k0 .. k1 into ``out`` (a
    contiguous [n, k1 - k0] view of ``buf``, which holds >= n * kblock floats); ``exclude`` int64
    [n]: a key per row to skip.

    A tile of ``kblock`` keys is computed as sub-tiles of ``sub`` keys, each stored contiguously
    and, while it is still in the core's cache, reduced to group maxima: column j of a sub-tile
    belongs to group j % G, so the maxima [n, G] are one elementwise pass over its sub / G column
    slabs (vectorised, unlike maxima of short contiguous runs).  Per tile, only groups whose
    maximum reaches the row's running k-th best (on the first tile: the k-th best group maximum,
    k of the tile's own values) are gathered, and their elements that reach it merged into the
    running top-k.  The bound only rises, so nothing that can be in the top-k is skipped.
    """
    import torch

    inf = math.inf
    top_v = torch.full((n, k), -inf)
    top_i = torch.full((n, k), -1, dtype=torch.long)
    g = groups if sub % groups == 0 and sub >= groups else 0
    r_per = sub // g if g else 0
    nsub_max = max(1, kblock // sub) if g else 0
    gm_buf = torch.empty(n, nsub_max * g) if g else None
    full = False
    for k0, k1 in _ranges(k_start, k_start + nk, kblock):
        m = k1 - k0
        nfull = min(nsub_max, m // sub) if g else 0
        main = nfull * sub
        for s in range(nfull):  # product and group maxima per sub-tile
            out = buf[s * n * sub:(s + 1) * n * sub].view(n, sub)
            tile_fn(k0 + s * sub, k0 + (s + 1) * sub, out)
            if exclude is not None:
                _mask(out, exclude, k0 + s * sub, k0 + (s + 1) * sub)
            torch.amax(out.view(n, r_per, g), 1, out=gm_buf[:, s * g:(s + 1) * g])
        tail = None
        if main < m:  # keys after the last whole sub-tile: filtered element by element
            tail = buf[main * n:main * n + n * (m - main)].view(n, m - main)
            tile_fn(k0 + main, k1, tail)
            if exclude is not None:
                _mask(tail, exclude, k0 + main, k1)
        gm = gm_buf[:, : nfull * g] if nfull else None
        if full:
            th = top_v[:, -1]
        else:
            # k of the tile's own values (group maxima; a narrow tile's values): a bound from the start
            pool = torch.cat([top_v, gm if gm is not None else tail], 1)
            th = pool.topk(k, dim=1, sorted=False).values.amin(1)
        rows_l, cols_l, vals_l = [], [], []
        if gm is not None:
            gm3 = gm.view(n, nfull, g)
            r1, s1 = (gm3.amax(2) >= th.unsqueeze(1)).nonzero(as_tuple=True)  # (row, sub-tile) pairs that may hit
            pi, grp = (gm3[r1, s1] >= th[r1].unsqueeze(1)).nonzero(as_tuple=True) if len(r1) else (r1, r1)
            if len(pi):
                rr, sub_i = r1[pi], s1[pi]
                slabs = buf[: nfull * n * sub].view(nfull, n, r_per, g)
                seg = slabs[sub_i, rr, :, grp]  # [h, r_per]: the hit groups' elements
                pi2, pj = ((seg >= th[rr].unsqueeze(1)) & (seg > -inf)).nonzero(as_tuple=True)
                rows_l.append(rr[pi2])
                cols_l.append(sub_i[pi2] * sub + pj * g + grp[pi2])
                vals_l.append(seg[pi2, pj])
        if tail is not None:
            ti, tj = ((tail >= th.unsqueeze(1)) & (tail > -inf)).nonzero(as_tuple=True)
            rows_l.append(ti)
            cols_l.append(tj + main)
            vals_l.append(tail[ti, tj])
        if sum(len(x) for x in rows_l) == 0:
            continue
        rows, cols, vals = (torch.cat(x) if len(x) > 1 else x[0] for x in (rows_l, cols_l, vals_l))
        o = torch.argsort(rows * m + cols)  # by row, then key: the earlier key first among ties
        rows, cols, vals = rows[o], cols[o] + k0, vals[o]
        ur, cnt = torch.unique_consecutive(rows, return_counts=True)
        lid = torch.repeat_interleave(torch.arange(len(ur)), cnt)
        pos = torch.arange(len(rows)) - torch.repeat_interleave(torch.cumsum(cnt, 0) - cnt, cnt)
        w = k + int(cnt.max())
        pv = torch.full((len(ur), w), -inf)
        pidx = torch.full((len(ur), w), -1, dtype=torch.long)
        pv[:, :k], pidx[:, :k] = top_v[ur], top_i[ur]  # earlier tiles: lower key indices, first
        pv[lid, k + pos], pidx[lid, k + pos] = vals, cols
        sv, so = torch.sort(pv, dim=1, descending=True, stable=True)
        top_v[ur], top_i[ur] = sv[:, :k], pidx.gather(1, so[:, :k])
        if not full:
            full = bool((top_v[:, -1] > -inf).all())
    return top_v, top_i


def _mask(tile, exclude, k0: int, k1: int) -> None:
    """Set tile[r, exclude[r] - k0] = -inf where exclude[r] is in k0 .. k1."""
    hit = (exclude >= k0) & (exclude < k1)
    if bool(hit.any()):
        r = hit.nonzero().squeeze(1)
        tile[r, exclude[r] - k0] = -math.inf


def _ranges(start: int, stop: int, size: int):
    for s in range(start, stop, size):
        yield s, min(stop, s + size)


def merge_topk(parts, k: int):
    """Merge per-key-range results [(values [n, k_i], indices [n, k_i]), ...] (ranges in increasing
    key order) into the top-k [n, k]; ties: the lower key index first."""
    import torch

    if len(parts) == 1:
        return parts[0]
    v = torch.cat([p[0] for p in parts], 1)
    i = torch.cat([p[1] for p in parts], 1)
    sv, so = torch.sort(v, dim=1, descending=True, stable=True)
    return sv[:, :k].contiguous(), i.gather(1, so[:, :k])


def parallel_blocks(tasks, work, threads: int):
    """Run ``work(task)`` for every task on ``threads`` single-threaded workers (Python threads; torch
    releases the GIL inside its ops) and return the results in task order.

    Independent single-threaded streams instead of one stream of multi-threaded ops: no barrier
    per op, so a core taken by another process delays one worker instead of making the other spin
    at every barrier, and results do not depend on the thread count (each product is one
    single-threaded call on a fixed tile shape)."""
    import concurrent.futures

    import torch

    def run(task):
        torch.set_num_threads(1)  # this thread's OpenMP setting (and MKL's)
        with torch.inference_mode():
            return work(task)

    if threads <= 1 or len(tasks) <= 1:
        with _one_thread("cpu"):
            with torch.inference_mode():
                return [work(t) for t in tasks]
    n = torch.get_num_threads()
    try:
        with concurrent.futures.ThreadPoolExecutor(min(threads, len(tasks))) as ex:
            return list(ex.map(run, tasks))
    finally:
        torch.set_num_threads(n)
