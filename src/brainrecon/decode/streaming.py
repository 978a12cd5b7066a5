"""Kernel ridge decoding at any scale: training features streamed, never held whole.

A kernel ridge decoder's prediction for test samples is a fixed linear combination of the
training images' features: ``decoded = mean + B (Y - mean) = C Y`` with
``C = B + (1 - B 1) w^T`` (``w``: each image's share of the training samples, so ``mean = w^T Y``).
``C`` (n_test, n_images) is small, so decoding needs only:

1. one pass over the training images for per-unit statistics (mean, SD, channel SD) and a sample
   of units per layer (to choose the layer's ridge penalty) -> :func:`training_pass`;
2. ``C Y`` for every unit, either accumulated batch by batch of training images during a second
   forward pass (:func:`readout_stream`: features are never stored) or computed chunk by chunk of
   units from an HDF5 feature cache written by the first pass (:func:`readout_cached`: independent
   tasks for an executor, each saved when done so that an interrupted run resumes).

Peak memory (float32): ``(n_test + batch_size) x units`` for streaming, plus two float64 vectors of
``units`` for the statistics; ``(n_test + n_images) x chunk_units`` per cached task.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import h5py
import numpy as np
import torch

from ..cache import load_npy, load_or_none, save_npy

Progress = Callable[[int, int], None] | None


@dataclass
class LayerStats:
    """Training statistics of one layer's units (weighted by presentations, like the decoder)."""
    shape: tuple[int, ...]        # unit shape, e.g. (C, h, w)
    mean: np.ndarray              # (units,) float32
    sd: np.ndarray                # (units,) float32, ddof=1 over training samples
    channel_sd: float             # mean over images and channels of the per-image channel SD
    sample_index: np.ndarray      # (k,) units sampled to choose the penalty
    sample: np.ndarray            # (n_images, k) their values


def combination_weights(B: np.ndarray, image_weights: np.ndarray) -> np.ndarray:
    """``C`` (n_test, n_images) with ``mean + B (Y - mean) = C Y`` for ``mean = w^T Y``."""
    return (B + (1.0 - B.sum(1, keepdims=True)) * image_weights[None, :]).astype(np.float32)


def _channel_sd_sum(a: torch.Tensor) -> float:
    """Sum over images of the mean channel SD (as :func:`brainrecon.decode.rescale.channel_sd`)."""
    f = a.flatten(2) if a.ndim > 2 else a[:, None, :]
    return float(f.std(dim=2, correction=1 if f.shape[2] > 1 else 0).mean(1).sum())


@torch.inference_mode()
def training_pass(network, images: np.ndarray, layers: list[str], counts: np.ndarray, n_sample: int,
                  seed: int = 0, batch_size: int = 16, cache: Path | None = None,
                  progress: Progress = None) -> dict[str, LayerStats]:
    """Statistics and a unit sample per layer from one forward pass over ``images`` (n, 3, H, W).

    ``counts`` (n,): presentations of each image in the training fMRI. With ``cache`` the features
    are also written there (HDF5, one (n, units) dataset per layer, chunked by units) for
    :func:`readout_cached`; the file is only renamed into place once complete.
    """
    n = len(images)
    c = torch.as_tensor(counts, dtype=torch.float32)
    rng = np.random.default_rng(seed)
    acc: dict[str, dict] = {}
    scratch = torch.empty(0)
    tmp = Path(cache).with_suffix(".partial.h5") if cache else None
    h5 = h5py.File(tmp, "w") if tmp else None
    try:
        for s in range(0, n, batch_size):
            feats = network(torch.from_numpy(np.ascontiguousarray(images[s:s + batch_size])).float(), layers)
            cb = c[s:s + batch_size]
            for k in layers:
                a = feats[k]
                flat = a.flatten(1)
                if k not in acc:
                    units = flat.shape[1]
                    idx = np.sort(rng.choice(units, min(n_sample, units), replace=False))
                    # sums of (value - shift), shift = the first image's values: float32 within a batch,
                    # float64 across batches, and no cancellation when a unit's mean is large
                    acc[k] = dict(shape=tuple(a.shape[1:]), shift=flat[0].clone(),
                                  s1=torch.zeros(units, dtype=torch.float64),
                                  s2=torch.zeros(units, dtype=torch.float64), csd=0.0, idx=idx,
                                  sample=np.empty((n, len(idx)), np.float32))
                    if h5 is not None:
                        # chunks of one batch of images x 65536 units: whole-chunk writes, column reads of 4 MB pieces
                        h5.create_dataset(k, (n, units), dtype="f4", chunks=(min(batch_size, n), min(units, 65536))
                                          ).attrs["shape"] = a.shape[1:]
                d = acc[k]
                if scratch.numel() < flat.numel():     # one buffer reused for every layer and batch
                    scratch = torch.empty(flat.numel())
                dev = torch.sub(flat, d["shift"], out=scratch[:flat.numel()].view(flat.shape))
                d["s1"] += cb @ dev
                d["s2"] += cb @ dev.square_()
                d["csd"] += _channel_sd_sum(a)
                d["sample"][s:s + len(a)] = flat[:, d["idx"]].numpy()
                if h5 is not None:
                    h5[k][s:s + len(a)] = flat.numpy()
            if progress:
                progress(min(s + batch_size, n), n)
        if h5 is not None:
            h5.attrs["complete"] = True
            h5.close()
            h5 = None
            tmp.replace(cache)
    finally:
        if h5 is not None:
            h5.close()
    total = float(c.double().sum())
    out = {}
    for k, d in acc.items():
        mean_dev = d["s1"] / total
        var = ((d["s2"] - total * mean_dev.square()) / max(total - 1, 1)).clamp(min=0)
        mean = d["shift"].double() + mean_dev
        out[k] = LayerStats(d["shape"], mean.float().numpy(), var.sqrt().float().numpy(), d["csd"] / n,
                            d["idx"], d["sample"])
    return out


