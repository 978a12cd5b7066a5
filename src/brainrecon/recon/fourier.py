"""A Fourier-space image with decorrelated colour, optimised with Adam (``prior="fourier"``).

The parameters are the real and imaginary parts of each image's half spectrum (rfft2),
``(n, 3, size, size // 2 + 1, 2)``. The image is their inverse FFT ("ortho" norm, divided by 4)
with every frequency scaled by ``1 / max(f, 1/size)**decay_power`` (f in cycles per pixel), so
that equal steps on all coefficients give the 1/f amplitude spectrum of natural images; its
three channels are mapped to RGB by the square root of ImageNet's colour covariance (normalised
to a largest column norm of 1), and squashed onto [0, 1] by a sigmoid. Each step feeds a random
shift / scale / rotation of the image to the network (``transforms.RandomAffine``).
"""
from __future__ import annotations

import torch

from .base import Prior
from .transforms import RandomAffine

# square root of the ImageNet RGB covariance (columns: decorrelated components)
COLOR_SQRT_COV = torch.tensor([[0.26, 0.09, 0.02],
                               [0.27, 0.00, -0.05],
                               [0.27, -0.09, 0.03]])


def spectrum_scale(h: int, w: int, decay_power: float = 1.0) -> torch.Tensor:
    """(h, w // 2 + 1) amplitude scale 1 / max(f, 1 / max(h, w))**decay_power of the rfft2 grid."""
    fy = torch.fft.fftfreq(h).view(-1, 1)
    fx = torch.fft.rfftfreq(w).view(1, -1)
    f = torch.sqrt(fx ** 2 + fy ** 2)
    return 1.0 / f.clamp(min=1.0 / max(h, w)) ** decay_power


class FourierImage(torch.nn.Module):
    """``forward() -> (n, 3, size, size)`` in [0, 1] from the spectrum parameter."""

    def __init__(self, n: int, size: int, generator: torch.Generator, std: float = 0.01,
                 decay_power: float = 1.0, decorrelate: bool = True, sigmoid: bool = True):
        super().__init__()
        self.size, self.decorrelate, self.sigmoid = size, decorrelate, sigmoid
        self.spectrum = torch.nn.Parameter(torch.randn(n, 3, size, size // 2 + 1, 2, generator=generator) * std)
        self.register_buffer("scale", spectrum_scale(size, size, decay_power).unsqueeze(-1))
        colour = COLOR_SQRT_COV / COLOR_SQRT_COV.norm(dim=0).max()
        self.register_buffer("colour", colour if decorrelate else torch.eye(3))

    def forward(self) -> torch.Tensor:
        spec = torch.view_as_complex(self.spectrum * self.scale)
        x = torch.fft.irfft2(spec, s=(self.size, self.size), norm="ortho") / 4.0
        x = torch.einsum("ij,njhw->nihw", self.colour, x)
        return torch.sigmoid(x) if self.sigmoid else (x + 0.5).clamp(0, 1)


class FourierAdam(Prior):
    state_names = ("image", "optimiser")

    def __init__(self, loss, size, cfg, streams, device):
        super().__init__(loss, size, cfg, streams, device)
        self.image = FourierImage(self.n, size, streams.cpu, cfg.fourier.init_std, cfg.fourier.decay_power,
                                  cfg.fourier.decorrelate, cfg.fourier.sigmoid).to(device)
        self.optimiser = torch.optim.Adam(self.image.parameters(), lr=cfg.fourier.lr)
        r = size / cfg.reference_size
        self.augment = RandomAffine(streams.device, cfg.augment.jitter * r, cfg.augment.scale, cfg.augment.rotate)

    def images(self) -> torch.Tensor:
        with torch.inference_mode():
            return self.image()

    def step(self, it: int) -> None:
        self.optimiser.zero_grad(set_to_none=True)
        self.loss(self.augment(self.image())).sum().backward()
        self.optimiser.step()
