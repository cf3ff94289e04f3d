"""Shortlist recall and attack quality of the instance-trained copy descriptor (issue 11, item 3).

    python bench/instance_recall.py DATA [--work DIR] [--steps 600] [--eval-at 100,300]
                                    [--set key=value ...] [--baselines pixels,efficientnet_lite0]

DATA: a ``ganprint synth --regime copies`` output (made here, DCGAN default, when DATA has no
synth.json).  ``ganprint train --positives instance`` runs on DATA/dev (the cpu-small preset plus
``--set`` overrides, ``--steps`` optimizer steps, one CPU thread by default), stopping at each
``--eval-at`` step (one schedule: stop + ``--resume``, so every point is a checkpoint of the same
run).  At each point, and for each ``--baselines`` feature space (untrained), the script embeds
dev and test (``embed --checkpoint``) and measures on replicas.csv:

- ``src->gen recall@K``: for each replica, is it among its source member's K most similar
  generated images?  Queries: every real image of dev and test; candidates: every generated image
  of dev and test (the shortlist geometric verification would see).  ``any`` counts a hit when
  any replica of the same source is among the K (as bench/verify_replicas.py does); also split by
  the replica's split (``_dev``: its image was a training anchor; ``_test``: never seen);
- ``gen->src recall@K``: for each replica, is its source among its K most similar real images?

and, for the last point and the baselines, every attack calibrated on dev and applied to the test
split (``ganprint.benchmark``: simmatrix, predict, score), TPR@1%FPR and AUC.  The attack named
per feature space in the summary is the one with the best *dev* kappa (not chosen on test).

Writes WORK/instance_recall.json and prints a markdown table on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _value(v: str):
    for cast in (int, float):
        try:
            return cast(v)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(v.lower(), v)


def load_side(arts: dict, role: str):
    """(embeddings float [N, D] L2-normalised, keys [(split, image_id)]) of the real or the
    generated images of dev and test."""
    import numpy as np
    import torch

    from ganprint.artifacts import read_artifact

    embs, keys = [], []
    for split in ("dev", "test"):
        a = read_artifact(arts[split])
        sub = a.table["subset"].astype(str)
        rows = np.flatnonzero(sub.str.startswith("real_") if role == "real" else (sub == "generated"))
        embs.append(a.tensor("embeddings")[torch.as_tensor(rows)].float())
        keys += [(split, i) for i in a.table["image_id"].astype(str).to_numpy()[rows]]
    return torch.nn.functional.normalize(torch.cat(embs), dim=1), keys


def replica_recall(arts: dict, reps: list[dict], ks: list[int]) -> dict:
    """Recall@K in both directions (module docstring) from dev/test embeddings artifacts."""
    import torch

    real_e, real_keys = load_side(arts, "real")
    gen_e, gen_keys = load_side(arts, "generated")
    real_pos = {k: i for i, k in enumerate(real_keys)}
    gen_pos = {k: i for i, k in enumerate(gen_keys)}
    src = torch.tensor([real_pos[(r["source_split"], r["source_id"])] for r in reps])
    rep = torch.tensor([gen_pos[(r["split"], r["image_id"])] for r in reps])
    source_of = torch.full((len(gen_keys),), -1, dtype=torch.long)
    source_of[rep] = src
    sim = real_e @ gen_e.t()  # [R, G] cosine
    kmax = max(ks)
    g_top = sim[src].topk(min(kmax, sim.shape[1]), dim=1).indices  # [n_rep, k] generated per source
    r_top = sim.t()[rep].topk(min(kmax, sim.shape[0]), dim=1).indices  # [n_rep, k] real per replica
    out = {"replicas": len(reps), "queries_real": len(real_keys), "candidates_generated": len(gen_keys)}
    for k in ks:
        out[f"src_gen_recall@{k}"] = round(float((g_top[:, :k] == rep[:, None]).any(1).float().mean()), 4)
        out[f"src_gen_recall_any@{k}"] = round(float((source_of[g_top[:, :k]] == src[:, None]).any(1).float().mean()), 4)
        out[f"gen_src_recall@{k}"] = round(float((r_top[:, :k] == src[:, None]).any(1).float().mean()), 4)
        # by the replica's split: dev replicas were training anchors (unlabelled), test ones never seen
        hit = (g_top[:, :k] == rep[:, None]).any(1).float()
        for split in ("dev", "test"):
            m = torch.tensor([r["split"] == split for r in reps])
            if m.any():
                out[f"src_gen_recall@{k}_{split}"] = round(float(hit[m].mean()), 4)
    # rank of the replica among its source's candidates (1 = top)
    rank = (sim[src] > sim[src, rep][:, None]).sum(1) + 1
    out["src_gen_median_rank"] = float(rank.median())
    return out


def attack_summary(fs, truth: dict, bootstrap: int, work: Path) -> dict:
    """Every attack of ``fs`` (dev-calibrated, on test); the one with the best dev kappa named."""
    from ganprint import benchmark as B

    B.add_similarity(fs, work)
    rows = [B.public(r) for r in B.attack_rows(fs, truth, bootstrap=bootstrap)]
    by_dev = max(rows, key=lambda r: (r["dev_kappa"], r["attack"]))
    return {"rows": rows, "by_dev_kappa": by_dev}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("data")
    ap.add_argument("--work", default=None, help="artifact folder [default: DATA/instance_work]")
    ap.add_argument("--preset", default="cpu-small")
    ap.add_argument("--steps", type=int, default=600, help="optimizer steps of the training run")
    ap.add_argument("--eval-at", default="", help="also measure at these steps (comma list) of the same run")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="train config override")
    ap.add_argument("--checkpoint", action="append", default=[], help="skip training: measure this checkpoint (repeatable)")
    ap.add_argument("--no-train", action="store_true", help="baselines only")
    ap.add_argument("--baselines", default="pixels,efficientnet_lite0", help="untrained feature spaces ('' none)")
    ap.add_argument("--k", default="10,50")
    ap.add_argument("--bootstrap", type=int, default=200)
    ap.add_argument("--no-attacks", action="store_true")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (the machine is shared)")
    ap.add_argument("--synth", action="append", default=[], metavar="KEY=VALUE", help="synth override")
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    from ganprint import benchmark as B
    from ganprint.contrastive import run_training
    from ganprint.contrastive.config import TrainConfig
    from ganprint.checkpoint import read_checkpoint_meta
    from ganprint.synth.replicas import read_replicas

    data = Path(args.data)
    if not (data / "synth.json").exists():
        from ganprint.demo import _synth_once

        _synth_once(data, {"regime": "copies", "threads": args.threads,
                           **{k: _value(v) for k, v in (s.split("=", 1) for s in args.synth)}}, not args.quiet)
    reps = read_replicas(data)
    if not reps:
        print(f"Error: {data}: no replicas.csv; make the data with `ganprint synth DATA --regime copies`",
              file=sys.stderr)
        return 2
    work = Path(args.work or data / "instance_work")
    work.mkdir(parents=True, exist_ok=True)
    ks = [int(k) for k in args.k.split(",")]
    truth = B.read_truth(data)
    result: dict = {"data": str(data), "argv": sys.argv[1:], "points": [], "baselines": []}
    prog = not args.quiet

    def measure(name: str, backbone: str, checkpoint: str | None, attacks: bool, image_size=None) -> dict:
        t = time.perf_counter()
        fs = B.embed_split(data, work, name, backbone, checkpoint=checkpoint, image_size=image_size, progress=prog)
        rec = {"features": name, **replica_recall({"dev": fs.dev, "test": fs.test}, reps, ks)}
        if attacks and not args.no_attacks:
            rec["attacks"] = attack_summary(fs, truth, args.bootstrap, work)
        rec["seconds"] = round(time.perf_counter() - t, 1)
        print(json.dumps({k: v for k, v in rec.items() if k != "attacks"}), file=sys.stderr)
        return rec

    for bb in [b for b in args.baselines.split(",") if b]:
        result["baselines"].append(measure(bb, bb, None, True))

    for i, ck in enumerate(args.checkpoint):
        meta = read_checkpoint_meta(ck)
        result["points"].append({"step": meta.get("step"), **measure(f"instance_ck{i}", meta["backbone"], ck,
                                                                     True, meta.get("image_size"))})
    if not args.checkpoint and not args.no_train:
        overrides = {k: _value(v) for k, v in (s.split("=", 1) for s in args.set)}
        cfg = TrainConfig.from_preset(args.preset, **{"data": str(data / "dev"), "out": str(work / "train"),
                                                      "positives": "instance", "threads": args.threads,
                                                      "max_steps": args.steps, **overrides})
        result["train_config"] = cfg.to_dict()
        stops = sorted({int(s) for s in args.eval_at.split(",") if s} | {args.steps})
        done, t_train = 0, 0.0
        for stop in stops:
            if stop > args.steps:
                continue
            t = time.perf_counter()
            res = run_training(cfg.replace(stop_at_step=stop if stop < args.steps else 0), resume=done > 0,
                               progress=prog)
            t_train += time.perf_counter() - t
            done = res.step
            last = stop == args.steps
            point = measure(f"instance_s{stop}", cfg.backbone, str(res.checkpoint), last)
            result["points"].append({"step": stop, "train_seconds_so_far": round(t_train, 1),
                                     "loss_last10": round(sum(res.losses[-10:]) / max(1, len(res.losses[-10:])), 4),
                                     **point})
    (work / "instance_recall.json").write_text(json.dumps(result, indent=1, default=str))
    print(markdown(result, ks))
    return 0


def markdown(result: dict, ks: list[int]) -> str:
    lines = ["| features | step | " + " | ".join(f"src→gen R@{k}" for k in ks) + " | "
             + " | ".join(f"src→gen any R@{k}" for k in ks) + " | " + " | ".join(f"gen→src R@{k}" for k in ks)
             + " | attack (best dev κ) | AUC test | TPR@1%FPR |",
             "|---|---|" + "---|" * (3 * len(ks) + 3)]
    for rec in result["baselines"] + result["points"]:
        a = (rec.get("attacks") or {}).get("by_dev_kappa")
        att = f"{a['attack']} | {a['auc']:.3f} | {a['tpr_at_1fpr']:.3f}" if a else "– | – | –"
        lines.append(f"| {rec['features']} | {rec.get('step', '–')} | "
                     + " | ".join(f"{rec[f'src_gen_recall@{k}']:.3f}" for k in ks) + " | "
                     + " | ".join(f"{rec[f'src_gen_recall_any@{k}']:.3f}" for k in ks) + " | "
                     + " | ".join(f"{rec[f'gen_src_recall@{k}']:.3f}" for k in ks) + f" | {att} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
