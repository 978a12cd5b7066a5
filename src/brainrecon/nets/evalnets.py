"""The evaluation networks of the NSD-era reconstruction papers, defined here, read from their published files.

AlexNet, InceptionV3, EfficientNet-B1 and ResNet-50 follow torchvision's module layout (so their
state-dict keys are torchvision's: ``features.4.weight``, ``Mixed_5b.branch1x1.conv.weight``,
``layer1.0.downsample.0.weight`` ...); the CLIP image encoder follows OpenAI's (``visual.conv1.weight``,
``visual.transformer.resblocks.N.attn.in_proj_weight`` ...). Nothing is downloaded: a network is
built from the user's weight file (:func:`load_eval_network`), or randomly initialised when no file
is given (tests). Images enter as ``(n, 3, H, W)`` float32 RGB in [0, 1]; each network owns its
input normalisation (:attr:`EvalNetwork.mean` / ``std``) and exposes its layers by their torchvision
module names (``features.4``, ``avgpool``) through :meth:`EvalNetwork.taps`.
"""
from __future__ import annotations

import math
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["EVAL_NETWORKS", "WEIGHT_SOURCES", "EvalNetError", "EvalNetwork", "AlexNet", "InceptionV3", "CLIPVisual",
           "EfficientNetB1", "ResNet50", "build_eval_network", "load_eval_network", "clip_shape"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class EvalNetError(ValueError):
    """A weight file that cannot be read as the evaluation network it was given for."""


@dataclass(frozen=True)
class WeightSource:
    """Where a network's published weights come from (shown when the file is missing or wrong)."""

    file: str              # the published file name
    url: str               # where to download it
    layout: str            # one phrase: the file format and its key names


WEIGHT_SOURCES = {
    "alexnet": WeightSource("alexnet-owt-7be5be79.pth", "https://download.pytorch.org/models/alexnet-owt-7be5be79.pth",
                            "a torchvision AlexNet state dict (features.N.*, classifier.N.*)"),
    "inceptionv3": WeightSource(
        "inception_v3_google-0cc3c7bd.pth", "https://download.pytorch.org/models/inception_v3_google-0cc3c7bd.pth",
        "a torchvision Inception3 state dict (Conv2d_1a_3x3.conv.weight, Mixed_5b.*, AuxLogits.*, fc.*)"),
    "clip-vit-l14": WeightSource(
        "ViT-L-14.pt", "https://openaipublic.azureedge.net/clip/models/"
        "b8cca3fd41ae0c99ba7e8951adf17d267cdb84cd88be6f7c2e0eca1737a03836/ViT-L-14.pt",
        "OpenAI's CLIP archive (TorchScript or state dict) whose visual.* tensors are the image encoder"),
    "efficientnet-b1": WeightSource(
        "efficientnet_b1-c27df63c.pth", "https://download.pytorch.org/models/efficientnet_b1-c27df63c.pth "
        "(torchvision's default IMAGENET1K_V2; the older IMAGENET1K_V1 file efficientnet_b1_rwightman-bac287d4.pth "
        "has the same keys)",
        "a torchvision EfficientNet-B1 state dict (features.N.M.block.K.*, classifier.1.*)"),
    "swav-resnet50": WeightSource(
        "swav_800ep_pretrain.pth.tar", "https://dl.fbaipublicfiles.com/deepcluster/swav_800ep_pretrain.pth.tar",
        "the SwAV checkpoint: module.-prefixed ResNet-50 keys (module.conv1.weight, module.layer1.0.*), "
        "projection head and prototypes ignored"),
}


class EvalNetwork(nn.Module):
    """Base of the evaluation networks: normalisation and read-out of named modules."""

    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def normalise(self, images: torch.Tensor) -> torch.Tensor:
        """RGB [0, 1] ``(n, 3, H, W)`` -> the input the weights were trained on."""
        mean = torch.tensor(self.mean, dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
        return (images - mean) / std

    def trunk(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - overridden
        """The network from its normalised input to its last read-out (the classifier is never run)."""
        raise NotImplementedError

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """RGB [0, 1] images -> the last read-out (pooled features; CLIP: the image embedding)."""
        return self.trunk(self.normalise(images))

    def taps(self, images: torch.Tensor, layers: list[str]) -> dict[str, torch.Tensor]:
        """Outputs ``{layer: (n, ...)}`` of the named modules (torchvision node names, e.g. ``features.4``,
        ``avgpool``; ``embedding`` is the network's final output) for RGB [0, 1] images."""
        modules = dict(self.named_modules())
        unknown = [name for name in layers if name != "embedding" and name not in modules]
        if unknown:
            raise KeyError(f"unknown layer(s) {unknown} of {type(self).__name__}")
        out: dict[str, torch.Tensor] = {}
        hooks = [modules[name].register_forward_hook(lambda m, i, o, name=name: out.__setitem__(name, o))
                 for name in layers if name != "embedding"]
        try:
            final = self.trunk(self.normalise(images))
        finally:
            for hook in hooks:
                hook.remove()
        if "embedding" in layers:
            out["embedding"] = final
        return {name: out[name] for name in layers}


# ----------------------------------------------------------------------------------------------- AlexNet
class AlexNet(EvalNetwork):
    """AlexNet in torchvision's layout (``features`` 0-12, ``avgpool``, ``classifier`` 0-6)."""

    def __init__(self, num_classes: int = 1000):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 64, 11, stride=4, padding=2), nn.ReLU(), nn.MaxPool2d(3, 2),
            nn.Conv2d(64, 192, 5, padding=2), nn.ReLU(), nn.MaxPool2d(3, 2),
            nn.Conv2d(192, 384, 3, padding=1), nn.ReLU(),
            nn.Conv2d(384, 256, 3, padding=1), nn.ReLU(),
            nn.Conv2d(256, 256, 3, padding=1), nn.ReLU(), nn.MaxPool2d(3, 2))
        self.avgpool = nn.AdaptiveAvgPool2d((6, 6))
        self.classifier = nn.Sequential(
            nn.Dropout(0.5), nn.Linear(256 * 6 * 6, 4096), nn.ReLU(),
            nn.Dropout(0.5), nn.Linear(4096, 4096), nn.ReLU(), nn.Linear(4096, num_classes))

    def trunk(self, x: torch.Tensor) -> torch.Tensor:
        return self.avgpool(self.features(x))   # the classifier is never read out


# ------------------------------------------------------------------------------------------- InceptionV3
class _ConvBN(nn.Module):
    """Convolution without bias, batch norm (eps 0.001), ReLU: torchvision's ``BasicConv2d`` keys."""

    def __init__(self, c_in: int, c_out: int, kernel, stride=1, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, kernel, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(c_out, eps=0.001)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


def _avg3(x):
    return F.avg_pool2d(x, 3, stride=1, padding=1)


class _MixedA(nn.Module):
    def __init__(self, c_in: int, pool: int):
        super().__init__()
        self.branch1x1 = _ConvBN(c_in, 64, 1)
        self.branch5x5_1, self.branch5x5_2 = _ConvBN(c_in, 48, 1), _ConvBN(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = _ConvBN(c_in, 64, 1)
        self.branch3x3dbl_2 = _ConvBN(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = _ConvBN(96, 96, 3, padding=1)
        self.branch_pool = _ConvBN(c_in, pool, 1)

    def forward(self, x):
        return torch.cat([self.branch1x1(x), self.branch5x5_2(self.branch5x5_1(x)),
                          self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                          self.branch_pool(_avg3(x))], 1)


class _MixedB(nn.Module):
    def __init__(self, c_in: int):
        super().__init__()
        self.branch3x3 = _ConvBN(c_in, 384, 3, stride=2)
        self.branch3x3dbl_1 = _ConvBN(c_in, 64, 1)
        self.branch3x3dbl_2 = _ConvBN(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = _ConvBN(96, 96, 3, stride=2)

    def forward(self, x):
        return torch.cat([self.branch3x3(x), self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                          F.max_pool2d(x, 3, stride=2)], 1)


class _MixedC(nn.Module):
    def __init__(self, c_in: int, c7: int):
        super().__init__()
        row, col = dict(kernel=(1, 7), padding=(0, 3)), dict(kernel=(7, 1), padding=(3, 0))
        self.branch1x1 = _ConvBN(c_in, 192, 1)
        self.branch7x7_1 = _ConvBN(c_in, c7, 1)
        self.branch7x7_2 = _ConvBN(c7, c7, **row)
        self.branch7x7_3 = _ConvBN(c7, 192, **col)
        self.branch7x7dbl_1 = _ConvBN(c_in, c7, 1)
        self.branch7x7dbl_2 = _ConvBN(c7, c7, **col)
        self.branch7x7dbl_3 = _ConvBN(c7, c7, **row)
        self.branch7x7dbl_4 = _ConvBN(c7, c7, **col)
        self.branch7x7dbl_5 = _ConvBN(c7, 192, **row)
        self.branch_pool = _ConvBN(c_in, 192, 1)

    def forward(self, x):
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        d = self.branch7x7dbl_1(x)
        for conv in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4, self.branch7x7dbl_5):
            d = conv(d)
        return torch.cat([self.branch1x1(x), b7, d, self.branch_pool(_avg3(x))], 1)


class _MixedD(nn.Module):
    def __init__(self, c_in: int):
        super().__init__()
        self.branch3x3_1, self.branch3x3_2 = _ConvBN(c_in, 192, 1), _ConvBN(192, 320, 3, stride=2)
        self.branch7x7x3_1 = _ConvBN(c_in, 192, 1)
        self.branch7x7x3_2 = _ConvBN(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = _ConvBN(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = _ConvBN(192, 192, 3, stride=2)

    def forward(self, x):
        b7 = self.branch7x7x3_1(x)
        for conv in (self.branch7x7x3_2, self.branch7x7x3_3, self.branch7x7x3_4):
            b7 = conv(b7)
        return torch.cat([self.branch3x3_2(self.branch3x3_1(x)), b7, F.max_pool2d(x, 3, stride=2)], 1)


class _MixedE(nn.Module):
    def __init__(self, c_in: int):
        super().__init__()
        self.branch1x1 = _ConvBN(c_in, 320, 1)
        self.branch3x3_1 = _ConvBN(c_in, 384, 1)
        self.branch3x3_2a = _ConvBN(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = _ConvBN(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = _ConvBN(c_in, 448, 1)
        self.branch3x3dbl_2 = _ConvBN(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = _ConvBN(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = _ConvBN(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = _ConvBN(c_in, 192, 1)

    def forward(self, x):
        b3 = self.branch3x3_1(x)
        d = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        return torch.cat([self.branch1x1(x), self.branch3x3_2a(b3), self.branch3x3_2b(b3),
                          self.branch3x3dbl_3a(d), self.branch3x3dbl_3b(d), self.branch_pool(_avg3(x))], 1)


class _InceptionAux(nn.Module):
    """The auxiliary classifier: present in the published file, never evaluated here."""

    def __init__(self, c_in: int, num_classes: int):
        super().__init__()
        self.conv0 = _ConvBN(c_in, 128, 1)
        self.conv1 = _ConvBN(128, 768, 5)
        self.fc = nn.Linear(768, num_classes)


class InceptionV3(EvalNetwork):
    """Inception v3 in torchvision's layout, in eval mode, with ``transform_input`` as torchvision sets it
    for its ImageNet weights: images normalised with ImageNet mean/SD are re-mapped to ``(x - 0.5) / 0.5``,
    the input the TensorFlow-trained weights expect. ``avgpool`` gives the 2048-d features."""

    def __init__(self, num_classes: int = 1000):
        super().__init__()
        self.Conv2d_1a_3x3 = _ConvBN(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = _ConvBN(32, 32, 3)
        self.Conv2d_2b_3x3 = _ConvBN(32, 64, 3, padding=1)
        self.maxpool1 = nn.MaxPool2d(3, 2)
        self.Conv2d_3b_1x1 = _ConvBN(64, 80, 1)
        self.Conv2d_4a_3x3 = _ConvBN(80, 192, 3)
        self.maxpool2 = nn.MaxPool2d(3, 2)
        self.Mixed_5b, self.Mixed_5c, self.Mixed_5d = _MixedA(192, 32), _MixedA(256, 64), _MixedA(288, 64)
        self.Mixed_6a = _MixedB(288)
        self.Mixed_6b, self.Mixed_6c = _MixedC(768, 128), _MixedC(768, 160)
        self.Mixed_6d, self.Mixed_6e = _MixedC(768, 160), _MixedC(768, 192)
        self.AuxLogits = _InceptionAux(768, num_classes)
        self.Mixed_7a = _MixedD(768)
        self.Mixed_7b, self.Mixed_7c = _MixedE(1280), _MixedE(2048)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.dropout = nn.Dropout(0.5)
        self.fc = nn.Linear(2048, num_classes)

    def normalise(self, images: torch.Tensor) -> torch.Tensor:
        x = super().normalise(images)
        # torchvision's transform_input, written as the composition it is: undo ImageNet, apply (x - 0.5) / 0.5
        scale = torch.tensor(IMAGENET_STD, dtype=x.dtype, device=x.device).view(1, 3, 1, 1) / 0.5
        shift = (torch.tensor(IMAGENET_MEAN, dtype=x.dtype, device=x.device).view(1, 3, 1, 1) - 0.5) / 0.5
        return x * scale + shift

    def trunk(self, x: torch.Tensor) -> torch.Tensor:
        for name in ("Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "maxpool1", "Conv2d_3b_1x1",
                     "Conv2d_4a_3x3", "maxpool2", "Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b",
                     "Mixed_6c", "Mixed_6d", "Mixed_6e", "Mixed_7a", "Mixed_7b", "Mixed_7c", "avgpool"):
            x = getattr(self, name)(x)
        return x


# --------------------------------------------------------------------------------------- EfficientNet-B1
class _ConvNormAct(nn.Sequential):
    """Convolution (no bias), batch norm, optional SiLU: keys ``0.weight``, ``1.weight`` ... as torchvision's."""

    def __init__(self, c_in: int, c_out: int, kernel: int, stride: int = 1, groups: int = 1, act: bool = True):
        layers = [nn.Conv2d(c_in, c_out, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False),
                  nn.BatchNorm2d(c_out)]
        super().__init__(*layers, *([nn.SiLU()] if act else []))


class _SqueezeExcite(nn.Module):
    def __init__(self, channels: int, squeeze: int):
        super().__init__()
        self.fc1 = nn.Conv2d(channels, squeeze, 1)
        self.fc2 = nn.Conv2d(squeeze, channels, 1)

    def forward(self, x):
        return x * torch.sigmoid(self.fc2(F.silu(self.fc1(F.adaptive_avg_pool2d(x, 1)))))


class _MBConv(nn.Module):
    def __init__(self, expand: int, kernel: int, stride: int, c_in: int, c_out: int):
        super().__init__()
        hidden = c_in * expand
        layers = [_ConvNormAct(c_in, hidden, 1)] if expand != 1 else []
        layers += [_ConvNormAct(hidden, hidden, kernel, stride, groups=hidden),
                   _SqueezeExcite(hidden, max(1, c_in // 4)),
                   _ConvNormAct(hidden, c_out, 1, act=False)]
        self.block = nn.Sequential(*layers)
        self.residual = stride == 1 and c_in == c_out

    def forward(self, x):
        y = self.block(x)
        return y + x if self.residual else y     # stochastic depth is the identity in eval mode


# EfficientNet-B0 stages (expand ratio, kernel, stride, in, out, blocks); B1 has depth multiplier 1.1.
_EFFNET_STAGES = [(1, 3, 1, 32, 16, 1), (6, 3, 2, 16, 24, 2), (6, 5, 2, 24, 40, 2), (6, 3, 2, 40, 80, 3),
                  (6, 5, 1, 80, 112, 3), (6, 5, 2, 112, 192, 4), (6, 3, 1, 192, 320, 1)]


class EfficientNetB1(EvalNetwork):
    """EfficientNet-B1 in torchvision's layout (``features`` 0-8, ``avgpool`` 1280-d, ``classifier``)."""

    def __init__(self, num_classes: int = 1000, depth_mult: float = 1.1):
        super().__init__()
        stages: list[nn.Module] = [_ConvNormAct(3, 32, 3, stride=2)]
        for expand, kernel, stride, c_in, c_out, n in _EFFNET_STAGES:
            blocks = [_MBConv(expand, kernel, stride if i == 0 else 1, c_in if i == 0 else c_out, c_out)
                      for i in range(int(math.ceil(n * depth_mult)))]
            stages.append(nn.Sequential(*blocks))
        stages.append(_ConvNormAct(320, 1280, 1))
        self.features = nn.Sequential(*stages)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(1280, num_classes))

    def trunk(self, x: torch.Tensor) -> torch.Tensor:
        return self.avgpool(self.features(x))


# --------------------------------------------------------------------------------------------- ResNet-50
class _Bottleneck(nn.Module):
    def __init__(self, c_in: int, width: int, stride: int):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c_in, width, 1, bias=False), nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride=stride, padding=1, bias=False)   # stride here (v1.5)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3, self.bn3 = nn.Conv2d(width, width * 4, 1, bias=False), nn.BatchNorm2d(width * 4)
        self.downsample = (nn.Sequential(nn.Conv2d(c_in, width * 4, 1, stride=stride, bias=False),
                                         nn.BatchNorm2d(width * 4))
                           if stride != 1 or c_in != width * 4 else None)

    def forward(self, x):
        y = F.relu(self.bn1(self.conv1(x)))
        y = F.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        return F.relu(y + (x if self.downsample is None else self.downsample(x)))


class ResNet50(EvalNetwork):
    """ResNet-50 in torchvision's layout (``conv1``, ``bn1``, ``layer1``-``layer4``, ``avgpool`` 2048-d, ``fc``);
    SwAV's checkpoint uses the same names (``fc`` is absent there and never read out)."""

    def __init__(self, num_classes: int = 1000):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        c_in = 64
        for i, (width, n) in enumerate([(64, 3), (128, 4), (256, 6), (512, 3)]):
            blocks = [_Bottleneck(c_in if j == 0 else width * 4, width, 2 if (j == 0 and i > 0) else 1)
                      for j in range(n)]
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
            c_in = width * 4
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(2048, num_classes)

    def trunk(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(F.relu(self.bn1(self.conv1(x))))
        for i in range(1, 5):
            x = getattr(self, f"layer{i}")(x)
        return self.avgpool(x)


# ------------------------------------------------------------------------------------- CLIP ViT image encoder
class _QuickGELU(nn.Module):
    def forward(self, x):
        return x * torch.sigmoid(1.702 * x)


class _ResidualAttention(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.ln_1 = nn.LayerNorm(width)
        self.mlp = nn.Sequential()
        self.mlp.add_module("c_fc", nn.Linear(width, width * 4))
        self.mlp.add_module("gelu", _QuickGELU())
        self.mlp.add_module("c_proj", nn.Linear(width * 4, width))
        self.ln_2 = nn.LayerNorm(width)

    def forward(self, x):
        h = self.ln_1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.ln_2(x))


class _Transformer(nn.Module):
    def __init__(self, width: int, layers: int, heads: int):
        super().__init__()
        self.resblocks = nn.Sequential(*[_ResidualAttention(width, heads) for _ in range(layers)])

    def forward(self, x):
        return self.resblocks(x)


class CLIPVisual(EvalNetwork):
    """CLIP's vision transformer in OpenAI's layout (the ``visual.*`` part of their archives, prefix removed).

    ViT-L/14 is ``width=1024, layers=24, heads=16, patch=14, resolution=224, output_dim=768``; the
    ``embedding`` read-out is the image embedding (``ln_post`` of the class token times ``proj``), as
    ``encode_image`` returns it (unnormalised).
    """

    mean, std = CLIP_MEAN, CLIP_STD

    def __init__(self, width: int = 1024, layers: int = 24, heads: int = 16, patch: int = 14,
                 resolution: int = 224, output_dim: int = 768):
        super().__init__()
        self.resolution, self.patch = resolution, patch
        self.conv1 = nn.Conv2d(3, width, patch, stride=patch, bias=False)
        self.class_embedding = nn.Parameter(torch.zeros(width))
        self.positional_embedding = nn.Parameter(torch.zeros((resolution // patch) ** 2 + 1, width))
        self.ln_pre = nn.LayerNorm(width)
        self.transformer = _Transformer(width, layers, heads)
        self.ln_post = nn.LayerNorm(width)
        self.proj = nn.Parameter(torch.zeros(width, output_dim))

    def trunk(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-2:] != (self.resolution, self.resolution):
            raise ValueError(f"the CLIP image encoder takes {self.resolution}x{self.resolution} images, "
                             f"got {tuple(x.shape[-2:])}")
        x = self.conv1(x).flatten(2).transpose(1, 2)                  # (n, grid^2, width)
        cls = self.class_embedding.to(x.dtype).expand(len(x), 1, -1)
        x = self.ln_pre(torch.cat([cls, x], 1) + self.positional_embedding.to(x.dtype))
        x = self.transformer(x)
        return self.ln_post(x[:, 0]) @ self.proj


def clip_shape(state: dict[str, torch.Tensor]) -> dict[str, int]:
    """The CLIP ViT settings implied by a ``visual.*``-stripped state dict's shapes (as OpenAI's files are read)."""
    width, _, patch, _ = state["conv1.weight"].shape
    layers = len({k.split(".")[2] for k in state if k.startswith("transformer.resblocks.")})
    grid = round(math.sqrt(state["positional_embedding"].shape[0] - 1))
    return dict(width=int(width), layers=layers, heads=max(1, int(width) // 64), patch=int(patch),
                resolution=int(patch) * grid, output_dim=int(state["proj"].shape[1]))


# ------------------------------------------------------------------------------------------------ loading
_BUILDERS = {"alexnet": AlexNet, "inceptionv3": InceptionV3, "clip-vit-l14": CLIPVisual,
             "efficientnet-b1": EfficientNetB1, "swav-resnet50": ResNet50}
EVAL_NETWORKS = tuple(_BUILDERS)


def build_eval_network(name: str, seed: int = 0, **clip_settings) -> EvalNetwork:
    """A randomly initialised evaluation network (for tests; deterministic for a ``seed``), in eval mode.

    Convolutions get He-normal weights (fan-in: variance-preserving, depthwise convolutions included),
    batch norms unit scale and zero shift, linear layers N(0, 0.02): deep random networks then keep
    informative, image-dependent activations. ``clip_settings`` (width, layers, heads, patch, resolution,
    output_dim) build a reduced CLIP ViT.
    """
    if name not in _BUILDERS:
        raise ValueError(f"unknown evaluation network {name!r}; available: {', '.join(EVAL_NETWORKS)}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = _BUILDERS[name](**clip_settings) if name == "clip-vit-l14" else _BUILDERS[name]()
        for m in net.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.MultiheadAttention):
                nn.init.normal_(m.in_proj_weight, std=0.02)
        if isinstance(net, CLIPVisual):
            for p in (net.class_embedding, net.positional_embedding, net.proj):
                nn.init.normal_(p, std=net.proj.shape[0] ** -0.5)
    return net.eval().requires_grad_(False)


def _reason(err: Exception) -> str:
    """The first line of an error, shortened: torch's own messages run over many lines."""
    line = (str(err).strip().splitlines() or [""])[0]
    return f"{type(err).__name__}: {line[:160]}"


def _read(path: Path, name: str) -> dict[str, torch.Tensor]:
    """The tensors of a weight file: a TorchScript archive (OpenAI CLIP) or a pickled state dict."""
    source = WEIGHT_SOURCES[name]
    hint = f"download {source.file} from {source.url}"
    state = None
    if name == "clip-vit-l14" and zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as z:
            scripted = any(n.split("/", 1)[-1].startswith("code/") for n in z.namelist())
        if scripted:
            try:
                with warnings.catch_warnings():     # OpenAI's archive format is read by torch.jit.load only
                    warnings.simplefilter("ignore", DeprecationWarning)
                    state = torch.jit.load(str(path), map_location="cpu").state_dict()
            except Exception as err:  # torch raises several types for damaged archives
                raise EvalNetError(f"{path} could not be read as a TorchScript archive ({_reason(err)}); "
                                   f"the file may be truncated: {hint}") from err
    if state is None:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:
            raise EvalNetError(f"{path} could not be read as a PyTorch weight file ({_reason(err)}); "
                               f"{name} needs {source.layout}: {hint}") from err
    for wrapper in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise EvalNetError(f"{path} holds a {type(state).__name__}, not a state dict; "
                           f"{name} needs {source.layout}: {hint}")
    return dict(state)


def _select(state: dict[str, torch.Tensor], name: str) -> dict[str, torch.Tensor]:
    """The tensors of the network proper, named as our modules name them."""
    if name == "clip-vit-l14":
        return {k[len("visual."):]: v for k, v in state.items() if k.startswith("visual.")}
    if name == "swav-resnet50":
        state = {k[len("module."):] if k.startswith("module.") else k: v for k, v in state.items()}
        return {k: v for k, v in state.items() if not k.startswith(("projection_head.", "prototypes"))}
    return state


def _optional(name: str, key: str) -> bool:
    """Keys a published file may lack: batch-norm counters (older files), SwAV's classifier (never trained)."""
    return key.endswith("num_batches_tracked") or (name == "swav-resnet50" and key.startswith("fc."))


def load_eval_network(name: str, path: str | Path) -> EvalNetwork:
    """Build evaluation network ``name`` (one of :data:`EVAL_NETWORKS`) from its published weight file.

    Every tensor of the network must be in the file under its published name and shape, and the file
    must hold nothing else of the network's kind (strict loading); the SwAV checkpoint's ``module.``
    prefix is removed and its projection head and prototypes ignored; of OpenAI's CLIP archive only the
    ``visual.*`` tensors are read (its size is read from their shapes). Raises ``FileNotFoundError``
    (missing file: where to get it) or :class:`EvalNetError` (a file of another kind: what was expected).
    """
    if name not in _BUILDERS:
        raise ValueError(f"unknown evaluation network {name!r}; available: {', '.join(EVAL_NETWORKS)}")
    path, source = Path(path), WEIGHT_SOURCES[name]
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such weight file for {name}; download {source.file} from {source.url}")
    state = _select(_read(path, name), name)
    expected_kind = f"{name} needs {source.layout} ({source.file} from {source.url})"
    if name == "clip-vit-l14":
        needed = ("conv1.weight", "positional_embedding", "proj")
        if any(k not in state for k in needed):
            raise EvalNetError(f"{path} has no CLIP image encoder (no visual.conv1.weight, "
                               f"visual.positional_embedding, visual.proj); {expected_kind}")
        settings = clip_shape(state)
    else:
        settings = {}
    with torch.device("meta"):      # no random initialisation: every tensor comes from the file
        net = _BUILDERS[name](**settings)
    net = net.to_empty(device="cpu")
    own = net.state_dict()
    missing = [k for k in own if k not in state and not _optional(name, k)]
    extra = [k for k in state if k not in own]
    if missing or extra:
        shown = ", ".join(list(state)[:3]) or "none"
        what = (f"lacks {len(missing)} of the network's {len(own)} tensors (e.g. {missing[0]})" if missing else
                f"has {len(extra)} tensors the network does not (e.g. {extra[0]})")
        raise EvalNetError(f"{path} is not the {name} weight file: it {what}; its keys begin {shown}. "
                           f"{expected_kind}")
    for key, tensor in state.items():
        if tuple(tensor.shape) != tuple(own[key].shape):
            raise EvalNetError(f"{path}: {key} has shape {tuple(tensor.shape)}, {name} needs "
                               f"{tuple(own[key].shape)}; {expected_kind}")
    with torch.no_grad():
        for key, tensor in own.items():
            if key not in state:         # optional: counters, and SwAV's untrained classifier (never read out)
                tensor.zero_()
    net.load_state_dict({k: v.to(own[k].dtype) for k, v in state.items()}, strict=False)
    return net.eval().requires_grad_(False)
