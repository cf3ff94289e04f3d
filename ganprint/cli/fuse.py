"""``ganprint fuse moe`` / ``ganprint fuse stack``: mixture of experts over embeddings, or
stacking of attack scores; two commands with disjoint options, each with its own ``--help``.

    ganprint fuse moe dev_resnet dev_vit --out dev_moe [--weights moe.safetensors]
    ganprint fuse moe --apply moe.safetensors test_resnet test_vit --out test_moe
    ganprint fuse stack --dev d_maxsim --dev d_gleaks --test t_maxsim --test t_gleaks --out stacked

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


class Rule(str, Enum):
    prob = "prob"
    kappa = "kappa"


def _opt(default_field: str, flag: str, text: str):
    return typer.Option(None, flag, help=f"{text} [default: {getattr(_D, default_field)}]", show_default=False)


fuse_app = typer.Typer(
    name="fuse",
    help="Fuse several backbones: the paper's mixture of experts over embeddings (moe) or a stacked "
         "logistic regression over attack scores (stack).",
    no_args_is_help=True,
    rich_markup_mode=None,
)


@fuse_app.command("moe")
@handle_errors
def moe(
    inputs: Optional[list[str]] = typer.Argument(
        None, help="Embeddings artifacts of the same images, one per expert (- reads one path from stdin)."),
    out: Path = typer.Option(..., "--out", "-o", help="Fused embeddings artifact base path."),
    weights: Optional[Path] = typer.Option(None, "--weights", "-w",
                                           help="Where to write the trained fusion weights [default: OUT.moe.safetensors]."),
    apply: Optional[Path] = typer.Option(None, "--apply", help="Apply these trained fusion weights instead of training."),
    dim: Optional[int] = _opt("dim", "--dim", "Width of the expert tokens and of the fused embedding."),
    steps: Optional[int] = _opt("steps", "--steps", "Optimizer steps."),
    batch_size: Optional[int] = _opt("batch_size", "--batch-size", "Anchors (generated images) per step."),
    lr: Optional[float] = _opt("lr", "--lr", "AdamW learning rate."),
    sim_threshold: Optional[float] = _opt("sim_threshold", "--sim-threshold",
                                          "Positive pool = real_used images with mean expert cosine >= this."),
    min_pos: Optional[int] = _opt("min_pos", "--min-pos", "Top pools up to this many by similarity rank."),
    pos_per_anchor: Optional[int] = _opt("pos_per_anchor", "--pos-per-anchor", "Positives drawn per anchor and step (0: min-pos)."),
    max_pool: Optional[int] = _opt("max_pool", "--max-pool", "Keep at most this many most similar in a pool (0: no cap)."),
    neg_per_anchor: Optional[int] = _opt("neg_per_anchor", "--neg-per-anchor",
                                         "real_not_used negatives per anchor (0: all of them)."),
    queue_size: Optional[int] = _opt("queue_size", "--queue-size", "FIFO of earlier anchors' keys as extra negatives (0: off)."),
    key_encoder: Optional[str] = _opt("key_encoder", "--key-encoder",
                                      f"Keys from the {' or '.join(KEY_ENCODERS)} model."),
    momentum: Optional[float] = _opt("momentum", "--momentum", "EMA momentum of the momentum key encoder."),
    loss_alpha: Optional[float] = _opt("loss_alpha", "--loss-alpha", "Hybrid loss weight of the learnable-temperature term."),
    balance: Optional[float] = _opt("balance", "--balance", "Weight of the gate load-balancing term (0: off)."),
    threads: int = typer.Option(0, "--threads", help="torch CPU threads while training (0: torch's default; "
                                "the fusion model is small, 1 is often fastest)."),
    seed: int = typer.Option(0, "--seed", help="Random seed (same inputs and seed give the same output)."),
    as_json: bool = typer.Option(False, "--json", help="Print a JSON summary (incl. mean gate per expert)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
) -> None:
    """The paper's mixture of experts over frozen embeddings: train it (or --apply trained weights).
    Prints the fused embeddings artifact path (for pipes)."""
    from ganprint.artifacts import resolve_artifact_arg
    from ganprint.errors import GanprintError
    from ganprint.progress import log

    training_opts = {"--dim": dim, "--steps": steps, "--batch-size": batch_size, "--lr": lr,
                     "--sim-threshold": sim_threshold, "--min-pos": min_pos, "--pos-per-anchor": pos_per_anchor,
                     "--max-pool": max_pool, "--neg-per-anchor": neg_per_anchor, "--queue-size": queue_size,
                     "--key-encoder": key_encoder, "--momentum": momentum, "--loss-alpha": loss_alpha,
                     "--balance": balance}
    paths = [str(resolve_artifact_arg(p)) for p in inputs or []]
    if apply is not None:
        if weights is not None:
            raise GanprintError("fuse moe --apply: --weights names the file to train; with --apply pass only the trained weights")
        training = [k for k, v in training_opts.items() if v is not None]
        if training:
            raise GanprintError(f"fuse moe --apply: {', '.join(training)} are training options; the trained weights fix them")
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


@fuse_app.command("stack")
@handle_errors
def stack(
    dev: Optional[list[str]] = typer.Option(None, "--dev", help="A labelled dev scores artifact (repeat, one per attack/backbone)."),
    test: Optional[list[str]] = typer.Option(None, "--test", help="The matching test scores artifact (repeat, same order as --dev)."),
    out: Path = typer.Option(..., "--out", "-o", help="Stacked scores artifact base path."),
    rule: Rule = typer.Option(Rule.prob, "--rule", help="Label 1 at probability >= 0.5 (prob) or at the cut maximising "
                              "kappa on out-of-fold dev probabilities (kappa)."),
    c: float = typer.Option(1.0, "--C", help="Inverse L2 regularisation strength of the logistic regression."),
    seed: int = typer.Option(0, "--seed", help="Random seed (same inputs and seed give the same output)."),
    as_json: bool = typer.Option(False, "--json", help="Print a JSON summary (incl. the coefficients)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No log line."),
) -> None:
    """Stack attack scores: a logistic regression fitted on labelled dev scores, applied to the test
    scores (judged out of fold). Prints the stacked scores artifact path (for pipes)."""
    from ganprint.artifacts import resolve_artifact_arg
    from ganprint.fusion.stack import stack_scores
    from ganprint.progress import log

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


def register(app: typer.Typer) -> None:
    app.add_typer(fuse_app, name="fuse")
