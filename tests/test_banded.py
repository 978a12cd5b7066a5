"""Banded (multiple-kernel) ridge over ROIs, checked against himalaya and brute-force refits."""
from __future__ import annotations

import h5py
import numpy as np
import pytest

from brainrecon.decode.banded import BandedKernelRidge, Band, bands_of, candidate_weights
from brainrecon.decode.ridge import KernelRidgeDecoder, zscore_fit

ALPHAS = np.logspace(-1, 4, 11)


def planted(seed: int = 0, n: int = 60, sizes=(30, 20, 40), signal_band: int = 1, k: int = 12, noise: float = 0.5):
    """Voxels in bands; targets linear in the voxels of one band only, plus noise."""
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, sum(sizes)))
    edges = np.cumsum((0,) + tuple(sizes))
    bands = [Band(f"R{i}", np.arange(edges[i], edges[i + 1])) for i in range(len(sizes))]
    W = rng.standard_normal((sizes[signal_band], k))
    Y = X[:, bands[signal_band].columns] @ W / np.sqrt(sizes[signal_band]) + noise * rng.standard_normal((n, k))
    return X, Y, bands


def _z(X):
    mean, sd = zscore_fit(X)
    return (X - mean) / sd


def test_bands_of_drops_unions_and_keeps_the_rest():
    cols = {"ROI_V1": [0, 1, 2], "ROI_V2": [3, 4], "ROI_LVC": [0, 1, 2, 3, 4], "ROI_VC": list(range(8)),
            "ROI_FFA": []}
    bands = bands_of(cols, 8)
    assert [b.name for b in bands] == ["V1", "V2", "other"]
    assert [b.columns.tolist() for b in bands] == [[0, 1, 2], [3, 4], [5, 6, 7]]
    only_union = bands_of({"ROI_VC": list(range(8))}, 8)       # no smaller ROI: one band, the kernel decoder
    assert [(b.name, len(b.columns)) for b in only_union] == [("other", 8)]
    assert candidate_weights(1, 5).tolist() == [[1.0]]


def test_candidates_on_the_simplex():
    W = candidate_weights(4, 10, seed=3)
    assert W.shape == (15, 4)
    np.testing.assert_allclose(W.sum(1), 1.0)
    assert (W >= 0).all()
    np.testing.assert_allclose(W[0], 0.25)
    np.testing.assert_allclose(W[1:5], np.eye(4))
    np.testing.assert_array_equal(W, candidate_weights(4, 10, seed=3))


def test_loo_scores_match_brute_force_refits():
    X, Y, bands = planted(n=40, k=5)
    W = candidate_weights(3, 3, seed=1)
    model = BandedKernelRidge(ALPHAS, bands, W).fit(X, np.arange(len(X)))
    scores = model.search({"y": Y}, [None])["y"][:, 0]                      # (n_candidates, n_alphas)
    Xz = _z(X)
    Yz = (Y - Y.mean(0)) / Y.std(0)
    for c in (0, 2, 5):
        scale = np.zeros(X.shape[1])
        for w, b in zip(W[c], bands):
            scale[b.columns] = len(bands) * w
        for a in (1, 6):
            err = np.zeros(Y.shape[1])
            for i in range(len(X)):
                tr = np.delete(np.arange(len(X)), i)
                Kc = (Xz[tr] * scale) @ Xz[tr].T
                Kc -= Kc.mean(0) + Kc.mean(1, keepdims=True) - Kc.mean()           # intercept: centred fold
                kt = (Xz[i] * scale) @ Xz[tr].T
                kt = kt - kt.mean() - ((Xz[tr] * scale) @ Xz[tr].T).mean(1) + ((Xz[tr] * scale) @ Xz[tr].T).mean()
                ym = Yz[tr].mean(0)
                pred = ym + kt @ np.linalg.solve(Kc + ALPHAS[a] * np.eye(len(tr)), Yz[tr] - ym)
                err += (Yz[i] - pred) ** 2
            np.testing.assert_allclose(scores[c, a], np.mean(1 - err / len(X)), atol=1e-5)   # float32 products


