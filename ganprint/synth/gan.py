"""A small DCGAN (spectral-norm discriminator, hinge loss) that actually trains on the members.

Shapes: the generator maps ``z`` float [B, z_dim] to images float [B, 1, R, R] in [-1, 1]
(``R`` = working resolution, a power of two >= 16); the discriminator maps [B, 1, R, R] to
logits [B].  Training images come in as uint8 [N, R, R].

Weights are saved as safetensors (``save_generator``) with the architecture in the metadata,
so ``load_generator`` rebuilds the network without pickle.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from typing import Callable

import numpy as np

from ganprint.errors import GanprintError

GENERATOR_FORMAT = 1


@dataclass(frozen=True)
class GanConfig:
    res: int = 64  # working resolution (square)
    z_dim: int = 64
    ngf: int = 32  # generator width at the last layer; doubles towards the input
    ndf: int = 32  # discriminator width at the first layer
    batch_size: int = 32
    steps: int = 2000
    lr_g: float = 2e-4
    lr_d: float = 2e-4
    betas: tuple = (0.5, 0.999)
    log_every: int = 25  # loss curve sampling interval (steps)

    def validate(self) -> None:
        if self.res < 16 or self.res & (self.res - 1):
            raise GanprintError(f"--gan-res {self.res}: must be a power of two >= 16 (e.g. 32, 64, 128)")
        for name, v in (("--z-dim", self.z_dim), ("--gan-width", self.ngf), ("--gan-width", self.ndf),
                        ("--batch-size", self.batch_size)):
            if v < 1:
                raise GanprintError(f"{name} {v}: must be at least 1")
        if self.steps < 1:
            raise GanprintError(f"--steps {self.steps}: must be at least 1")


def _n_up(res: int) -> int:
    return int(math.log2(res)) - 2  # 4x4 -> res


def build_generator(cfg: GanConfig):
    """z [B, z_dim] -> image [B, 1, res, res] in [-1, 1] (DCGAN: transposed convs, BN, ReLU)."""
    import torch.nn as nn

    n = _n_up(cfg.res)
    ch = [cfg.ngf * 2 ** (n - 1 - i) for i in range(n)]  # e.g. res 64: 8g, 4g, 2g, g
    layers: list = [
        nn.Unflatten(1, (cfg.z_dim, 1, 1)),
        nn.ConvTranspose2d(cfg.z_dim, ch[0], 4, 1, 0, bias=False),
        nn.BatchNorm2d(ch[0]),
        nn.ReLU(True),
    ]
    for i in range(n - 1):
        layers += [nn.ConvTranspose2d(ch[i], ch[i + 1], 4, 2, 1, bias=False), nn.BatchNorm2d(ch[i + 1]), nn.ReLU(True)]
    layers += [nn.ConvTranspose2d(ch[-1], 1, 4, 2, 1), nn.Tanh()]
    return nn.Sequential(*layers)


def build_discriminator(cfg: GanConfig):
    """image [B, 1, res, res] -> logit [B]; spectral norm on every layer keeps training stable."""
    import torch.nn as nn
    from torch.nn.utils.parametrizations import spectral_norm

    n = _n_up(cfg.res)
    ch = [cfg.ndf * 2 ** i for i in range(n)]
    layers: list = [spectral_norm(nn.Conv2d(1, ch[0], 4, 2, 1)), nn.LeakyReLU(0.2, True)]
    for i in range(n - 1):
        layers += [spectral_norm(nn.Conv2d(ch[i], ch[i + 1], 4, 2, 1)), nn.LeakyReLU(0.2, True)]
    layers += [spectral_norm(nn.Conv2d(ch[-1], 1, 4, 1, 0)), nn.Flatten(0)]
    return nn.Sequential(*layers)


@dataclass
class TrainResult:
    generator: object  # nn.Module, eval mode, on CPU
    curve: list  # [{"step", "loss_d", "loss_g", "d_real", "d_fake", "seconds"}]
    seconds: float
    steps_per_s: float


def to_unit(images: np.ndarray):
    """uint8 [N, R, R] -> float32 tensor [N, 1, R, R] in [-1, 1]."""
    import torch

    return torch.from_numpy(images.astype(np.float32) / 127.5 - 1.0).unsqueeze(1)


def train_gan(images: np.ndarray, cfg: GanConfig, device, seed: int,
              on_step: Callable[[int, dict], None] | None = None) -> TrainResult:
    """Train on uint8 [N, res, res] for ``cfg.steps`` steps (hinge loss, one D and one G update per step).

    Batches are drawn with replacement from a seeded generator, so a run is a function of
    ``(images, cfg, seed)`` (bit-exact on CPU with the same thread count).
    """
    import torch

    cfg.validate()
    if images.ndim != 3 or images.shape[1:] != (cfg.res, cfg.res):
        raise ValueError(f"expected uint8 [N, {cfg.res}, {cfg.res}], got {images.shape}")
    torch.manual_seed(seed)
    gen_cpu = torch.Generator().manual_seed(seed + 1)
    G = build_generator(cfg).to(device)
    D = build_discriminator(cfg).to(device)
    opt_g = torch.optim.Adam(G.parameters(), lr=cfg.lr_g, betas=cfg.betas)
    opt_d = torch.optim.Adam(D.parameters(), lr=cfg.lr_d, betas=cfg.betas)
    data = to_unit(images).to(device)
    n = data.shape[0]
    bs = cfg.batch_size
    curve: list[dict] = []
    acc = {"loss_d": 0.0, "loss_g": 0.0, "d_real": 0.0, "d_fake": 0.0}
    acc_n = 0
    t0 = time.perf_counter()
    G.train()
    D.train()
    for step in range(1, cfg.steps + 1):
        # indices and noise from a CPU generator: identical on CPU and CUDA for one seed
        idx = torch.randint(0, n, (bs,), generator=gen_cpu).to(device)
        z = torch.randn(bs, cfg.z_dim, generator=gen_cpu).to(device)
        real = data[idx]
        fake = G(z)
        d_real = D(real)
        d_fake = D(fake.detach())
        loss_d = torch.relu(1.0 - d_real).mean() + torch.relu(1.0 + d_fake).mean()
        opt_d.zero_grad(set_to_none=True)
        loss_d.backward()
        opt_d.step()
        loss_g = -D(fake).mean()
        opt_g.zero_grad(set_to_none=True)
        loss_g.backward()
        opt_g.step()

        acc["loss_d"] += float(loss_d.detach())
        acc["loss_g"] += float(loss_g.detach())
        acc["d_real"] += float(d_real.detach().mean())
        acc["d_fake"] += float(d_fake.detach().mean())
        acc_n += 1
        if step % cfg.log_every == 0 or step == cfg.steps:
            point = {"step": step, **{k: round(v / acc_n, 5) for k, v in acc.items()},
                     "seconds": round(time.perf_counter() - t0, 3)}
            if not all(math.isfinite(point[k]) for k in acc):
                raise GanprintError(f"--steps: GAN training diverged at step {step} (loss is not finite); "
                                    "lower the learning rate or change --seed")
            curve.append(point)
            acc = dict.fromkeys(acc, 0.0)
            acc_n = 0
        if on_step is not None:
            on_step(step, {"loss_d": float(loss_d.detach()), "loss_g": float(loss_g.detach())})
    seconds = time.perf_counter() - t0
    G.eval()
    return TrainResult(generator=G.cpu(), curve=curve, seconds=seconds, steps_per_s=cfg.steps / max(seconds, 1e-9))


def sample(G, n: int, z_dim: int, seed: int, device, batch_size: int = 256) -> np.ndarray:
    """``n`` images uint8 [n, res, res] from ``G`` (eval mode: BatchNorm running statistics)."""
    import torch

    gen_cpu = torch.Generator().manual_seed(seed)
    z = torch.randn(n, z_dim, generator=gen_cpu)
    G = G.to(device).eval()
    out = []
    with torch.inference_mode():
        for i in range(0, n, batch_size):
            x = G(z[i:i + batch_size].to(device)).float().cpu()
            out.append(((x[:, 0] + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8).numpy())
    G.cpu()
    return np.concatenate(out) if out else np.empty((0,), dtype=np.uint8)


def save_generator(G, cfg: GanConfig, path, extra: dict | None = None) -> None:
    """Generator weights as safetensors; metadata ``ganprint`` = JSON with the architecture."""
    from ganprint.artifacts import save_safetensors

    meta = {"format": GENERATOR_FORMAT, "arch": "dcgan", "config": asdict(cfg), **(extra or {})}
    state = {k: v.detach().contiguous().cpu() for k, v in G.state_dict().items()}
    save_safetensors(state, path, metadata={"ganprint": json.dumps(meta, sort_keys=True)})


def load_generator(path):
    """Rebuild a generator written by :func:`save_generator` -> ``(G in eval mode, GanConfig, metadata)``."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = json.loads((fh.metadata() or {})["ganprint"])
        state = load_file(str(path))
    except Exception as exc:
        raise GanprintError(f"{path}: not a ganprint generator file ({exc}); pass OUT/generator.safetensors from `ganprint synth`") from exc
    c = dict(meta["config"])
    c["betas"] = tuple(c.get("betas", (0.5, 0.999)))
    cfg = GanConfig(**c)
    G = build_generator(cfg)
    G.load_state_dict(state)
    return G.eval(), cfg, meta
