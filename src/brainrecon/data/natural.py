"""Natural images built offline from the pictures that ship with scikit-image.

Each picture is split into two disjoint parts along its longer side: training images are random
crops (scale, position, flip) of the larger part; held-out test images are square tiles of the
other part, so no test pixel was ever shown in training.
"""
from __future__ import annotations

import numpy as np
from skimage import data as skdata
from skimage.transform import rescale

from .stimuli import StimulusSet, resize, to_rgb

# Pictures bundled with scikit-image (no download): natural scenes, objects, textures, people.
SOURCES = ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry",
           "retina", "camera", "brick", "grass", "gravel", "moon", "coins", "page", "text", "clock",
           "cell", "horse", "colorwheel", "logo", "motorcycle")
TEST_FRACTION = 0.3


def load_source(name: str) -> np.ndarray:
    """One bundled picture as (H, W, 3) float32 in [0, 1], at most 512 px on its long side."""
    if name == "motorcycle":
        image = skdata.stereo_motorcycle()[0]
    else:
        image = getattr(skdata, name)()
    rgb = to_rgb(image)
    if name == "logo":  # RGBA: composite on white
        alpha = np.asarray(image)[..., 3:4].astype(np.float32) / 255.0
        rgb = rgb * alpha + (1 - alpha)
    scale = 512 / max(rgb.shape[:2])
    if scale < 1:
        rgb = rescale(rgb, scale, channel_axis=2, anti_aliasing=True).astype(np.float32)
    return rgb


def split_source(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(train part, test part) of a picture, cut across its longer side."""
    h, w = rgb.shape[:2]
    if w >= h:
        cut = int(round(w * (1 - TEST_FRACTION)))
        return rgb[:, :cut], rgb[:, cut:]
    cut = int(round(h * (1 - TEST_FRACTION)))
    return rgb[:cut], rgb[cut:]


def test_tiles(part: np.ndarray) -> list[np.ndarray]:
    """Non-overlapping square tiles along the long side of a test part."""
    h, w = part.shape[:2]
    side = min(h, w)
    n = max(h, w) // side
    if w >= h:
        return [part[:, i * side:(i + 1) * side] for i in range(n)]
    return [part[i * side:(i + 1) * side] for i in range(n)]


def natural_images(n_train: int, n_test: int, size: int, seed: int = 0) -> tuple[StimulusSet, StimulusSet]:
    """(training set of ``n_train`` crops, test set of up to ``n_test`` held-out tiles), each (n, 3, size, size)."""
    rng = np.random.default_rng(seed)
    parts = {name: split_source(load_source(name)) for name in SOURCES}

    tiles = {name: test_tiles(test) for name, (_, test) in parts.items()}
    test_labels, test_images, k = [], [], 0
    while len(test_labels) < n_test and any(k < len(t) for t in tiles.values()):
        for name in SOURCES:  # round robin so every picture contributes before any gives a second tile
            if k < len(tiles[name]) and len(test_labels) < n_test:
                test_labels.append(f"test_{name}_{k}")
                test_images.append(resize(tiles[name][k], size))
        k += 1

    train_labels, train_images = [], []
    for i in range(n_train):
        name = SOURCES[i % len(SOURCES)]
        train = parts[name][0]
        h, w = train.shape[:2]
        side = int(min(h, w) * rng.uniform(0.3, 1.0))
        y, x = rng.integers(0, h - side + 1), rng.integers(0, w - side + 1)
        crop = train[y:y + side, x:x + side]
        if rng.random() < 0.5:
            crop = crop[:, ::-1]
        train_labels.append(f"train_{name}_{i:04d}")
        train_images.append(resize(crop, size))
    return (StimulusSet("train", train_labels, np.stack(train_images)),
            StimulusSet("natural", test_labels, np.stack(test_images)))
