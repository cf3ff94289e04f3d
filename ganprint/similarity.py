"""``simmatrix`` stage: generated x real similarity from embeddings artifacts.

Similarity is cosine (default) or negative L2 distance, so that *larger = more similar* for both.
Small problems store the full matrix ``[G, R]``; large ones are searched in tiles of
``[block, 16 * block]`` values and only the top-k per row survive, so peak memory is bounded by
``--block`` and not by ``G * R``.

Exact top-k per tile without sorting the tile: the tile is cut into runs of ``chunk`` columns
and each run's maximum is taken (one cheap pass).  Any element of a row's top-k lies in one of the
k runs with the largest maxima (if k runs had larger maxima there would be k larger elements),
so only ``k * chunk`` candidates per row are gathered (one memcpy), and the same is applied to
them with runs of 8; every ``torch.topk`` then sees short rows.  On an idle 2-core CPU the
selection costs ~8-15% of the tile matmuls (bench/simmatrix_scale.py).  It runs on one thread
(see :func:`_one_thread`), the matmul on all.

Public API (library first; the CLI module only parses options):

- :func:`topk_search` one direction, queries x keys, streaming; ``exclude`` drops a pair per row.
- :func:`compute_similarity` all tensors of a similarity artifact from in-memory embeddings.
- :func:`run_simmatrix` artifacts in, artifact out (the ``ganprint simmatrix`` command).
- :func:`check_comparable` refuse embeddings from different backbones / weights / checkpoints.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ganprint.artifacts import (
    TENSOR_SUFFIX,
    Artifact,
    artifact_paths,
    base_provenance,
    read_artifact,
    write_artifact,
)
from ganprint.errors import ArtifactError, GanprintError
from ganprint.tiles import _one_thread, _tiles  # noqa: F401  (re-exported for bench/)

METRICS = ("cosine", "l2")
PRECISIONS = ("auto", "fp32", "bf16")
DEFAULT_K = 10
DEFAULT_BLOCK = 1024
KEY_BLOCK_FACTOR = 16  # tiles [block, 16*block]: wide tiles amortise the per-row selection cost
BF16_KEY_BLOCK_FACTOR = 32  # bf16 tiles twice as wide: the same bytes, half the selection steps
CHUNK = 64  # run length for the run-maximum prefilter (cost ~ m/chunk + k*chunk per row)
FULL_AUTO_MAX = 1 << 22  # store the full matrix automatically up to 4M values (16 MiB)

def preload(*extra: str) -> None:
    """Import the heavy modules now; a stage reading its input path from a pipe calls this first,
    so its start-up overlaps the upstream stage instead of following it."""
    import importlib

    for name in ("torch", "pandas", "pyarrow.parquet", "safetensors.torch", *extra):
        importlib.import_module(name)


# ---------------------------------------------------------------------------------------------
# comparability


def comparable_key(prov: dict[str, Any]) -> dict[str, Any]:
    """What must agree for two embeddings artifacts to live in one feature space."""
    ckpt = prov.get("checkpoint")
    return {
        "backbone": prov.get("backbone"),
        "weights_digest": prov.get("weights_digest"),
        "preprocess": prov.get("preprocess"),
        "checkpoint": ckpt.get("digest") if isinstance(ckpt, dict) else ckpt,
    }


def check_comparable(prov_a: dict[str, Any], name_a: Any, prov_b: dict[str, Any], name_b: Any) -> None:
    """Raise :class:`ArtifactError` (one line, naming both files) unless the two agree."""
    ka, kb = comparable_key(prov_a), comparable_key(prov_b)
    if ka == kb:
        return
    diffs = []
    for key in ka:
        if ka[key] != kb[key]:
            va, vb = ka[key], kb[key]
            if key in ("weights_digest", "checkpoint"):
                va, vb = (str(v)[:12] if v is not None else None for v in (va, vb))
            diffs.append(f"{key} {va} vs {vb}")
    raise ArtifactError(
        f"{name_a} and {name_b}: embeddings are not comparable ({'; '.join(diffs)}); "
        "embed both with the same --backbone, --weights, --image-size and --checkpoint"
    )


# ---------------------------------------------------------------------------------------------
# streaming exact top-k


@dataclass
class TopK:
    """``values`` float32 [Q, k] (descending), ``indices`` int64 [Q, k] into the keys."""

    values: Any
    indices: Any


def _prepare(x, metric: str):
    import torch

    x = torch.as_tensor(x).float()
    if x.dim() != 2:
        raise GanprintError(f"embeddings must be a 2-d tensor [N, D], got shape {tuple(x.shape)}")
    if not bool(torch.isfinite(x).all()):
        raise GanprintError("embeddings contain NaN or infinite values; re-run `ganprint embed` (corrupt artifact?)")
    if metric == "l2" and x.numel() and float(x.double().pow(2).sum(1).max()) > 1e37:
        # |a|^2 + |b|^2 - 2ab overflows float32 (max 3.4e38): distances would be inf - inf = NaN
        raise GanprintError("embeddings too large for --metric l2 (squared norms overflow float32); "
                            "use --metric cosine or rescale the embeddings")
    if metric == "cosine":
        x = torch.nn.functional.normalize(x, dim=1)
    return x.contiguous()


def _check_metric(metric: str) -> None:
    if metric not in METRICS:
        raise GanprintError(f"--metric {metric}: unknown; use one of {', '.join(METRICS)}")


def _select_rows(x, k: int, chunk: int):
    """Exact top-k per row of ``x`` [n, m] (k <= m): (values [n, k], column positions [n, k]),
    unsorted.  Runs of ``chunk`` columns are reduced to their maxima, the k best runs kept, and
    the same applied again (runs of 8) to their k * chunk candidates, so every ``topk`` sees
    short rows."""
    import torch

    n, m = x.shape
    nch = m // chunk
    if nch <= k or chunk < 2:
        return x.topk(k, dim=1, sorted=False)
    main = nch * chunk
    if main == m and x.is_contiguous():
        ci = x.view(n, nch, chunk).amax(-1).topk(k, dim=1, sorted=False).indices  # [n, k] best runs
        # whole runs are contiguous rows of a [n * nch, chunk] view: index_select is a memcpy
        rows = (torch.arange(n, device=x.device).unsqueeze(1) * nch + ci).view(-1)
        cand = torch.index_select(x.view(n * nch, chunk), 0, rows).view(n, k * chunk)
    else:
        runs = x[:, :main].unflatten(1, (nch, chunk))
        ci = runs.amax(-1).topk(k, dim=1, sorted=False).indices
        cand = runs.gather(1, ci.unsqueeze(-1).expand(n, k, chunk)).reshape(n, k * chunk)
    v, p = _select_rows(cand, k, 8 if chunk > 8 else 1)
    pos = ci.gather(1, p // chunk) * chunk + p % chunk
    if main < m:  # the last m % chunk columns
        vt, pt = x[:, main:].topk(min(k, m - main), dim=1, sorted=False)
        v, p = torch.cat([v, vt], 1).topk(k, dim=1, sorted=False)
        pos = torch.cat([pos, pt + main], 1).gather(1, p)
    return v, pos


class _RowTopK:
    """Running exact top-k per row over successive column tiles."""

    def __init__(self, n: int, k: int, device, chunk: int = CHUNK) -> None:
        import torch

        self.k = k
        self.chunk = chunk
        self.values = torch.full((n, k), -math.inf, device=device)
        self.indices = torch.full((n, k), -1, dtype=torch.long, device=device)

    def update(self, tile, col0: int, row0: int = 0) -> None:
        """Merge ``tile`` [n, m] (columns ``col0 .. col0 + m``) into rows ``row0 .. row0 + n``."""
        n = tile.shape[0]
        if row0 == 0 and n == self.values.shape[0]:
            self.values, self.indices = self._merge(tile, col0, self.values, self.indices)
        else:
            v, i = self._merge(tile, col0, self.values[row0:row0 + n], self.indices[row0:row0 + n])
            self.values[row0:row0 + n] = v
            self.indices[row0:row0 + n] = i

    def _merge(self, tile, col0: int, old_v, old_i):
        import torch

        k = self.k
        with _one_thread(tile.device):
            v1, p1 = _select_rows(tile, min(k, tile.shape[1]), self.chunk)
            v, p = torch.cat([old_v, v1], 1).topk(k, dim=1)  # sorted: values[:, -1] is the k-th best
            return v, torch.cat([old_i, p1 + col0], 1).gather(1, p)


def _sim_tile(q, kb, qsq, ksq, metric: str, buf):
    """Similarity tile [nq, nk] into ``buf``: cosine = q.k (inputs unit-norm); l2 = -|q - k|^2."""
    import torch

    nq, nk = q.shape[0], kb.shape[0]
    out = buf.view(-1)[: nq * nk].view(nq, nk)  # contiguous view, reused: no allocation per tile
    if metric == "cosine":
        torch.mm(q, kb.t(), out=out)
    else:
        torch.addmm(ksq.unsqueeze(0), q, kb.t(), beta=-1.0, alpha=2.0, out=out)
        out.sub_(qsq.unsqueeze(1))
        out.clamp_(max=0.0)
    return out


def _finish_values(values, metric: str):
    """Internal tile values -> reported similarity (l2 tiles hold -d^2; report -d)."""
    if metric == "l2":
        return -(-values).clamp(min=0.0).sqrt()
    return values


def topk_search(
    queries,
    keys,
    k: int,
    *,
    metric: str = "cosine",
    block: int = DEFAULT_BLOCK,
    device: Any = "cpu",
    exclude=None,
    key_k: int = 0,
    matrix: bool = False,
    chunk: int = CHUNK,
    prepared: bool = False,
    precision: str = "fp32",
    stats: dict[str, Any] | None = None,
    key_prep: Any = None,
) -> tuple[TopK, TopK | None, Any]:
    """Exact top-k of ``keys`` for every query, streaming over tiles.

    queries [Q, D], keys [K, D] (float; normalised here for cosine unless ``prepared``);
    ``exclude`` int64 [Q]: one key index to skip per query (-1: none), e.g. the query itself.
    Returns (per query TopK [Q, k], per key TopK [K, key_k] over queries or None,
    full matrix [K, Q] (keys x queries, CPU) or None).  Peak extra memory ~ 16*block^2 floats
    (+ the matrix when asked for).  ``precision``: fp32 tiles, or bf16 tiles with certified
    float32 re-scoring (:mod:`ganprint.prefilter`; exact too), or auto (see
    :func:`resolve_precision`).  ``stats`` (optional) receives the bf16 path's counts.
    ``key_prep``: ``prefilter.prepare_keys(keys)`` when several calls search the same keys with
    bf16 tiles (query slices): the keys are then centred and rounded once (the fp32 path ignores it).
    """
    import torch

    _check_metric(metric)
    if block < 1:
        raise GanprintError(f"--block {block}: must be at least 1")
    dev = torch.device(device) if not isinstance(device, torch.device) else device
    if not prepared:
        queries, keys = _prepare(queries, metric), _prepare(keys, metric)
    nq_all, nk_all = queries.shape[0], keys.shape[0]
    if queries.shape[1] != keys.shape[1]:
        raise GanprintError(f"embedding sizes differ: {queries.shape[1]} vs {keys.shape[1]}")
    n_ex = 1 if exclude is not None and bool((torch.as_tensor(exclude) >= 0).any()) else 0
    k = min(k, nk_all - n_ex)
    key_k = min(key_k, nq_all - n_ex)
    if k < 1:
        raise GanprintError(f"top-k search needs at least {1 + n_ex} key rows, got {nk_all}")
    if resolve_precision(precision, metric, dev, matrix=matrix, size=nq_all * nk_all,
                         exclude_keys=n_ex > 0 and key_k > 0) == "bf16":
        return _topk_bf16(queries, keys, k, block=block, exclude=exclude, key_k=key_k, chunk=chunk, stats=stats,
                          key_prep=key_prep)
    if dev.type == "cpu" and not matrix and key_k == 0:
        return _topk_cpu(queries, keys, k, metric=metric, block=block, exclude=exclude), None, None
    keys_d = keys.to(dev)
    ksq = (keys_d * keys_d).sum(1) if metric == "l2" else None
    qblock, kblock = block, block * KEY_BLOCK_FACTOR
    buf = torch.empty(min(qblock, nq_all) * min(kblock, nk_all), device=dev)
    out_v = torch.empty(nq_all, k)
    out_i = torch.empty(nq_all, k, dtype=torch.long)
    full = torch.empty(nk_all, nq_all) if matrix else None
    key_sel = _RowTopK(nk_all, key_k, dev, chunk) if key_k > 0 else None
    excl = None if exclude is None else torch.as_tensor(exclude, dtype=torch.long)
    with torch.inference_mode():
        for q0, q1 in _tiles(nq_all, qblock):
            q = queries[q0:q1].to(dev)
            qsq = (q * q).sum(1) if metric == "l2" else None
            sel = _RowTopK(q1 - q0, k, dev, chunk)
            ex = None if excl is None else excl[q0:q1].to(dev)
            for k0, k1 in _tiles(nk_all, kblock):
                tile = _sim_tile(q, keys_d[k0:k1], qsq, None if ksq is None else ksq[k0:k1], metric, buf)
                if ex is not None:
                    hit = (ex >= k0) & (ex < k1)
                    if bool(hit.any()):
                        rows = hit.nonzero().squeeze(1)
                        tile[rows, ex[rows] - k0] = -math.inf
                sel.update(tile, k0)
                if full is not None:
                    full[k0:k1, q0:q1] = tile.t().cpu()
                if key_sel is not None:
                    key_sel.update(tile.t().contiguous(), q0, row0=k0)
            out_v[q0:q1] = sel.values.cpu()
            out_i[q0:q1] = sel.indices.cpu()
    res = TopK(_finish_values(out_v, metric), out_i)
    kres = None
    if key_sel is not None:
        kres = TopK(_finish_values(key_sel.values.cpu(), metric), key_sel.indices.cpu())
    if full is not None:
        full = _finish_values(full, metric)  # excluded pairs stay -inf
    return res, kres, full


def cpu_tile(block: int) -> tuple[int, int]:
    """The float32 CPU path's tile [query rows, keys] for ``--block``: [block / 2, 16 block] (32 MiB
    at the default), one per worker thread, computed in sub-tiles of 1024 keys (2 MiB) that stay
    in the core's cache between their product and the group-maximum pass that reads them back
    (on a whole 64 MiB tile that pass cost ~15% of the product, on a 2 MiB one ~2%)."""
    return max(1, block // 2), max(1, 16 * block)


def _topk_cpu(queries, keys, k: int, *, metric: str, block: int, exclude=None) -> TopK:
    """topk_search's float32 CPU path, per query only (inputs prepared): the query blocks (and,
    when they are fewer than the threads, key ranges) go to single-threaded workers
    (:func:`ganprint.tiles.parallel_blocks`), each running :func:`ganprint.tiles.block_topk`."""
    import torch

    from ganprint.tiles import block_topk, merge_topk, parallel_blocks

    nq, nk = queries.shape[0], keys.shape[0]
    qrows, kcols = cpu_tile(block)
    threads = torch.get_num_threads()
    qblocks = list(_tiles(nq, qrows))
    nsplit = 1 if len(qblocks) >= threads else min(threads, max(1, nk // kcols))
    kranges = [(nk * j // nsplit, nk * (j + 1) // nsplit) for j in range(nsplit)]
    ksq = (keys * keys).sum(1) if metric == "l2" else None
    excl = None if exclude is None else torch.as_tensor(exclude, dtype=torch.long)
    bufs: dict[int, Any] = {}

    def work(task):
        (q0, q1), (a, b) = task
        import threading

        buf = bufs.get(threading.get_ident())
        if buf is None:
            buf = bufs[threading.get_ident()] = torch.empty(min(qrows, nq) * min(kcols, nk))
        q = queries[q0:q1]
        qsq = (q * q).sum(1) if metric == "l2" else None

        def tile_fn(k0, k1, out):
            if metric == "cosine":
                torch.mm(q, keys[k0:k1].t(), out=out)
            else:
                _sim_tile(q, keys[k0:k1], qsq, ksq[k0:k1], metric, out)

        return block_topk(q1 - q0, b - a, k, tile_fn, kcols, buf, k_start=a,
                          exclude=None if excl is None else excl[q0:q1])

    tasks = [(qb, kr) for qb in qblocks for kr in kranges]
    res = parallel_blocks(tasks, work, threads)
    out_v = torch.empty(nq, k)
    out_i = torch.empty(nq, k, dtype=torch.long)
    for bi, (q0, q1) in enumerate(qblocks):
        v, i = merge_topk(res[bi * nsplit:(bi + 1) * nsplit], k)
        out_v[q0:q1], out_i[q0:q1] = v, i
    return TopK(_finish_values(out_v, metric), out_i)


def resolve_precision(precision: str, metric: str, device: Any, *, matrix: bool = False, size: int | None = None,
                      exclude_keys: bool = False) -> str:
    """The tile precision a search runs with: ``fp32`` or ``bf16``.

    ``bf16`` needs cosine on CPU; a full matrix is always float32.  ``auto`` picks bf16 where
    it is exact *and* faster: cosine, CPU, no full matrix, at least ``FULL_AUTO_MAX`` pairs
    (below that, the float32 path is already fast), and a CPU whose bf16 products beat its
    float32 ones by :func:`ganprint.prefilter.bf16_rule` (AMX, or AMD AVX512-BF16; not Intel
    AVX512-BF16 without AMX, where bf16 tiles measured 0.58x the float32 speed).
    """
    if precision not in PRECISIONS:
        raise GanprintError(f"--precision {precision}: unknown; use one of {', '.join(PRECISIONS)}")
    on_cpu = getattr(device, "type", str(device)) == "cpu"
    if precision == "bf16":
        if metric != "cosine":
            raise GanprintError("--precision bf16 works with --metric cosine only; use --precision fp32 for l2")
        if not on_cpu:
            raise GanprintError("--precision bf16 is a CPU path; on a GPU use --precision fp32 (or auto)")
        return "fp32" if matrix or exclude_keys else "bf16"
    if precision == "fp32" or metric != "cosine" or not on_cpu or matrix or exclude_keys:
        return "fp32"
    return "bf16" if auto_precision_reason(size)[0] else "fp32"


def auto_precision_reason(size: int | None = None) -> tuple[bool, str]:
    """(``--precision auto`` takes bf16 for a cosine search on this CPU, why) — a fixed rule on
    the problem size and the CPU's features (:func:`ganprint.prefilter.bf16_rule`), never a
    timing probe."""
    if size is not None and size < FULL_AUTO_MAX:
        return False, f"fewer than {FULL_AUTO_MAX} pairs: float32 tiles are fast enough"
    from ganprint.prefilter import bf16_faster

    return bf16_faster()


def _topk_bf16(queries, keys, k: int, *, block: int, exclude, key_k: int, chunk: int, stats, key_prep=None):
    """topk_search's bf16 path (cosine, CPU, unit-norm inputs): both directions, each certified,
    uncertified rows searched again with float32 tiles."""
    import torch

    from ganprint.prefilter import bf16_topk

    def one_way(qs, ks, kk, ex, prep=None):
        v, i, redo = bf16_topk(qs, ks, kk, block=block, key_factor=BF16_KEY_BLOCK_FACTOR, exclude=ex, stats=stats,
                               prepared=prep)
        if len(redo):
            again, _, _ = topk_search(qs[redo], ks, kk, block=block, exclude=None if ex is None else
                                      torch.as_tensor(ex)[redo], chunk=chunk, prepared=True, precision="fp32")
            v[redo], i[redo] = again.values, again.indices
        return TopK(v, i)

    res = one_way(queries, keys, k, exclude, key_prep)
    kres = one_way(keys, queries, key_k, None) if key_k > 0 else None
    return res, kres, None


def faiss_topk(queries, keys, k: int, *, metric: str = "cosine", exclude=None, prepared: bool = False) -> TopK:
    """The same search as :func:`topk_search` (per-query side) with faiss' exact flat index."""
    import numpy as np
    import torch

    try:
        import faiss
    except ImportError:
        raise GanprintError("--engine faiss: faiss is not installed; pip install faiss-cpu (or use --engine exact)") from None
    _check_metric(metric)
    if not prepared:
        queries, keys = _prepare(queries, metric), _prepare(keys, metric)
    q = np.ascontiguousarray(queries.numpy(), dtype=np.float32)
    kk = np.ascontiguousarray(keys.numpy(), dtype=np.float32)
    extra = 1 if exclude is not None else 0
    k = min(k, kk.shape[0] - extra)
    if k < 1:
        raise GanprintError(f"top-k search needs at least {1 + extra} key rows, got {kk.shape[0]}")
    index = faiss.IndexFlatIP(kk.shape[1]) if metric == "cosine" else faiss.IndexFlatL2(kk.shape[1])
    index.add(kk)
    d, i = index.search(q, k + extra)
    if metric == "l2":
        d = -np.sqrt(np.maximum(d, 0.0))
    if exclude is not None:
        ex = np.asarray(exclude).reshape(-1, 1)
        keep = i != ex
        # drop the excluded column where present, else the last one
        keep[keep.all(1), -1] = False
        d = d[keep].reshape(len(q), k)
        i = i[keep].reshape(len(q), k)
    return TopK(torch.from_numpy(np.ascontiguousarray(d, dtype=np.float32)), torch.from_numpy(i.astype(np.int64)))


