"""Identification from a score matrix, n-way identification, bootstrap intervals and permutation p-values.

Every identification metric here starts from a score matrix ``S`` (n, n): ``S[i, j]`` is how much
reconstruction ``i`` resembles candidate ``j`` (a correlation, or minus a distance); candidate ``i``
is reconstruction ``i``'s own stimulus. Reconstruction ``i`` beats candidate ``j`` when
``S[i, i] > S[i, j]``; a tie (equal up to 1e-12) counts one half.

- Pairwise identification of ``i``: the fraction of the n - 1 other candidates it beats (chance 0.5).
- n-way identification of ``i``: whether it beats all of n - 1 other candidates drawn at random
  (without replacement), averaged over seeded draws (chance 1/n). Its expectation is
  ``comb(m, n-1) / comb(N-1, n-1)`` with ``m`` the candidates ``i`` beats among the ``N - 1`` others
  (:func:`n_way_expected`); for n = 2 that is the pairwise identification.
- Bootstrap interval of an identification accuracy: images are resampled with replacement and the
  accuracy is recomputed among the resampled set (each drawn reconstruction against the drawn
  candidates that are other images; duplicates of itself are not candidates).
- Permutation p-value: the stimuli's labels are shuffled within the test set (reconstruction ``i``'s
  "own" candidate becomes ``pi(i)``) and the accuracy recomputed; p = (1 + #{permuted >= observed}) /
  (1 + n_permutations).
"""
from __future__ import annotations

import numpy as np
from scipy.special import comb

TIE = 1e-12


def win_matrix(scores: np.ndarray) -> np.ndarray:
    """W (n, n): 1 where reconstruction i beats candidate j (S[i, i] > S[i, j]), 0.5 for a tie, 0 on the diagonal."""
    s = np.asarray(scores, np.float64)
    if s.ndim != 2 or s.shape[0] != s.shape[1] or len(s) < 2:
        raise ValueError(f"a score matrix is (n, n) with n >= 2, not {s.shape}")
    diff = np.diag(s)[:, None] - s
    tie = np.abs(diff) <= TIE
    w = np.where(tie, 0.5, (diff > 0).astype(np.float64))
    np.fill_diagonal(w, 0.0)
    return w


def pairwise_from_scores(scores: np.ndarray) -> np.ndarray:
    """Per-image pairwise identification (n,) from a score matrix (n, n)."""
    w = win_matrix(scores)
    return w.sum(1) / (len(w) - 1)


def rank_matrix(scores: np.ndarray) -> np.ndarray:
    """R (n, n): R[i, j] = the pairwise identification reconstruction i would have if candidate j were
    its stimulus (the fraction of the other candidates k != j with S[i, k] < S[i, j], ties one half)."""
    s = np.asarray(scores, np.float64)
    n = len(s)
    srt = np.sort(s, axis=1)
    less = np.stack([np.searchsorted(srt[i], s[i] - TIE, "left") for i in range(n)])
    leq = np.stack([np.searchsorted(srt[i], s[i] + TIE, "right") for i in range(n)])
    return (less + 0.5 * (leq - less - 1)) / (n - 1)


def n_way_expected(wins: np.ndarray, n_candidates: int, n_way: int) -> np.ndarray:
    """Expected n-way identification per image: comb(m, n_way - 1) / comb(n_candidates - 1, n_way - 1),
    with ``wins`` (n,) the number of other candidates each image beats (m, ties counting one half)."""
    k = n_way - 1
    return comb(np.asarray(wins, np.float64), k) / comb(n_candidates - 1, k)


def n_way_identification(scores: np.ndarray, n_way: int, draws: int = 1000, seed: int = 0) -> np.ndarray:
    """Per-image n-way identification (n,): the fraction of ``draws`` random sets of ``n_way - 1`` other
    candidates whose every member the reconstruction beats (a tie shares the win: 1 / (1 + ties)).

    ``n_way`` equal to the number of candidates uses every other candidate once (no draws).
    """
    s = np.asarray(scores, np.float64)
    n = len(s)
    if not 2 <= n_way <= n:
        raise ValueError(f"{n_way}-way identification needs 2 to {n} candidates")
    diff = np.diag(s)[:, None] - s                   # > 0: beats; |.| <= TIE: tie
    if n_way == n:
        draws = 1
    rng = np.random.default_rng(seed)
    out = np.zeros(n)
    chunk = max(1, 4_000_000 // (n * n))
    for start in range(0, draws, chunk):
        m = min(chunk, draws - start)
        keys = rng.random((m, n, n))
        keys[:, np.arange(n), np.arange(n)] = np.inf     # never the own stimulus
        chosen = np.argpartition(keys, n_way - 2, axis=2)[:, :, :n_way - 1]     # (m, n, n_way - 1)
        d = np.take_along_axis(np.broadcast_to(diff, (m, n, n)), chosen, axis=2)
        lost = (d < -TIE).any(2)
        ties = (np.abs(d) <= TIE).sum(2)
        out += np.where(lost, 0.0, 1.0 / (1 + ties)).sum(0)
    return out / draws


def _quantiles(samples: np.ndarray, level: float) -> tuple[float, float]:
    a = (1 - level) / 2
    lo, hi = np.quantile(samples, [a, 1 - a])
    return float(lo), float(hi)


def bootstrap_mean(values: np.ndarray, n_boot: int = 2000, seed: int = 0, level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval (low, high) of the mean of ``values`` (n,), resampling items."""
    v = np.asarray(values, np.float64)
    v = v[np.isfinite(v)]
    if len(v) == 0:
        return float("nan"), float("nan")
    idx = np.random.default_rng(seed).integers(0, len(v), (n_boot, len(v)))
    return _quantiles(v[idx].mean(1), level)


def bootstrap_identification(scores: np.ndarray, n_boot: int = 2000, seed: int = 0,
                             level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean pairwise identification, recomputed among each resample
    of images (a drawn image is scored against the drawn candidates that are other images)."""
    w = win_matrix(scores)
    n = len(w)
    idx = np.random.default_rng(seed).integers(0, n, (n_boot, n))
    c = np.zeros((n_boot, n))
    np.add.at(c, (np.arange(n_boot)[:, None], idx), 1.0)    # how often each image is drawn
    others = n - c                                           # drawn candidates that are not the image itself
    ok = (c > 0) & (others > 0)
    acc = np.where(ok, (c @ w.T) / np.where(ok, others, 1.0), 0.0)
    weight = np.where(ok, c, 0.0)
    with np.errstate(invalid="ignore", divide="ignore"):
        stats = (weight * acc).sum(1) / weight.sum(1)        # nan where every draw is one image
    return _quantiles(stats[np.isfinite(stats)], level)


def permutation_p(scores: np.ndarray, n_way: int = 2, n_perm: int = 1000, seed: int = 0) -> float:
    """Permutation p-value of the mean identification (pairwise, or the expected ``n_way``-way) of a
    score matrix, the stimuli's labels shuffled within the set: (1 + #{permuted >= observed}) / (1 + n_perm)."""
    r = rank_matrix(scores)
    n = len(r)

    def stat(cols: np.ndarray) -> np.ndarray:          # (p, n) own-candidate columns -> (p,) accuracies
        acc = r[np.arange(n), cols]
        return acc.mean(1) if n_way == 2 else n_way_expected(acc * (n - 1), n, n_way).mean(1)

    observed = stat(np.arange(n)[None])[0]
    perms = np.random.default_rng(seed).permuted(np.tile(np.arange(n), (n_perm, 1)), axis=1)
    hits = int((stat(perms) >= observed - TIE).sum())
    return (1 + hits) / (1 + n_perm)
