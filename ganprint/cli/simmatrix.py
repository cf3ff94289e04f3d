"""``ganprint simmatrix``: embeddings artifacts -> similarity artifact."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ganprint.cli.options import DEVICE_HELP, handle_errors, print_json


@handle_errors
def simmatrix(
    dataset: Optional[str] = typer.Argument(None, help="Embeddings of an ImageCLEF layout: 'generated' is G, every "
                                                       "'real_*' subset is R (- reads the path from stdin)."),
    generated: Optional[str] = typer.Option(None, "--generated", "-g", help="Embeddings artifact of the generated images."),
    real: Optional[str] = typer.Option(None, "--real", "-r", help="Embeddings artifact of the real images."),
    reference: Optional[str] = typer.Option(None, "--reference", help="Embeddings of known non-members (label-0 rows "
                                                                      "if labelled) for calibrated attacks [default: the other real images]."),
    out: Path = typer.Option(..., "--out", "-o", help="Artifact base path: writes OUT.safetensors and OUT.parquet."),
    metric: str = typer.Option("cosine", "--metric", help="cosine or l2 (stored as -distance: larger = more similar)."),
    k: int = typer.Option(10, "--k", "-k", help="Neighbours kept per image."),
    full: Optional[bool] = typer.Option(None, "--full/--no-full", help="Store the full G x R matrix "
                                                                       "[default: when G*R <= 4M]."),
    block: int = typer.Option(1024, "--block", help="Rows per tile; a tile is block x 16*block floats (64 MiB at 1024): bounds peak memory."),
    device: str = typer.Option("auto", "--device", help=DEVICE_HELP),
    engine: str = typer.Option("exact", "--engine", help="exact (blocked torch tiles; 'torch' is an alias), faiss (exact "
                                                         "flat index) or faiss-ivf (approximate: IVF, recall@k >= 0.99 "
                                                         "calibrated and the held-out recall stored); faiss needs faiss-cpu."),
    precision: str = typer.Option("auto", "--precision", help="Tile precision of the torch engine, all exact: fp32, or "
                                                              "bf16 (cosine, CPU: bf16 tiles, float32 re-scoring of "
                                                              "certified candidates); auto = bf16 where the CPU has "
                                                              "bf16 dot products and the problem is large."),
    realref: bool = typer.Option(True, "--realref/--no-realref", help="Also store each real image's nearest reference/real images."),
    verify: Optional[list[str]] = typer.Option(None, "--verify", help="Local-features artifact(s) of the same images "
                                               "(`embed --backbone sift`): re-score the top --verify-k candidates by "
                                               "descriptor matching + RANSAC; or raw-pixel grids (`embed --backbone "
                                               "pixels --image-size S`): by registration, NCC after alignment "
                                               "(repeatable)."),
    verify_k: int = typer.Option(50, "--verify-k", help="Candidates per real image to verify (0: all generated)."),
    as_json: bool = typer.Option(False, "--json", help="Print a JSON summary instead of the artifact path."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No log line."),
) -> None:
    """Generated x real similarity (top-k both ways, full matrix when small). Prints the artifact path.

    Data-parallel under torchrun: `torchrun --nproc-per-node N -m ganprint simmatrix ...` (G split
    across the ranks, top-k merged exactly, rank 0 writes)."""
    from ganprint.artifacts import resolve_artifact_arg
    from ganprint.distributed import join, launched, quiet_rank
    from ganprint.errors import GanprintError
    from ganprint.progress import log
    from ganprint.similarity import run_simmatrix

    args = [a for a in (dataset, generated, real, reference) if a == "-"]
    if len(args) > 1:
        raise GanprintError("only one artifact can come from stdin (-)")
    if args:
        from ganprint.similarity import preload

        preload()  # import while the upstream stage still runs

    def res(a):
        return None if a is None else resolve_artifact_arg(a)

    if args and launched():
        raise GanprintError("reading an artifact path from stdin (-) does not work under torchrun; pass the path")
    group = join(device)
    with quiet_rank(group):
        outcome = group.run(run_simmatrix, out, res(dataset), res(generated), res(real), res(reference),
                            metric=metric, k=k, full=full, block=block, device=device, engine=engine,
                            realref=realref, precision=precision,
                            verify=[str(res(v)) for v in verify or []] or None, verify_k=verify_k, group=group)
    if outcome is None:  # under torchrun, ranks other than 0 report nothing
        return
    if not quiet:
        ref = f", reference {outcome.n_reference}" if outcome.n_reference is not None else ""
        log(f"similarity {outcome.n_generated} generated x {outcome.n_real} real{ref} ({metric}, top-{outcome.k}"
            f"{', full matrix' if outcome.full else ''}{', bf16 tiles' if outcome.provenance.get('precision') == 'bf16' else ''}"
            f") in {outcome.seconds:.1f}s")
    if as_json:
        print_json({"artifact": str(outcome.base), "generated": outcome.n_generated, "real": outcome.n_real,
                    "reference": outcome.n_reference, "k": outcome.k, "full": outcome.full, "metric": metric,
                    "precision": outcome.provenance.get("precision"), "engine": outcome.provenance.get("engine"),
                    "engine_info": outcome.provenance.get("engine_info"),
                    "seconds": round(outcome.seconds, 3)})
    else:
        typer.echo(str(outcome.base))


def register(app: typer.Typer) -> None:
    app.command("simmatrix")(simmatrix)
