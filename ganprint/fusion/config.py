"""Knobs of the mixture-of-experts fusion (:class:`MoEConfig`); imports no torch, so the CLI can
show the defaults in ``--help`` without slowing start-up."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Mapping

from ganprint.errors import GanprintError

KEY_ENCODERS = ("online", "momentum")


@dataclass
class MoEConfig:
    """Knobs of the fusion model and its training (defaults: ~20 s on one CPU thread for a dev set of
    500 generated / 80 / 80 real images and experts of width 2048, 1280, 768)."""

    # model
    dim: int = 256            # common width d of the expert tokens and of the fused embedding
    gate_hidden: int = 512    # W1: K*d -> gate_hidden
    heads: int = 8            # attention heads (d must be divisible by heads)
    residual: bool = True     # a = t + MHSA(t) (see module docstring)
    # pools and negatives (names as in ``train``'s Table 1 keys where they mean the same)
    sim_threshold: float = 0.6
    min_pos: int = 2
    pos_per_anchor: int = 4   # positives drawn per anchor and step (0: min_pos)
    max_pool: int = 0         # keep at most this many most similar in a pool (0: no cap)
    neg_per_anchor: int = 0   # 0: every real_not_used image is a negative of every anchor
    queue_size: int = 0       # FIFO of earlier anchors' keys as extra negatives (0: off)
    key_encoder: str = "online"
    momentum: float = 0.99    # EMA momentum when key_encoder = "momentum"
    # loss and optimisation
    loss_alpha: float = 0.7
    balance: float = 0.01     # weight of the load-balancing term (0: off)
    batch_size: int = 128
    steps: int = 200
    lr: float = 1e-3
    weight_decay: float = 1e-4
    warmup_steps: int = 10
    grad_clip: float = 1.0
    seed: int = 0

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def validate(self) -> "MoEConfig":
        def bad(key: str, why: str) -> GanprintError:
            return GanprintError(f"moe config: {key} = {getattr(self, key)!r} {why}")

        for key in ("dim", "gate_hidden", "heads", "min_pos", "batch_size", "steps"):
            if getattr(self, key) < 1:
                raise bad(key, "must be at least 1")
        for key in ("pos_per_anchor", "max_pool", "neg_per_anchor", "queue_size", "balance", "weight_decay",
                    "warmup_steps", "grad_clip"):
            if getattr(self, key) < 0:
                raise bad(key, "must not be negative")
        if self.dim % self.heads:
            raise bad("dim", f"must be divisible by heads ({self.heads})")
        if self.key_encoder not in KEY_ENCODERS:
            raise bad("key_encoder", f"is not one of {', '.join(KEY_ENCODERS)}")
        if not 0.0 <= self.momentum <= 1.0:
            raise bad("momentum", "must be in [0, 1]")
        if not 0.0 <= self.loss_alpha <= 1.0:
            raise bad("loss_alpha", "must be in [0, 1]")
        if not -1.0 <= self.sim_threshold <= 1.0:
            raise bad("sim_threshold", "must be a cosine similarity in [-1, 1]")
        if self.lr <= 0:
            raise bad("lr", "must be positive")
        return self


def as_moe_config(config: "MoEConfig | Mapping[str, Any] | None" = None, **overrides: Any) -> MoEConfig:
    """A config from a MoEConfig, a mapping of keys or None (defaults), updated by non-None overrides."""
    base = MoEConfig().to_dict()
    if isinstance(config, MoEConfig):
        base.update(config.to_dict())
    elif config is not None:
        base.update(dict(config))
    base.update({k: v for k, v in overrides.items() if v is not None})
    known = set(MoEConfig().to_dict())
    unknown = sorted(set(base) - known)
    if unknown:
        raise GanprintError(f"moe config: unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    return MoEConfig(**base).validate()
