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

Automatic selection (`--auto`, issue 12): every regime x generator x seed
(`--regimes memorize,balanced,generalize,copies --generators dcgan --seeds 0,1,2`), each in
OUT/<regime>-<generator>-s<seed>/.  Each synth data set has a reference pool of known non-members
of its own patients (`synth --reference-real`, `--reference 200`; 0: none).  The test embeddings
hold the dev real_not_used images and that pool too (`embed TEST DEV/real_not_used
REF/real_not_used`): known non-members scored in the same context as the test images, so every
test scores artifact has conformal p-values; they are not predicted.  With a pool, the pool is the
null and selection uses every dev image (`--null-fraction auto`); without, half the dev
non-members are held out of selection to be the null.  Verified candidates (`--auto-verify`,
default register16,register32): the shortlist of `--verify-shortlist` (default pixels_aligned,
raw pixels in a canonical pose) re-scored by `simmatrix --verify`.
Rows: every (feature space, attack) calibrated on dev, the seed's rule, and `auto`
(`predict --attack auto` over all of them: chosen by repeated stratified CV on dev, its
nested-CV estimate printed beside the test value); FDR: BH at Q = 0.1 on the auto p-values,
realised FDR and recall on test.  Writes OUT/auto.md / OUT/auto.json with the per-run table and
the acceptance summary (auto >= best single row - 0.03; >= median row + 0.05 where a row
reaches 0.6; how often the test AUC falls inside the nested-CV CI; realised FDR <= 0.1).
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


# ---------------------------------------------------------------------------------------------
# automatic selection over regime x generator x seed


def _synth_cached(root: Path, overrides: dict, progress: bool) -> None:
    """Build the dataset unless ``root`` holds one made with the same parameters (fields added to
    the synth config since, at their defaults, do not invalidate it)."""
    from dataclasses import asdict, fields

    from ganprint.synth.dataset import SynthConfig, resolve_config, run_synth

    cfg = asdict(resolve_config(**overrides))
    meta = root / "synth.json"
    if meta.exists():
        try:
            old = json.loads(meta.read_text()).get("config") or {}
        except ValueError:
            old = {}
        defaults = {f.name: f.default for f in fields(SynthConfig)}
        new = json.loads(json.dumps(cfg))
        if old and all(old.get(k, defaults.get(k)) == v for k, v in new.items() if k in old or k in defaults):
            return
    run_synth(root, resolve_config(**overrides), force=True, progress=progress)


def null_inputs(root: Path) -> dict[str, list[str]]:
    """The folders embedded per split: dev, and test with the known non-members added (the dev
    non-members, and the reference pool when synth made one: the null for p-values, scored in the
    same context as the test images; predict leaves them out of its output)."""
    test = [str(root / "test"), str(root / "dev" / "real_not_used")]
    if (root / "reference" / "real_not_used").is_dir():
        test.append(str(root / "reference" / "real_not_used"))
    return {"dev": [str(root / "dev")], "test": test}


def _embed_with_null(root: Path, work: Path, bb: str, progress: bool):
    from ganprint.benchmark import FeatureSet, add_similarity
    from ganprint.embed import run_embed

    work.mkdir(parents=True, exist_ok=True)
    dirs = null_inputs(root)
    dev = run_embed(dirs["dev"], work / f"{bb}_dev", backbone=bb, progress=progress).base
    test = run_embed(dirs["test"], work / f"{bb}_testnull", backbone=bb, progress=progress).base
    return add_similarity(FeatureSet(bb, dev, test), work)


