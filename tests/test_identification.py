import numpy as np
import pytest

from brainrecon.evaluate.identification import (correlation_matrix, pairwise_identification,
                                                 pattern_correlation, profile_correlation)
from brainrecon.evaluate.reliability import retest_reliability


def test_pairwise_identification_hand_computed():
    target = np.array([[1.0, 0, 0, 0], [0, 1.0, 0, 0], [0, 0, 1.0, 0]])
    pred = np.array([[1.0, 0, 0, 0],     # closest to its own: wins both comparisons
                     [1.0, 0.2, 0, 0],   # closer to target 0 than to its own, beats target 2
                     [0, 0, 0, 1.0]])    # equally (un)like everything: ties count one half
    c = correlation_matrix(pred, target)
    assert np.isclose(c[0, 0], 1.0) and np.isclose(c[0, 1], -1 / 3)
    acc = pairwise_identification(pred, target)
    # pred 1: r with own target 1 vs r with target 0 (larger) and target 2 (smaller)
    assert c[1, 0] > c[1, 1] > c[1, 2]
    np.testing.assert_allclose(acc, [1.0, 0.5, 0.5])


def test_identification_chance_on_random_data():
    rng = np.random.default_rng(0)
    acc = pairwise_identification(rng.normal(size=(200, 50)), rng.normal(size=(200, 50)))
    assert abs(acc.mean() - 0.5) < 0.03


def test_profile_and_pattern_correlation():
    rng = np.random.default_rng(1)
    t = rng.normal(size=(30, 10))
    p = 2 * t + 1    # affine per unit: profile r = 1
    np.testing.assert_allclose(profile_correlation(p, t), 1.0)
    np.testing.assert_allclose(pattern_correlation(t, t, t.mean(0), t.std(0)), 1.0)
    np.testing.assert_allclose(profile_correlation(-t, t), -1.0)


def test_test_retest_reliability():
    rng = np.random.default_rng(2)
    signal = rng.normal(size=(100, 3))
    labels = [f"img{i}" for i in range(100)] * 2
    noise_sd = np.array([0.0, 1.0, 1e6])      # expected r: 1, 0.5, ~0
    X = np.concatenate([signal, signal]) + rng.normal(size=(200, 3)) * noise_sd
    r = retest_reliability(X, labels)
    assert np.isclose(r[0], 1.0) and 0.3 < r[1] < 0.7 and abs(r[2]) < 0.3


def test_pixel_correlation_of_each_reconstruction_with_its_stimulus():
    from brainrecon.evaluate.similarity import pixel_correlation
    rng = np.random.default_rng(3)
    t = rng.random((3, 3, 8, 8))
    p = np.stack([0.5 * t[0] + 0.2, 1 - t[1], t[2] + rng.normal(0, 0.3, (3, 8, 8))])
    r = pixel_correlation(p, t)
    assert np.allclose(r[:2], [1.0, -1.0])
    assert np.isclose(r[2], np.corrcoef(p[2].ravel(), t[2].ravel())[0, 1])
    with pytest.raises(ValueError, match="must both be"):
        pixel_correlation(p[:, :, :4], t)


def test_ssim_closed_form_greyscale_and_noise():
    from brainrecon.evaluate.similarity import ssim
    flat = np.stack([np.full((3, 16, 16), 0.2), np.full((3, 16, 16), 0.6)])
    c1 = 0.01 ** 2                                      # uniform images: luminance term only
    assert np.isclose(ssim(flat[:1], flat[1:])[0], (2 * 0.2 * 0.6 + c1) / (0.2 ** 2 + 0.6 ** 2 + c1))
    rng = np.random.default_rng(4)
    img = rng.random((1, 3, 24, 24))
    luma = np.array([0.2125, 0.7154, 0.0721])           # scikit-image's rgb2gray weights
    grey = (luma[None, :, None, None] * img).sum(1, keepdims=True).repeat(3, 1)
    assert np.isclose(ssim(img, grey)[0], 1.0)          # colour does not count, luminance does
    scores = [ssim(np.clip(img + rng.normal(0, s, img.shape), 0, 1), img)[0] for s in (0.05, 0.2, 0.5)]
    assert 1.0 > scores[0] > scores[1] > scores[2] > 0.0
