"""Feature extraction in batches, to memory or to a chunked HDF5 cache."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import h5py
import numpy as np
import torch


@torch.inference_mode()
def extract_features(network, images: np.ndarray, layers: list[str], batch_size: int = 32,
                     progress: Callable[[int, int], None] | None = None) -> dict[str, np.ndarray]:
    """{layer: (n, C, h, w) float32} of images (n, 3, H, W) in [0, 1]."""
    out: dict[str, list[np.ndarray]] = {k: [] for k in layers}
    for s in range(0, len(images), batch_size):
        feats = network(torch.from_numpy(np.ascontiguousarray(images[s:s + batch_size])).float(), layers)
        for k in layers:
            out[k].append(feats[k].numpy())
        if progress:
            progress(min(s + batch_size, len(images)), len(images))
    return {k: np.concatenate(v) for k, v in out.items()}


@torch.inference_mode()
def cache_features(network, images: np.ndarray, layers: list[str], path: Path, batch_size: int = 32,
                   progress: Callable[[int, int], None] | None = None) -> Path:
    """Write features of images to ``path`` (one dataset per layer, (n, units) float32).

    One forward pass per batch fills every layer; a completed file (attribute ``complete``) is reused.
    """
    path = Path(path)
    if path.exists():
        with h5py.File(path, "r") as f:
            if f.attrs.get("complete", False) and all(k in f for k in layers) and f[layers[0]].shape[0] == len(images):
                return path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".partial.h5")
    with h5py.File(tmp, "w") as f:
        dsets = {}
        for s in range(0, len(images), batch_size):
            feats = network(torch.from_numpy(np.ascontiguousarray(images[s:s + batch_size])).float(), layers)
            for k in layers:
                a = feats[k].flatten(1).numpy()
                if k not in dsets:
                    dsets[k] = f.create_dataset(k, (len(images), a.shape[1]), dtype="f4",
                                                chunks=(min(batch_size, len(images)), min(a.shape[1], 2 ** 15)))
                    dsets[k].attrs["shape"] = tuple(feats[k].shape[1:])
                dsets[k][s:s + len(a)] = a
            if progress:
                progress(min(s + batch_size, len(images)), len(images))
        f.attrs["complete"] = True
    tmp.replace(path)
    return path
