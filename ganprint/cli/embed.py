"""``ganprint embed``: images -> embeddings artifact."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ganprint.cli.options import DEVICE_HELP, WEIGHTS_HELP, complete_backbone, handle_errors, print_json


@handle_errors
def embed(
    data: list[str] = typer.Argument(..., help="Image folders or files; - reads paths from stdin."),
    out: Path = typer.Option(..., "--out", "-o", help="Artifact base path: writes OUT.safetensors and OUT.parquet."),
    backbone: str = typer.Option("efficientnet_lite0", "--backbone", "-b", help="Feature extractor (see `ganprint info --backbones`).",
                                 autocompletion=complete_backbone),
    weights: Optional[str] = typer.Option(None, "--weights", help=WEIGHTS_HELP + " [default: the backbone's own]"),
    checkpoint: Optional[Path] = typer.Option(None, "--checkpoint", help="Fine-tuned checkpoint from `ganprint train` (embeds with its projection head)."),
    image_size: Optional[int] = typer.Option(None, "--image-size", help="Input resolution [default: the backbone's own; sift/orb: 256]."),
    max_keypoints: int = typer.Option(400, "--max-keypoints", help="sift/orb: keypoints kept per image (strongest first)."),
    batch_size: int = typer.Option(32, "--batch-size", help="Images per forward pass."),
    device: str = typer.Option("auto", "--device", help=DEVICE_HELP),
    workers: Optional[int] = typer.Option(None, "--workers", help="DataLoader decoding processes [default: min(4, cores-1)]."),
    skip_bad: bool = typer.Option(False, "--skip-bad", help="Drop unreadable images with a warning (recorded in the manifest)."),
    force: bool = typer.Option(False, "--force", help="Recompute even if OUT holds this exact embedding."),
    as_json: bool = typer.Option(False, "--json", help="Print a JSON summary instead of the artifact path."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
) -> None:
    """Embed images with a pretrained backbone. Prints the artifact path (for pipes)."""
    from ganprint.embed import run_embed
    from ganprint.progress import log

    res = run_embed(
        data, out, backbone=backbone, weights=weights, image_size=image_size,
        checkpoint=str(checkpoint) if checkpoint else None, device=device, batch_size=batch_size,
        workers=workers, skip_bad=skip_bad, force=force, progress=not quiet, max_keypoints=max_keypoints,
    )
    for s in res.skipped:
        log(f"[yellow]warning[/yellow]: {s.get('action', 'skipped')} {s['path']}: {s['reason']}")
    if res.reused:
        log(f"reused {res.base} (same inputs, backbone and weights; --force recomputes)")
    elif not quiet:
        log(f"embedded {res.rows} images -> [{res.rows}, {res.dim}] in {res.seconds:.1f}s ({res.images_per_s:.1f} img/s)")
    if as_json:
        print_json({"artifact": str(res.base), "reused": res.reused, "rows": res.rows, "dim": res.dim,
                    "skipped": res.skipped, "seconds": round(res.seconds, 3), "images_per_s": round(res.images_per_s, 2)})
    else:
        typer.echo(str(res.base))


def register(app: typer.Typer) -> None:
    app.command("embed")(embed)
