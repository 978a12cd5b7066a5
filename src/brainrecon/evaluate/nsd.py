"""The evaluation protocol of the NSD-era reconstruction papers (MindEye 1/2, Brain-Diffuser, Takagi & Nishimoto).

Eight metrics, each computed as those papers' public evaluation code computes it (docs/evaluation.md,
"NSD protocol", states every choice):

- ``pixcorr`` (similarity, higher is better): RGB pixels at 425 px, Pearson r with the own stimulus.
- ``ssim`` (similarity, higher): greyscale (skimage ``rgb2gray``) at 425 px, Gaussian weights sigma 1.5,
  population covariances, data range 1.
- ``alexnet2`` / ``alexnet5`` (identification, higher): AlexNet ``features.4`` / ``features.11`` (ReLU after
  conv2 / conv5) at 256 px, ImageNet normalisation.
- ``inceptionv3`` (identification, higher): InceptionV3 ``avgpool`` (2048-d) at 342 px.
- ``clip`` (identification, higher): CLIP ViT-L/14 image embedding (768-d) at 224 px, CLIP normalisation.
- ``effnet`` (distance, lower is better): EfficientNet-B1 ``avgpool`` (1280-d) at 255 px, correlation distance.
- ``swav`` (distance, lower): SwAV ResNet-50 ``avgpool`` (2048-d) at 224 px, correlation distance.

Resizing: bilinear, the shorter side to the protocol size (torchvision's ``Resize(size)``); reconstructions
smaller than that are upsampled without antialiasing (which changes nothing when upsampling), larger
images are downsampled with antialiasing, as torchvision's ``Resize`` does on tensors.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

from ..nets.evalnets import (WEIGHT_SOURCES, EvalNetError, EvalNetwork, build_eval_network, load_eval_network)
from .similarity import pixel_correlation, ssim

__all__ = ["NSD_NETWORKS", "PIXEL_SIZE", "MetricValues", "nsd_protocol", "network_features", "two_way_identification",
           "correlation_distance", "resize"]

NSD_NETWORKS = ("alexnet", "inceptionv3", "clip-vit-l14", "efficientnet-b1", "swav-resnet50")
PIXEL_SIZE = 425

_TWO_WAY = ("two-way identification: r[i, j] Pearson r between ground-truth i and reconstruction j features, "
            "share of the other ground truths i != j with r[i, j] < r[j, j] (strictly: ties count as failures), "
            "all other test images as candidates, chance 0.5")
_DISTANCE = "correlation distance 1 - r between each reconstruction's and its own stimulus's features, lower is better"


@dataclass(frozen=True)
class _NetMetric:
    metric: str            # metric name
    network: str           # one of NSD_NETWORKS
    layer: str             # module read out ("embedding": the network's output)
    size: int              # shorter side after resizing
    kind: Literal["identification", "distance"]
    description: str       # the layer and normalisation, in words


_NET_METRICS = (
    _NetMetric("alexnet2", "alexnet", "features.4", 256, "identification",
               "AlexNet features.4 (ReLU after conv2, 192x31x31 at 256 px), ImageNet mean/SD normalisation"),
    _NetMetric("alexnet5", "alexnet", "features.11", 256, "identification",
               "AlexNet features.11 (ReLU after conv5, 256x15x15 at 256 px), ImageNet mean/SD normalisation"),
    _NetMetric("inceptionv3", "inceptionv3", "avgpool", 342, "identification",
               "InceptionV3 (eval mode, torchvision's transform_input) avgpool, 2048-d, ImageNet mean/SD normalisation"),
    _NetMetric("clip", "clip-vit-l14", "embedding", 224, "identification",
               "CLIP ViT-L/14 image embedding (ln_post of the class token times proj, 768-d, not L2-normalised), "
               "CLIP mean/SD normalisation"),
    _NetMetric("effnet", "efficientnet-b1", "avgpool", 255, "distance",
               "EfficientNet-B1 avgpool, 1280-d, ImageNet mean/SD normalisation"),
    _NetMetric("swav", "swav-resnet50", "avgpool", 224, "distance",
               "SwAV ResNet-50 avgpool, 2048-d, ImageNet mean/SD normalisation"),
)
_LAYERS = {net: {m.layer: m.size for m in _NET_METRICS if m.network == net} for net in NSD_NETWORKS}


@dataclass
class MetricValues:
    """One metric of the protocol, per reconstruction."""

    name: str                 # "pixcorr", "ssim", "alexnet2", "alexnet5", "inceptionv3", "clip", "effnet", "swav"
    kind: Literal["similarity", "identification", "distance"]
    per_image: np.ndarray = field(repr=False)   # (n,) r, SSIM, share of other ground truths beaten, or distance
    higher_is_better: bool
    protocol: str             # one line: resolution, resize, normalisation, layer, rule
    scores: np.ndarray | None = field(default=None, repr=False)  # identification: (n, n), scores[j, i] how much
    # reconstruction j resembles candidate i (its own stimulus i = j); bootstrap and permutation recompute from it
    n_way: int = 2            # candidates per decision of an identification (2: pairwise)

    def mean(self) -> float:
        """The published summary: the mean over reconstructions."""
        return float(np.mean(self.per_image))

    def to_json(self) -> dict:
        return {"name": self.name, "kind": self.kind, "mean": self.mean(), "higher_is_better": self.higher_is_better,
                "protocol": self.protocol, "n": int(len(self.per_image)),
                "per_image": [float(v) for v in self.per_image]}


def _check_images(images: np.ndarray, what: str) -> np.ndarray:
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"{what} must be (n, 3, H, W) RGB images, got shape {images.shape}")
    return images


def resize(images: np.ndarray | torch.Tensor, size: int) -> torch.Tensor:
    """Bilinear resize of ``(n, 3, H, W)`` images, the shorter side to ``size`` (torchvision ``Resize(size)``).

    Upsampling is plain bilinear interpolation (``align_corners=False``); downsampling applies
    antialiasing, as torchvision's ``Resize`` does on tensors (for upsampling the two are the same).
    Returns a float32 tensor.
    """
    x = torch.as_tensor(np.asarray(images) if not isinstance(images, torch.Tensor) else images, dtype=torch.float32)
    h, w = x.shape[-2:]
    if h <= w:
        out = (size, int(size * w / h))
    else:
        out = (int(size * h / w), size)
    if out == (h, w):
        return x
    return F.interpolate(x, size=out, mode="bilinear", align_corners=False, antialias=out[0] < h or out[1] < w)


def two_way_identification(pred_feats: np.ndarray, true_feats: np.ndarray) -> np.ndarray:
    """Two-way identification (n,) of each reconstruction, as the NSD-era papers compute it.

    Parameters
    ----------
    pred_feats : (n, d) features of the reconstructions (any trailing shape is flattened).
    true_feats : (n, d) features of their ground-truth images, in the same order.

    Returns
    -------
    (n,) for each reconstruction j, the share of the other ground truths i != j whose correlation
    with it is strictly lower than its own ground truth's: ``r[i, j] < r[j, j]`` with ``r[i, j]`` the
    Pearson r between ground truth i and reconstruction j. Ties count as failures; a constant feature
    vector has undefined r (NaN) and never wins. Chance 0.5.
    """
    p = np.asarray(pred_feats, dtype=np.float64).reshape(len(pred_feats), -1)
    t = np.asarray(true_feats, dtype=np.float64).reshape(len(true_feats), -1)
    if p.shape != t.shape:
        raise ValueError(f"reconstruction features {p.shape} and ground-truth features {t.shape} differ in shape")
    n = len(p)
    if n < 2:
        raise ValueError("two-way identification needs at least two images")
    with np.errstate(invalid="ignore", divide="ignore"):
        p = p - p.mean(1, keepdims=True)
        t = t - t.mean(1, keepdims=True)
        p = p / np.linalg.norm(p, axis=1, keepdims=True)
        t = t / np.linalg.norm(t, axis=1, keepdims=True)
        r = t @ p.T                                      # r[i, j]: ground truth i, reconstruction j
        beaten = r < np.diag(r)[None, :]
    return beaten.sum(0) / (n - 1)


def correlation_scores(pred_feats: np.ndarray, true_feats: np.ndarray) -> np.ndarray:
    """(n, n) Pearson r between reconstruction j's features and ground truth i's, as ``scores[j, i]``
    (the score matrix the bootstrap and permutation of :mod:`brainrecon.evaluate.protocol` take)."""
    p = np.asarray(pred_feats, dtype=np.float64).reshape(len(pred_feats), -1)
    t = np.asarray(true_feats, dtype=np.float64).reshape(len(true_feats), -1)
    with np.errstate(invalid="ignore", divide="ignore"):
        p = p - p.mean(1, keepdims=True)
        t = t - t.mean(1, keepdims=True)
        p = p / np.linalg.norm(p, axis=1, keepdims=True)
        t = t / np.linalg.norm(t, axis=1, keepdims=True)
    return np.nan_to_num(p @ t.T, nan=-np.inf)


def correlation_distance(pred_feats: np.ndarray, true_feats: np.ndarray) -> np.ndarray:
    """(n,) 1 - Pearson r between each reconstruction's features and its own ground truth's
    (scipy's ``spatial.distance.correlation``)."""
    p = np.asarray(pred_feats, dtype=np.float64).reshape(len(pred_feats), -1)
    t = np.asarray(true_feats, dtype=np.float64).reshape(len(true_feats), -1)
    p = p - p.mean(1, keepdims=True)
    t = t - t.mean(1, keepdims=True)
    return 1.0 - (p * t).sum(1) / (np.linalg.norm(p, axis=1) * np.linalg.norm(t, axis=1))


def _network(name: str, weights: str | Path | None) -> EvalNetwork:
    return build_eval_network(name) if weights is None else load_eval_network(name, weights)


def _features(net: EvalNetwork, images: np.ndarray, layers: Mapping[str, int], device: str,
              batch_size: int) -> dict[str, np.ndarray]:
    net = net.to(device)
    out: dict[str, list[np.ndarray]] = {layer: [] for layer in layers}
    by_size: dict[int, list[str]] = {}
    for layer, size in layers.items():
        by_size.setdefault(size, []).append(layer)
    with torch.inference_mode():
        for start in range(0, len(images), batch_size):
            chunk = torch.as_tensor(np.asarray(images[start:start + batch_size], dtype=np.float32))
            for size, names in by_size.items():
                taps = net.taps(resize(chunk, size).to(device), names)
                for name in names:
                    out[name].append(taps[name].float().flatten(1).cpu().numpy())
    return {layer: np.concatenate(chunks) for layer, chunks in out.items()}


def network_features(name: str, images: np.ndarray, weights: str | Path | None, layer: str | None = None,
                     device: str = "cpu", batch_size: int = 16) -> dict[str, np.ndarray]:
    """Features of ``images`` through evaluation network ``name`` as the protocol takes them.

    Parameters
    ----------
    name : one of :data:`NSD_NETWORKS`.
    images : (n, 3, H, W) float32 RGB in [0, 1]; resized (bilinear, shorter side) to the protocol's size.
    weights : the published weight file; ``None`` builds a randomly initialised network (tests).
    layer : one protocol layer (``features.4``, ``features.11``, ``avgpool``, ``embedding``); default all of
        the network's protocol layers.

    Returns
    -------
    {layer: (n, d) float32} features, flattened in (C, H, W) order.
    """
    if name not in NSD_NETWORKS:
        raise ValueError(f"unknown evaluation network {name!r}; available: {', '.join(NSD_NETWORKS)}")
    layers = _LAYERS[name]
    if layer is not None:
        if layer not in layers:
            raise ValueError(f"{name} is read out at {', '.join(layers)} in the NSD protocol, not {layer!r}")
        layers = {layer: layers[layer]}
    images = _check_images(images, "images")
    return _features(_network(name, weights), images, layers, device, batch_size)


def _pixel_metrics(recons: np.ndarray, stimuli: np.ndarray) -> list[MetricValues]:
    r = resize(recons, PIXEL_SIZE).numpy()
    s = resize(stimuli, PIXEL_SIZE).numpy()
    resize_text = f"{PIXEL_SIZE} px (bilinear, shorter side; upsampling without antialiasing)"
    return [
        MetricValues("pixcorr", "similarity", pixel_correlation(r, s), True,
                     f"PixCorr: {resize_text}, RGB flattened, Pearson r with the own stimulus, mean over images"),
        MetricValues("ssim", "similarity", ssim(r, s), True,
                     f"SSIM: {resize_text}, greyscale (skimage rgb2gray), Gaussian weights sigma 1.5, "
                     "no sample covariance, data range 1 (skimage structural_similarity), mean over images"),
    ]


def _missing_message(name: str, path: str | Path | None) -> str:
    source = WEIGHT_SOURCES[name]
    where = f"download {source.file} from {source.url}"
    if path is None:
        return f"no weight file given for {name}: {where} and pass it as {name}=PATH"
    return f"{path}: no such weight file for {name}; {where}"


def nsd_protocol(recons: np.ndarray, stimuli: np.ndarray, weights: Mapping[str, str | Path] = {},
                 device: str = "cpu", batch_size: int = 16,
                 log: Callable[[str], None] | None = None) -> tuple[list[MetricValues], dict[str, str]]:
    """Score reconstructions by the NSD-era protocol.

    Parameters
    ----------
    recons, stimuli : (n, 3, H, W) float32 RGB in [0, 1], reconstruction j of stimulus j (n >= 2).
    weights : network name (:data:`NSD_NETWORKS`) -> its published weight file. Networks without a
        file, or whose file is missing or of another kind, are skipped.
    device, batch_size : where and how many images at a time the networks run.
    log : takes one progress or warning line at a time.

    Returns
    -------
    (the metrics computed, in the protocol's order; {metric name: one line why it was skipped}).
    PixCorr and SSIM always run.
    """
    recons = _check_images(recons, "reconstructions")
    stimuli = _check_images(stimuli, "stimuli")
    if recons.shape[0] != stimuli.shape[0] or recons.shape[0] < 2:
        raise ValueError(f"{recons.shape[0]} reconstructions and {stimuli.shape[0]} stimuli: the NSD protocol "
                         "needs one reconstruction per stimulus and at least two of each")
    unknown = sorted(set(weights) - set(NSD_NETWORKS))
    if unknown:
        raise ValueError(f"unknown evaluation network(s) {', '.join(unknown)}; available: {', '.join(NSD_NETWORKS)}")
    log = log or (lambda message: None)
    metrics = _pixel_metrics(recons, stimuli)
    skipped: dict[str, str] = {}
    n = len(recons)
    for name in NSD_NETWORKS:
        specs = [m for m in _NET_METRICS if m.network == name]
        path = weights.get(name)
        try:
            if path is None or not Path(path).is_file():
                raise FileNotFoundError(_missing_message(name, path))
            net = load_eval_network(name, path)
        except (FileNotFoundError, EvalNetError) as err:
            for spec in specs:
                skipped[spec.metric] = str(err)
            log(f"NSD protocol: {', '.join(s.metric for s in specs)} skipped: {err}")
            continue
        log(f"NSD protocol: {name} on {n} reconstructions and their stimuli")
        layers = {s.layer: s.size for s in specs}
        if recons.shape == stimuli.shape:      # one pass over both
            both = _features(net, np.concatenate([recons, stimuli]), layers, device, batch_size)
            pred_feats = {k: v[:n] for k, v in both.items()}
            true_feats = {k: v[n:] for k, v in both.items()}
        else:                                  # e.g. stimuli kept at their own size
            pred_feats = _features(net, recons, layers, device, batch_size)
            true_feats = _features(net, stimuli, layers, device, batch_size)
        del net
        for spec in specs:
            pred, true = pred_feats[spec.layer], true_feats[spec.layer]
            text = f"{spec.size} px (bilinear, shorter side), {spec.description}"
            if spec.kind == "identification":
                metrics.append(MetricValues(spec.metric, "identification", two_way_identification(pred, true), True,
                                            f"{text}; {_TWO_WAY}", scores=correlation_scores(pred, true)))
            else:
                metrics.append(MetricValues(spec.metric, "distance", correlation_distance(pred, true), False,
                                            f"{text}; {_DISTANCE}"))
    return metrics, skipped
