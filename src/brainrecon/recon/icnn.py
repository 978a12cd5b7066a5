"""Image reconstruction from DNN features (the iCNN of Shen et al. 2019), with a choice of image priors.

``reconstruct`` optimises, batch by batch, whatever ``config.prior`` parametrises the images by so
that their features match the targets (loss: ``objective.FeatureLoss``):

- ``"gd"`` (default): the paper's gradient descent on pixels (``pixels.PixelGD``);
- ``"lbfgs"``: the paper's L-BFGS-B on bounded pixels (``lbfgs.PixelLBFGS``);
- ``"generator"``: the paper's DGN condition, gradient descent on a generator's latent (``latent.LatentGD``);
- ``"fourier"``: a decorrelated Fourier-space image under random transforms, Adam (``fourier.FourierAdam``);
- ``"dip"``: a deep image prior, an untrained decoder per image, Adam on its weights (``dip.DIPAdam``).
"""
from __future__ import annotations

import copy
import os
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from . import checkpoint as ckpt
from .base import Prior, Streams, linear_schedule
from .config import PRIORS, ReconConfig
from .dip import DIPAdam
from .fourier import FourierAdam
from .latent import LatentGD
from .lbfgs import PixelLBFGS
from .objective import FeatureLoss, layer_weights, reliability_weights
from .pixels import PixelGD
from .transforms import blur_chroma, gaussian_blur

PRIOR_CLASSES: dict[str, type[Prior]] = {"gd": PixelGD, "lbfgs": PixelLBFGS, "generator": LatentGD,
                                         "fourier": FourierAdam, "dip": DIPAdam}
assert set(PRIOR_CLASSES) == set(PRIORS)

__all__ = ["PRIOR_CLASSES", "ReconConfig", "blur_chroma", "display_normalise", "gaussian_blur", "layer_weights",
           "linear_schedule", "make_prior", "reconstruct"]


def _device(name: str) -> torch.device:
    d = torch.device(name)
    if d.type == "cuda" and d.index is None:
        d = torch.device("cuda", torch.cuda.current_device())
    return d


def _on_device(module: nn.Module, device: torch.device) -> nn.Module:
    """``module`` if all its tensors are on ``device``, else a copy moved there (the caller's stays put)."""
    if all(t.device == device for t in list(module.parameters()) + list(module.buffers())):
        return module
    return copy.deepcopy(module).to(device)


def make_prior(targets: dict[str, torch.Tensor], network, size: int, cfg: ReconConfig, seed: int,
               generator: nn.Module | None = None, unit_weights: dict[str, torch.Tensor] | None = None) -> Prior:
    """The prior of ``cfg.prior`` for one batch: targets {layer: (n, ...)} and modules already on ``cfg.device``."""
    device = _device(cfg.device)
    loss = FeatureLoss(network, targets, cfg.layer_scale, unit_weights)
    streams = Streams(seed, device)
    if cfg.prior == "generator":
        return LatentGD(loss, size, cfg, streams, device, generator)
    return PRIOR_CLASSES[cfg.prior](loss, size, cfg, streams, device)


def _run_batch(prior: Prior, cfg: ReconConfig, path, key, log=None) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
    start, snaps, saved = 0, {}, -1
    state = ckpt.load(path, key, log) if path is not None else None
    if state is not None:
        prior.load_state_dict(state["prior"])
        prior.streams.load_state_dict(state["streams"])
        start, snaps, saved = state["iteration"], dict(state["snapshots"]), state["iteration"]
        if log:
            log(f"  resumed {path.name} at iteration {start} of {cfg.iterations} from its checkpoint")
    elif 0 in cfg.snapshots:
        snaps[0] = prior.images().clone()

    def save(it: int) -> None:
        nonlocal saved
        ckpt.save(path, {"key": key, "iteration": it, "prior": prior.state_dict(),
                         "streams": prior.streams.state_dict(), "snapshots": snaps})
        saved = it

    def on_iteration(it: int) -> None:
        if it in cfg.snapshots:
            snaps[it] = prior.images().clone()
        if path is not None and (it % cfg.checkpoint_every == 0 or it == cfg.iterations):
            save(it)

    prior.run(start, on_iteration)
    final = prior.images()
    for it in cfg.snapshots:   # an optimiser that stopped early (L-BFGS) keeps its final image
        if 0 < it <= cfg.iterations and it not in snaps:
            snaps[it] = final
    if path is not None and saved != cfg.iterations:
        save(cfg.iterations)
    return final.cpu(), {k: v.cpu() for k, v in snaps.items()}


