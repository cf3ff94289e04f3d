"""Regime defaults of ``ganprint synth`` (no heavy imports: the CLI reads them for its help).

Regimes trade training-set size against passes over each image, at the same cost (steps x
batch): 40 members seen ~1200 times each are memorised (strong membership signal); 500 members
seen ~100 times each are not (weak signal).  ``copies`` is ``balanced`` with 15% of the generated
images replaced by transformed replicas of members (``synth --copies``).  Measured with bench/synth_signal.py; each default
run takes under 5 minutes of one CPU core.
"""

from __future__ import annotations

from typing import Any

REGIMES: dict[str, dict[str, Any]] = {
    "memorize": {"dev_real": 20, "test_real": 20, "steps": 3000},
    "balanced": {"dev_real": 60, "test_real": 60, "steps": 3000},
    "generalize": {"dev_real": 250, "test_real": 250, "steps": 3000},
    "copies": {"dev_real": 60, "test_real": 60, "steps": 3000, "copies": 0.15},
}


def regime_help(key: str) -> str:
    """``memorize 20, balanced 60, generalize 250, ...`` for one regime parameter (regimes that set it)."""
    return ", ".join(f"{name} {values[key]}" for name, values in REGIMES.items() if key in values)