def count_at_least(queries, keys, thresholds, *, metric: str = "cosine", block: int = DEFAULT_BLOCK,
                   device: Any = "cpu", prepared: bool = False):
    """int64 [Q]: how many keys have similarity >= thresholds[q] (similarity as reported)."""
    import torch

    _check_metric(metric)
    dev = torch.device(device) if not isinstance(device, torch.device) else device
    if not prepared:
        queries, keys = _prepare(queries, metric), _prepare(keys, metric)
    thr = torch.as_tensor(thresholds, dtype=torch.float32)
    if metric == "l2":  # tiles hold -d^2: s >= t  <=>  -d^2 >= -t^2 (t <= 0)
        thr = -(thr.clamp(max=0.0) ** 2)
    keys_d = keys.to(dev)
    ksq = (keys_d * keys_d).sum(1) if metric == "l2" else None
    qblock, kblock = block, block * KEY_BLOCK_FACTOR
    buf = torch.empty(min(qblock, len(queries)) * min(kblock, len(keys)), device=dev)
    counts = torch.zeros(len(queries), dtype=torch.long)
    with torch.inference_mode():
        for q0, q1 in _tiles(len(queries), qblock):
            q = queries[q0:q1].to(dev)
            qsq = (q * q).sum(1) if metric == "l2" else None
            t = thr[q0:q1].to(dev).unsqueeze(1)
            c = torch.zeros(q1 - q0, dtype=torch.long, device=dev)
            for k0, k1 in _tiles(len(keys), kblock):
                tile = _sim_tile(q, keys_d[k0:k1], qsq, None if ksq is None else ksq[k0:k1], metric, buf)
                c += (tile >= t).sum(1)
            counts[q0:q1] = c.cpu()
    return counts


