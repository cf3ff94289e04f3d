"""Batched, seeded augmentations for grayscale CT slices, and conversion to model input.

Images are cached once as uint8 grayscale [N, S, S] (S a bit above the training resolution, so
crops keep detail).  A view is made on the fly, for a whole batch at once:

1. geometry, one ``grid_sample``: random resized crop (area in [crop_min, 1], aspect ratio in
   [3/4, 4/3]), horizontal flip, small rotation; outside the image is 0 (air);
2. intensity, CT-style: window jitter (the window's low/high ends move by up to ``window`` of the
   range, i.e. level and width change), gamma exp(U(-g, g)), Gaussian noise with sigma in
   U(0, noise);
3. normalisation with the backbone's mean/std, grayscale replicated to 3 channels for RGB models.

All random numbers come from a ``torch.Generator`` the caller seeds, drawn on the CPU, so a
view depends only on (images, seed) -- not on the device or on what ran before.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class AugmentConfig:
    crop_min: float = 0.5
    flip: bool = True
    rotate: float = 10.0  # degrees
    window: float = 0.2
    gamma: float = 0.3
    noise: float = 0.02

    @classmethod
    def from_train_config(cls, cfg) -> "AugmentConfig":
        return cls(cfg.aug_crop_min, cfg.aug_flip, cfg.aug_rotate, cfg.aug_window, cfg.aug_gamma, cfg.aug_noise)


def cache_size(image_size: int, native: int = 256) -> int:
    """Resolution to cache images at: up to 2x the training size (crops then downsample), never
    below the training size, and not above ``native`` unless training needs it."""
    return max(image_size, min(2 * image_size, native))


def to_cache(arr: np.ndarray, size: int) -> np.ndarray:
    """Decoded image uint8 [H, W] or [H, W, 3] -> uint8 grayscale [size, size] (area/bicubic resize)."""
    from PIL import Image

    from ganprint.data import to_gray

    img = Image.fromarray(to_gray(arr))
    if img.size != (size, size):
        img = img.resize((size, size), resample=Image.BICUBIC, reducing_gap=2.0)
    return np.asarray(img, dtype=np.uint8)


def _uniform(n: int, lo: float, hi: float, g: torch.Generator) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(n, generator=g, dtype=torch.float64)


def augment(images: torch.Tensor, out_size: int, cfg: AugmentConfig, generator: torch.Generator) -> torch.Tensor:
    """uint8 [N, S, S] -> float32 [N, 1, out_size, out_size] in [0, 1], one random view each."""
    n = images.shape[0]
    dev = images.device
    x = images[:, None].float().div_(255.0)
    if n == 0:
        return x.new_zeros(0, 1, out_size, out_size)
    g = generator
    # geometry: theta maps output coords (-1..1) to input coords
    area = _uniform(n, cfg.crop_min, 1.0, g)
    # aspect ratio within [3/4, 4/3] *and* such that the crop fits (w, h <= 1): no clamping,
    # which would change the area, and area 1 means exactly the whole image
    lo_r = torch.clamp(torch.log(area), min=math.log(3 / 4))
    hi_r = torch.clamp(-torch.log(area), max=math.log(4 / 3))
    ratio = torch.exp(lo_r + (hi_r - lo_r) * torch.rand(n, generator=g, dtype=torch.float64))
    w = torch.sqrt(area * ratio).clamp(max=1.0)
    h = torch.sqrt(area / ratio).clamp(max=1.0)
    cx = (1.0 - w) * _uniform(n, -1.0, 1.0, g)
    cy = (1.0 - h) * _uniform(n, -1.0, 1.0, g)
    flip = torch.where(torch.rand(n, generator=g, dtype=torch.float64) < 0.5, -1.0, 1.0) if cfg.flip \
        else torch.ones(n, dtype=torch.float64)
    ang = _uniform(n, -cfg.rotate, cfg.rotate, g) * (math.pi / 180.0)
    cos, sin = torch.cos(ang), torch.sin(ang)
    theta = torch.stack([
        torch.stack([w * cos * flip, -h * sin, cx], 1),
        torch.stack([w * sin * flip, h * cos, cy], 1),
    ], 1).float().to(dev)
    grid = F.affine_grid(theta, [n, 1, out_size, out_size], align_corners=False)
    # the cache is at most 2x the output size, so bilinear sampling averages ~2x2 source pixels
    # and does not alias much
    v = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    # intensity: window jitter (level and width), gamma, noise
    lo = (_uniform(n, -cfg.window, cfg.window, g) * 0.5).float().to(dev)
    hi = (1.0 + _uniform(n, -cfg.window, cfg.window, g) * 0.5).float().to(dev)
    v = ((v - lo[:, None, None, None]) / (hi - lo).clamp(min=0.05)[:, None, None, None]).clamp_(0.0, 1.0)
    gamma = torch.exp(_uniform(n, -cfg.gamma, cfg.gamma, g)).float().to(dev)
    v = v.clamp(min=1e-6).pow(gamma[:, None, None, None])
    if cfg.noise > 0:
        sigma = _uniform(n, 0.0, cfg.noise, g).float().to(dev)
        noise = torch.randn(v.shape, generator=g).to(dev)
        v = (v + sigma[:, None, None, None] * noise).clamp_(0.0, 1.0)
    return v


def plain_view(images: torch.Tensor, out_size: int) -> torch.Tensor:
    """uint8 [N, S, S] -> float32 [N, 1, out_size, out_size] in [0, 1], resized only."""
    x = images[:, None].float().div_(255.0)
    if x.shape[-1] == out_size:
        return x
    return F.interpolate(x, size=(out_size, out_size), mode="bilinear", antialias=True, align_corners=False)


def to_model_input(v: torch.Tensor, preprocess, channels_last: bool = False) -> torch.Tensor:
    """[N, 1, H, W] in [0, 1] -> [N, C, H, W] normalised with the backbone's mean/std."""
    c = len(preprocess.mean)
    mean = torch.tensor(preprocess.mean, dtype=v.dtype, device=v.device)[None, :, None, None]
    std = torch.tensor(preprocess.std, dtype=v.dtype, device=v.device)[None, :, None, None]
    x = (v.expand(-1, c, -1, -1) - mean) / std
    return x.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


