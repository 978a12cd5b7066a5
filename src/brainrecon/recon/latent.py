"""Gradient descent on the latent of an image generator (``prior="generator"``, the paper's DGN condition).

The generator module maps ``z (n, d) -> (n, 3, H, W)`` RGB in [0, 1] and carries buffers
``latent_lower``/``latent_upper`` (d,) and ``latent_init(n, generator) -> (n, d)``. Each step:
momentum step along the latent gradient normalised by its mean absolute value (lr on the linear
``generator.lr_start`` -> ``lr_end`` schedule), latent decay ``z *= 1 - generator.decay``, clip to the box. The
image is the generator output fitted to the size (``transforms.fit_size``).
"""
from __future__ import annotations

import torch

from .base import Prior, linear_schedule
from .transforms import fit_size


class LatentGD(Prior):
    state_names = ("z", "delta")

    def __init__(self, loss, size, cfg, streams, device, generator: torch.nn.Module):
        super().__init__(loss, size, cfg, streams, device)
        self.generator = generator
        z = generator.latent_init(self.n, streams.device)
        self.lower = generator.latent_lower.to(device)
        self.upper = generator.latent_upper.to(device)
        self.z = torch.maximum(torch.minimum(z.to(device, torch.float32), self.upper), self.lower)  # (n, d)
        self.delta = torch.zeros_like(self.z)
        self.lrs = linear_schedule(cfg.generator.lr_start, cfg.generator.lr_end, cfg.iterations)

    def render(self, z: torch.Tensor) -> torch.Tensor:
        """Latent (n, d) -> image (n, 3, size, size) in [0, 1]."""
        return fit_size(self.generator(z), self.size, self.cfg.generator.crop)

    def images(self) -> torch.Tensor:
        with torch.inference_mode():
            return self.render(self.z)

    def step(self, it: int) -> None:
        z = self.z.detach().requires_grad_(True)
        (grad,) = torch.autograd.grad(self.loss(self.render(z)).sum(), z)
        with torch.no_grad():
            grad = grad / grad.abs().mean(dim=1, keepdim=True).clamp(min=1e-12)
            self.delta = self.cfg.generator.momentum * self.delta + self.lrs[it] * grad
            z = (1 - self.cfg.generator.decay) * (z.detach() - self.delta)
            self.z = torch.maximum(torch.minimum(z, self.upper), self.lower)