def _auto_row(sets, truth: dict, bootstrap: int, q: float, seed: int) -> dict:
    import numpy as np

    from ganprint.conformal import bh_flags, realised_fdr
    from ganprint.metrics import evaluate
    from ganprint.predict import predict_auto
    from ganprint.select import SelectConfig

    t = time.perf_counter()
    pred = predict_auto([fs.test_sim for fs in sets], [fs.dev_sim for fs in sets], config=SelectConfig(seed=seed))
    secs = time.perf_counter() - t
    keep = [i for i, x in enumerate(pred.image_ids) if x in truth]
    y = np.array([truth[pred.image_ids[i]] for i in keep])
    m = evaluate(y, np.asarray(pred.labels)[keep], np.asarray(pred.scores)[keep], bootstrap=bootstrap, seed=0)
    sel = pred.selection
    nest = sel["nested"]
    row = {
        "features": "auto(" + "+".join(fs.name for fs in sets) + ")", "attack": sel["chosen"],
        "rule": "auto: CV-chosen, dev cut", "n": m["n"], "kappa": m["kappa"], "kappa_ci": m.get("kappa_ci"),
        "auc": m["auc"], "auc_ci": m.get("auc_ci"), "tpr_at_1fpr": m["tpr_at_fpr"], "accuracy": m["accuracy"],
        "dev_kappa": None, "threshold": pred.decision.threshold,
        "nested_auc": nest["auc_mean"], "nested_auc_ci": nest["auc_ci"], "nested_kappa": nest["kappa_mean"],
        "nested_kappa_ci": nest["kappa_ci"], "nested_choices": nest["choice_counts"], "reason": sel["reason"],
        "signal_p": nest.get("signal_p"),
        "auto_seconds": round(secs, 1),
    }
    split = sel.get("calibration_split") or {}
    row["calibration_split"] = {k: split.get(k) for k in ("fraction", "seed", "n_null", "n_calibration",
                                                          "n_selection", "n_selection_nonmembers")}
    if pred.pvalues is not None:
        import math

        flags = bh_flags(np.asarray(pred.pvalues)[keep], q)
        fdr, recall = realised_fdr(flags, y)
        n_null = int(pred.pvalue_info["n_null"])
        # BH flags k of n images only if 1/(n_null + 1) <= k q / n: the fewest flags it can make at all
        row.update({"fdr_q": q, "fdr_realised": fdr, "fdr_recall": recall, "fdr_flagged": int(flags.sum()),
                    "pvalue_null": pred.pvalue_info, "bh_min_flags": math.ceil(len(keep) / (q * (n_null + 1)) - 1e-9)})
    return row


