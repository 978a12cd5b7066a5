"""A second synthetic visual cortex, independent of the first (``cortex.py``) in every part.

Model ``"dn-stats"`` (:class:`StatsCortex`): early areas see the image through a front end of cone
contrasts (sRGB linearised, LMS, contrast to the local mean luminance), centre-surround
(difference-of-Gaussians) luminance and colour-opponent channels, and orientation energy from
quadrature log-Gabor filters (4 scales x 6 orientations) under divisive normalisation by the local
energy of all orientations of the scale. Voxels have elliptical difference-of-Gaussians pRFs whose
size follows a power law of eccentricity, eccentricities drawn by cortical magnification, a weak
orientation preference and a spatial-frequency preference that follows eccentricity; the pooled
drive is rectified and compressed. Higher areas (part of hV4, LOC, FFA, PPA) never see a DNN: they
pool 17 mid-level image statistics (junction energy, cross-scale coherence, anisotropy, spectral
balance, saturation, warm hues, blobs, local variance, brightness) over large pRFs and respond with
a small random non-linear mixture of their logarithms. Noise: spatially correlated between nearby
voxels, one global component, run offsets and drifts, signal-dependent independent noise, each voxel
with its own reliability, baseline and gain.

Every parameter is set from physiology (docs/method.md), not from any reconstruction result.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import scipy.spatial.distance
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field

from .cortex import FIELD_DEG

N_SCALES, N_ORIENT = 4, 6
# log-Gabor centre frequencies (cycles per pixel of a 64 px grid over 12 deg): periods of 0.54-4.3 deg
SCALE_FREQS = (0.35, 0.175, 0.0875, 0.04375)
MID_NAMES = ("junction_s1_0", "junction_s1_30", "junction_s1_60", "junction_s2_0", "junction_s2_30",
             "junction_s2_60", "coherence_s01", "coherence_s12", "coherence_s23", "anisotropy_s1",
             "anisotropy_s2", "coarse_share", "saturation", "warm_hue", "blob", "variance", "brightness")


class StatsRoiSpec(BaseModel):
    """Per-area parameters of the ``dn-stats`` model.

    pRF centre size (deg) = ``size_scale * (ecc + size_offset) ** size_power``; eccentricities are
    drawn uniformly in cortical distance under magnification ``M(E) ~ 1 / (E + mag_e2)`` between
    ``min_ecc`` and ``max_ecc``.
    """
    model_config = ConfigDict(extra="forbid")

    n_voxels: int = Field(ge=1)
    size_scale: float
    size_power: float
    size_offset: float = 0.6
    min_ecc: float = 0.0
    max_ecc: float = 7.5
    mag_e2: float = 0.75
    surround_ratio: float = 2.5     # surround SD / centre SD
    surround_gain: float = 0.0      # suppressive surround amplitude (0: none)
    exponent: float = 0.7           # compressive exponent after pooling
    mid_share: float = 0.0          # fraction of the signal variance from the mid-level statistics
    period_gain: float = 1.0        # preferred period relative to V1's at the same eccentricity
    reliability: float = 0.2        # mean single-presentation test-retest r
    mid_preference: tuple[float, ...] | None = None  # relative chance of each mid-level statistic to be mixed


_EDGE = (3, 3, 3, 3, 3, 3, 1, 1, 1, 2, 2, 1, 1, 1, 1, 1, 1)       # structure-leaning areas (LOC)
_FACE = (2, 2, 2, 2, 2, 2, 1, 1, 1, 1, 1, 1, 2, 3, 3, 1, 1)       # curvature, warm hues, blobs (FFA)
_SCENE = (1, 1, 1, 2, 2, 2, 3, 3, 3, 3, 3, 3, 1, 1, 1, 2, 2)      # long edges, coherence, spectral balance (PPA)

STATS_ROIS = {
    "V1": StatsRoiSpec(n_voxels=800, size_scale=0.18, size_power=0.85, surround_gain=0.25, exponent=0.8,
                       reliability=0.30),
    "V2": StatsRoiSpec(n_voxels=650, size_scale=0.25, size_power=0.9, surround_gain=0.2, exponent=0.7,
                       period_gain=1.3, reliability=0.28),
    "V3": StatsRoiSpec(n_voxels=500, size_scale=0.35, size_power=0.95, surround_gain=0.15, exponent=0.6,
                       period_gain=1.6, reliability=0.25),
    "hV4": StatsRoiSpec(n_voxels=350, size_scale=0.55, size_power=0.9, max_ecc=7.0, surround_gain=0.1,
                        exponent=0.5, period_gain=2.0, mid_share=0.5, reliability=0.2),
    "LOC": StatsRoiSpec(n_voxels=350, size_scale=1.0, size_power=0.8, size_offset=1.0, max_ecc=6.0,
                        exponent=0.4, mid_share=0.8, period_gain=2.5, reliability=0.15, mid_preference=_EDGE),
    "FFA": StatsRoiSpec(n_voxels=150, size_scale=1.6, size_power=0.7, size_offset=1.0, max_ecc=4.0, mag_e2=2.0,
                        exponent=0.35, mid_share=1.0, reliability=0.12, mid_preference=_FACE),
    "PPA": StatsRoiSpec(n_voxels=200, size_scale=1.8, size_power=0.7, size_offset=1.0, min_ecc=2.0, max_ecc=8.0,
                        mag_e2=4.0, exponent=0.35, mid_share=1.0, reliability=0.12, mid_preference=_SCENE),
}


class StatsCortexConfig(BaseModel):
    """How a ``dn-stats`` subject is built (all randomness flows from ``seed``)."""
    model_config = ConfigDict(extra="forbid")

    seed: int = Field(0, ge=0)
    grid: int = Field(64, ge=16)           # pixels at which the early model sees the 12-deg field
    rois: dict[str, StatsRoiSpec] = STATS_ROIS
    semisaturation: float = 0.1            # contrast at which divisive normalisation halves the energy
    noise_length_mm: float = 4.0           # spatial scale of correlated noise (exponential kernel)
    noise_shares: dict[str, float] = {"spatial": 0.35, "global": 0.1, "run_offset": 0.1, "drift": 0.05,
                                      "independent": 0.4}   # parts of each voxel's noise variance
    signal_dependent_noise: float = 0.15   # independent noise SD scales with exp(k * signal)
    hidden_units: int = Field(6, ge=1)     # non-linear mixture units per higher-area voxel


@dataclass
class StatsVoxels:
    """Voxel parameters, one row per voxel."""
    roi: np.ndarray          # (n,) area name
    x0: np.ndarray           # (n,) pRF centre, degrees (right positive)
    y0: np.ndarray           # (n,) pRF centre, degrees (up positive)
    sigma: np.ndarray        # (n,) pRF centre SD along its major axis, degrees
    aspect: np.ndarray       # (n,) minor / major axis SD ratio (<= 1)
    theta: np.ndarray        # (n,) major-axis angle, radians
    xyz: np.ndarray          # (n, 3) anatomical position on a folded sheet, mm
    reliability: np.ndarray  # (n,) target single-presentation test-retest r


def place_stats_voxels(config: StatsCortexConfig, rng: np.random.Generator) -> StatsVoxels:
    """Sample pRFs: eccentricity by cortical magnification, power-law sizes, elliptical shapes;
    positions on a retinotopic sheet per area and hemisphere (nearby in the field = nearby in mm)."""
    parts: dict[str, list] = {k: [] for k in StatsVoxels.__dataclass_fields__}
    for i, (name, spec) in enumerate(config.rois.items()):
        n = spec.n_voxels
        lo, hi = (np.log1p(e / spec.mag_e2) for e in (spec.min_ecc, spec.max_ecc))
        ecc = spec.mag_e2 * np.expm1(rng.uniform(lo, hi, n))
        angle = rng.uniform(0, 2 * np.pi, n)
        sigma = spec.size_scale * (ecc + spec.size_offset) ** spec.size_power * np.exp(rng.normal(0, 0.15, n))
        aspect = np.exp(-np.abs(rng.normal(0, 0.3, n)))
        x0, y0 = ecc * np.cos(angle), ecc * np.sin(angle)
        hemi = np.where(x0 < 0, 1.0, -1.0)           # left visual field -> right hemisphere
        polar = np.arctan2(y0, np.abs(x0))            # within the hemifield, -pi/2 .. pi/2
        xyz = np.stack([hemi * (10 + 3 * i) + rng.normal(0, 0.7, n),
                        -100 + 9 * i + 12 * np.log1p(ecc / spec.mag_e2) + rng.normal(0, 0.7, n),
                        12 * polar / (np.pi / 2) + rng.normal(0, 0.7, n)], 1)
        rel = rng.beta(3.0, 3.0 * (1 - spec.reliability) / spec.reliability, n)
        for key, val in (("roi", np.full(n, name)), ("x0", x0), ("y0", y0), ("sigma", sigma), ("aspect", aspect),
                         ("theta", rng.uniform(0, np.pi, n)), ("xyz", xyz.round(1)), ("reliability", rel)):
            parts[key].append(val)
    return StatsVoxels(**{k: np.concatenate(v) for k, v in parts.items()})


def elliptical_prf(vox: StatsVoxels, idx: np.ndarray, size: int, scale: float = 1.0) -> torch.Tensor:
    """(len(idx), size*size) elliptical Gaussian pRFs (SDs times ``scale``) over the field, unit volume."""
    coords = (np.arange(size) + 0.5) / size * FIELD_DEG - FIELD_DEG / 2
    xx, yy = np.meshgrid(coords, -coords)
    dx, dy = xx.ravel()[None] - vox.x0[idx, None], yy.ravel()[None] - vox.y0[idx, None]
    c, s = np.cos(vox.theta[idx, None]), np.sin(vox.theta[idx, None])
    major = (vox.sigma[idx] * scale)[:, None]
    minor = major * vox.aspect[idx, None]
    w = np.exp(-0.5 * (((dx * c + dy * s) / major) ** 2 + ((-dx * s + dy * c) / minor) ** 2))
    w[w < 1e-6] = 0.0
    w /= 2 * np.pi * major * minor * (size / FIELD_DEG) ** 2   # a pRF partly outside the field sees less
    return torch.from_numpy(w.astype(np.float32))


def _gauss_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur (reflect padding) of maps (b, c, H, W)."""
    r = max(1, int(math.ceil(3 * sigma)))
    r = min(r, x.shape[-1] - 1)
    t = torch.arange(-r, r + 1, dtype=x.dtype)
    k = torch.exp(-t ** 2 / (2 * sigma ** 2))
    k = k / k.sum()
    b, c, h, w = x.shape
    y = F.pad(x.reshape(b * c, 1, h, w), (r, r, r, r), mode="reflect")
    y = F.conv2d(F.conv2d(y, k.view(1, 1, 1, -1)), k.view(1, 1, -1, 1))
    return y.reshape(b, c, h, w)


