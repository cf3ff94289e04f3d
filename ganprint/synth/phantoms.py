"""Procedural CT-like axial chest slices ("phantoms") with per-patient anatomy.

A *patient* is a set of random anatomical parameters (body outline, lungs, heart, spine, ribs,
vessels, nodules, tuberculosis-like lesions, scanner noise).  A *slice* of that patient at
height ``z`` (in slice steps) moves the anatomy a little: vessels drift, nodules grow and
shrink as spheres do, the lungs change size.  Neighbouring slices of one patient are therefore
near-duplicates, as in real CT volumes, while two patients differ clearly.

Geometry is defined in normalised coordinates (-1..1), so a slice renders at any size:
``render_slice(patient, z, size, rng)`` -> uint8 [size, size] (0 = air, ~150 soft tissue, ~240 bone,
lungs dark, as in a lung window).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class Patient:
    """Random anatomy of one patient; every field is in normalised image coordinates."""

    seed: int
    body: tuple  # (cx, cy, ax, ay, angle)
    fat: float  # thickness of the subcutaneous fat ring (fraction of the body radius)
    lungs: list  # per lung (cx, cy, ax, ay, angle, dz_growth)
    heart: tuple  # (cx, cy, ax, ay, angle)
    spine: tuple  # (cx, cy, r)
    ribs: list  # (angle on the body outline, size)
    vessels: list  # (x0, y0, dx_per_slice, dy_per_slice, r, brightness)
    nodules: list  # (x, y, z0, r, brightness)
    lesions: list  # (x, y, ax, ay, angle, kind, strength); kind 0 consolidation, 1 cavity
    levels: dict = field(default_factory=dict)  # gray levels of tissues
    noise: float = 6.0  # std of the additive noise (gray levels)
    blur: float = 0.6  # Gaussian blur sigma in pixels at 256 px


def _ellipse(xx, yy, cx, cy, ax, ay, angle):
    """Normalised squared radius of each pixel w.r.t. an ellipse: <1 inside."""
    c, s = np.float32(np.cos(angle)), np.float32(np.sin(angle))
    dx, dy = xx - np.float32(cx), yy - np.float32(cy)
    u = (dx * c + dy * s) * np.float32(1.0 / ax)
    v = (dy * c - dx * s) * np.float32(1.0 / ay)
    return u * u + v * v


def make_patient(rng: np.random.Generator, seed: int = 0) -> Patient:
    """Draw one patient's anatomy from ``rng``."""
    u = rng.uniform
    bx, by = u(-0.05, 0.05), u(-0.02, 0.10)
    bax, bay = u(0.76, 0.94), u(0.52, 0.70)
    body = (bx, by, bax, bay, u(-0.06, 0.06))
    lungs = []
    for side in (-1, 1):
        lax = bax * u(0.30, 0.42)
        lay = bay * u(0.62, 0.80)
        lcx = bx + side * bax * u(0.40, 0.52)
        lcy = by - bay * u(0.02, 0.15)
        lungs.append((lcx, lcy, lax, lay, side * u(0.0, 0.35), u(-0.015, 0.015)))
    heart = (bx + u(-0.02, 0.12), by + bay * u(0.02, 0.22), bax * u(0.16, 0.26), bay * u(0.26, 0.40), u(-0.6, 0.6))
    spine = (bx + u(-0.02, 0.02), by + bay * u(0.66, 0.78), bay * u(0.11, 0.15))
    # ribs all around the chest wall except in front, where the sternum is (image y grows downwards)
    ribs = [(a + u(-0.08, 0.08), u(0.022, 0.036))
            for a in np.linspace(-np.pi / 2 + 0.55, 3 * np.pi / 2 - 0.55, int(rng.integers(10, 17)))]
    vessels = []
    for _ in range(int(rng.integers(8, 26))):
        lung = lungs[int(rng.integers(0, 2))]
        r, t = np.sqrt(u(0, 0.8)), u(0, 2 * np.pi)
        x0 = lung[0] + r * lung[2] * np.cos(t)
        y0 = lung[1] + r * lung[3] * np.sin(t)
        vessels.append((x0, y0, u(-0.01, 0.01), u(-0.01, 0.01), u(0.008, 0.028), u(0.7, 1.0)))
    nodules = []
    for _ in range(int(rng.poisson(1.5))):
        lung = lungs[int(rng.integers(0, 2))]
        r, t = np.sqrt(u(0, 0.7)), u(0, 2 * np.pi)
        nodules.append((lung[0] + r * lung[2] * np.cos(t), lung[1] + r * lung[3] * np.sin(t),
                        u(-3, 3), u(0.03, 0.08), u(0.8, 1.0)))
    lesions = []
    for _ in range(int(rng.poisson(1.2))):
        lung = lungs[int(rng.integers(0, 2))]
        r, t = np.sqrt(u(0, 0.5)), u(0, 2 * np.pi)
        lesions.append((lung[0] + r * lung[2] * np.cos(t), lung[1] + r * lung[3] * np.sin(t),
                        u(0.05, 0.16), u(0.05, 0.14), u(0, np.pi), int(rng.integers(0, 2)), u(0.5, 1.0)))
    levels = {
        "tissue": u(140, 165), "fat": u(95, 120), "lung": u(15, 45), "heart": u(150, 175),
        "bone": u(225, 250), "vessel": u(130, 170), "table": u(70, 100),
    }
    return Patient(seed=seed, body=body, fat=u(0.04, 0.12), lungs=lungs, heart=heart, spine=spine, ribs=ribs,
                   vessels=vessels, nodules=nodules, lesions=lesions, levels=levels,
                   noise=u(3.0, 9.0), blur=u(0.4, 1.0))


