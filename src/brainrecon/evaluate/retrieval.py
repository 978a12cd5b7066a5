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
features are held in memory (queries x units per layer).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ..data.stimuli import load_image
from .identification import _standardise_rows


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


@torch.inference_mode()
def similarity_to_training(paths: dict[str, Path], size: int, pixel_queries: dict[str, np.ndarray],
                           feature_queries: dict[str, dict[str, np.ndarray]], network=None, batch_size: int = 32,
                           progress: Callable[[int, int], None] | None = None) -> TrainingSimilarity:
    """Correlations of queries with the training images ``paths`` ({label: file}, loaded at ``size``).

    Parameters
    ----------
    pixel_queries : {name: (m, 3, size, size)} images compared pixel by pixel.
    feature_queries : {name: {layer: (m, *unit_shape)}} features compared with the training images'
        features of the same layers through ``network`` (needed if any).
    """
    labels = list(paths)
    px = {k: _standardise_rows(v) for k, v in pixel_queries.items()}
    layers = sorted({layer for q in feature_queries.values() for layer in q})
    ft = {k: {layer: _standardise_rows(a) for layer, a in q.items()} for k, q in feature_queries.items()}
    out_px = {k: np.zeros((len(v), len(labels))) for k, v in px.items()}
    out_ft = {k: {layer: np.zeros((len(a), len(labels))) for layer, a in q.items()} for k, q in ft.items()}
    for s in range(0, len(labels), batch_size):
        batch = np.stack([load_image(paths[lab], size) for lab in labels[s:s + batch_size]])
        z = _standardise_rows(batch)
        for k, q in px.items():
            out_px[k][:, s:s + len(batch)] = q @ z.T
        if layers:
            feats = network(torch.from_numpy(batch).float(), layers)
            zf = {layer: _standardise_rows(feats[layer].numpy()) for layer in layers}
            for k, q in ft.items():
                for layer, a in q.items():
                    out_ft[k][layer][:, s:s + len(batch)] = a @ zf[layer].T
        if progress:
            progress(min(s + batch_size, len(labels)), len(labels))
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