@pytest.mark.filterwarnings("ignore:divide by zero:RuntimeWarning")   # himalaya logs zero weights
def test_matches_himalaya_multiple_kernel_ridge_cv():
    himalaya = pytest.importorskip("himalaya.kernel_ridge")
    from sklearn.model_selection import KFold

    X, Y, bands = planted(seed=2, n=50, k=8)
    Xtest = np.random.default_rng(9).standard_normal((7, X.shape[1]))
    W = candidate_weights(3, 6, seed=0)
    B = len(bands)
    model = BandedKernelRidge(ALPHAS, bands, W).fit(X, np.arange(len(X)))
    scores = model.search({"y": Y}, [None])["y"][:, 0]
    c, a = np.unravel_index(np.argmax(scores), scores.shape)

    mean, sd = zscore_fit(X)
    Xz, Xtz = (X - mean) / sd, (Xtest - mean) / sd
    Ks = np.stack([Xz[:, b.columns] @ Xz[:, b.columns].T for b in bands])
    Kt = np.stack([Xtz[:, b.columns] @ Xz[:, b.columns].T for b in bands])
    Yz = (Y - Y.mean(0)) / Y.std(0)
    # our kernel is B sum_b w_b K_b at penalty alpha: himalaya's sum_b w_b K_b at alpha / B
    ref = himalaya.MultipleKernelRidgeCV(
        kernels="precomputed", solver="random_search", cv=KFold(len(X)), fit_intercept=True,  # KFold(n): leave-one-out
        solver_params=dict(n_iter=W, alphas=ALPHAS / B, local_alpha=False, progress_bar=False))
    ref.fit(Ks, Yz)
    gamma = np.exp(ref.deltas_)                          # gamma_b / alpha, the same for every target
    np.testing.assert_allclose(gamma, gamma[:, :1] * np.ones_like(gamma))
    ref_alpha = 1.0 / gamma[:, 0].sum()
    np.testing.assert_allclose(gamma[:, 0] * ref_alpha, W[c], atol=1e-12)
    np.testing.assert_allclose(ref_alpha * B, ALPHAS[a], rtol=1e-9)
    # per-candidate CV scores: himalaya's mean negative squared LOO error is our R^2 - 1
    np.testing.assert_allclose(ref.cv_scores_.mean(1), scores.max(1) - 1, atol=1e-6)

    dec = model.decoder(c)
    pred = dec.predict(dec.test_weights(Xtest, ALPHAS[a]), Yz)
    np.testing.assert_allclose(pred, ref.predict(Kt), atol=1e-6)
    kr = himalaya.KernelRidge(alpha=ALPHAS[a], kernel="precomputed", fit_intercept=True)
    kr.fit(B * np.tensordot(W[c], Ks, 1), Yz)
    np.testing.assert_allclose(pred, kr.predict(B * np.tensordot(W[c], Kt, 1)), atol=1e-6)


@pytest.mark.parametrize("average", [False, True])
def test_weight_concentrates_on_the_informative_roi(average):
    X, Y, bands = planted(seed=4, n=120, sizes=(40, 40, 40), signal_band=2, k=20, noise=0.7)
    index = np.arange(len(X))
    if average:     # three noisy presentations per image
        rng = np.random.default_rng(5)
        index = np.repeat(index, 3)
        X = X[index] + 0.5 * rng.standard_normal((len(index), X.shape[1]))
    W = candidate_weights(3, 20, seed=0)
    model = BandedKernelRidge(np.logspace(-1, 5, 13), bands, W).fit(X, index, average)
    scores = model.search({"y": Y}, [None])["y"][:, 0]
    best = W[np.argmax(scores.max(1))]
    assert best[2] > 0.8, best
    assert scores.max() > scores[0].max() + 0.05       # better than the uniform kernel (the kernel decoder)


def test_uniform_candidate_is_the_kernel_decoder():
    X, Y, bands = planted(seed=6, n=30, k=4)
    index = np.repeat(np.arange(30), 2)
    Xr = X[index] + 0.3 * np.random.default_rng(1).standard_normal((60, X.shape[1]))
    model = BandedKernelRidge(ALPHAS, bands, candidate_weights(3, 2)).fit(Xr, index, True)
    ref = KernelRidgeDecoder(ALPHAS).fit(Xr, index, True)
    np.testing.assert_allclose(model.search({"y": Y}, [None, 4.0])["y"][0], ref.cv_scores_averaged(Y, [None, 4.0]),
                               atol=1e-6)
    dec = model.decoder(0)
    np.testing.assert_allclose(dec.test_weights(Xr[:5], 10.0), ref.test_weights(Xr[:5], 10.0), atol=1e-8)


