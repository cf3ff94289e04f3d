"""``ganprint demo``: an end-to-end run on data made or shipped with the dependencies."""

from __future__ import annotations

import time
from pathlib import Path

import typer

from ganprint.cli.options import handle_errors, print_json


@handle_errors
def demo(
    out: Path = typer.Option(Path("demo-out"), "--out", "-o", help="Folder for the demo's dataset, artifacts, tables and plot."),
    dicom: bool = typer.Option(False, "--dicom", help="Instead: nearest neighbours of real DICOM images (pydicom-data) and their flips."),
    bootstrap: int = typer.Option(500, "--bootstrap", help="Bootstrap resamples for the 95% CIs."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON rows instead of a table."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars."),
) -> None:
    """synth -> embed (efficientnet_lite0, pixels) -> simmatrix -> every attack calibrated on dev
    -> predict on test -> score; prints one table (κ, AUC, TPR@1%FPR) and leaves a plot; ends with
    `ganprint audit` of the same benchmark and prints its report's path."""
    from rich.console import Console
    from rich.table import Table

    from ganprint import demo as D
    from ganprint.progress import log

    out.mkdir(parents=True, exist_ok=True)
    console = Console(width=max(Console().width, 150))
    if dicom:
        rows = D.dicom_neighbours(out, progress=not quiet)
        if as_json:
            print_json(rows)
            return
        t = Table("image", "modality", "nearest neighbour", "cosine", "rank of own flip",
                  title="nearest neighbours, efficientnet_lite0 features (real DICOM from pydicom-data)")
        for r in rows:
            t.add_row(r["image"], r["modality"], r["nearest"], f"{r['cosine']:.3f}", str(r["flip_rank"]))
        console.print(t)
        return
    from ganprint import benchmark as B

    t0 = time.perf_counter()
    res = D.full_demo(out, bootstrap=bootstrap, progress=not quiet, log=None if quiet else log)
    if as_json:
        print_json([B.public(r) for r in res["rows"]])
        return
    console.print(B.format_table(res["rows"], title="membership inference on a synthetic benchmark (memorize regime), test split"))
    b = res["best"]
    log(f"best AUC: {b['features']} / {b['attack']} = {b['auc']:.3f}; plot {res['plot']}; "
        f"tables {out / 'results.md'}; {time.perf_counter() - t0:.0f}s")
    if res.get("audit") is not None:
        a, m = res["audit"], res["audit_test"]
        console.print(f"audit: {a.report['verdict']}")
        console.print(f"audit on the test split vs truth: AUC {m['auc']:.3f}, κ {m['kappa'] or 0:.3f}; "
                      f"{m['flagged']} flagged, {m['flagged_members']} of them members")
        console.print(f"audit report: {a.html}")


def register(app: typer.Typer) -> None:
    app.command("demo")(demo)
