"""Streaming and cached decoding equal the direct kernel ridge prediction; executors agree."""
import numpy as np
import pytest
import torch

from brainrecon.decode.ridge import KernelRidgeDecoder
from brainrecon.decode.streaming import (combination_weights, read_unit_results, readout_cached, readout_stream,
                                         training_pass)
from brainrecon.executors import make_executor
from brainrecon.nets.vgg import VGGEncoder


@pytest.fixture(scope="module")
def problem():
    torch.manual_seed(0)
    net = VGGEncoder("vgg16").eval().requires_grad_(False)
    rng = np.random.default_rng(0)
    images = rng.random((12, 3, 16, 16), dtype=np.float32)
    image_index = np.repeat(np.arange(12), [1, 2, 3] * 4)
    X = rng.standard_normal((len(image_index), 40))
    X_test = rng.standard_normal((5, 40))
    layers = ["conv1_2", "conv3_1", "conv5_3"]
    with torch.no_grad():
        Y = {k: v.flatten(1).numpy() for k, v in net(torch.from_numpy(images), layers).items()}
    dec = KernelRidgeDecoder(np.array([10.0])).fit(X, image_index)
    B = dec.test_weights(X_test, 10.0)
    expected = {k: dec.predict(B, Y[k]) for k in layers}
    counts = np.bincount(image_index)
    C = {k: combination_weights(B, counts / counts.sum()) for k in layers}
    return net, images, image_index, layers, Y, dec, expected, C, counts


def test_training_pass_statistics(problem, tmp_path):
    net, images, image_index, layers, Y, dec, _, _, counts = problem
    stats = training_pass(net, images, layers, counts, n_sample=7, batch_size=5, cache=tmp_path / "f.h5")
    for k in layers:
        Ys = Y[k][image_index]                                   # per training sample
        np.testing.assert_allclose(stats[k].mean, Ys.mean(0), rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(stats[k].sd, Ys.std(0, ddof=1), rtol=1e-3, atol=1e-4)
        np.testing.assert_allclose(stats[k].sample, Y[k][:, stats[k].sample_index], rtol=1e-6)
        np.testing.assert_allclose(stats[k].mean, dec.target_mean(Y[k]), rtol=1e-4, atol=1e-4)
    assert (tmp_path / "f.h5").exists() and not (tmp_path / "f.partial.h5").exists()


def test_stream_and_cached_readouts_equal_direct_prediction(problem, tmp_path):
    net, images, image_index, layers, Y, _, expected, C, counts = problem
    streamed = readout_stream(net, images, C, batch_size=5)
    training_pass(net, images, layers, counts, n_sample=3, batch_size=5, cache=tmp_path / "f.h5")
    units = {k: Y[k].shape[1] for k in layers}
    cached = readout_cached(tmp_path / "f.h5", C, units, tmp_path / "done", chunk_units=1000)
    for k in layers:
        np.testing.assert_allclose(streamed[k], expected[k], rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(cached[k], expected[k], rtol=1e-4, atol=1e-4)
    # finished tasks are not recomputed: with the feature cache gone, the saved results still assemble
    n_files = len(list((tmp_path / "done").glob("*.npy")))
    assert n_files == sum(-(-u // 1000) for u in units.values())
    (tmp_path / "f.h5").rename(tmp_path / "moved.h5")
    again = readout_cached(tmp_path / "moved.h5", C, units, tmp_path / "done", chunk_units=1000)
    np.testing.assert_array_equal(again["conv1_2"], cached["conv1_2"])


def test_per_unit_penalties_decode_each_unit_with_its_best_penalty(problem, tmp_path):
    net, images, image_index, layers, Y, _, _, _, counts = problem
    rng = np.random.default_rng(1)
    X = rng.standard_normal((len(image_index), 40))
    X_test = rng.standard_normal((5, 40))
    dec = KernelRidgeDecoder(np.array([0.3, 10.0, 300.0])).fit(X, image_index)
    w = counts / counts.sum()
    grid = [0, 1, 2]
    Cs = np.stack([combination_weights(dec.test_weights(X_test, dec.alphas[i]), w) for i in grid])
    P = dec.loo_matrices(grid, w)
    training_pass(net, images, layers, counts, n_sample=3, batch_size=5, cache=tmp_path / "f.h5")
    units = {k: Y[k].shape[1] for k in layers}
    got = readout_cached(tmp_path / "f.h5", {k: (Cs, P, dec.alphas[grid]) for k in layers}, units,
                         tmp_path / "done", chunk_units=700)
    for k in layers:
        best = dec.unit_cv_errors(P, Y[k]).argmin(0)
        expected = np.stack([dec.predict(dec.test_weights(X_test, dec.alphas[i]), Y[k]) for i in grid])
        np.testing.assert_allclose(got[k], np.take_along_axis(expected, best[None, None], 0)[0], rtol=1e-4, atol=1e-4)
        np.testing.assert_array_equal(read_unit_results(tmp_path / "done", k, units[k], 700), dec.alphas[best])
        np.testing.assert_allclose(read_unit_results(tmp_path / "done", k, units[k], 700, "cverror"),
                                   dec.unit_cv_errors(P, Y[k]).min(0), rtol=1e-5)
    assert len(np.unique(read_unit_results(tmp_path / "done", "conv1_2", units["conv1_2"], 700))) > 1


def test_dask_local_cluster_equals_local(problem, tmp_path):
    pytest.importorskip("dask.distributed")
    net, images, image_index, layers, Y, _, expected, C, counts = problem
    training_pass(net, images, layers, counts, n_sample=3, batch_size=5, cache=tmp_path / "f.h5")
    units = {k: Y[k].shape[1] for k in layers}
    local = readout_cached(tmp_path / "f.h5", C, units, tmp_path / "local", chunk_units=2000)
    ex = make_executor("dask", {"n_workers": 2, "processes": False})
    try:
        dask = readout_cached(tmp_path / "f.h5", C, units, tmp_path / "dask", ex, chunk_units=2000)
    finally:
        ex.close()
    for k in layers:
        np.testing.assert_array_equal(dask[k], local[k])


def test_executor_specs():
    assert make_executor("local") is None
    with pytest.raises(ValueError, match="unknown executor"):
        make_executor("slurm")
    with pytest.raises(ValueError, match="processes:N"):
        make_executor("processes:x")


def test_selection_tasks_equal_a_direct_fit(problem, tmp_path):
    from brainrecon.decode.selection import VoxelSelectionRidge
    from brainrecon.decode.streaming import readout_selection

    net, images, image_index, layers, Y, dec, _, _, counts = problem
    stats = training_pass(net, images, layers, counts, n_sample=3, batch_size=5, cache=tmp_path / "f.h5")
    rng = np.random.default_rng(1)
    Xz = rng.standard_normal((len(image_index), 40)).astype(np.float32)
    Xt = rng.standard_normal((4, 40)).astype(np.float32)
    units = {"conv3_1": Y["conv3_1"].shape[1]}
    st = stats["conv3_1"]
    inputs = {"conv3_1": (Xz, image_index, Xt, st.mean, st.sd, 100.0, 10)}
    got = readout_selection(tmp_path / "f.h5", units, inputs, tmp_path / "sel", chunk_units=300)["conv3_1"]
    sd = np.where(st.sd > 0, st.sd, 1)
    Yz = ((Y["conv3_1"] - st.mean) / sd)[image_index]
    want = VoxelSelectionRidge(dtype=np.float64).fit(Xz, Yz, alpha=100.0, n_feat=10).predict(Xt) * sd + st.mean
    np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-3 * np.abs(want).max())
