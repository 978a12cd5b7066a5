"""Ridge decoders with per-unit voxel selection, giving the predictions of the lab's FastL2LiR.

For each unit k, the ``n_feat`` voxels with the largest |Pearson r| with y_k on the training data are
kept (voxels whose variance (ddof=0) is below 1e-8 count as r = 0), and ridge regression is solved on
them with an added column of ones whose weight, the bias, is penalised like the voxel weights:

    [w_k; b_k] = (A_I' A_I + alpha I)^-1 A_I' y_k,    A = [X 1] (n, v+1),  I = selected voxels + ones

X and Y are used as given: the lab z-scores both with training statistics (ddof=1) before fitting and
de-normalises the predictions afterwards. ``n_feat`` = 0 or >= v keeps every voxel (one solve).
Exact ties in |r| go to the lower voxel index (FastL2LiR's order for them is that of numpy's unstable
argsort); for a constant unit FastL2LiR's r is NaN and its choice arbitrary, here voxels 0..N-1.

How: G = A'A + alpha I (v+1, v+1) is formed once per fit, from centred X plus a rank-one term. Units
are then processed in tasks of a few batches, tasks running in parallel threads: one GEMM gives the
task's voxel-unit correlations, a partition of each row its top voxels; the lower triangles of the
blocks G[I, I] of a batch are gathered into (batch, N+1, N+1) and factorised by a batched Cholesky.
In float32 the correlations that rounding could misorder (those within a bound of the N-th largest)
are recomputed in float64, so the selected voxels are those of a float64 computation.

Memory, for n samples, v voxels, N = n_feat, m test samples, e bytes per element (4 in float32, 8 in
float64), b = batch_size and t = 4 b units per task: G e (v+1)^2; centred X e n v, and 8 n v more in
float32 (for the exact correlations); test data e m v; per thread (4e + 2) t v + (e b + 9) (N+1)^2 of
scratch; the fitted weights (4 + e) N bytes per unit (``fit_predict`` keeps none: its output is
m x units).
"""
from __future__ import annotations

import itertools
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import numpy as np
import scipy.linalg
import torch

LOW_VARIANCE = 1e-8          # voxels with var (ddof=0) below this get r = 0, as in FastL2LiR
TASK_BATCHES = 4             # batches of units per task (CPU)


@contextmanager
def _torch_threads(n: int):
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _cholesky_lower_(A: torch.Tensor, nb: int = 48) -> tuple[torch.Tensor, torch.Tensor]:
    """Batched Cholesky in place: the lower triangle of A (b, n, n) becomes L; the upper one is not read.

    Left-looking by panels of ``nb`` columns, so that most of the work is one batched GEMM per panel
    (faster on CPU than a LAPACK call per matrix at n ~ 500). Returns (A, failed (b,) bool).
    """
    n = A.shape[-1]
    failed = torch.zeros(A.shape[0], dtype=torch.bool, device=A.device)
    for j0 in range(0, n, nb):
        j1 = min(j0 + nb, n)
        P = A[:, j0:, j0:j1]
        if j0:
            P.baddbmm_(A[:, j0:, :j0], A[:, j0:j1, :j0].mT, alpha=-1)
        Ljj, info = torch.linalg.cholesky_ex(P[:, :j1 - j0])
        failed |= info != 0
        P[:, :j1 - j0] = Ljj
        if j1 < n:
            P[:, j1 - j0:] = torch.linalg.solve_triangular(Ljj.mT, P[:, j1 - j0:], upper=True, left=False)
    return A, failed


def _standardised(A: np.ndarray, chunk: int = 65536) -> bool:
    """Whether every non-constant column of A (n, p) has |mean| <= 10 SD (float32 is then accurate)."""
    for s in range(0, A.shape[1], chunk):
        a = np.asarray(A[:, s:s + chunk], np.float64)
        mean, sd = a.mean(0), a.std(0)
        if np.any((np.abs(mean) > 10 * sd) & (sd > 0)):
            return False
    return True


def _scratch(sc: dict, name: str, shape: tuple, dtype, zero: bool = False) -> np.ndarray:
    """A per-thread array reused across tasks (fresh large arrays cost page faults every time)."""
    a = sc.get(name)
    if a is None:
        a = sc[name] = (np.zeros if zero else np.empty)(shape, dtype)
    return a