def test_feature_decoder_banded_on_a_simulated_subject(small_subject, network, tmp_path):
    """ROI weights per layer in the fitted state and the decoded features; the features are the chosen
    weighting's kernel ridge prediction; deep layers weigh the areas the simulator drives by them."""
    import brainrecon as br
    from brainrecon.decode.streaming import combination_weights

    subject, paths = small_subject
    train, test = br.read_fmri(paths["train"]), br.read_fmri(paths["letters"])
    layers = ["conv1_1", "conv5_3"]
    dec = br.FeatureDecoder(network, 32, cache_dir=tmp_path, layers=layers, decoder="banded", banded_candidates=8,
                            alpha_sample_units=128).fit(train, br.load_images(subject / "images", train.labels), [12.0])
    decoded = dec.predict(test)
    for layer in layers:
        w = decoded.alphas[layer].roi_weights
        assert list(w) == ["V1", "V2", "V3", "hV4", "LOC", "FFA", "PPA"]
        assert sum(w.values()) == pytest.approx(1.0)
        kernel = dec._decoder(layer)
        X, labels = test.average_by_label()
        order = np.argsort(labels)
        C = combination_weights(kernel.test_weights(X[order], decoded.alphas[layer].test_alpha["test"]),
                                kernel.image_weights())
        with h5py.File(dec.feature_path_) as f:
            want = C @ f[layer][()]
        np.testing.assert_allclose(decoded.features[layer].reshape(len(labels), -1), want, rtol=1e-4,
                                   atol=1e-4 * np.abs(want).max())
    high = decoded.alphas["conv5_3"].roi_weights
    assert high["LOC"] + high["FFA"] + high["PPA"] > 0.5, high           # the simulator drives them by conv4_3/conv5_3
    assert decoded.unit_r2["conv5_3"].shape == (512, 2, 2)


def test_banded_run_writes_roi_weights_to_run_json_and_report(small_subject, tmp_path):
    import json

    from typer.testing import CliRunner

    from brainrecon.cli import app
    subject, _ = small_subject
    out = tmp_path / "run"
    res = CliRunner().invoke(app, [
        "run", "--train", str(subject / "train.h5"), "--test", f"letters={subject / 'test_letters.h5'}",
        "--images", str(subject / "images"), "--out", str(out), "--image-size", "32", "--iterations", "3",
        "--snapshots", "none", "--no-true-features", "--decoder", "banded", "--layers", "conv1_1,conv3_1"])
    assert res.exit_code == 0, res.output
    alphas = json.loads((out / "run.json").read_text())["alphas"]
    assert set(alphas["conv3_1"]["roi_weights"]) == {"V1", "V2", "V3", "hV4", "LOC", "FFA", "PPA"}
    report = (out / "report.html").read_text()
    assert "Which area decodes which layer" in report and "<th>hV4</th>" in report


def test_fewer_voxels_than_samples_uses_the_voxel_gram():
    """Single presentations with fewer voxels than samples: each weighting's eigendecomposition comes
    from the (voxels x voxels) Gram matrix; the scores equal those from the stored sample kernels."""
    X, Y, bands = planted(seed=7, n=40, sizes=(6, 5, 7), k=4)
    index = np.repeat(np.arange(40), 2)
    Xr = X[index] + 0.5 * np.random.default_rng(2).standard_normal((80, 18))
    W = candidate_weights(3, 3, seed=2)
    model = BandedKernelRidge(ALPHAS, bands, W).fit(Xr, index)
    assert model.kernels_ is None
    got = model.search({"y": Y}, [None, 3.0])["y"]
    Xz = model.base_.Xz_
    model.kernels_ = np.stack([Xz[:, b.columns] @ Xz[:, b.columns].T for b in bands])
    np.testing.assert_allclose(got, model.search({"y": Y}, [None, 3.0])["y"], atol=1e-5)


def test_banded_per_unit_choice_among_weightings(small_subject, network, tmp_path):
    """alpha_per unit: every unit is decoded by one of the ROI weightings, each at its best penalty."""
    import brainrecon as br
    from brainrecon.decode.streaming import combination_weights

    subject, paths = small_subject
    train, test = br.read_fmri(paths["train"]), br.read_fmri(paths["letters"])
    dec = br.FeatureDecoder(network, 32, cache_dir=tmp_path, layers=["conv5_3"], decoder="banded", alpha_per="unit",
                            banded_candidates=4, alpha_sample_units=128).fit(
        train, br.load_images(subject / "images", train.labels))
    decoded = dec.predict(test)
    p = decoded.alphas["conv5_3"]
    assert p.alpha_per == "unit" and sum(p.unit_alpha_counts.values()) == 2048
    model, scores = dec.decoders_[train.roi], dec._band_scores["conv5_3"]
    X, labels = test.average_by_label()
    Xs = X[np.argsort(labels)]
    with h5py.File(dec.feature_path_) as f:
        Y = f["conv5_3"][()]
    preds = np.stack([combination_weights(model.decoder(c).test_weights(Xs, model.alphas[int(np.argmax(scores[c]))]),
                                          model.base_.image_weights()) @ Y for c in range(len(model.weights))])
    got = decoded.features["conv5_3"].reshape(len(Xs), -1)
    err = np.abs(preds - got[None]).max(1)                               # (weightings, units)
    assert (err.min(0) <= 1e-4 * np.abs(Y).max()).all()
    assert len(set(err.argmin(0).tolist())) > 1                          # units differ in their weighting
