"""Replicas: generated images that are transformed copies of training members (``synth --copies F``).

Memorising generators also emit their training images shifted, slightly rotated, re-contrasted,
blurred or noisy (Somepalli et al. 2023, Carlini et al. 2023).  ``synth --copies F`` replaces a
fraction ``F`` of each split's generated images by such replicas of random members of the
generator's training set, each under its own random transform:

- rotation about the centre, uniform in ``[-rotation, rotation]`` degrees;
- translation ``(shift_x, shift_y)``, each uniform in ``[-shift, shift]`` times the side;
- gamma ``x -> x ** gamma`` on [0, 1], log-uniform in ``[gamma_min, gamma_max]``;
- blur: down-sampling by a factor uniform in ``[1, blur]`` (area) and back up (bilinear);
- Gaussian noise, sigma uniform in ``[0, noise]`` gray levels (0..255).

The transform is applied to the member as the generator saw it (uint8 [R, R] at the generator's
working resolution) with OpenCV, so a replica then goes through exactly the same up-sampling and
palette-PNG writing as a real sample: nothing but its content tells them apart.

Truth: ``OUT/replicas.csv`` (columns :data:`REPLICA_COLUMNS`), read back with :func:`read_replicas`.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ganprint.errors import GanprintError

REPLICAS_FILE = "replicas.csv"
# image_id/file: the generated image; source_*: the member it copies; then the transform
REPLICA_COLUMNS = ("image_id", "file", "split", "source_id", "source_file", "source_split",
                   "rotation_deg", "shift_x", "shift_y", "gamma", "blur", "noise_sigma")
_FLOATS = ("rotation_deg", "shift_x", "shift_y", "gamma", "blur", "noise_sigma")


@dataclass(frozen=True)
class ReplicaRanges:
    """Bounds of the random transform (see the module docstring); all inclusive."""

    rotation: float = 10.0  # degrees, +-
    shift: float = 0.08  # fraction of the side, +- per axis
    gamma_min: float = 0.8
    gamma_max: float = 1.25
    blur: float = 2.0  # largest down-sampling factor (1 = no blur)
    noise: float = 6.0  # largest Gaussian sigma, gray levels

    def validate(self) -> None:
        if not (0 <= self.rotation <= 180):
            raise GanprintError(f"--copy-rotation {self.rotation}: must be between 0 and 180 degrees")
        if not (0 <= self.shift < 0.5):
            raise GanprintError(f"--copy-shift {self.shift}: must be in [0, 0.5) (a fraction of the side)")
        if not (0 < self.gamma_min <= self.gamma_max) or not math.isfinite(self.gamma_max):
            raise GanprintError(f"--copy-gamma-min {self.gamma_min} / --copy-gamma-max {self.gamma_max}: "
                                "need 0 < min <= max")
        if not (1 <= self.blur <= 16):
            raise GanprintError(f"--copy-blur {self.blur}: must be between 1 (no blur) and 16")
        if not (0 <= self.noise <= 128):
            raise GanprintError(f"--copy-noise {self.noise}: must be between 0 and 128 gray levels")


def random_transform(rng: np.random.Generator, ranges: ReplicaRanges) -> dict:
    """One transform's parameters (the ``_FLOATS`` columns of replicas.csv), drawn from ``rng``."""
    return {
        "rotation_deg": float(rng.uniform(-ranges.rotation, ranges.rotation)),
        "shift_x": float(rng.uniform(-ranges.shift, ranges.shift)),
        "shift_y": float(rng.uniform(-ranges.shift, ranges.shift)),
        "gamma": float(math.exp(rng.uniform(math.log(ranges.gamma_min), math.log(ranges.gamma_max)))),
        "blur": float(rng.uniform(1.0, ranges.blur)),
        "noise_sigma": float(rng.uniform(0.0, ranges.noise)),
    }


def apply_transform(image: np.ndarray, params: dict, rng: np.random.Generator) -> np.ndarray:
    """uint8 [H, W] -> uint8 [H, W]: rotate + translate, gamma, blur, noise (in that order).

    ``rng`` draws the noise; borders created by the warp repeat the edge pixels (air in a CT slice).
    """
    import cv2

    h, w = image.shape
    m = cv2.getRotationMatrix2D(((w - 1) / 2.0, (h - 1) / 2.0), params["rotation_deg"], 1.0)
    m[0, 2] += params["shift_x"] * w
    m[1, 2] += params["shift_y"] * h
    x = cv2.warpAffine(image.astype(np.float32) / 255.0, m, (w, h), flags=cv2.INTER_LINEAR,
                       borderMode=cv2.BORDER_REPLICATE)
    x = np.power(np.clip(x, 0.0, 1.0), params["gamma"], dtype=np.float32)
    if params["blur"] > 1.0:
        small = (max(1, round(w / params["blur"])), max(1, round(h / params["blur"])))
        x = cv2.resize(cv2.resize(x, small, interpolation=cv2.INTER_AREA), (w, h), interpolation=cv2.INTER_LINEAR)
    x = x * 255.0
    if params["noise_sigma"] > 0:
        x = x + rng.normal(0.0, params["noise_sigma"], x.shape).astype(np.float32)
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


@dataclass
class ReplicaPlan:
    """Which generated images of one split become replicas, of which member, under which transform.

    ``slots`` int [K]: positions in the split's generated images; ``sources`` int [K]: positions in
    the generator's training images; ``params``: K transform dicts.
    """

    split: str
    n_generated: int
    slots: np.ndarray
    sources: np.ndarray
    params: list


def plan_replicas(n_generated: dict[str, int], n_members: int, fraction: float, ranges: ReplicaRanges,
                  seed: int) -> tuple[list[ReplicaPlan], np.random.Generator]:
    """``round(fraction * n)`` replicas per split (dev, then test), sources uniform over all members.

    Returns the plans and the generator that then draws the noise, so a run is a function of the seed.
    """
    rng = np.random.default_rng([seed, 0xC0915])
    plans = []
    for split, n in n_generated.items():
        k = int(round(fraction * n))
        slots = np.sort(rng.choice(n, size=k, replace=False)) if k else np.empty(0, dtype=np.int64)
        sources = rng.integers(0, n_members, size=k) if k else np.empty(0, dtype=np.int64)
        params = [random_transform(rng, ranges) for _ in range(k)]
        plans.append(ReplicaPlan(split, n, slots.astype(np.int64), sources.astype(np.int64), params))
    return plans, rng


def make_replicas(train_images: np.ndarray, plan: ReplicaPlan, rng: np.random.Generator) -> np.ndarray:
    """uint8 [N, R, R] training images -> uint8 [K, R, R] replicas of ``plan``."""
    r = train_images.shape[1:]
    out = np.empty((len(plan.slots), *r), dtype=np.uint8)
    for j, (src, params) in enumerate(zip(plan.sources, plan.params)):
        out[j] = apply_transform(train_images[src], params, rng)
    return out


def write_replicas_csv(path: Path, rows: list[dict]) -> None:
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(REPLICA_COLUMNS), lineterminator="\n")
        w.writeheader()
        for r in rows:
            w.writerow({k: (f"{r[k]:.6f}" if k in _FLOATS else r[k]) for k in REPLICA_COLUMNS})


def read_replicas(out: str | Path) -> list[dict]:
    """Rows of ``OUT/replicas.csv`` (floats parsed); ``[]`` when the dataset has no replicas file."""
    path = Path(out) / REPLICAS_FILE
    if not path.exists():
        return []
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    for r in rows:
        for k in _FLOATS:
            r[k] = float(r[k])
    return rows
