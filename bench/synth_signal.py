"""Does the synthetic benchmark carry a membership signal?  Strong in ``memorize``, weak in ``generalize``.

    .venv/bin/python bench/synth_signal.py [--regimes memorize,generalize] [--seed 0] [--keep DIR]
                                           [--threads N] [--device cpu] [synth overrides: --steps ...]

For each regime: ``ganprint.synth.run_synth`` with the regime's defaults (what ``ganprint synth
OUT --regime R`` does), then the simplest white-box-free attack on the written PNGs: for every
real image of dev and test, score = -min over all generated images (dev + test) of the L2 pixel
distance, and AUC = sklearn ``roc_auc_score(label, score)`` (label 1 = member).  Also prints
TPR at 1% and 10% FPR, the mean nearest-generated distance of members and non-members, the time
of the synth run (and of its GAN training alone) and the CPU time it used.

Targets: memorize AUC >= 0.8 within 5 minutes on 2 CPU cores; generalize clearly weaker (<= 0.65).
A machine shared with other jobs stretches wall-clock time; the run's CPU seconds (synth uses one
thread by default) are about the wall-clock time on an idle machine.
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


def load_split(out: Path):
    """-> gen uint8 [G, S, S], reals uint8 [R, S, S], labels int [R] (1 = member), from the written PNGs."""
    import numpy as np

    from ganprint.data import load_image

    meta = json.loads((out / "synth.json").read_text())
    gen = [load_image(str(p)) for sub in ("dev", "test") for p in sorted((out / sub / "generated").glob("*.png"))]
    reals = [load_image(str(out / r["file"])) for r in meta["images"]]
    labels = [r["label"] for r in meta["images"]]
    return np.stack(gen), np.stack(reals), np.asarray(labels), meta


def nn_distance(reals, gen, block: int = 256):
    """min_g ||x - g||_2 for each real x: float [R] (float32 matmul, in blocks to bound memory)."""
    import torch

    G = torch.from_numpy(gen.reshape(len(gen), -1)).float()
    g2 = (G * G).sum(1)
    out = []
    for i in range(0, len(reals), block):
        R = torch.from_numpy(reals[i:i + block].reshape(-1, G.shape[1])).float()
        d2 = (R * R).sum(1, keepdim=True) + g2[None] - 2.0 * R @ G.T
        out.append(d2.clamp_min(0).min(1).values.sqrt())
    return torch.cat(out).numpy()


def tpr_at(labels, scores, fpr_target: float) -> float:
    from sklearn.metrics import roc_curve

    fpr, tpr, _ = roc_curve(labels, scores)
    return float(tpr[fpr <= fpr_target].max()) if (fpr <= fpr_target).any() else 0.0


def cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


COLUMNS = [("regime", "{}"), ("members", "{}"), ("non_members", "{}"), ("generated", "{}"), ("steps", "{}"),
           ("epochs", "{:.0f}"), ("auc", "{:.3f}"), ("tpr@1%fpr", "{:.3f}"), ("tpr@10%fpr", "{:.3f}"),
           ("nn_dist_members", "{:.0f}"), ("nn_dist_non_members", "{:.0f}"), ("train_s", "{:.0f}"),
           ("synth_s", "{:.0f}"), ("cpu_s", "{:.0f}"), ("threads", "{}")]


def format_table(rows: list[dict]) -> str:
    cells = [[name for name, _ in COLUMNS]] + [[f.format(r[name]) for name, f in COLUMNS] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(COLUMNS))]
    return "\n".join("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
                     for row in cells)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--regimes", default="memorize,generalize", help="comma-separated: memorize, balanced, generalize")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--keep", type=Path, default=None, help="write the datasets to KEEP/<regime> and keep them")
    ap.add_argument("--device", default="cpu", help="cpu (the 5-minute target is on CPU), cuda, auto")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads [default: synth's, 1]")
    ap.add_argument("--steps", type=int, default=None, help="override the regime's training steps")
    ap.add_argument("--dev-real", type=int, default=None)
    ap.add_argument("--test-real", type=int, default=None)
    ap.add_argument("--quiet", action="store_true", help="no progress bars")
    ap.add_argument("--json", action="store_true", help="also print the rows as JSON")
    args = ap.parse_args(argv)

    import numpy as np
    from sklearn.metrics import roc_auc_score

    from ganprint.synth import resolve_config, run_synth

    rows = []
    with tempfile.TemporaryDirectory(prefix="synth_signal.") as tmp:
        for regime in [r.strip() for r in args.regimes.split(",") if r.strip()]:
            cfg = resolve_config(regime, seed=args.seed, device=args.device, threads=args.threads, steps=args.steps,
                                 dev_real=args.dev_real, test_real=args.test_real)
            out = (args.keep / regime) if args.keep else Path(tmp) / regime
            c0, w0 = cpu_seconds(), time.perf_counter()
            res = run_synth(out, cfg, force=True, progress=not args.quiet)
            wall, cpu = time.perf_counter() - w0, cpu_seconds() - c0
            t1 = time.perf_counter()
            gen, reals, labels, meta = load_split(out)
            d = nn_distance(reals, gen)
            auc = float(roc_auc_score(labels, -d))
            rows.append({
                "regime": regime, "members": int(labels.sum()), "non_members": int((1 - labels).sum()),
                "generated": len(gen), "steps": cfg.steps, "epochs": meta["generator"]["epochs"],
                "auc": round(auc, 4), "tpr@1%fpr": round(tpr_at(labels, -d, 0.01), 4),
                "tpr@10%fpr": round(tpr_at(labels, -d, 0.10), 4),
                "nn_dist_members": round(float(d[labels == 1].mean()), 1),
                "nn_dist_non_members": round(float(d[labels == 0].mean()), 1),
                "train_s": round(res.seconds["train"], 1), "synth_s": round(wall, 1), "cpu_s": round(cpu, 1),
                "threads": meta["environment"]["torch_threads"], "attack_s": round(time.perf_counter() - t1, 1),
                "device": res.device, "generator_sha256": res.generator_sha256[:16],
            })
            print(f"{regime}: AUC {auc:.3f} ({wall:.0f}s)", file=sys.stderr, flush=True)

    print(format_table(rows))
    print(f"seed {args.seed}, device {rows[0]['device'] if rows else '-'}; AUC of -min L2 pixel distance to the "
          "generated images (dev+test), over the real images of dev+test; targets: memorize >= 0.8, generalize <= 0.65")
    if args.json:
        print(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    raise SystemExit(main())
