"""Image transforms on (n, c, H, W) tensors: blurs, random affine augmentation, crop/resize to a size.

All are torch-only and differentiable; random ones draw from a ``torch.Generator`` on the images' device.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F


def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of (n, c, H, W) with reflect padding; sigma in pixels."""
    if sigma < 0.3:
        return x
    radius = max(1, int(np.ceil(3 * sigma)))
    radius = min(radius, x.shape[-1] - 1, x.shape[-2] - 1)
    t = torch.arange(-radius, radius + 1, dtype=x.dtype, device=x.device)
    k = torch.exp(-t ** 2 / (2 * sigma ** 2))
    k = k / k.sum()
    c = x.shape[1]
    x = F.conv2d(F.pad(x, (radius, radius, 0, 0), mode="reflect"), k.view(1, 1, 1, -1).repeat(c, 1, 1, 1), groups=c)
    return F.conv2d(F.pad(x, (0, 0, radius, radius), mode="reflect"), k.view(1, 1, -1, 1).repeat(c, 1, 1, 1), groups=c)


def blur_chroma(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Blur the colour-opponent part of RGB images (n, 3, H, W), keeping luminance sharp.

    Natural images carry little fine detail in colour; this is the prior that JPEG's chroma
    subsampling relies on.
    """
    lum = x.mean(1, keepdim=True)
    return lum + gaussian_blur(x - lum, sigma)


def fit_size(x: torch.Tensor, size: int, crop: int | None = None) -> torch.Tensor:
    """(n, c, H, W) -> (n, c, size, size): centre-crop to ``crop`` (if given), then centre-crop if larger
    than ``size`` or resize (bilinear) if smaller. A non-square input is centre-cropped to its shorter side."""
    def centre(x, s):
        h, w = x.shape[-2:]
        top, left = (h - s) // 2, (w - s) // 2
        return x[..., top:top + s, left:left + s]
    if crop is not None:
        x = centre(x, min(crop, *x.shape[-2:]))
    short = min(x.shape[-2:])
    x = centre(x, short) if x.shape[-2] != x.shape[-1] else x
    if short > size:
        return centre(x, size)
    if short < size:
        return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    return x


class RandomAffine:
    """Random shift, scale and rotation per image, by bilinear resampling with reflected borders.

    ``jitter`` in pixels (uniform in +-jitter), ``scale`` as 1 +- scale, ``rotate`` in +-degrees;
    ``transform(x (n, c, H, W)) -> (n, c, H, W)`` draws fresh parameters on every call from ``generator``.
    """

    def __init__(self, generator: torch.Generator, jitter: float = 8.0, scale: float = 0.1, rotate: float = 10.0):
        self.generator, self.jitter, self.scale, self.rotate = generator, jitter, scale, rotate

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        n, _, h, w = x.shape
        u = torch.rand(n, 4, generator=self.generator, device=x.device, dtype=x.dtype) * 2 - 1
        s = 1 + self.scale * u[:, 0]
        a = u[:, 1] * (self.rotate * math.pi / 180)
        # affine_grid maps output to input coordinates in [-1, 1]: a shift of t pixels is 2 t / size
        tx, ty = u[:, 2] * (2 * self.jitter / w), u[:, 3] * (2 * self.jitter / h)
        cos, sin = torch.cos(a) / s, torch.sin(a) / s
        theta = torch.stack([torch.stack([cos, -sin, tx], 1), torch.stack([sin, cos, ty], 1)], 1)
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