class VoxelSelectionRidge:
    """FastL2LiR-compatible ridge regression on the top-``n_feat`` voxels of each unit.

    ``fit(X (n, v), Y (n, ...), alpha, n_feat)`` then ``predict(X_test (m, v)) -> (m, ...)``, or
    ``fit_predict`` for both without keeping the weights. Fitted: ``index_`` (units, N) selected
    voxels in ascending order, ``coef_`` (units, N) their weights, ``intercept_`` (units,); ``W``
    (v, units) and ``b`` (1, units) give them in FastL2LiR's dense layout.

    dtype: None (float32, or float64 when a column of X or Y has |mean| > 10 SD), np.float32 or
    np.float64. device: "cpu" or "cuda" (G, the correlation GEMM, block gathers and solves run
    there; the selection stays on the CPU). n_threads: CPU threads (default: the usable cores).
    batch_size: units per batched solve (default 16 on CPU, 256 on CUDA).
    ``timings_``: thread-seconds per stage of the last fit (gram, select, solve, predict).
    """

    def __init__(self, dtype=None, device: str = "cpu", n_threads: int | None = None,
                 batch_size: int | None = None):
        self.dtype = None if dtype is None else np.dtype(dtype)
        self.device = torch.device(device)
        self.n_threads = n_threads or len(os.sched_getaffinity(0))
        self.batch_size = batch_size or (256 if self.device.type == "cuda" else 16)

    # ------------------------------------------------------------------ public API
    def fit(self, X: np.ndarray, Y: np.ndarray, alpha: float = 100.0, n_feat: int = 500) -> "VoxelSelectionRidge":
        X, Y2, shape = self._inputs(X, Y)
        self._prepare(X, Y2, alpha, n_feat)
        k = Y2.shape[1]
        self.index_ = None if self.full_ else np.empty((k, self.n_feat_), np.int32)
        self.coef_ = np.empty((k, self.n_voxels_ if self.full_ else self.n_feat_), self.dtype_)
        self.intercept_ = np.empty(k, self.dtype_)

        def task(s: int, e: int, sc: dict) -> None:
            idx, self.coef_[s:e], self.intercept_[s:e] = self._fit_units(Y2[:, s:e], sc)
            if idx is not None:
                self.index_[s:e] = idx

        self._run(k, task)
        self.unit_shape_ = shape
        self._release()
        return self

    def predict(self, X: np.ndarray) -> np.ndarray:
        """Predictions (m, ...) for X (m, v), in the fitted dtype."""
        Xc = self._test_inputs(X)
        k = len(self.intercept_)
        out = np.empty((len(Xc), k), self.dtype_)

        def task(s: int, e: int, sc: dict) -> None:
            idx = None if self.index_ is None else self.index_[s:e]
            out[:, s:e] = self._predict_units(Xc, idx, self.coef_[s:e], self.intercept_[s:e], sc)

        self._run(k, task)
        return out.reshape((len(Xc),) + self.unit_shape_)

    def fit_predict(self, X: np.ndarray, Y: np.ndarray, X_test: np.ndarray, alpha: float = 100.0,
                    n_feat: int = 500) -> np.ndarray:
        """``fit(X, Y, alpha, n_feat).predict(X_test)``, a task of units at a time: no weights are kept."""
        X, Y2, shape = self._inputs(X, Y)
        self._prepare(X, Y2, alpha, n_feat)
        Xc = self._test_inputs(X_test)
        out = np.empty((len(Xc), Y2.shape[1]), self.dtype_)

        def task(s: int, e: int, sc: dict) -> None:
            out[:, s:e] = self._predict_units(Xc, *self._fit_units(Y2[:, s:e], sc), sc)

        self._run(Y2.shape[1], task)
        self._release()
        return out.reshape((len(Xc),) + shape)

    @property
    def W(self) -> np.ndarray:
        """Dense weights (v, units) as FastL2LiR stores them (zero for unselected voxels)."""
        if self.index_ is None:
            return self.coef_.T.copy()
        W = np.zeros((len(self.coef_), self.n_voxels_), self.dtype_)
        np.put_along_axis(W, self.index_.astype(np.intp), self.coef_, axis=1)
        return W.T

    @property
    def b(self) -> np.ndarray:
        """Biases (1, units)."""
        return self.intercept_[None, :]

    # ------------------------------------------------------------------ set-up
    @staticmethod
    def _inputs(X, Y):
        X, Y = np.asarray(X), np.asarray(Y)
        if X.ndim != 2 or Y.ndim < 2 or len(X) != len(Y):
            raise ValueError(f"X must be (n, v) and Y (n, ...), got {X.shape} and {Y.shape}")
        return X, Y.reshape(len(Y), -1), Y.shape[1:]

    def _prepare(self, X: np.ndarray, Y2: np.ndarray, alpha: float, n_feat: int) -> None:
        """Training statistics, centred X and the Gram matrix G = A'A + alpha I."""
        t0 = time.perf_counter()
        n, v = X.shape
        if n_feat < 0 or alpha < 0:
            raise ValueError("n_feat and alpha must be >= 0")
        self.alpha_, self.n_, self.n_voxels_ = float(alpha), n, v
        self.full_ = n_feat == 0 or n_feat >= v
        self.n_feat_ = v if self.full_ else int(n_feat)
        if self.dtype is not None:
            self.dtype_ = self.dtype
        else:
            self.dtype_ = np.dtype(np.float32 if _standardised(X) and _standardised(Y2) else np.float64)
        dt = self.dtype_
        self.timings_ = dict.fromkeys(("gram", "select", "solve", "predict"), 0.0)

        X64 = np.asarray(X, np.float64)
        self.mean_ = X64.mean(0)
        Xc = X64 - self.mean_
        ss = np.einsum("ij,ij->j", Xc, Xc)
        self.low_ = ss / n < LOW_VARIANCE
        sd = np.sqrt(ss / max(n - 1, 1))
        self.scale_ = np.where(sd > 0, sd, 1.0)
        if self.full_:
            A = np.hstack([X64, np.ones((n, 1))])
            K = A.T @ A if v + 1 <= n else A @ A.T                 # primal if no larger than the dual
            K.flat[:: len(K) + 1] += alpha
            self.A_, self.factor_ = A, scipy.linalg.cho_factor(K, lower=True)
            self.timings_["gram"] += time.perf_counter() - t0
            return
        # float32: the correlations near the selection threshold are recomputed from these (v, n)
        self.XcT_ = np.ascontiguousarray(Xc.T) if dt == np.float32 else None
        self.Xw_ = Xc.astype(dt, copy=False)                       # centred X, working precision
        del Xc, X64
        G = np.empty((v + 1, v + 1), dt)
        np.matmul(self.Xw_.T, self.Xw_, out=G[:v, :v])            # Xc'Xc; X'X = Xc'Xc + n m m'
        m = self.mean_
        if n * (m @ m) > np.finfo(dt).eps * G.diagonal()[:v].max():  # else below G's rounding: skipped
            for r in range(0, v, 1024):
                e = min(r + 1024, v)
                G[r:e, :v] += (n * m[r:e, None] * m[None, :]).astype(dt)
        G[v, :v] = G[:v, v] = n * m
        G[v, v] = n
        G.flat[:: v + 2] += alpha
        if self.device.type == "cuda":
            self.G_ = torch.from_numpy(G).to(self.device)
            self.Xt_ = torch.from_numpy(self.Xw_).to(self.device)
        else:
            self.G_, self.Xt_ = G, torch.from_numpy(self.Xw_)
        self.timings_["gram"] += time.perf_counter() - t0

    def _release(self) -> None:
        for name in ("G_", "Xw_", "Xt_", "XcT_", "A_", "factor_"):
            self.__dict__.pop(name, None)

    def _test_inputs(self, X: np.ndarray) -> np.ndarray:
        X = np.asarray(X, np.float64)
        if X.ndim != 2 or X.shape[1] != self.n_voxels_:
            raise ValueError(f"X_test must be (m, {self.n_voxels_}), got {X.shape}")
        return (X - self.mean_).astype(self.dtype_)                # centred: no cancellation later

    def _task_units(self) -> int:
        return self.batch_size * (1 if self.device.type == "cuda" else TASK_BATCHES)

    def _run(self, k: int, task) -> None:
        """task(s, e, scratch) for units [s, e) in steps of a task; on CPU in ``n_threads`` threads."""
        step = self._task_units()
        if self.device.type == "cuda" or self.full_:
            sc: dict = {}
            for s in range(0, k, step):
                task(s, min(s + step, k), sc)
            self._add_timings(sc)
            return
        starts = itertools.count(0, step)                         # shared: next() is atomic
        stop = threading.Event()

        def worker() -> dict:
            sc: dict = {}
            try:
                for s in starts:
                    if s >= k or stop.is_set():
                        return sc
                    task(s, min(s + step, k), sc)
            except BaseException:
                stop.set()
                raise
            return sc

        with _torch_threads(1), ThreadPoolExecutor(self.n_threads) as pool:
            futures = [pool.submit(worker) for _ in range(self.n_threads)]
            for f in futures:
                self._add_timings(f.result())

    def _add_timings(self, sc: dict) -> None:
        for key in self.timings_:
            self.timings_[key] += sc.get("t_" + key, 0.0)

    # ------------------------------------------------------------------ per task of units
    def _fit_units(self, Y: np.ndarray, sc: dict):
        """(index (t, N) or None, coef (t, N or v), bias (t,)) for targets Y (n, t)."""
        Y = np.asarray(Y, np.float64)
        my = Y.mean(0)
        if self.full_:
            A = self.A_
            if self.factor_[0].shape[0] == self.n_voxels_ + 1:
                Wb = scipy.linalg.cho_solve(self.factor_, A.T @ Y)
            else:
                Wb = A.T @ scipy.linalg.cho_solve(self.factor_, Y)
            return None, Wb[:-1].T.astype(self.dtype_), Wb[-1].astype(self.dtype_)
        t0 = time.perf_counter()
        n, N = self.n_, self.n_feat_
        YcT = np.ascontiguousarray((Y - my).T)                    # (t, n)
        idx, XY = self._select(YcT, sc)
        rhs = np.empty((len(idx), N + 1), self.dtype_)             # A_I' y = [Xc_I' yc + n m_I my; n my]
        rhs[:, :N] = np.take_along_axis(XY, idx, 1) + n * self.mean_[idx] * my[:, None]
        rhs[:, N] = n * my
        t1 = time.perf_counter()
        sol = self._solve_blocks(idx, rhs, sc)
        sc["t_select"] = sc.get("t_select", 0.0) + t1 - t0
        sc["t_solve"] = sc.get("t_solve", 0.0) + time.perf_counter() - t1
        return idx, sol[:, :N], sol[:, N]

    def _select(self, YcT: np.ndarray, sc: dict) -> tuple[np.ndarray, np.ndarray]:
        """Top-N voxel indices (t, N), ascending, by |r|, and Xc'Yc (t, v), for centred YcT (t, n)."""
        n, N, dt, v = self.n_, self.n_feat_, self.dtype_, self.n_voxels_
        t = len(YcT)
        rows = self._task_units()
        XY = _scratch(sc, "XY", (rows, v), dt)[:t]
        Yt = torch.from_numpy(YcT.astype(dt)).to(self.device)
        if self.device.type == "cuda":
            XY[:] = (Yt @ self.Xt_).cpu().numpy()
        else:
            torch.mm(Yt, self.Xt_, out=torch.from_numpy(XY))     # (t, v)
        sy = np.sqrt((YcT ** 2).sum(1) / max(n - 1, 1))
        R = np.abs(XY, out=_scratch(sc, "R", (rows, v), dt)[:t])
        R *= (1.0 / self.scale_).astype(dt)                        # |r| (n - 1) sd_y
        if self.low_.any():
            R[:, self.low_] = 0
        part = _scratch(sc, "part", (rows, v), dt)[:t]
        part[:] = R
        part.partition(v - N, axis=1)
        thr = part[:, v - N]                                       # N-th largest
        # float32 |r| is within (n + 2) 2^-24 of the exact value (Cauchy-Schwarz bound on the
        # rounding of the dot products): only voxels that close to the threshold can be misordered
        delta = 2 * (n + 2) * 2.0 ** -24 * (n - 1) * sy if dt == np.float32 else np.zeros(t)
        certain = np.greater(R, (thr + delta)[:, None], out=_scratch(sc, "certain", (rows, v), bool)[:t])
        unsure = np.greater_equal(R, (thr - delta)[:, None], out=_scratch(sc, "unsure", (rows, v), bool)[:t])
        np.logical_xor(unsure, certain, out=unsure)
        k, j = np.nonzero(unsure)
        if dt == np.float32:                                       # |xc . yc| / sd_x in float64
            r = np.abs(np.einsum("pn,pn->p", self.XcT_[j], YcT[k])) / self.scale_[j]
            r[self.low_[j]] = 0
        else:
            r = R[k, j].astype(np.float64)
        order = np.lexsort((j, -r, k))                             # unit, |r| down, voxel up
        k, j = k[order], j[order]
        rank = np.arange(len(k)) - np.searchsorted(k, k)
        keep = rank < (N - certain.sum(1))[k]
        certain[k[keep], j[keep]] = True
        return np.nonzero(certain)[1].reshape(t, N), XY

    def _solve_blocks(self, idx: np.ndarray, rhs: np.ndarray, sc: dict) -> np.ndarray:
        """Solutions (t, N+1) of G[I, I] x = rhs, I = idx + the ones column, in batches of units."""
        t, N = idx.shape
        v1 = self.n_voxels_ + 1
        I = np.empty((t, N + 1), np.int64)
        I[:, :N] = idx
        I[:, N] = v1 - 1
        out = np.empty((t, N + 1), self.dtype_)
        bs = self.batch_size
        if self.device.type == "cpu":
            blk = _scratch(sc, "blk", (bs, N + 1, N + 1), self.dtype_)
            lin = _scratch(sc, "lin", (N + 1, N + 1), np.int64, zero=True)  # above the diagonal: 0
            row = _scratch(sc, "row", (N + 1,), np.int64)
            if "lower" not in sc:
                sc["lower"] = np.tri(N + 1, dtype=bool)
            lower = sc["lower"]
            Gf = self.G_.reshape(-1)
        for s in range(0, t, bs):
            Ib = I[s:s + bs]
            if self.device.type == "cpu":
                for i, ii in enumerate(Ib):
                    # flat offsets of the lower triangle of G[ii, ii] (the factorisation reads no
                    # more): each row of G is then read only up to its diagonal, ii being ascending
                    np.multiply(ii, v1, out=row)
                    np.add(row[:, None], ii[None, :], out=lin, where=lower)
                    np.take(Gf, lin, out=blk[i], mode="clip")
                L, failed = _cholesky_lower_(torch.from_numpy(blk[:len(Ib)]))
            else:
                It = torch.from_numpy(Ib).to(self.device)
                L, info = torch.linalg.cholesky_ex(self.G_[It[:, :, None], It[:, None, :]])
                failed = info != 0
            r = torch.from_numpy(rhs[s:s + len(Ib), :, None]).to(self.device)
            x = torch.linalg.solve_triangular(L, r, upper=False)
            x = torch.linalg.solve_triangular(L.mT, x, upper=True)[..., 0]
            for i in torch.nonzero(failed).flatten().tolist():    # singular block (alpha = 0)
                blk_i = torch.from_numpy(self.G_[np.ix_(Ib[i], Ib[i])]) if self.device.type == "cpu" \
                    else self.G_[It[i][:, None], It[i]]
                x[i] = torch.linalg.lstsq(blk_i, r[i]).solution[:, 0]
            out[s:s + len(Ib)] = x.cpu().numpy()
        return out

    def _predict_units(self, Xc: np.ndarray, idx, coef: np.ndarray, bias: np.ndarray, sc: dict) -> np.ndarray:
        """Predictions (m, t) from centred test data Xc (m, v): Xc W + (b + mean . w)."""
        t0 = time.perf_counter()
        if idx is None:
            out = Xc @ coef.T + (bias + coef.astype(np.float64) @ self.mean_).astype(self.dtype_)
        else:
            t = len(coef)
            W = _scratch(sc, "W", (self.n_voxels_, self._task_units()), self.dtype_, zero=True)
            cols = np.arange(t)[:, None]
            W[idx, cols] = coef                                    # sparse weights of these units only
            out = (torch.from_numpy(Xc) @ torch.from_numpy(W)[:, :t]).numpy()
            W[idx, cols] = 0
            offset = bias + np.einsum("kn,kn->k", coef.astype(np.float64), self.mean_[idx])
            out += offset.astype(self.dtype_)
        sc["t_predict"] = sc.get("t_predict", 0.0) + time.perf_counter() - t0
        return out
