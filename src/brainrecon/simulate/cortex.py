"""A synthetic visual cortex: voxel responses to images, with realistic 3 T noise.

Each voxel has a Gaussian population receptive field (pRF) whose size grows with eccentricity and
along the hierarchy. Early areas (V1, V2, V3, and part of hV4) respond through an image-computable
model that knows nothing of the DNN: rectified luminance and colour-opponent channels plus Gabor
energy at 4 orientations x 3 spatial frequencies, pooled over the pRF with voxel-specific channel
weights and a compressive exponent (the CSS model). Higher areas (hV4, LOC, FFA, PPA) pool
post-ReLU features of a DNN over their (large) pRFs with sparse channel weights. Each voxel has its
own reliability; every presentation gets fresh noise, part of it shared across voxels.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel

FIELD_DEG = 12.0  # the stimulus spans 12 x 12 degrees of visual angle, as in the paper


class RoiSpec(BaseModel):
    """Per-area parameters: pRF size = size_intercept + size_slope * eccentricity (deg)."""
    n_voxels: int
    size_intercept: float
    size_slope: float
    max_ecc: float = 7.0
    exponent: float = 0.5          # compressive spatial summation
    dnn_layer: str | None = None   # pool this DNN layer's features (None: early-vision channels only)
    dnn_share: float = 0.0         # fraction of the voxel's signal variance from the DNN pathway
    reliability: float = 0.2       # mean single-presentation test-retest correlation of the voxels


DEFAULT_ROIS = {
    "V1": RoiSpec(n_voxels=1400, size_intercept=0.2, size_slope=0.12, exponent=0.8, reliability=0.24),
    "V2": RoiSpec(n_voxels=1100, size_intercept=0.3, size_slope=0.18, exponent=0.6, reliability=0.22),
    "V3": RoiSpec(n_voxels=900, size_intercept=0.4, size_slope=0.25, exponent=0.5, reliability=0.2),
    "hV4": RoiSpec(n_voxels=500, size_intercept=0.6, size_slope=0.35, exponent=0.4,
                   dnn_layer="conv3_3", dnn_share=0.5, reliability=0.17),
    "LOC": RoiSpec(n_voxels=700, size_intercept=1.2, size_slope=0.5, max_ecc=5.0, exponent=0.3,
                   dnn_layer="conv4_3", dnn_share=1.0, reliability=0.13),
    "FFA": RoiSpec(n_voxels=300, size_intercept=2.0, size_slope=0.6, max_ecc=4.0, exponent=0.3,
                   dnn_layer="conv5_3", dnn_share=1.0, reliability=0.1),
    "PPA": RoiSpec(n_voxels=400, size_intercept=2.0, size_slope=0.6, max_ecc=5.0, exponent=0.3,
                   dnn_layer="conv5_3", dnn_share=1.0, reliability=0.1),
}


class CortexConfig(BaseModel):
    """How the synthetic subject is built (all randomness flows from ``seed``)."""
    seed: int = 0
    grid: int = 64                       # resolution (pixels) at which the early-vision model sees images
    rois: dict[str, RoiSpec] = DEFAULT_ROIS
    shared_noise_fraction: float = 0.3   # part of the noise variance shared across voxels (low rank)
    n_noise_factors: int = 8


@dataclass
class Voxels:
    """Voxel parameters, one row per voxel."""
    roi: np.ndarray        # (n,) area name
    x0: np.ndarray         # (n,) pRF centre, degrees (right positive)
    y0: np.ndarray         # (n,) pRF centre, degrees (up positive)
    sigma: np.ndarray      # (n,) pRF size, degrees
    xyz: np.ndarray        # (n, 3) fake anatomical position, mm
    reliability: np.ndarray  # (n,) target single-trial test-retest correlation


def gabor_bank(grid: int) -> torch.Tensor:
    """(24, 1, k, k) quadrature Gabor pairs: 3 spatial frequencies x 4 orientations x 2 phases."""
    kernels = []
    for cycles_per_pixel in (1 / 16, 1 / 8, 1 / 4):
        sigma = 0.5 / cycles_per_pixel
        k = int(2 * math.ceil(2 * sigma) + 1)
        yy, xx = np.mgrid[-(k // 2):k // 2 + 1, -(k // 2):k // 2 + 1].astype(np.float64)
        env = np.exp(-(xx ** 2 + yy ** 2) / (2 * sigma ** 2))
        for theta in np.arange(4) * np.pi / 4:
            u = xx * np.cos(theta) + yy * np.sin(theta)
            for phase in (0.0, np.pi / 2):
                g = env * np.cos(2 * np.pi * cycles_per_pixel * u + phase)
                g -= env * g.sum() / env.sum()  # zero DC
                g /= np.abs(g).sum()
                kernels.append(g)
    size = max(g.shape[0] for g in kernels)
    bank = np.zeros((len(kernels), 1, size, size), np.float32)
    for i, g in enumerate(kernels):
        o = (size - g.shape[0]) // 2
        bank[i, 0, o:o + g.shape[0], o:o + g.shape[0]] = g
    return torch.from_numpy(bank)


def early_channels(images: torch.Tensor, grid: int, bank: torch.Tensor) -> torch.Tensor:
    """Early-vision channel maps (n, 18, grid, grid) of RGB images (n, 3, H, W) in [0, 1].

    Channels: ON/OFF luminance, ON/OFF red-green, ON/OFF blue-yellow (relative to mid grey), and
    Gabor energy of luminance at 3 spatial frequencies x 4 orientations.
    """
    x = F.interpolate(images, size=(grid, grid), mode="area")
    r, g, b = x[:, 0], x[:, 1], x[:, 2]
    lum = (r + g + b) / 3
    rg, by = r - g, b - (r + g) / 2
    signed = torch.stack([lum - 0.5, rg, by], 1)
    rect = torch.cat([signed.clamp(min=0), (-signed).clamp(min=0)], 1)
    pad = bank.shape[-1] // 2
    resp = F.conv2d(F.pad(lum[:, None] - 0.5, (pad,) * 4, mode="reflect"), bank)
    energy = (resp[:, 0::2] ** 2 + resp[:, 1::2] ** 2).sqrt() * 4
    return torch.cat([rect, energy], 1)


def place_voxels(config: CortexConfig, rng: np.random.Generator) -> Voxels:
    """Sample pRFs (denser near the fovea, as cortical magnification implies) and positions."""
    parts = {k: [] for k in ("roi", "x0", "y0", "sigma", "xyz", "reliability")}
    for i, (name, spec) in enumerate(config.rois.items()):
        n = spec.n_voxels
        ecc = spec.max_ecc * rng.random(n) ** 1.6
        angle = rng.uniform(0, 2 * np.pi, n)
        sigma = (spec.size_intercept + spec.size_slope * ecc) * np.exp(rng.normal(0, 0.2, n))
        # reliability varies across voxels: a Beta with the area's mean (some voxels carry little signal)
        a = 2.0
        rel = rng.beta(a, a * (1 - spec.reliability) / spec.reliability, n)
        xyz = np.stack([np.sign(np.cos(angle)) * (10 + 3 * i) + rng.normal(0, 2, n),
                        -80 + 8 * i + ecc * 2 + rng.normal(0, 2, n),
                        np.sin(angle) * 10 + rng.normal(0, 2, n)], 1).round() * 2
        parts["roi"].append(np.full(n, name))
        parts["x0"].append(ecc * np.cos(angle))
        parts["y0"].append(ecc * np.sin(angle))
        parts["sigma"].append(sigma)
        parts["xyz"].append(xyz)
        parts["reliability"].append(rel)
    return Voxels(**{k: np.concatenate(v) for k, v in parts.items()})


def prf_weights(vox: Voxels, idx: np.ndarray, size: int) -> torch.Tensor:
    """(len(idx), size*size) Gaussian pRF weights over a size x size map covering the field, unit sum."""
    coords = (np.arange(size) + 0.5) / size * FIELD_DEG - FIELD_DEG / 2
    xx, yy = np.meshgrid(coords, -coords)  # image rows go downward, degrees go up
    d2 = (xx.ravel()[None] - vox.x0[idx, None]) ** 2 + (yy.ravel()[None] - vox.y0[idx, None]) ** 2
    w = np.exp(-d2 / (2 * vox.sigma[idx, None] ** 2))
    w[w < 1e-6] = 0.0  # exact zeros: tiny (denormal) float32 weights make matrix products crawl
    # a pRF partly outside the stimulus still only sees the stimulus: normalise by its full mass
    w /= 2 * np.pi * (vox.sigma[idx, None] * size / FIELD_DEG) ** 2
    return torch.from_numpy(w.astype(np.float32))


def pool_prf(maps: torch.Tensor, prf: torch.Tensor) -> torch.Tensor:
    """Channel maps (b, c, P) pooled by pRFs (V, P) -> (b, c, V), as one matrix product."""
    b, c, p = maps.shape
    return (maps.reshape(b * c, p) @ prf.T).reshape(b, c, -1)


class SyntheticCortex:
    """Noise-free voxel signals of images: ``signal(images) -> (n_images, n_voxels)``.

    ``network`` (a ``VGGEncoder``) supplies the features pooled by higher areas. Signals are
    standardised per voxel with statistics of a reference set (see ``signal``).
    """

    def __init__(self, config: CortexConfig, network):
        self.config = config
        self.network = network
        self.rng = np.random.default_rng(config.seed)
        self.voxels = place_voxels(config, self.rng)
        self.bank = gabor_bank(config.grid)
        self._stats = None
        self._build_weights()

    @property
    def n_voxels(self) -> int:
        return len(self.voxels.roi)

    def _build_weights(self) -> None:
        rng, vox = self.rng, self.voxels
        n = self.n_voxels
        # early pathway: positive channel weights, each voxel with its own mix
        self.early_w = torch.from_numpy(np.exp(rng.normal(0, 0.7, (n, 18))).astype(np.float32))
        self.early_prf = prf_weights(vox, np.arange(n), self.config.grid)
        # DNN pathway: sparse positive channel weights per voxel, pRF over the layer's map
        self.dnn = {}
        for name, spec in self.config.rois.items():
            if spec.dnn_layer is None:
                continue
            idx = np.flatnonzero(vox.roi == name)
            self.dnn[name] = (spec.dnn_layer, idx)
        self.dnn_w, self.dnn_prf = {}, {}

    def _dnn_weights(self, roi: str, channels: int, size: int):
        if roi not in self.dnn_w:
            _, idx = self.dnn[roi]
            w = np.exp(self.rng.normal(0, 1.0, (len(idx), channels)))
            w *= self.rng.random((len(idx), channels)) < 0.1
            self.dnn_w[roi] = torch.from_numpy((w / np.maximum(w.sum(1, keepdims=True), 1e-6)).astype(np.float32))
            self.dnn_prf[roi] = prf_weights(self.voxels, idx, size)
        return self.dnn_w[roi], self.dnn_prf[roi]

    @torch.inference_mode()
    def raw_signal(self, images: torch.Tensor, batch: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
        """Unscaled (early pathway, DNN pathway) signals, each (n_images, n_voxels).

        The DNN pathway equals the early one for voxels of areas that pool no DNN layer.
        """
        exps = torch.tensor([self.config.rois[r].exponent for r in self.voxels.roi])
        layers = sorted({layer for layer, _ in self.dnn.values()})
        early_all, dnn_all = [], []
        for s in range(0, len(images), batch):
            x = images[s:s + batch]
            ch = early_channels(x, self.config.grid, self.bank).flatten(2)        # (b, 18, G*G)
            early = (pool_prf(ch, self.early_prf) * self.early_w.T).sum(1).clamp(min=1e-6) ** exps  # (b, V)
            dnn = early.clone()
            if layers:
                big = F.interpolate(x, size=(self.config.grid,) * 2, mode="area")
                feats = self.network(big, layers, relu=True)
                for roi, (layer, idx) in self.dnn.items():
                    f = feats[layer]
                    w, prf = self._dnn_weights(roi, f.shape[1], f.shape[-1])
                    dnn[:, idx] = (pool_prf(f.flatten(2), prf) * w.T).sum(1).clamp(min=1e-6) ** exps[idx]
            early_all.append(early)
            dnn_all.append(dnn)
        return torch.cat(early_all), torch.cat(dnn_all)

    def signal(self, images: torch.Tensor, reference: bool = False) -> np.ndarray:
        """Standardised noise-free signals (n_images, n_voxels) float64.

        With ``reference=True`` these images (the training set) define each voxel's standardisation:
        zero mean and unit variance on them; other sets are scaled with the same statistics.
        """
        early, dnn = self.raw_signal(images)
        if reference:
            self._stats = (early.mean(0), early.std(0) + 1e-8, dnn.mean(0), dnn.std(0) + 1e-8)
        elif getattr(self, "_stats", None) is None:
            raise RuntimeError("call signal(reference_images, reference=True) first")
        me, se, md, sd = self._stats
        share = torch.tensor([self.config.rois[r].dnn_share for r in self.voxels.roi])
        mixed = torch.sqrt(share) * (dnn - md) / sd + torch.sqrt(1 - share) * (early - me) / se
        return mixed.double().numpy()

    def measure(self, signal: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """One noisy presentation per row of ``signal`` (n, V): fresh noise, part of it shared.

        With unit signal variance, noise variance (1 - r) / r gives an expected single-trial
        test-retest correlation r (the voxel's ``reliability``).
        """
        n, v = signal.shape
        cfg = self.config
        noise_sd = np.sqrt((1 - self.voxels.reliability) / self.voxels.reliability)
        if not hasattr(self, "_loadings"):
            lo = self.rng.normal(0, 1, (cfg.n_noise_factors, v))
            self._loadings = lo / np.sqrt((lo ** 2).sum(0, keepdims=True))
        shared = rng.normal(0, 1, (n, cfg.n_noise_factors)) @ self._loadings
        own = rng.normal(0, 1, (n, v))
        f = cfg.shared_noise_fraction
        noise = np.sqrt(f) * shared + np.sqrt(1 - f) * own
        return 100.0 + signal + noise * noise_sd  # fMRI units with an arbitrary baseline