def log_gabor_bank(size: int) -> torch.Tensor:
    """(N_SCALES, N_ORIENT, size, size) one-sided log-Gabor filters in the frequency domain.

    Radial bandwidth about 2 octaves, angular SD 18 degrees; peak gain 2, so that a sinusoid of
    contrast c at a filter's preferred frequency and orientation gives a response of modulus c.
    """
    f = np.fft.fftfreq(size)
    fx, fy = np.meshgrid(f, f)
    radius = np.hypot(fx, fy)
    radius[0, 0] = 1.0
    angle = np.arctan2(fy, fx)
    out = np.zeros((N_SCALES, N_ORIENT, size, size), np.float32)
    for s, f0 in enumerate(SCALE_FREQS):
        radial = np.exp(-np.log(radius / f0) ** 2 / (2 * np.log(0.55) ** 2))
        radial[0, 0] = 0.0
        for o in range(N_ORIENT):
            d = np.angle(np.exp(1j * (angle - o * np.pi / N_ORIENT)))
            out[s, o] = 2 * radial * np.exp(-d ** 2 / (2 * np.deg2rad(18) ** 2))
    return torch.from_numpy(out)


# sRGB (linear) -> LMS cone excitations (Hunt-Pointer-Estevez on D65 XYZ)
RGB_TO_LMS = torch.tensor([[0.3139, 0.6395, 0.0466], [0.1554, 0.7579, 0.0868], [0.0178, 0.1094, 0.8728]])


