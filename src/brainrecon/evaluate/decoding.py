"""Decoding accuracy of DNN features: profile and pattern correlation, feature identification."""
from __future__ import annotations

import numpy as np

from .identification import pairwise_identification, pattern_correlation, profile_correlation


def decoding_accuracy(decoded: np.ndarray, true: np.ndarray, train_mean: np.ndarray,
                      train_sd: np.ndarray) -> dict[str, float]:
    """Scores for one layer; decoded and true (n_images, units), training statistics (units,)."""
    d = decoded.reshape(len(decoded), -1)
    t = true.reshape(len(true), -1)
    prof = profile_correlation(d, t)
    sd = np.where(train_sd > 0, train_sd, 1.0)
    return {
        "profile_correlation": float(np.nanmean(prof)) if np.isfinite(prof).any() else float("nan"),
        "pattern_correlation": float(np.mean(pattern_correlation(d, t, train_mean, sd))),
        "feature_identification": float(np.mean(pairwise_identification((d - train_mean) / sd, (t - train_mean) / sd))),
    }
