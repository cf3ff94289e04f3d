"""Does the synthetic benchmark carry a membership signal?  Strong in ``memorize``, weak in ``generalize``.

    .venv/bin/python bench/synth_signal.py [--regimes memorize,balanced,generalize,copies]
                                           [--generators dcgan,ddpm] [--seed 0] [--keep DIR]
                                           [--threads N] [--device cpu] [synth overrides: --steps ...]
                                           [--markdown] [--json-out FILE]

For each generator x regime: ``ganprint.synth.run_synth`` with the regime's and the generator's
defaults (what ``ganprint synth OUT --regime R --generator G`` does), then the simplest
white-box-free attack on the written PNGs: for every
real image of dev and test, score = -min over all generated images (dev + test) of the L2 pixel
distance, and AUC = sklearn ``roc_auc_score(label, score)`` (label 1 = member).  Also prints
TPR at 1% and 10% FPR, the mean nearest-generated distance of members and non-members, the time
of the synth run (and of its generator's training alone) and the CPU time it used.  With
replicas (``copies``): ``replica_test`` = the share of test members that have a replica among the
test generated images (the best TPR any attack on the test split can reach from the replicas
alone), ``replica_all`` = the share of all members with a replica anywhere (the same ceiling for
the dev+test attack above).

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


COLUMNS = [("generator", "{}"), ("regime", "{}"), ("members", "{}"), ("non_members", "{}"), ("generated", "{}"), ("steps", "{}"),
           ("epochs", "{:.0f}"), ("auc", "{:.3f}"), ("tpr@1%fpr", "{:.3f}"), ("tpr@10%fpr", "{:.3f}"),
           ("nn_dist_members", "{:.0f}"), ("nn_dist_non_members", "{:.0f}"), ("train_s", "{:.0f}"),
           ("synth_s", "{:.0f}"), ("cpu_s", "{:.0f}"), ("threads", "{}"), ("replicas", "{}"),
           ("replica_test", "{:.3f}"), ("replica_all", "{:.3f}")]

MARKDOWN = [("generator", "generator", "{}"), ("regime", "regime", "{}"), ("members", "members / non-members", None),
            ("epochs", "epochs", "{:.0f}"), ("auc", "AUC", "**{:.3f}**"), ("tpr@1%fpr", "TPR@1%FPR", "{:.3f}"),
            ("replica_test", "test members with a replica", "{:.3f}"), ("cpu_s", "CPU s", "{:.0f}"),
            ("synth_s", "wall s", "{:.0f}")]


def format_markdown(rows: list[dict]) -> str:
    lines = ["| " + " | ".join(h for _, h, _ in MARKDOWN) + " |", "|" + "---|" * len(MARKDOWN)]
    for r in rows:
        cells = []
        for key, _, f in MARKDOWN:
            if f is None:
                cells.append(f"{r['members']} / {r['non_members']}")
            elif key.startswith("replica") and not r["replicas"]:
                cells.append("—")
            else:
                cells.append(f.format(r[key]))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def format_table(rows: list[dict]) -> str:
    cells = [[name for name, _ in COLUMNS]] + [[f.format(r[name]) for name, f in COLUMNS] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(COLUMNS))]
    return "\n".join("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
                     for row in cells)


def one_run(regime: str, generator: str, args, tmp: Path, roc_auc_score, np) -> dict:
    """``run_synth`` for one regime x generator, then the pixel attack on what it wrote -> one table row."""
    from ganprint.synth import resolve_config, run_synth

    cfg = resolve_config(regime, generator, seed=args.seed, device=args.device, threads=args.threads,
                         steps=args.steps, dev_real=args.dev_real, test_real=args.test_real, size=args.size,
                         dev_generated=args.dev_generated, test_generated=args.test_generated)
    out = (args.keep / generator / regime) if args.keep else tmp / generator / regime
    c0, w0 = cpu_seconds(), time.perf_counter()
    res = run_synth(out, cfg, force=True, progress=not args.quiet)
    wall, cpu = time.perf_counter() - w0, cpu_seconds() - c0
    t1 = time.perf_counter()
    gen, reals, labels, meta = load_split(out)
    d = nn_distance(reals, gen)
    auc = float(roc_auc_score(labels, -d))
    rc = meta["counts"]["replicas"]
    row = {
        "generator": generator, "regime": regime, "members": int(labels.sum()), "non_members": int((1 - labels).sum()),
        "generated": len(gen), "steps": cfg.steps, "epochs": meta["generator"]["epochs"],
        "auc": round(auc, 4), "tpr@1%fpr": round(tpr_at(labels, -d, 0.01), 4),
        "tpr@10%fpr": round(tpr_at(labels, -d, 0.10), 4),
        "nn_dist_members": round(float(d[labels == 1].mean()), 1),
        "nn_dist_non_members": round(float(d[labels == 0].mean()), 1),
        "train_s": round(res.seconds["train"], 1), "synth_s": round(wall, 1), "cpu_s": round(cpu, 1),
        "threads": meta["environment"]["torch_threads"], "attack_s": round(time.perf_counter() - t1, 1),
        "replicas": rc["dev"] + rc["test"],
        "replica_test": round(rc["test_members_with_replica"] / max(1, meta["counts"]["test"]["members"]), 4),
        "replica_all": round(rc["members_with_replica"] / max(1, meta["counts"]["train_images"]), 4),
        "device": res.device, "generator_sha256": res.generator_sha256[:16],
        "load_avg": round(os.getloadavg()[0], 1),
    }
    print(f"{generator} {regime}: AUC {auc:.3f} ({wall:.0f}s wall, {cpu:.0f}s CPU)", file=sys.stderr, flush=True)
    return row


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--regimes", default="memorize,balanced,generalize,copies",
                    help="comma-separated: memorize, balanced, generalize, copies")
    ap.add_argument("--generators", default="dcgan,ddpm", help="comma-separated: dcgan, ddpm")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--keep", type=Path, default=None, help="write the datasets to KEEP/<generator>/<regime> and keep them")
    ap.add_argument("--device", default="cpu", help="cpu (the 5-minute target is on CPU), cuda, auto")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads [default: synth's, 1]")
    ap.add_argument("--steps", type=int, default=None, help="override the regime's training steps")
    ap.add_argument("--dev-real", type=int, default=None)
    ap.add_argument("--test-real", type=int, default=None)
    ap.add_argument("--size", type=int, default=None, help="override the image size (quick runs)")
    ap.add_argument("--dev-generated", type=int, default=None)
    ap.add_argument("--test-generated", type=int, default=None)
    ap.add_argument("--from-json", type=Path, nargs="+", default=None,
                    help="run nothing: print the tables of rows saved with --json-out (several files are concatenated)")
    ap.add_argument("--quiet", action="store_true", help="no progress bars")
    ap.add_argument("--json", action="store_true", help="also print the rows as JSON")
    ap.add_argument("--json-out", type=Path, default=None, help="write the rows as JSON to this file (after each run)")
    ap.add_argument("--markdown", action="store_true", help="also print the README's markdown table")
    args = ap.parse_args(argv)

    import numpy as np
    from sklearn.metrics import roc_auc_score

    rows = []
    if args.from_json:
        for f in args.from_json:
            rows += json.loads(f.read_text())
        print(format_table(rows))
        print(format_markdown(rows))
        return 0
    with tempfile.TemporaryDirectory(prefix="synth_signal.") as tmp:
        for generator in [g.strip() for g in args.generators.split(",") if g.strip()]:
            for regime in [r.strip() for r in args.regimes.split(",") if r.strip()]:
                rows.append(one_run(regime, generator, args, Path(tmp), roc_auc_score, np))
                if args.json_out:
                    args.json_out.write_text(json.dumps(rows, indent=1) + "\n")

    print(format_table(rows))
    print(f"seed {args.seed}, device {rows[0]['device'] if rows else '-'}; AUC of -min L2 pixel distance to the "
          "generated images (dev+test), over the real images of dev+test; targets: memorize >= 0.8, generalize <= 0.65")
    if args.markdown:
        print(format_markdown(rows))
    if args.json:
        print(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    raise SystemExit(main())
