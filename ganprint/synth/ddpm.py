"""A small denoising diffusion model (diffusers ``UNet2DModel``) trained on the members; DDIM sampling.

Training is the standard DDPM objective with diffusers' pieces: ``DDPMScheduler.add_noise`` makes
``x_t`` from a member ``x_0`` and Gaussian noise at a random timestep, the UNet predicts the noise,
MSE loss.  Sampling uses a ``DDIMScheduler`` built from the same schedule (eta = 0, deterministic
given the initial noise) in ``sample_steps`` steps.

Shapes: training images uint8 [N, R, R]; the UNet maps float [B, 1, R, R] (in [-1, 1]) and
timesteps [B] to a noise estimate [B, 1, R, R]; ``sample_ddpm`` returns uint8 [n, R, R].
Weights are saved as safetensors with the UNet and scheduler configs in the metadata, so
``load_ddpm`` rebuilds the model without pickle.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from typing import Callable

import numpy as np

from ganprint.errors import GanprintError

DDPM_FORMAT = 1


@dataclass(frozen=True)
class DdpmConfig:
    res: int = 32  # working resolution (square, a power of two)
    width: int = 16  # channels at full resolution; (width, 2 width, 2 width, ...) down the UNet
    levels: int = 3  # UNet resolutions (res, res/2, res/4 for 3)
    layers_per_block: int = 1
    batch_size: int = 16
    steps: int = 1000
    lr: float = 1e-3
    train_timesteps: int = 1000
    beta_schedule: str = "squaredcos_cap_v2"
    sample_steps: int = 10  # DDIM steps when sampling
    # "all": timesteps uniform over 0..train_timesteps-1 (plain DDPM); "sampler": only the
    # sample_steps timesteps the DDIM sampler visits, so a small budget is spent where sampling needs it
    train_t: str = "all"
    log_every: int = 25

    def validate(self) -> None:
        if self.res < 16 or self.res & (self.res - 1):
            raise GanprintError(f"--gan-res {self.res}: must be a power of two >= 16 (e.g. 32, 64, 128)")
        if self.res >> (self.levels - 1) < 4:
            raise GanprintError(f"--gan-res {self.res}: too small for a {self.levels}-level UNet; use at least "
                                f"{4 << (self.levels - 1)}")
        for name, v in (("--gan-width", self.width), ("--batch-size", self.batch_size), ("--steps", self.steps),
                        ("--ddpm-sample-steps", self.sample_steps)):
            if v < 1:
                raise GanprintError(f"{name} {v}: must be at least 1")
        if self.train_t not in ("all", "sampler"):
            raise GanprintError(f"--ddpm-train-t {self.train_t}: use all or sampler")
        if self.sample_steps > self.train_timesteps:
            raise GanprintError(f"--ddpm-sample-steps {self.sample_steps}: more than the {self.train_timesteps} "
                                "training timesteps; lower it")

    def unet_kwargs(self) -> dict:
        ch = tuple(self.width * (1 if i == 0 else 2) for i in range(self.levels))
        groups = math.gcd(8, self.width)
        return {"sample_size": self.res, "in_channels": 1, "out_channels": 1,
                "layers_per_block": self.layers_per_block, "block_out_channels": ch,
                "down_block_types": ["DownBlock2D"] * self.levels, "up_block_types": ["UpBlock2D"] * self.levels,
                "norm_num_groups": groups}

    def scheduler_kwargs(self) -> dict:
        return {"num_train_timesteps": self.train_timesteps, "beta_schedule": self.beta_schedule,
                "prediction_type": "epsilon", "clip_sample": True}


def build_unet(cfg: DdpmConfig):
    from diffusers import UNet2DModel

    return UNet2DModel(**cfg.unet_kwargs())


@dataclass
class DdpmResult:
    model: object  # UNet2DModel, eval mode, on CPU
    curve: list  # [{"step", "loss", "seconds"}]
    seconds: float
    steps_per_s: float


def train_ddpm(images: np.ndarray, cfg: DdpmConfig, device, seed: int,
               on_step: Callable[[int, dict], None] | None = None) -> DdpmResult:
    """Train on uint8 [N, res, res] for ``cfg.steps`` steps (batches with replacement, seeded).

    Batches, timesteps and noise come from a seeded CPU generator, so a run is a function of
    ``(images, cfg, seed)`` (bit-exact on CPU with the same thread count).
    """
    import torch
    import torch.nn.functional as F
    from diffusers import DDPMScheduler

    from ganprint.synth.gan import to_unit

    cfg.validate()
    if images.ndim != 3 or images.shape[1:] != (cfg.res, cfg.res):
        raise ValueError(f"expected uint8 [N, {cfg.res}, {cfg.res}], got {images.shape}")
    torch.manual_seed(seed)
    gen_cpu = torch.Generator().manual_seed(seed + 1)
    model = build_unet(cfg).to(device)
    sched = DDPMScheduler(**cfg.scheduler_kwargs())
    grid = sampler_timesteps(cfg) if cfg.train_t == "sampler" else None
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    data = to_unit(images).to(device)
    n, bs = data.shape[0], cfg.batch_size
    curve: list[dict] = []
    acc, acc_n = 0.0, 0
    t0 = time.perf_counter()
    model.train()
    for step in range(1, cfg.steps + 1):
        idx = torch.randint(0, n, (bs,), generator=gen_cpu)
        if grid is None:
            t = torch.randint(0, cfg.train_timesteps, (bs,), generator=gen_cpu)
        else:
            t = grid[torch.randint(0, len(grid), (bs,), generator=gen_cpu)]
        noise = torch.randn((bs, 1, cfg.res, cfg.res), generator=gen_cpu)
        x0 = data[idx.to(device)]
        noisy = sched.add_noise(x0, noise.to(device), t.to(device))
        loss = F.mse_loss(model(noisy, t.to(device)).sample, noise.to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        value = float(loss.detach())
        acc += value
        acc_n += 1
        if step % cfg.log_every == 0 or step == cfg.steps:
            point = {"step": step, "loss": round(acc / acc_n, 5), "seconds": round(time.perf_counter() - t0, 3)}
            if not math.isfinite(point["loss"]):
                raise GanprintError(f"--steps: DDPM training diverged at step {step} (loss is not finite); "
                                    "lower the learning rate or change --seed")
            curve.append(point)
            acc, acc_n = 0.0, 0
        if on_step is not None:
            on_step(step, {"loss": value})
    seconds = time.perf_counter() - t0
    model.eval()
    return DdpmResult(model=model.cpu(), curve=curve, seconds=seconds, steps_per_s=cfg.steps / max(seconds, 1e-9))


def ddim_scheduler(cfg: DdpmConfig):
    """The sampler: a DDIMScheduler on the training schedule, set to ``cfg.sample_steps`` steps."""
    from diffusers import DDIMScheduler

    sched = DDIMScheduler(**cfg.scheduler_kwargs())
    sched.set_timesteps(cfg.sample_steps)
    return sched


def sampler_timesteps(cfg: DdpmConfig):
    """int64 [sample_steps]: the timesteps DDIM sampling visits."""
    return ddim_scheduler(cfg).timesteps.clone()


def sample_ddpm(model, cfg: DdpmConfig, n: int, seed: int, device, batch_size: int = 250) -> np.ndarray:
    """``n`` images uint8 [n, res, res]: DDIM (eta 0) in ``cfg.sample_steps`` steps from seeded noise."""
    import torch

    sched = ddim_scheduler(cfg)
    noise = torch.randn((n, 1, cfg.res, cfg.res), generator=torch.Generator().manual_seed(seed))
    model = model.to(device).eval()
    out = []
    with torch.inference_mode():
        for i in range(0, n, batch_size):
            x = noise[i:i + batch_size].to(device)
            for t in sched.timesteps:
                x = sched.step(model(x, t).sample, t, x, eta=0.0).prev_sample
            x = x.float().cpu()
            out.append(((x[:, 0] + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8).numpy())
    model.cpu()
    return np.concatenate(out) if out else np.empty((0, cfg.res, cfg.res), dtype=np.uint8)


def save_ddpm(model, cfg: DdpmConfig, path, extra: dict | None = None) -> None:
    """UNet weights as safetensors; metadata ``ganprint`` = JSON with the configs."""
    from ganprint.artifacts import save_safetensors

    meta = {"format": DDPM_FORMAT, "arch": "ddpm-unet2d", "config": asdict(cfg), "unet": cfg.unet_kwargs(),
            "scheduler": cfg.scheduler_kwargs(), **(extra or {})}
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_safetensors(state, path, metadata={"ganprint": json.dumps(meta, sort_keys=True)})


def load_ddpm(path):
    """Rebuild a model written by :func:`save_ddpm` -> ``(UNet in eval mode, DdpmConfig, metadata)``."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = json.loads((fh.metadata() or {})["ganprint"])
        state = load_file(str(path))
        if meta.get("arch") != "ddpm-unet2d":
            raise ValueError(f"arch {meta.get('arch')!r}, not ddpm-unet2d")
    except Exception as exc:
        raise GanprintError(f"{path}: not a ganprint DDPM file ({exc}); pass OUT/generator.safetensors "
                            "from `ganprint synth --generator ddpm`") from exc
    cfg = DdpmConfig(**meta["config"])
    model = build_unet(cfg)
    model.load_state_dict(state)
    return model.eval(), cfg, meta
