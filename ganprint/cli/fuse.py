"""``ganprint fuse``: mixture of experts over embeddings, or stacking of attack scores.

    ganprint fuse --method moe dev_resnet dev_vit --out dev_moe [--weights moe.safetensors]
    ganprint fuse --method moe --apply moe.safetensors test_resnet test_vit --out test_moe
    ganprint fuse --method stack --dev d_maxsim --dev d_gleaks --test t_maxsim --test t_gleaks --out stacked

The library does the work (:mod:`ganprint.fusion`); this module only parses options and prints.
"""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Optional

import typer

from ganprint.cli.options import handle_errors, print_json
from ganprint.fusion.config import KEY_ENCODERS, MoEConfig

_D = MoEConfig()


class Method(str, Enum):
    moe = "moe"
    stack = "stack"


class Rule(str, Enum):
    prob = "prob"
    kappa = "kappa"


def _opt(default_field: str, flag: str, text: str):
    return typer.Option(None, flag, help=f"{text} [default: {getattr(_D, default_field)}]", show_default=False)


@handle_errors
def fuse(
    inputs: Optional[list[str]] = typer.Argument(
        None, help="moe: embeddings artifacts of the same images, one per expert (- reads one path from stdin)."),
    method: Method = typer.Option(Method.moe, "--method", "-m", help="moe (fuse embeddings) or stack (fuse scores)."),
    out: Path = typer.Option(..., "--out", "-o", help="Output artifact base path (fused embeddings or stacked scores)."),
    weights: Optional[Path] = typer.Option(None, "--weights", "-w",
                                           help="moe: where to write the trained fusion weights [default: OUT.moe.safetensors]."),
    apply: Optional[Path] = typer.Option(None, "--apply", help="moe: apply these trained fusion weights instead of training."),
    dev: Optional[list[str]] = typer.Option(None, "--dev", help="stack: a labelled dev scores artifact (repeat, one per attack/backbone)."),
    test: Optional[list[str]] = typer.Option(None, "--test", help="stack: the matching test scores artifact (repeat, same order as --dev)."),
    rule: Rule = typer.Option(Rule.prob, "--rule", help="stack: label 1 at probability >= 0.5 (prob) or at the cut maximising "
                              "kappa on out-of-fold dev probabilities (kappa)."),
    c: float = typer.Option(1.0, "--C", help="stack: inverse L2 regularisation strength of the logistic regression."),
    dim: Optional[int] = _opt("dim", "--dim", "moe: width of the expert tokens and of the fused embedding."),
    steps: Optional[int] = _opt("steps", "--steps", "moe: optimizer steps."),
    batch_size: Optional[int] = _opt("batch_size", "--batch-size", "moe: anchors (generated images) per step."),
    lr: Optional[float] = _opt("lr", "--lr", "moe: AdamW learning rate."),
    sim_threshold: Optional[float] = _opt("sim_threshold", "--sim-threshold",
                                          "moe: positive pool = real_used images with mean expert cosine >= this."),
    min_pos: Optional[int] = _opt("min_pos", "--min-pos", "moe: top pools up to this many by similarity rank."),
    pos_per_anchor: Optional[int] = _opt("pos_per_anchor", "--pos-per-anchor", "moe: positives drawn per anchor and step (0: min-pos)."),
    max_pool: Optional[int] = _opt("max_pool", "--max-pool", "moe: keep at most this many most similar in a pool (0: no cap)."),
    neg_per_anchor: Optional[int] = _opt("neg_per_anchor", "--neg-per-anchor",
                                         "moe: real_not_used negatives per anchor (0: all of them)."),
    queue_size: Optional[int] = _opt("queue_size", "--queue-size", "moe: FIFO of earlier anchors' keys as extra negatives (0: off)."),
    key_encoder: Optional[str] = _opt("key_encoder", "--key-encoder",
                                      f"moe: keys from the {' or '.join(KEY_ENCODERS)} model."),
    momentum: Optional[float] = _opt("momentum", "--momentum", "moe: EMA momentum of the momentum key encoder."),
    loss_alpha: Optional[float] = _opt("loss_alpha", "--loss-alpha", "moe: hybrid loss weight of the learnable-temperature term."),
    balance: Optional[float] = _opt("balance", "--balance", "moe: weight of the gate load-balancing term (0: off)."),
    threads: int = typer.Option(0, "--threads", help="moe: torch CPU threads while training (0: torch's default; "
                                "the fusion model is small, 1 is often fastest)."),
    seed: int = typer.Option(0, "--seed", help="Random seed (same inputs and seed give the same output)."),
    as_json: bool = typer.Option(False, "--json", help="Print a JSON summary (incl. mean gate per expert / coefficients)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
) -> None:
    """Fuse several backbones: the paper's mixture of experts (moe) or a stacked logistic regression over
    attack scores (stack). Prints the output artifact path (for pipes)."""
    from ganprint.artifacts import resolve_artifact_arg
    from ganprint.errors import GanprintError
    from ganprint.progress import log

    inputs = list(inputs or [])
    moe_only = {"--weights": weights, "--apply": apply, "--dim": dim, "--steps": steps, "--batch-size": batch_size,
                "--lr": lr, "--sim-threshold": sim_threshold, "--min-pos": min_pos, "--pos-per-anchor": pos_per_anchor,
                "--max-pool": max_pool, "--neg-per-anchor": neg_per_anchor, "--queue-size": queue_size,
                "--key-encoder": key_encoder, "--momentum": momentum, "--loss-alpha": loss_alpha, "--balance": balance}

    if method is Method.stack:
        given = [k for k, v in moe_only.items() if v is not None]
        if inputs or given:
            what = f"{', '.join(given)}" if given else "positional artifacts"
            raise GanprintError(f"fuse --method stack: {what} apply to --method moe only; pass scores with --dev and --test")
        from ganprint.fusion.stack import stack_scores

        res = stack_scores([str(resolve_artifact_arg(p)) for p in dev or []],
                           [str(resolve_artifact_arg(p)) for p in test or []], out, rule=rule.value, C=c, seed=seed)
        if not quiet:
            coefs = ", ".join(f"{n} {v:+.3f}" for n, v in zip(res.features, res.coef))
            cv = f"{res.dev_cv_auc:.3f}" if res.dev_cv_auc is not None else "n/a"
            log(f"stacked {len(res.features)} scores on {res.dev_rows} dev images: {coefs}; dev out-of-fold AUC {cv}; "
                f"{res.test_positive}/{res.test_rows} test images labelled 1 (threshold {res.threshold:.3f})")
        if as_json:
            print_json(res.to_dict())
        else:
            typer.echo(str(res.scores))
        return

    if dev or test:
        raise GanprintError("fuse --method moe: --dev/--test are for --method stack; pass embeddings artifacts as arguments")
    paths = [str(resolve_artifact_arg(p)) for p in inputs]
    if apply is not None:
        if weights is not None:
            raise GanprintError("fuse --apply: --weights names the file to train; with --apply pass only the trained weights")
        training = [k for k, v in moe_only.items() if v is not None and k not in ("--apply", "--weights")]
        if training:
            raise GanprintError(f"fuse --apply: {', '.join(training)} are training options; the trained weights fix them")
        from ganprint.fusion.moe import apply_moe

        res = apply_moe(apply, paths, out)
        if not quiet:
            log(f"fused {res.rows} images with {res.weights} -> [{res.rows}, {res.dim}]; mean gate "
                + ", ".join(f"{n} {g:.3f}" for n, g in zip(res.experts, res.mean_gate)))
        if as_json:
            print_json(res.to_dict())
        else:
            typer.echo(str(res.fused))
        return

    from ganprint.fusion.moe import train_moe

    wpath = weights if weights is not None else Path(str(out) + ".moe.safetensors")
    overrides = {"dim": dim, "steps": steps, "batch_size": batch_size, "lr": lr, "sim_threshold": sim_threshold,
                 "min_pos": min_pos, "pos_per_anchor": pos_per_anchor, "max_pool": max_pool,
                 "neg_per_anchor": neg_per_anchor, "queue_size": queue_size, "key_encoder": key_encoder,
                 "momentum": momentum, "loss_alpha": loss_alpha, "balance": balance, "seed": seed}
    tres = train_moe(paths, wpath, out=out, progress=not quiet, threads=threads or None, **overrides)
    if "warning" in tres.pools:
        log(f"[yellow]warning[/yellow]: {tres.pools['warning']}")
    if not quiet:
        log(f"trained fusion of {', '.join(tres.experts)} in {tres.seconds:.1f}s: loss {tres.loss_start:.4f} -> "
            f"{tres.loss_end:.4f}; mean gate " + ", ".join(f"{g:.3f}" for g in tres.mean_gate) + f"; weights {tres.weights}")
    if as_json:
        d = tres.to_dict()
        d.pop("history")  # one value per step; the summary keeps loss_start / loss_end
        print_json(d)
    else:
        typer.echo(str(tres.fused))


def register(app: typer.Typer) -> None:
    app.command("fuse")(fuse)