# ---------------------------------------------------------------------------------------------
# search engines (``--engine``): a registry


@dataclass(frozen=True)
class Engine:
    """A search engine: ``search(queries, keys, k, *, key_k, metric, block, device, exclude, matrix,
    precision, info) -> (TopK [Q, k], TopK [K, key_k] or None, matrix [K, Q] or None)``, the
    contract of :func:`topk_search` (inputs prepared); ``info`` (a dict) receives what the engine
    wants in the provenance, per direction (``"queries"``, ``"keys"``).  ``exact``: the top-k is
    exact.  ``requires``: a module it imports (checked before any loading)."""

    name: str
    search: Any
    exact: bool
    help: str
    requires: str | None = None


ENGINES: dict[str, Engine] = {}
ENGINE_ALIASES = {"torch": "exact"}  # the name before the registry; artifacts record the canonical one


def register_engine(engine: Engine) -> Engine:
    """Add ``engine`` to :data:`ENGINES` (a new, well-formed name and a callable search)."""
    if not isinstance(engine, Engine) or not engine.name or not engine.name.replace("-", "").isalnum():
        raise ValueError(f"not a valid engine: {engine!r}")
    if engine.name in ENGINES or engine.name in ENGINE_ALIASES:
        raise ValueError(f"engine {engine.name!r} is already registered")
    if not callable(engine.search):
        raise ValueError(f"engine {engine.name!r}: search is not callable")
    ENGINES[engine.name] = engine
    return engine