@torch.inference_mode()
def readout_stream(network, images: np.ndarray, C: dict[str, np.ndarray], batch_size: int = 16,
                   progress: Progress = None) -> dict[str, np.ndarray]:
    """``{layer: C[layer] @ Y_layer}`` (n_test, units) accumulated over batches of training images."""
    layers = list(C)
    out: dict[str, torch.Tensor] = {}
    for s in range(0, len(images), batch_size):
        feats = network(torch.from_numpy(np.ascontiguousarray(images[s:s + batch_size])).float(), layers)
        for k in layers:
            flat = feats[k].flatten(1)
            w = torch.from_numpy(C[k][:, s:s + len(flat)])
            if k not in out:
                out[k] = torch.zeros(len(w), flat.shape[1])
            out[k].addmm_(w, flat)
        if progress:
            progress(min(s + batch_size, len(images)), len(images))
    return {k: v.numpy() for k, v in out.items()}


def _task_result(result: np.ndarray, out: str | None) -> np.ndarray | str:
    """The task's result, or its file: written to a temporary name, then renamed (never half-written)."""
    if out is None:
        return result
    save_npy(out, result)
    return out


def decode_chunk(cache: str, layer: str, start: int, stop: int, C, out: str | None = None) -> np.ndarray | str:
    """One task: ``C @ Y[:, start:stop]`` for a layer of the feature cache; saved to ``out`` if given.

    ``C`` (m, n_images), or for a penalty per unit the tuple (C (a, m, n_images) per penalty,
    P (a, n_images, n_images) of :meth:`KernelRidgeDecoder.loo_matrices`, penalties (a,)): each unit
    is decoded with the penalty of least leave-one-image-out error (a = 1: the layer's penalty, with
    the errors measured). The chosen penalties and the errors (units,) are saved beside ``out``
    (:func:`unit_result_path`) before it.
    """
    with h5py.File(cache, "r") as f:
        Y = f[layer][:, start:stop]
    if not isinstance(C, tuple):
        return _task_result(C @ Y, out)
    from .ridge import KernelRidgeDecoder

    Cs, P, grid = C
    errors = KernelRidgeDecoder.unit_cv_errors(P, Y)
    best = errors.argmin(0)
    result = np.empty((Cs.shape[1], Y.shape[1]), np.float32)
    for a in np.unique(best):
        cols = np.flatnonzero(best == a)
        result[:, cols] = Cs[a] @ Y[:, cols]
    if out is not None:
        _task_result(np.asarray(grid, np.float64)[best], unit_result_path(out, "alpha"))
        _task_result(errors[best, np.arange(len(best))], unit_result_path(out, "cverror"))
    return _task_result(result, out)


def unit_result_path(out: str, kind: str) -> str:
    """Where a per-unit task saves its per-unit ``kind``: "alpha" (chosen penalties) or "cverror"
    (leave-one-image-out sum of squared errors over training samples)."""
    return str(out)[:-len(".npy")] + f"-{kind}.npy"


def task_path(done_dir: Path, layer: str, start: int) -> str:
    """Where the finished task of ``layer``'s units from ``start`` saves its result."""
    return str(Path(done_dir) / f"{layer}-{start}.npy")


def read_unit_results(done_dir: Path, layer: str, units: int, chunk_units: int, kind: str = "alpha") -> np.ndarray:
    """The per-unit ``kind`` (units,) of the finished per-unit tasks of ``layer`` in ``done_dir``
    (:func:`unit_result_path`)."""
    return np.concatenate([np.load(unit_result_path(task_path(done_dir, layer, s), kind))
                           for s in range(0, units, chunk_units)])


def chunk_tasks(units: dict[str, int], chunk_units: int) -> list[tuple[str, int, int]]:
    """(layer, start, stop) for every chunk of every layer."""
    return [(k, s, min(s + chunk_units, u)) for k, u in units.items() for s in range(0, u, chunk_units)]


