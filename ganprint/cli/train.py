"""``ganprint train``: contrastive fine-tuning -> checkpoint.safetensors.

Every key of the training config is also an option (``sim_threshold`` -> ``--sim-threshold``)
that overrides the config file; the options are generated from
:class:`ganprint.contrastive.config.TrainConfig`, so the two cannot drift apart.
No torch import here: the trainer is imported when the command runs.
"""

from __future__ import annotations

import inspect
from typing import Optional

import typer

from ganprint.cli.options import complete_backbone, handle_errors, print_json
from ganprint.contrastive.config import CHOICES, FIELD_HELP, FIELD_TYPES, field_names

_SKIP = {"data"}  # given as the positional DATA argument (or --data)


def option_name(key: str) -> str:
    return "--" + key.replace("_", "-")


def _train(
    data_arg: Optional[str],
    config: Optional[str],
    resume: bool,
    print_config: bool,
    as_json: bool,
    quiet: bool,
    **overrides,
) -> None:
    from ganprint.contrastive.config import load_config, to_toml
    from ganprint.progress import log

    if data_arg is not None:
        if overrides.get("data") not in (None, data_arg):
            from ganprint.errors import GanprintError

            raise GanprintError(f"DATA {data_arg} and --data {overrides['data']} disagree; pass one of them")
        overrides["data"] = data_arg
    cfg = load_config(config, overrides)
    if print_config:
        typer.echo(to_toml(cfg), nl=False)
        return
    from ganprint.contrastive.trainer import run_training

    res = run_training(cfg, resume=resume, progress=not quiet, log=log)
    import os

    if int(os.environ.get("RANK", "0")) != 0:
        return  # under torchrun only rank 0 reports
    if not quiet:
        last = f"{res.losses[-1]:.4f}" if res.losses else "-"
        log(f"trained {res.step}/{res.max_steps} steps in {res.seconds:.1f}s (last loss {last}); "
            f"config {res.config_path}")
    if as_json:
        print_json({"checkpoint": str(res.checkpoint), "config": str(res.config_path), "step": res.step,
                    "max_steps": res.max_steps, "seconds": round(res.seconds, 3), "resumed_from": res.resumed_from,
                    "world_size": res.world_size, "digest": res.digest,
                    "final_loss": res.losses[-1] if res.losses else None, "notes": res.notes})
    else:
        typer.echo(str(res.checkpoint))


def _build_command():
    params = [
        inspect.Parameter("data_arg", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=Optional[str],
                          default=typer.Argument(None, metavar="[DATA]", show_default=False,
                                                 help="Dataset folder (ImageCLEF dev layout); same as --data.")),
        inspect.Parameter("config", inspect.Parameter.KEYWORD_ONLY, annotation=Optional[str],
                          default=typer.Option(None, "--config", "-c", show_default=False,
                                               help="TOML config file or preset name [default: cpu-small]; "
                                                    "options below override its keys.")),
        inspect.Parameter("resume", inspect.Parameter.KEYWORD_ONLY, annotation=bool,
                          default=typer.Option(False, "--resume", help="Continue OUT/checkpoint.safetensors (same config).")),
        inspect.Parameter("print_config", inspect.Parameter.KEYWORD_ONLY, annotation=bool,
                          default=typer.Option(False, "--print-config", help="Print the resolved config as TOML and exit.")),
        inspect.Parameter("as_json", inspect.Parameter.KEYWORD_ONLY, annotation=bool,
                          default=typer.Option(False, "--json", help="Print a JSON summary instead of the checkpoint path.")),
        inspect.Parameter("quiet", inspect.Parameter.KEYWORD_ONLY, annotation=bool,
                          default=typer.Option(False, "--quiet", "-q", help="No progress bar.")),
    ]
    for key in field_names():
        typ = FIELD_TYPES[key]
        help_text = FIELD_HELP[key]
        if key in CHOICES:
            help_text += f" [{'|'.join(CHOICES[key])}]"
        decls = [f"{option_name(key)}/--no-{key.replace('_', '-')}"] if typ is bool else [option_name(key)]
        extra = {"autocompletion": complete_backbone} if key == "backbone" else {}
        if key in _SKIP:
            help_text = "Dataset folder; same as the DATA argument."
        params.append(inspect.Parameter(
            key, inspect.Parameter.KEYWORD_ONLY, annotation=Optional[typ],
            default=typer.Option(None, *decls, help=help_text, show_default=False, **extra)))

    def train(**kwargs) -> None:
        """Fine-tune a backbone contrastively (the paper's MoCo variant). Prints the checkpoint path.

        Positives: for each generated image, the real_used images whose similarity passes
        --sim-threshold (topped up to --min-pos-samples); negatives: a queue of momentum keys
        plus --num-neg-samples real_not_used images per anchor. Multi-process:
        torchrun --nproc-per-node N -m ganprint train ...
        """
        return _train(kwargs.pop("data_arg"), kwargs.pop("config"), kwargs.pop("resume"),
                      kwargs.pop("print_config"), kwargs.pop("as_json"), kwargs.pop("quiet"), **kwargs)

    train.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    train.__annotations__ = {p.name: p.annotation for p in params} | {"return": None}
    return handle_errors(train)


train = _build_command()


def register(app: typer.Typer) -> None:
    app.command("train")(train)

