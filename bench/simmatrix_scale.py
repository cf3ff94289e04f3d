"""Exact top-k similarity search at scale, as ratios against baselines measured in the same run.

    python bench/simmatrix_scale.py [--n 100000] [--m N] [--dim 256] [--k 10] [--block 2048]
    python bench/simmatrix_scale.py --n-gen 1000000 --n-real 20000 [--ivf] [--noisy-neighbour]
    python bench/simmatrix_scale.py --embeddings EMB --n 10000 --m 20000 [--jitter 0.3]

Queries [n, D] and keys [m, D] are seeded random unit vectors, or (``--embeddings EMB``, an
artifact of ``ganprint embed``) rows of real embeddings drawn with replacement, each moved by
Gaussian noise of ``--jitter`` x the per-dimension spread so that no two are equal, then
normalised: a crowded, realistic distribution at any scale.  The measurements over the
same query slices, interleaved slice by slice (so a machine shared with other jobs slows them
all alike), each over all keys:

  matmul       the bare float32 products of the float32 path's own tiles, scheduled as it does
               (``similarity.cpu_tile``: [block/2, 16 block] tiles as sub-tiles of
               ``tiles.SUB`` keys, one single-threaded worker per thread), no selection,
  matmul_wide  (``--wide-baseline``) the older float32 baseline: one [block, 16 block] product
               at a time on all threads,
  matmul_bf16  bare bf16 products of the bf16 path's tiles ([block, 32 block]); skipped with
               ``--no-bf16`` unless ganprint runs that path,
  ganprint     ``ganprint.similarity.topk_search`` with ``--precision`` (auto: the fixed CPU
               rule of ``prefilter.bf16_rule``; the choice and its reason are printed),
  faiss        ``faiss.IndexFlatIP.search`` (exact), when faiss is installed.

Ratios printed: ganprint over the bare products of the tiles it runs (``own_tiles``: matmul
for fp32, matmul_bf16 for bf16; target <= 1.15), over each of matmul and matmul_bf16, and
faiss over ganprint (target >= 2.5).  The bf16 path's keys are prepared once
(``prefilter.prepare_keys``, counted in ganprint's time) and reused by every slice.
``--ivf`` adds the approximate engine (``simmatrix --engine faiss-ivf`` at its default), timed
as one whole call (lists, calibration, search), its recall@k on every query row against the
exact top-k and its speed-up over one exact call on the same vectors; on uniform vectors (no
``--clusters`` / ``--embeddings``) it runs on vectors around ``--ivf-clusters`` centres of the
same sizes instead, since uniform vectors have no lists to exploit.
``--noisy-neighbour`` runs the interleaved slices a second time while another process keeps
one core busy, and prints each phase's CPU-time growth (noisy / quiet; target <= 1.3).

Also printed: the bf16 path's counts when it runs, peak RSS during each phase (sampled from
/proc) against the tile size and the n*m matrix it avoids, and whether ganprint's top-k equals
faiss' (indices on sampled rows; values to 1e-5).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time


def rss_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRSS:
    """Peak resident set size while the block runs, sampled every 5 ms in a thread."""

    def __init__(self) -> None:
        self.peak = 0
        self._stop = threading.Event()

    def __enter__(self) -> "PeakRSS":
        self.start = self.peak = rss_bytes()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, rss_bytes())

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())


def unit_vectors(n: int, dim: int, seed: int):
    import torch

    g = torch.Generator().manual_seed(seed)
    x = torch.empty(n, dim)
    for s in range(0, n, 65536):  # in slices: no [n, dim] float64 temporary
        e = min(n, s + 65536)
        x[s:e] = torch.nn.functional.normalize(torch.randn(e - s, dim, generator=g), dim=1)
    return x


def clustered(n: int, dim: int, centres, spread: float, seed: int):
    """Unit vectors [n, dim] around ``centres`` [c, dim] (each a centre + Gaussian noise of ``spread``
    per coordinate, normalised): the structure real embeddings have, and an inverted file exploits."""
    import torch

    g = torch.Generator().manual_seed(seed)
    x = torch.empty(n, dim)
    for s in range(0, n, 65536):
        e = min(n, s + 65536)
        c = centres[torch.randint(0, len(centres), (e - s,), generator=g)]
        x[s:e] = torch.nn.functional.normalize(c + spread * torch.randn(e - s, dim, generator=g), dim=1)
    return x


def resampled(path: str, n: int, m: int, jitter: float, seed: int):
    """Queries [n, D] and keys [m, D] drawn from the rows of an embeddings artifact (see above)."""
    import torch

    from ganprint.artifacts import read_artifact

    x = read_artifact(path, kind="embeddings").tensor("embeddings").float()
    g = torch.Generator().manual_seed(seed)
    spread = x.std(0)

    def draw(count):
        rows = x[torch.randint(0, len(x), (count,), generator=g)]
        return torch.nn.functional.normalize(rows + jitter * spread * torch.randn(count, x.shape[1], generator=g), dim=1)

    return draw(n), draw(m)


def ratio(a, b, digits: int = 3):
    """a / b rounded, or None when a phase was skipped."""
    return None if a is None or b is None else round(a / b, digits)


def fmt(x) -> str:
    return "-" if x is None else f"{x:.3f}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=100_000, help="queries (real images)")
    ap.add_argument("--m", type=int, default=None, help="keys (generated images) [default: n]")
    ap.add_argument("--n-real", type=int, default=None, help="the same as --n (the queries are the real images)")
    ap.add_argument("--n-gen", type=int, default=None, help="the same as --m (the keys are the generated images)")
    ap.add_argument("--ivf", action="store_true", help="add the faiss-ivf engine row (recall@k, speed-up)")
    ap.add_argument("--ivf-clusters", type=int, default=1000, help="with --ivf on uniform vectors: measure faiss-ivf "
                    "on vectors around this many centres instead (same sizes), against exact on them")
    ap.add_argument("--noisy-neighbour", action="store_true", help="repeat the slices with one core kept busy")
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--block", type=int, default=None, help="query rows per tile [default: ganprint's]")
    ap.add_argument("--slices", type=int, default=10, help="interleaved query slices")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu", help="torch device for matmul and ganprint (faiss stays on CPU)")
    ap.add_argument("--precision", default="auto", help="ganprint's tile precision: auto, fp32 or bf16")
    ap.add_argument("--no-faiss", action="store_true", help="skip the faiss baseline")
    ap.add_argument("--no-matmul", action="store_true", help="skip the float32 matmul baseline (its ratios print as -)")
    ap.add_argument("--no-bf16", action="store_true", help="skip the bf16 matmul baseline when ganprint runs fp32")
    ap.add_argument("--wide-baseline", action="store_true", help="add the older float32 baseline: one [block, 16 block] "
                    "product at a time on all threads")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--embeddings", default=None, help="draw the vectors from this embeddings artifact")
    ap.add_argument("--jitter", type=float, default=0.3, help="with --embeddings: noise, x the per-dimension std")
    ap.add_argument("--clusters", type=int, default=0, help="draw both sets around this many random centres "
                                                              "(0: uniform unit vectors)")
    ap.add_argument("--spread", type=float, default=0.04, help="with --clusters: noise per coordinate")
    ap.add_argument("--json", action="store_true", help="print a JSON summary")
    args = ap.parse_args()

    import numpy as np
    import torch

    from ganprint.similarity import (
        BF16_KEY_BLOCK_FACTOR,
        DEFAULT_BLOCK,
        KEY_BLOCK_FACTOR,
        _sim_tile,
        _tiles,
        auto_precision_reason,
        cpu_tile,
        resolve_precision,
        topk_search,
    )

    from ganprint.tiles import SUB, parallel_blocks

    torch.set_num_threads(args.threads)
    block = args.block or DEFAULT_BLOCK
    n = args.n_real or args.n
    m = args.n_gen or args.m or n
    dim, k = args.dim, args.k
    dev = torch.device(args.device)
    faiss = None
    if not args.no_faiss:
        try:
            import faiss  # type: ignore[no-redef]

            faiss.omp_set_num_threads(args.threads)
        except ImportError:
            print("faiss not installed: skipping the faiss baseline (pip install faiss-cpu)", file=sys.stderr)

    load0 = os.getloadavg()
    if args.embeddings:
        queries, keys = resampled(args.embeddings, n, m, args.jitter, args.seed)
        dim = queries.shape[1]
    elif args.clusters:
        centres = unit_vectors(args.clusters, dim, args.seed + 2)
        queries = clustered(n, dim, centres, args.spread, args.seed)
        keys = clustered(m, dim, centres, args.spread, args.seed + 1)
    else:
        queries = unit_vectors(n, dim, args.seed)
        keys = unit_vectors(m, dim, args.seed + 1)
    base_rss = rss_bytes()
    index = None
    if faiss is not None:
        index = faiss.IndexFlatIP(dim)
        index.add(keys.numpy())

    keys_d = keys.to(dev)
    qblock, kblock = block, block * KEY_BLOCK_FACTOR
    precision = resolve_precision(args.precision, "cosine", dev, size=n * m)
    auto_bf16, auto_why = auto_precision_reason(n * m)
    fp32_tile = list(cpu_tile(block)) if dev.type == "cpu" else [qblock, kblock]
    tile_bytes = (min(fp32_tile[0], n) * min(fp32_tile[1], m) * 4 * (args.threads if dev.type == "cpu" else 1)
                  if precision == "fp32" else min(qblock, n) * min(block * BF16_KEY_BLOCK_FACTOR, m) * 2)
    stats: dict = {}
    keys16 = keys_d.bfloat16() if dev.type == "cpu" and (precision == "bf16" or not args.no_bf16) else None
    key_prep, prep_cpu, prep_s = None, 0.0, 0.0
    if precision == "bf16":  # once per search, as one library call does (counted in ganprint's time below)
        from ganprint.prefilter import prepare_keys

        c, t = time.process_time(), time.perf_counter()
        key_prep = prepare_keys(keys_d)
        prep_cpu, prep_s = time.process_time() - c, time.perf_counter() - t

    def bare16(q):
        # the bf16 path's products alone (its rounding of the inputs included, as in topk_search)
        kb16 = block * BF16_KEY_BLOCK_FACTOR
        buf = torch.empty(min(qblock, len(q)) * min(kb16, m), dtype=torch.bfloat16)
        with torch.inference_mode():
            q16 = q.bfloat16()
            for q0, q1 in _tiles(len(q), qblock):
                for k0, k1 in _tiles(m, kb16):
                    out = buf[: (q1 - q0) * (k1 - k0)].view(q1 - q0, k1 - k0)
                    torch.mm(q16[q0:q1], keys16[k0:k1].t(), out=out)

    def bare_workers(q):
        # the fp32 CPU path's own scheme minus the selection: its tiles, its single-threaded workers
        qr, kc = cpu_tile(block)
        qblocks = list(_tiles(len(q), qr))
        nsplit = 1 if len(qblocks) >= args.threads else min(args.threads, max(1, m // kc))
        kranges = [(m * j // nsplit, m * (j + 1) // nsplit) for j in range(nsplit)]
        bufs = {}

        def work(task):
            (q0, q1), (a, b) = task
            buf = bufs.setdefault(threading.get_ident(), torch.empty(min(qr, len(q)) * min(kc, m)))
            for t0 in range(a, b, kc):  # a tile, as its sub-tiles of SUB keys (each a contiguous product)
                t1 = min(b, t0 + kc)
                for k0 in range(t0, t1, SUB):
                    k1 = min(t1, k0 + SUB)
                    w = k1 - k0
                    off = (k0 - t0) * (q1 - q0)
                    torch.mm(q[q0:q1], keys_d[k0:k1].t(), out=buf[off:off + (q1 - q0) * w].view(q1 - q0, w))

        parallel_blocks([(qb, kr) for qb in qblocks for kr in kranges], work, args.threads)

    def bare(q):
        # the same tiles and buffer reuse as topk_search, minus the selection
        buf = torch.empty(min(qblock, len(q)) * min(kblock, m), device=dev)
        with torch.inference_mode():
            for q0, q1 in _tiles(len(q), qblock):
                qd = q[q0:q1].to(dev)
                for k0, k1 in _tiles(m, kblock):
                    _sim_tile(qd, keys_d[k0:k1], None, None, "cosine", buf)
        if dev.type == "cuda":
            torch.cuda.synchronize()

    def ours(q):
        res, _, _ = topk_search(q, keys_d, k, block=block, device=dev, prepared=True, precision=args.precision,
                                stats=stats, key_prep=key_prep)
        return res

    def with_faiss(q):
        return index.search(q.numpy(), k)

    # warm-up (thread pools, allocator) on a small slice
    w = queries[: min(256, n)]
    if not args.no_matmul:
        (bare_workers if dev.type == "cpu" else bare)(w)
    if args.wide_baseline:
        bare(w)
    if keys16 is not None:
        bare16(w)
    ours(w)
    stats.clear()
    if index is not None:
        with_faiss(w)

    phases = ([] if args.no_matmul else ["matmul"]) + (["matmul_wide"] if args.wide_baseline else []) + \
        (["matmul_bf16"] if keys16 is not None else []) + ["ganprint"] + (["faiss"] if index is not None else [])
    own = "matmul_bf16" if precision == "bf16" else "matmul"  # the bare products of the tiles ganprint runs
    print(f"--precision {args.precision} -> {precision} ({'bf16' if auto_bf16 else 'fp32'} by the auto rule on this CPU: "
          f"{auto_why})", file=sys.stderr, flush=True)
    seconds = {p: 0.0 for p in phases}
    cpu = {p: 0.0 for p in phases}  # process CPU time: less sensitive than wall time to other jobs
    seconds["ganprint"] += prep_s
    cpu["ganprint"] += prep_cpu
    peak = {p: 0 for p in phases}
    growth = {p: 0 for p in phases}  # largest RSS rise within one call: the phase's own working memory
    got_v = torch.empty(n, k)
    got_i = torch.empty(n, k, dtype=torch.long)
    check_rows = []
    rng = np.random.default_rng(args.seed)
    mismatched = 0
    wrong = 0
    max_abs = 0.0
    bounds = list(_tiles(n, -(-n // args.slices)))
    for si, (s0, s1) in enumerate(bounds):
        q = queries[s0:s1]
        order = phases if si % 2 == 0 else phases[::-1]  # alternate order against drift
        for p in order:
            with PeakRSS() as pr:
                c = time.process_time()
                t = time.perf_counter()
                if p == "matmul":
                    (bare_workers if dev.type == "cpu" else bare)(q)
                elif p == "matmul_wide":
                    bare(q)
                elif p == "matmul_bf16":
                    bare16(q)
                elif p == "ganprint":
                    r = ours(q)
                    got_v[s0:s1], got_i[s0:s1] = r.values, r.indices
                else:
                    fd, fi = with_faiss(q)
                seconds[p] += time.perf_counter() - t
                cpu[p] += time.process_time() - c
            peak[p] = max(peak[p], pr.peak)
            growth[p] = max(growth[p], pr.peak - pr.start)
        if index is not None:
            rows = rng.choice(s1 - s0, size=min(100, s1 - s0), replace=False)
            check_rows.extend((rows + s0).tolist())
            gi, gv = got_i[s0:s1][rows].numpy(), got_v[s0:s1][rows].numpy()
            diff_i = (gi != fi[rows]).any(1)
            # faiss and torch round differently: two keys 1e-7 apart may swap; values must agree
            diff_v = np.abs(gv - fd[rows]).max(1) > 1e-5
            mismatched += int(diff_i.sum())
            wrong += int(diff_v.sum())
            max_abs = max(max_abs, float(np.abs(gv - fd[rows]).max()))
        print(f"slice {si + 1}/{len(bounds)}: " + "  ".join(f"{p} {seconds[p]:.1f}s" for p in phases),
              file=sys.stderr, flush=True)
    quiet_cpu = {p: v - (prep_cpu if p == "ganprint" else 0.0) for p, v in cpu.items()}  # the slices alone

    noisy = None
    if args.noisy_neighbour:  # the same slices while another process keeps one core busy
        import subprocess

        hog = subprocess.Popen([sys.executable, "-c", "while True: pass"])
        try:
            noisy_cpu = {p: 0.0 for p in phases}
            noisy_s = {p: 0.0 for p in phases}
            for si, (s0, s1) in enumerate(bounds):
                q = queries[s0:s1]
                for p in (phases if si % 2 == 0 else phases[::-1]):
                    c, t = time.process_time(), time.perf_counter()
                    {"matmul": bare_workers if dev.type == "cpu" else bare, "matmul_wide": bare, "matmul_bf16": bare16, "ganprint": ours, "faiss": with_faiss}[p](q)
                    noisy_s[p] += time.perf_counter() - t
                    noisy_cpu[p] += time.process_time() - c
                print(f"noisy slice {si + 1}/{len(bounds)}", file=sys.stderr, flush=True)
        finally:
            hog.kill()
            hog.wait()
        noisy = {"cpu_seconds": {p: round(v, 2) for p, v in noisy_cpu.items()},
                 "seconds": {p: round(v, 2) for p, v in noisy_s.items()},
                 "cpu_growth": {p: round(noisy_cpu[p] / quiet_cpu[p], 3) for p in phases}}

    ivf = None
    if args.ivf:  # the approximate engine at its default, one whole call (index, calibration, search)
        from ganprint.similarity import ENGINES

        iq, ik, ex_s, ex_cpu, ex_i = queries, keys_d, seconds["ganprint"], cpu["ganprint"], got_i
        ivf_data = "the same vectors"
        if not (args.clusters or args.embeddings):
            # uniform random vectors have no lists to exploit (IVF falls back to exact there): measure the
            # engine where it is meant to work, on clustered vectors of the same sizes, against exact on them
            centres = unit_vectors(args.ivf_clusters, dim, args.seed + 5)
            iq = clustered(n, dim, centres, args.spread, args.seed + 6)
            ik = clustered(m, dim, centres, args.spread, args.seed + 7)
            ivf_data = f"unit vectors around {args.ivf_clusters} centres (spread {args.spread}), same sizes"
            c, t = time.process_time(), time.perf_counter()
            ex_r, _, _ = topk_search(iq, ik, k, block=block, device=dev, prepared=True, precision=args.precision)
            ex_s, ex_cpu = time.perf_counter() - t, time.process_time() - c
            ex_i = ex_r.indices
            print(f"exact on the ivf data in {ex_s:.1f}s", file=sys.stderr, flush=True)
        info: dict = {}
        c, t = time.process_time(), time.perf_counter()
        r_ivf, _, _ = ENGINES["faiss-ivf"].search(iq, ik, k, block=block, device=dev, precision=args.precision,
                                                  info=info)
        ivf_s, ivf_cpu = time.perf_counter() - t, time.process_time() - c
        ai, ei = r_ivf.indices.numpy(), ex_i.numpy()
        recall = float((ai[:, :, None] == ei[:, None, :]).any(-1).sum() / ei.size)  # all rows, vs the exact top-k
        ivf = {"data": ivf_data, "seconds": round(ivf_s, 2), "cpu_seconds": round(ivf_cpu, 2),
               "exact_seconds": round(ex_s, 2), "exact_cpu_seconds": round(ex_cpu, 2),
               "recall_at_k_all_rows": round(recall, 5),
               "speedup_over_ganprint_exact": round(ex_s / ivf_s, 3),
               "cpu_speedup_over_ganprint_exact": round(ex_cpu / ivf_cpu, 3),
               **{key: info["queries"].get(key) for key in ("nlist", "nprobe", "recall_at_k", "recall_sample",
                                                           "fallback")}}
        print(f"ivf done in {ivf_s:.1f}s", file=sys.stderr, flush=True)
    load1 = os.getloadavg()

    res = {
        "n": n, "m": m, "dim": dim, "k": k, "embeddings": args.embeddings,
        "clusters": args.clusters or None, "spread": args.spread if args.clusters else None,
        "jitter": args.jitter if args.embeddings else None, "block": block, "tile_fp32": [min(fp32_tile[0], n), min(fp32_tile[1], m)],
        "tile_fp32_workers": args.threads if dev.type == "cpu" else 1,
        "tile_bf16": None if keys16 is None else [min(qblock, n), min(block * BF16_KEY_BLOCK_FACTOR, m)],
        "threads": args.threads, "device": str(dev), "torch": torch.__version__, "precision": precision,
        "precision_requested": args.precision, "auto_rule": {"bf16": auto_bf16, "why": auto_why},
        "own_tiles": own,
        "ratio_ganprint_over_own_tiles": ratio(seconds["ganprint"], seconds.get(own)),
        "cpu_ratio_ganprint_over_own_tiles": ratio(cpu["ganprint"], cpu.get(own)),
        "ratio_ganprint_over_matmul_wide": ratio(seconds["ganprint"], seconds.get("matmul_wide")),
        "seconds": {p: round(v, 2) for p, v in seconds.items()},
        "cpu_seconds": {p: round(v, 2) for p, v in cpu.items()},
        "gflops_matmul": ratio(2.0 * n * m * dim / 1e9, seconds.get("matmul"), 1),
        "ratio_ganprint_over_matmul": ratio(seconds["ganprint"], seconds.get("matmul")),
        "cpu_ratio_ganprint_over_matmul": ratio(cpu["ganprint"], cpu.get("matmul")),
        "bf16": None if keys16 is None else {
            "ratio_ganprint_over_matmul_bf16": round(seconds["ganprint"] / seconds["matmul_bf16"], 3),
            "cpu_ratio_ganprint_over_matmul_bf16": round(cpu["ganprint"] / cpu["matmul_bf16"], 3),
            "ratio_matmul_over_matmul_bf16": ratio(seconds.get("matmul"), seconds["matmul_bf16"]),
            "rows_searched_again_fp32": stats.get("redone", 0),
            "rescored_per_row": round(stats.get("rescored", 0) / max(1, stats.get("rows", 1)), 1),
            "gave_up_at_row": stats.get("gave_up_at_row"),
            "max_error_bound": stats.get("delta_max"),
        },
        "inputs_mib": round(base_rss / 2**20, 1),
        "peak_rss_mib": {p: round(v / 2**20, 1) for p, v in peak.items()},
        "peak_rss_over_inputs_mib": {p: round((v - base_rss) / 2**20, 1) for p, v in peak.items()},
        "rss_growth_within_call_mib": {p: round(v / 2**20, 1) for p, v in growth.items()},
        "tile_mib": round(tile_bytes / 2**20, 1),
        "full_matrix_mib": round(n * m * 4 / 2**20, 1),
        "loadavg_before_after": [round(load0[0], 2), round(load1[0], 2)],
        "bf16_key_prep_seconds": round(prep_s, 3) if key_prep is not None else None,
        "noisy_neighbour": noisy,
        "faiss_ivf": ivf,
    }
    if index is not None:
        res["ratio_faiss_over_ganprint"] = round(seconds["faiss"] / seconds["ganprint"], 3)
        res["cpu_ratio_faiss_over_ganprint"] = round(cpu["faiss"] / cpu["ganprint"], 3)
        res["ratio_faiss_over_matmul"] = ratio(seconds["faiss"], seconds.get("matmul"))
        res["faiss_version"] = faiss.__version__
        res["checked_rows"] = len(check_rows)
        res["rows_with_index_mismatch"] = mismatched
        res["rows_with_value_mismatch"] = wrong
        res["max_abs_value_diff"] = max_abs
    if args.json:
        print(json.dumps(res, indent=2))
    else:
        t16 = f", bf16 tiles {res['tile_bf16']}" if keys16 is not None else ""
        what = (f"rows of {args.embeddings} (jitter {args.jitter})" if args.embeddings else
                f"unit vectors around {args.clusters} centres (spread {args.spread})" if args.clusters else "unit vectors")
        print(f"exact top-{k}, {n:,} x {m:,} {what}, D={dim}, fp32 tiles {res['tile_fp32']} "
              f"x {res['tile_fp32_workers']} workers{t16}, {args.threads} threads, {dev}")
        print(f"  ganprint precision     {precision} (--precision {args.precision}; the auto rule on this CPU: "
              f"{'bf16' if auto_bf16 else 'fp32'}, {auto_why})")
        for p in phases:
            print(f"  {p:11s} {seconds[p]:8.2f} s  (CPU {cpu[p]:7.2f} s)   peak RSS {res['peak_rss_mib'][p]:8.1f} MiB, "
                  f"+{res['rss_growth_within_call_mib'][p]:.1f} MiB within a call")
        print(f"  matmul (fp32) throughput {res['gflops_matmul']} GFLOP/s")
        print(f"  ganprint / bare products of the tiles it runs ({own}): {fmt(res['ratio_ganprint_over_own_tiles'])} "
              f"(target <= 1.15; CPU time {fmt(res['cpu_ratio_ganprint_over_own_tiles'])})")
        print(f"  ganprint / matmul      {fmt(res['ratio_ganprint_over_matmul'])}  (bare fp32 products, ganprint's fp32 "
              f"tiles and workers; CPU time {fmt(res['cpu_ratio_ganprint_over_matmul'])})")
        if args.wide_baseline:
            print(f"  ganprint / matmul_wide {fmt(res['ratio_ganprint_over_matmul_wide'])}  (bare fp32 products, "
                  f"[{block}, {kblock}] tiles on all threads)")
        b = res["bf16"]
        if b is not None:
            print(f"  ganprint / matmul_bf16 {b['ratio_ganprint_over_matmul_bf16']:.3f}  (bare bf16 products of the bf16 "
                  f"path's tiles; CPU time {b['cpu_ratio_ganprint_over_matmul_bf16']:.3f}; matmul / matmul_bf16 "
                  f"{fmt(b['ratio_matmul_over_matmul_bf16'])})")
        if b is not None and precision == "bf16":
            print(f"  bf16 path              {b['rows_searched_again_fp32']} rows searched again in float32; "
                  f"{b['rescored_per_row']} keys re-scored per row; "
                  f"error bound <= {b['max_error_bound']:.4f}")
        if index is not None:
            print(f"  faiss / ganprint       {res['ratio_faiss_over_ganprint']:.3f}  (target >= 2.5; CPU time "
                  f"{res['cpu_ratio_faiss_over_ganprint']:.3f}; faiss / matmul {fmt(res['ratio_faiss_over_matmul'])} "
                  "bounds it)")
            print(f"  top-k vs faiss         {wrong} of {len(check_rows)} sampled rows differ in values "
                  f"(max |diff| {max_abs:.1e}); {mismatched} in index order (near-ties rounded differently)")
        print(f"  tile {res['tile_mib']} MiB; the full matrix would be {res['full_matrix_mib']:,} MiB; "
              f"RSS before the runs (libraries + inputs) {res['inputs_mib']} MiB")
        if key_prep is not None:
            print(f"  bf16 keys prepared once in {prep_s:.2f} s (counted in ganprint's time)")
        if ivf is not None:
            print(f"  faiss-ivf data         {ivf['data']}; exact top-k on it {ivf['exact_seconds']:.2f} s "
                  f"(CPU {ivf['exact_cpu_seconds']:.2f} s)")
            print(f"  faiss-ivf (default)    {ivf['seconds']:8.2f} s  (CPU {ivf['cpu_seconds']:.2f} s; index, calibration "
                  f"and search); nlist {ivf['nlist']}, nprobe {ivf['nprobe']}"
                  + (f"; fell back to exact: {ivf['fallback']}" if ivf["fallback"] else ""))
            print(f"  faiss-ivf recall@{k}     {ivf['recall_at_k_all_rows']:.4f} on all {n:,} rows vs the exact top-k "
                  f"(target >= 0.99; its own held-out estimate {ivf['recall_at_k']:.4f} on {ivf['recall_sample']} rows)")
            print(f"  exact / faiss-ivf      {ivf['speedup_over_ganprint_exact']:.3f}  (the IVF speed-up; CPU time "
                  f"{ivf['cpu_speedup_over_ganprint_exact']:.3f})")
        if noisy is not None:
            print("  noisy neighbour        CPU time growth with one core kept busy (target: ganprint <= 1.3): "
                  + ", ".join(f"{p} {v:.2f}x" for p, v in noisy["cpu_growth"].items()))
        print(f"  load average before/after: {res['loadavg_before_after']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
