"""Synthetic membership benchmark: CT-like phantoms (or your images), a GAN trained on the members.

``run_synth(out, regime="memorize", ...)`` writes an ImageCLEF-layout dataset with known labels;
see :mod:`ganprint.synth.dataset`.  Importing this package does not import torch.
"""

from ganprint.synth.dataset import REGIMES, SynthConfig, SynthOutcome, resolve_config, run_synth

__all__ = ["REGIMES", "SynthConfig", "SynthOutcome", "resolve_config", "run_synth"]