def run_auto(regime: str, generator: str, seed: int, out: Path, args) -> dict:
    import numpy as np

    from ganprint import benchmark as B

    tag = f"{regime}-{generator}-s{seed}"
    root, work = out / tag / "data", out / tag / "work"
    t = time.perf_counter()
    synth = {"regime": regime, "seed": seed, **args.synth}
    if generator != "dcgan":
        synth["generator"] = generator
    if args.reference:
        synth["reference_real"] = args.reference
    _synth_cached(root, synth, progress=not args.quiet)
    timings = {"synth": time.perf_counter() - t}
    truth = B.read_truth(root)
    rows, sets = [], []
    for i, bb in enumerate(args.backbones):
        t = time.perf_counter()
        fs = _embed_with_null(root, work, bb, progress=not args.quiet)
        sets.append(fs)
        rows += B.attack_rows(fs, truth, seed_rule=(i == 0), bootstrap=args.bootstrap)
        timings[f"embed+attacks {bb}"] = time.perf_counter() - t
    shortlist = next((fs for fs in sets if fs.name == args.verify_shortlist), sets[-1])
    for kind in args.auto_verify:  # verified candidates: the shortlist re-scored (issue 11)
        t = time.perf_counter()
        vfs = B.add_verified(shortlist, root, work, kind, k=args.verify_k, progress=not args.quiet,
                             inputs=null_inputs(root))
        sets.append(vfs)
        rows += B.attack_rows(vfs, truth, ["verify_max", "verify_cal"], bootstrap=args.bootstrap)
        timings[f"verify {kind}"] = time.perf_counter() - t
    auto = _auto_row(sets, truth, args.bootstrap, args.fdr, seed)
    timings["auto"] = auto["auto_seconds"]
    rows.append(auto)
    singles = [r["auc"] for r in rows if r["rule"] == "dev-calibrated" and r["auc"] is not None]
    best, median = float(np.max(singles)), float(np.median(singles))
    ci = auto["nested_auc_ci"]
    summary = {
        "run": tag, "regime": regime, "generator": generator, "seed": seed, "rows": len(singles),
        "best_single_auc": best, "best_single": next(f"{r['features']}/{r['attack']}" for r in rows
                                                     if r["rule"] == "dev-calibrated" and r["auc"] == best),
        "median_auc": median, "auto_auc": auto["auc"], "auto_choice": auto["attack"],
        "nested_auc": auto["nested_auc"], "nested_auc_ci": ci, "signal_p": auto.get("signal_p"),
        "test_in_ci": bool(ci is not None and ci[0] <= auto["auc"] <= ci[1]),
        "est_minus_test": auto["nested_auc"] - auto["auc"],
        "auto_kappa": auto["kappa"], "nested_kappa": auto["nested_kappa"],
        "ok_best": auto["auc"] >= best - 0.03, "ok_median": (auto["auc"] >= median + 0.05) if best >= 0.6 else None,
        "fdr_realised": auto.get("fdr_realised"), "fdr_recall": auto.get("fdr_recall"),
        "fdr_flagged": auto.get("fdr_flagged"), "bh_min_flags": auto.get("bh_min_flags"),
        "n_null": (auto.get("pvalue_null") or {}).get("n_null"), "n_members_test": int(sum(truth.values())),
        "n_selection": auto["calibration_split"].get("n_selection"), "seconds": {k: round(v, 1) for k, v in timings.items()},
    }
    for r in rows:
        r["regime"] = tag
    return {"summary": summary, "rows": rows}


REGIME_ORDER = ("memorize", "copies", "balanced", "generalize")


def _ordered(summaries: list[dict]) -> list[dict]:
    """Runs in table order (regime, generator, seed), whatever order the invocations wrote them."""
    def key(s):
        r = s["regime"]
        return (REGIME_ORDER.index(r) if r in REGIME_ORDER else len(REGIME_ORDER), r, s["generator"], s["seed"])

    return sorted(summaries, key=key)


def num(v, nd: int = 3, sign: bool = False) -> str:
    """A table cell: ``v`` to ``nd`` decimals (``+`` shown with ``sign``), or — for None."""
    return "—" if v is None else (f"{v:+.{nd}f}" if sign else f"{v:.{nd}f}")


