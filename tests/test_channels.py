"""Voxel selection once per channel, against a direct numpy solution and the per-unit decoder."""
import h5py
import numpy as np

from brainrecon.decode.channels import channel_fit_predict, channel_groups, readout_channel_selection
from brainrecon.decode.ridge import zscore_fit
from brainrecon.decode.selection import VoxelSelectionRidge


def problem(seed=0, n_images=30, v=50, units=24):
    rng = np.random.default_rng(seed)
    image_index = np.repeat(np.arange(n_images), 2)
    Y = rng.standard_normal((n_images, units))
    X = rng.standard_normal((len(image_index), v))
    X[:, :10] += 0.8 * Y[image_index][:, :10]                     # some voxels carry some units
    mean, sd = zscore_fit(X)
    Xz = (X - mean) / sd
    Xt = (rng.standard_normal((4, v)) - mean) / sd
    Ye = Y[image_index]
    Yz = (Y - Ye.mean(0)) / Ye.std(0, ddof=1)
    return Xz, image_index, Xt, Yz


def direct(Xz, image_index, Xt, Yz, group, alpha, n_feat):
    """Each channel: voxels of largest mean r^2 (numpy corrcoef), ridge [X_I 1] solved by numpy."""
    Ye = Yz[image_index]
    out = np.empty((len(Xt), Yz.shape[1]))
    for s in range(0, Yz.shape[1], group):
        cols = range(s, min(s + group, Yz.shape[1]))
        r2 = np.array([[np.corrcoef(Xz[:, j], Ye[:, k])[0, 1] ** 2 for k in cols] for j in range(Xz.shape[1])])
        idx = np.sort(np.argsort(-r2.mean(1))[:n_feat])
        A = np.hstack([Xz[:, idx], np.ones((len(Xz), 1))])
        W = np.linalg.solve(A.T @ A + alpha * np.eye(len(idx) + 1), A.T @ Ye[:, list(cols)])
        out[:, list(cols)] = np.hstack([Xt[:, idx], np.ones((len(Xt), 1))]) @ W
    return out


def test_per_channel_selection_equals_a_direct_solution():
    Xz, image_index, Xt, Yz = problem()
    for group, n_feat in [(8, 12), (6, 5), (24, 50)]:
        got = channel_fit_predict(Xz, image_index, Xt, Yz, group, 10.0, n_feat)
        want = direct(Xz, image_index, Xt, Yz, group, 10.0, n_feat)
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_one_unit_per_channel_is_the_per_unit_decoder():
    Xz, image_index, Xt, Yz = problem(seed=3)
    got = channel_fit_predict(Xz, image_index, Xt, Yz, 1, 100.0, 7)
    want = VoxelSelectionRidge(dtype=np.float64).fit(Xz, Yz[image_index], alpha=100.0, n_feat=7).predict(Xt)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_tasks_hold_whole_channels(tmp_path):
    Xz, image_index, Xt, Yz = problem(seed=5, units=36)
    rng = np.random.default_rng(2)
    mean, sd = rng.standard_normal(36), rng.random(36) + 0.5
    with h5py.File(tmp_path / "f.h5", "w") as f:
        f["conv"] = (Yz * sd + mean).astype(np.float32)
    inputs = {"conv": (Xz.astype(np.float32), image_index, Xt.astype(np.float32), mean.astype(np.float32),
                       sd.astype(np.float32), 10.0, 8)}
    assert channel_groups((4, 3, 3), 256) == 9 and channel_groups((36,), 12) == 12
    got = readout_channel_selection(tmp_path / "f.h5", {"conv": 36}, {"conv": 9}, inputs, tmp_path / "t",
                                    chunk_units=20)["conv"]          # chunks of 18 units: two whole channels
    assert len(list((tmp_path / "t").glob("*.npy"))) == 2
    want = direct(Xz, image_index, Xt, Yz, 9, 10.0, 8) * sd + mean
    np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-4)
