"""How much each reconstruction resembles its own stimulus (not identification among candidates).

The two low-level measures of the NSD-era reconstruction papers: PixCorr, the Pearson correlation of
the pixels, and SSIM on greyscale images with Gaussian weights (sigma 1.5), as computed there with
scikit-image. Images (n, 3, H, W) in [0, 1], reconstruction and stimulus at the same size.
"""
from __future__ import annotations

import numpy as np
from skimage.color import rgb2gray
from skimage.metrics import structural_similarity

from .identification import _standardise_rows


def _check(pred: np.ndarray, target: np.ndarray) -> None:
    if np.shape(pred) != np.shape(target) or np.ndim(pred) != 4:
        raise ValueError(f"reconstructions {np.shape(pred)} and stimuli {np.shape(target)} must both be (n, 3, H, W)")


def pixel_correlation(pred: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Pearson r (n,) of each reconstruction's pixels (all channels) with its own stimulus's."""
    _check(pred, target)
    return (_standardise_rows(pred) * _standardise_rows(target)).sum(1)


def ssim(pred: np.ndarray, target: np.ndarray) -> np.ndarray:
    """SSIM (n,) of each reconstruction with its stimulus: greyscale (scikit-image's luma), Gaussian
    window of sigma 1.5, population covariances, data range 1."""
    _check(pred, target)
    grey = [rgb2gray(np.asarray(a, np.float64).transpose(0, 2, 3, 1)) for a in (pred, target)]
    return np.array([structural_similarity(p, t, gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
                                           data_range=1.0) for p, t in zip(*grey)])
