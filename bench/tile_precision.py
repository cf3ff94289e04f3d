"""Tile products by precision on this CPU: why ``--precision auto`` picks what it picks.

    python bench/tile_precision.py [--threads 1] [--rows 1024] [--keys 65536] [--dim 256] [--repeats 3]

Times ``torch.mm`` of [rows, D] x [D, M] tiles (as the exact search computes them: keys
row-major, used transposed, output in the input precision) in float32, bfloat16 and float16,
interleaved, in process CPU time, and prints GFLOP per CPU-second, each precision's speed
relative to float32, and the fixed rule (:func:`ganprint.prefilter.bf16_rule`) with the CPU
features it read.  ``ONEDNN_VERBOSE=1`` in the environment shows which oneDNN kernel ran
(e.g. ``brg_matmul:avx512_core_bf16``).
"""

from __future__ import annotations

import argparse
import json
import time


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rows", type=int, default=1024)
    ap.add_argument("--keys", type=int, default=65536)
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    import torch

    from ganprint.prefilter import bf16_faster, cpu_features

    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    q = torch.nn.functional.normalize(torch.randn(args.rows, args.dim, generator=g), dim=1)
    keys = torch.nn.functional.normalize(torch.randn(args.keys, args.dim, generator=g), dim=1)
    configs = {"fp32 [rows, 16384]": (torch.float32, 16384), "bf16 [rows, 32768]": (torch.bfloat16, 32768),
               "bf16 [rows, 4096]": (torch.bfloat16, 4096), "fp16 [rows, 32768]": (torch.float16, 32768)}
    runs = {}
    for name, (dt, width) in configs.items():
        qq, kk = q.to(dt), keys.to(dt)
        out = torch.empty(args.rows, width, dtype=dt)

        def f(qq=qq, kk=kk, out=out, width=width):
            for s in range(0, args.keys, width):
                w = min(width, args.keys - s)
                torch.mm(qq, kk[s:s + w].t(), out=out[:, :w])

        runs[name] = f
    cpu = {n: 0.0 for n in runs}
    with torch.inference_mode():
        for f in runs.values():
            f()  # warm-up: kernels generated, buffers touched
        for _ in range(args.repeats):
            for n, f in runs.items():
                c = time.process_time()
                f()
                cpu[n] += time.process_time() - c
    flop = 2.0 * args.rows * args.keys * args.dim * args.repeats / 1e9
    faster, why = bf16_faster()
    res = {"threads": args.threads, "rows": args.rows, "keys": args.keys, "dim": args.dim, "torch": torch.__version__,
           "cpu_features": cpu_features(),
           "gflop_per_cpu_s": {n: round(flop / v, 1) for n, v in cpu.items()},
           "speed_vs_fp32": {n: round(cpu["fp32 [rows, 16384]"] / v, 3) for n, v in cpu.items()},
           "auto_rule": {"bf16": faster, "why": why}}
    if args.json:
        print(json.dumps(res, indent=2))
    else:
        print(f"tile products, {args.rows} x {args.dim} queries against {args.keys:,} keys, {args.threads} thread(s), "
              f"torch {torch.__version__}; CPU {res['cpu_features']}")
        for n in runs:
            print(f"  {n:20s} {res['gflop_per_cpu_s'][n]:7.1f} GFLOP/CPU-s   {res['speed_vs_fp32'][n]:.3f}x fp32")
        print(f"  --precision auto: {'bf16' if faster else 'fp32'} ({why})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