def get_engine(name: str) -> Engine:
    """The engine called ``name`` (or an alias); a clear error when unknown or not installed."""
    eng = ENGINES.get(ENGINE_ALIASES.get(name, name))
    if eng is None:
        raise GanprintError(f"--engine {name}: unknown; use one of {', '.join(ENGINES)}")
    if eng.requires:
        import importlib

        try:
            importlib.import_module(eng.requires)
        except ImportError:
            raise GanprintError(f"--engine {eng.name}: {eng.requires} is not installed; pip install faiss-cpu "
                                "(or use --engine exact)") from None
    return eng


def _exact_search(queries, keys, k, *, key_k=0, metric="cosine", block=DEFAULT_BLOCK, device="cpu", exclude=None,
                  matrix=False, precision="auto", info=None):
    return topk_search(queries, keys, k, metric=metric, block=block, device=device, exclude=exclude, key_k=key_k,
                       matrix=matrix, prepared=True, precision=precision)


def _matrix(queries, keys, *, metric, block, device):
    _, _, mat = topk_search(queries, keys, 1, metric=metric, block=block, device=device, matrix=True, prepared=True)
    return mat


def _faiss_flat_search(queries, keys, k, *, key_k=0, metric="cosine", block=DEFAULT_BLOCK, device="cpu",
                       exclude=None, matrix=False, precision="auto", info=None):
    res = faiss_topk(queries, keys, k, metric=metric, exclude=exclude, prepared=True)
    kres = faiss_topk(keys, queries, key_k, metric=metric, prepared=True) if key_k > 0 else None
    mat = _matrix(queries, keys, metric=metric, block=block, device=device) if matrix else None
    return res, kres, mat


