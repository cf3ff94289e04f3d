"""Seconds per stage of the default `ganprint audit` on 1,000 generated x 200 real images.

    .venv/bin/python bench/audit_time.py [--generated 1000] [--real 200] [--size 256] [--threads 2]
                                         [--keep DIR] [--backbone B ...] [--profile FILE]

Data: CT-like phantom slices (ganprint.synth.phantoms, 256 px palette-free gray PNGs). The real
images are split into members / non-members / unknown (35% / 35% / 30%); the generated set is
1,000 phantom slices of which 15% are noisy copies of members (so every stage has work that
means something: verification finds copies, the data-copying test has a signal). No GAN is
trained: the bench measures the audit's cost, not a benchmark's difficulty.

Runs the default audit (feature spaces pixels + efficientnet_lite0, SIFT verification, all
attacks, selection with nested CV, p-values, data-copying test, report) once from a cold cache
and once again (every stage reused), with torch on ``--threads`` threads, and prints the
seconds per stage from report.json, plus the wall time and CPU seconds of the run.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def make_data(root: Path, n_gen: int, n_real: int, size: int, seed: int = 0) -> dict[str, Path]:
    import numpy as np
    from PIL import Image

    from ganprint.synth.phantoms import render_patients

    reals, _, _ = render_patients(n_real, 1, size, seed)
    fresh, _, _ = render_patients(n_gen, 1, size, seed + 1)
    rng = np.random.default_rng(seed)
    n_mem, n_non = int(0.35 * n_real), int(0.35 * n_real)
    roles = {"members": reals[:n_mem], "non_members": reals[n_mem:n_mem + n_non], "unknown": reals[n_mem + n_non:]}
    for role, imgs in roles.items():
        for i, a in enumerate(imgs):
            p = root / role / f"{role}_{i:04d}.png"
            p.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(a).save(p)
    n_copy = int(0.15 * n_gen)
    for i in range(n_gen):
        a = fresh[i]
        if i < n_copy:
            src = roles["members"][i % n_mem].astype(np.float32)
            a = np.clip(src + rng.normal(0, 6, src.shape), 0, 255).astype(np.uint8)
        p = root / "generated" / f"gen_{i:05d}.png"
        p.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(a).save(p)
    return {r: root / r for r in ("generated", "members", "non_members", "unknown")}


def cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    c = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime + c.ru_utime + c.ru_stime


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--generated", type=int, default=1000)
    ap.add_argument("--real", type=int, default=200)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--backbone", action="append", default=None)
    ap.add_argument("--keep", type=Path, default=None, help="Keep data and run here (default: a temp folder).")
    ap.add_argument("--json", type=Path, default=Path("bench/out/audit_time.json"))
    ap.add_argument("--profile", type=Path, default=None,
                    help="cProfile the cold run; write its 40 costliest calls (cumulative) and 25 (own time) to this file.")
    a = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    torch.set_num_threads(a.threads)
    from ganprint.audit import DEFAULT_BACKBONES, AuditOptions, resolve_inputs, run_audit

    tmp = a.keep or Path(tempfile.mkdtemp(prefix="audit_time_"))
    t = time.perf_counter()
    folders = make_data(tmp / "data", a.generated, a.real, a.size)
    print(f"data: {a.generated} generated, {a.real} real ({time.perf_counter() - t:.0f}s to write)", file=sys.stderr)
    opts = AuditOptions(backbones=tuple(a.backbone or DEFAULT_BACKBONES), workers=1)
    runs = []
    for label in ("cold", "rerun (cached)"):
        inp = resolve_inputs(generated=folders["generated"], members=folders["members"],
                             non_members=folders["non_members"], unknown=folders["unknown"])
        c0, w0 = cpu_seconds(), time.perf_counter()
        prof = None
        if a.profile is not None and label == "cold":
            import cProfile

            prof = cProfile.Profile()
            prof.enable()
        res = run_audit(tmp / "run", inp, opts, progress=False)
        if prof is not None:
            import io
            import pstats

            prof.disable()
            buf = io.StringIO()
            pstats.Stats(prof, stream=buf).sort_stats("cumulative").print_stats(40)
            pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(25)
            a.profile.parent.mkdir(parents=True, exist_ok=True)
            a.profile.write_text(buf.getvalue())
        runs.append({"run": label, "wall_s": time.perf_counter() - w0, "cpu_s": cpu_seconds() - c0,
                     "stages_s": res.report["stages_seconds"], "cached": res.report["stages_cached"],
                     "verdict": res.report["verdict"], "chosen": res.report["selection"]["chosen"]})
    stages = list(runs[0]["stages_s"])
    print(f"| stage | {' | '.join(r['run'] for r in runs)} |")
    print("|---|" + "---|" * len(runs))
    for s in stages:
        print(f"| {s} | " + " | ".join(f"{r['stages_s'].get(s, 0):.1f}" for r in runs) + " |")
    print("| **total wall s** | " + " | ".join(f"**{r['wall_s']:.1f}**" for r in runs) + " |")
    print("| CPU s | " + " | ".join(f"{r['cpu_s']:.1f}" for r in runs) + " |")
    print(f"\nload average at the end: {os.getloadavg()[0]:.1f}; threads {a.threads}; "
          f"feature spaces {', '.join(opts.backbones)} + {opts.local_kind()}; chosen {runs[0]['chosen']}")
    print(runs[0]["verdict"])
    a.json.parent.mkdir(parents=True, exist_ok=True)
    a.json.write_text(json.dumps({"generated": a.generated, "real": a.real, "size": a.size, "threads": a.threads,
                                  "runs": runs, "loadavg": os.getloadavg()}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
