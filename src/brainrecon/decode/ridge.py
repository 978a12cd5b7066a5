"""Kernel (dual) ridge decoders from voxels to DNN units.

All units share the voxel kernel, so the solve is done once: for test samples
``decoded = mean + B @ (Y_train - mean)`` with ``B = X_test X^T (X X^T + alpha I)^-1`` (n_test, n_train).
No (n_voxels, n_units) weight matrix is ever formed; units are processed in chunks.

Decoders are fit on every presentation (as in the paper) or on each image's mean presentation
(``average_trials``), which regularises them for the trial noise of averaged test inputs rather
than of single trials.

The ridge penalty is chosen per layer by leave-one-group-out cross-validation from a single SVD of
the training voxels, grouping the repeated presentations of an image (leaving out one presentation
while keeping the others would leak the image and favour too small a penalty), or per unit, from
one (n_images, n_images) matrix per penalty that gives every unit's leave-one-image-out error as a
quadratic form of its targets (:meth:`KernelRidgeDecoder.loo_matrices`). The per-layer error can be
scored for inputs averaged over R presentations, as test data are (:meth:`cv_scores_averaged`):
averaging removes trial noise, so the best penalty for them is smaller than for single trials.
"""
from __future__ import annotations

import copy

import numpy as np
import scipy.linalg
import scipy.sparse

DEFAULT_ALPHAS = np.logspace(0, 7, 15)


