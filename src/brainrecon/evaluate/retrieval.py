"""The retrieval check: is a reconstruction more than the training image that happens to look most alike?

Two questions, over the run's training images (the stimuli of the training fMRI):

- For each reconstruction, the training image it resembles most, by pixel correlation and by the
  run network's features (Pearson r per layer, averaged over layers), and whether its own stimulus
  resembles it more than every training image does (:func:`nearest_training`).
- The retrieval baseline: answer each test sample with the training image whose true features best
  match its decoded features (mean over layers of the per-layer Pearson r), and score those answers
  as reconstructions, by pixel-correlation identification among the test set's stimuli
  (:func:`retrieval_answers`). A reconstruction that scores no better than its retrieval baseline
  shows no more than a decoder that picks a training image.

Training images are streamed in batches (pixels and one forward pass per batch); the queries'
standardised features are held in memory (float32, queries x units per layer), in groups of layers
that fit a memory budget: one pass over the training images per group.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ..data.stimuli import load_image


@dataclass
class TrainingSimilarity:
    """Pearson r of queries with every training image.

    Attributes
    ----------
    labels : list of str (n_train,)
    pixels : {query set: (m, n_train)} pixel correlation
    features : {query set: {layer: (m, n_train)}} feature correlation per layer
    """
    labels: list[str]
    pixels: dict[str, np.ndarray]
    features: dict[str, dict[str, np.ndarray]]

    def feature_mean(self, key: str) -> np.ndarray:
        """(m, n_train): the feature correlation averaged over layers."""
        return np.mean(list(self.features[key].values()), axis=0)


def _z32(a: np.ndarray) -> np.ndarray:
    """Rows (flattened) centred and scaled to unit norm, float32: their dot products are Pearson r."""
    a = np.asarray(a, np.float32).reshape(len(a), -1)
    a = a - a.mean(1, keepdims=True)
    norm = np.linalg.norm(a, axis=1, keepdims=True)
    return a / np.where(norm > 0, norm, 1.0)


def _layer_groups(feature_queries: dict[str, dict[str, np.ndarray]], max_bytes: float) -> list[list[str]]:
    """Layers in network order (as first met), grouped so that each group's queries (float32) fit in ``max_bytes``."""
    size: dict[str, float] = {}
    for q in feature_queries.values():
        for layer, a in q.items():
            size[layer] = size.get(layer, 0.0) + 4.0 * a.size
    groups, total = [[]], 0.0
    for layer, b in size.items():
        if groups[-1] and total + b > max_bytes:
            groups.append([])
            total = 0.0
        groups[-1].append(layer)
        total += b
    return [g for g in groups if g]


@torch.inference_mode()
def similarity_to_training(paths: dict[str, Path], size: int, pixel_queries: dict[str, np.ndarray],
                           feature_queries: dict[str, dict[str, np.ndarray]], network=None, batch_size: int = 16,
                           max_bytes: float = 2e9,
                           progress: Callable[[int, int], None] | None = None) -> TrainingSimilarity:
    """Correlations of queries with the training images ``paths`` ({label: file}, loaded at ``size``).

    Parameters
    ----------
    pixel_queries : {name: (m, 3, size, size)} images compared pixel by pixel.
    feature_queries : {name: {layer: (m, *unit_shape)}} features compared with the training images'
        features of the same layers through ``network`` (needed if any).
    max_bytes : memory for the standardised feature queries: layers are taken in groups that fit, one
        pass over the training images per group (one pass in all at small image sizes).
    """
    labels = list(paths)
    px = {k: _z32(v) for k, v in pixel_queries.items()}
    out_px = {k: np.zeros((len(v), len(labels))) for k, v in px.items()}
    out_ft = {k: {layer: np.zeros((len(a), len(labels))) for layer, a in q.items()} for k, q in feature_queries.items()}
    groups = _layer_groups(feature_queries, max_bytes) or [[]]
    for n, group in enumerate(groups):
        ft = {k: {layer: _z32(a) for layer, a in q.items() if layer in group} for k, q in feature_queries.items()}
        for s in range(0, len(labels), batch_size):
            batch = np.stack([load_image(paths[lab], size) for lab in labels[s:s + batch_size]])
            if n == 0:
                z = _z32(batch)
                for k, q in px.items():
                    out_px[k][:, s:s + len(batch)] = q @ z.T
            if group:
                feats = network(torch.from_numpy(batch).float(), group)
                zf = {layer: _z32(feats[layer].numpy()) for layer in group}
                for k, q in ft.items():
                    for layer, a in q.items():
                        out_ft[k][layer][:, s:s + len(batch)] = a @ zf[layer].T
            if progress:
                progress(min(s + batch_size, len(labels)), len(labels))
        del ft
    return TrainingSimilarity(labels, out_px, out_ft)


@dataclass
class Nearest:
    """One reconstruction's nearest training image (by pixels and by features) against its own stimulus."""
    label: str
    nearest_pixel: str
    nearest_pixel_r: float
    stimulus_pixel_r: float
    stimulus_beats_training_pixel: bool
    nearest_feature: str | None = None
    nearest_feature_r: float | None = None
    stimulus_feature_r: float | None = None
    stimulus_beats_training_feature: bool | None = None

    def to_json(self) -> dict:
        return asdict(self)


def nearest_training(labels: list[str], train_labels: list[str], pixel_r: np.ndarray, stimulus_pixel_r: np.ndarray,
                     feature_r: np.ndarray | None = None, stimulus_feature_r: np.ndarray | None = None) -> list[Nearest]:
    """Per reconstruction: the training image of highest r (pixel_r, feature_r: (m, n_train)) and whether
    its own stimulus's r (stimulus_*_r: (m,)) is higher than every training image's."""
    out = []
    for i, lab in enumerate(labels):
        j = int(np.argmax(pixel_r[i]))
        n = Nearest(lab, train_labels[j], float(pixel_r[i, j]), float(stimulus_pixel_r[i]),
                    bool(stimulus_pixel_r[i] > pixel_r[i, j]))
        if feature_r is not None:
            k = int(np.argmax(feature_r[i]))
            n.nearest_feature, n.nearest_feature_r = train_labels[k], float(feature_r[i, k])
            n.stimulus_feature_r = float(stimulus_feature_r[i])
            n.stimulus_beats_training_feature = bool(stimulus_feature_r[i] > feature_r[i, k])
        out.append(n)
    return out


def retrieval_answers(decoded_r: np.ndarray, train_labels: list[str]) -> list[str]:
    """The retrieval baseline's answer to each test sample: the training image whose true features
    correlate best with its decoded features (decoded_r: (m, n_train), e.g. averaged over layers)."""
    return [train_labels[int(j)] for j in np.argmax(decoded_r, axis=1)]
