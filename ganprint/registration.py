"""Pose-normalised raw pixels: a global descriptor that survives rotation and shift.

``pixels`` (the raw-pixel baseline) compares images pixel by pixel, so a replica rotated by a few
degrees and shifted by a few percent is no longer near its source.  ``pixels_aligned`` first moves
every image to a canonical pose computed from the image alone (classical moment normalisation):

1. body mask: pixels brighter than the image's mean (a threshold, so gamma changes barely move it);
2. the mask's centroid goes to the image centre (removes the shift);
3. the mask's principal axis (second moments) is turned horizontal (removes a rotation of up to
   +-45 degrees; CT slices are wider than tall, so the axis is well defined);
4. then as ``pixels``: downsampled to 32 x 32, zero mean, unit norm (cosine = normalised
   cross-correlation).

A rotated + shifted copy lands in (nearly) the same pose as its source, so a global search
shortlists it and :mod:`ganprint.verify` can then prove the copy.  One ``affine_grid`` +
``grid_sample`` per batch; shapes: input [B, 1, S, S] in [0, 1] -> output [B, 1024].
"""

from __future__ import annotations

OUT = 32  # output side: the same 32 x 32 = 1024 values as ``pixels``


def build(spec=None, image_size: int | None = None):
    import torch
    import torch.nn.functional as F
    from torch import nn

    class AlignedPixels(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.register_buffer("eps", torch.tensor(1e-8))  # a (trivial) state dict and digest

        def forward(self, x):
            x = x.float()
            b, _, h, w = x.shape
            mask = (x > x.mean(dim=(2, 3), keepdim=True)).float()[:, 0]  # [B, H, W]
            ys = torch.linspace(-1.0, 1.0, h, device=x.device).view(1, h, 1)
            xs = torch.linspace(-1.0, 1.0, w, device=x.device).view(1, 1, w)
            m0 = mask.sum((1, 2)).clamp(min=1.0)
            cx = (mask * xs).sum((1, 2)) / m0
            cy = (mask * ys).sum((1, 2)) / m0
            dx, dy = xs - cx.view(-1, 1, 1), ys - cy.view(-1, 1, 1)
            mxx = (mask * dx * dx).sum((1, 2)) / m0
            myy = (mask * dy * dy).sum((1, 2)) / m0
            mxy = (mask * dx * dy).sum((1, 2)) / m0
            ang = 0.5 * torch.atan2(2.0 * mxy, mxx - myy)  # principal axis angle, (-90, 90] degrees
            cos, sin = torch.cos(ang), torch.sin(ang)
            # output (u, v) -> input: rotate by the axis angle, then move to the centroid
            theta = torch.stack([torch.stack([cos, -sin, cx], 1), torch.stack([sin, cos, cy], 1)], 1)
            grid = F.affine_grid(theta, [b, 1, OUT * 2, OUT * 2], align_corners=True)
            v = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=True)
            v = F.avg_pool2d(v, 2).flatten(1)
            v = v - v.mean(dim=1, keepdim=True)
            return v / (v.norm(dim=1, keepdim=True) + self.eps)

        def reset_classifier(self, n: int) -> None:  # same interface as timm models
            return None

    return AlignedPixels()
