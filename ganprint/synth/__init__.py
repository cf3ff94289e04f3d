"""Synthetic membership benchmark: CT-like phantoms (or your images), a GAN trained on the members.

``run_synth(out, regime="memorize", ...)`` writes an ImageCLEF-layout dataset with known labels;
see :mod:`ganprint.synth.dataset`.  Importing this package imports neither numpy nor torch (the
names below load :mod:`ganprint.synth.dataset` on first use).
"""

from ganprint.synth.regimes import REGIMES

__all__ = ["REGIMES", "SynthConfig", "SynthOutcome", "resolve_config", "run_synth"]


def __getattr__(name: str):
    if name in ("SynthConfig", "SynthOutcome", "resolve_config", "run_synth"):
        from ganprint.synth import dataset

        return getattr(dataset, name)
    raise AttributeError(f"module 'ganprint.synth' has no attribute {name!r}")