def _finished(task_file: str, per_unit: bool, warn) -> bool:
    """Whether a task's result file (and, for per-unit tasks, its penalty and error files) can be read;
    an unreadable one is moved aside with a warning, so the task runs again."""
    files = [task_file] + ([unit_result_path(task_file, k) for k in ("alpha", "cverror")] if per_unit else [])
    return all(load_or_none(f, load_npy, warn) is not None for f in files)


def _run_tasks(fn, tasks: list[tuple], args_of, path_of: dict, per_unit: dict[str, bool], executor, progress,
               log) -> None:
    """Run the tasks whose results are not saved yet (``fn(*args_of(task))`` saves them)."""
    warn = log or None
    todo = [t for t in tasks if not _finished(path_of[t], per_unit[t[0]], warn)]
    if log and len(todo) < len(tasks):
        log(f"  reused {len(tasks) - len(todo)} of {len(tasks)} finished decoding tasks")
    if todo:
        cols = list(zip(*[args_of(t) for t in todo]))
        results = executor.map(fn, *cols) if executor is not None else map(fn, *cols)
        for i, _ in enumerate(results):
            if progress:
                progress(len(tasks) - len(todo) + i + 1, len(tasks))


def readout_cached(cache: Path, C: dict[str, np.ndarray], units: dict[str, int], done_dir: Path,
                   executor=None, chunk_units: int = 65536, progress: Progress = None,
                   log=None) -> dict[str, np.ndarray]:
    """``{layer: C[layer] @ Y_layer}`` from the feature cache, as independent (layer, unit chunk) tasks.

    ``C[layer]`` may also be a per-unit-penalty tuple (see :func:`decode_chunk`).
    Each task's result is saved in ``done_dir``; tasks already saved there (and readable) are not
    recomputed. ``executor``: an object with ``map(fn, *iterables) -> iterable`` (see
    :mod:`brainrecon.executors`); the tasks run in this process when None. ``log``: told what was reused.
    """
    done_dir = Path(done_dir)
    done_dir.mkdir(parents=True, exist_ok=True)
    tasks = chunk_tasks(units, chunk_units)
    path_of = {t: task_path(done_dir, t[0], t[1]) for t in tasks}
    per_unit = {k: isinstance(c, tuple) for k, c in C.items()}
    _run_tasks(decode_chunk, tasks, lambda t: (str(cache), *t, C[t[0]], path_of[t]), path_of, per_unit, executor,
               progress, log)
    rows = {k: (c[0].shape[1] if isinstance(c, tuple) else len(c)) for k, c in C.items()}
    out = {k: np.empty((rows[k], u), np.float32) for k, u in units.items()}
    for k, s, e in tasks:
        out[k][:, s:e] = np.load(path_of[(k, s, e)])
    return out


def select_decode_chunk(cache: str, layer: str, start: int, stop: int, Xz: np.ndarray, image_index: np.ndarray,
                        Xz_test: np.ndarray, mean: np.ndarray, sd: np.ndarray, alpha: float, n_feat: int,
                        out: str | None = None) -> np.ndarray | str:
    """One task of the voxel-selection decoder (the lab's FastL2LiR): units ``start:stop`` of a layer.

    ``Xz`` (n_samples, v) and ``Xz_test`` (m, v): voxels z-scored with training statistics; units are
    z-scored with their training ``mean``/``sd`` (units,) and the predictions de-normalised.
    """
    from .selection import VoxelSelectionRidge

    with h5py.File(cache, "r") as f:
        Y = f[layer][:, start:stop]
    mu, s = mean[start:stop], np.where(sd[start:stop] > 0, sd[start:stop], 1.0)
    Yz = ((Y - mu) / s)[image_index]
    result = VoxelSelectionRidge().fit_predict(Xz, Yz, Xz_test, alpha=alpha, n_feat=n_feat) * s + mu
    result = result.astype(np.float32)
    return _task_result(result, out)


def readout_selection(cache: Path, units: dict[str, int], inputs: dict[str, tuple], done_dir: Path, executor=None,
                      chunk_units: int = 65536, progress: Progress = None, log=None) -> dict[str, np.ndarray]:
    """Voxel-selection decoding of every layer from the feature cache as resumable (layer, chunk) tasks.

    ``inputs[layer]``: (Xz, image_index, Xz_test, mean, sd, alpha, n_feat) for :func:`select_decode_chunk`.
    """
    done_dir = Path(done_dir)
    done_dir.mkdir(parents=True, exist_ok=True)
    tasks = chunk_tasks(units, chunk_units)
    path_of = {t: task_path(done_dir, t[0], t[1]) for t in tasks}
    _run_tasks(select_decode_chunk, tasks, lambda t: (str(cache), *t, *inputs[t[0]], path_of[t]), path_of,
               dict.fromkeys(units, False), executor, progress, log)
    m = len(inputs[next(iter(units))][2])
    out = {k: np.empty((m, u), np.float32) for k, u in units.items()}
    for k, s, e in tasks:
        out[k][:, s:e] = np.load(path_of[(k, s, e)])
    return out
