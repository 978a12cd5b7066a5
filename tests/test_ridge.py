import numpy as np
import pytest

from brainrecon.decode.ridge import KernelRidgeDecoder, unit_r2, zscore_fit
from brainrecon.decode.rescale import channel_sd, rescale_decoded


def _problem(n_img, v, reps=3, k=7, seed=0):
    rng = np.random.default_rng(seed)
    idx = np.r_[np.repeat(np.arange(n_img), reps), [0, 1]]   # two images shown once more: mixed group sizes
    Y = rng.normal(size=(n_img, k))
    X = Y[idx] @ rng.normal(size=(k, v)) + 3 * rng.normal(size=(len(idx), v))
    return X, idx, Y, rng.normal(size=(5, v))


def _refit(X, T, alpha):
    """Ridge with an unpenalised intercept on rows X (n, v), targets T (n, k): the predictor x -> t."""
    mx, mt = X.mean(0), T.mean(0)
    W = np.linalg.solve((X - mx).T @ (X - mx) + alpha * np.eye(X.shape[1]), (X - mx).T @ (T - mt))
    return lambda x: mt + (x - mx) @ W


def _expected_scores(sse, n_samples, parts, Rs):
    """Mean R^2 over units for each R from brute-force residuals: ``sse`` summed over single held-out
    presentations, ``parts`` per image (mean residual^2, m, trial variance or None when shown once)."""
    w_bar = np.mean([t for *_, t in parts if t is not None], axis=0)           # images shown once borrow it
    out = []
    for R in Rs:
        if R is None:
            out.append(np.mean(1 - sse / n_samples))
            continue
        err = sum(ms + (1 / R - 1 / m) * (t if t is not None else w_bar) for ms, m, t in parts)
        out.append(np.mean(1 - err / len(parts)))
    return out


@pytest.mark.parametrize("n_img,v", [(100, 50), (30, 200)])  # more samples than voxels, and fewer
def test_kernel_ridge_equals_closed_form(n_img, v):
    X, idx, Y, Xt = _problem(n_img, v)
    dec = KernelRidgeDecoder().fit(X, idx)
    alpha = 37.0
    pred = dec.predict(dec.test_weights(Xt, alpha), Y.astype(np.float32))
    m, s = zscore_fit(X)
    Xz = (X - m) / s
    T = Y[idx]
    W = np.linalg.solve(Xz.T @ Xz + alpha * np.eye(v), Xz.T @ (T - T.mean(0)))   # primal ridge, centred
    expected = ((Xt - m) / s) @ W + T.mean(0)
    np.testing.assert_allclose(pred, expected, atol=1e-5)
    assert m.shape == (v,) and np.allclose(s, X.std(0, ddof=1))


@pytest.mark.parametrize("n_img,v", [(60, 40), (20, 120)])
def test_grouped_cv_equals_brute_force(n_img, v):
    X, idx, Y, _ = _problem(n_img, v)
    dec = KernelRidgeDecoder(alphas=np.array([1.0, 30.0, 1000.0])).fit(X, idx)
    m, s = zscore_fit(X)
    Xz = (X - m) / s
    T = Y[idx]
    Tn = (T - T.mean(0)) / T.std(0)
    expected = []
    for alpha in dec.alphas:   # refit without every presentation of one image at a time
        sse = 0.0
        for i in range(n_img):
            test = idx == i
            f = _refit(Xz[~test], Tn[~test], alpha)        # each fold centred on its own training rows
            sse = sse + ((Tn[test] - f(Xz[test])) ** 2).sum(0)
        expected.append(np.mean(1 - sse / len(T)))
    np.testing.assert_allclose(dec.cv_scores(Y), expected, rtol=1e-4, atol=1e-5)
    best, _ = dec.choose_alpha(Y)
    assert best == dec.alphas[int(np.argmax(expected))]


