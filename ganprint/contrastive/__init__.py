"""Contrastive fine-tuning (MoCo v2 with similarity-picked positives, the paper's sections 3.1-3.2).

Library API (torch is imported only when these are called):

- :func:`train` ``(config, resume=False, progress=False) -> Path`` of the checkpoint;
- :func:`run_training` -> :class:`ganprint.contrastive.trainer.TrainResult` (losses, timing, ...);
- :class:`ganprint.contrastive.config.TrainConfig` (``TrainConfig.from_preset("cpu-small", data=...)``);
- :func:`ganprint.contrastive.loss.hybrid_contrastive_loss` (q, k_pos, negatives, tau, alpha, pos_mask);
- :func:`ganprint.contrastive.restore.apply_checkpoint` to embed with a checkpoint.

Modules: ``config`` (keys, TOML), ``pools`` (positive pools), ``queue`` (FIFO of keys), ``heads``
(projection head, per-sample temperature), ``loss``, ``momentum`` (EMA), ``augment`` (CT views),
``distributed`` (torchrun/DDP), ``trainer`` (the loop, checkpoints, resume).
"""

from __future__ import annotations

from ganprint.contrastive.config import TrainConfig, load_config


def train(config, resume: bool = False, progress: bool = False):
    """Fine-tune as ``config`` says (TrainConfig, mapping of keys, or TOML path / preset name);
    returns the path of the checkpoint."""
    from ganprint.contrastive.trainer import train as _train

    return _train(config, resume=resume, progress=progress)


def run_training(config, resume: bool = False, progress: bool = False, log=None):
    from ganprint.contrastive.trainer import run_training as _run

    return _run(config, resume=resume, progress=progress, log=log)


__all__ = ["TrainConfig", "load_config", "train", "run_training"]