def _resize_u8(images: np.ndarray, size: int) -> np.ndarray:
    """uint8 [N, S, S] -> uint8 [N, size, size] (OpenCV area down, bilinear up)."""
    import cv2

    if images.shape[-1] == size:
        return images
    interp = cv2.INTER_AREA if size < images.shape[-1] else cv2.INTER_LINEAR
    return np.stack([cv2.resize(a, (size, size), interpolation=interp) for a in images])


def replica_views(images: torch.Tensor, out_size: int, generator: torch.Generator, ranges=None,
                  work_size: int = 0) -> tuple[torch.Tensor, list[dict]]:
    """uint8 [N, S, S] -> (float32 [N, 1, out_size, out_size] in [0, 1], N transform dicts).

    Each image gets its own random replica transform, drawn and applied by
    :mod:`ganprint.synth.replicas` (the sampler and OpenCV warp of ``synth --copies``: rotation,
    shift, gamma, blur, noise; ``ranges`` a ``ReplicaRanges``, default its defaults), at the cache
    resolution -- or, with ``work_size`` > 0, at that resolution (the generator's working
    resolution: synth makes its replicas there, so blur and noise have the same scale), then
    resized like :func:`plain_view`.  The numpy generator behind it is seeded from one draw of
    ``generator``, so views depend only on (images, generator state)."""
    from ganprint.synth.replicas import ReplicaRanges, apply_transform, random_transform

    ranges = ReplicaRanges() if ranges is None else ranges
    n = images.shape[0]
    rng = np.random.default_rng(int(torch.randint(0, 2**62, (1,), generator=generator)))
    params = [random_transform(rng, ranges) for _ in range(n)]
    if n == 0:
        return images.new_zeros(0, 1, out_size, out_size, dtype=torch.float32), params
    arr = images.cpu().numpy()
    if work_size:
        arr = _resize_u8(arr, work_size)
    out = np.stack([apply_transform(a, p, rng) for a, p in zip(arr, params)])
    return plain_view(torch.from_numpy(out).to(images.device), out_size), params


def instance_pair(images: torch.Tensor, out_size: int, generator: torch.Generator, ranges=None,
                  work_size: int = 0, clean: float = 0.0
                  ) -> tuple[torch.Tensor, torch.Tensor, list[dict], list[dict | None]]:
    """The instance positive pair (SSCD / SimCLR-style): two independent replica views of each
    image.  uint8 [N, S, S] -> (view_a, view_b float32 [N, 1, out, out], params_a, params_b);
    row i of both views shows image i.

    With ``clean`` > 0, each row's view b is, with that probability, the untransformed image
    (:func:`plain_view`; its params ``None``): the pair a search meets, a clean member against
    its replica.  ``work_size``: see :func:`replica_views`."""
    a, pa = replica_views(images, out_size, generator, ranges, work_size)
    b, pb = replica_views(images, out_size, generator, ranges, work_size)
    if clean > 0 and images.shape[0]:
        pick = torch.rand(images.shape[0], generator=generator) < clean
        if pick.any():
            b = b.clone()
            b[pick.to(b.device)] = plain_view(images[pick.to(images.device)], out_size).to(b.dtype)
            pb = [None if bool(c) else p for c, p in zip(pick, pb)]
    return a, b, pa, pb