IVF_RECALL = 0.99  # the faiss-ivf engine's default target recall@k (calibrated; see ganprint/ivf.py)


def _faiss_ivf_search(queries, keys, k, *, key_k=0, metric="cosine", block=DEFAULT_BLOCK, device="cpu",
                      exclude=None, matrix=False, precision="auto", info=None, recall=None):
    """Approximate both ways (faiss IndexIVFFlat), each direction's recall@k measured against the
    exact engine on held-out sampled queries (:func:`ganprint.ivf.ivf_topk`)."""
    import torch

    from ganprint.ivf import ivf_topk

    target = IVF_RECALL if recall is None else recall
    dev_cpu = getattr(device, "type", str(device)) == "cpu"

    def one_way(qs, ks, kk, ex, name):
        if kk > ks.shape[0] - (0 if ex is None else 1):
            kk = ks.shape[0] - (0 if ex is None else 1)
        exx = None if ex is None else torch.as_tensor(ex, dtype=torch.long)

        def exact(rows):
            r, _, _ = topk_search(qs[rows], ks, kk, metric=metric, block=block, device=device, prepared=True,
                                  exclude=None if exx is None else exx[rows], precision=precision)
            return r.values, r.indices

        def lists(x, y, n, ex=None):  # exact top-n (raw products / L2): list ranking and list scans
            r, _, _ = topk_search(x, y, n, metric=metric, block=block, prepared=True, precision="fp32", exclude=ex)
            return r.values, r.indices

        v, i, meta = ivf_topk(qs, ks, kk, metric=metric, exclude=exx, exact=exact, recall=target,
                              threads=torch.get_num_threads(), search=lists if dev_cpu else None)
        if info is not None:
            info[name] = meta
        return TopK(v, i)

    res = one_way(queries, keys, k, exclude, "queries")
    kres = one_way(keys, queries, key_k, None, "keys") if key_k > 0 else None
    mat = _matrix(queries, keys, metric=metric, block=block, device=device) if matrix else None
    return res, kres, mat


