"""The reconstruction objective: layer-weighted squared error between an image's features and targets.

Loss per image: sum_l w_l sum_u v_lu (phi_lu(x) - y_lu)^2 with layer weights
w_l = (1/||y_l||^2) / sum_k (1/||y_k||^2) and optional unit weights v_lu (mean 1 within a layer;
default 1), e.g. each unit's decoding reliability (:func:`reliability_weights`).
"""
from __future__ import annotations

import numpy as np
import torch


def layer_weights(targets: dict[str, torch.Tensor], scale: dict[str, float] | None = None) -> dict[str, torch.Tensor]:
    """Per-image weights (n,) per layer: scale_l/||y_l||^2 normalised to sum to one over layers."""
    scale = scale or {}
    inv = {k: scale.get(k, 1.0) / v.flatten(1).pow(2).sum(1).clamp(min=1e-12) for k, v in targets.items()}
    total = sum(inv.values())
    return {k: v / total for k, v in inv.items()}


def reliability_weights(r2: np.ndarray) -> np.ndarray:
    """Unit weights (same shape as ``r2``) from each unit's cross-validated decoding R^2: R^2 clipped to
    [0, 1], scaled to mean 1 over the layer; all ones if no unit has R^2 > 0."""
    w = np.clip(np.nan_to_num(np.asarray(r2, np.float64)), 0.0, 1.0)
    m = w.mean() if w.size else 0.0
    return (w / m if m > 0 else np.ones_like(w)).astype(np.float32)


class FeatureLoss:
    """``loss(images (n, 3, H, W) in [0, 1]) -> (n,)``: the weighted feature error of each image.

    ``network(images, layers) -> {layer: (n, ...)}`` is called with the layers of ``targets``.
    ``unit_weights``: {layer: (...) one weight per unit, the shape of one image's features}; layers
    not listed weigh their units equally.
    """

    def __init__(self, network, targets: dict[str, torch.Tensor], scale: dict[str, float] | None = None,
                 unit_weights: dict[str, torch.Tensor] | None = None):
        self.network = network
        self.targets = targets
        self.layers = list(targets)
        self.weights = layer_weights(targets, scale)
        self.unit_weights = {}
        for k, v in (unit_weights or {}).items():
            if k not in targets:
                continue
            v = torch.as_tensor(v, dtype=targets[k].dtype, device=targets[k].device)
            if v.shape != targets[k].shape[1:]:
                raise ValueError(f"unit weights of {k} have shape {tuple(v.shape)}, its features "
                                 f"{tuple(targets[k].shape[1:])}")
            self.unit_weights[k] = v[None]

    @property
    def n(self) -> int:
        return next(iter(self.targets.values())).shape[0]

    def _error(self, k: str, feats: torch.Tensor) -> torch.Tensor:
        sq = (feats - self.targets[k]).pow(2)
        if k in self.unit_weights:
            sq.mul_(self.unit_weights[k])      # in place: pow's backward needs its input, not this buffer
        return sq.flatten(1).sum(1)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        feats = self.network(images, self.layers)
        return sum(self.weights[k] * self._error(k, feats[k]) for k in self.layers)

    def evaluate(self, images: torch.Tensor) -> torch.Tensor:
        """Loss (n,) without building a graph."""
        with torch.inference_mode():
            return self(images)