def _auto_markdown(summaries: list[dict]) -> str:
    f = num
    lines = ["| run | best single row (AUC) | median row AUC | auto: choice | auto AUC test | nested-CV AUC [95% CI] "
             "| dev signal p | auto κ test | nested κ | FDR@0.1 realised (recall, flagged) | null / fewest BH flags / members |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for s in _ordered(summaries):
        ci = s["nested_auc_ci"]
        lines.append(f"| {s['run']} | {s['best_single']} ({f(s['best_single_auc'])}) | {f(s['median_auc'])} | "
                     f"{s['auto_choice']} | {f(s['auto_auc'])} | {f(s['nested_auc'])}"
                     f"{'' if not ci else f' [{ci[0]:.2f}, {ci[1]:.2f}]'} | "
                     f"{'—' if s.get('signal_p') is None else format(s['signal_p'], '.2g')} | {f(s['auto_kappa'])} | "
                     f"{f(s['nested_kappa'])} | {f(s['fdr_realised'])} ({f(s['fdr_recall'], 2)}, {s['fdr_flagged']}) | "
                     f"{s.get('n_null')} / {s.get('bh_min_flags')} / {s.get('n_members_test')} |")
    return "\n".join(lines)


def _acceptance_markdown(acc: dict) -> str:
    """Per regime x generator (means over the seeds), the acceptance checks of issue 12."""
    f = num

    lines = ["| regime-generator | seeds | mean best single row | mean median row | mean auto | auto ≥ best − 0.03 (mean) "
             "| runs ≥ best − 0.03 | runs with dev signal (p < 0.01) | mean nested − test | test in nested CI "
             "| FDR 0.1: mean realised (mean recall) |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for key, a in acc.items():
        ok = "yes" if a["ok_best(mean)"] else "**no**"
        lines.append(f"| {key} | {','.join(str(x) for x in a['seeds'])} | {f(a['mean_best_single_auc'])} | "
                     f"{f(a['mean_median_auc'])} | {f(a['mean_auto_auc'])} | {ok} | {a['runs_ok_best']} | "
                     f"{a.get('runs_dev_signal(p<0.01)') or '—'} | {f(a['mean_est_minus_test'], sign=True)} | "
                     f"{a['test_in_nested_ci']} | {f(a['mean_fdr_realised'])} ({f(a['mean_fdr_recall'], 2)}) |")
    return "\n".join(lines)


def _acceptance(summaries: list[dict]) -> dict:
    """Per regime x generator, over seeds: mean AUCs and the acceptance checks."""
    import numpy as np

    groups: dict[str, list[dict]] = {}
    for s in _ordered(summaries):
        groups.setdefault(f"{s['regime']}-{s['generator']}", []).append(s)
    out = {}
    for key, ss in groups.items():
        best = float(np.mean([s["best_single_auc"] for s in ss]))
        med = float(np.mean([s["median_auc"] for s in ss]))
        auto = float(np.mean([s["auto_auc"] for s in ss]))
        fdrs = [s["fdr_realised"] for s in ss if s["fdr_realised"] is not None]
        recs = [s["fdr_recall"] for s in ss if s["fdr_recall"] is not None]
        out[key] = {
            "seeds": [s["seed"] for s in ss], "mean_best_single_auc": best, "mean_median_auc": med,
            "mean_auto_auc": auto, "mean_nested_auc": float(np.mean([s["nested_auc"] for s in ss])),
            "ok_best(mean)": auto >= best - 0.03,
            "ok_median(mean)": (auto >= med + 0.05) if max(s["best_single_auc"] for s in ss) >= 0.6 else None,
            "runs_ok_best": f"{sum(s['ok_best'] for s in ss)}/{len(ss)}",
            "test_in_nested_ci": f"{sum(s['test_in_ci'] for s in ss)}/{len(ss)}",
            "runs_dev_signal(p<0.01)": (None if all(s.get("signal_p") is None for s in ss) else
                                        f"{sum(s['signal_p'] < 0.01 for s in ss if s.get('signal_p') is not None)}/{len(ss)}"),
            "mean_est_minus_test": float(np.mean([s["est_minus_test"] for s in ss])),
            "mean_fdr_realised": float(np.mean(fdrs)) if fdrs else None,
            "mean_fdr_recall": float(np.mean(recs)) if recs else None,
        }
    return out


def _write_atomic(path: Path, text: str) -> None:
    """Whole file or the old one: a concurrent invocation may read it at any moment."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _merge(out: Path, mine: dict[str, dict]) -> tuple[list[dict], list[dict]]:
    """(summaries, rows): OUT/auto.json's runs that this invocation did not compute, then this
    invocation's ``mine`` ({run: {"summary", "rows"}})."""
    summaries, rows = [], []
    if (out / "auto.json").exists():
        old = json.loads((out / "auto.json").read_text())
        summaries = [x for x in old.get("runs", []) if x["run"] not in mine]
        rows = [r for r in old.get("rows", []) if r.get("regime") not in mine]
    for res in mine.values():
        summaries.append(res["summary"])
        rows += res["rows"]
    return summaries, rows


def main_auto(args) -> int:
    from rich.console import Console

    from ganprint import benchmark as B

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    console = Console(width=170)
    # runs of earlier (or concurrent) invocations into the same OUT are kept; a run this invocation
    # computes replaces theirs, and only those: the file is re-read before every write
    mine: dict[str, dict] = {}
    if args.fresh:
        (out / "auto.json").unlink(missing_ok=True)
    summaries, all_rows = _merge(out, mine)
    for regime in [r for r in args.regimes.split(",") if r]:
        for gen in [g for g in args.generators.split(",") if g]:
            for seed in args.seeds:
                res = run_auto(regime, gen, seed, out, args)
                mine[res["summary"]["run"]] = res
                summaries, all_rows = _merge(out, mine)
                console.print(B.format_table(res["rows"], title=f"{res['summary']['run']} (test split)"))
                print(json.dumps(res["summary"], default=float), file=sys.stderr)
                acc = _acceptance(summaries)
                _write_atomic(out / "auto.json", json.dumps({"runs": summaries, "acceptance": acc,
                                                             "rows": [B.public(r) for r in all_rows]},
                                                            indent=2, default=float))
                _write_atomic(out / "auto.md", _auto_markdown(summaries) + "\n\n" + _acceptance_markdown(acc) + "\n\n"
                              + B.markdown_table([B.public(r) for r in all_rows]) + "\n")
    console.print(_auto_markdown(summaries))
    console.print_json(json.dumps(_acceptance(summaries), default=float))
    print(f"wrote {out / 'auto.md'}", file=sys.stderr)
    return 0


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
    ap.add_argument("--backbones", default=None,
                    help="[default: efficientnet_lite0,pixels; with --auto efficientnet_lite0,pixels,pixels_aligned]")
    ap.add_argument("--out", default="bench/out/quality")
    ap.add_argument("--bootstrap", type=int, default=500)
    ap.add_argument("--no-train", action="store_true", help="skip the 'after train' rows")
    ap.add_argument("--preset", default="cpu-small", help="ganprint train preset for the 'after train' rows")
    ap.add_argument("--train-epochs", type=float, default=None)
    ap.add_argument("--synth", default="", help="synth overrides, e.g. size=64,gan_res=32,steps=200 (for quick runs)")
    ap.add_argument("--verify", default="", help="local features for verified rows (sift or orb; default: none)")
    ap.add_argument("--verify-k", type=int, default=50, help="candidates verified per real image (0: all)")
    ap.add_argument("--quiet", action="store_true")
    ap.add_argument("--auto", action="store_true", help="automatic-selection runs: regimes x generators x seeds")
    ap.add_argument("--generators", default="dcgan", help="--auto: synth generators, e.g. dcgan,ddpm")
    ap.add_argument("--seeds", default="0", help="--auto: synth seeds, e.g. 0,1,2")
    ap.add_argument("--fdr", type=float, default=0.1, help="--auto: BH level for the FDR columns")
    ap.add_argument("--fresh", action="store_true", help="--auto: forget the runs already in OUT/auto.json")
    ap.add_argument("--reference", type=int, default=200,
                    help="--auto: synth --reference-real: known non-members outside dev (the p-value null; 0: none, "
                         "then half the dev non-members are held out of selection to calibrate)")
    ap.add_argument("--verify-shortlist", default="pixels_aligned",
                    help="--auto: the feature space whose top-k the verified candidates re-score (one of --backbones)")
    ap.add_argument("--auto-verify", default="register16,register32",
                    help="--auto: verified candidates (simmatrix --verify of the shortlist), e.g. register16,sift; "
                         "empty: none")
    args = ap.parse_args()
    args.seeds = [int(v) for v in args.seeds.split(",") if v]
    if args.backbones is None:
        args.backbones = "efficientnet_lite0,pixels" + (",pixels_aligned" if args.auto else "")
    args.backbones = [b for b in args.backbones.split(",") if b]
    args.auto_verify = [v for v in args.auto_verify.split(",") if v]
    args.synth = {k: _synth_value(v) for k, v in (kv.split("=") for kv in args.synth.split(",") if kv)}

    if args.auto:
        return main_auto(args)
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
