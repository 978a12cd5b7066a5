"""Decoder benchmark, run on demand (not a test).

Same simulated data, one command, each measurement in its own subprocess (so that its peak memory is
its own): brainrecon's VoxelSelectionRidge against PyFastL2LiR (top-N voxels per unit, ridge), and
brainrecon's KernelRidgeDecoder against himalaya's KernelRidge with the numpy backend (all voxels).
Timings are the minimum over ``--repeats`` runs. Needs an environment where fastl2lir works (numpy
< 2.4) and himalaya is installed: see bench/README.md.

Data: voxels driven by a few latent sources plus noise; units a rank-``--rank`` linear map of the
voxels plus noise of the same variance; a test set from the same model. X and Y are z-scored with
training statistics (ddof=1), as in the lab's pipeline. Accuracy: mean over units of the correlation,
across test samples, between decoded and true unit activity (profile correlation).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

from _machine import cpu_name   # bench/ is the script's folder, first on sys.path

import numpy as np

WORKERS = ("selection_brainrecon", "selection_brainrecon_f64", "selection_fastl2lir",
           "selection_fastl2lir_setup", "kernel_brainrecon", "kernel_himalaya", "rates", "solvers")


def make_data(out: Path, n: int, v: int, units: int, m: int, rank: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    S = rng.standard_normal((n + m, 40))
    X = 0.5 * S @ rng.standard_normal((40, v)) + rng.standard_normal((n + m, v))
    signal = X @ (rng.standard_normal((v, rank)) / np.sqrt(v)) @ rng.standard_normal((rank, units))
    signal /= signal[:n].std(0)
    Y = signal + rng.standard_normal((n + m, units))
    mx, sx = X[:n].mean(0), X[:n].std(0, ddof=1)
    my, sy = Y[:n].mean(0), Y[:n].std(0, ddof=1)
    X, Y = ((X - mx) / sx).astype(np.float32), ((Y - my) / sy).astype(np.float32)
    for name, a in (("X", X[:n]), ("Y", Y[:n]), ("Xt", X[n:]), ("Yt", Y[n:])):
        np.save(out / f"{name}.npy", a)


def maxrss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def worker(name: str, data: Path, repeats: int, args) -> dict:
    if name == "rates":
        return rates(args)
    if name == "solvers":
        return solvers(args)
    # every worker loads torch first, so that its libraries do not count in the peak memory above the data
    import torch  # noqa: F401

    from brainrecon.decode.ridge import KernelRidgeDecoder
    from brainrecon.decode.selection import VoxelSelectionRidge
    if name.startswith("selection_fastl2lir"):
        import fastl2lir
    if name == "kernel_himalaya":
        from himalaya.backend import set_backend
        from himalaya.kernel_ridge import KernelRidge
        set_backend("numpy")
    X, Y, Xt = (np.load(data / f"{k}.npy") for k in ("X", "Y", "Xt"))
    if name == "selection_fastl2lir_setup":
        Y = Y[:, :args.setup_units]
    before = maxrss_mb()
    info: dict = {}
    if name in ("selection_brainrecon", "selection_brainrecon_f64"):
        dtype = np.float64 if name.endswith("f64") else None

        def run():
            model = VoxelSelectionRidge(dtype=dtype)
            pred = model.fit_predict(X, Y, Xt, alpha=args.alpha, n_feat=args.n_feat)
            info.setdefault("timings", []).append(model.timings_)
            info["dtype"] = str(model.dtype_)
            return pred
    elif name.startswith("selection_fastl2lir"):
        def run():
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                model = fastl2lir.FastL2LiR().fit(X, Y, alpha=args.alpha, n_feat=args.n_feat)
            return model.predict(Xt)
    elif name == "kernel_brainrecon":
        def run():
            dec = KernelRidgeDecoder(alphas=np.array([args.ridge_alpha])).fit(X, np.arange(len(X)))
            return dec.predict(dec.test_weights(Xt, args.ridge_alpha), Y)
    elif name == "kernel_himalaya":
        def run():
            return KernelRidge(alpha=args.ridge_alpha, kernel="linear").fit(X, Y).predict(Xt)
    else:
        raise ValueError(name)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        pred = run()
        times.append(time.perf_counter() - t)
    np.save(data / f"pred_{name}.npy", np.asarray(pred, np.float64))
    return {"seconds": min(times), "all_seconds": times, "units": Y.shape[1],
            "peak_rss_mb": maxrss_mb(), "peak_above_data_mb": maxrss_mb() - before, **info}


def rates(args) -> dict:
    """GEMM throughput (GFLOP/s) behind the projection to larger problems."""
    import torch

    rng = np.random.default_rng(0)
    n, v = args.samples, args.voxels
    def best(f):
        times = []
        for _ in range(3):
            t = time.perf_counter()
            f()
            times.append(time.perf_counter() - t)
        return min(times)

    out = {}
    for dt, tag in ((np.float32, "32"), (np.float64, "64")):
        Z = rng.standard_normal((n, v)).astype(dt)
        out["gram" + tag] = n * v * v / best(lambda: Z.T @ Z) / 1e9          # symmetric: n v^2 flops
        Yt = rng.standard_normal((512, n)).astype(dt)
        out["gemm" + tag] = 2 * 512 * n * v / best(lambda: Yt @ Z) / 1e9
    torch.set_num_threads(1)
    Zt, Ytt = torch.from_numpy(Z.astype(np.float32)), torch.from_numpy(Yt.astype(np.float32))
    out["gemm32_one_thread"] = 2 * 512 * n * v / best(lambda: Ytt @ Zt) / 1e9
    return out


def solvers(args) -> dict:
    """ms per (N+1) x (N+1) SPD system in batches of 16, one thread, for the batched-solve choice."""
    import torch
    from threadpoolctl import threadpool_limits

    from brainrecon.decode.selection import _cholesky_lower_

    torch.set_num_threads(1)
    N, b = args.n_feat + 1, 16
    M = np.random.default_rng(0).standard_normal((b, N, args.samples)).astype(np.float32)
    A = M @ M.transpose(0, 2, 1) + 100 * np.eye(N, dtype=np.float32)
    r = np.ones((b, N, 1), np.float32)
    At, rt = torch.from_numpy(A), torch.from_numpy(r)

    def two_triangular(L):
        return torch.linalg.solve_triangular(L.mT, torch.linalg.solve_triangular(L, rt, upper=False), upper=True)

    copies = [At.clone() for _ in range(3)]                   # factorised in place: a fresh copy per run

    cases = {
        "numpy solve (LU)": lambda: np.linalg.solve(A, r),
        "numpy cholesky (factor only)": lambda: np.linalg.cholesky(A),
        "numpy solve float64 (as fastl2lir)": lambda: np.linalg.solve(A.astype(np.float64), r.astype(np.float64)),
        "torch cholesky + cholesky_solve": lambda: torch.cholesky_solve(rt, torch.linalg.cholesky(At)),
        "torch cholesky + 2 solve_triangular": lambda: two_triangular(torch.linalg.cholesky(At)),
        "brainrecon blocked cholesky + 2 solve_triangular": lambda: two_triangular(_cholesky_lower_(copies.pop())[0]),
    }
    out = {}
    with threadpool_limits(1):
        for name, f in cases.items():
            best = np.inf
            for _ in range(3):
                t = time.perf_counter()
                f()
                best = min(best, time.perf_counter() - t)
            out[name] = 1e3 * best / b
    return out


def profile_corr(pred: np.ndarray, true: np.ndarray) -> float:
    p, t = pred - pred.mean(0), true - true.mean(0)
    return float(np.mean((p * t).sum(0) / np.sqrt((p ** 2).sum(0) * (t ** 2).sum(0))))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--samples", type=int, default=1200)
    ap.add_argument("--voxels", type=int, default=8000)
    ap.add_argument("--units", type=int, default=3000)
    ap.add_argument("--test", type=int, default=50, help="test samples")
    ap.add_argument("--rank", type=int, default=20, help="rank of the voxel-to-unit map")
    ap.add_argument("--n-feat", type=int, default=500)
    ap.add_argument("--alpha", type=float, default=100.0, help="ridge penalty of the voxel-selection decoders")
    ap.add_argument("--ridge-alpha", type=float, default=1e4, help="penalty of the all-voxel kernel ridge decoders")
    ap.add_argument("--setup-units", type=int, default=100,
                    help="units of the extra fastl2lir run that splits set-up from per-unit time")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--kernel-blas-threads", type=int, default=1,
                    help="BLAS threads of the kernel-ridge workers (0: library default). Multi-threaded "
                         "OpenBLAS eigh can spin-wait for minutes when the cores are shared with other work")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, help="write all results here")
    ap.add_argument("--worker", choices=WORKERS, help=argparse.SUPPRESS)
    ap.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.data, args.repeats, args)))
        return

    load = [os.getloadavg()[0]]
    results: dict = {"args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                     "machine": {"cpus": len(os.sched_getaffinity(0)), "processor": cpu_name(),
                                 "python": platform.python_version(), "numpy": np.__version__}}
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp)
        make_data(data, args.samples, args.voxels, args.units, args.test, args.rank, args.seed)
        for name in WORKERS:
            cmd = [sys.executable, __file__, "--worker", name, "--data", str(data)]
            for key in ("samples", "voxels", "n_feat", "alpha", "ridge_alpha", "setup_units", "repeats"):
                cmd += ["--" + key.replace("_", "-"), str(getattr(args, key))]
            env = dict(os.environ)
            if name.startswith("kernel_") and args.kernel_blas_threads:
                for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
                    env[var] = str(args.kernel_blas_threads)
            print(f"running {name} ...", file=sys.stderr, flush=True)
            done = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if done.returncode:
                results[name] = {"error": done.stderr.strip().splitlines()[-1]}
                print(done.stderr, file=sys.stderr)
                continue
            results[name] = json.loads(done.stdout.strip().splitlines()[-1])
            load.append(os.getloadavg()[0])
        Yt = np.load(data / "Yt.npy")
        preds = {p.stem[5:]: np.load(p) for p in data.glob("pred_*.npy")}
    for name, p in preds.items():
        if not name.endswith("_setup"):
            results[name]["profile_corr"] = profile_corr(p, Yt)
    for a, b in (("selection_brainrecon", "selection_fastl2lir"), ("selection_brainrecon_f64", "selection_fastl2lir"),
                 ("kernel_brainrecon", "kernel_himalaya")):
        if a in preds and b in preds:
            results[a]["max_abs_diff_vs_" + b] = float(np.abs(preds[a] - preds[b]).max())
            results[a]["max_abs_pred"] = float(np.abs(preds[b]).max())
    results["load_average_1min"] = load
    text = report(results)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    print(text)


def projection(res: dict, units: float = 15.4e6, n: int = 6000, fits: int = 19,
               voxels: tuple = (10_000, 20_000, 50_000)) -> str:
    """Paper workload from the measured split: the per-unit correlation GEMMs and the set-up Gram
    matrix scale with n v and n v^2 at the measured GEMM rates; the rest per unit (selection, gathers
    and N^3 factorisations) is taken as independent of n and v. One fit (one Gram matrix) per layer."""
    sp, rt, a = res["split"], res["rates"], res["args"]
    n0, v0, threads = a["samples"], a["voxels"], res["machine"]["cpus"]
    ours_gemm = lambda n, v: 2 * n * v / (rt["gemm32_one_thread"] * 1e9 * threads)   # in the worker threads
    lab_gemm = lambda n, v: 4 * n * v / (rt["gemm64"] * 1e9)                        # corrmat and Y'X, float64
    rows = ["| voxels | brainrecon: Gram per fit | per unit | total | fastl2lir: X'X per fit | per unit | total | speed-up |",
            "|---|---|---|---|---|---|---|---|"]
    for v in voxels:
        o_fit, l_fit = n * v * v / (rt["gram32"] * 1e9), n * v * v / (rt["gram64"] * 1e9)
        o_unit = sp["ours_unit_s"] - ours_gemm(n0, v0) + ours_gemm(n, v)
        l_unit = sp["lab_unit_s"] - lab_gemm(n0, v0) + lab_gemm(n, v)
        o_tot, l_tot = fits * o_fit + units * o_unit, fits * l_fit + units * l_unit
        rows.append(f"| {v:,} | {o_fit:.0f} s | {1e3 * o_unit:.2f} ms | {o_tot / 3600:.1f} h | {l_fit:.0f} s | "
                    f"{1e3 * l_unit:.2f} ms | {l_tot / 3600:.1f} h | {l_tot / o_tot:.1f}x |")
    return (f"Projection: {units / 1e6:.1f} M units, {n:,} samples, {fits} fits (one per layer), "
            f"{threads} cores:\n\n" + "\n".join(rows))


def report(res: dict) -> str:
    """Markdown: the table, and the per-unit and set-up split behind the projection."""
    a = res["args"]
    rows = ["| decoder | implementation | s total | s per 1,000 units | peak RSS MB (above data) | profile r | max abs diff |",
            "|---|---|---|---|---|---|---|"]
    top = f"top-{a['n_feat']} voxels, ridge"
    labels = {"selection_brainrecon": (top, "brainrecon VoxelSelectionRidge (float32)"),
              "selection_brainrecon_f64": (top, "brainrecon VoxelSelectionRidge (float64)"),
              "selection_fastl2lir": (top, "fastl2lir 0.11"),
              "kernel_brainrecon": ("all voxels, ridge", "brainrecon KernelRidgeDecoder"),
              "kernel_himalaya": ("all voxels, ridge", "himalaya KernelRidge (numpy)")}
    for key, (kind, impl) in labels.items():
        r = res.get(key, {})
        if "seconds" not in r:
            rows.append(f"| {kind} | {impl} | {r.get('error', 'not run')} | | | | |")
            continue
        diff = next((f"{v:.1e}" for k, v in r.items() if k.startswith("max_abs_diff")), "")
        rows.append(f"| {kind} | {impl} | {r['seconds']:.2f} | {1000 * r['seconds'] / r['units']:.2f} | "
                    f"{r['peak_rss_mb']:.0f} ({r['peak_above_data_mb']:.0f}) | {r.get('profile_corr', float('nan')):.3f} | {diff} |")
    out = ["\n".join(rows)]
    ours, lab, setup = (res.get(k, {}) for k in
                        ("selection_brainrecon", "selection_fastl2lir", "selection_fastl2lir_setup"))
    if "seconds" in ours and "seconds" in lab and "seconds" in setup:
        gram = min(t["gram"] for t in ours["timings"])
        ours_unit = (ours["seconds"] - gram) / ours["units"]
        lab_unit = (lab["seconds"] - setup["seconds"]) / (lab["units"] - setup["units"])
        lab_setup = setup["seconds"] - setup["units"] * lab_unit
        out.append(f"\nSplit: brainrecon set-up (Gram matrix) {gram:.2f} s, then {1e3 * ours_unit:.2f} ms per unit; "
                   f"fastl2lir set-up about {lab_setup:.2f} s, then {1e3 * lab_unit:.2f} ms per unit "
                   f"(from its {setup['units']}-unit and {lab['units']}-unit runs). "
                   f"Speed-up: {lab['seconds'] / ours['seconds']:.1f}x "
                   f"overall, {lab_unit / ours_unit:.1f}x per unit.")
        res["split"] = {"ours_gram_s": gram, "ours_unit_s": ours_unit, "lab_setup_s": lab_setup, "lab_unit_s": lab_unit}
    if "rates" in res and "error" not in res["rates"]:
        out.append("\nGEMM GFLOP/s: " + ", ".join(f"{k} {v:.0f}" for k, v in res["rates"].items()))
        if "split" in res:
            out.append("\n" + projection(res))
    if "solvers" in res and "error" not in res["solvers"]:
        out.append(f"\nms per {a['n_feat'] + 1}x{a['n_feat'] + 1} system (batches of 16, one thread): "
                   + "; ".join(f"{k} {v:.2f}" for k, v in res["solvers"].items()))
    out.append(f"\n1-min load average during the run: {', '.join(f'{x:.1f}' for x in res['load_average_1min'])}")
    return "\n".join(out)


if __name__ == "__main__":
    main()
