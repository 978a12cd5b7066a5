"""Gradient descent on pixels: the iCNN of Shen et al. 2019 without a generator (``prior="gd"``).

The image lives in the network's 0-255 pixel space, mean colour subtracted; each step takes a
momentum step along the gradient normalised by its mean absolute value, shrinks the image towards
the mean colour (pixel decay), blurs it with a Gaussian, and clips it to the valid range. Learning
rate, decay and blur follow linear schedules from their start to their end value.
"""
from __future__ import annotations

import torch

from .base import PIXEL_MEAN, Prior, linear_schedule
from .transforms import blur_chroma, gaussian_blur


class PixelGD(Prior):
    state_names = ("x", "delta")

    def __init__(self, loss, size, cfg, streams, device):
        super().__init__(loss, size, cfg, streams, device)
        self.mean = torch.tensor(PIXEL_MEAN).view(1, 3, 1, 1).to(device)
        shape = (self.n, 3, size, size)
        if cfg.gd.init == "noise":
            x = torch.rand(*shape, generator=streams.cpu) * 255 - self.mean.cpu()
        else:                                  # "mean": the mean colour
            x = torch.zeros(shape)
        self.x = x.to(device)                  # (n, 3, size, size), 0-255 minus the mean colour
        self.delta = torch.zeros_like(self.x)  # momentum buffer
        self.lrs = linear_schedule(cfg.gd.lr_start, cfg.gd.lr_end, cfg.iterations)
        self.decays = linear_schedule(cfg.gd.decay_start, cfg.gd.decay_end, cfg.iterations)
        scale = size / cfg.reference_size
        self.blurs = linear_schedule(cfg.gd.blur_start * scale, cfg.gd.blur_end * scale, cfg.iterations)

    def images(self) -> torch.Tensor:
        return (self.x + self.mean) / 255.0

    def step(self, it: int) -> None:
        cfg, mean = self.cfg, self.mean
        x = self.x.detach().requires_grad_(True)
        (grad,) = torch.autograd.grad(self.loss((x + mean) / 255.0).sum(), x)
        with torch.no_grad():
            x = x.detach()
            grad = grad / grad.abs().mean(dim=(1, 2, 3), keepdim=True).clamp(min=1e-12)
            self.delta = cfg.gd.momentum * self.delta + self.lrs[it] * grad
            x = (1 - self.decays[it]) * (x - self.delta)
            x = gaussian_blur(x, float(self.blurs[it]))
            if cfg.gd.chroma_blur > 0:
                x = blur_chroma(x, cfg.gd.chroma_blur)
            self.x = torch.maximum(torch.minimum(x, 255 - mean), -mean)
