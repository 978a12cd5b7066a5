"""Banded (multiple-kernel) ridge: one linear kernel per ROI, weighted, penalty and weights by CV.

The voxels of the analysed ROI are split into bands (the file's ROIs that contain no other ROI:
V1, V2, V3, hV4, LOC, FFA, PPA...; voxels in none of them form a band of their own). With the
voxels z-scored as the kernel decoder does, band b's kernel is ``K_b = X_b X_b'`` and the decoder's
kernel is ``K(w) = B sum_b w_b K_b`` for weights ``w`` on the simplex (``B`` bands: the uniform
weights give the kernel decoder's own kernel, so the search contains it). Each candidate ``w`` is a
kernel ridge decoder of its own (:meth:`KernelRidgeDecoder.reweighted`), and its penalties are
scored by the same exact leave-one-image-out cross-validation as the kernel decoder's, all
penalties from one eigendecomposition. The candidates are the uniform weights, the corners (one ROI
alone) and Dirichlet samples (a random search over the simplex, seeded).

The band kernels (and, for a fit on each image's mean presentation, the kernels between the
presentations' deviations and the means) are computed once; a candidate costs one eigendecomposition
of an (n_images, n_images) matrix and the cross-validation of the layers' unit samples.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .ridge import KernelRidgeDecoder


@dataclass
class Band:
    """One band of voxels: its name (an ROI, or ``other``) and its columns in the analysed ROI."""
    name: str
    columns: np.ndarray


def bands_of(roi_columns: dict[str, np.ndarray], n_voxels: int) -> list[Band]:
    """The bands of ``n_voxels`` voxels from ROI memberships {name: column indices in the analysed ROI}.

    ROIs that contain another ROI's voxels (unions such as VC, LVC, HVC) and ROIs with no voxel in the
    analysed ROI are left out; a voxel in two remaining ROIs goes to the first; voxels in none form
    the band ``other``.
    """
    sets = {k: np.unique(np.asarray(v, np.int64)) for k, v in roi_columns.items() if len(v)}
    sets = {k: v for k, v in sets.items() if len(v) < n_voxels}
    atomic = [k for k, v in sets.items()
              if not any(j != k and len(u) < len(v) and np.isin(u, v).all() for j, u in sets.items())]
    owner = np.full(n_voxels, -1)
    for i, k in enumerate(atomic):
        cols = sets[k]
        owner[cols[owner[cols] < 0]] = i
    bands = [Band(k.removeprefix("ROI_"), np.flatnonzero(owner == i)) for i, k in enumerate(atomic)]
    bands = [b for b in bands if len(b.columns)]
    if (owner < 0).any():
        bands.append(Band("other", np.flatnonzero(owner < 0)))
    return bands


def candidate_weights(n_bands: int, n_random: int, seed: int = 0,
                      concentrations: tuple[float, ...] = (0.1, 1.0)) -> np.ndarray:
    """Kernel weights to try (n_candidates, n_bands), rows on the simplex: the uniform weights, the
    corners, then ``n_random`` Dirichlet samples cycling through ``concentrations`` (seeded)."""
    rng = np.random.default_rng(seed)
    rows = [np.full(n_bands, 1.0 / n_bands)]
    if n_bands > 1:
        rows += list(np.eye(n_bands))
        rows += [rng.dirichlet(np.full(n_bands, concentrations[i % len(concentrations)]))
                 for i in range(n_random)]
    return np.array(rows)


class BandedKernelRidge:
    """Kernel ridge over voxel bands, one decoder per candidate weighting (see the module docstring).

    Parameters
    ----------
    alphas : (n_alphas,) array
        Ridge penalties searched for every candidate.
    bands : list of Band
        A partition of the voxel columns.
    weights : (n_candidates, n_bands) array
        Candidate kernel weights, rows on the simplex (:func:`candidate_weights`).
    """

    def __init__(self, alphas: np.ndarray, bands: list[Band], weights: np.ndarray):
        self.alphas = np.asarray(alphas, np.float64)
        self.bands = list(bands)
        self.weights = np.atleast_2d(np.asarray(weights, np.float64))
        if self.weights.shape[1] != len(self.bands):
            raise ValueError(f"{self.weights.shape[1]} kernel weights per candidate for {len(self.bands)} bands")

    def fit(self, X: np.ndarray, image_index: np.ndarray, average_trials: bool = False) -> "BandedKernelRidge":
        """Band kernels of X (n_samples, n_voxels); ``image_index`` and ``average_trials`` as
        :meth:`KernelRidgeDecoder.fit`."""
        self.base_ = base = KernelRidgeDecoder(self.alphas).fit(X, image_index, average_trials)
        Xz = base.Xz_
        self.kernels_ = None     # single presentations with fewer voxels than samples: eigen from the voxel Gram
        if base.averaged_ or Xz.shape[1] >= Xz.shape[0]:
            self.kernels_ = np.stack([Xz[:, b.columns] @ Xz[:, b.columns].T for b in self.bands])
        self.dev_kernels_ = None
        if base.averaged_:
            X = np.asarray(X)
            trial_index = base.trial_index_
            self.dev_kernels_ = np.empty((len(self.bands), len(X), base.n_images_), np.float32)
            for s in range(0, len(X), 1024):
                dev = base.deviations(X[s:s + 1024], trial_index[s:s + 1024])
                for i, b in enumerate(self.bands):
                    self.dev_kernels_[i, s:s + 1024] = dev[:, b.columns] @ Xz[:, b.columns].T
        self._decoders: dict[int, KernelRidgeDecoder] = {}
        return self

    def column_weights(self, c: int) -> np.ndarray:
        """Per-voxel kernel weight (n_voxels,) of candidate ``c``: B w_b for the voxels of band b."""
        out = np.zeros(self.base_.Xz_.shape[1])
        for w, b in zip(self.weights[c], self.bands):
            out[b.columns] = len(self.bands) * w
        return out

    def decoder(self, c: int, keep: bool = False) -> KernelRidgeDecoder:
        """The kernel ridge decoder of candidate ``c`` (kept for later calls if ``keep``)."""
        if c in self._decoders:
            return self._decoders[c]
        scale = len(self.bands) * self.weights[c]
        K = None if self.kernels_ is None else np.tensordot(scale, self.kernels_, 1)
        dev = None if self.dev_kernels_ is None else np.tensordot(scale, self.dev_kernels_, 1).astype(np.float64)
        dec = self.base_.reweighted(self.column_weights(c), K, dev)
        if keep:
            self._decoders[c] = dec
        return dec

    def release(self, keep: set[int]) -> None:
        """Forget the kept decoders not in ``keep``."""
        self._decoders = {c: d for c, d in self._decoders.items() if c in keep}

    def search(self, samples: dict[str, np.ndarray], n_averages: list) -> dict[str, np.ndarray]:
        """Leave-one-image-out R^2 of every candidate: {key: (n_candidates, len(n_averages), n_alphas)}
        for unit samples {key: (n_images, k)} (:meth:`KernelRidgeDecoder.cv_scores_averaged`)."""
        out = {k: np.empty((len(self.weights), len(n_averages), len(self.alphas))) for k in samples}
        for c in range(len(self.weights)):
            dec = self.decoder(c)
            for k, Y in samples.items():
                out[k][c] = dec.cv_scores_averaged(Y, n_averages)
        return out
