"""Projection head with per-sample temperature, and the encoders built from it.

``ProjectionHead``: backbone features h [B, in_dim] -> (z [B, out_dim], tau [B]):

    z   = normalize(MLP(h))           MLP = Linear -> ReLU -> ... -> Linear  (no ReLU at the end,
                                      so z uses the whole sphere and cosine thresholds mean something)
    tau = 0.05 + 0.15 * sigmoid(w . z + b)    in (0.05, 0.2), the paper's eq. in section 3.2

``ContrastiveEncoder``: images [B, C, S, S] -> (z, tau) = head(backbone(images)).
``EmbeddingModel``: images -> z only (what ``embed --checkpoint`` runs).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

TAU_MIN = 0.05
TAU_RANGE = 0.15


class ProjectionHead(nn.Module):
    """[B, in_dim] -> (z [B, out_dim] L2-normalised, tau [B])."""

    def __init__(self, in_dim: int, hidden: int = 512, out_dim: int = 256, layers: int = 2) -> None:
        super().__init__()
        self.in_dim, self.hidden, self.out_dim, self.layers = int(in_dim), int(hidden), int(out_dim), int(layers)
        mods: list[nn.Module] = []
        width = in_dim
        if hidden > 0:
            for _ in range(max(0, layers - 1)):
                mods += [nn.Linear(width, hidden), nn.ReLU(inplace=True)]
                width = hidden
        mods.append(nn.Linear(width, out_dim))  # last layer: no activation
        self.mlp = nn.Sequential(*mods)
        self.temperature = nn.Linear(out_dim, 1)

    def config(self) -> dict[str, int]:
        return {"in_dim": self.in_dim, "hidden": self.hidden, "out_dim": self.out_dim, "layers": self.layers}

    def forward(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z = F.normalize(self.mlp(h.float()), dim=1)
        tau = TAU_MIN + TAU_RANGE * torch.sigmoid(self.temperature(z)).squeeze(1)
        return z, tau


class ContrastiveEncoder(nn.Module):
    """images [B, C, S, S] -> (z [B, out_dim], tau [B])."""

    def __init__(self, backbone: nn.Module, head: ProjectionHead) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.head(self.backbone(x))


class EmbeddingModel(nn.Module):
    """images [B, C, S, S] -> z [B, out_dim] (L2-normalised); the fine-tuned embedder."""

    def __init__(self, encoder: ContrastiveEncoder) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x)[0]


def set_bn_mode(module: nn.Module, mode: str) -> None:
    """Put ``module`` in train mode, keeping BatchNorm layers in eval mode when ``mode`` is
    ``frozen``: their running statistics stay those of the pretrained weights (small CPU batches
    give noisy statistics, and frozen ones cannot drift apart between DDP ranks); their affine
    parameters still train."""
    module.train()
    if mode == "frozen":
        for m in module.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()
