"""``ganprint audit``: embed -> simmatrix -> every attack -> selection -> p-values/FDR -> report."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer

from ganprint.cli.options import DEVICE_HELP, WEIGHTS_HELP, complete_backbone, handle_errors, parse_fraction, print_json


@handle_errors
def audit(
    data: Optional[Path] = typer.Argument(None, help="ImageCLEF root: dev/{generated,real_used,real_not_used}/ and optionally test/{generated,real_unknown}/."),
    out: Path = typer.Option(..., "--out", "-o", help="Run folder: submission.csv, scores.parquet, report.json, report.html, figures/."),
    generated: Optional[Path] = typer.Option(None, "--generated", "-g", help="Instead of DATA: folder of the generator's images."),
    members: Optional[Path] = typer.Option(None, "--members", "-m", help="Folder of real images known to be in the training set."),
    non_members: Optional[Path] = typer.Option(None, "--non-members", "-n", help="Folder of real images known not to be (the reference)."),
    unknown: Optional[Path] = typer.Option(None, "--unknown", "-u", help="Folder of real images to label."),
    backbone: Optional[list[str]] = typer.Option(None, "--backbone", "-b", help="Feature space (repeatable) [default: pixels, efficientnet_lite0].", autocompletion=complete_backbone),
    weights: Optional[str] = typer.Option(None, "--weights", help=WEIGHTS_HELP),
    fdr: float = typer.Option(0.1, "--fdr", help="Benjamini-Hochberg level for the flags."),
    null_fraction: str = typer.Option("auto", "--null-fraction", help="Share of the known non-members held out of selection as the unknown images' p-value null, in [0, 1); auto: 0.5."),
    decision: str = typer.Option("calibrate", "--decision", help="Submission labels: calibrate (kappa cut on the labelled images) or fdr (the flags)."),
    folds: int = typer.Option(5, "--folds", help="Cross-validation folds."),
    repeats: int = typer.Option(4, "--repeats", help="Inner cross-validation repeats (the nested, outer CV uses half as many)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the CV splits, k-means and bootstraps."),
    bootstrap: int = typer.Option(500, "--bootstrap", help="Bootstrap resamples for the CIs."),
    gallery: int = typer.Option(12, "--gallery", help="Cards in the evidence gallery."),
    verify: bool = typer.Option(True, "--verify/--no-verify", help="SIFT + RANSAC verification of each real image's shortlist, and ECC-aligned copy evidence (candidates, verified copies, memorisation rate, gallery)."),
    verify_k: int = typer.Option(50, "--verify-k", help="Shortlist size (by global similarity) verified per real image."),
    copy_k: int = typer.Option(10, "--copy-k", help="Nearest generated images per real image and feature space aligned (ECC) for the copy evidence."),
    device: str = typer.Option("auto", "--device", help=DEVICE_HELP),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress on stderr."),
) -> None:
    """The whole audit in one command; prints the report's path (or --json the summary)."""
    from ganprint.audit import DEFAULT_BACKBONES, AuditOptions, resolve_inputs, run_audit, summary
    from ganprint.progress import log

    inputs = resolve_inputs(data, generated=generated, members=members, non_members=non_members, unknown=unknown)
    opts = AuditOptions(backbones=tuple(backbone or DEFAULT_BACKBONES), fdr=fdr, folds=folds, repeats=repeats, seed=seed,
                        bootstrap=bootstrap, gallery=gallery, decision=decision, device=device, weights=weights,
                        verify=verify, verify_k=verify_k, copy_k=copy_k,
                        null_fraction=parse_fraction(null_fraction))
    res = run_audit(out, inputs, opts, progress=not quiet, log=None if quiet else log,
                    command="ganprint " + " ".join(sys.argv[1:]))
    if as_json:
        print_json(summary(res))
        return
    if not quiet:
        log(res.report["verdict"])
    typer.echo(str(res.html))


def register(app: typer.Typer) -> None:
    app.command("audit")(audit)
