"""Pair-level check of geometric verification on a dataset with known replicas.

    python bench/verify_replicas.py DATA [--backbone pixels] [--k 50] [--work DIR] [--local sift|register16]
        [--refine-top R] [--coarse-size C] [--attacks]

DATA: a ``ganprint synth --copies F`` output (``dev/``, ``test/``, ``replicas.csv``).  All real images
(dev real_used + real_not_used, test real_unknown) are the queries and all generated images (dev +
test) the candidates, so a replica is found wherever its source member is.  For each replica in
replicas.csv: is the *verified* top-1 of its source member that replica, or another replica of the
same member?  (Acceptance: >= 95% of replicas.)  Also printed: the same counting a replica of a
neighbouring slice of the same phantom patient as a hit (synth.json's ``patient``: such slices are
near-duplicates by construction, and replicas are made at the generator's 64 px), the same for the global descriptor's
own top-1, the shortlist's recall@k (a replica of the source among the k candidates verification
sees), and the share of test members that have a replica in the test split.  ``--attacks``: also the
verified membership attacks on test (so a change of the verifier is checked at both levels in one run).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def known_transform_ceiling(data: Path, reps) -> dict | None:
    """With each replica's known transform (replicas.csv; its noise left out), at the generator's
    resolution R (synth.json ``gan_res``): residual 1 - NCC of the replica against the transformed
    source, vs against the transformed neighbouring slice(s) of the source (``same_candidate``: one
    replica, two real images: what attribution across real images compares), and vs the residual of
    the neighbour's own replica against the source under *its* transform (``same_query``: two
    replicas, one real image, each with its own noise: what one real image's top-1 compares)."""
    import cv2
    import numpy as np

    from ganprint.data import load_image, to_gray
    from ganprint.synth.replicas import apply_transform

    meta = json.loads((data / "synth.json").read_text()) if (data / "synth.json").exists() else None
    if meta is None:
        return None
    res = int(meta["config"]["gan_res"])
    info = {(m["split"], m["image_id"]): m for m in meta["images"]}
    by_patient: dict = {}
    for m in meta["images"]:
        if m["subset"].startswith("real"):
            by_patient.setdefault(m["patient"], []).append(m)

    def grid(path):
        x = to_gray(load_image(str(data / path))).astype(np.float32) / 255.0
        return cv2.resize(x, (res, res), interpolation=cv2.INTER_AREA)

    def resid(a, b):
        a, b = a - a.mean(), b - b.mean()
        return 1.0 - float((a * b).sum() / np.sqrt((a * a).sum() * (b * b).sum()))

    def moved(m, r):  # the member as the generator saw it, under r's transform without noise
        p = {k: float(r[k]) for k in ("rotation_deg", "shift_x", "shift_y", "gamma", "blur")}
        p["noise_sigma"] = 0.0
        x = np.clip(np.rint(grid(m["file"]) * 255), 0, 255).astype(np.uint8)
        return apply_transform(x, p, np.random.default_rng(0)).astype(np.float32) / 255.0

    cand_win = cand_n = query_win = query_n = 0
    for r in reps:
        src = info[(r["source_split"], r["source_id"])]
        nbs = [m for m in by_patient[src["patient"]] if m["image_id"] != src["image_id"]]
        if not nbs:
            continue
        own = resid(grid(r["file"]), moved(src, r))
        cand_win += own < min(resid(grid(r["file"]), moved(m, r)) for m in nbs)
        cand_n += 1
        rivals = [x for x in reps if (x["source_split"], x["source_id"]) in {(m["split"], m["image_id"]) for m in nbs}]
        if rivals:
            query_win += own < min(resid(grid(x["file"]), moved(src, x)) for x in rivals)
            query_n += 1
    return {"resolution": res, "same_candidate_source_wins": round(cand_win / max(1, cand_n), 4), "replicas": cand_n,
            "same_query_source_wins": round(query_win / max(1, query_n), 4), "replicas_with_rival": query_n}