class _Canvas:
    """A float image [size, size] with painting restricted to each shape's bounding box (speed)."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.img = np.zeros((size, size), dtype=np.float32)
        self.lin = ((np.arange(size, dtype=np.float64) + 0.5) / size * 2.0 - 1.0).astype(np.float32)

    def window(self, cx, cy, rx, ry):
        """Pixel slices covering the box cx±rx, cy±ry, and the coordinate grids inside it."""
        s = self.size
        x0 = max(0, int((cx - rx + 1.0) / 2.0 * s) - 1)
        x1 = min(s, int((cx + rx + 1.0) / 2.0 * s) + 2)
        y0 = max(0, int((cy - ry + 1.0) / 2.0 * s) - 1)
        y1 = min(s, int((cy + ry + 1.0) / 2.0 * s) + 2)
        if x1 <= x0 or y1 <= y0:
            return None
        xx, yy = np.meshgrid(self.lin[x0:x1], self.lin[y0:y1])
        return (slice(y0, y1), slice(x0, x1)), xx, yy

    def ellipse(self, cx, cy, ax, ay, angle, value, where=None):
        r = max(ax, ay)
        w = self.window(cx, cy, r, r)
        if w is None:
            return
        sl, xx, yy = w
        m = _ellipse(xx, yy, cx, cy, ax, ay, angle) < 1.0
        if where is not None:
            m &= where[sl]
        self.img[sl][m] = value


def render_slice(p: Patient, z: float, size: int, noise_rng: np.random.Generator) -> np.ndarray:
    """Render patient ``p`` at slice height ``z`` -> uint8 [size, size]."""
    from scipy.ndimage import gaussian_filter

    L = p.levels
    cv = _Canvas(size)
    img = cv.img
    xx, yy = np.meshgrid(cv.lin, cv.lin)

    # CT table under the patient: a shallow bright arc below the body
    bx, by, bax, bay, bang = p.body
    ty = by + bay + 0.04 + 0.05 * xx * xx
    img[(yy > ty) & (yy < ty + 0.03)] = L["table"]

    cv.ellipse(bx, by, bax, bay, bang, L["fat"])
    cv.ellipse(bx, by, bax * (1 - p.fat), bay * (1 - p.fat), bang, L["tissue"])
    k = (1 - p.fat) * 0.92
    for ang, rs in p.ribs:
        cv.ellipse(bx + np.cos(ang) * bax * k, by + np.sin(ang) * bay * k, rs * 1.5, rs, ang + np.pi / 2, L["bone"])
    cv.ellipse(bx, by - bay * k, 0.05, 0.025, 0.0, L["bone"])  # sternum

    hx, hy, hax, hay, hang = p.heart
    # a mediastinal notch makes the lungs kidney-shaped rather than plain ellipses
    notch = _ellipse(xx, yy, hx, hy, hax * 1.15, hay * 1.1, hang) < 1.0
    lung_mask = np.zeros((size, size), dtype=bool)
    for cx, cy, ax, ay, ang, dzg in p.lungs:
        g = 1.0 + dzg * z
        lung_mask |= _ellipse(xx, yy, cx, cy, ax * g, ay * g, ang) < 1.0
    lung_mask &= ~notch
    img[lung_mask] = L["lung"]

    cv.ellipse(hx, hy, hax, hay, hang, L["heart"])
    sx, sy, sr = p.spine
    cv.ellipse(sx, sy, sr * 1.1, sr, 0.0, L["bone"])
    cv.ellipse(sx, sy + sr * 1.25, sr * 0.45, sr * 0.35, 0.0, L["tissue"])  # spinal canal
    cv.ellipse(sx, sy + sr * 1.9, sr * 0.35, sr * 0.5, 0.0, L["bone"])  # spinous process
    cv.ellipse(sx + sr * 0.2, sy - sr * 1.3, sr * 0.55, sr * 0.55, 0.0, L["vessel"] + 15)  # aorta

    for x0, y0, ddx, ddy, r, b in p.vessels:
        cv.ellipse(x0 + ddx * z, y0 + ddy * z, r, r, 0.0, L["vessel"] * b, where=lung_mask)
    for x, y, z0, r, b in p.nodules:
        rz2 = r * r - (0.02 * (z - z0)) ** 2  # a sphere: its cross-section shrinks away from z0
        if rz2 > 0:
            rr = float(np.sqrt(rz2))
            cv.ellipse(x, y, rr, rr, 0.0, L["vessel"] * b, where=lung_mask)
    for x, y, ax, ay, ang, kind, s in p.lesions:
        w = cv.window(x, y, max(ax, ay), max(ax, ay))
        if w is None:
            continue
        sl, wx, wy = w
        d = _ellipse(wx, wy, x, y, ax, ay, ang)
        inside = (d < 1.0) & lung_mask[sl]
        sub = img[sl]
        if kind == 0:  # consolidation: a soft bright patch fading to its edge
            sub[inside] += (L["tissue"] - L["lung"]) * s * (1.0 - d[inside]) ** 0.5 * 0.8
        else:  # cavity: a bright wall around an air-filled hole
            sub[inside & (d > 0.55)] = L["tissue"] * 0.9
            sub[inside & (d <= 0.55)] = 5.0

    img = gaussian_filter(img, sigma=p.blur * size / 256.0, truncate=3.0)
    img += noise_rng.standard_normal(img.shape, dtype=np.float32) * np.float32(p.noise) * (img > 2.0)
    return np.clip(img + 0.5, 0, 255).astype(np.uint8)


def render_patients(n_patients: int, slices_per_patient: int, size: int, seed: int,
                    on_image=None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``n_patients`` x ``slices_per_patient`` neighbouring slices.

    Returns ``(images uint8 [N, size, size], patient int64 [N], slice int64 [N])`` with
    ``N = n_patients * slices_per_patient``, patients in order.  Patient ``i`` depends only on
    ``(seed, i)``, so asking for more patients keeps the first ones unchanged.
    """
    n = n_patients * slices_per_patient
    imgs = np.empty((n, size, size), dtype=np.uint8)
    pat = np.repeat(np.arange(n_patients), slices_per_patient)
    sl = np.tile(np.arange(slices_per_patient), n_patients)
    k = 0
    for i in range(n_patients):
        rng = np.random.default_rng([seed, i, 0x5EED])
        p = make_patient(rng, seed=i)
        z_start = rng.uniform(-2, 2)
        for j in range(slices_per_patient):
            imgs[k] = render_slice(p, z_start + j, size, rng)
            k += 1
            if on_image is not None:
                on_image()
    return imgs, pat, sl
