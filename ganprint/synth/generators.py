"""Generator families of ``ganprint synth --generator NAME``: a registry name -> backend.

A backend turns the run's :class:`~ganprint.synth.dataset.SynthConfig` into its own config,
trains on the members (uint8 [N, R, R] at the working resolution ``R = cfg.gan_res``), samples
uint8 [n, R, R], saves its weights as safetensors and describes itself for ``synth.json``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Callable

import numpy as np


@dataclass(frozen=True)
class Backend:
    name: str
    arch: str  # recorded in synth.json ("generator.arch")
    make_config: Callable[[Any], Any]  # SynthConfig -> the backend's config dataclass
    train: Callable[..., Any]  # (images, gcfg, device, seed, on_step) -> result with .curve .seconds .steps_per_s
    sample: Callable[..., np.ndarray]  # (result, gcfg, n, seed, device) -> uint8 [n, R, R]
    save: Callable[..., None]  # (result, gcfg, path, extra) -> None
    describe: Callable[[Any], dict]  # gcfg -> extra synth.json fields ("config", ...)
    loss_keys: tuple[str, ...]  # keys of the curve points that are losses
    progress: Callable[[dict], str]  # losses of one step -> progress-bar text


GENERATORS: dict[str, Backend] = {}


def register_generator(backend: Backend) -> Backend:
    if not backend.name or not backend.name.isidentifier():
        raise ValueError(f"generator name {backend.name!r}: must be an identifier")
    if backend.name in GENERATORS:
        raise ValueError(f"generator {backend.name!r} is already registered")
    for field in ("make_config", "train", "sample", "save", "describe", "progress"):
        if not callable(getattr(backend, field)):
            raise TypeError(f"generator {backend.name!r}: {field} is not callable")
    GENERATORS[backend.name] = backend
    return backend


# -- dcgan ---------------------------------------------------------------------------------------

def _dcgan_config(cfg):
    from ganprint.synth.gan import GanConfig

    return GanConfig(res=cfg.gan_res, z_dim=cfg.z_dim, ngf=cfg.gan_width, ndf=cfg.gan_width,
                     batch_size=cfg.batch_size, steps=cfg.steps, lr_g=cfg.lr, lr_d=cfg.lr, log_every=cfg.log_every)


def _dcgan_train(images, gcfg, device, seed, on_step):
    from ganprint.synth.gan import train_gan

    return train_gan(images, gcfg, device, seed=seed, on_step=on_step)


def _dcgan_sample(res, gcfg, n, seed, device):
    from ganprint.synth.gan import sample

    return sample(res.generator, n, gcfg.z_dim, seed, device)


def _dcgan_save(res, gcfg, path, extra):
    import ganprint.synth.gan as gan  # looked up at call time (tests replace it)

    gan.save_generator(res.generator, gcfg, path, extra=extra)


register_generator(Backend(
    name="dcgan", arch="dcgan-sn-hinge", make_config=_dcgan_config, train=_dcgan_train, sample=_dcgan_sample,
    save=_dcgan_save, describe=lambda gcfg: {"config": asdict(gcfg)}, loss_keys=("loss_d", "loss_g"),
    progress=lambda losses: f"D {losses['loss_d']:.3f}  G {losses['loss_g']:.3f}",
))


# -- ddpm ----------------------------------------------------------------------------------------

def _ddpm_config(cfg):
    from ganprint.synth.ddpm import DdpmConfig

    return DdpmConfig(res=cfg.gan_res, width=cfg.gan_width, batch_size=cfg.batch_size, steps=cfg.steps, lr=cfg.lr,
                      sample_steps=cfg.ddpm_sample_steps, train_t=cfg.ddpm_train_t, log_every=cfg.log_every)


def _ddpm_train(images, gcfg, device, seed, on_step):
    from ganprint.synth.ddpm import train_ddpm

    return train_ddpm(images, gcfg, device, seed=seed, on_step=on_step)


def _ddpm_sample(res, gcfg, n, seed, device):
    from ganprint.synth.ddpm import sample_ddpm

    return sample_ddpm(res.model, gcfg, n, seed, device)


def _ddpm_save(res, gcfg, path, extra):
    import ganprint.synth.ddpm as ddpm

    ddpm.save_ddpm(res.model, gcfg, path, extra=extra)


def _ddpm_describe(gcfg) -> dict:
    import diffusers

    return {"config": asdict(gcfg), "unet": gcfg.unet_kwargs(), "scheduler": gcfg.scheduler_kwargs(),
            "sampler": f"DDIM, eta 0, {gcfg.sample_steps} steps", "diffusers": diffusers.__version__}


register_generator(Backend(
    name="ddpm", arch="ddpm-unet2d", make_config=_ddpm_config, train=_ddpm_train, sample=_ddpm_sample,
    save=_ddpm_save, describe=_ddpm_describe, loss_keys=("loss",), progress=lambda losses: f"loss {losses['loss']:.4f}",
))