def attack_summary(data: Path, work: Path, args) -> list[dict]:
    """verify_max / verify_cal on test (calibrated on dev) with ganprint.benchmark, as bench/quality.py's
    verified rows of ``--backbone`` + verify(``--local``) at ``--k`` (no bootstrap)."""
    from ganprint.benchmark import add_similarity, add_verified, attack_rows, embed_split, read_truth

    truth = read_truth(data)
    fs = add_similarity(embed_split(data, work / "attacks", args.backbone, args.backbone, progress=False),
                        work / "attacks")
    v = add_verified(fs, data, work / "attacks", kind=args.local, k=args.k, max_keypoints=args.max_keypoints)
    return [{"attack": r["attack"], "auc": round(float(r["auc"]), 3), "tpr_at_1fpr": round(float(r["tpr_at_1fpr"]), 3),
             "kappa": round(float(r["kappa"]), 3), "dev_kappa": round(float(r["dev_kappa"]), 3)}
            for r in attack_rows(v, truth, ["verify_max", "verify_cal"], bootstrap=0)]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("data")
    ap.add_argument("--backbone", default="pixels", help="global descriptor that shortlists")
    ap.add_argument("--local", default="sift", help="sift / orb (local features + RANSAC), or registerS "
                    "(registration on S px raw-pixel grids, e.g. register16; register = register32)")
    ap.add_argument("--k", type=int, default=50)
    ap.add_argument("--max-keypoints", type=int, default=400)
    ap.add_argument("--image-size", type=int, default=256, help="size local features are extracted at")
    ap.add_argument("--refine-top", type=int, default=None, help="registration: refine the top R coarse "
                    "candidates [default: ganprint.verify_register.DEFAULT_REFINE_TOP]; 0 = all K (the full search)")
    ap.add_argument("--coarse-size", type=int, default=None, help="registration: coarse grid px [default: "
                    "ganprint.verify_register.coarse_size_for]")
    ap.add_argument("--attacks", action="store_true", help="also the verified attacks verify_max / verify_cal "
                    "(--backbone shortlist + verify(--local), calibrated on dev, on test: AUC, TPR@1%%FPR, kappa), "
                    "as bench/quality.py's verified rows (no bootstrap)")
    ap.add_argument("--oracle", action="store_true", help="also the known-transform ceiling: with replicas.csv's "
                    "transform (noise left out) applied at the generator's resolution, how often the source fits the "
                    "replica better than its neighbouring slice does, and than it fits the neighbour's replica")
    ap.add_argument("--failures", action="store_true", help="list the misses on stderr")
    ap.add_argument("--work", default=None, help="artifact folder [default: DATA/verify_work]")
    args = ap.parse_args()

    import numpy as np
    import torch

    from ganprint.artifacts import read_artifact
    from ganprint.embed import run_embed
    from ganprint.metrics import load_truth
    from ganprint.similarity import topk_search
    from ganprint.synth.replicas import read_replicas
    from ganprint.verify import DEFAULT_RATIO, DEFAULT_REPROJ, VERIFY_METHODS

    data = Path(args.data)
    reps = read_replicas(data)
    if not reps:
        print(f"{data}: no replicas.csv; run `ganprint synth --copies F`", file=sys.stderr)
        return 2
    work = Path(args.work or data / "verify_work")
    work.mkdir(parents=True, exist_ok=True)
    glob, loc = {}, {}
    t0 = time.perf_counter()
    for split in ("dev", "test"):
        glob[split] = read_artifact(run_embed([str(data / split)], work / f"{args.backbone}_{split}",
                                              backbone=args.backbone, progress=False).base)
        if args.local.startswith("register"):  # raw-pixel grids of that size
            loc[split] = run_embed([str(data / split)], work / f"{args.local}_{split}", backbone="pixels",
                                   image_size=int(args.local[8:] or 32), progress=False).base
        else:
            loc[split] = run_embed([str(data / split)], work / f"{args.local}{args.image_size}_{split}",
                                   backbone=args.local, max_keypoints=args.max_keypoints,
                                   image_size=args.image_size, skip_bad=True, progress=False).base
    t_embed = time.perf_counter() - t0
    method = VERIFY_METHODS["register" if args.local.startswith("register") else "ransac"]
    sets = method.load([str(loc["dev"]), str(loc["test"])])

    def side(role):
        embs, keys, tabs = [], [], []
        for split in ("dev", "test"):
            a = glob[split]
            sub = a.table["subset"].astype(str)
            rows = np.flatnonzero(sub.str.startswith("real_") if role == "real" else (sub == "generated"))
            embs.append(a.tensor("embeddings")[torch.as_tensor(rows)])
            tabs.append((a.table, rows))
            keys += [(split, i) for i in a.table["image_id"].astype(str).to_numpy()[rows]]
        import pandas as pd

        # one manifest for both splits, so the method's lookup lines its rows up in one go
        tab = pd.concat([t.iloc[r] for t, r in tabs], ignore_index=True)
        return torch.cat(embs), method.lookup(sets, tab, np.arange(len(tab)), role, "global"), keys

    real_e, real_l, real_keys = side("real")
    gen_e, gen_l, gen_keys = side("generated")
    k = min(args.k, len(gen_keys)) if args.k > 0 else len(gen_keys)
    t1 = time.perf_counter()
    short, _, _ = topk_search(real_e, gen_e, k)
    cand = short.indices.numpy()
    if method.name == "register" and (args.refine_top is not None or args.coarse_size is not None):
        from ganprint.verify import Verified
        from ganprint.verify_register import DEFAULT_REFINE_TOP, register_candidates

        rt = DEFAULT_REFINE_TOP if args.refine_top is None else (args.refine_top or None)
        o = register_candidates(real_l, gen_l, cand, refine_top=rt, coarse_size=args.coarse_size)
        v = Verified(*(torch.from_numpy(o[n]) for n in ("values", "indices", "matches", "transform")))
    else:
        v = method.run(real_l, gen_l, cand, {"ratio": DEFAULT_RATIO, "reproj": DEFAULT_REPROJ})
    t_verify = time.perf_counter() - t1

    real_pos = {key: i for i, key in enumerate(real_keys)}
    gen_pos = {key: i for i, key in enumerate(gen_keys)}
    source_of = {gen_pos[(r["split"], r["image_id"])]: (r["source_split"], r["source_id"]) for r in reps}
    # neighbouring slices of one phantom patient are near-duplicates by construction (synth
    # --slices-per-patient): a replica of the neighbour is reported separately
    patient = {}
    meta = data / "synth.json"
    if meta.exists():
        patient = {(im["split"], im["image_id"]): im.get("patient") for im in json.loads(meta.read_text())["images"]}
    hits = glob_hits = recall = same_patient = 0
    fails = []
    for r in reps:
        src = (r["source_split"], r["source_id"])
        q = real_pos[src]
        top_v = int(v.indices[q, 0])
        hits += source_of.get(top_v) == src
        got = source_of.get(top_v)
        same_patient += got is not None and (got == src or (patient.get(got) is not None
                                                            and patient.get(got) == patient.get(src)))
        if source_of.get(top_v) != src:
            mine = [j for j, c in enumerate(v.indices[q].tolist()) if source_of.get(int(c)) == src]
            fails.append({"source": src, "top1": gen_keys[top_v], "top1_is_replica_of": source_of.get(top_v),
                          "top1_inliers": float(v.values[q, 0]),
                          "replica_inliers": float(v.values[q, mine[0]]) if mine else None})
        glob_hits += source_of.get(int(cand[q, 0])) == src
        recall += any(source_of.get(int(c)) == src for c in cand[q])
    ids, labels, _ = load_truth(str(data / "test_truth.csv"))
    members = {i for i, y in zip(ids, labels) if int(y) == 1}
    with_rep = {r["source_id"] for r in reps if r["split"] == "test" and r["source_split"] == "test"}
    n = len(reps)
    if args.failures:
        print(json.dumps(fails, indent=1), file=sys.stderr)
    attacks = attack_summary(data, work, args) if args.attacks else None
    oracle = known_transform_ceiling(data, reps) if args.oracle else None
    print(json.dumps({
        "data": str(data), "replicas": n, "queries": len(real_keys), "candidates": len(gen_keys), "k": k,
        "shortlist": args.backbone, "local": args.local, "image_size": args.image_size,
        "refine_top": args.refine_top, "coarse_size": args.coarse_size,
        "verified_top1_is_a_replica_of_source": round(hits / n, 4),
        "verified_top1_is_a_replica_of_source_or_its_patient": round(same_patient / n, 4) if patient else None,
        "global_top1_is_a_replica_of_source": round(glob_hits / n, 4),
        "shortlist_recall_at_k": round(recall / n, 4),
        "test_members": len(members), "test_members_with_test_replica": len(with_rep & members),
        "share_test_members_with_replica": round(len(with_rep & members) / max(1, len(members)), 4),
        "embed_s": round(t_embed, 1), "verify_s": round(t_verify, 1),
        "verify_pairs_per_s": round(cand.size / t_verify, 1), "load_average_1min": round(os.getloadavg()[0], 2),
        "attacks": attacks, "oracle": oracle,
    }, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
