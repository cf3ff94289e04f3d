"""How much of "the best single row" is selection noise?  A label-permutation test per run.

On each run of ``bench/quality.py --auto`` (its OUT/<run>/work similarity artifacts and
OUT/<run>/data synth truth), the test labels are permuted over *patients* (both slices of a
phantom patient keep one label, as in the synth split), many times.  Under permuted labels no row
carries membership signal, yet the maximum over the run's single rows of their test AUCs is well
above 0.5: that maximum is what "best single row" measures when there is no signal to find.  Per run:

- ``best``: the best single row's test AUC (chosen on the test labels), ``median``: the median row;
- ``perm max``: mean and 95th percentile over permutations of the maximum over rows, and the
  permutation p-value of the observed best (is the best row better than the best of noise?);
- ``auto``: predict --attack auto's test AUC and its dev signal test (out-of-fold rank test p,
  ganprint.select); ``P0(auto >= max - 0.03)``: under permuted labels, the share of permutations in
  which auto's AUC reaches the maximum row's minus 0.03, i.e. how often the acceptance bar
  "auto >= best - 0.03" can be met when there is nothing to select;
- ``auto, best candidate alone``: the same selection with Occam's window off
  (``SelectConfig(window=False)``), on the same artifacts.

Per regime x generator it prints the means over the runs, and the best fixed row over the
generalize runs (the best any choice blind to the dev labels could have done, chosen on the test labels).

    python bench/selection_noise.py bench/out/auto/generalize-*          # runs of quality.py --auto
    python bench/selection_noise.py bench/out/auto/* --perms 2000 --out bench/out/auto/noise.json

The single rows are the run's distinct (feature space, attack) candidates (a verified space
contributes only its verify_* rows, as in quality.py's table).  Deterministic for --seed.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def _pairs(work: Path) -> tuple[list[str], list[str]]:
    """(test sims, dev sims) of a run's work folder, paired by feature space."""
    tests = sorted(p.name[: -len("_test_sim.safetensors")] for p in work.glob("*_test_sim.safetensors"))
    devs = {p.name[: -len("_dev_sim.safetensors")] for p in work.glob("*_dev_sim.safetensors")}
    missing = [t for t in tests if t not in devs]
    if not tests or missing:
        raise SystemExit(f"Error: {work}: no test/dev similarity pairs{' for ' + ', '.join(missing) if missing else ''}; "
                         "run bench/quality.py --auto with this OUT first")
    return [str(work / f"{t}_test_sim") for t in tests], [str(work / f"{t}_dev_sim") for t in tests]


def single_rows(cands, test_ids, wanted):
    """(names, S [M, C]) of the distinct single rows on the test images ``wanted`` (ids, in order)."""
    import numpy as np

    pos = {i: n for n, i in enumerate(test_ids)}
    rows = np.asarray([pos[i] for i in wanted], dtype=np.int64)
    names, cols, seen = [], [], set()
    for c in cands:
        space, attack = c.name.rsplit("/", 1)
        if "+verify(" in space and not attack.startswith("verify"):
            continue  # the shortlist space's own attacks again
        col = np.asarray(c.test, dtype=np.float64)[rows]
        key = np.round(col, 12).tobytes()
        if key in seen:
            continue
        seen.add(key)
        names.append(c.name)
        cols.append(col)
    return names, np.column_stack(cols)


