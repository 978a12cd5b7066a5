import numpy as np

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
