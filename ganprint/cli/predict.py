"""``ganprint predict``: similarity artifact -> attack scores, 0/1 decisions, submission CSV."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ganprint.cli.options import handle_errors, print_json


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


@handle_errors
def predict(
    similarity: Optional[str] = typer.Argument(None, help="Similarity artifact from `ganprint simmatrix` (- reads the path from stdin)."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Scores artifact base path (OUT.safetensors, OUT.parquet)."),
    attack: str = typer.Option("max_sim", "--attack", "-a", help="Attack (see --list-attacks).", autocompletion=complete_attack),
    param: Optional[list[str]] = typer.Option(None, "--param", "-p", help="Attack parameter KEY=VALUE (repeatable)."),
    threshold: Optional[float] = typer.Option(None, "--threshold", help="Rule: label 1 iff score >= T (the seed: 0.6 on max_sim)."),
    calibrate: Optional[str] = typer.Option(None, "--calibrate", help="Rule: cut maximising Cohen's kappa on this labelled dev similarity artifact."),
    quantile: Optional[float] = typer.Option(None, "--quantile", help="Rule: label 1 the top (1-Q) fraction by score."),
    balanced: bool = typer.Option(False, "--balanced", help="Rule: label 1 the top half (= --quantile 0.5)."),
    submission: Optional[Path] = typer.Option(None, "--submission", "-s", help="Submission CSV path [default: OUT.csv]."),
    header: bool = typer.Option(False, "--header", help="Seed's variant: header line 'original_image,label' (the official format has none)."),
    no_csv: bool = typer.Option(False, "--no-csv", help="Write only the scores artifact."),
    list_attacks: bool = typer.Option(False, "--list-attacks", help="List the attacks and exit."),
    as_json: bool = typer.Option(False, "--json", help="Print a JSON summary instead of the artifact path."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No log line."),
) -> None:
    """Score every real image with an attack, decide 0/1, write scores + submission. Prints the scores artifact path."""
    from ganprint.errors import GanprintError

    if list_attacks:
        _list_attacks(as_json)
        return
    if similarity is None:
        raise GanprintError("missing SIMILARITY: pass the output of `ganprint simmatrix` (or - to read it from stdin)")
    if out is None:
        raise GanprintError("missing --out: where to write the scores artifact")
    from ganprint.artifacts import resolve_artifact_arg
    from ganprint.attacks import parse_params
    from ganprint.predict import run_predict
    from ganprint.progress import log

    if similarity == "-" and calibrate == "-":
        raise GanprintError("only one artifact can come from stdin (-)")
    if "-" in (similarity, calibrate):
        from ganprint.similarity import preload

        preload("sklearn.decomposition", "scipy.stats")  # import while the upstream stage still runs
    sim = resolve_artifact_arg(similarity)
    dev = resolve_artifact_arg(calibrate) if calibrate is not None else None
    params = parse_params(attack, param)
    res = run_predict(sim, out, attack, params, threshold=threshold, calibrate=dev, quantile=quantile,
                      balanced=balanced, submission=submission, header=header, write_csv=not no_csv)
    pred = res.prediction
    d = pred.decision
    summary = {"artifact": str(res.base), "submission": str(res.submission) if res.submission else None,
               "attack": attack, "params": pred.params, "rule": d.rule, "threshold": d.threshold,
               "quantile": d.quantile, "dev_kappa": d.dev_kappa, "n": len(pred.image_ids), "n_pred_pos": res.n_pos}
    if not quiet:
        msg = f"{attack}: {res.n_pos}/{len(pred.image_ids)} labelled 1 ({d.rule}, threshold {d.threshold:.6g}"
        if d.dev_kappa is not None:
            msg += f", dev kappa {d.dev_kappa:.3f} on {d.dev['n']} images"
        msg += ")"
        if res.submission:
            msg += f"; submission {res.submission}"
        log(msg)
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
