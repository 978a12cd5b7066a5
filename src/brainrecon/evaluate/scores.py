"""How well reconstructions resemble their stimuli: :func:`evaluate` (the scores every run reports)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .identification import pairwise_identification
from .similarity import pixel_correlation, ssim


@dataclass
class ImageScores:
    """Scores of reconstructions against their own stimuli.

    Attributes
    ----------
    labels : list of str (n,)
    per_image_identification : (n,) float
        Pairwise identification by pixel correlation of each reconstruction among the set's stimuli
        (ties count one half; chance 0.5).
    pixel_correlation, ssim : (n,) float
        Each reconstruction's Pearson r with its stimulus, and SSIM on greyscale (Gaussian window,
        sigma 1.5, data range 1).
    """
    labels: list[str]
    per_image_identification: np.ndarray
    pixel_correlation: np.ndarray
    ssim: np.ndarray

    @property
    def pixel_identification(self) -> float:
        """Mean pairwise identification by pixel correlation."""
        return float(self.per_image_identification.mean())

    def summary(self, suffix: str = "") -> dict[str, float]:
        """The set's means as metrics.json keys (``pixel_identification``, ``pixel_correlation``, ``ssim``,
        each followed by ``suffix``)."""
        return {f"pixel_identification{suffix}": self.pixel_identification,
                f"pixel_correlation{suffix}": float(self.pixel_correlation.mean()),
                f"ssim{suffix}": float(self.ssim.mean())}


def evaluate(images: np.ndarray, stimuli) -> ImageScores:
    """Score reconstructions (n, 3, H, W) in [0, 1] against their stimuli, row for row.

    ``stimuli``: an array (n, 3, H, W), a ``StimulusSet`` or a ``Stimuli`` (loaded at the
    reconstructions' size).
    """
    from ..data.stimuli import Stimuli

    images = np.asarray(images)
    labels = list(getattr(stimuli, "labels", range(len(images))))
    if isinstance(stimuli, Stimuli):
        stimuli = stimuli.load(images.shape[-1])
    target = np.asarray(getattr(stimuli, "images", stimuli))
    if target.shape != images.shape:
        raise ValueError(f"reconstructions {images.shape} and stimuli {target.shape} differ in shape: "
                         "pass one stimulus per reconstruction, at its size")
    return ImageScores([str(x) for x in labels], pairwise_identification(images, target),
                       pixel_correlation(images, target), ssim(images, target))
