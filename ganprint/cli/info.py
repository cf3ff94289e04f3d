"""``ganprint info``: provenance and shapes of an artifact; the backbone registry."""

from __future__ import annotations

from typing import Optional

import typer

from ganprint.cli.options import handle_errors, print_json


@handle_errors
def info(
    artifact: Optional[str] = typer.Argument(None, help="Artifact (base path, .safetensors or .parquet; - reads it from stdin)."),
    backbones: bool = typer.Option(False, "--backbones", help="List the registered backbones."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Show an artifact's provenance, tensors and table, or the backbone registry."""
    from rich.console import Console
    from rich.table import Table

    console = Console()
    if backbones or artifact is None:
        from ganprint.backbones import BACKBONES

        rows = [{"name": s.name, "dim": s.dim, "input_size": s.input_size, "default_weights": s.default_weights,
                 "description": s.description} for s in BACKBONES.values()]
        if as_json:
            print_json(rows)
            return
        t = Table("backbone", "dim", "size", "weights", "description")
        for r in rows:
            t.add_row(r["name"], str(r["dim"]), str(r["input_size"]), r["default_weights"], r["description"])
        console.print(t)
        return
    from ganprint.artifacts import read_artifact, resolve_artifact_arg

    art = read_artifact(resolve_artifact_arg(artifact))
    tensors = {k: {"shape": list(v.shape), "dtype": str(v.dtype).replace("torch.", "")} for k, v in art.tensors.items()}
    columns = [] if art.table is None else list(art.table.columns)
    if as_json:
        print_json({"artifact": str(art.base), "provenance": art.provenance, "tensors": tensors,
                    "table": {"rows": 0 if art.table is None else len(art.table), "columns": columns},
                    "table_meta": art.table_meta})
        return
    t = Table("key", "value", title=str(art.base))
    for k, v in sorted(art.provenance.items()):
        t.add_row(k, str(v))
    for k, v in tensors.items():
        t.add_row(f"tensor {k}", f"{v['dtype']} {v['shape']}")
    t.add_row("table", f"{0 if art.table is None else len(art.table)} rows: {', '.join(columns)}")
    console.print(t)


def register(app: typer.Typer) -> None:
    app.command("info")(info)
