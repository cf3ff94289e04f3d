"""Training configuration: a flat set of keys, read from TOML, overridable one by one.

Layering (later wins): the defaults below < the config file (``--config PATH`` or a packaged
preset name such as ``cpu-small``; the CLI uses ``cpu-small`` when no ``--config`` is given)
< explicit overrides (CLI options / keyword arguments).  A TOML file may group keys in tables
(``[pools]``, ``[model]``, ...): tables are only for reading comfort and are flattened, so every
key name is unique.  Unknown keys are an error naming the file and the closest known key.

Relative paths in a config (``data``, ``out``, ``similarity``, ``weights``) are taken relative
to the current directory, like the same values given on the command line.

This module imports no torch, so the CLI can build its options quickly.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import os
import tomllib
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Mapping

from ganprint.errors import GanprintError

DEFAULT_PRESET = "cpu-small"
CHECKPOINT_NAME = "checkpoint.safetensors"
CONFIG_NAME = "config.toml"


@dataclass
class TrainConfig:
    """Every knob of ``ganprint train``; see :data:`FIELD_HELP` for what each one does."""

    # data
    data: str = ""
    out: str = "runs/train"
    similarity: str | None = None
    # model
    backbone: str = "efficientnet_lite0"
    weights: str | None = None
    image_size: int | None = None
    proj_hidden: int = 512
    proj_dim: int = 256
    proj_layers: int = 2
    bn_mode: str = "frozen"
    # positives: the paper's similarity pools, instance views (copy descriptor), or both
    positives: str = "pools"
    instance_res: int = 0
    instance_clean: float = 0.0
    # positive pools and negatives (Table 1 names)
    sim_threshold: float = 0.6
    min_pos_samples: int = 2
    pos_per_anchor: int = 0
    max_pool_size: int = 0
    self_positive: bool = True
    num_neg_samples: int = 5
    queue_size: int = 0
    queue_init: str = "keys"
    mask_pool_overlap: bool = False
    # loss and momentum
    loss_alpha: float = 0.7
    momentum: float = 0.999
    # optimisation
    batch_size: int = 128
    lr: float = 3e-4
    weight_decay: float = 1e-4
    warmup_steps: int = -1
    epochs: float = 10.0
    max_steps: int = 0
    stop_at_step: int = 0
    grad_clip: float = 1.0
    # augmentation
    aug_crop_min: float = 0.5
    aug_flip: bool = True
    aug_rotate: float = 10.0
    aug_window: float = 0.2
    aug_gamma: float = 0.3
    aug_noise: float = 0.02
    # runtime
    seed: int = 0
    device: str = "auto"
    amp: bool = True
    threads: int = 0
    key_chunk: int = 256
    save_every: int = 0

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **changes: Any) -> "TrainConfig":
        return resolve_config(self.to_dict(), changes, source="overrides")

    @property
    def checkpoint_path(self) -> Path:
        return Path(self.out) / CHECKPOINT_NAME

    @property
    def config_path(self) -> Path:
        return Path(self.out) / CONFIG_NAME

    @classmethod
    def from_preset(cls, name_or_path: str | os.PathLike = DEFAULT_PRESET, **overrides: Any) -> "TrainConfig":
        """A preset (packaged name like ``cpu-small``, or a TOML path) plus keyword overrides."""
        return load_config(name_or_path, overrides)


FIELD_HELP: dict[str, str] = {
    "data": "Dataset folder in ImageCLEF layout (dev/ with generated/, real_used/, real_not_used/).",
    "out": "Output folder: checkpoint.safetensors, config.toml (resolved config), metrics.jsonl.",
    "similarity": "Similarity artifact (from simmatrix) for the positive pools; default: cosine similarity of the frozen backbone's features, computed here.",
    "backbone": "Backbone to fine-tune (see `ganprint info --backbones`).",
    "weights": "Starting weights: imagenet, none or PATH [default: the backbone's own].",
    "image_size": "Input resolution [default: the backbone's own].",
    "proj_hidden": "Hidden width of the projection MLP (0: a single linear layer).",
    "proj_dim": "Embedding dimension of the projection head.",
    "proj_layers": "Linear layers in the projection MLP (ReLU between them, none at the end).",
    "bn_mode": "frozen (BatchNorm keeps its running statistics; identical across ranks) or train.",
    "positives": "pools (the paper's: real_used images similar to the anchor), instance (a second view of the anchor under the replica transforms of `synth --copies`: rotation, shift, gamma, blur, noise; a copy descriptor) or both (pools plus the instance view; all views then use the replica transforms).",
    "instance_res": "positives = instance / both: resolution the replica transforms are applied at (the generator's working resolution, e.g. 64 for synth's DCGAN; 0: the image cache's).",
    "instance_clean": "positives = instance / both: probability that the second view of an anchor is the untransformed image (a clean member against its replica, as a search meets them).",
    "sim_threshold": "Positive pool: real_used images with cosine similarity >= this.",
    "min_pos_samples": "Positive pool: top up to this many by similarity rank when too few pass the threshold.",
    "pos_per_anchor": "Pool positives drawn per anchor and step (0: min_pos_samples).",
    "max_pool_size": "Keep at most this many most-similar images in a pool (0: no cap).",
    "self_positive": "positives = pools: also use a second augmented view of the anchor itself as a positive.",
    "num_neg_samples": "Explicit negatives per anchor drawn from real_not_used (when the dev set has it).",
    "queue_size": "FIFO queue of momentum keys (0: sized from the dataset).",
    "queue_init": "keys (start filled with momentum keys of generated images) or empty.",
    "mask_pool_overlap": "Drop from the queue negatives the generated images whose positive pool shares a real image with the anchor's (likely copies of one source).",
    "loss_alpha": "Hybrid loss weight alpha of the learnable-temperature term (paper: 0.7).",
    "momentum": "EMA momentum m of the key encoder (0: copy, 1: frozen).",
    "batch_size": "Anchors (generated images) per step, over all processes.",
    "lr": "AdamW peak learning rate.",
    "weight_decay": "AdamW weight decay (not applied to biases and norm parameters).",
    "warmup_steps": "Linear warm-up steps before the cosine decay (-1: 5% of the steps).",
    "epochs": "Passes over the generated images (used when max_steps is 0).",
    "max_steps": "Optimizer steps (0: from epochs); the schedule spans these.",
    "stop_at_step": "Stop (and checkpoint) at this step without changing the schedule; continue later with --resume.",
    "grad_clip": "Clip the gradient norm to this (0: off).",
    "aug_crop_min": "Random resized crop: smallest area fraction kept.",
    "aug_flip": "Random horizontal flip.",
    "aug_rotate": "Random rotation, +- degrees.",
    "aug_window": "Intensity window jitter (CT window level/width), fraction of the range.",
    "aug_gamma": "Gamma jitter: gamma = exp(U(-g, g)).",
    "aug_noise": "Gaussian noise, largest standard deviation (intensity in 0..1).",
    "seed": "Random seed (same inputs and seed give the same weights on CPU).",
    "device": "auto, cpu, cuda, cuda:N or mps (under torchrun: each rank its local GPU).",
    "amp": "Mixed precision on CUDA.",
    "threads": "torch CPU threads per process (0: torch's default).",
    "key_chunk": "Images per momentum-encoder forward pass (memory bound).",
    "save_every": "Write the checkpoint every N steps (0: only at the end).",
}

CHOICES: dict[str, tuple[str, ...]] = {
    "positives": ("pools", "instance", "both"),
    "bn_mode": ("frozen", "train"),
    "queue_init": ("keys", "empty"),
}

# keys that may differ between a run and its --resume (they do not change the result)
RESUME_FREE = {"out", "stop_at_step", "save_every", "device", "threads", "key_chunk", "data", "similarity"}


def field_names() -> list[str]:
    return [f.name for f in fields(TrainConfig)]


def _field_types() -> dict[str, type]:
    """The scalar type of each field (bool / int / float / str), from its default."""
    out: dict[str, type] = {}
    for f in fields(TrainConfig):
        t = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
        base = t.split("|")[0].strip()
        out[f.name] = {"bool": bool, "int": int, "float": float, "str": str}[base]
    return out


FIELD_TYPES = _field_types()
OPTIONAL = {f.name for f in fields(TrainConfig) if "None" in str(f.type)}


def _coerce(name: str, value: Any, source: str) -> Any:
    want = FIELD_TYPES[name]
    if value is None:
        if name in OPTIONAL:
            return None
        raise GanprintError(f"{source}: '{name}' cannot be empty; give a {want.__name__}")
    if want is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
    elif want is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
    elif want is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
    else:
        if isinstance(value, (str, os.PathLike)):
            return str(value)
    raise GanprintError(f"{source}: '{name}' = {value!r} is not a {want.__name__}; fix the value")


def _flatten(data: Mapping[str, Any], source: str) -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in data.items():
        items = value.items() if isinstance(value, dict) else [(key, value)]
        for k, v in items:
            if isinstance(v, dict):
                raise GanprintError(f"{source}: table [{key}.{k}] is nested too deep; use flat keys")
            if k in flat:
                raise GanprintError(f"{source}: key '{k}' is given twice; keep one")
            flat[k] = v
    return flat


def _check_keys(keys, source: str) -> None:
    known = set(field_names())
    for k in keys:
        if k not in known:
            close = difflib.get_close_matches(k, sorted(known), n=1)
            hint = f"did you mean '{close[0]}'?" if close else "see `ganprint train --help`"
            raise GanprintError(f"{source}: unknown key '{k}'; {hint}")


def validate(cfg: TrainConfig, source: str = "config") -> TrainConfig:
    def bad(key: str, why: str) -> GanprintError:
        return GanprintError(f"{source}: {key} = {getattr(cfg, key)!r} {why}")

    for key, choices in CHOICES.items():
        if getattr(cfg, key) not in choices:
            raise bad(key, f"is not one of {', '.join(choices)}")
    for key, typ in FIELD_TYPES.items():  # nan passes every comparison below, inf breaks the schedule
        if typ is float and getattr(cfg, key) is not None and not math.isfinite(getattr(cfg, key)):
            raise bad(key, "must be a finite number")
    from ganprint.backbones import backbone_names  # names only: no torch import

    if cfg.backbone not in backbone_names():
        close = difflib.get_close_matches(cfg.backbone, backbone_names(), n=1)
        hint = f"did you mean '{close[0]}'?" if close else "see `ganprint info --backbones`"
        raise bad("backbone", f"is not a known backbone; {hint}")
    positive = ("proj_dim", "proj_layers", "batch_size", "key_chunk")
    for key in positive:
        if getattr(cfg, key) < 1:
            raise bad(key, "must be at least 1")
    non_negative = ("proj_hidden", "min_pos_samples", "pos_per_anchor", "max_pool_size", "num_neg_samples",
                    "queue_size", "max_steps", "stop_at_step", "threads", "save_every", "weight_decay",
                    "grad_clip", "aug_rotate", "aug_window", "aug_gamma", "aug_noise")
    for key in non_negative:
        if getattr(cfg, key) < 0:
            raise bad(key, "must not be negative")
    if cfg.instance_res != 0 and not 8 <= cfg.instance_res <= 4096:
        raise bad("instance_res", "must be 0 (the cache's resolution) or between 8 and 4096 pixels")
    if not 0.0 <= cfg.instance_clean <= 1.0:
        raise bad("instance_clean", "must be a probability in [0, 1]")
    if cfg.image_size is not None and cfg.image_size < 8:
        raise bad("image_size", "is too small; use at least 8")
    if not 0.0 <= cfg.loss_alpha <= 1.0:
        raise bad("loss_alpha", "must be in [0, 1]")
    if not 0.0 <= cfg.momentum <= 1.0:
        raise bad("momentum", "must be in [0, 1]")
    if not -1.0 <= cfg.sim_threshold <= 1.0:
        raise bad("sim_threshold", "must be a cosine similarity in [-1, 1]")
    if not 0.0 < cfg.aug_crop_min <= 1.0:
        raise bad("aug_crop_min", "must be in (0, 1]")
    if cfg.lr <= 0:
        raise bad("lr", "must be positive")
    if cfg.epochs <= 0 and cfg.max_steps == 0:
        raise bad("epochs", "must be positive (or set max_steps)")
    if cfg.warmup_steps < -1:
        raise bad("warmup_steps", "must be -1 (auto) or at least 0")
    if cfg.positives == "pools" and cfg.min_pos_samples == 0 and cfg.pos_per_anchor == 0 and not cfg.self_positive:
        raise GanprintError(f"{source}: no positives at all (min_pos_samples, pos_per_anchor 0 and self_positive "
                            "false); set min_pos_samples >= 1 or self_positive = true")
    return cfg


def resolve_config(base: Mapping[str, Any], overrides: Mapping[str, Any] | None = None,
                   source: str = "config") -> TrainConfig:
    """``base`` (a full or partial mapping of keys) updated by non-None ``overrides``."""
    merged = TrainConfig().to_dict()
    _check_keys(base, source)
    for k, v in base.items():
        merged[k] = _coerce(k, v, source)
    if overrides:
        _check_keys(overrides, "overrides")
        for k, v in overrides.items():
            if v is not None:
                merged[k] = _coerce(k, v, "option --" + k.replace("_", "-"))
    return validate(TrainConfig(**merged), source)


def preset_names() -> list[str]:
    from importlib.resources import files

    return sorted(p.name[:-5] for p in files("ganprint").joinpath("configs").iterdir() if p.name.endswith(".toml"))


def read_toml(name_or_path: str | os.PathLike) -> tuple[dict[str, Any], str]:
    """Keys of a config file (or packaged preset) -> (flat mapping, source label)."""
    p = Path(name_or_path).expanduser()
    if p.is_file():
        source = str(p)
        try:
            text = p.read_text(encoding="utf-8")
        except UnicodeDecodeError as exc:
            raise GanprintError(f"{source}: is not UTF-8 text ({exc.reason} at byte {exc.start}); "
                                "save the config as UTF-8 TOML") from None
        except OSError as exc:
            raise GanprintError(f"{source}: cannot read ({exc.strerror}); check the path") from None
    elif str(name_or_path) in preset_names():
        from importlib.resources import files

        text = files("ganprint").joinpath("configs", f"{name_or_path}.toml").read_text(encoding="utf-8")
        source = f"preset {name_or_path}"
    else:
        raise GanprintError(f"{name_or_path}: no such config file or preset; pass a TOML file or one of: "
                            f"{', '.join(preset_names())}")
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise GanprintError(f"{source}: not valid TOML ({exc}); fix the file") from None
    flat = _flatten(data, source)
    _check_keys(flat, source)
    return flat, source


def load_config(name_or_path: str | os.PathLike | None = None,
                overrides: Mapping[str, Any] | None = None) -> TrainConfig:
    """Defaults < file (default: the ``cpu-small`` preset) < overrides."""
    flat, source = read_toml(name_or_path if name_or_path is not None else DEFAULT_PRESET)
    return resolve_config(flat, overrides, source)


def as_config(config: "TrainConfig | Mapping[str, Any] | str | os.PathLike") -> TrainConfig:
    """Accept a TrainConfig, a mapping of keys (over the defaults) or a TOML path / preset name."""
    if isinstance(config, TrainConfig):
        return validate(TrainConfig(**config.to_dict()))
    if isinstance(config, Mapping):
        return resolve_config(dict(config), source="config mapping")
    return load_config(config)


def absolute_paths(cfg: TrainConfig) -> TrainConfig:
    """The same config with its file paths made absolute (so the saved config reruns anywhere)."""
    def absp(v: str | None) -> str | None:
        return None if v in (None, "") else str(Path(v).expanduser().resolve())

    changes: dict[str, Any] = {"data": absp(cfg.data) or "", "out": absp(cfg.out), "similarity": absp(cfg.similarity)}
    if cfg.weights not in (None, "imagenet", "none"):
        changes["weights"] = absp(cfg.weights)
    return TrainConfig(**{**cfg.to_dict(), **changes})


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    return json.dumps(str(v))  # a JSON string is a valid TOML basic string


def to_toml(cfg: TrainConfig, header: str = "") -> str:
    """The resolved config as TOML (keys left at None are omitted: None is their default)."""
    lines = [f"# {ln}" for ln in header.splitlines()]
    for k, v in cfg.to_dict().items():
        if v is None:
            continue
        lines.append(f"{k} = {_toml_value(v)}")
    return "\n".join(lines) + "\n"


def diff_configs(a: Mapping[str, Any], b: Mapping[str, Any], ignore=RESUME_FREE) -> list[str]:
    """Keys whose values differ (for --resume checks)."""
    return sorted(k for k in set(a) | set(b) if k not in ignore and a.get(k) != b.get(k))

