"""``ganprint report RUN/``: re-render report.html (and its figures) from an audit run's artifacts."""

from __future__ import annotations

from pathlib import Path

import typer

from ganprint.cli.options import handle_errors


@handle_errors
def report(run: Path = typer.Argument(..., help="The --out folder of `ganprint audit`.")) -> None:
    """Re-render RUN/report.html from RUN/report.json, RUN/scores.parquet and the gallery images; prints its path."""
    from ganprint.report import render_report

    typer.echo(str(render_report(run)))


def register(app: typer.Typer) -> None:
    app.command("report")(report)
