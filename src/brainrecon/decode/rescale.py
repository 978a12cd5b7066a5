"""Rescaling of decoded features before reconstruction.

Ridge predictions shrink towards the training mean. Each decoded image's features are therefore
centred on the training mean, scaled so that their mean channel-wise SD equals the mean
channel-wise SD of true features, and the mean is added back.
"""
from __future__ import annotations

import numpy as np


def channel_sd(features: np.ndarray) -> np.ndarray:
    """Mean over channels of the per-image channel SD: (n,) for features (n, C, h, w) or (n, units)."""
    f = features.reshape(len(features), features.shape[1], -1) if features.ndim > 2 else features[:, None, :]
    return f.std(axis=2, ddof=1 if f.shape[2] > 1 else 0).mean(1)


def rescale_decoded(decoded: np.ndarray, train_mean: np.ndarray, true_sd: float) -> np.ndarray:
    """decoded (n, ...) -> rescaled (n, ...); ``train_mean`` (...) of training features, ``true_sd``
    the mean channel-wise SD of true (training) features (``channel_sd(train).mean()``)."""
    centred = decoded - train_mean
    sd = channel_sd(centred)
    scale = true_sd / np.where(sd > 0, sd, 1.0)
    return (train_mean + centred * scale.reshape(-1, *([1] * (decoded.ndim - 1)))).astype(np.float32)
