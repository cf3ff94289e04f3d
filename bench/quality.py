"""Membership-inference quality, every attack x feature set, side by side, on synth regimes.

    python bench/quality.py [--regimes memorize,generalize] [--out bench/out/quality]

For each regime: `ganprint synth` (its regime defaults), then for each backbone (default
efficientnet_lite0 with offline ImageNet weights, and the raw-pixel baseline) embed dev and test,
simmatrix, and every attack calibrated on dev (kappa-optimal cut) and applied to test. Extra rows:

- the seed's rule: max cosine >= 0.6 on untrained ImageNet features (efficientnet_lite0);
- "after train": the same backbone fine-tuned with `ganprint train` (the cpu-small preset, on the
  dev split), embedded with `--checkpoint`, same attacks, same data; once with positive pools from
  the backbone's own features (the paper's method) and once with pools from the raw-pixel
  similarity artifact (`train --similarity`);
- verified (``--verify sift``): each backbone's shortlist re-scored by geometric verification
  (``simmatrix --verify``; attacks verify_max, verify_cal);
- fusion: logistic-regression stacking of every (backbone, attack) score, and the MoE fusion of
  the backbones' embeddings with the max_sim / gan_leaks_cal attacks.

Writes OUT/quality.md (markdown table) and OUT/quality.json; prints a table per regime.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def run_regime(regime: str, out: Path, args) -> list[dict]:
    from ganprint import benchmark as B
    from ganprint.demo import _synth_once

    root, work = out / regime / "data", out / regime / "work"
    timings = {}
    t = time.perf_counter()
    synth = {"regime": regime, **args.synth}
    _synth_once(root, synth, progress=not args.quiet)
    timings["synth"] = time.perf_counter() - t
    truth = B.read_truth(root)
    rows, sets = [], []
    for i, bb in enumerate(args.backbones):
        t = time.perf_counter()
        fs = B.add_similarity(B.embed_split(root, work, bb, bb, progress=not args.quiet), work)
        sets.append(fs)
        rows += B.attack_rows(fs, truth, seed_rule=(i == 0), bootstrap=args.bootstrap, scores_dir=work / "scores")
        timings[f"embed+attacks {bb}"] = time.perf_counter() - t
        if args.verify:  # geometric verification of this backbone's shortlist (ganprint.verify)
            t = time.perf_counter()
            vfs = B.add_verified(fs, root, work, args.verify, k=args.verify_k, progress=not args.quiet)
            rows += B.attack_rows(vfs, truth, ["verify_max", "verify_cal"], bootstrap=args.bootstrap)
            timings[f"verify {bb}"] = time.perf_counter() - t
    if not args.no_train:
        from ganprint.backbones import get_backbone
        from ganprint.contrastive import run_training
        from ganprint.contrastive.config import TrainConfig

        bb = args.backbones[0]
        # pools from the backbone's own features (the paper), and from the raw-pixel similarity
        # when that baseline is in the run (its nearest neighbours are the better positives here)
        variants = [("train", None)]
        pix = next((fs for fs in sets if fs.name == "pixels"), None)
        if pix is not None and bb != "pixels":
            variants.append(("train(pixel pools)", str(pix.dev_sim)))
        for tag, sim in variants:
            t = time.perf_counter()
            overrides = {"data": str(root / "dev"), "out": str(work / tag.replace("(", "_").replace(")", "").replace(" ", "_")),
                         "backbone": bb, "seed": 0, "weights": get_backbone(bb).default_weights, "similarity": sim}
            if args.train_epochs is not None:
                overrides["epochs"] = args.train_epochs
            res = run_training(TrainConfig.from_preset(args.preset, **overrides), progress=not args.quiet)
            timings[f"train {tag}"] = time.perf_counter() - t
            t = time.perf_counter()
            name = f"{bb}+{tag}"
            fs = B.add_similarity(B.embed_split(root, work, name.replace("(", "_").replace(")", "").replace(" ", "_"), bb,
                                                checkpoint=str(res.checkpoint), progress=not args.quiet), work)
            fs.name = name
            rows += B.attack_rows(fs, truth, bootstrap=args.bootstrap)
            timings[f"embed+attacks {name}"] = time.perf_counter() - t
    if len(sets) >= 2:
        t = time.perf_counter()
        rows.append(B.stack_row(sets, truth, work, bootstrap=args.bootstrap))
        moe = B.add_similarity(B.moe_features(sets, work), work)
        rows += B.attack_rows(moe, truth, ["max_sim", "gan_leaks_cal"], bootstrap=args.bootstrap)
        timings["fusion"] = time.perf_counter() - t
    for r in rows:
        r["regime"] = regime
    print(json.dumps({"regime": regime, "seconds": {k: round(v, 1) for k, v in timings.items()}}), file=sys.stderr)
    return rows


def _synth_value(v: str):
    """A --synth value: int, float, or a word (e.g. generator=ddpm)."""
    for cast in (int, float):
        try:
            return cast(v)
        except ValueError:
            pass
    return v


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--regimes", default="memorize,generalize")
    ap.add_argument("--backbones", default="efficientnet_lite0,pixels")
    ap.add_argument("--out", default="bench/out/quality")
    ap.add_argument("--bootstrap", type=int, default=500)
    ap.add_argument("--no-train", action="store_true", help="skip the 'after train' rows")
    ap.add_argument("--preset", default="cpu-small", help="ganprint train preset for the 'after train' rows")
    ap.add_argument("--train-epochs", type=float, default=None)
    ap.add_argument("--synth", default="", help="synth overrides, e.g. size=64,gan_res=32,steps=200 (for quick runs)")
    ap.add_argument("--verify", default="", help="local features for verified rows (sift or orb; default: none)")
    ap.add_argument("--verify-k", type=int, default=50, help="candidates verified per real image (0: all)")
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args()
    args.backbones = [b for b in args.backbones.split(",") if b]
    args.synth = {k: _synth_value(v) for k, v in (kv.split("=") for kv in args.synth.split(",") if kv)}

    from rich.console import Console

    from ganprint import benchmark as B

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    console = Console(width=170)
    all_rows = []
    for regime in [r for r in args.regimes.split(",") if r]:
        rows = run_regime(regime, out, args)
        all_rows += rows
        console.print(B.format_table(rows, title=f"regime: {regime} (test split)"))
        public = [B.public(r) for r in all_rows]
        (out / "quality.json").write_text(json.dumps(public, indent=2, default=float))
        (out / "quality.md").write_text(B.markdown_table(public) + "\n")
    print(f"wrote {out / 'quality.md'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