def reconstruct(targets: dict[str, torch.Tensor], network, size: int, config: ReconConfig | None = None,
                progress: Callable[[int, int], None] | None = None, generator: nn.Module | None = None,
                checkpoint: str | os.PathLike | None = None,
                unit_weights: dict[str, torch.Tensor | np.ndarray] | None = None,
                log: Callable[[str], None] | None = None) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
    """Reconstruct images (n, 3, size, size) in [0, 1] whose features match ``targets`` {layer: (n, ...)}.

    ``network(images (n, 3, H, W) in [0, 1], layers) -> {layer: (n, ...)}``; its parameters are frozen.
    ``generator``: the image generator module, needed by ``prior="generator"`` (else unused).
    ``unit_weights``: {layer: (...) a weight per unit} for the loss (:class:`~.objective.FeatureLoss`).
    ``progress(done, n)`` is called after each batch with the number of images done.
    ``checkpoint``: a folder or a path prefix; each batch's state is saved there every
    ``checkpoint_every`` iterations and when it finishes, and a rerun resumes from it (same result
    as an uninterrupted run; L-BFGS restarts its optimiser from the saved image); ``log`` is told
    which batches resumed.
    Returns (images, {iteration: images}) for ``config.snapshots``, on the CPU. Deterministic for a
    seed: each batch's random streams are seeded by ``seed`` and the batch position.
    """
    cfg = config or ReconConfig()
    device = _device(cfg.device)
    if cfg.prior == "generator" and generator is None:
        raise ValueError("prior 'generator' needs a generator module: reconstruct(..., generator=module)")
    modules = []
    if isinstance(network, nn.Module):
        network.requires_grad_(False)
        network = _on_device(network, device)
        modules.append(network)
    if cfg.prior == "generator":
        generator.requires_grad_(False)
        generator = _on_device(generator, device).eval()
        modules.append(generator)
    weights = {k: torch.as_tensor(v).float().to(device) for k, v in (unit_weights or {}).items()}
    base = ckpt.fingerprint(cfg, size, modules, weights) if checkpoint is not None else ""
    n = next(iter(targets.values())).shape[0]
    out, snaps = [], {}
    step = -(-n // -(-n // cfg.batch_size))  # equal batches of at most batch_size images
    for b, s in enumerate(range(0, n, step)):
        batch = {k: torch.as_tensor(v[s:s + step]).float() for k, v in targets.items()}
        path = key = None
        if checkpoint is not None:
            path, key = ckpt.batch_path(checkpoint, b), ckpt.batch_key(base, b, batch)
        batch = {k: v.to(device) for k, v in batch.items()}
        prior = make_prior(batch, network, size, cfg, cfg.seed * 100003 + b, generator, weights)
        images, snap = _run_batch(prior, cfg, path, key, log)
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


@dataclass
class Reconstruction:
    """Reconstructed images: ``images`` (n, 3, H, W) in [0, 1] (display-normalised, as the paper shows
    them), ``labels`` (n,), ``snapshots`` {iteration: (n, 3, H, W)}. Behaves as the images array."""
    images: np.ndarray
    labels: list[str]
    snapshots: dict[int, np.ndarray] = field(default_factory=dict)

    def __array__(self, dtype=None, copy=None):
        return self.images if dtype is None else self.images.astype(dtype)

    def __len__(self) -> int:
        return len(self.images)


def reconstruct_decoded(decoded, network, config: ReconConfig | None = None, *,
                        unit_weighting: str = "reliability", layers: list[str] | None = None,
                        generator: nn.Module | None = None, checkpoint: str | os.PathLike | None = None,
                        progress: Callable[[int, int], None] | None = None,
                        log: Callable[[str], None] | None = None) -> Reconstruction:
    """Reconstruct the images of decoded features (``brainrecon.reconstruct``).

    Parameters
    ----------
    decoded : DecodedFeatures
        Features {layer: (n, *unit_shape)} of one test set, with their labels and image size.
    network : VGGEncoder
        The network the features were decoded for.
    config : ReconConfig, optional
        The prior and its settings (default: the paper's pixel gradient descent, 200 iterations).
    unit_weighting : {"reliability", "none"}
        "reliability": each unit's squared error weighted by its decoding R^2 (``decoded.unit_r2``,
        clipped at 0, mean 1 per layer) where known; "none": all units equal (the paper).
    layers : list of str, optional
        Layers whose features are matched (default all decoded ones).
    generator : module, optional
        For ``prior="generator"``; default the built-in generator.
    checkpoint, progress, log
        As for :func:`reconstruct` (resumable batches, progress per batch, resume messages).
    """
    cfg = config or ReconConfig()
    if unit_weighting not in ("reliability", "none"):
        raise ValueError(f"unit_weighting must be reliability or none, not {unit_weighting!r}")
    layers = layers or list(decoded.features)
    if cfg.prior == "generator" and generator is None:
        from ..nets.generator import load_generator
        generator = load_generator("builtin")
    weights = {}
    if unit_weighting == "reliability":
        weights = {k: reliability_weights(decoded.unit_r2[k]) for k in layers if k in decoded.unit_r2}
    targets = {k: torch.from_numpy(np.ascontiguousarray(decoded.features[k])) for k in layers}
    raw, raw_snaps = reconstruct(targets, network, decoded.image_size, cfg, progress=progress, generator=generator,
                                 checkpoint=checkpoint, unit_weights=weights, log=log)
    return Reconstruction(display_normalise(raw.numpy()), list(decoded.labels),
                          {it: display_normalise(v.numpy()) for it, v in sorted(raw_snaps.items())})
