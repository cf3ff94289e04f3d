"""``ganprint score``: predictions vs truth -> kappa, accuracy, precision, recall, F1, AUC, CIs."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ganprint.cli.options import handle_errors, print_json


def _fmt(v, digits: int = 3) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


@handle_errors
def score(
    predictions: str = typer.Argument(..., help="Submission CSV or scores artifact from `ganprint predict` (- reads the path from stdin)."),
    truth: Optional[str] = typer.Option(None, "--truth", "-t", help="CSV image_id,label or a labelled embeddings/similarity/scores "
                                                                    "artifact [default: the labels in the scores artifact]."),
    bootstrap: int = typer.Option(1000, "--bootstrap", help="Bootstrap resamples for the 95% CIs (0: none)."),
    seed: int = typer.Option(0, "--seed", help="Bootstrap seed."),
    max_fpr: float = typer.Option(0.01, "--max-fpr", help="FPR for the TPR-at-low-FPR metric."),
    plot: Optional[Path] = typer.Option(None, "--plot", help="Write ROC + per-class score histograms to this PNG."),
    header: bool = typer.Option(False, "--header", help="PREDICTIONS is a CSV in the seed's variant (header line "
                                                        "original_image,label; ids may keep their extension)."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Score predictions against the truth (Cohen's kappa first; AUC and CIs say how sure)."""
    from ganprint.artifacts import resolve_artifact_arg
    from ganprint.metrics import run_score

    if "-" in (predictions, truth):
        from ganprint.similarity import preload

        preload("sklearn.metrics")  # import while the upstream stage still runs

    pred = str(resolve_artifact_arg(predictions)) if predictions == "-" else predictions
    tru = str(resolve_artifact_arg(truth)) if truth == "-" else truth
    res = run_score(pred, tru, bootstrap=bootstrap, seed=seed, max_fpr=max_fpr, plot=plot, header=header)
    if as_json:
        print_json(res)
        return
    from rich.console import Console
    from rich.table import Table

    def ci(key):
        v = res.get(key)
        return "-" if v is None else f"[{v[0]:.3f}, {v[1]:.3f}]"

    title = f"{res['n']} images: {res['n_pos']} members, {res['n_neg']} non-members; {res['n_pred_pos']} predicted 1"
    t = Table("metric", "value", "95% CI", title=title)
    t.add_row("Cohen's kappa", _fmt(res["kappa"]), ci("kappa_ci"))
    t.add_row("accuracy", _fmt(res["accuracy"]), "")
    t.add_row("precision", _fmt(res["precision"]), "")
    t.add_row("recall", _fmt(res["recall"]), "")
    t.add_row("F1", _fmt(res["f1"]), "")
    t.add_row("ROC AUC", _fmt(res["auc"]), ci("auc_ci"))
    t.add_row(f"TPR at {res['max_fpr'] * 100:g}% FPR", _fmt(res["tpr_at_fpr"]), "")
    target = f" (target {res['fdr_target']:g})" if res.get("fdr_target") is not None else ""
    t.add_row(f"realised FDR{target}", _fmt(res.get("fdr_realised")), "")
    if res.get("nested") and res["nested"].get("auc_mean") is not None:
        n = res["nested"]
        t.add_row(f"nested-CV AUC estimate ({res.get('chosen')})", _fmt(n["auc_mean"]),
                  "-" if not n.get("auc_ci") else f"[{n['auc_ci'][0]:.3f}, {n['auc_ci'][1]:.3f}]")
        if n.get("signal_p") is not None:
            t.add_row("dev membership signal (out-of-fold rank test p)", f"{n['signal_p']:.2g}",
                      "significant" if n.get("signal") else "not significant: the choice is a guess")
    console = Console()
    console.print(t)
    if res["bootstrap"]:
        console.print(f"CIs: {res['bootstrap']} bootstrap resamples, seed {res['seed']}", highlight=False)


def register(app: typer.Typer) -> None:
    app.command("score")(score)