@pytest.mark.parametrize("n_img,v", [(60, 40), (20, 120)])
def test_per_unit_cv_errors_equal_brute_force(n_img, v):
    X, idx, Y, _ = _problem(n_img, v)
    Y = Y * np.arange(1, Y.shape[1] + 1) + 50.0          # units of different scales, far from zero mean
    Y[:, -2:] = np.random.default_rng(5).normal(size=(n_img, 2))   # two units the voxels do not carry
    dec = KernelRidgeDecoder(alphas=np.array([1.0, 30.0, 1000.0, 1e5])).fit(X, idx)
    m, s = zscore_fit(X)
    Xz = (X - m) / s
    T = Y[idx] - Y[idx].mean(0)
    expected = np.zeros((4, Y.shape[1]))
    for a, alpha in enumerate(dec.alphas):
        for i in range(n_img):
            test = idx == i
            expected[a] += ((T[test] - _refit(Xz[~test], T[~test], alpha)(Xz[test])) ** 2).sum(0)
    P = dec.loo_matrices([0, 1, 2, 3])
    got = dec.unit_cv_errors(P, Y, chunk=3)
    np.testing.assert_allclose(got, expected, rtol=2e-3)
    np.testing.assert_array_equal(got.argmin(0), expected.argmin(0))
    if n_img > v:   # the units the voxels carry want a moderate penalty, the two they do not the largest
        assert expected.argmin(0).tolist() == [1] * 5 + [3, 3]


