"""The simplest readout, as a baseline: ridge regression from voxels straight to a low-resolution image.

:class:`PixelDecoder` predicts every pixel of a small RGB image (default 16 x 16) from the voxels of
one ROI by kernel ridge (:class:`~brainrecon.decode.ridge.KernelRidgeDecoder`); the ROI and the
penalty are chosen together by exact leave-one-image-out cross-validation among the candidate ROIs
(e.g. VC, each area, V1+V2+V3), scored for inputs averaged over as many presentations as the test
data have. Its predictions, upsampled to the run's image size, are scored like reconstructions: a
user sees whether the deep method beats it.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .ridge import DEFAULT_ALPHAS, KernelRidgeDecoder


def downsample(images: np.ndarray, size: int) -> np.ndarray:
    """Images (n, 3, H, W) -> (n, 3, size, size) by area averaging (float32)."""
    x = torch.from_numpy(np.ascontiguousarray(images, np.float32))
    return F.interpolate(x, size=(size, size), mode="area").numpy()


def upsample(images: np.ndarray, size: int) -> np.ndarray:
    """Images (n, 3, h, w) -> (n, 3, size, size) by bilinear interpolation, clipped to [0, 1]."""
    x = torch.from_numpy(np.ascontiguousarray(images, np.float32))
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False).clamp(0, 1).numpy()


@dataclass
class PixelChoice:
    """What cross-validation chose for test inputs averaged over ``n_average`` presentations
    (None: single presentations): the ROI, the penalty and its leave-one-image-out R^2 (mean over pixels)."""
    n_average: float | None
    roi: str
    alpha: float
    cv_r2: float

    def to_json(self) -> dict:
        return asdict(self)


class PixelDecoder:
    """Ridge from voxels to a ``size`` x ``size`` RGB image, ROI and penalty by cross-validation.

    Parameters
    ----------
    size : int
        Side of the predicted images in pixels.
    alphas : array (a,)
        Candidate ridge penalties.
    average_trials : bool
        Fit on each image's mean presentation (``KernelRidgeDecoder.fit(average_trials=True)``).

    Attributes (after ``fit``)
    --------------------------
    choices_ : dict {n_average: PixelChoice}
    cv_scores_ : dict {roi: array (len(n_averages), a)}, leave-one-image-out R^2 per penalty.
    """

    def __init__(self, size: int = 16, alphas: np.ndarray = DEFAULT_ALPHAS, average_trials: bool = True):
        self.size = int(size)
        self.alphas = np.asarray(alphas, np.float64)
        self.average_trials = bool(average_trials)

    def fit(self, X_by_roi: dict[str, np.ndarray], image_index: np.ndarray, images: np.ndarray,
            n_averages: list[float | None] = (None,)) -> "PixelDecoder":
        """Fit on training fMRI of each candidate ROI.

        Parameters
        ----------
        X_by_roi : dict {roi: array (n_samples, n_voxels_roi)}
            Training samples, rows in the same order for every ROI.
        image_index : array (n_samples,)
            The training image (row of ``images``) shown in each sample.
        images : array (n_images, 3, H, W)
            Training images in [0, 1].
        n_averages : list of float or None
            Presentations averaged in the test inputs the choice is made for (None: single).
        """
        if not X_by_roi:
            raise ValueError("no candidate ROI to fit the pixel decoder on")
        n_averages = list(n_averages)
        self.targets_ = downsample(images, self.size).reshape(len(images), -1)
        best: dict[int, tuple[float, str, float]] = {}
        fitted, self.cv_scores_ = {}, {}
        for roi, X in X_by_roi.items():
            dec = KernelRidgeDecoder(self.alphas).fit(X, image_index, average_trials=self.average_trials)
            scores = dec.cv_scores_averaged(self.targets_, n_averages)               # (len(n_averages), a)
            self.cv_scores_[roi] = scores
            keep = False
            for j in range(len(n_averages)):
                a = int(np.argmax(scores[j]))
                if j not in best or scores[j, a] > best[j][0]:
                    best[j] = (float(scores[j, a]), roi, float(self.alphas[a]))
                    keep = True
            if keep:
                fitted[roi] = dec
        self.choices_ = {R: PixelChoice(R, best[j][1], best[j][2], best[j][0]) for j, R in enumerate(n_averages)}
        self.decoders_ = {c.roi: fitted[c.roi] for c in self.choices_.values()}
        self.mean_ = {roi: d.target_mean(self.targets_) for roi, d in self.decoders_.items()}
        return self

    def choice(self, n_average: float | None = None) -> PixelChoice:
        """The ROI and penalty chosen for inputs averaged over ``n_average`` presentations."""
        if n_average not in self.choices_:
            raise KeyError(f"no choice for {n_average} presentations: fit with n_averages including it "
                           f"(fitted: {', '.join(map(str, self.choices_))})")
        return self.choices_[n_average]

    def predict(self, X: np.ndarray, n_average: float | None = None) -> np.ndarray:
        """Low-resolution images (n, 3, size, size) in [0, 1] from test fMRI (n, n_voxels) of the chosen
        ROI (:meth:`choice`)."""
        c = self.choice(n_average)
        dec = self.decoders_[c.roi]
        out = dec.predict(dec.test_weights(X, c.alpha), self.targets_, self.mean_[c.roi])
        return np.clip(out, 0, 1).reshape(len(X), 3, self.size, self.size)

    def predict_images(self, X: np.ndarray, image_size: int, n_average: float | None = None) -> np.ndarray:
        """:meth:`predict` upsampled to (n, 3, image_size, image_size)."""
        return upsample(self.predict(X, n_average), image_size)
