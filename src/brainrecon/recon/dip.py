"""Deep image prior (``prior="dip"``): an untrained convolutional decoder per image, its weights optimised.

Each image gets its own decoder (independent weights, run for the whole batch at once as grouped
convolutions) from a fixed uniform-noise input (n, dip.input_channels, size / 2**levels, ...):
``levels`` stages of [3x3 conv, instance norm, LeakyReLU(0.2), bilinear 2x upsampling], then a
3x3 conv block at full size and a 1x1 conv to RGB through a sigmoid. The convolutional structure
favours natural-image statistics over the adversarial high-frequency patterns that match features.
Weights are optimised with Adam (``dip.lr``); ``dip.input_noise`` adds fresh noise to the input
each step; ``dip.augment`` feeds randomly shifted / scaled / rotated images to the network.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .base import Prior
from .transforms import RandomAffine


class GroupedConv2d(nn.Module):
    """n independent k x k convolutions, one per image: (n, c_in, H, W) -> (n, c_out, H, W), reflect padding."""

    def __init__(self, n: int, c_in: int, c_out: int, k: int, generator: torch.Generator):
        super().__init__()
        bound = 1.0 / math.sqrt(c_in * k * k)   # torch's default conv initialisation range
        self.weight = nn.Parameter((torch.rand(n, c_out, c_in, k, k, generator=generator) * 2 - 1) * bound)
        self.bias = nn.Parameter((torch.rand(n, c_out, generator=generator) * 2 - 1) * bound)
        self.k = k

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        p = self.k // 2
        x = x.reshape(1, n * c, h, w)
        if p:
            x = F.pad(x, (p, p, p, p), mode="reflect")
        y = F.conv2d(x, self.weight.flatten(0, 1), self.bias.flatten(), groups=n)
        return y.view(n, -1, h, w)


class DeepImagePrior(nn.Module):
    """``forward(noise_std=0, generator=None) -> (n, 3, size, size)`` in [0, 1]."""

    def __init__(self, n: int, size: int, generator: torch.Generator, channels: int = 32, levels: int = 4,
                 input_channels: int = 16):
        super().__init__()
        self.sizes = [max(2, math.ceil(size / 2 ** (levels - i))) for i in range(levels)] + [size]
        self.register_buffer("noise", torch.rand(n, input_channels, self.sizes[0], self.sizes[0],
                                                 generator=generator) * 0.1)
        c = [input_channels] + [channels] * (levels + 1)
        self.convs = nn.ModuleList(GroupedConv2d(n, c[i], c[i + 1], 3, generator) for i in range(levels + 1))
        self.to_rgb = GroupedConv2d(n, channels, 3, 1, generator)

    def forward(self, noise_std: float = 0.0, generator: torch.Generator | None = None) -> torch.Tensor:
        x = self.noise
        if noise_std > 0:
            x = x + noise_std * torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        for i, conv in enumerate(self.convs):
            x = F.leaky_relu(F.instance_norm(conv(x)), 0.2)
            if i + 1 < len(self.sizes):
                x = F.interpolate(x, size=(self.sizes[i + 1],) * 2, mode="bilinear", align_corners=False)
        return torch.sigmoid(self.to_rgb(x))


class DIPAdam(Prior):
    state_names = ("net", "optimiser")

    def __init__(self, loss, size, cfg, streams, device):
        super().__init__(loss, size, cfg, streams, device)
        self.net = DeepImagePrior(self.n, size, streams.cpu, cfg.dip.channels, cfg.dip.levels,
                                  cfg.dip.input_channels).to(device)
        self.optimiser = torch.optim.Adam(self.net.parameters(), lr=cfg.dip.lr)
        r = size / cfg.reference_size
        self.augment = (RandomAffine(streams.device, cfg.augment.jitter * r, cfg.augment.scale, cfg.augment.rotate)
                        if cfg.dip.augment else None)

    def images(self) -> torch.Tensor:
        with torch.inference_mode():
            return self.net()

    def step(self, it: int) -> None:
        self.optimiser.zero_grad(set_to_none=True)
        x = self.net(self.cfg.dip.input_noise, self.streams.device)
        if self.augment is not None:
            x = self.augment(x)
        self.loss(x).sum().backward()
        self.optimiser.step()
