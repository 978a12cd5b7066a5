"""Decoding accuracy of DNN features: profile and pattern correlation, feature identification."""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from .identification import pairwise_identification, pattern_correlation, profile_correlation


@dataclass(frozen=True)
class DecodingScores:
    """How well one layer's features were decoded.

    Attributes
    ----------
    profile_correlation : float
        Mean over units of the correlation, across images, of decoded and true values (NaN if no
        unit varies).
    pattern_correlation : float
        Mean over images of the correlation, across units, of decoded and true features (both
        centred on the training mean).
    feature_identification : float
        Pairwise identification accuracy of the true features from the decoded ones (z-scored by
        the training statistics; chance 0.5).
    """
    profile_correlation: float
    pattern_correlation: float
    feature_identification: float

    def to_json(self) -> dict[str, float]:
        """{"profile_correlation": ..., "pattern_correlation": ..., "feature_identification": ...}."""
        return asdict(self)


def decoding_accuracy(decoded: np.ndarray, true: np.ndarray, train_mean: np.ndarray,
                      train_sd: np.ndarray) -> DecodingScores:
    """Scores of one layer.

    Parameters
    ----------
    decoded, true : (n_images, units) arrays (other trailing shapes are flattened)
    train_mean, train_sd : (units,) the training images' feature mean and SD

    Returns
    -------
    DecodingScores
    """
    d = decoded.reshape(len(decoded), -1)
    t = true.reshape(len(true), -1)
    prof = profile_correlation(d, t)
    sd = np.where(train_sd > 0, train_sd, 1.0)
    return DecodingScores(
        profile_correlation=float(np.nanmean(prof)) if np.isfinite(prof).any() else float("nan"),
        pattern_correlation=float(np.mean(pattern_correlation(d, t, train_mean, sd))),
        feature_identification=float(np.mean(pairwise_identification((d - train_mean) / sd, (t - train_mean) / sd))),
    )
