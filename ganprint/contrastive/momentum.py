"""Momentum (key) encoder: an EMA copy of the online encoder (paper eq. 1).

    theta_k <- m * theta_k + (1 - m) * theta_q        under no_grad

m = 0 copies the online weights, m = 1 freezes the key encoder.  Floating-point buffers (BN
running statistics) follow the same average; integer buffers are copied unless m = 1.
"""

from __future__ import annotations

import copy

import torch
from torch import nn


def make_momentum_encoder(online: nn.Module) -> nn.Module:
    """A deep copy of ``online`` that takes no gradients, in eval mode (stable keys: no dropout)."""
    mom = copy.deepcopy(online)
    for p in mom.parameters():
        p.requires_grad_(False)
    return mom.eval()


@torch.no_grad()
def ema_update(momentum: nn.Module, online: nn.Module, m: float) -> None:
    if not 0.0 <= m <= 1.0:
        raise ValueError(f"momentum must be in [0, 1], got {m}")
    if m == 1.0:
        return
    mp = list(momentum.parameters())
    op = list(online.parameters())
    if len(mp) != len(op):
        raise ValueError("momentum and online encoders have different parameters")
    if m == 0.0:
        torch._foreach_copy_(mp, [p.detach() for p in op])
    else:
        # lerp: theta_k + (1 - m) * (theta_q - theta_k) = m * theta_k + (1 - m) * theta_q
        torch._foreach_lerp_(mp, [p.detach() for p in op], 1.0 - m)
    for bm, bo in zip(momentum.buffers(), online.buffers()):
        if bm.dtype.is_floating_point:
            bm.lerp_(bo, 1.0 - m) if m > 0 else bm.copy_(bo)
        else:
            bm.copy_(bo)
