"""The reconstruction objective: layer-weighted squared error between an image's features and targets.

Loss per image: sum_l w_l ||phi_l(x) - y_l||^2 with w_l = (1/||y_l||^2) / sum_k (1/||y_k||^2).
"""
from __future__ import annotations

import torch


def layer_weights(targets: dict[str, torch.Tensor], scale: dict[str, float] | None = None) -> dict[str, torch.Tensor]:
    """Per-image weights (n,) per layer: scale_l/||y_l||^2 normalised to sum to one over layers."""
    scale = scale or {}
    inv = {k: scale.get(k, 1.0) / v.flatten(1).pow(2).sum(1).clamp(min=1e-12) for k, v in targets.items()}
    total = sum(inv.values())
    return {k: v / total for k, v in inv.items()}


class FeatureLoss:
    """``loss(images (n, 3, H, W) in [0, 1]) -> (n,)``: the weighted feature error of each image.

    ``network(images, layers) -> {layer: (n, ...)}`` is called with the layers of ``targets``.
    """

    def __init__(self, network, targets: dict[str, torch.Tensor], scale: dict[str, float] | None = None):
        self.network = network
        self.targets = targets
        self.layers = list(targets)
        self.weights = layer_weights(targets, scale)

    @property
    def n(self) -> int:
        return next(iter(self.targets.values())).shape[0]

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        feats = self.network(images, self.layers)
        return sum(self.weights[k] * (feats[k] - self.targets[k]).flatten(1).pow(2).sum(1) for k in self.layers)

    def evaluate(self, images: torch.Tensor) -> torch.Tensor:
        """Loss (n,) without building a graph."""
        with torch.inference_mode():
            return self(images)