def zscore_fit(X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Column means and SDs (ddof=1) of X (n, p); constant columns get SD 1."""
    mean = X.mean(0)
    sd = X.std(0, ddof=1)
    sd[~(sd > 0)] = 1.0
    return mean, sd


def kernel_eigen(Xz: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Eigenvectors U (n, r) and eigenvalues (r,) of K = Xz Xz^T, from the smaller of the two Gram matrices."""
    n, p = Xz.shape
    if p < n:
        w, V = scipy.linalg.eigh(Xz.T @ Xz, driver="evd")
        keep = w > w.max() * 1e-10
        U = (Xz @ V[:, keep]) / np.sqrt(w[keep])
        return U, w[keep]
    w, U = scipy.linalg.eigh(Xz @ Xz.T, driver="evd")
    keep = w > w.max() * 1e-10
    return U[:, keep], w[keep]


def unit_r2(cv_errors: np.ndarray, sd: np.ndarray, n_samples: int) -> np.ndarray:
    """Cross-validated R^2 (units,) from leave-one-image-out sums of squared errors over the
    ``n_samples`` training samples and the units' training SD (ddof=1); 0 for constant units."""
    total = (n_samples - 1) * np.asarray(sd, np.float64) ** 2
    r2 = 1.0 - np.asarray(cv_errors, np.float64) / np.where(total > 0, total, 1.0)
    return np.where(total > 0, r2, 0.0).astype(np.float32)


class KernelRidgeDecoder:
    """Ridge regression in kernel form shared by all units, one penalty per target group (layer).

    ``fit(X, image_index)``: X (n_samples, n_voxels) training fMRI; ``image_index`` (n_samples,) the
    training image shown in each sample (targets are given per image, (n_images, n_units)).
    ``average_trials=True`` fits on each image's mean presentation instead (voxels scaled by their
    single-presentation SD), so that trial noise regularises the fit as it does for averaged test
    inputs; cross-validation still scores every held-out presentation.
    """

    def __init__(self, alphas: np.ndarray = DEFAULT_ALPHAS):
        self.alphas = np.asarray(alphas, dtype=np.float64)

    def fit(self, X: np.ndarray, image_index: np.ndarray, average_trials: bool = False) -> "KernelRidgeDecoder":
        X = np.asarray(X, dtype=np.float64)
        trial_index = np.asarray(image_index)
        n_images = int(trial_index.max()) + 1
        counts = np.bincount(trial_index, minlength=n_images)
        if (counts == 0).any():
            raise ValueError("every training image must be shown at least once")
        self.trial_index_, self.trial_counts_, self.n_images_ = trial_index, counts, n_images
        self.mean_, self.sd_ = zscore_fit(X)
        self.averaged_ = bool(average_trials)
        self.blocks_ = self.column_weights_ = None
        if not self.averaged_:
            self.Xz_ = (X - self.mean_) / self.sd_                             # (n, v)
            self.image_index_, self.counts_ = trial_index, counts
            self.U_, self.eig_ = kernel_eigen(self.Xz_)                      # K = U diag(eig) U^T
            return self
        means = np.zeros((n_images, X.shape[1]))
        for s in range(0, len(X), 1024):                                      # in chunks: no z-scored copy of X
            np.add.at(means, trial_index[s:s + 1024], (X[s:s + 1024] - self.mean_) / self.sd_)
        means /= counts[:, None]
        shift = means.mean(0)                                                 # images count equally
        self.mean_ = self.mean_ + shift * self.sd_
        self.Xz_ = means - shift                                              # (n_images, v)
        self.image_index_, self.counts_ = np.arange(n_images), np.ones(n_images, dtype=np.int64)
        self.U_, self.eig_ = kernel_eigen(self.Xz_)
        # kernel (n, n_images) between each presentation's deviation from its image's mean and the means
        dev_kernel = np.empty((len(X), n_images))
        for s in range(0, len(X), 1024):
            dev_kernel[s:s + 1024] = self.deviations(X[s:s + 1024], trial_index[s:s + 1024]) @ self.Xz_.T
        self._set_deviations(dev_kernel)
        return self

    def deviations(self, X: np.ndarray, trial_index: np.ndarray) -> np.ndarray:
        """Z-scored presentations X (m, v) minus their images' mean presentations (averaged fit)."""
        return (np.asarray(X, np.float64) - self.mean_) / self.sd_ - self.Xz_[trial_index]

    def _set_deviations(self, dev_kernel: np.ndarray) -> None:
        """The averaged fit's terms from the kernel (n, n_images) between the presentations' deviations
        from their images' means and the means."""
        trial_index, n_images, n = self.trial_index_, self.n_images_, len(dev_kernel)
        # G = U diag(1 / (eig + alpha)) U' + (I - U U' - 1 1'/n) / alpha (see _group_blocks); the second
        # part is zero unless there are fewer voxels than images
        self.dev_U_ = dev_kernel @ self.U_                                     # (n, r)
        self.dev_U32_ = self.dev_U_.astype(np.float32)
        rows = np.arange(n)
        self.dev_own_U_ = self.dev_U_ * self.U_[trial_index]                  # (n, r): own image's term
        self.perp_diag_ = np.clip(1.0 - (self.U_ ** 2).sum(1) - 1.0 / n_images, 0.0, None)  # diag(I - U U' - 1 1'/n)
        self.dev_perp_, self.dev_own_perp_ = None, np.zeros(n)
        if self.U_.shape[1] < n_images - 1:
            self.dev_perp_ = dev_kernel - self.dev_U_ @ self.U_.T              # (n, n_images)
            self.dev_own_perp_ = self.dev_perp_[rows, trial_index]
        self.trial_sum_ = scipy.sparse.csr_matrix((np.ones(n), (trial_index, rows)), shape=(n_images, n))

    def reweighted(self, column_weights: np.ndarray, K: np.ndarray | None = None,
                   dev_kernel: np.ndarray | None = None) -> "KernelRidgeDecoder":
        """The same fit with the kernel ``Xz diag(column_weights) Xz'`` (a weight per voxel, >= 0).

        ``K`` (n_fit, n_fit): that kernel if already computed (else it is, from the smaller Gram
        matrix); ``dev_kernel`` (n_samples, n_images): for an averaged fit, the weighted kernel between
        the presentations' deviations (:meth:`deviations`) and the image means (required). The
        training data are shared with this decoder, not copied.
        """
        w = np.asarray(column_weights, np.float64)
        new = copy.copy(self)
        new.column_weights_, new.blocks_ = w, None
        if K is None:
            new.U_, new.eig_ = kernel_eigen(self.Xz_ * np.sqrt(w))
        else:
            eig, U = scipy.linalg.eigh(K, driver="evd")
            keep = eig > eig.max() * 1e-10
            new.U_, new.eig_ = U[:, keep], eig[keep]
        if self.averaged_:
            if dev_kernel is None:
                raise ValueError("an averaged fit needs the weighted deviation kernel")
            new._set_deviations(dev_kernel)
        return new

    def image_weights(self) -> np.ndarray:
        """Weights (n_images,) of the images in the fit's centring: presentation shares, or equal when averaged."""
        return self.counts_ / self.counts_.sum()

    def _expand(self, Y_images: np.ndarray) -> np.ndarray:
        return Y_images[self.image_index_]

    def _group_blocks(self) -> dict[int, tuple[np.ndarray, np.ndarray]]:
        """Per group size m: (group rows (g, m), diagonal blocks of G per alpha (a, g, m, m)).

        G = (K + alpha I)^-1 - 1 1^T / (n alpha) = I/alpha + U diag(d) U^T - 1 1^T / (n alpha): the
        last term is the limit of an unpenalised intercept, so that each cross-validation fold is
        centred on its own training rows (without it the centring over all rows leaks the held-out
        image near interpolation). Predictions are unchanged (K 1 = 0). The blocks depend on the
        training data only, so they are computed once for all alphas and reused for every layer.
        """
        if getattr(self, "blocks_", None) is None:
            groups: dict[int, list[np.ndarray]] = {}
            for i in range(self.n_images_):
                g = np.flatnonzero(self.image_index_ == i)
                groups.setdefault(len(g), []).append(g)
            D = np.stack([1.0 / (self.eig_ + a) - 1.0 / a for a in self.alphas], 1)   # (r, a)
            self.blocks_ = {}
            for m, gs in groups.items():
                idx = np.stack(gs)
                out = np.empty((len(self.alphas), len(idx), m, m))
                for s in range(0, len(idx), 256):
                    Ug = self.U_[idx[s:s + 256]]                                      # (c, m, r)
                    pairs = (Ug[:, :, None, :] * Ug[:, None, :, :]).reshape(-1, Ug.shape[-1])
                    out[:, s:s + 256] = (pairs @ D).T.reshape(len(self.alphas), len(Ug), m, m)
                out += (np.eye(m) - 1.0 / len(self.image_index_)) / self.alphas[:, None, None, None]
                self.blocks_[m] = (idx, out)
        return self.blocks_

    def cv_scores(self, Y_images: np.ndarray, n_average: float | None = None) -> np.ndarray:
        """Leave-one-image-out R^2 (averaged over units) for each alpha; Y_images (n_images, k).

        ``n_average`` None: each held-out presentation is predicted on its own (the error is summed
        over training samples). A number R: the expected error when the held-out image's input is
        the average of R presentations, as test data are (:meth:`cv_scores_averaged`).
        """
        return self.cv_scores_averaged(Y_images, [n_average])[0]

    def cv_scores_averaged(self, Y_images: np.ndarray, n_averages: list[float | None]) -> np.ndarray:
        """Leave-one-image-out R^2 (len(n_averages), n_alphas) for inputs averaged over R presentations.

        With residuals r_j (one per held-out presentation j = 1..m of image i) of the z-scored
        targets, the mean residual r_bar = mean_j r_j and the unbiased trial variance
        w = sum_j ||r_j - r_bar||^2 / (m - 1), the expected squared error of a prediction from the
        average of R fresh presentations is ||r_bar||^2 + (1/R - 1/m) w (presentations carry
        independent noise). R = 1 is the single-presentation error, large R the noise-free one.
        Images shown once borrow the mean w of the others; if no image is shown twice, every R
        gives the single-presentation score. Images count equally; R^2 = 1 - error / (n_images var).
        ``None`` in ``n_averages``: the single-presentation error summed over samples (images
        weighted by their presentations).
        """
        Y = self._expand(np.asarray(Y_images, dtype=np.float32))
        Y = Y - Y.mean(0)
        Y /= np.maximum(Y.std(0), 1e-12)
        m = self.trial_counts_
        n_trial = int((m > 1).sum())
        scores = np.empty((len(n_averages), len(self.alphas)))
        for a, (r_bar, dev) in enumerate(self._loo_residuals(Y)):
            sse = (m[:, None] * r_bar ** 2 + dev).sum(0)                          # single presentations
            w = dev[m > 1] / (m[m > 1, None] - 1)                                 # unbiased trial variance
            for j, R in enumerate(n_averages):
                if R is None or n_trial == 0:
                    scores[j, a] = np.mean(1.0 - sse / m.sum())
                    continue
                w_all = np.broadcast_to(w.mean(0), r_bar.shape).copy()            # images shown once borrow the mean
                w_all[m > 1] = w
                err = (r_bar ** 2 + (1.0 / R - 1.0 / m[:, None]) * w_all).sum(0)
                scores[j, a] = np.mean(1.0 - err / self.n_images_)
        return scores

    def _loo_residuals(self, Y: np.ndarray):
        """Leave-one-image-out residuals of targets Y (fit rows, k), one item per penalty: per image,
        the residual of its mean presentation (n_images, k) and the sum over its presentations of
        squared deviations from it (n_images, k). What does not depend on the penalty is done once."""
        shape = (self.n_images_, Y.shape[1])
        if not self.averaged_:
            U = self.U_.astype(np.float32)
            UtY = U.T @ Y
            for a, alpha in enumerate(self.alphas):
                d = (1.0 / (self.eig_ + alpha) - 1.0 / alpha).astype(np.float32)
                GY = Y / np.float32(alpha) + U @ (d[:, None] * UtY)                   # G @ Y
                r_bar, dev = np.empty(shape), np.empty(shape)
                for m, (idx, blk) in self._group_blocks().items():
                    resid = np.linalg.solve(blk[a], GY[idx].astype(np.float64))    # (n_groups, m, k)
                    img = self.image_index_[idx[:, 0]]
                    r_bar[img] = resid.mean(1)
                    dev[img] = ((resid - r_bar[img][:, None]) ** 2).sum(1)
                yield r_bar, dev
            return
        # refit without image i: f_-i(x) = k(x)' c - (k(x)' G e_i) c_i / G_ii, with c = G Y (float64 but
        # for the costly product: float32 there changed the demo subject's scores by under 1e-9)
        Y = np.asarray(Y, np.float64)
        UtY = self.U_.T @ Y
        Y_rest = Y - self.U_ @ UtY                                                # outside the span of U
        U_sq = self.U_ ** 2
        for alpha in self.alphas:
            e = 1.0 / (self.eig_ + alpha)
            GY = self.U_ @ (e[:, None] * UtY) + Y_rest / alpha
            g = U_sq @ e + self.perp_diag_ / alpha                                # diag(G)
            r_bar = GY / g[:, None]
            own = self.dev_own_U_ @ e + self.dev_own_perp_ / alpha                # (k_dev' G)[own image]
            fd = (self.dev_U32_ @ (e[:, None] * UtY).astype(np.float32)
                  - (own / g[self.trial_index_])[:, None] * GY[self.trial_index_])
            if self.dev_perp_ is not None:
                fd += self.dev_perp_ @ Y_rest / alpha
            yield r_bar, self.trial_sum_ @ fd ** 2                               # prediction from each deviation

    def loo_matrices(self, alpha_indices: list[int], image_weights: np.ndarray | None = None) -> np.ndarray:
        """P (a, n_images, n_images): per-unit leave-one-image-out errors as quadratic forms.

        For a unit with targets t (n_images,), centred by the training mean (``image_weights``,
        default: :meth:`image_weights`), its leave-one-image-out sum of squared errors over
        training samples at penalty ``alphas[alpha_indices[a]]`` is ``t' P[a] t`` (the centring is
        folded into P, so P 1 = 0). Cost: one (n, r) x (r, n_images) product per
        penalty, then 2 n_images^2 flops per unit and penalty (:meth:`unit_cv_errors`).
        """
        w = self.image_weights() if image_weights is None else np.asarray(image_weights, np.float64)
        out = np.zeros((len(alpha_indices), self.n_images_, self.n_images_), np.float32)
        for j, operators in enumerate(self._loo_residual_operators(alpha_indices)):
            for M in operators:
                M = M - M.sum(1, keepdims=True) * w[None, :]                    # targets centred: t - 1 w't
                out[j] += M.T @ M
        return out

    def _loo_residual_operators(self, alpha_indices: list[int]):
        """Per penalty ``alphas[a]``, matrices M whose stacked products M t (t: a unit's targets per
        image) are the unit's leave-one-image-out residuals, one row per training presentation (the
        squared error summed over presentations is sum ||M t||^2)."""
        if not self.averaged_:
            n = len(self.image_index_)
            SU = np.zeros((self.n_images_, self.U_.shape[1]))
            np.add.at(SU, self.image_index_, self.U_)                           # S' U (n_images, r)
            for a in alpha_indices:
                alpha = self.alphas[a]
                d = 1.0 / (self.eig_ + alpha) - 1.0 / alpha
                GS = (self.U_ * d) @ SU.T                                       # G S = S / alpha + U D U' S
                GS[np.arange(n), self.image_index_] += 1.0 / alpha
                GS -= self.counts_[None, :] / (n * alpha)                       # the intercept: 1' G 1 = 0
                F = np.empty_like(GS)
                for idx, blk in self._group_blocks().values():                  # residual of each left-out image
                    F[idx] = np.linalg.solve(blk[a], GS[idx])
                yield [F]
            return
        # averaged fit: a presentation's residual is that of its image's mean minus the prediction from its deviation
        rest = np.eye(self.n_images_) - self.U_ @ self.U_.T - 1.0 / self.n_images_
        sqrt_m = np.sqrt(self.trial_counts_)[:, None]
        for a in alpha_indices:
            alpha = self.alphas[a]
            e = 1.0 / (self.eig_ + alpha)
            G = (self.U_ * e) @ self.U_.T + rest / alpha
            g = np.diag(G).copy()
            H = (self.dev_U_ * e) @ self.U_.T                                     # k_dev' G
            if self.dev_perp_ is not None:
                H += self.dev_perp_ / alpha
            own = self.dev_own_U_ @ e + self.dev_own_perp_ / alpha
            H -= (own / g[self.trial_index_])[:, None] * G[self.trial_index_]
            # sum_j ||r_bar - f_j||^2 = m ||r_bar||^2 + sum_j ||f_j||^2 (the deviations sum to zero)
            yield [G / g[:, None] * sqrt_m, H]

    @staticmethod
    def unit_cv_errors(P: np.ndarray, Y_images: np.ndarray, chunk: int = 4096) -> np.ndarray:
        """Leave-one-image-out squared error (a, k) of each unit for each matrix of :meth:`loo_matrices`."""
        P = np.asarray(P, np.float32)
        a, m, _ = P.shape
        out = np.empty((a, Y_images.shape[1]), np.float32)
        flat = P.reshape(a * m, m)
        for s in range(0, Y_images.shape[1], chunk):
            Y = np.asarray(Y_images[:, s:s + chunk], np.float32)
            Y = Y - Y.mean(0)                       # P 1 = 0: any constant shift leaves t' P t unchanged
            out[:, s:s + chunk] = np.einsum("amk,mk->ak", (flat @ Y).reshape(a, m, -1), Y)
        return out

    def choose_alpha(self, Y_images: np.ndarray) -> tuple[float, np.ndarray]:
        """Best alpha and the CV score per alpha, from targets (n_images, k) (a sample of units)."""
        scores = self.cv_scores(Y_images)
        return float(self.alphas[int(np.argmax(scores))]), scores

    def test_weights(self, X_test: np.ndarray, alpha: float) -> np.ndarray:
        """B (n_test, n_images) such that decoded = mean + B @ (Y_images - mean)."""
        Xt = (np.asarray(X_test, dtype=np.float64) - self.mean_) / self.sd_
        if getattr(self, "column_weights_", None) is not None:
            Xt = Xt * self.column_weights_
        Kt = Xt @ self.Xz_.T                                                   # (n_test, n)
        d = 1.0 / (self.eig_ + alpha) - 1.0 / alpha
        A = Kt / alpha + ((Kt @ self.U_) * d) @ self.U_.T                      # Kt G
        B = np.zeros((len(Xt), self.n_images_))
        np.add.at(B.T, self.image_index_, A.T)
        return B

    def target_mean(self, Y_images: np.ndarray) -> np.ndarray:
        """Mean over training samples (images weighted by their presentation count)."""
        w = (self.counts_ / self.counts_.sum()).astype(Y_images.dtype)
        return w @ Y_images

    def target_sd(self, Y_images: np.ndarray, mean: np.ndarray) -> np.ndarray:
        """SD over training samples (ddof=1), in chunks of units."""
        w = (self.counts_ / (self.counts_.sum() - 1)).astype(np.float32)
        out = np.empty(Y_images.shape[1], np.float32)
        for s in range(0, Y_images.shape[1], 65536):
            out[s:s + 65536] = np.sqrt(w @ (Y_images[:, s:s + 65536] - mean[s:s + 65536]) ** 2)
        return out

    def predict(self, B: np.ndarray, Y_images: np.ndarray, mean: np.ndarray | None = None,
                chunk: int = 65536) -> np.ndarray:
        """Decoded units (n_test, k) from test weights ``B`` and training targets (n_images, k), chunked.

        ``mean``: the targets' training mean (k,) if already computed.
        """
        out = np.empty((B.shape[0], Y_images.shape[1]), dtype=np.float32)
        B32 = B.astype(np.float32)
        for s in range(0, Y_images.shape[1], chunk):
            Y = np.asarray(Y_images[:, s:s + chunk], dtype=np.float32)
            mu = self.target_mean(Y) if mean is None else mean[s:s + chunk]
            out[:, s:s + chunk] = mu + B32 @ (Y - mu)
        return out
