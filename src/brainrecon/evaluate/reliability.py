"""Test-retest reliability of voxels: how noisy is a single presentation?"""
from __future__ import annotations

import numpy as np


def retest_reliability(X: np.ndarray, labels: list[str]) -> np.ndarray:
    """Per-voxel Pearson r (n_voxels,) across images between the first and second presentation of
    each image; X (n_samples, n_voxels). Images shown once are ignored; NaN if fewer than 3 images
    were shown twice."""
    first, second, seen = {}, {}, {}
    for i, lab in enumerate(labels):
        k = seen.get(lab, 0)
        if k == 0:
            first[lab] = i
        elif k == 1:
            second[lab] = i
        seen[lab] = k + 1
    both = [lab for lab in first if lab in second]
    if len(both) < 3:
        return np.full(X.shape[1], np.nan)
    a = X[[first[lab] for lab in both]].astype(np.float64)
    b = X[[second[lab] for lab in both]].astype(np.float64)
    a -= a.mean(0)
    b -= b.mean(0)
    denom = np.sqrt((a ** 2).sum(0) * (b ** 2).sum(0))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denom > 0, (a * b).sum(0) / denom, np.nan)