def test_averaged_cv_equals_brute_force_decomposition():
    """Scores for R-presentation averages: mean residual^2 + (1/R - 1/m) x trial variance, from refits."""
    X, idx, Y, _ = _problem(40, 30)
    idx = np.r_[idx, 40]                                   # one more image, shown once
    rng = np.random.default_rng(7)
    Y = np.r_[Y, rng.normal(size=(1, Y.shape[1]))]
    X = np.r_[X, rng.normal(size=(1, X.shape[1]))]
    dec = KernelRidgeDecoder(alphas=np.array([3.0, 300.0])).fit(X, idx)
    m, s = zscore_fit(X)
    Xz = (X - m) / s
    T = Y[idx]
    Tn = (T - T.mean(0)) / T.std(0)
    Rs = [None, 1, 4, 1e9]
    expected = np.zeros((len(Rs), 2))
    for a, alpha in enumerate(dec.alphas):
        sse, parts = 0.0, []
        for i in range(len(Y)):
            test = idx == i
            r = Tn[test] - _refit(Xz[~test], Tn[~test], alpha)(Xz[test])        # (m, k)
            sse = sse + (r ** 2).sum(0)
            parts.append((r.mean(0) ** 2, len(r), r.var(0, ddof=1) if len(r) > 1 else None))
        expected[:, a] = _expected_scores(sse, len(T), parts, Rs)
    np.testing.assert_allclose(dec.cv_scores_averaged(Y, Rs), expected, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(dec.cv_scores(Y, 4), expected[2], rtol=1e-4, atol=1e-5)


def test_averaged_cv_predicts_the_error_on_averaged_inputs():
    """The R-presentation score is the expected R^2 of a prediction from R fresh averaged presentations
    (computed exactly from the known noise), and its best penalty falls as R grows."""
    rng = np.random.default_rng(1)
    n_img, reps, v, k, sigma = 150, 4, 60, 40, 4.0
    idx = np.repeat(np.arange(n_img), reps)
    Y = rng.normal(size=(n_img, k))
    S = Y @ rng.normal(size=(k, v)) * 0.5 + rng.normal(size=(n_img, v))   # noise-free voxel signals
    X = S[idx] + sigma * rng.normal(size=(len(idx), v))
    alphas = np.logspace(0, 5, 11)
    dec = KernelRidgeDecoder(alphas=alphas).fit(X, idx)
    m, s = zscore_fit(X)
    Xz = (X - m) / s
    T = Y[idx]
    Tn = (T - T.mean(0)) / T.std(0)
    Yn = (Y - T.mean(0)) / T.std(0)
    for R in (1, 16):
        truth = []
        for alpha in alphas:   # E||y - x_bar w||^2 = ||y - s w||^2 + sigma^2 / R ||w / sd||^2 (noise independent of w)
            err = 0.0
            for i in range(n_img):
                test = idx == i
                mx, mt = Xz[~test].mean(0), Tn[~test].mean(0)
                w = np.linalg.solve((Xz[~test] - mx).T @ (Xz[~test] - mx) + alpha * np.eye(v),
                                    (Xz[~test] - mx).T @ (Tn[~test] - mt))
                err = err + (Yn[i] - mt - ((S[i] - m) / s - mx) @ w) ** 2 + sigma ** 2 / R * ((w / s[:, None]) ** 2).sum(0)
            truth.append(np.mean(1 - err / n_img))
        got = dec.cv_scores(Y, R)
        np.testing.assert_allclose(got, truth, atol=0.015)
        assert abs(int(np.argmax(got)) - int(np.argmax(truth))) <= 1
        if R == 1:
            best_single = alphas[int(np.argmax(got))]
    assert alphas[int(np.argmax(dec.cv_scores(Y, 16)))] < best_single


def test_unit_r2_equals_brute_force_leave_one_image_out_r2():
    X, idx, Y, _ = _problem(60, 40)
    Y = np.c_[Y * 4.0 + 10.0, np.random.default_rng(3).normal(size=len(Y)), np.full(len(Y), 2.0)]  # + noise, constant
    dec = KernelRidgeDecoder(alphas=np.array([30.0])).fit(X, idx)
    m, s = zscore_fit(X)
    Xz = (X - m) / s
    T = Y[idx] - Y[idx].mean(0)
    sse = np.zeros(Y.shape[1])
    for i in range(len(Y)):
        test = idx == i
        sse += ((T[test] - _refit(Xz[~test], T[~test], 30.0)(Xz[test])) ** 2).sum(0)
    expected = 1 - sse[:-1] / (T[:, :-1] ** 2).sum(0)
    got = unit_r2(dec.unit_cv_errors(dec.loo_matrices([0]), Y)[0], Y[idx].std(0, ddof=1), len(idx))
    np.testing.assert_allclose(got[:-1], expected, rtol=1e-3, atol=1e-4)
    assert (got[:7] > 0.3).all() and got[7] < 0.05 and got[8] == 0.0   # carried, noise, constant


def test_target_statistics_match_sample_statistics():
    X, idx, Y, _ = _problem(40, 30)
    dec = KernelRidgeDecoder().fit(X, idx)
    Y32 = Y.astype(np.float32)
    mean = dec.target_mean(Y32)
    np.testing.assert_allclose(mean, Y[idx].mean(0), atol=1e-6)
    np.testing.assert_allclose(dec.target_sd(Y32, mean), Y[idx].std(0, ddof=1), atol=1e-5)


def test_rescale_matches_true_channel_sd():
    rng = np.random.default_rng(0)
    decoded = rng.normal(size=(4, 8, 5, 5)).astype(np.float32) * 0.1
    mean = rng.normal(size=(8, 5, 5)).astype(np.float32)
    out = rescale_decoded(decoded + mean, mean, 2.5)
    np.testing.assert_allclose(channel_sd(out - mean), 2.5, rtol=1e-5)
    # the pattern is kept: only a per-image scale changes
    assert np.corrcoef((out - mean)[0].ravel(), decoded[0].ravel())[0, 1] > 0.999


# --- decoders fit on each image's mean presentation (average_trials=True) ---

def _means(X, idx):
    """Single-presentation z-scoring, per-image means, centred with images counting equally."""
    m, s = zscore_fit(X)
    Z = (X - m) / s
    counts = np.bincount(idx)
    A = np.zeros((len(counts), X.shape[1]))
    np.add.at(A, idx, Z)
    A /= counts[:, None]
    shift = A.mean(0)
    return A - shift, Z - shift, m + shift * s, s


def _mixed_problem(v=45):
    X, idx, Y, Xt = _problem(30, v)
    rng = np.random.default_rng(7)
    idx = np.r_[idx, 30]                                     # one more image, shown once
    Y = np.r_[Y, rng.normal(size=(1, Y.shape[1]))] * np.arange(1, Y.shape[1] + 1) + 5.0
    X = np.r_[X, rng.normal(size=(1, X.shape[1]))]
    return X, idx, Y, Xt


def test_fit_on_image_means_equals_closed_form():
    X, idx, Y, Xt = _mixed_problem()
    dec = KernelRidgeDecoder().fit(X, idx, average_trials=True)
    A, _, mean, sd = _means(X, idx)
    W = np.linalg.solve(A.T @ A + 3.0 * np.eye(A.shape[1]), A.T @ (Y - Y.mean(0)))
    expected = ((Xt - mean) / sd) @ W + Y.mean(0)          # images weigh equally, whatever their presentations
    np.testing.assert_allclose(dec.predict(dec.test_weights(Xt, 3.0), Y.astype(np.float32)), expected, atol=1e-4)
    np.testing.assert_allclose(dec.image_weights(), 1 / len(Y))


@pytest.mark.parametrize("v", [45, 20])                    # more voxels than images, and fewer
def test_fit_on_image_means_cv_scores_every_held_out_presentation(v):
    """Refit on the other images' means; score each held-out presentation, and averages of R of them."""
    X, idx, Y, _ = _mixed_problem(v)
    alphas = np.array([1e-3, 0.5, 3.0, 300.0])                # down to near interpolation
    dec = KernelRidgeDecoder(alphas=alphas).fit(X, idx, average_trials=True)
    A, Z, _, _ = _means(X, idx)
    Yc = Y - Y.mean(0)
    Yn = Yc / Yc.std(0)
    Rs = [None, 1, 4, 1e9]
    expected = np.zeros((len(Rs), len(alphas)))
    unit_sse = np.zeros((len(alphas), Y.shape[1]))
    for a, alpha in enumerate(alphas):
        sse, parts = 0.0, []
        for i in range(len(Y)):
            keep = np.arange(len(Y)) != i
            f = _refit(A[keep], Yn[keep], alpha)                                  # the other images' means
            r = Yn[i] - f(Z[idx == i])                                           # each presentation (m, k)
            sse = sse + (r ** 2).sum(0)
            parts.append(((Yn[i] - f(A[i])) ** 2, len(r), r.var(0, ddof=1) if len(r) > 1 else None))
            unit_sse[a] += ((Yc[i] - _refit(A[keep], Yc[keep], alpha)(Z[idx == i])) ** 2).sum(0)   # unscaled units
        expected[:, a] = _expected_scores(sse, len(idx), parts, Rs)
    np.testing.assert_allclose(dec.cv_scores_averaged(Y, Rs), expected, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(dec.unit_cv_errors(dec.loo_matrices([0, 1, 2, 3]), Y), unit_sse, rtol=1e-3)


def test_fit_on_image_means_predicts_averaged_inputs_better():
    """Voxels of unequal noise, test inputs averaged over 16 presentations: at each fit's own
    cross-validated penalty, the fit on image means has the smaller true error (computed from the
    known noise) than the fit on single presentations, whose trial noise over-regularises it."""
    rng = np.random.default_rng(2)
    n_img, reps, v, k, R = 200, 5, 80, 30, 16
    idx = np.repeat(np.arange(n_img), reps)
    Y = rng.normal(size=(n_img, k))
    S = Y @ rng.normal(size=(k, v)) * 0.4                                       # noise-free voxel signals
    sigma = rng.uniform(1.0, 6.0, size=v)                                       # each voxel its own noise
    X = S[idx] + sigma * rng.normal(size=(len(idx), v))
    Yt = rng.normal(size=(300, k))                                              # fresh test images
    St = Yt @ np.linalg.lstsq(Y, S, rcond=None)[0]
    alphas = np.logspace(-1, 5, 13)
    errors = {}
    for average in (False, True):
        dec = KernelRidgeDecoder(alphas=alphas).fit(X, idx, average_trials=average)
        alpha = alphas[int(np.argmax(dec.cv_scores(Y, R)))]
        B = dec.test_weights(St, alpha)                                          # prediction from noise-free inputs
        W = np.linalg.lstsq(St - dec.mean_, B, rcond=None)[0]                   # the linear map, voxels -> images
        pred = dec.predict(B, Y.astype(np.float32))
        Yc = Y - dec.target_mean(Y)
        noise = ((sigma[:, None] * (W @ Yc)) ** 2).sum(0) / R                   # averaged input noise, per unit
        errors[average] = float(np.mean(((Yt - pred) ** 2).sum(0) + len(Yt) * noise))
    assert errors[True] < 0.8 * errors[False], errors    # measured: about half


def test_grid_edge_warning_only_where_the_score_still_improves():
    from brainrecon.decode.decoder import grid_edge_warning
    alphas = np.logspace(0, 4, 5)
    assert grid_edge_warning("conv1_1", alphas, np.array([0.30, 0.29, 0.2, 0.1, 0.0])) is not None   # rising to the edge
    assert grid_edge_warning("conv1_1", alphas, np.array([0.3004, 0.3, 0.2, 0.1, 0.0])) is None       # flat end
    assert "penalty 10000 " in grid_edge_warning("conv1_1", alphas, np.array([0.0, 0.1, 0.2, 0.3, 0.4]))
    assert grid_edge_warning("conv1_1", alphas, np.array([0.1, 0.3, 0.2, 0.1, 0.0])) is None         # inside
