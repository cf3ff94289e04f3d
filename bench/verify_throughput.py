"""Geometric verification throughput (pairs/s), against OpenCV's BFMatcher on the same pairs.

    python bench/verify_throughput.py [--data ROOT/test] [--queries 200] [--k 50] [--threads 2]

Images: an ImageCLEF-layout folder (``--data``: its generated images are the candidates, its
real images the queries; e.g. a ``ganprint synth --regime copies`` split), or CT-like phantoms
(ganprint.synth.phantoms) when no folder is given.  Local features: SIFT, ``--max-keypoints``.

Measured in one run, on the same query x candidate pairs (each query's K candidates: a random
draw, seeded):

- ``ganprint``: :func:`ganprint.verify.verify_candidates` (int8 matrix products for all K
  candidates of a query at once, top-2 + ratio test, RANSAC on pairs with >= 3 matches);
- ``baseline``: per pair ``cv2.BFMatcher(NORM_L2).knnMatch(k=2)``, the same ratio test and the same
  RANSAC call (OpenCV with ``--threads`` threads); on ``--baseline-queries`` queries to save time.

Prints pairs/s of both (wall clock, and per CPU-second of this process: on a shared machine the
wall clock also counts time spent waiting for a core; the load average is printed), their ratio, the agreement of inlier counts, the time that 1,000 real images
x K would take, and (with ``--data``) the share of verification in the whole pipeline
(embed pixels_aligned + embed sift + simmatrix --verify).

``--register 16,32,64``: also the registration verifier (:mod:`ganprint.verify_register`, on raw-pixel
grids of those sizes) on the same pairs: pairs/s wall and per CPU-second of the cascade, and of its
coarse stage alone, per grid size (with the load average after each).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def baseline_verify(q, keys, cand, ratio, reproj):
    """Per-pair BFMatcher knnMatch + ratio test + the same RANSAC fit: inliers [Q, K]."""
    import cv2
    import numpy as np

    from ganprint.verify import MIN_MATCHES, _fit

    bf = cv2.BFMatcher(cv2.NORM_L2)
    out = np.zeros(cand.shape, np.int64)
    for i in range(cand.shape[0]):
        n = int(q.counts[i])
        dq = q.descriptors[i, :n].astype(np.float32)
        for j, c in enumerate(cand[i]):
            m = int(keys.counts[c])
            dc = keys.descriptors[c, :m].astype(np.float32)
            if n == 0 or m == 0:
                continue
            pairs = bf.knnMatch(dq, dc, k=2)
            good = [p[0] for p in pairs if len(p) == 2 and p[0].distance < ratio * p[1].distance]
            best = {}  # one-to-one, as ganprint.verify: a train keypoint keeps its nearest query keypoint
            for g in sorted(good, key=lambda g: (g.distance, g.queryIdx)):
                best.setdefault(g.trainIdx, g)
            good = sorted(best.values(), key=lambda g: g.queryIdx)
            if len(good) < MIN_MATCHES:
                continue
            src = np.float32([q.keypoints[i, g.queryIdx, :2] for g in good])
            dst = np.float32([keys.keypoints[c, g.trainIdx, :2] for g in good])
            out[i, j], _ = _fit(src, dst, reproj)
    return out


def load_images(args):
    import numpy as np

    if args.data is None:
        from ganprint.synth.phantoms import render_patients

        imgs, _, _ = render_patients((args.queries + args.candidates) // 2 + 1, 2, 256, 0)
        return imgs[: args.queries], imgs[args.queries: args.queries + args.candidates], "phantoms"
    from ganprint.data import discover, load_image

    records, _ = discover([args.data])
    real = [load_image(r.path) for r in records if (r.subset or "").startswith("real_")][: args.queries]
    gen = [load_image(r.path) for r in records if r.subset == "generated"][: args.candidates]
    return real, gen, args.data


def pipeline_share(args, seconds_per_pair: float):
    """embed pixels + embed sift + simmatrix --verify on --data: (total s, verification s)."""
    import tempfile

    from ganprint.embed import run_embed
    from ganprint.similarity import run_simmatrix

    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        pix = run_embed([args.data], Path(tmp) / "pix", backbone="pixels_aligned", progress=False).base
        loc = run_embed([args.data], Path(tmp) / "sift", backbone="sift", max_keypoints=args.max_keypoints,
                        progress=False).base
        t_embed = time.perf_counter() - t
        t = time.perf_counter()
        run_simmatrix(Path(tmp) / "sim0", dataset=pix, device="cpu")
        t_plain = time.perf_counter() - t
        t = time.perf_counter()
        res = run_simmatrix(Path(tmp) / "sim", dataset=pix, device="cpu", verify=[str(loc)], verify_k=args.k)
        t_verify = time.perf_counter() - t
    pairs = res.provenance["verify"]["pairs"]
    return {"embed_s (pixels_aligned + sift)": round(t_embed, 2), "simmatrix_s": round(t_plain, 2),
            "simmatrix_verify_s": round(t_verify, 2), "verify_pairs": pairs,
            "verify_share_of_pipeline": round((t_verify - t_plain) / (t_embed + t_verify), 3)}


def register_rows(real, gen, cand, size: int, threads: int) -> dict:
    """Registration verifier on the same query x candidate pairs at ``size`` px: pairs/s of the
    whole cascade (defaults), and of its coarse stage alone (``refine=False``): their difference
    is what the refinement of the top ``refine_top`` candidates costs."""
    import numpy as np

    from ganprint.verify_register import DEFAULT_REFINE_TOP, GridSet, coarse_size_for, grid_of, register_candidates

    q = GridSet(np.stack([grid_of(x, size) for x in real]))
    keys = GridSet(np.stack([grid_of(x, size) for x in gen]))
    t, c = time.perf_counter(), time.process_time()
    register_candidates(q, keys, cand, threads=threads)
    t_reg, c_reg = time.perf_counter() - t, time.process_time() - c
    t = time.perf_counter()
    register_candidates(q, keys, cand, threads=threads, refine=False)
    t_coarse = time.perf_counter() - t
    return {f"register{size}_coarse_size": coarse_size_for(size), f"register{size}_refine_top": DEFAULT_REFINE_TOP,
            f"register{size}_pairs_per_s": round(cand.size / t_reg, 1),
            f"register{size}_pairs_per_cpu_s": round(cand.size / c_reg, 1),
            f"register{size}_coarse_only_pairs_per_s": round(cand.size / t_coarse, 1),
            f"register{size}_seconds_for_1000_x_k": round(1000 * cand.shape[1] / (cand.size / t_reg), 1),
            f"register{size}_target_2000_pairs_per_s": cand.size / t_reg >= 2000,
            f"register{size}_load_average_1min": round(os.getloadavg()[0], 2)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=None, help="ImageCLEF-layout folder (default: phantoms)")
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--candidates", type=int, default=400)
    ap.add_argument("--k", type=int, default=50)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max-keypoints", type=int, default=400)
    ap.add_argument("--baseline-queries", type=int, default=20)
    ap.add_argument("--no-pipeline", action="store_true", help="skip the pipeline-share measurement")
    ap.add_argument("--register", default="", help="grid sizes for the registration verifier, e.g. 16,32,64")
    args = ap.parse_args()

    import cv2
    import numpy as np
    import torch

    from ganprint.local_features import LocalSet, extract
    from ganprint.verify import DEFAULT_RATIO, DEFAULT_REPROJ, verify_candidates

    torch.set_num_threads(args.threads)
    cv2.setNumThreads(args.threads)
    real, gen, source = load_images(args)
    q = LocalSet.from_features([extract(x, "sift", args.max_keypoints) for x in real], cap=args.max_keypoints)
    keys = LocalSet.from_features([extract(x, "sift", args.max_keypoints) for x in gen], cap=args.max_keypoints)
    k = min(args.k, len(keys))
    rng = np.random.default_rng(0)
    cand = np.stack([rng.choice(len(keys), k, replace=False) for _ in range(len(q))])

    t, c = time.perf_counter(), time.process_time()
    ours = verify_candidates(q, keys, cand, threads=args.threads)
    t_ours, c_ours = time.perf_counter() - t, time.process_time() - c
    nb = min(args.baseline_queries, len(q))
    t, c = time.perf_counter(), time.process_time()
    base = baseline_verify(q.subset(range(nb)), keys, cand[:nb], DEFAULT_RATIO, DEFAULT_REPROJ)
    t_base, c_base = time.perf_counter() - t, time.process_time() - c
    # ours is re-ordered by inliers: compare per query as multisets of (candidate, inliers)
    agree = []
    for i in range(nb):
        mine = dict(zip(ours.indices[i].tolist(), ours.values[i].tolist()))
        agree += [mine[int(c)] == base[i, j] for j, c in enumerate(cand[i])]
    pairs_ours = cand.size / t_ours
    pairs_base = nb * k / t_base
    res = {
        "images": source, "queries": len(q), "k": k, "threads": args.threads, "max_keypoints": args.max_keypoints,
        "mean_keypoints": round(float(q.counts.mean()), 1),
        "ganprint_pairs_per_s": round(pairs_ours, 1), "bfmatcher_pairs_per_s": round(pairs_base, 1),
        "speedup_vs_bfmatcher": round(pairs_ours / pairs_base, 2),
        # CPU time of this process (all threads): on a shared machine wall time includes waiting
        "ganprint_pairs_per_cpu_s": round(cand.size / c_ours, 1),
        "bfmatcher_pairs_per_cpu_s": round(nb * k / c_base, 1),
        "load_average_1min": round(os.getloadavg()[0], 2),
        "inliers_equal_to_bfmatcher": round(float(np.mean(agree)), 4),
        "seconds_for_1000_x_k": round(1000 * k / pairs_ours, 1),
        "target_2000_pairs_per_s": pairs_ours >= 2000,
    }
    for size in [int(v) for v in args.register.split(",") if v]:
        res.update(register_rows(real, gen, cand, size, args.threads))
    if args.data is not None and not args.no_pipeline:
        res.update(pipeline_share(args, 1.0 / pairs_ours))
    print(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
