"""``ganprint predict``: similarity artifact(s) -> attack scores (or an automatic choice), 0/1 decisions, submission CSV."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ganprint.cli.options import handle_errors, parse_fraction, print_json


def complete_attack(incomplete: str) -> list[str]:
    from ganprint.attacks import attack_names

    return [n for n in attack_names() if n.startswith(incomplete)]


def _list_attacks(as_json: bool) -> None:
    from ganprint.attacks import ATTACKS

    rows = [{"name": s.name, "params": dict(s.params), "description": s.description, "citation": s.citation,
             "needs_embeddings": s.needs_embeddings, "uses_reference": s.uses_reference} for s in ATTACKS.values()]
    if as_json:
        print_json(rows)
        return
    from rich.console import Console
    from rich.table import Table

    t = Table("attack", "params", "description", "source")
    for r in rows:
        t.add_row(r["name"], ", ".join(f"{k}={v}" for k, v in r["params"].items()), r["description"], r["citation"])
    Console().print(t)


def _selection_lines(sel: dict) -> list[str]:
    """Human summary of an auto selection (stderr)."""
    nest = sel.get("nested") or {}
    lines = [f"auto: chose {sel['chosen']} ({sel['reason']}) from {len(sel['candidates'])} candidates on "
             f"{sel['n']} labelled images"]
    if nest.get("auc_mean") is not None:
        a_ci, k_ci = nest.get("auc_ci"), nest.get("kappa_ci")
        lines.append("nested-CV estimate of this choice: AUC {:.3f}{}, kappa {:.3f}{} ({} outer folds; chosen: {})".format(
            nest["auc_mean"], f" [{a_ci[0]:.2f}, {a_ci[1]:.2f}]" if a_ci else "",
            nest["kappa_mean"], f" [{k_ci[0]:.2f}, {k_ci[1]:.2f}]" if k_ci else "", nest["n_splits"],
            ", ".join(f"{k} x{v}" for k, v in (nest.get("choice_counts") or {}).items())))
        from ganprint.select import SIGNAL_ALPHA, signal_sentence

        lines.append(signal_sentence(nest.get("signal_p"), nest.get("signal_unit", "image"),
                                     nest.get("signal_alpha", SIGNAL_ALPHA)))
    return lines


@handle_errors
def predict(
    similarity: Optional[list[str]] = typer.Argument(None, help="Similarity artifact(s) from `ganprint simmatrix` (- reads "
                                                               "the path from stdin); several (one per feature space, same "
                                                               "real images) with --attack auto."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Scores artifact base path (OUT.safetensors, OUT.parquet)."),
    attack: str = typer.Option("max_sim", "--attack", "-a", help="Attack (see --list-attacks), or auto: choose among every "
                                                                 "attack x feature space by cross-validation on --calibrate.",
                               autocompletion=complete_attack),
    param: Optional[list[str]] = typer.Option(None, "--param", "-p", help="Attack parameter KEY=VALUE (repeatable)."),
    threshold: Optional[float] = typer.Option(None, "--threshold", help="Rule: label 1 iff score >= T (the seed: 0.6 on max_sim)."),
    calibrate: Optional[list[str]] = typer.Option(None, "--calibrate", help="Labelled dev similarity artifact (rule: cut "
                                                                           "maximising Cohen's kappa there); with --attack "
                                                                           "auto once per feature space."),
    quantile: Optional[float] = typer.Option(None, "--quantile", help="Rule: label 1 the top (1-Q) fraction by score."),
    balanced: bool = typer.Option(False, "--balanced", help="Rule: label 1 the top half (= --quantile 0.5)."),
    fdr: Optional[float] = typer.Option(None, "--fdr", help="Rule: flag images by Benjamini-Hochberg at false discovery "
                                                           "rate Q on conformal p-values (needs simmatrix --reference "
                                                           "or labelled non-members)."),
    seed: int = typer.Option(0, "--seed", help="--attack auto: seed of the cross-validation splits and of the "
                                               "selection / calibration split of the known non-members."),
    null_fraction: str = typer.Option("auto", "--null-fraction", help="--attack auto: share of the dev set's known "
                                                                   "non-members (embedded with the test images) held "
                                                                   "out of selection to calibrate the p-values, in "
                                                                   "[0, 1); auto: 0 when known non-members outside "
                                                                   "the dev set are embedded too (a reference pool), "
                                                                   "else 0.5."),
    submission: Optional[Path] = typer.Option(None, "--submission", "-s", help="Submission CSV path [default: OUT.csv]."),
    header: bool = typer.Option(False, "--header", help="Seed's variant: header line 'original_image,label' (the official format has none)."),
    no_csv: bool = typer.Option(False, "--no-csv", help="Write only the scores artifact."),
    list_attacks: bool = typer.Option(False, "--list-attacks", help="List the attacks and exit."),
    as_json: bool = typer.Option(False, "--json", help="Print a JSON summary instead of the artifact path."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No log line."),
) -> None:
    """Score every real image with an attack (or choose one: --attack auto), decide 0/1, write scores + submission. Prints the scores artifact path."""
    from ganprint.errors import GanprintError

    if list_attacks:
        _list_attacks(as_json)
        return
    sims = list(similarity or [])
    devs = list(calibrate or [])
    if not sims:
        raise GanprintError("missing SIMILARITY: pass the output of `ganprint simmatrix` (or - to read it from stdin)")
    if out is None:
        raise GanprintError("missing --out: where to write the scores artifact")
    auto = attack == "auto"
    if not auto and (len(sims) > 1 or len(devs) > 1):
        raise GanprintError(f"{len(sims)} similarity and {len(devs)} --calibrate artifacts: several feature spaces "
                            "need --attack auto")
    if auto and not devs:
        raise GanprintError("--attack auto needs labelled dev data: pass --calibrate DEV_SIM once per feature space")
    from ganprint.artifacts import resolve_artifact_arg
    from ganprint.predict import run_predict
    from ganprint.progress import log

    if (sims + devs).count("-") > 1:
        raise GanprintError("only one artifact can come from stdin (-)")
    if "-" in sims + devs:
        from ganprint.similarity import preload

        preload("sklearn.decomposition", "scipy.stats")  # import while the upstream stage still runs
    sim_args = [resolve_artifact_arg(a) for a in sims]
    dev_args = [resolve_artifact_arg(a) for a in devs]
    if auto:
        from ganprint.select import SelectConfig

        res = run_predict(sim_args, out, "auto", None, threshold=threshold, calibrate=dev_args, quantile=quantile,
                          balanced=balanced, fdr=fdr, config=SelectConfig(seed=seed), null_fraction=parse_fraction(null_fraction),
                          submission=submission,
                          header=header, write_csv=not no_csv)
    else:
        from ganprint.attacks import parse_params

        params = parse_params(attack, param)
        res = run_predict(sim_args[0], out, attack, params, threshold=threshold,
                          calibrate=dev_args[0] if dev_args else None, quantile=quantile, balanced=balanced, fdr=fdr,
                          submission=submission, header=header, write_csv=not no_csv)
    pred = res.prediction
    d = pred.decision
    summary = {"artifact": str(res.base), "submission": str(res.submission) if res.submission else None,
               "attack": attack, "params": pred.params, "rule": d.rule, "threshold": d.threshold,
               "quantile": d.quantile if d.rule != "fdr" else None, "fdr": d.quantile if d.rule == "fdr" else None,
               "dev_kappa": d.dev_kappa, "n": len(pred.image_ids), "n_pred_pos": res.n_pos,
               "pvalues": pred.pvalue_info}
    if pred.selection is not None:
        summary["selection"] = pred.selection
    if not quiet:
        if pred.selection is not None:
            for line in _selection_lines(pred.selection):
                log(line)
        what = pred.selection["chosen"] if pred.selection is not None else attack
        if d.rule == "fdr":
            msg = f"{what}: {res.n_pos}/{len(pred.image_ids)} flagged at FDR {d.quantile:g} (Benjamini-Hochberg on " \
                  f"conformal p-values, {pred.pvalue_info['n_null']} known non-members)"
        else:
            msg = f"{what}: {res.n_pos}/{len(pred.image_ids)} labelled 1 ({d.rule}, threshold {d.threshold:.6g}"
            if d.dev_kappa is not None:
                msg += f", dev kappa {d.dev_kappa:.3f} on {d.dev['n']} images"
            msg += ")"
        if res.submission:
            msg += f"; submission {res.submission}"
        log(msg)
        if d.rule == "fdr" and res.n_pos == 0 and pred.pvalue_info and pred.pvalue_info.get("n_null"):
            import math

            k = math.ceil(len(pred.image_ids) / (d.quantile * (pred.pvalue_info["n_null"] + 1)) - 1e-9)
            log(f"note: with {pred.pvalue_info['n_null']} known non-members as the null, BH at {d.quantile:g} flags "
                f"nothing unless at least {k} of the {len(pred.image_ids)} images score above every one of them; "
                "more known non-members buy power")
        if d.dev and d.dev.get("same_as_test"):
            log("[yellow]warning[/yellow]: calibrated on the images it labels: the dev kappa is optimistic; "
                "calibrate on a separate dev set to estimate performance")
        if d.rule == "threshold" and res.n_pos in (0, len(pred.image_ids)):
            log(f"[yellow]warning[/yellow]: --threshold {d.threshold} labels every image {int(res.n_pos > 0)}; "
                "kappa will be 0 (try --calibrate DEV or --balanced)")
    if as_json:
        print_json(summary)
    else:
        typer.echo(str(res.base))


def register(app: typer.Typer) -> None:
    app.command("predict")(predict)
