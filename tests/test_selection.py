import warnings

import numpy as np
import pytest

from brainrecon.decode.selection import VoxelSelectionRidge


def _problem(n=150, v=240, k=9, m=6, seed=0, offset=0.0):
    """Correlated voxels (a few latent sources), units a noisy linear map of the voxels."""
    rng = np.random.default_rng(seed)
    S = rng.normal(size=(n + m, 5))
    X = S @ rng.normal(size=(5, v)) + 2 * rng.normal(size=(n + m, v)) + offset
    Y = X[:, :30] @ rng.normal(size=(30, k)) / 5 + rng.normal(size=(n + m, k))
    return X[:n], Y[:n], X[n:]


def _closed_form(X, Y, Xt, alpha, N):
    """Per unit: top-N voxels by |Pearson r| (float64, ties to the lower index), then ridge by least
    squares on [X_I 1] with the bias penalised too: rows sqrt(alpha) I appended."""
    n = len(X)
    Xc, Yc = X - X.mean(0), Y - Y.mean(0)
    with np.errstate(invalid="ignore"):
        r = np.abs(Xc.T @ Yc) / np.sqrt((Xc ** 2).sum(0))[:, None]
    r[X.var(0) < 1e-8] = 0
    pred, sel = np.empty((len(Xt), Y.shape[1])), []
    for u in range(Y.shape[1]):
        I = np.sort(np.argsort(-r[:, u], kind="stable")[:N])
        A = np.vstack([np.hstack([X[:, I], np.ones((n, 1))]), np.sqrt(alpha) * np.eye(N + 1)])
        wb = np.linalg.lstsq(A, np.r_[Y[:, u], np.zeros(N + 1)], rcond=None)[0]
        pred[:, u] = Xt[:, I] @ wb[:-1] + wb[-1]
        sel.append(I)
    return pred, np.array(sel)


@pytest.mark.parametrize("offset", [0.0, 40.0])            # centred voxels, and large means (float64 chosen)
def test_predictions_equal_closed_form(offset):
    X, Y, Xt = _problem(offset=offset)
    X[:, 7] = 3.0                                            # a constant voxel: r = 0, never selected
    pred, sel = _closed_form(X, Y, Xt, 37.0, 25)
    model = VoxelSelectionRidge(dtype=np.float64, batch_size=4).fit(X, Y, alpha=37.0, n_feat=25)
    np.testing.assert_array_equal(model.index_, sel)
    np.testing.assert_allclose(model.predict(Xt), pred, rtol=0, atol=1e-9 * np.abs(pred).max())
    auto = VoxelSelectionRidge(batch_size=4)                 # float32 unless the data are far from centred
    p32 = auto.fit(X, Y, alpha=37.0, n_feat=25).predict(Xt)
    assert auto.dtype_ == (np.float64 if offset else np.float32)
    np.testing.assert_array_equal(auto.index_, sel)
    np.testing.assert_allclose(p32, pred, rtol=0, atol=2e-5 * np.abs(pred).max())


def test_fit_predict_dense_weights_and_unit_shape():
    X, Y, Xt = _problem(k=12)
    Y3 = Y.reshape(len(Y), 3, 4)
    model = VoxelSelectionRidge(dtype=np.float64, batch_size=2).fit(X, Y3, alpha=10.0, n_feat=40)
    pred = model.predict(Xt)
    assert pred.shape == (len(Xt), 3, 4)
    once = VoxelSelectionRidge(dtype=np.float64, batch_size=5).fit_predict(X, Y3, Xt, alpha=10.0, n_feat=40)
    np.testing.assert_allclose(once, pred, atol=1e-12)
    serial = VoxelSelectionRidge(dtype=np.float64, batch_size=2, n_threads=1).fit(X, Y3, alpha=10.0, n_feat=40)
    np.testing.assert_array_equal(serial.predict(Xt), pred)              # threads do not change results
    W, b = model.W, model.b                                   # FastL2LiR's layout: (v, units), (1, units)
    assert W.shape == (X.shape[1], 12) and b.shape == (1, 12) and ((W != 0).sum(0) == 40).all()
    np.testing.assert_allclose(Xt @ W + b, pred.reshape(len(Xt), -1), atol=1e-9)