def analyse(run: Path, perms: int, seed: int, bar: float = 0.03) -> dict:
    import numpy as np

    from ganprint.benchmark import read_truth
    from ganprint.candidates import collect, load_spaces
    from ganprint.predict import predict_auto
    from ganprint.select import SelectConfig, _auc_columns

    tag = run.name
    run_seed = int(tag.rsplit("-s", 1)[1]) if "-s" in tag else 0
    tests, devs = _pairs(run / "work")
    truth = read_truth(run / "data")
    patient = {im["image_id"]: im["patient"] for im in json.loads((run / "data" / "synth.json").read_text())["images"]}
    pred = predict_auto(tests, devs, config=SelectConfig(seed=run_seed))
    ids = [i for i in pred.image_ids if i in truth]
    auto = np.asarray(pred.scores, dtype=np.float64)[[pred.image_ids.index(i) for i in ids]]
    # the same selection without Occam's window: the best candidate alone
    alone = predict_auto(tests, devs, config=SelectConfig(seed=run_seed, window=False), nested=False)
    auto_alone = np.asarray(alone.scores, dtype=np.float64)[[alone.image_ids.index(i) for i in ids]]
    spaces, test_ids, _ = load_spaces(tests, devs)
    cands, _ = collect(spaces)
    names, S = single_rows(cands, test_ids, ids)
    y = np.asarray([truth[i] for i in ids], dtype=np.int64)
    obs = _auc_columns(y, S)
    a_auto = float(_auc_columns(y, auto[:, None])[0])
    pats, inv = np.unique([patient[i] for i in ids], return_inverse=True)
    plab = np.zeros(len(pats), dtype=np.int64)
    plab[inv] = y
    if not all(len(set(y[inv == k])) == 1 for k in range(len(pats))):
        raise SystemExit(f"Error: {run}: a patient holds members and non-members; the permutation needs one label per patient")
    rng = np.random.default_rng(seed)
    mx, au = np.empty(perms), np.empty(perms)
    SA = np.column_stack([S, auto])
    for b in range(perms):
        a = _auc_columns(rng.permutation(plab)[inv], SA)
        mx[b], au[b] = a[:-1].max(), a[-1]
    nest = pred.selection["nested"]
    best = int(np.argmax(obs))
    return {
        "run": tag, "rows": len(names), "n_test": int(len(y)), "patients": int(len(pats)),
        "best_single": names[best], "best_single_auc": float(obs[best]), "median_auc": float(np.median(obs)),
        "perm_max_mean": float(mx.mean()), "perm_max_q95": float(np.quantile(mx, 0.95)),
        "p_best_vs_perm_max": float((1 + (mx >= obs[best]).sum()) / (1 + perms)),
        "auto_choice": pred.selection["chosen"], "auto_auc": a_auto,
        "alone_choice": alone.selection["chosen"], "alone_auc": float(_auc_columns(y, auto_alone[:, None])[0]),
        "nested_auc": nest.get("auc_mean"), "nested_auc_ci": nest.get("auc_ci"), "signal_p": nest.get("signal_p"),
        "auto_ok_best": bool(a_auto >= obs[best] - bar),
        "p0_auto_meets_bar": float(np.mean(au >= mx - bar)), "p0_mean_max_minus_auto": float(np.mean(mx - au)),
        "perms": perms, "seed": seed, "bar": bar,
        "row_aucs": {n: float(a) for n, a in zip(names, obs)},
    }


def _by_regime(rows: list[dict]) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for r in rows:
        out.setdefault(r["run"].rsplit("-s", 1)[0], []).append(r)
    return out


def _best_fixed_row(rows: list[dict]) -> dict | None:
    """The one row whose mean test AUC over the runs is highest: the best any fixed prior choice,
    blind to the dev labels, could have done (an upper bound, chosen on the test labels)."""
    import numpy as np

    common = set.intersection(*(set(r["row_aucs"]) for r in rows)) if rows else set()
    if not common:
        return None
    means = {n: float(np.mean([r["row_aucs"][n] for r in rows])) for n in common}
    name = max(sorted(means), key=means.get)
    return {"name": name, "mean_auc": means[name], "mean_best": float(np.mean([r["best_single_auc"] for r in rows])),
            "mean_auto": float(np.mean([r["auto_auc"] for r in rows]))}


def markdown(rows: list[dict]) -> str:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from quality import num as f

    out = ["| run | rows | best single row (test AUC) | median | max over rows, permuted labels: mean [95%] | p (best vs permuted max) "
           "| auto test AUC | auto, best candidate alone | dev signal p | auto ≥ best − 0.03 | P₀(auto ≥ max − 0.03) |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r['run']} | {r['rows']} | {r['best_single']} ({f(r['best_single_auc'])}) | {f(r['median_auc'])} | "
                   f"{f(r['perm_max_mean'])} [{f(r['perm_max_q95'])}] | {r['p_best_vs_perm_max']:.3g} | {f(r['auto_auc'])} | "
                   f"{f(r.get('alone_auc'))} | {r['signal_p']:.2g} | {'yes' if r['auto_ok_best'] else 'no'} | "
                   f"{f(r['p0_auto_meets_bar'], 2)} |")
    return "\n".join(out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+", type=Path, help="run folders of bench/quality.py --auto (OUT/<regime>-<gen>-s<seed>)")
    ap.add_argument("--perms", type=int, default=2000, help="label permutations per run")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None, help="JSON file for the results (default: print only)")
    args = ap.parse_args()
    import numpy as np

    rows = []
    for run in args.runs:
        if not (run / "work").is_dir():
            continue
        r = analyse(run, args.perms, args.seed)
        print(json.dumps(r), file=sys.stderr, flush=True)
        rows.append(r)
    print(markdown(rows))
    for key, rs in _by_regime(rows).items():
        m = {k: float(np.mean([r[k] for r in rs])) for k in ("best_single_auc", "auto_auc", "alone_auc")}
        print(f"{key}: {len(rs)} runs, mean best single row {m['best_single_auc']:.3f}, auto {m['auto_auc']:.3f} "
              f"(≥ best − 0.03: {'yes' if m['auto_auc'] >= m['best_single_auc'] - 0.03 else 'no'}), "
              f"best candidate alone {m['alone_auc']:.3f}")
    fixed = _best_fixed_row([r for r in rows if r["run"].startswith("generalize")])
    if fixed:
        print(f"\nbest fixed row over the generalize runs (chosen on their test labels): {fixed['name']}, mean test AUC "
              f"{fixed['mean_auc']:.3f}; mean best single row {fixed['mean_best']:.3f}; mean auto {fixed['mean_auto']:.3f}")
    if args.out:
        args.out.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
