"""`ganprint audit` on synthetic benchmarks with known truth: verdicts, test accuracy, and (copies
regime) whether the evidence gallery's top cards are real replicas with their transform recovered.

    .venv/bin/python bench/audit_regimes.py ROOT [ROOT ...] [--backbone B ...] [--top 6]

Each ROOT is a `ganprint synth` output (dev/, test/, test_truth.csv, replicas.csv when it has
replicas). For each: the audit's verdict; AUC / kappa of its test scores and labels against
test_truth.csv; flags and how many of them are members; with replicas.csv: of the top ``--top``
gallery cards, how many are verified copies, how many show a member whose replica is among the
card's matches, how many of
those have a recovered transform, and the recovered rotation beside the true one.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("roots", nargs="+", type=Path)
    ap.add_argument("--backbone", action="append", default=None)
    ap.add_argument("--top", type=int, default=6)
    ap.add_argument("--out", type=Path, default=Path("bench/out/audit_regimes"))
    a = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import numpy as np
    import pandas as pd

    from ganprint.audit import DEFAULT_BACKBONES, AuditOptions, resolve_inputs, run_audit
    from ganprint.benchmark import read_truth
    from ganprint.metrics import evaluate

    from ganprint.progress import log

    a.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for root in a.roots:
        run = a.out / root.name
        res = run_audit(run, resolve_inputs(root), AuditOptions(backbones=tuple(a.backbone or DEFAULT_BACKBONES)),
                        progress=False, log=log)
        rep = res.report
        truth = read_truth(root)
        df = pd.read_parquet(run / "scores.parquet")
        unk = df[df.role == "unknown"]
        y = np.array([truth[i] for i in unk.image_id])
        m = evaluate(y, unk.label_pred.to_numpy(), unk.score.to_numpy(), bootstrap=500)
        fl = unk.flag.to_numpy(dtype=bool)
        vc = unk.verified_copy.to_numpy(dtype=bool) if "verified_copy" in unk else np.zeros(len(unk), dtype=bool)
        row = {"root": str(root), "verdict": rep["verdict"], "chosen": rep["selection"]["chosen"],
               "test_auc": m["auc"], "test_auc_ci": m["auc_ci"], "test_kappa": m["kappa"],
               "flagged": int(fl.sum()), "flagged_members": int((fl & (y == 1)).sum()),
               "verified_copies": int(vc.sum()), "verified_copies_members": int((vc & (y == 1)).sum()),
               "copy_test": rep["datacopy"].get("copy_test"), "copying": rep.get("copying"),
               "ct_z": rep["datacopy"]["ct"]["z"], "ct_p": rep["datacopy"]["ct"]["p"],
               "memorisation": rep["datacopy"]["memorisation"]["rate"], "report": str(res.html)}
        rep_csv = root / "replicas.csv"
        if rep_csv.exists():
            reps = list(csv.DictReader(open(rep_csv)))
            by_src: dict[str, list[dict]] = {}
            for r in reps:
                by_src.setdefault(r["source_id"], []).append(r)
            top = rep["gallery"][:a.top]
            row["top_cards_verified_copy"] = sum(c.get("evidence") == "verified copy" for c in top)
            hits, with_tr, rot = 0, 0, []
            for c in top:
                mine = {r["image_id"]: r for r in by_src.get(c["image_id"], [])}
                match = next((mm for mm in c["matches"] if mm["generated"] in mine), None)
                if match is None:
                    continue
                hits += 1
                if match.get("transform") or match.get("alignment"):
                    with_tr += 1
                    ang = []
                    for t in (match.get("transform"), (match.get("alignment") or {}).get("warp")):
                        ang.append(None if not t else round(math.degrees(math.atan2(-t[3], t[0])), 1))
                    rot.append({"verified": ang[0], "aligned": ang[1],
                                "true": round(float(mine[match["generated"]]["rotation_deg"]), 1)})
            row.update({"top_cards": len(top), "top_cards_replica": hits, "top_cards_with_transform": with_tr,
                        "rotation_deg": rot,
                        "test_members_with_replica": sum(1 for i, v in truth.items() if v == 1 and i in by_src)})
        rows.append(row)
        print(json.dumps(row, indent=1, default=float))
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "results.json").write_text(json.dumps(rows, indent=2, default=float))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
