"""Voxel selection once per channel: the paper's decoder at the cost of one solve per channel.

The voxel-selection decoder (:mod:`.selection`) picks the ``n_feat`` voxels of largest |r| for every
unit and solves one ridge regression per unit. Here the units of a conv channel (all positions of
one feature map; for a layer without channels, each run of ``group`` consecutive units) share their
voxels: the ``n_feat`` voxels with the largest mean r^2 over the channel's units, and then one
Cholesky factorisation of ``A_I' A_I + alpha I`` (``A = [X 1]``, the bias penalised as in the lab's
FastL2LiR) solves every unit of the channel.

Inputs are z-scored with training statistics as in :func:`.streaming.select_decode_chunk`; the
correlations and right-hand sides over the training presentations are computed from per-image sums
of the voxels (a unit's value is its image's), so their cost does not grow with the presentations.
"""
from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import scipy.linalg

from .streaming import Progress, _run_tasks, _task_result, task_path


def channel_groups(shape: tuple[int, ...], fc_group: int) -> int:
    """Units per channel of a layer of unit shape ``shape``: the positions of a conv channel (C, h, w),
    or ``fc_group`` consecutive units of a layer without channels."""
    return int(np.prod(shape[1:])) if len(shape) > 1 else int(fc_group)


def channel_fit_predict(Xz: np.ndarray, image_index: np.ndarray, Xz_test: np.ndarray, Yz_images: np.ndarray,
                        group: int, alpha: float, n_feat: int) -> np.ndarray:
    """Predictions (m, k) of z-scored targets for test inputs, voxels selected once per channel.

    Parameters
    ----------
    Xz : (n_samples, v) array
        Training presentations, z-scored.
    image_index : (n_samples,) int array
        The image of each presentation (row of ``Yz_images``).
    Xz_test : (m, v) array
        Test inputs, z-scored with the training statistics.
    Yz_images : (n_images, k) array
        Targets per image, z-scored over the presentations; ``k`` a multiple of ``group`` (or the
        last channel shorter).
    group : int
        Units per channel (consecutive columns).
    alpha : float
        Ridge penalty (on the bias too).
    n_feat : int
        Voxels per channel (all if >= v).
    """
    n, v = Xz.shape
    n_images = Yz_images.shape[0]
    S = np.zeros((n_images, v))
    np.add.at(S, image_index, Xz)                                    # per-image sums: X' Y_expanded = S' Y
    counts = np.bincount(image_index, minlength=n_images).astype(np.float64)
    X32 = np.asarray(Xz, np.float32)
    G = (X32.T @ X32).astype(np.float64)                             # (v, v), the costly product in float32
    col_sum = S.sum(0)
    N = min(n_feat, v)
    out = np.empty((len(Xz_test), Yz_images.shape[1]), np.float32)
    Xt = np.asarray(Xz_test, np.float64)
    for s in range(0, Yz_images.shape[1], group):
        Y = np.asarray(Yz_images[:, s:s + group], np.float64)
        XY = S.T @ Y                                                 # (v, u): X' y over presentations
        score = (XY ** 2).sum(1) / np.maximum(G.diagonal(), 1e-12)  # ~ sum over units of r^2 (units z-scored)
        idx = np.sort(np.argpartition(-score, N - 1)[:N]) if N < v else np.arange(v)
        A = np.empty((N + 1, N + 1))                                 # A_I' A_I + alpha I, A = [X 1]
        A[:N, :N] = G[np.ix_(idx, idx)]
        A[:N, N] = A[N, :N] = col_sum[idx]
        A[N, N] = n
        A.flat[:: N + 2] += alpha
        rhs = np.vstack([XY[idx], counts @ Y])                       # A_I' y
        W = scipy.linalg.cho_solve(scipy.linalg.cho_factor(A, lower=True), rhs)
        out[:, s:s + group] = Xt[:, idx] @ W[:N] + W[N]
    return out


def channel_decode_chunk(cache: str, layer: str, start: int, stop: int, Xz: np.ndarray, image_index: np.ndarray,
                         Xz_test: np.ndarray, mean: np.ndarray, sd: np.ndarray, alpha: float, n_feat: int,
                         group: int, out: str | None = None) -> np.ndarray | str:
    """One task: units ``start:stop`` (whole channels) of a layer, decoded with per-channel voxels."""
    with h5py.File(cache, "r") as f:
        Y = f[layer][:, start:stop]
    mu, s = mean[start:stop], np.where(sd[start:stop] > 0, sd[start:stop], 1.0)
    pred = channel_fit_predict(Xz, image_index, Xz_test, (Y - mu) / s, group, alpha, n_feat)
    return _task_result((pred * s + mu).astype(np.float32), out)


def readout_channel_selection(cache: Path, units: dict[str, int], groups: dict[str, int], inputs: dict[str, tuple],
                              done_dir: Path, executor=None, chunk_units: int = 65536, progress: Progress = None,
                              log=None) -> dict[str, np.ndarray]:
    """Per-channel voxel-selection decoding of every layer as resumable (layer, chunk of whole channels)
    tasks. ``inputs[layer]``: (Xz, image_index, Xz_test, mean, sd, alpha, n_feat); ``groups[layer]``:
    units per channel."""
    done_dir = Path(done_dir)
    done_dir.mkdir(parents=True, exist_ok=True)
    tasks = []
    for k, u in units.items():
        step = max(1, chunk_units // groups[k]) * groups[k]
        tasks += [(k, s, min(s + step, u)) for s in range(0, u, step)]
    path_of = {t: task_path(done_dir, t[0], t[1]) for t in tasks}
    _run_tasks(channel_decode_chunk, tasks, lambda t: (str(cache), *t, *inputs[t[0]], groups[t[0]], path_of[t]),
               path_of, dict.fromkeys(units, False), executor, progress, log)
    m = len(inputs[next(iter(units))][2])
    out = {k: np.empty((m, u), np.float32) for k, u in units.items()}
    for k, s, e in tasks:
        out[k][:, s:e] = np.load(path_of[(k, s, e)])
    return out
