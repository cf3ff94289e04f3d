"""``ganprint demo``: an end-to-end run on data that ships with the dependencies."""

from __future__ import annotations

from pathlib import Path

import typer

from ganprint.cli.options import handle_errors, print_json


@handle_errors
def demo(
    out: Path = typer.Option(Path("demo-out"), "--out", "-o", help="Folder for the demo's artifacts."),
    backbone: str = typer.Option("efficientnet_lite0", "--backbone", "-b", help="Backbone for the DICOM demo."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON rows instead of a table."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars."),
) -> None:
    """Embed real DICOM images (pydicom-data) and their flips; print each image's nearest neighbour."""
    from rich.console import Console
    from rich.table import Table

    from ganprint.demo import dicom_neighbours

    out.mkdir(parents=True, exist_ok=True)
    rows = dicom_neighbours(out, backbone=backbone, progress=not quiet)
    if as_json:
        print_json(rows)
        return
    t = Table("image", "modality", "nearest neighbour", "cosine", "rank of own flip",
              title=f"nearest neighbours, {backbone} features (real DICOM from pydicom-data)")
    for r in rows:
        t.add_row(r["image"], r["modality"], r["nearest"], f"{r['cosine']:.3f}", str(r["flip_rank"]))
    Console().print(t)


def register(app: typer.Typer) -> None:
    app.command("demo")(demo)
