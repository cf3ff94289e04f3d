"""Fusion of several feature spaces or several attacks (``ganprint fuse``).

Two methods, both library-first (the CLI in :mod:`ganprint.cli.fuse` only parses options):

- :mod:`ganprint.fusion.moe` -- the paper's mixture of experts (section 3.3), done consistently:
  K embeddings artifacts of the same images [N, d_k] -> one fused embeddings artifact [N, d],
  trained with the contrastive objective of ``train`` on the frozen expert features.

  - :func:`train_moe(expert_artifacts, out_weights, config=None, out=None, progress=False, threads=None,
    **overrides)
    <ganprint.fusion.moe.train_moe>` -> :class:`~ganprint.fusion.moe.MoETrainResult`
  - :func:`apply_moe(weights, expert_artifacts, out) <ganprint.fusion.moe.apply_moe>`
    -> :class:`~ganprint.fusion.moe.MoEApplyResult`
  - :class:`~ganprint.fusion.moe.MoEFusion` the module; :class:`~ganprint.fusion.moe.MoEConfig` its knobs.

- :mod:`ganprint.fusion.stack` -- score-level stacking: a standardised logistic regression over the
  attack scores of several backbones / attacks, fit on labelled *dev* scores artifacts and applied
  to the matching *test* scores artifacts; the output is an ordinary ``scores`` artifact.

  - :func:`stack_scores(dev_paths, test_paths, out, rule="prob", C=1.0, cv=5, seed=0)
    <ganprint.fusion.stack.stack_scores>` -> :class:`~ganprint.fusion.stack.StackResult`

Fused embeddings are ordinary ``embeddings`` artifacts (same manifest as the inputs) and the
stacked output is an ordinary ``scores`` artifact, so every later stage accepts them.

Names are imported lazily: ``import ganprint.fusion`` does not import torch or scikit-learn.
"""

from __future__ import annotations

from typing import Any

_EXPORTS = {
    "MoEConfig": "moe",
    "MoEFusion": "moe",
    "MoETrainResult": "moe",
    "MoEApplyResult": "moe",
    "train_moe": "moe",
    "apply_moe": "moe",
    "load_moe": "moe",
    "fuse_features": "moe",
    "StackResult": "stack",
    "stack_scores": "stack",
    "fit_stacker": "stack",
    "read_scores": "stack",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(f"ganprint.fusion.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'ganprint.fusion' has no attribute {name!r}")
