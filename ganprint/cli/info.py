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
    from ganprint.artifacts import read_artifact, read_provenance, resolve_artifact_arg

    base = resolve_artifact_arg(artifact)
    kind = read_provenance(base).get("kind")
    if kind in SINGLE_FILE_KINDS:  # one safetensors file with its own integrity digest, no table
        name, tensor_map, prov = SINGLE_FILE_KINDS[kind](f"{base}.safetensors")
        table, table_meta = None, {}
    else:
        art = read_artifact(base)
        name, tensor_map, prov, table, table_meta = str(art.base), art.tensors, art.provenance, art.table, art.table_meta
    tensors = {k: {"shape": list(v.shape), "dtype": str(v.dtype).replace("torch.", "")} for k, v in tensor_map.items()}
    columns = [] if table is None else list(table.columns)
    if as_json:
        print_json({"artifact": name, "provenance": prov, "tensors": tensors,
                    "table": {"rows": 0 if table is None else len(table), "columns": columns},
                    "table_meta": table_meta})
        return
    t = Table("key", "value", title=name)
    for k, v in sorted(prov.items()):
        t.add_row(k, str(v))
    for k, v in tensors.items():
        t.add_row(f"tensor {k}", f"{v['dtype']} {v['shape']}")
    t.add_row("table", f"{0 if table is None else len(table)} rows: {', '.join(columns)}")
    console.print(t)


def _checkpoint(path: str):
    from ganprint.checkpoint import verify_checkpoint

    tensors, meta = verify_checkpoint(path)
    return path, tensors, meta


def _moe_weights(path: str):
    from ganprint.fusion.moe import load_moe

    model, meta = load_moe(path)  # checks the recorded digest
    return path, model.state_dict(), meta


# kinds stored as one safetensors file (no parquet table) -> reader that checks its digest
SINGLE_FILE_KINDS = {"checkpoint": _checkpoint, "moe_weights": _moe_weights}


def register(app: typer.Typer) -> None:
    app.command("info")(info)
