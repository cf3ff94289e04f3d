"""Exact cosine top-k with a bfloat16 prefilter (``--precision bf16``).

Why: on CPUs with native bf16 dot products (AVX512-BF16, AMX) a bf16 matrix product runs
~2.5x faster than the float32 one, and the float32 product is what bounds an exact search
(faiss' flat index included).  So tiles are computed in bf16, each query row collects the keys
whose bf16 score is close enough to its k-th best to matter, those are re-scored in float32,
and every row is *certified*: a rounding-error bound proves that no key left out can be in its
exact top-k.  Rows that cannot be certified (more than ``CAP`` keys crowded inside the error
band) are searched again in float32 by the caller.  The result is the exact top-k, not an
approximation.

The keys are centred first (k - mu, mu their mean): q.(k - mu) orders each query's keys exactly
like q.k, and shorter vectors round with smaller absolute errors, which matters for CNN features
that crowd around one direction (cosines 0.65 +- 0.01, say).  The bound, for a query q and a
centred key k (inputs rounded to bf16 q', k'; products accumulated in float32 over D terms; the
sum rounded to a bf16 output A; u = 2^-8 the bf16 unit roundoff)::

    |A - q.k| <= delta_q + u |A|,
    delta_q = |q'-q| max_j|k'_j| + |q| max_j|k'_j - k_j| + gamma_D |q'| max_j|k'_j|,
    gamma_D = D 2^-24 / (1 - D 2^-24)

(the three terms: input rounding, by Cauchy-Schwarz; float32 accumulation in any order;
then the output rounding, which is relative).  Let T be the k-th largest A of a row: k keys
have exact scores >= L = T - delta_q - u|T|, so every key of the exact top-k has
A + delta_q + u|A| >= L.  A key is left out only when its A is below that.  On 100k x 100k
random unit vectors (D = 256) delta is ~0.004 and ~19 keys per row are re-scored
(bench/simmatrix_scale.py prints both and how many rows were searched again).  When more than
a quarter of the rows cannot be certified (duplicates, degenerate data), the rest of the search
goes to float32 tiles directly (``GIVE_UP``).

Selection stays cheap by reading run maxima of the bf16 tile as int16 (the bit pattern of a
non-negative bf16 orders like the number; a run whose largest pattern has the sign bit holds only
values <= 0), so one integer pass finds the few runs that can hold candidates.

Tensor shapes: queries [Q, D], keys [K, D] float32, unit-norm (``similarity._prepare``); their
bf16 copies (half their size) live for the call; tiles are bf16 [block, 16 * block].
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from ganprint.tiles import _one_thread, _tiles

U = 2.0 ** -8  # bf16 unit roundoff: 8 significant bits, round to nearest even
CAP = 256  # candidates a row may collect before it is searched again in float32
RUN = 64  # columns per run for the int16 run-maximum pass
GROUP = 8  # runs per group: group maxima give each row's running lower bound
GIVE_UP = 0.25  # once more than this share of the rows so far needs float32, the rest go there directly
PILOT = 64  # rows in the first block: crowded data is detected after a small share of the work
SLACK = 1e-30  # flushed bf16/float32 subnormals (DAZ/FTZ) change a score by far less than this


def bf16_native() -> bool:
    """True when this CPU has bf16 dot-product instructions (else bf16 products are emulated and slow)."""
    f = cpu_features()
    return f["avx512_bf16"] or f["amx_bf16"]


def _torch_flag(name: str) -> bool:
    import torch

    fn = getattr(getattr(torch, "cpu", None), name, None)
    try:
        return bool(fn()) if fn is not None else False
    except Exception:  # an old or unusual build: treat as absent
        return False


def _cpu_vendor() -> str:
    """``GenuineIntel``, ``AuthenticAMD``, ... from /proc/cpuinfo ('' where it cannot be read)."""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("vendor_id"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


_FEATURES: dict[str, Any] = {}


def cpu_features() -> dict[str, Any]:
    """What :func:`bf16_rule` reads: ``vendor`` (str), ``avx512_bf16``, ``amx_bf16`` (bool; as
    torch's own dispatch sees them).  Read once per process."""
    if not _FEATURES:
        _FEATURES.update(vendor=_cpu_vendor(), avx512_bf16=_torch_flag("_is_avx512_bf16_supported"),
                         amx_bf16=_torch_flag("_is_amx_tile_supported"))
    return dict(_FEATURES)


def bf16_rule(vendor: str, avx512_bf16: bool, amx_bf16: bool) -> tuple[bool, str]:
    """(bf16 tiles are the faster ones, why): the fixed rule ``--precision auto`` applies.

    A rule on CPU features, not a timing probe, so the precision (recorded in the provenance)
    never depends on the load.  Measured with torch 2.14 / oneDNN 3.12 brgemm, [1024, 256] x
    [256, 32768] tiles, one thread (see the README, "Exact top-k at scale"):

    - AMX-BF16: tile multiply units, several times the float32 FMA rate -> bf16;
    - AMD with AVX512-BF16 (Zen 4/5): ``vdpbf16ps`` runs at the full vector rate, twice the
      float32 FMAs per cycle; bf16 tiles measured 2.9x faster than float32 (EPYC) -> bf16;
    - Intel with AVX512-BF16 but no AMX (Cooper Lake, or Sapphire/Emerald Rapids where the
      hypervisor hides AMX): oneDNN runs its native ``avx512_core_bf16`` brgemm, yet bf16 tiles
      measured 0.58x the float32 speed (Xeon family 6 model 207, ``bench/tile_precision.py``);
      the likely cause: these cores issue ``vdpbf16ps`` at half the rate of float32 FMAs, so
      bf16 brings no more multiply-adds per cycle -> fp32;
    - no bf16 dot products: emulated, slow -> fp32.
    (float16 tiles are no way out there: oneDNN's avx10_1_512 kernel measured 0.88-0.95x float32.)
    """
    if amx_bf16:
        return True, "AMX-BF16 tile units: bf16 products several times the float32 rate"
    if avx512_bf16 and vendor == "AuthenticAMD":
        return True, "AMD AVX512-BF16: vdpbf16ps at twice the float32 FMA rate"
    if avx512_bf16:
        return False, (f"{vendor or 'this CPU'}: AVX512-BF16 without AMX, where bf16 tile products measured "
                       "0.58x the float32 speed")
    return False, "no bf16 dot-product instructions: bf16 products would be emulated"


def bf16_faster() -> tuple[bool, str]:
    """:func:`bf16_rule` for the CPU this process runs on."""
    f = cpu_features()
    return bf16_rule(f["vendor"], f["avx512_bf16"], f["amx_bf16"])


def _rounded(x, mu=None):
    """bf16 copy of ``x`` [N, D] (minus ``mu`` [D] first, if given) and float64 [N] each of
    |x16 - x|, |x|, |x16| (x: the centred float32 rows), computed in slices of 4096 rows.

    x16 - x is exact in float32 (Sterbenz: the two are within a factor 2); the float32 norms are
    off by at most ~D 2^-24 relative, which the factor in :func:`prepare` covers many times over."""
    import torch

    norm = torch.linalg.vector_norm
    x16 = torch.empty(x.shape, dtype=torch.bfloat16)
    err, n, n16 = (torch.empty(x.shape[0], dtype=torch.float64) for _ in range(3))
    for s in range(0, x.shape[0], 4096):
        xs = x[s:s + 4096] if mu is None else x[s:s + 4096] - mu
        x16[s:s + 4096] = xs
        xs16 = x16[s:s + 4096].float()
        err[s:s + 4096] = norm(xs16 - xs, dim=1)
        n[s:s + 4096] = norm(xs, dim=1)
        n16[s:s + 4096] = norm(xs16, dim=1)
    return x16, err, n, n16


@dataclass
class Bf16Keys:
    """The keys of a bf16 search, prepared once (:func:`prepare_keys`) and reused by every query
    slice: ``k16`` bf16 [K, D] (centred), ``mu`` float32 [D] or None (no keys), and the float64
    maxima over keys of |k16 - k|, |k| and |k16| that enter each query's error bound."""

    k16: Any
    mu: Any
    err_max: float
    norm_max: float
    norm16_max: float

    @property
    def rows(self) -> int:
        return int(self.k16.shape[0])


def prepare_keys(keys) -> Bf16Keys:
    """Centre and round the keys [K, D] (float32, unit-norm) once per search (see :func:`prepare`)."""
    mu = keys.mean(0) if keys.shape[0] else None
    k16, e_k, n_k, n_k16 = _rounded(keys, mu)
    e_o, n_o, n_o16 = (float(v.max()) if len(v) else 0.0 for v in (e_k, n_k, n_k16))
    return Bf16Keys(k16, mu, e_o, n_o, n_o16)


def prepare_queries(queries, pk: Bf16Keys):
    """(q16 bf16 [Q, D], delta float64 [Q]): the queries' bf16 copy and error bounds against ``pk``."""
    d = queries.shape[1]
    q16, e_q, n_q, n_q16 = _rounded(queries)
    gamma = d * 2.0 ** -24 / (1 - d * 2.0 ** -24)
    e_o, n_o, n_o16 = pk.err_max, pk.norm_max, pk.norm16_max
    delta = (e_q * n_o16 + n_q * (e_o + 2.0 ** -23 * n_o) + gamma * n_q16 * n_o16) * (1 + 2.0 ** -10) + SLACK
    return q16, delta


def prepare(queries, keys):
    """bf16 operands and error bounds: (q16 [Q, D], k16 [K, D], mu [D], delta float64 [Q]) with
    |A - q_i.(k_j - mu)| <= delta_i + u|A| for A = the bf16 product of q16_i and k16_j.

    The keys are centred first: q.(k - mu) = q.k - q.mu orders each query's keys exactly like
    q.k, but |k - mu| is smaller, and with it the rounding error, when the embeddings crowd
    around a common direction (as CNN features do; random vectors are not hurt).  The float32
    subtraction k - mu adds at most 2^-24 |k - mu| per key (the 2^-23 term).  The key side
    (:func:`prepare_keys`) does not depend on the queries, so slices of queries can share it."""
    pk = prepare_keys(keys)
    q16, delta = prepare_queries(queries, pk)
    return q16, pk.k16, pk.mu, delta


def _lower_bound(t, delta):
    """Lower bound [n] on the exact score of any key whose bf16 score is >= t [n] (float64)."""
    return t - delta - U * t.abs()


def _threshold(low, delta):
    """float32 [n]: keys with bf16 score below it cannot reach ``low`` (float64 [n]), rounded down."""
    import torch

    c = low - delta
    th = torch.where(c >= 0, c / (1 + U), c / (1 - U))
    th = torch.nan_to_num(th, nan=-math.inf)  # low = -inf: nothing can be discarded yet
    t32 = th.float()
    return torch.where(t32.double() > th, torch.nextafter(t32, torch.full_like(t32, -math.inf)), t32)


def _run_max(tile, run: int, group: int, k: int):
    """One integer pass over the bf16 ``tile`` [n, m].

    Returns (upper float32 [n, m // run]: an upper bound of each run's maximum; lows float32
    [n, >= k] or fewer columns: elements of distinct groups of columns, so that the k-th
    largest of them is <= the row's k-th largest score).  Columns past the last whole run
    are not covered by ``upper``.
    """
    import torch

    n, m = tile.shape
    nr = m // run
    runs = tile.view(torch.int16).as_strided((n, nr, run), (m, run, 1))  # a view, also when m % run != 0
    mx = runs.amax(-1)  # the largest bit pattern; exact for runs with a value >= 0
    upper = mx.view(torch.bfloat16).float().clamp_(min=0.0)  # sign bit everywhere: all values <= 0
    ng = nr // group
    if ng >= k:  # the largest bit pattern of each group: one of its elements
        lows = mx[:, : ng * group].reshape(n, ng, group).amax(-1)
    elif nr >= k:
        lows = mx
    else:  # a narrow tile: its own values
        return upper, tile.float()
    return upper, lows.view(torch.bfloat16).float()


class _Collector:
    """Candidates of one block of query rows, kept flat: (row, key, bf16 score) for every key
    that may still be in its row's exact top-k.

    A row's running lower bound is the k-th largest of the "lows" of :func:`_run_max` seen so
    far.  Candidates are appended per tile and re-filtered against the risen bound only when a
    row's count passes ``cap``; a row still over ``cap`` then (keys crowded inside the error
    band: duplicates, degenerate embeddings) is dropped and searched again in float32.  So the
    lists hold at most ``n * cap`` entries after a tile, and a tile gathers at most ``n * cap``
    runs (when the runs passing the bound are that many, rows with over ``cap`` are dropped first).
    """

    def __init__(self, n: int, k: int, delta, run: int = RUN, cap: int = CAP) -> None:
        import torch

        self.n, self.k, self.run, self.cap = n, k, run, cap
        self.delta = delta  # float64 [n]
        self.top = torch.full((n, k), -math.inf)  # the k largest lows so far
        self.dead = torch.zeros(n, dtype=torch.bool)
        self.counts = torch.zeros(n, dtype=torch.long)  # entries per row, stale ones included
        self.parts: list[tuple[Any, Any, Any]] = []  # (rows, keys, bf16 scores) per tile

    def threshold(self):
        """float32 [n]: keys scoring below it in bf16 cannot be in the row's exact top-k (+inf: dropped)."""
        low = _lower_bound(self.top.amin(1).double(), self.delta)
        th = _threshold(low, self.delta)
        return th.masked_fill(self.dead, math.inf)

    def _compact(self, th):
        """Drop entries below ``th`` or of dropped rows; returns the flat (rows, keys, scores)."""
        import torch

        if not self.parts:
            e = torch.empty(0, dtype=torch.long)
            return e, e, torch.empty(0)
        rows, keys, vals = (torch.cat(x) for x in zip(*self.parts)) if len(self.parts) > 1 else self.parts[0]
        keep = vals >= th[rows]  # th is +inf for dropped rows
        rows, keys, vals = rows[keep], keys[keep], vals[keep]
        self.parts = [(rows, keys, vals)]
        self.counts = torch.bincount(rows, minlength=self.n)
        return rows, keys, vals

    def update(self, tile, col0: int, upper, lows) -> None:
        """Collect from the bf16 ``tile`` [n, m] (keys col0 .. col0 + m); ``upper``, ``lows``:
        its :func:`_run_max`."""
        import torch

        n, m = tile.shape
        run, nr = self.run, upper.shape[1]
        self.top = torch.cat([self.top, lows], 1).topk(self.k, dim=1, sorted=False).values
        th = self.threshold()
        if nr:
            hit = upper >= th.unsqueeze(1)  # runs that may hold candidates
            rr, rc = hit.nonzero(as_tuple=True)
            if len(rr) > n * self.cap // 4:  # unusually many: drop rows with more runs than cap
                crowded = hit.sum(1) > self.cap
                if bool(crowded.any()):
                    self.dead |= crowded
                    th = th.masked_fill(crowded, math.inf)
                    keep = ~crowded[rr]
                    rr, rc = rr[keep], rc[keep]
            if nr * run == m:  # whole runs are rows of a [n * nr, run] view: index_select is a memcpy
                seg = torch.index_select(tile.view(n * nr, run), 0, rr * nr + rc)
            else:
                seg = tile.as_strided((n, nr, run), (m, run, 1))[rr, rc]
            seg = seg.float()  # [runs, run]
            pi, pj = ((seg >= th[rr].unsqueeze(1)) & (seg > -math.inf)).nonzero(as_tuple=True)
            self._add(rr[pi], rc[pi] * run + pj + col0, seg[pi, pj])
        if nr * run < m:  # the columns after the last whole run (fewer than ``run``)
            tail = tile[:, nr * run:].float()
            ti, tj = ((tail >= th.unsqueeze(1)) & (tail > -math.inf)).nonzero(as_tuple=True)
            self._add(ti, tj + col0 + nr * run, tail[ti, tj])
        if bool((self.counts > self.cap).any()):
            self._compact(th)  # re-filter against the risen bound first
            crowded = self.counts > self.cap
            if bool(crowded.any()):
                self.dead |= crowded
                self._compact(th.masked_fill(crowded, math.inf))

    def _add(self, rows, keys, vals) -> None:
        import torch

        if len(rows):
            self.parts.append((rows, keys, vals))
            self.counts += torch.bincount(rows, minlength=self.n)

    def finish(self, queries, keys, stats: dict[str, Any] | None = None):
        """Re-score the candidates in float32: (values [n, k] descending, indices [n, k],
        certified bool [n]).  queries [n, D] are this block's rows; uncertified rows hold -inf / -1."""
        import torch

        n, k = self.n, self.k
        rows, kidx, _ = self._compact(self.threshold())
        exact = torch.empty(len(rows))
        for s in range(0, len(rows), 4096):  # in slices: gathered rows stay a few MiB
            e = s + 4096
            exact[s:e] = torch.linalg.vecdot(torch.index_select(keys, 0, kidx[s:e]),
                                             torch.index_select(queries, 0, rows[s:e]))
        # group by row, best first (ties: the lower key index first, as collected)
        order = torch.argsort(exact, descending=True, stable=True)
        order = order[torch.argsort(rows[order], stable=True)]
        rows, kidx, exact = rows[order], kidx[order], exact[order]
        counts = torch.bincount(rows, minlength=n)
        pos = torch.arange(len(rows)) - (torch.cumsum(counts, 0) - counts)[rows]
        top = pos < k
        v = torch.full((n, k), -math.inf)
        i = torch.full((n, k), -1, dtype=torch.long)
        v[rows[top], pos[top]] = exact[top]
        i[rows[top], pos[top]] = kidx[top]
        if stats is not None:
            stats["rescored"] = stats.get("rescored", 0) + len(rows)
        return v, i, ~self.dead & (counts >= k)


def bf16_topk(queries, keys, k: int, *, block: int, key_factor: int, exclude=None, cap: int = CAP,
              run: int = RUN, stats: dict[str, Any] | None = None, prepared: Bf16Keys | None = None):
    """Exact top-k of unit-norm ``keys`` [K, D] for each unit-norm query [Q, D] (cosine), on CPU.

    ``exclude`` int64 [Q]: a key index to skip per query (-1: none).  Returns (values float32
    [Q, k], indices int64 [Q, k], rows int64 [U]: the queries that were not certified and must
    be searched again in float32).  ``stats`` (optional) receives counts for benchmarks.
    ``prepared``: :func:`prepare_keys` of these ``keys``, when several calls (query slices,
    ranks) search the same keys; else they are prepared here.
    Tiles are [block, key_factor * block] bf16 values (2 bytes each).
    """
    import torch

    nq, nk = queries.shape[0], keys.shape[0]
    cap = max(cap, 4 * k)
    if prepared is None:
        prepared = prepare_keys(keys)
    elif prepared.rows != nk or prepared.k16.shape[1] != keys.shape[1]:
        raise ValueError(f"prepared keys are [{prepared.rows}, {prepared.k16.shape[1]}], the keys {tuple(keys.shape)}")
    k16 = prepared.k16
    q16, delta = prepare_queries(queries, prepared)
    qblock, kblock = block, block * key_factor
    buf = torch.empty(min(qblock, nq) * min(kblock, nk), dtype=torch.bfloat16)
    out_v = torch.full((nq, k), -math.inf)
    out_i = torch.full((nq, k), -1, dtype=torch.long)
    redo = []
    excl = None if exclude is None else torch.as_tensor(exclude, dtype=torch.long)
    with torch.inference_mode():
        pilot = min(PILOT, qblock, nq)
        for q0, q1 in [(0, pilot)] + [(s, min(nq, s + qblock)) for s in range(pilot, nq, qblock)]:
            q = q16[q0:q1]
            cands = _Collector(q1 - q0, k, delta[q0:q1], run, cap=cap)
            ex = None if excl is None else excl[q0:q1]
            for k0, k1 in _tiles(nk, kblock):
                tile = buf[: (q1 - q0) * (k1 - k0)].view(q1 - q0, k1 - k0)
                torch.mm(q, k16[k0:k1].t(), out=tile)
                if ex is not None:
                    hit = (ex >= k0) & (ex < k1)
                    if bool(hit.any()):
                        r = hit.nonzero().squeeze(1)
                        tile[r, ex[r] - k0] = -math.inf
                upper, lows = _run_max(tile, run, GROUP, k)  # the one pass over the tile: all threads
                with _one_thread(tile.device):
                    cands.update(tile, k0, upper, lows)
            v, i, ok = cands.finish(queries[q0:q1], keys, stats)
            out_v[q0:q1], out_i[q0:q1] = v, i
            redo.append((~ok).nonzero().squeeze(1) + q0)
            if sum(len(r) for r in redo) > GIVE_UP * q1 and q1 < nq:
                # the error band holds too many keys for this data: float32 tiles are cheaper
                redo.append(torch.arange(q1, nq))
                if stats is not None:
                    stats["gave_up_at_row"] = q1
                break
    redo_rows = torch.cat(redo) if redo else torch.empty(0, dtype=torch.long)
    if stats is not None:
        stats["rows"] = stats.get("rows", 0) + nq
        stats["redone"] = stats.get("redone", 0) + len(redo_rows)
        stats["delta_max"] = max(stats.get("delta_max", 0.0), float(delta.max()) if nq else 0.0)
    return out_v, out_i, redo_rows