def test_planted_voxels_are_selected():
    rng = np.random.default_rng(1)
    n, v, k, N = 600, 400, 6, 10
    X = rng.normal(size=(n, v))
    planted = [np.sort(rng.choice(v, N, replace=False)) for _ in range(k)]
    Y = np.stack([X[:, p] @ rng.uniform(1, 2, N) for p in planted], 1) + rng.normal(size=(n, k))
    model = VoxelSelectionRidge(batch_size=4).fit(X, Y, alpha=100.0, n_feat=N)
    np.testing.assert_array_equal(model.index_, np.array(planted))


def test_near_ties_at_the_threshold_follow_float64():
    """Voxel pairs whose |r| differ by ~1e-8, below float32 resolution, straddle the N-th place."""
    rng = np.random.default_rng(2)
    n, v, N = 200, 120, 10
    y = rng.normal(size=n)
    X = rng.normal(size=(n, v))
    X[:, :N] += 3 * y[:, None]                                # clear winners 0..N-1
    X[:, N - 1] = X[:, N] = 0.4 * y + rng.normal(size=n)      # the N-th place is contested ...
    X[:, N] += 1e-7 * rng.normal(size=n)                      # ... by nearly identical voxels
    X[:, N + 1] = -X[:, N - 1] + 1e-8 * rng.normal(size=n)
    Y = np.stack([y, -y], 1)
    _, sel = _closed_form(X, Y, X[:3], 100.0, N)
    model = VoxelSelectionRidge(dtype=np.float32, batch_size=2).fit(X, Y, alpha=100.0, n_feat=N)
    np.testing.assert_array_equal(model.index_, sel)


@pytest.mark.parametrize("n", [300, 150])                    # more samples than voxels (primal), fewer (dual)
def test_all_voxels_is_plain_ridge_with_penalised_bias(n):
    X, Y, Xt = _problem(n=n, v=200)
    A = np.hstack([X, np.ones((n, 1))])
    wb = np.linalg.solve(A.T @ A + 5.0 * np.eye(201), A.T @ Y)
    for n_feat in (0, 200, 500):
        pred = VoxelSelectionRidge(dtype=np.float64).fit(X, Y, alpha=5.0, n_feat=n_feat).predict(Xt)
        np.testing.assert_allclose(pred, Xt @ wb[:-1] + wb[-1], atol=1e-8)


def _working_fastl2lir():
    """The fastl2lir module, or the reason it cannot serve as the oracle here."""
    try:
        import fastl2lir
    except ImportError:
        return None, "fastl2lir is not installed (make install-test installs it with numpy<2.4)"
    X, Y, _ = _problem(n=30, v=40, k=2)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            fastl2lir.FastL2LiR().fit(X, Y, alpha=1.0, n_feat=5)
    except Exception as e:                                   # voxel selection fails on numpy >= 2.4
        return None, f"fastl2lir's voxel selection fails with numpy {np.__version__}: {e}"
    return fastl2lir, ""


def test_matches_fastl2lir():
    fastl2lir, reason = _working_fastl2lir()
    if fastl2lir is None:
        pytest.skip(reason)
    X, Y, Xt = _problem(n=200, v=500, k=40, offset=0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = fastl2lir.FastL2LiR().fit(X, Y, alpha=100.0, n_feat=60)
    expected = ref.predict(Xt)
    exact = VoxelSelectionRidge(dtype=np.float64).fit(X, Y, alpha=100.0, n_feat=60)
    np.testing.assert_allclose(exact.predict(Xt), expected, rtol=0, atol=1e-10)
    np.testing.assert_allclose(exact.W, ref.W, rtol=0, atol=1e-12)
    np.testing.assert_allclose(exact.b, ref.b, rtol=0, atol=1e-10)
    fast = VoxelSelectionRidge().fit_predict(X, Y, Xt, alpha=100.0, n_feat=60)   # float32
    np.testing.assert_allclose(fast, expected, rtol=0, atol=2e-5 * np.abs(expected).max())