@dataclass
class ImageMaps:
    """What the two pathways see of a batch of images."""
    early: torch.Tensor   # (b, C_early, grid*grid): normalised orientation energy, DoG luminance, colour opponents
    mid: torch.Tensor     # (b, 17, (grid/2)^2): mid-level statistics (MID_NAMES)


def image_maps(images: torch.Tensor, grid: int, bank: torch.Tensor, semisaturation: float) -> ImageMaps:
    """Early channel maps and mid-level statistic maps of RGB images (b, 3, H, W) in [0, 1]."""
    x = F.interpolate(images.float(), size=(grid, grid), mode="area").clamp(0, 1)
    lin = torch.where(x <= 0.04045, x / 12.92, ((x + 0.055) / 1.055) ** 2.4)          # sRGB -> linear
    lms = torch.einsum("kc,bchw->bkhw", RGB_TO_LMS, lin)
    local = _gauss_blur(lms, grid / 8) + 0.02                                            # adapting mean
    cone = (lms - local) / local                                                          # cone contrasts
    lum = (cone[:, 0] + cone[:, 1]) / 2
    rg = _gauss_blur((cone[:, 0] - cone[:, 1])[:, None], 1.5)[:, 0]
    by = _gauss_blur((cone[:, 2] - (cone[:, 0] + cone[:, 1]) / 2)[:, None], 1.5)[:, 0]
    # orientation energy, divisively normalised within each scale
    pad = grid // 4
    padded = F.pad(lum[:, None], (pad,) * 4, mode="reflect")[:, 0]
    spec = torch.fft.fft2(padded)
    resp = torch.fft.ifft2(spec[:, None, None] * bank[None])[..., pad:pad + grid, pad:pad + grid]
    energy = resp.abs() ** 2                                                              # (b, S, O, g, g)
    b = len(x)
    normed = []
    for s, f0 in enumerate(SCALE_FREQS):
        pool = _gauss_blur(energy[:, s].sum(1, keepdim=True), max(0.5, 0.5 / f0))
        normed.append(energy[:, s] / (semisaturation ** 2 + pool))
    R = torch.stack(normed, 1)                                                            # (b, S, O, g, g)
    dogs = []
    for sc in (1.0, 2.0, 4.0):
        d = _gauss_blur(lum[:, None], sc) - _gauss_blur(lum[:, None], 3 * sc)
        dogs += [d.clamp(min=0), (-d).clamp(min=0)]
    colour = [rg.clamp(min=0), (-rg).clamp(min=0), by.clamp(min=0), (-by).clamp(min=0)]
    early = torch.cat([R.reshape(b, N_SCALES * N_ORIENT, grid, grid), *dogs, *(c[:, None] for c in colour)], 1)
    # mid-level statistics at half resolution
    def half(m: torch.Tensor) -> torch.Tensor:
        return F.avg_pool2d(m, 2)

    Rh = half(R.reshape(b, -1, grid, grid)).reshape(b, N_SCALES, N_ORIENT, grid // 2, grid // 2)
    mids = []
    for s in (1, 2):
        for o in range(3):
            mids.append((Rh[:, s, o] * Rh[:, s, o + 3]).clamp(min=0).sqrt())              # orthogonal pairs
    for s in range(N_SCALES - 1):
        mids.append((Rh[:, s] * Rh[:, s + 1]).clamp(min=0).sqrt().sum(1))
    for s in (1, 2):
        mids.append(Rh[:, s].amax(1) - Rh[:, s].mean(1))
    coarse, fine = Rh[:, 2:].sum((1, 2)), Rh[:, :2].sum((1, 2))
    mids.append(coarse / (coarse + fine + 1e-3))
    rgh, byh, lumh = half(rg[:, None])[:, 0], half(by[:, None])[:, 0], half(lum[:, None])
    mids.append((rgh ** 2 + byh ** 2).sqrt())
    mids.append((rgh.clamp(min=0) * (-byh).clamp(min=0)).sqrt())
    mids.append((_gauss_blur(lumh, 2.0) - _gauss_blur(lumh, 6.0)).abs()[:, 0])
    mids.append(_gauss_blur(lumh ** 2, 2.0)[:, 0])
    mids.append(half(local[:, :2].mean(1, keepdim=True))[:, 0])
    mid = torch.stack(mids, 1)
    return ImageMaps(early.flatten(2), mid.flatten(2))


def _pool(maps: torch.Tensor, prf: torch.Tensor) -> torch.Tensor:
    """Channel maps (b, c, P) pooled by pRFs (V, P) -> (b, c, V)."""
    b, c, p = maps.shape
    return (maps.reshape(b * c, p) @ prf.T).reshape(b, c, -1)


class StatsCortex:
    """Noise-free voxel signals (``signal``, ``roi_response``) and noisy measurements (``measure``)."""

    def __init__(self, config: StatsCortexConfig, network=None):   # ``network`` unused: this model sees no DNN
        self.config = config
        self.rng = np.random.default_rng([config.seed, 2])
        self.voxels = place_stats_voxels(config, self.rng)
        self.bank = log_gabor_bank(config.grid + 2 * (config.grid // 4))
        self._stats: dict[str, tuple] = {}
        self._build()

    @property
    def n_voxels(self) -> int:
        return len(self.voxels.roi)

    def roi_index(self, roi: str) -> np.ndarray:
        """Voxel indices (into every voxel) of area ``roi``."""
        return np.flatnonzero(self.voxels.roi == roi)

    def _build(self) -> None:
        rng, vox, cfg = self.rng, self.voxels, self.config
        g = cfg.grid
        self.parts = {}
        for name, spec in cfg.rois.items():
            idx = self.roi_index(name)
            n = len(idx)
            ecc = np.hypot(vox.x0[idx], vox.y0[idx])
            # preferred period grows with eccentricity (V1: 0.12 E + 0.35 deg), later areas coarser
            period = spec.period_gain * (0.12 * ecc + 0.35) * np.exp(rng.normal(0, 0.2, n))
            scale_periods = FIELD_DEG / g / np.array(SCALE_FREQS)
            sf = np.exp(-(np.log2(scale_periods[None]) - np.log2(period[:, None])) ** 2 / 2)    # 1-octave SD
            pref = rng.uniform(0, np.pi, n)
            orient = np.exp(0.3 * np.cos(2 * (np.arange(N_ORIENT)[None] * np.pi / N_ORIENT - pref[:, None])))
            energy_w = (sf[:, :, None] * orient[:, None, :]).reshape(n, -1)
            dog_w = np.exp(rng.normal(0, 0.5, (n, 6))) * 0.5
            colour_w = np.exp(rng.normal(0, 0.5, (n, 4))) * 0.3
            w = np.concatenate([energy_w / energy_w.sum(1, keepdims=True), dog_w, colour_w], 1)
            part = {"idx": idx, "w": torch.from_numpy(w.astype(np.float32)).T.contiguous(),
                    "centre": elliptical_prf(vox, idx, g),
                    "surround": elliptical_prf(vox, idx, g, spec.surround_ratio) if spec.surround_gain else None}
            if spec.mid_share > 0:
                pref_mid = np.asarray(spec.mid_preference or (1,) * len(MID_NAMES), float)
                p = pref_mid / pref_mid.sum()
                h = cfg.hidden_units
                W1 = np.zeros((n, h, len(MID_NAMES)))
                for v in range(n):
                    for k in range(h):
                        ch = rng.choice(len(MID_NAMES), 3, replace=False, p=p)
                        W1[v, k, ch] = rng.normal(0, 1, 3)
                part.update(mid_prf=elliptical_prf(vox, idx, g // 2), W1=torch.from_numpy(W1.astype(np.float32)),
                            b1=torch.from_numpy(rng.normal(0, 0.5, (n, h)).astype(np.float32)),
                            a=torch.from_numpy(np.exp(rng.normal(0, 0.5, (n, h))).astype(np.float32)))
            self.parts[name] = part

    def _raw(self, maps: ImageMaps, roi: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Unscaled (early drive (b, V_roi), log mid-level statistics (b, 17, V_roi) or None) of one area."""
        spec, part = self.config.rois[roi], self.parts[roi]
        drive = (_pool(maps.early, part["centre"]) * part["w"]).sum(1)
        if part["surround"] is not None:
            drive = drive - spec.surround_gain * (_pool(maps.early, part["surround"]) * part["w"]).sum(1)
        early = drive.clamp(min=1e-6) ** spec.exponent
        mid = None
        if "mid_prf" in part:
            mid = torch.log(1e-3 + _pool(maps.mid, part["mid_prf"]).clamp(min=0))
        return early, mid

    def _mixture(self, roi: str, z: torch.Tensor) -> torch.Tensor:
        """Non-linear mixture (b, V_roi) of standardised log statistics z (b, 17, V_roi)."""
        part = self.parts[roi]
        hidden = F.softplus(torch.einsum("vhc,bcv->bvh", part["W1"], z) + part["b1"])
        return (hidden * part["a"]).sum(-1)

    @torch.inference_mode()
    def _roi_batches(self, images: torch.Tensor, rois: list[str], batch: int = 50):
        for s in range(0, len(images), batch):
            maps = image_maps(images[s:s + batch], self.config.grid, self.bank, self.config.semisaturation)
            yield {roi: self._raw(maps, roi) for roi in rois}

    @torch.inference_mode()
    def _respond(self, images: torch.Tensor, rois: list[str], reference: bool) -> dict[str, np.ndarray]:
        raw = {roi: ([], []) for roi in rois}
        for out in self._roi_batches(images, rois):
            for roi, (early, mid) in out.items():
                raw[roi][0].append(early)
                raw[roi][1].append(mid)
        result = {}
        for roi in rois:
            share = self.config.rois[roi].mid_share
            early = torch.cat(raw[roi][0])
            mid = torch.cat(raw[roi][1]) if raw[roi][1][0] is not None else None
            if reference:
                sd = early.std(0)   # a pRF beyond the stimulus sees nothing: signal 0 (not rounding noise)
                stats = {"early": (early.mean(0), torch.where(sd > 1e-4 * early.mean(0).abs(), sd, torch.inf))}
                if mid is not None:
                    stats["z"] = (mid.mean(0), mid.std(0) + 1e-6)
                self._stats[roi] = stats
            elif roi not in self._stats:
                raise RuntimeError("call signal(reference_images, reference=True) first")
            st = self._stats[roi]
            total = (1 - share) ** 0.5 * (early - st["early"][0]) / st["early"][1]
            if mid is not None:
                mixed = self._mixture(roi, (mid - st["z"][0]) / st["z"][1])
                if reference:
                    st["mix"] = (mixed.mean(0), mixed.std(0) + 1e-8)
                total = total + share ** 0.5 * (mixed - st["mix"][0]) / st["mix"][1]
            if reference:       # the two pathways correlate: unit variance again, so that noise sets reliability
                st["total"] = torch.where(total.std(0) > 1e-3, total.std(0), torch.ones(()))
            result[roi] = (total / st["total"]).double().numpy()
        return result

    def roi_response(self, images: torch.Tensor, roi: str) -> np.ndarray:
        """Noise-free response (n_images, n_voxels of ``roi``) of one area to images (n, 3, H, W) in
        [0, 1], in the units of :meth:`signal` (needs the reference set first)."""
        if roi not in self.config.rois:
            raise KeyError(f"no area {roi!r}: the areas are {', '.join(self.config.rois)}")
        return self._respond(images, [roi], reference=False)[roi]

    def signal(self, images: torch.Tensor, reference: bool = False) -> np.ndarray:
        """Noise-free signals (n_images, n_voxels) float64, every area.

        With ``reference=True`` these images (the training set) define each voxel's standardisation
        (zero mean, unit variance on them); other sets use the same statistics.
        """
        out = np.empty((len(images), self.n_voxels))
        for roi, resp in self._respond(images, list(self.config.rois), reference).items():
            out[:, self.roi_index(roi)] = resp
        return out

    def _noise_parts(self):
        if not hasattr(self, "_chol"):
            vox, rng = self.voxels, self.rng
            d = scipy.spatial.distance.cdist(vox.xyz, vox.xyz)
            C = np.exp(-d / self.config.noise_length_mm) + 1e-6 * np.eye(len(d))
            self._chol = np.linalg.cholesky(C)
            self._global = np.clip(rng.normal(1.0, 0.3, self.n_voxels), 0, None)
            self._baseline = rng.uniform(400, 1200, self.n_voxels)
            self._gain = self._baseline * 0.01 * np.exp(rng.normal(0, 0.3, self.n_voxels))  # ~1% signal change
        return self._chol, self._global, self._baseline, self._gain

    def measure(self, signal: np.ndarray, rng: np.random.Generator, runs: np.ndarray | None = None,
                blocks: np.ndarray | None = None) -> np.ndarray:
        """One noisy presentation per row of ``signal`` (n, V), in scanner units.

        Noise variance (1 - r) / r per voxel (r its ``reliability``), split into spatially correlated,
        global, run offset, within-run linear drift and independent parts (``noise_shares``); the
        independent part grows with the signal. ``runs``/``blocks``: run number and position within
        its run of each row (one run if omitted).
        """
        n, v = signal.shape
        cfg = self.config
        runs = np.ones(n, int) if runs is None else np.asarray(runs)
        blocks = np.arange(n) if blocks is None else np.asarray(blocks)
        chol, glob, baseline, gain = self._noise_parts()
        sh = cfg.noise_shares
        total = sum(sh.values())
        k = cfg.signal_dependent_noise
        spatial = rng.normal(0, 1, (n, v)) @ chol.T
        global_ = rng.normal(0, 1, (n, 1)) * glob[None] / np.sqrt((glob ** 2).mean())
        own = rng.normal(0, 1, (n, v)) * np.exp(k * signal - k ** 2 / 2) / np.sqrt(np.exp(k ** 2))
        offset, drift = np.zeros((n, v)), np.zeros((n, v))
        for r in np.unique(runs):
            rows = np.flatnonzero(runs == r)
            pos = blocks[rows].astype(float)
            pos = (pos - pos.mean()) / (pos.std() + 1e-12) if len(rows) > 1 else pos * 0
            offset[rows] = rng.normal(0, 1, v)
            drift[rows] = pos[:, None] * rng.normal(0, 1, v)[None]
        noise = sum(np.sqrt(sh[name] / total) * part for name, part in
                    (("spatial", spatial), ("global", global_), ("run_offset", offset), ("drift", drift),
                     ("independent", own)))
        noise_sd = np.sqrt((1 - self.voxels.reliability) / self.voxels.reliability)
        return baseline + gain * (signal + noise * noise_sd)

