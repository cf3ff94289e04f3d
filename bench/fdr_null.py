"""FDR on a pure null: non-members scored against a disjoint set of non-members.

    python bench/fdr_null.py --run bench/out/auto/balanced-dcgan-s0 [--splits 200] [--q 0.1]

Reads the embeddings that `bench/quality.py --auto` left in RUN/work (every backbone there).
The pool of known non-members is the real_not_used images embedded with the test images (the dev
ones, and the synth reference pool when there is one) plus the test images whose truth is 0.  For each of ``--splits`` seeded random halvings of the pool, both halves are scored together by
every attack against the test generated set (as `predict` scores test images and the known
non-members embedded with them: one context, the other real images as reference); conformal
p-values of the first half (queries) against the second (the null), Benjamini-Hochberg at Q.
Every query is a non-member, so any flag is a false discovery: the share of splits with at
least one flag is the FDR (= family-wise error under the global null); BH on conformal p-values
keeps it <= Q (Bates et al. 2023).  Prints and writes RUN/fdr_null.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _subset(art, name):
    import numpy as np

    sub = art.table["subset"].astype(str).to_numpy()
    return np.flatnonzero(sub == name)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", required=True, help="a bench/quality.py --auto run folder (holds data/ and work/)")
    ap.add_argument("--splits", type=int, default=200)
    ap.add_argument("--q", type=float, default=0.1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--attacks", default="", help="comma list [default: every registered attack]")
    ap.add_argument("--queries", type=int, default=0,
                    help="queries per split [default: half the pool]; few queries against many null images make "
                         "the check sensitive (with n queries and m null images BH can flag a single image only "
                         "when 1/(m+1) <= Q/n)")
    ap.add_argument("--out", default="", help="JSON output [default: RUN/fdr_null.json]")
    args = ap.parse_args()

    import numpy as np

    from ganprint import benchmark as B
    from ganprint.artifacts import read_artifact
    from ganprint.attacks import AttackContext, attack_names, run_attack
    from ganprint.conformal import bh_flags, conformal_pvalues
    from ganprint.errors import GanprintError

    run = Path(args.run)
    truth = B.read_truth(run / "data")
    attacks = [a for a in args.attacks.split(",") if a] or attack_names()
    skipped: set[str] = set()
    results = []
    t0 = time.perf_counter()
    for test_path in sorted((run / "work").glob("*_testnull.safetensors")):
        space = test_path.name[: -len("_testnull.safetensors")]
        test = read_artifact(str(test_path)[: -len(".safetensors")], kind="embeddings")
        te = test.tensor("embeddings")
        gen = te[_subset(test, "generated")]
        ids = test.table["image_id"].astype(str).to_numpy()
        test_neg = [i for i in _subset(test, "real_unknown") if truth.get(ids[i]) == 0]
        # the known non-members embedded with the test images (the dev ones, and the reference pool
        # when synth made one), and the test images whose truth is 0
        pool = np.concatenate([te[_subset(test, "real_not_used")].numpy(), te[test_neg].numpy()])
        rng = np.random.default_rng(args.seed)
        anyflag = {a: 0 for a in attacks}
        flags_total = {a: 0 for a in attacks}
        half = args.queries or len(pool) // 2
        if not 0 < half < len(pool):
            raise SystemExit(f"--queries {half}: must be between 1 and {len(pool) - 1}")
        small = {a: 0 for a in attacks}
        for _ in range(args.splits):
            perm = rng.permutation(len(pool))
            ctx = AttackContext.from_embeddings(gen, pool[perm], k=10)
            for a in list(attacks):
                try:
                    sc = run_attack(a, ctx)
                except GanprintError:  # e.g. verified scores: not computable from embeddings alone
                    attacks.remove(a)
                    skipped.add(a)
                    continue
                p = conformal_pvalues(sc[:half], sc[half:])
                small[a] += int((p <= args.q).sum())
                f = bh_flags(p, args.q)
                anyflag[a] += int(f.any())
                flags_total[a] += int(f.sum())
        for a in attacks:
            results.append({"space": space, "attack": a, "splits": args.splits, "queries": half, "reference": len(pool) - half,
                            "share_any_flag": anyflag[a] / args.splits, "mean_flags": flags_total[a] / args.splits,
                            "share_p_le_q": small[a] / (args.splits * half)})
    from rich.console import Console
    from rich.table import Table

    t = Table("space", "attack", "splits", "queries / null", f"share with any flag at Q={args.q:g}", "mean flags",
              f"share of p <= {args.q:g}", title=f"pure null: {run.name}")
    for r in results:
        t.add_row(r["space"], r["attack"], str(r["splits"]), f"{r['queries']} / {r['reference']}",
                  f"{r['share_any_flag']:.3f}", f"{r['mean_flags']:.3f}", f"{r['share_p_le_q']:.3f}")
    Console(width=150).print(t)
    worst = max(r["share_any_flag"] for r in results) if results else None
    out = {"run": str(run), "q": args.q, "seed": args.seed, "results": results, "max_share_any_flag": worst,
           "skipped_attacks": sorted(skipped),
           "seconds": round(time.perf_counter() - t0, 1)}
    (Path(args.out) if args.out else run / "fdr_null.json").write_text(json.dumps(out, indent=2))
    print(json.dumps({"max_share_any_flag": worst, "seconds": out["seconds"]}), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
