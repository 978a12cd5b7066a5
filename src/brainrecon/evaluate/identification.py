"""Pairwise identification and correlation metrics.

Pairwise identification: for each prediction i, the fraction of other candidates j != i whose
correlation with the prediction is lower than that of its own target (ties count one half).
Chance is 0.5.
"""
from __future__ import annotations

import numpy as np


def _standardise_rows(a: np.ndarray) -> np.ndarray:
    a = np.asarray(a, dtype=np.float64).reshape(len(a), -1)
    a = a - a.mean(1, keepdims=True)
    norm = np.linalg.norm(a, axis=1, keepdims=True)
    return a / np.where(norm > 0, norm, 1.0)


def correlation_matrix(pred: np.ndarray, target: np.ndarray) -> np.ndarray:
    """C[i, j] = Pearson r between pred[i] and target[j] (each flattened): (n, n)."""
    return _standardise_rows(pred) @ _standardise_rows(target).T


def pairwise_identification(pred: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Per-item identification accuracy (n,) by correlation; pred and target (n, ...)."""
    c = correlation_matrix(pred, target)
    n = len(c)
    if n < 2:
        raise ValueError("pairwise identification needs at least two items")
    diff = np.diag(c)[:, None] - c
    tie = np.abs(diff) <= 1e-12  # equal up to rounding
    wins = ((diff > 0) & ~tie).astype(float) + 0.5 * tie
    np.fill_diagonal(wins, 0.0)
    return wins.sum(1) / (n - 1)


def profile_correlation(pred: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Per-unit Pearson r across items (units,); pred and target (n_items, units)."""
    p = np.asarray(pred, dtype=np.float64)
    t = np.asarray(target, dtype=np.float64)
    p = p - p.mean(0)
    t = t - t.mean(0)
    denom = np.sqrt((p ** 2).sum(0) * (t ** 2).sum(0))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denom > 0, (p * t).sum(0) / denom, np.nan)


def pattern_correlation(pred: np.ndarray, target: np.ndarray, mean: np.ndarray, sd: np.ndarray) -> np.ndarray:
    """Per-item Pearson r across units (n_items,) after z-scoring units with training ``mean``/``sd``."""
    p = (np.asarray(pred, dtype=np.float64) - mean) / sd
    t = (np.asarray(target, dtype=np.float64) - mean) / sd
    return np.diag(correlation_matrix(p, t))