register_engine(Engine("exact", _exact_search, True, "exact, blocked torch tiles (--precision applies) [default]"))
register_engine(Engine("faiss", _faiss_flat_search, True, "exact, faiss' flat index (IndexFlatIP / L2)", "faiss"))
register_engine(Engine("faiss-ivf", _faiss_ivf_search, False,
                       "approximate, faiss IndexIVFFlat; nprobe calibrated to recall@k >= 0.99, the recall on "
                       "held-out queries stored in the provenance", "faiss"))


# ---------------------------------------------------------------------------------------------
# in-memory similarity tensors


def compute_similarity(
    gen,
    real,
    *,
    ref=None,
    ref_exclude=None,
    metric: str = "cosine",
    k: int = DEFAULT_K,
    full: bool | None = None,
    block: int = DEFAULT_BLOCK,
    device: Any = "cpu",
    engine: str = "exact",
    realref: bool = True,
    precision: str = "auto",
    realref_precision: str | None = None,
    info: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """All tensors of a similarity artifact (see docs/ARTIFACTS.md) from embeddings.

    gen [G, D], real [R, D]; ``ref`` [M, D] known non-members for the real x reference top-k
    (None: real x real, self excluded); ``ref_exclude`` int64 [R]: the reference row that *is*
    real image r (same file), or -1.  ``full`` None = store the matrix [G, R] when G*R <= 4M.
    Returns ``real_topk_values/indices`` [R, k] (into G), ``gen_topk_values/indices`` [G, k'] (into
    R), ``matrix`` [G, R] if full, ``realref_topk_values/indices`` [R, k''] if ``realref``.
    ``precision`` (exact engine): see :func:`resolve_precision`; every choice gives the exact top-k;
    ``realref_precision`` the same for the real x reference search [default: ``precision``].
    ``engine``: a name in :data:`ENGINES`; ``info`` (optional dict) receives the engine's notes
    per tensor (``real_topk``, ``gen_topk``, ``realref_topk``: e.g. faiss-ivf's measured recall).
    """
    import torch

    _check_metric(metric)
    eng = get_engine(engine)
    if k < 1:
        raise GanprintError(f"--k {k}: must be at least 1")
    g, r = _prepare(gen, metric), _prepare(real, metric)
    if len(g) == 0 or len(r) == 0:
        raise GanprintError(f"need at least one generated and one real embedding, got {len(g)} and {len(r)}")
    if g.shape[1] != r.shape[1]:
        raise GanprintError(f"embedding sizes differ: generated {g.shape[1]} vs real {r.shape[1]}")
    if full is None:
        full = len(g) * len(r) <= FULL_AUTO_MAX
    out: dict[str, Any] = {}
    notes: dict[str, Any] = {}
    rt, gt, mat = eng.search(r, g, k, key_k=k, metric=metric, block=block, device=device, matrix=full,
                             precision=precision, info=notes)
    out["real_topk_values"], out["real_topk_indices"] = rt.values, rt.indices
    out["gen_topk_values"], out["gen_topk_indices"] = gt.values, gt.indices
    if mat is not None:
        out["matrix"] = mat.contiguous()
    if realref:
        if ref is None:
            keys, excl = r, torch.arange(len(r))
        else:
            keys = _prepare(ref, metric)
            excl = None if ref_exclude is None else torch.as_tensor(ref_exclude, dtype=torch.long)
            if keys.shape[1] != r.shape[1]:
                raise GanprintError(f"embedding sizes differ: reference {keys.shape[1]} vs real {r.shape[1]}")
        needed = 2 if (excl is not None and bool((excl >= 0).any())) else 1
        if len(keys) >= needed:
            ref_notes: dict[str, Any] = {}
            rr, _, _ = eng.search(r, keys, k, metric=metric, block=block, device=device, exclude=excl,
                                  precision=precision if realref_precision is None else realref_precision,
                                  info=ref_notes)
            out["realref_topk_values"], out["realref_topk_indices"] = rr.values, rr.indices
            if "queries" in ref_notes:
                notes["realref"] = ref_notes["queries"]
    if info is not None:
        for src, dst in (("queries", "real_topk"), ("keys", "gen_topk"), ("realref", "realref_topk")):
            if src in notes:
                info[dst] = notes[src]
    return out


# ---------------------------------------------------------------------------------------------
# artifacts in, artifact out


def _rows_for(art: Artifact, role: str):
    """Manifest rows used as ``role`` (generated / real / reference); see run_simmatrix."""
    import numpy as np

    t = art.table
    n = len(t)
    subset = t["subset"].astype("string").fillna("") if "subset" in t.columns else None
    if subset is None:
        return np.arange(n)
    is_gen = (subset == "generated").to_numpy(dtype=bool)
    is_real = subset.str.startswith("real_").to_numpy(dtype=bool)
    if role == "generated":
        rows = np.flatnonzero(is_gen) if is_gen.any() else np.flatnonzero(~is_real)
    elif role == "real":
        rows = np.flatnonzero(is_real) if is_real.any() else np.flatnonzero(~is_gen)
    else:  # reference: known non-members if labelled, else every non-generated row
        lab = t["label"] if "label" in t.columns else None
        zero = np.zeros(n, dtype=bool) if lab is None else (lab.astype("Int8") == 0).fillna(False).to_numpy(dtype=bool)
        rows = np.flatnonzero(zero) if zero.any() else np.flatnonzero(~is_gen)
    return rows


def _source_info(art: Artifact, rows, role: str) -> dict[str, Any]:
    p = art.provenance
    ckpt = p.get("checkpoint")
    return {
        "path": str(Path(art.base).resolve()),
        "pair_id": p.get("pair_id"),
        "inputs_hash": p.get("inputs_hash"),
        "backbone": p.get("backbone"),
        "weights_digest": p.get("weights_digest"),
        "preprocess": p.get("preprocess"),
        "checkpoint": ckpt,
        "dim": p.get("dim"),
        "rows": int(len(rows)),
        "role": role,
    }


def _load_embeddings(path, role: str) -> Artifact:
    art = read_artifact(path, kind="embeddings")
    if art.table is None or len(art.table) != art.tensor("embeddings").shape[0]:
        raise ArtifactError(f"{art.base}{TENSOR_SUFFIX}: manifest and embeddings disagree; re-run `ganprint embed`")
    return art


@dataclass
class SimmatrixOutcome:
    base: Path
    n_generated: int
    n_real: int
    n_reference: int | None
    k: int
    full: bool
    seconds: float
    provenance: dict[str, Any]


def _check_writable(out) -> None:
    try:
        from ganprint.artifacts import ensure_writable  # newer artifacts.py
    except ImportError:
        tpath, _ = artifact_paths(out)
        folder = tpath.parent
        if not folder.is_dir():
            raise GanprintError(f"{folder}: output folder does not exist; create it or choose another --out") from None
        if not os.access(folder, os.W_OK):
            raise GanprintError(f"{folder}: output folder is not writable; choose another --out") from None
        return
    ensure_writable(out)


def run_simmatrix(
    out: str | os.PathLike,
    dataset: str | os.PathLike | None = None,
    generated: str | os.PathLike | None = None,
    real: str | os.PathLike | None = None,
    reference: str | os.PathLike | None = None,
    *,
    metric: str = "cosine",
    k: int = DEFAULT_K,
    full: bool | None = None,
    block: int = DEFAULT_BLOCK,
    device: str = "auto",
    engine: str = "exact",
    realref: bool = True,
    precision: str = "auto",
    verify: list | None = None,
    verify_k: int = 50,
    group: Any = None,
) -> SimmatrixOutcome | None:
    """Read embeddings artifacts, compute similarity, write the similarity artifact ``out``.

    Either ``dataset`` (its ``generated`` subset is G, every ``real_*`` subset is R) or
    ``generated`` + ``real`` (G: the ``generated`` subset if present, else all non-real rows;
    R: the ``real_*`` subsets if present, else all non-generated rows).  ``reference``: an
    embeddings artifact of known non-members (its label-0 rows if labelled) for the real x
    reference top-k; without it that top-k is real x real with self excluded.
    ``group``: a :class:`ganprint.distributed.Group` under torchrun (call as ``group.run(run_simmatrix,
    ..., group=group)``): G is split across the ranks, rank 0 merges the top-k exactly, writes the
    artifact and returns the outcome; the others return None.
    """
    import numpy as np
    import pandas as pd
    import torch

    from ganprint.device import resolve_device

    t0 = time.perf_counter()
    _check_metric(metric)
    eng = get_engine(engine)
    g = group if group is not None and group.enabled else None
    if g is not None and not eng.exact:
        raise GanprintError(f"--engine {eng.name} runs in one process (its recall is measured per search); "
                            "run it without torchrun, or use --engine exact")
    if k < 1:
        raise GanprintError(f"--k {k}: must be at least 1")
    if block < 1:
        raise GanprintError(f"--block {block}: must be at least 1")
    if dataset is not None and (generated is not None or real is not None):
        raise GanprintError("give either a DATASET artifact or --generated and --real, not both")
    if dataset is None and (generated is None or real is None):
        raise GanprintError("give a DATASET embeddings artifact, or both --generated G and --real R")
    if g is None or g.is_main:  # under torchrun only rank 0 writes
        _check_writable(out)
    dev = resolve_device(device) if g is None else g.device
    resolve_precision(precision, metric, dev)  # a bad --precision fails before any loading

    if dataset is not None:
        gart = rart = _load_embeddings(dataset, "dataset")
    else:
        gart = _load_embeddings(generated, "generated")
        rart = _load_embeddings(real, "real")
        check_comparable(gart.provenance, f"{gart.base}{TENSOR_SUFFIX}", rart.provenance, f"{rart.base}{TENSOR_SUFFIX}")
    if dataset is not None:
        subset = gart.table["subset"].astype("string").fillna("") if "subset" in gart.table.columns else None
        if subset is None or not (subset == "generated").any() or not subset.str.startswith("real_").any():
            raise GanprintError(f"{gart.base}{TENSOR_SUFFIX}: needs both a 'generated' and a 'real_*' subset; "
                                "embed an ImageCLEF layout (generated/, real_used/, ...) or pass --generated G --real R")
    g_rows = _rows_for(gart, "generated")
    r_rows = _rows_for(rart, "real")
    if len(g_rows) == 0:
        raise GanprintError(f"{gart.base}{TENSOR_SUFFIX}: no generated images in it; check --generated")
    if len(r_rows) == 0:
        raise GanprintError(f"{rart.base}{TENSOR_SUFFIX}: no real images in it; check --real")

    ref_art = None
    ref_rows = None
    ref_emb = None
    ref_exclude = None
    if reference is not None:
        ref_art = _load_embeddings(reference, "reference")
        check_comparable(gart.provenance, f"{gart.base}{TENSOR_SUFFIX}", ref_art.provenance,
                         f"{ref_art.base}{TENSOR_SUFFIX}")
        ref_rows = _rows_for(ref_art, "reference")
        if len(ref_rows) == 0:
            raise GanprintError(f"{ref_art.base}{TENSOR_SUFFIX}: no reference images in it; pass known non-members")
        ref_emb = ref_art.tensor("embeddings")[torch.as_tensor(ref_rows)]
        # a real image that is also in the reference set must not count as its own neighbour
        if "sha256" in ref_art.table.columns and "sha256" in rart.table.columns:
            pos = {h: i for i, h in enumerate(ref_art.table["sha256"].to_numpy()[ref_rows])}
            ref_exclude = torch.as_tensor([pos.get(h, -1) for h in rart.table["sha256"].to_numpy()[r_rows]],
                                          dtype=torch.long)

    vin = None
    if verify:  # local features lined up with these rows (refusals before any search)
        from ganprint.verify import prepare_verification

        vin = prepare_verification(verify, gen_table=gart.table, gen_rows=g_rows, real_table=rart.table,
                                   real_rows=r_rows, ref_table=None if ref_art is None else ref_art.table,
                                   ref_rows=ref_rows, gen_src=f"{gart.base}{TENSOR_SUFFIX}",
                                   real_src=f"{rart.base}{TENSOR_SUFFIX}",
                                   ref_src=None if ref_art is None else f"{ref_art.base}{TENSOR_SUFFIX}",
                                   k=verify_k)
    gen_emb = gart.tensor("embeddings")[torch.as_tensor(g_rows)]
    real_emb = rart.tensor("embeddings")[torch.as_tensor(r_rows)]
    notes: dict[str, Any] = {}
    if g is None:
        tensors = compute_similarity(gen_emb, real_emb, ref=ref_emb, ref_exclude=ref_exclude, metric=metric, k=k,
                                     full=full, block=block, device=dev, engine=engine, realref=realref,
                                     precision=precision, info=notes)
    else:
        from ganprint.distributed import sharded_similarity

        # decided for the whole search, as one process would: the shards must not choose alone
        full = len(g_rows) * len(r_rows) <= FULL_AUTO_MAX if full is None else full
        main_prec = resolve_precision(precision, metric, dev, matrix=full, size=len(g_rows) * len(r_rows))
        tensors = sharded_similarity(g, compute_similarity, gen_emb, real_emb, k=k, full=full, realref=realref,
                                     ref=ref_emb, ref_exclude=ref_exclude, metric=metric, block=block, device=dev,
                                     engine=engine, precision=main_prec, realref_precision=precision)
        if tensors is None:  # not rank 0: rank 0 writes
            return None
    vprov = None
    if vin is not None:  # on rank 0 only under torchrun: the others have returned
        from ganprint.verify import verify_for_similarity

        vt, vprov = verify_for_similarity(vin, gen_emb=gen_emb, real_emb=real_emb, ref_emb=ref_emb,
                                          ref_exclude=ref_exclude, metric=metric, k=verify_k, block=block, device=dev,
                                          search=topk_search)
        tensors.update(vt)
    tensors["gen_rows"] = torch.as_tensor(g_rows, dtype=torch.long)
    tensors["real_rows"] = torch.as_tensor(r_rows, dtype=torch.long)
    if ref_rows is not None:
        tensors["ref_rows"] = torch.as_tensor(ref_rows, dtype=torch.long)
        if ref_exclude is not None:
            tensors["realref_exclude"] = ref_exclude

    rt = rart.table.iloc[r_rows]
    vals = tensors["real_topk_values"]
    table = pd.DataFrame({
        "image_id": rt["image_id"].astype(str).to_numpy(),
        "subset": rt["subset"].to_numpy() if "subset" in rt.columns else None,
        "label": (rt["label"].astype("Int8").to_numpy() if "label" in rt.columns
                  else pd.array([pd.NA] * len(rt), dtype="Int8")),
        "emb_row": np.asarray(r_rows, dtype=np.int64),
        "max_sim": vals[:, 0].numpy().astype(np.float64),
        "mean_topk": vals.mean(1).numpy().astype(np.float64),
    })
    table["label"] = table["label"].astype("Int8")
    kk = int(vals.shape[1])
    prov = base_provenance(
        "similarity", "simmatrix",
        metric=metric,
        k=kk,
        k_requested=k,
        full="matrix" in tensors,
        engine=eng.name,
        engine_exact=eng.exact,
        engine_info=notes or None,
        precision=None if eng.name != "exact" else resolve_precision(
            precision, metric, dev, matrix="matrix" in tensors, size=len(g_rows) * len(r_rows)),
        precision_reason=None if eng.name != "exact" or precision != "auto" or metric != "cosine"
        or "matrix" in tensors or dev.type != "cpu" else auto_precision_reason(len(g_rows) * len(r_rows))[1],
        block=block,
        device=dev.type,
        realref=("realref_topk_values" in tensors),
        generated=_source_info(gart, g_rows, "generated"),
        real=_source_info(rart, r_rows, "real"),
        reference=None if ref_art is None else _source_info(ref_art, ref_rows, "reference"),
        rows=len(table),
        verify=vprov,
    )
    # comparable_key of the sources, flattened, so later stages can compare similarity artifacts
    prov.update({key: val for key, val in comparable_key(gart.provenance).items() if key != "checkpoint"})
    prov["checkpoint"] = gart.provenance.get("checkpoint")
    base = write_artifact(out, tensors, table, prov)
    return SimmatrixOutcome(base, len(g_rows), len(r_rows), None if ref_rows is None else len(ref_rows), kk,
                            "matrix" in tensors, time.perf_counter() - t0, prov)
