"""Image reconstruction from DNN features by gradient descent on pixels (the iCNN of Shen et al. 2019).

Loss per image: sum_l w_l ||phi_l(x) - y_l||^2 with w_l = (1/||y_l||^2) / sum_k (1/||y_k||^2).
The image lives in the network's 0-255 pixel space, mean colour subtracted; each iteration takes a
momentum step along the gradient normalised by its mean absolute value, shrinks the image towards
the mean colour (pixel decay), blurs it with a Gaussian, and clips it to the valid range. Learning
rate, decay and blur follow linear schedules. Images are reconstructed in batches.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel


class ReconConfig(BaseModel):
    """The paper's gradient-descent settings (blur sigma in pixels at 224 px, scaled to the image size)."""
    iterations: int = 200
    lr_start: float = 2.0
    lr_end: float = 1e-10
    momentum: float = 0.9
    decay_start: float = 0.2
    decay_end: float = 1e-10
    blur_start: float = 2.0
    blur_end: float = 0.5
    blur_reference_size: int = 224
    batch_size: int = 16
    seed: int = 0
    snapshots: list[int] = []   # iterations whose images are kept (the image evolving)
    layer_scale: dict[str, float] = {}  # extra per-layer weight multipliers (default 1)
    init: str = "noise"         # start image: "noise" (uniform 0-255) or "mean" (the mean colour)
    chroma_blur: float = 0.0    # extra Gaussian blur (pixels) of the colour-opponent channels only


def layer_weights(targets: dict[str, torch.Tensor], scale: dict[str, float] | None = None) -> dict[str, torch.Tensor]:
    """Per-image weights (n,) per layer: scale_l/||y_l||^2 normalised to sum to one over layers."""
    scale = scale or {}
    inv = {k: scale.get(k, 1.0) / v.flatten(1).pow(2).sum(1).clamp(min=1e-12) for k, v in targets.items()}
    total = sum(inv.values())
    return {k: v / total for k, v in inv.items()}


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


def linear_schedule(start: float, end: float, n: int) -> np.ndarray:
    return np.linspace(start, end, n) if n > 1 else np.array([start])


def _reconstruct_batch(targets: dict[str, torch.Tensor], network, size: int, cfg: ReconConfig,
                       generator: torch.Generator) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
    n = next(iter(targets.values())).shape[0]
    layers = list(targets)
    weights = layer_weights(targets, cfg.layer_scale)
    # network input space: 0-255, mean colour subtracted (RGB order here; the network flips to BGR itself)
    mean = torch.tensor([123.68, 116.779, 103.939]).view(1, 3, 1, 1)
    if cfg.init == "noise":
        x = torch.rand(n, 3, size, size, generator=generator) * 255 - mean
    elif cfg.init == "mean":
        x = torch.zeros(n, 3, size, size)
    else:
        raise ValueError(f"init must be 'noise' or 'mean', not {cfg.init!r}")
    delta = torch.zeros_like(x)
    lrs = linear_schedule(cfg.lr_start, cfg.lr_end, cfg.iterations)
    decays = linear_schedule(cfg.decay_start, cfg.decay_end, cfg.iterations)
    scale = size / cfg.blur_reference_size
    blurs = linear_schedule(cfg.blur_start * scale, cfg.blur_end * scale, cfg.iterations)
    snaps = {}
    for it in range(cfg.iterations):
        x.requires_grad_(True)
        feats = network((x + mean) / 255.0, layers)
        loss = sum((weights[k] * (feats[k] - targets[k]).flatten(1).pow(2).sum(1)).sum() for k in layers)
        (grad,) = torch.autograd.grad(loss, x)
        with torch.no_grad():
            x = x.detach()
            grad = grad / grad.abs().mean(dim=(1, 2, 3), keepdim=True).clamp(min=1e-12)
            delta = cfg.momentum * delta + lrs[it] * grad
            x = (1 - decays[it]) * (x - delta)
            x = gaussian_blur(x, float(blurs[it]))
            if cfg.chroma_blur > 0:
                x = blur_chroma(x, cfg.chroma_blur)
            x = torch.maximum(torch.minimum(x, 255 - mean), -mean)
            if it + 1 in cfg.snapshots:
                snaps[it + 1] = ((x + mean) / 255.0).clone()
    return (x + mean) / 255.0, snaps


def reconstruct(targets: dict[str, torch.Tensor], network, size: int, config: ReconConfig | None = None,
                progress: Callable[[int, int], None] | None = None) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
    """Reconstruct images (n, 3, size, size) in [0, 1] whose features match ``targets`` {layer: (n, ...)}.

    Returns (images, {iteration: images}) for the requested snapshots. Deterministic for a seed:
    each batch's start image is drawn from a generator seeded by ``seed`` and the batch position.
    """
    cfg = config or ReconConfig()
    n = next(iter(targets.values())).shape[0]
    network.requires_grad_(False)
    out, snaps = [], {}
    step = -(-n // -(-n // cfg.batch_size))  # equal batches of at most batch_size images
    for b, s in enumerate(range(0, n, step)):
        gen = torch.Generator().manual_seed(cfg.seed * 100003 + b)
        batch = {k: v[s:s + step].float() for k, v in targets.items()}
        images, snap = _reconstruct_batch(batch, network, size, cfg, gen)
        out.append(images)
        for k, v in snap.items():
            snaps.setdefault(k, []).append(v)
        if progress:
            progress(min(s + step, n), n)
    return torch.cat(out), {k: torch.cat(v) for k, v in snaps.items()}


def display_normalise(images: torch.Tensor | np.ndarray, percent: float = 2.0) -> np.ndarray:
    """Clip each image's darkest and brightest ``percent``% of values and rescale to [0, 1] (as the paper shows them)."""
    a = np.asarray(images, dtype=np.float32)
    out = np.empty_like(a)
    for i, img in enumerate(a):
        lo, hi = np.percentile(img, [percent, 100 - percent])
        out[i] = np.clip((img - lo) / max(hi - lo, 1e-6), 0, 1)
    return out
