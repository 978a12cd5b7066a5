"""The four measurements of ``bench/gpu_check.py``, each a function that returns a typed record.

Every step takes the plan (sizes and device, :class:`gpu_check.Plan`) and a ``save(record)``
callback, which it calls after each finished measurement: a step stopped at its time limit still
leaves what it had measured. The records are dataclasses, flattened to JSON by the caller.

1. :func:`step_agreement`: the test suite's CUDA tests, and every prior and both decoders on the
   device against the same computation on the CPU.
2. :func:`step_selection`: voxel-selection decoding on the device against fastl2lir 0.11.
3. :func:`step_recon`: reconstruction per image-iteration by batch and precision, against bdpy's
   iCNN, and as a share of the measured matrix rate.
4. :func:`step_workload`: ``brainrecon simulate`` + the whole pipeline on the simulated subject.
"""
from __future__ import annotations

import contextlib
import copy
import inspect
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
# torch's own TF32 settings as found at start ("default" precision below)
DEFAULT_TF32 = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
FLOAT32_TOL = 1e-4     # relative difference (||a - b|| / ||b||) accepted as float32 agreement
TF32_TOL = 1e-2        # the same through 13 convolutions in TF32 (10-bit mantissa)


# ----------------------------------------------------------------------------- shared helpers
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device):
    """(fn(), seconds), the device synchronised before and after."""
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return out, time.perf_counter() - t0


def differences(a, b) -> tuple[float, float]:
    """(max |a - b|, ||a - b|| / ||b||) in float64; b is the reference."""
    a = np.asarray(a.detach().cpu() if isinstance(a, torch.Tensor) else a, np.float64)
    b = np.asarray(b.detach().cpu() if isinstance(b, torch.Tensor) else b, np.float64)
    d = a - b
    ref = float(np.linalg.norm(b))
    rel = float(np.linalg.norm(d)) / ref if ref > 0 else float(np.linalg.norm(d))
    return float(np.abs(d).max()) if d.size else 0.0, rel


@contextlib.contextmanager
def precision(mode: str):
    """TF32 switches for ``mode``: "float32" and "bf16" (the network under autocast, see
    :class:`AutocastNetwork`) turn TF32 off, "tf32" on, "default" keeps torch's settings as
    found at start (cuDNN convolutions in TF32, matrix products not). Both switches are no-ops
    on the CPU."""
    flags = {"float32": (False, False), "bf16": (False, False), "tf32": (True, True), "default": DEFAULT_TF32}[mode]
    old = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")          # newer torch suggests its fp32_precision settings
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = flags
    try:
        yield
    finally:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


class AutocastNetwork(nn.Module):
    """The network run under ``torch.autocast`` (bf16), its features returned in float32: only the
    encoder's convolutions go to bf16; the loss and the image update stay in float32."""

    def __init__(self, net: nn.Module, device_type: str, dtype: torch.dtype = torch.bfloat16):
        super().__init__()
        self.net, self.device_type, self.dtype = net, device_type, dtype

    def forward(self, images: torch.Tensor, layers: list[str]) -> dict[str, torch.Tensor]:
        with torch.autocast(self.device_type, dtype=self.dtype):
            out = self.net(images, layers)
        return {k: v.float() for k, v in out.items()}


def natural_targets(network, n: int, size: int, device: torch.device) -> dict[str, torch.Tensor]:
    """Features {layer: (n, ...)} on ``device`` of ``n`` natural images (crops of the project's sources)."""
    from brainrecon.data.natural import natural_images

    train, _ = natural_images(n, 1, size)
    with torch.inference_mode():
        feats = network(torch.from_numpy(train.images).to(device), network.layer_names)
    return {k: v.clone() for k, v in feats.items()}


def on_device(module: nn.Module, device: torch.device) -> nn.Module:
    return module if device.type == "cpu" else copy.deepcopy(module).to(device)


# ----------------------------------------------------------------------------- 1. agreement
@dataclass
class TestOutcome:
    name: str
    outcome: str            # passed, failed, error, skipped
    message: str = ""


@dataclass
class PytestRun:
    command: str
    passed: int = 0
    failed: int = 0
    skipped: int = 0
    errors: int = 0
    seconds: float = 0.0
    tests: list[TestOutcome] = field(default_factory=list)
    note: str = ""


@dataclass
class Comparison:
    """One computation on the device against the same computation on the CPU."""
    name: str
    status: str = "ok"                    # ok, no device path, skipped, error
    max_abs_diff: float | None = None
    rel_diff: float | None = None         # ||device - cpu|| / ||cpu||
    tolerance: float | None = None        # on rel_diff
    within_tolerance: bool | None = None
    device_seconds: float | None = None
    cpu_seconds: float | None = None
    note: str = ""

    def judge(self, a, ref, tol: float) -> "Comparison":
        self.max_abs_diff, self.rel_diff = differences(a, ref)
        self.tolerance = tol
        self.within_tolerance = bool(np.isfinite(self.rel_diff) and self.rel_diff <= tol)
        return self


@dataclass
class AgreementResult:
    device: str
    precision: str = "float32 (TF32 off) unless a row says otherwise"
    pytest: PytestRun | None = None
    comparisons: list[Comparison] = field(default_factory=list)


def run_cuda_tests(timeout: float) -> PytestRun:
    """``pytest tests -k cuda`` (the suite's CUDA tests; they skip themselves without CUDA)."""
    with tempfile.TemporaryDirectory() as tmp:
        xml = Path(tmp) / "junit.xml"
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests", "-k", "cuda",
               "--continue-on-collection-errors", "-rs", f"--junitxml={xml}"]
        run = PytestRun(command="python -m pytest tests -k cuda")
        t0 = time.perf_counter()
        try:
            done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            run.note = f"timed out after {timeout:.0f} s"
            return run
        run.seconds = round(time.perf_counter() - t0, 2)
        print(done.stdout[-4000:], done.stderr[-2000:], flush=True)
        if not xml.exists():
            run.note = f"pytest exited {done.returncode} without a report: {(done.stdout + done.stderr)[-300:]}"
            return run
        for case in ET.parse(xml).getroot().iter("testcase"):
            name = f"{case.get('classname', '')}::{case.get('name', '')}"
            outcome, message = "passed", ""
            for tag in ("failure", "error", "skipped"):
                node = case.find(tag)
                if node is not None:
                    outcome = {"failure": "failed"}.get(tag, tag)
                    message = (node.get("message") or node.text or "")[:300]
                    break
            run.tests.append(TestOutcome(name, outcome, message))
        for t in run.tests:
            key = {"passed": "passed", "failed": "failed", "error": "errors", "skipped": "skipped"}[t.outcome]
            setattr(run, key, getattr(run, key) + 1)
        if not run.tests:
            run.note = f"no test selected (pytest exit {done.returncode})"
        return run


def _loss_gradient(network, targets, images):
    from brainrecon.recon.objective import FeatureLoss

    x = images.clone().requires_grad_(True)
    loss = FeatureLoss(network, targets)(x).sum()
    (grad,) = torch.autograd.grad(loss, x)
    return grad


def compare_gradient(name: str, mode: str, tol: float, nets, targets, images, dev) -> Comparison:
    """The feature loss and its gradient with respect to the image (what every prior's step needs)."""
    cmp = Comparison(name)
    with precision(mode):
        ref, cmp.cpu_seconds = timed(lambda: _loss_gradient(nets["cpu"], targets["cpu"], images), torch.device("cpu"))
        out, cmp.device_seconds = timed(lambda: _loss_gradient(nets["dev"], targets["dev"], images.to(dev)), dev)
    return cmp.judge(out, ref, tol)


def compare_prior(prior: str, plan, nets, gens, targets, dev) -> Comparison:
    """One reconstruct batch of ``prior`` on both devices from the same start state."""
    from brainrecon.recon.icnn import ReconConfig, make_prior

    # the Fourier prior's random transforms draw from the device's random stream, which differs
    # between CPU and CUDA by design: set to zero here, so both runs compute the same thing
    cfg = ReconConfig(prior=prior, iterations=plan.agree_iterations, batch_size=plan.agree_images,
                      augment={"jitter": 0.0, "scale": 0.0, "rotate": 0.0})
    cmp = Comparison(f"prior {prior} ({plan.agree_iterations} iterations, {plan.agree_images} images, "
                     f"{plan.agree_size} px)")

    def run(key: str, device: torch.device, state: dict | None):
        p = make_prior(targets[key], nets[key], plan.agree_size, cfg.model_copy(update={"device": str(device)}),
                       seed=0, generator=gens[key] if prior == "generator" else None)
        if state is not None:
            p.load_state_dict(state)          # the generator prior draws its start on the device
        start = copy.deepcopy(p.state_dict())
        _, secs = timed(lambda: p.run(0, lambda it: None), device)
        return p.images().detach().cpu(), start, secs

    with precision("float32"):
        ref, start, cmp.cpu_seconds = run("cpu", torch.device("cpu"), None)
        out, _, cmp.device_seconds = run("dev", dev, start)
    cmp.note = "start state copied from the CPU run" + ("; random transforms off" if prior == "fourier" else "")
    return cmp.judge(out, ref, FLOAT32_TOL)


def _selection_data(n: int, v: int, units: int, m: int, rank: int = 20, seed: int = 0):
    """X (n, v), Y (n, units), Xt (m, v), Yt: bench_decoders.py's simulated data."""
    from bench_decoders import make_data

    with tempfile.TemporaryDirectory() as tmp:
        make_data(Path(tmp), n, v, units, m, rank, seed)
        return tuple(np.load(Path(tmp) / f"{k}.npy") for k in ("X", "Y", "Xt", "Yt"))


def compare_selection(plan, dev) -> Comparison:
    from brainrecon.decode.selection import VoxelSelectionRidge

    n, v, units, n_feat, m = plan.agree_selection
    X, Y, Xt, _ = _selection_data(n, v, units, m)
    cmp = Comparison(f"VoxelSelectionRidge fit + predict ({n} x {v} voxels, {units} units, top {n_feat})")
    fit = lambda device: VoxelSelectionRidge(device=device).fit(X, Y, alpha=100.0, n_feat=n_feat)
    cpu_model, cmp.cpu_seconds = timed(lambda: fit("cpu"), torch.device("cpu"))
    dev_model, cmp.device_seconds = timed(lambda: fit(str(dev)), dev)
    cmp.judge(dev_model.predict(Xt), cpu_model.predict(Xt), FLOAT32_TOL)
    same = bool(np.array_equal(dev_model.index_, cpu_model.index_))
    cmp.note = f"float32; selected voxels identical: {same}"
    cmp.within_tolerance = bool(cmp.within_tolerance and same)
    return cmp


def compare_kernel_ridge(plan, dev) -> Comparison:
    """KernelRidgeDecoder on the device, if it has a device argument; else recorded as having none."""
    from brainrecon.decode.ridge import KernelRidgeDecoder

    name = "KernelRidgeDecoder fit + test_weights + predict"
    if "device" not in inspect.signature(KernelRidgeDecoder).parameters:
        return Comparison(name, status="no device path",
                          note="numpy/scipy only (no device argument): it runs on the CPU in every run")
    n, v, units, _, m = plan.agree_selection
    X, Y, Xt, _ = _selection_data(n, v, units, m)
    image_index = np.arange(n)

    def run(device):
        dec = KernelRidgeDecoder(alphas=np.array([1e3]), device=device).fit(X, image_index)
        return dec.predict(dec.test_weights(Xt, 1e3), Y)

    cmp = Comparison(name)
    ref, cmp.cpu_seconds = timed(lambda: run("cpu"), torch.device("cpu"))
    out, cmp.device_seconds = timed(lambda: run(str(dev)), dev)
    return cmp.judge(out, ref, FLOAT32_TOL)


def streaming_note() -> Comparison:
    from brainrecon.decode import streaming

    name = "decode.streaming (training features, streamed read-out)"
    params = set(inspect.signature(streaming.training_pass).parameters) | set(
        inspect.signature(streaming.readout_stream).parameters)
    if "device" in params:
        return Comparison(name, status="skipped", note="has a device argument: not compared by this script yet")
    return Comparison(name, status="no device path",
                      note="inputs are built on the CPU (torch.from_numpy) and the pipeline passes its CPU network")


def step_agreement(plan, save, timeout: float) -> AgreementResult:
    """Every computation on the device against the CPU, then the suite's CUDA tests in the time left."""
    from brainrecon.nets import load_network
    from brainrecon.nets.generator import load_generator
    from brainrecon.recon.config import PRIORS

    deadline = time.perf_counter() + timeout - 5
    dev = torch.device(plan.device)
    rec = AgreementResult(device=str(dev))
    net, gen = load_network("hed-vgg16"), load_generator("builtin")
    nets, gens = {"cpu": net, "dev": on_device(net, dev)}, {"cpu": gen, "dev": on_device(gen, dev)}
    targets = {"cpu": natural_targets(net, plan.agree_images, plan.agree_size, torch.device("cpu"))}
    targets["dev"] = {k: v.to(dev) for k, v in targets["cpu"].items()}
    size = plan.agree_size
    images = torch.rand(plan.agree_images, 3, size, size, generator=torch.Generator().manual_seed(1))
    _loss_gradient(nets["dev"], targets["dev"], images.to(dev))    # warm-up: CUDA context, cuDNN plans
    gradient = lambda name, mode, tol: (name, lambda: compare_gradient(name, mode, tol, nets, targets, images, dev))
    jobs = [gradient("feature loss gradient, float32", "float32", FLOAT32_TOL),
            gradient("feature loss gradient, torch defaults (cuDNN TF32)", "default", TF32_TOL)]
    jobs += [(f"prior {p}", lambda p=p: compare_prior(p, plan, nets, gens, targets, dev)) for p in PRIORS]
    jobs += [("VoxelSelectionRidge", lambda: compare_selection(plan, dev)),
             ("KernelRidgeDecoder", lambda: compare_kernel_ridge(plan, dev)),
             ("decode.streaming", streaming_note)]
    for name, job in jobs:
        try:
            rec.comparisons.append(job())
        except Exception as err:  # noqa: BLE001 - one failing computation must not stop the others
            rec.comparisons.append(Comparison(name, status="error", note=f"{type(err).__name__}: {err}"[:300]))
        save(rec)
    rec.pytest = run_cuda_tests(min(plan.pytest_timeout, deadline - time.perf_counter()))
    return rec


# ----------------------------------------------------------------------------- 2. selection
@dataclass
class DecoderRun:
    implementation: str
    device: str
    units: int
    seconds: float
    per_1000_units: float
    stage_seconds: dict = field(default_factory=dict)   # brainrecon's timings_ (thread-seconds)
    note: str = ""


@dataclass
class SelectionResult:
    samples: int
    voxels: int
    units: int
    n_feat: int
    alpha: float
    test_samples: int
    runs: list[DecoderRun] = field(default_factory=list)
    device_vs_cpu_max_abs_diff: float | None = None
    fastl2lir_status: str = "not run"
    fastl2lir_shim: bool = False
    fastl2lir_setup_s: float | None = None
    fastl2lir_per_unit_s: float | None = None
    fastl2lir_projected_s: float | None = None       # at ``units``, from the two measured runs
    speedup_vs_fastl2lir: float | None = None
    max_abs_diff_vs_fastl2lir: float | None = None
    max_abs_pred: float | None = None
    compared_units: int = 0


class _SolveRavel:
    """numpy.linalg with ``solve`` returning a flat vector for a one-column right-hand side."""

    def __init__(self, linalg):
        self._linalg = linalg

    def __getattr__(self, name):
        return getattr(self._linalg, name)

    def solve(self, a, b):
        x = self._linalg.solve(a, b)
        return x.ravel() if x.ndim == 2 and x.shape[1] == 1 else x


class _NumpyWithFlatSolve:
    def __init__(self, np_module):
        self._np, self.linalg = np_module, _SolveRavel(np_module.linalg)

    def __getattr__(self, name):
        return getattr(self._np, name)


def shim_fastl2lir(module) -> None:
    """Make fastl2lir 0.11's voxel selection run on numpy >= 2.4: it assigns elements of the
    (N+1, 1) solution to single entries of its weight matrix, which numpy 2.4 refuses; here its
    ``np.linalg.solve`` returns that solution as a flat vector (a view: same LAPACK call, same cost)."""
    import fastl2lir.fastl2lir as impl

    if not isinstance(impl.np, _NumpyWithFlatSolve):
        impl.np = _NumpyWithFlatSolve(impl.np)


def _fastl2lir_problem(module) -> str:
    """Why fastl2lir's voxel selection fails on a small problem here, or "" if it runs."""
    rng = np.random.default_rng(0)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            module.FastL2LiR().fit(rng.standard_normal((30, 40)), rng.standard_normal((30, 2)), alpha=1.0, n_feat=5)
    except Exception as err:  # noqa: BLE001
        return f"{type(err).__name__}: {err}"
    return ""


def load_fastl2lir():
    """(fastl2lir module or None, shim applied, reason when None)."""
    try:
        import fastl2lir
    except ImportError as err:
        return None, False, f"fastl2lir is not importable ({err})"
    if not _fastl2lir_problem(fastl2lir):          # runs as it is (numpy < 2.4)
        return fastl2lir, False, ""
    shim_fastl2lir(fastl2lir)
    problem = _fastl2lir_problem(fastl2lir)
    return (None, True, f"fastl2lir fails with numpy {np.__version__}: {problem}") if problem else (fastl2lir, True, "")


def _fastl2lir_fit_predict(module, X, Y, Xt, alpha, n_feat):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return module.FastL2LiR().fit(X, Y, alpha=alpha, n_feat=n_feat).predict(Xt)


def _blas_threads() -> str:
    try:
        from threadpoolctl import threadpool_info
        found = {f"{i.get('internal_api')} {i.get('num_threads')} threads" for i in threadpool_info()
                 if i.get("user_api") == "blas"}
        return ", ".join(sorted(found)) or "no BLAS found"
    except Exception:  # noqa: BLE001
        return "unknown"


def step_selection(plan, save) -> SelectionResult:
    dev = torch.device(plan.device)
    n, v, units, m = plan.sel_samples, plan.sel_voxels, plan.sel_units, plan.sel_test
    alpha, n_feat = 100.0, plan.sel_n_feat
    X, Y, Xt, _ = _selection_data(n, v, units, m)
    rec = SelectionResult(n, v, units, n_feat, alpha, m)
    with precision("float32"):   # the float32 selection bound assumes IEEE products: no TF32 GEMMs
        return _selection_runs(plan, rec, X, Y, Xt, dev, save)


def _selection_runs(plan, rec: SelectionResult, X, Y, Xt, dev, save) -> SelectionResult:
    from brainrecon.decode.selection import VoxelSelectionRidge

    units, alpha, n_feat = rec.units, rec.alpha, rec.n_feat
    # warm-up on the device (CUDA context, cuBLAS and cuSOLVER handles), then all units at once
    VoxelSelectionRidge(device=str(dev)).fit_predict(X, Y[:, :plan.sel_warmup_units], Xt, alpha=alpha, n_feat=n_feat)
    model = VoxelSelectionRidge(device=str(dev))
    pred, secs = timed(lambda: model.fit_predict(X, Y, Xt, alpha=alpha, n_feat=n_feat), dev)
    rec.runs.append(DecoderRun("brainrecon VoxelSelectionRidge (float32)", str(dev), units, secs, 1e3 * secs / units,
                               {k: round(t, 3) for k, t in model.timings_.items()},
                               f"batch {model.batch_size} units per solve"))
    print(f"selection: {units} units on {dev} in {secs:.2f} s", flush=True)
    save(rec)

    k = min(plan.sel_cpu_units, units)
    cpu_model = VoxelSelectionRidge(device="cpu")
    cpu_pred, cpu_secs = timed(lambda: cpu_model.fit_predict(X, Y[:, :k], Xt, alpha=alpha, n_feat=n_feat),
                               torch.device("cpu"))
    rec.runs.append(DecoderRun("brainrecon VoxelSelectionRidge (float32)", "cpu", k, cpu_secs, 1e3 * cpu_secs / k,
                               {key: round(t, 3) for key, t in cpu_model.timings_.items()},
                               f"{cpu_model.n_threads} threads, first {k} units"))
    rec.device_vs_cpu_max_abs_diff = differences(pred[:, :k], cpu_pred)[0]
    save(rec)

    module, rec.fastl2lir_shim, reason = load_fastl2lir()
    if module is None:
        rec.fastl2lir_status = f"skipped: {reason}"
        return rec
    small, large = (min(u, units) for u in plan.fastl2lir_units)
    _, t_small = timed(lambda: _fastl2lir_fit_predict(module, X, Y[:, :small], Xt, alpha, n_feat), torch.device("cpu"))
    ref, t_large = timed(lambda: _fastl2lir_fit_predict(module, X, Y[:, :large], Xt, alpha, n_feat), torch.device("cpu"))
    per_unit = (t_large - t_small) / max(large - small, 1)
    split = per_unit > 0
    if not split:                         # timing noise at toy sizes: no set-up/per-unit split
        per_unit = t_large / large
    rec.fastl2lir_per_unit_s = per_unit
    rec.fastl2lir_setup_s = max(t_small - small * per_unit, 0.0) if split else 0.0
    rec.fastl2lir_projected_s = rec.fastl2lir_setup_s + units * per_unit
    rec.speedup_vs_fastl2lir = rec.fastl2lir_projected_s / secs
    rec.runs.append(DecoderRun("fastl2lir 0.11 (float64)", "cpu", large, t_large, 1e3 * t_large / large,
                               note=(f"BLAS: {_blas_threads()}; also {small} units in {t_small:.2f} s"
                                     + ("" if split else " (no set-up/per-unit split: timing noise)")
                                     + ("; with the numpy >= 2.4 shim" if rec.fastl2lir_shim else ""))))
    rec.compared_units = large
    rec.max_abs_diff_vs_fastl2lir = differences(pred[:, :large], ref)[0]
    rec.max_abs_pred = float(np.abs(ref).max())
    rec.fastl2lir_status = "ok"
    return rec


# ----------------------------------------------------------------------------- 3. reconstruction
@dataclass
class ReconTiming:
    implementation: str
    precision: str
    batch: int
    iterations: int
    seconds_per_image_iteration: float
    tflops: float                         # convolution FLOPs (forward + backward to the image) per second
    share_of_matmul: float | None
    all_seconds: list[float] = field(default_factory=list)
    network_only: float | None = None     # s per image-iteration of the loss's forward + backward alone


@dataclass
class LossRun:
    implementation: str
    precision: str
    images: int
    iterations: int
    seconds_per_image_iteration: float
    final_over_start_mean: float
    final_over_start_max: float


@dataclass
class ReconResult:
    device: str
    size: int
    layers: int
    gflop_per_image_iteration: float
    matmul_n: int
    matmul_tflops: dict = field(default_factory=dict)    # precision -> measured TFLOP/s
    timings: list[ReconTiming] = field(default_factory=list)
    losses: list[LossRun] = field(default_factory=list)
    bdpy_status: str = "not run"
    note: str = ("targets on the device; gd prior, paper schedules; per image-iteration = wall time of "
                 "reconstruct() / (iterations x batch), median of the repeats")


def matmul_tflops(device: torch.device, mode: str, n: int, reps: int) -> float:
    """TFLOP/s of an n x n x n product of random matrices (float32, TF32 or bf16 operands)."""
    dtype = torch.bfloat16 if mode == "bf16" else torch.float32
    gen = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, dtype=dtype, generator=gen)
    b = torch.randn(n, n, device=device, dtype=dtype, generator=gen)
    c = torch.empty(n, n, device=device, dtype=dtype)

    def products(k: int) -> None:
        for _ in range(k):
            torch.mm(a, b, out=c)

    with precision("float32" if mode == "bf16" else mode):
        products(3)                                       # warm-up
        _, secs = timed(lambda: products(reps), device)
    return 2 * n ** 3 * reps / secs / 1e12


def _network_for(net, mode: str, device: torch.device):
    return AutocastNetwork(net, device.type) if mode == "bf16" else net


def time_gd(net, targets, plan, batch: int, mode: str, device: torch.device) -> tuple[int, list[float], float]:
    """(iterations, seconds of each repeat, seconds of the network alone) of brainrecon's gd on the
    first ``batch`` targets; the network alone: the loss's forward and backward to the image, as often."""
    from brainrecon.recon.icnn import ReconConfig, reconstruct
    from brainrecon.recon.objective import FeatureLoss

    its = max(plan.recon_min_iterations, -(-plan.recon_image_iterations // batch))
    t = {k: v[:batch] for k, v in targets.items()}
    network = _network_for(net, mode, device)
    cfg = ReconConfig(iterations=its, batch_size=batch, device=str(device))
    loss = FeatureLoss(network, t)
    x = torch.rand(batch, 3, plan.recon_size, plan.recon_size, device=device)

    def network_alone(k: int) -> None:
        for _ in range(k):
            xx = x.detach().requires_grad_(True)
            torch.autograd.grad(loss(xx).sum(), xx)

    with precision(mode):
        reconstruct(t, network, plan.recon_size, cfg.model_copy(update={"iterations": 2}))   # warm-up
        times = [timed(lambda: reconstruct(t, network, plan.recon_size, cfg), device)[1] for _ in range(plan.recon_repeats)]
        network_alone(1)
        _, alone = timed(lambda: network_alone(its), device)
    return its, times, alone


def run_bdpy(targets: dict[str, torch.Tensor], network, start: np.ndarray, iterations: int, device: torch.device,
             trainable: bool) -> tuple[np.ndarray, float]:
    """bdpy's iCNN on ``device``, one image at a time: (images (n, 3, H, W) in [0, 1], s per image-iteration).

    As bench_recon.run_bdpy (same encoder wrapper, targets, layer weights, schedules, blur and start
    images ``start`` (n, H, W, 3) 0-255), with bdpy's ``device`` argument. ``trainable``: a copy of
    the network whose weights require gradients, as bdpy is usually called; else the frozen network.
    """
    import io

    from bdpy.recon.torch.icnn import reconstruct as bdpy_reconstruct

    from bench_recon import BdpyEncoder
    from brainrecon.recon.base import PIXEL_MEAN
    from brainrecon.recon.objective import layer_weights

    network = copy.deepcopy(network).requires_grad_(trainable)   # bdpy hooks its layers: a copy of its own
    layers = list(targets)
    mapping = {k: f"convs[{network.layer_names.index(k)}]" for k in layers}
    encoder = BdpyEncoder(network, layers).to(device)
    mean = np.array(PIXEL_MEAN, dtype=np.float32).reshape(3, 1, 1)
    out, secs = [], []
    for i in range(len(start)):
        feats = {k: v[i:i + 1].cpu().numpy() for k, v in targets.items()}
        w = layer_weights({k: v[i:i + 1].cpu() for k, v in targets.items()})
        with tempfile.TemporaryDirectory() as tmp, contextlib.redirect_stdout(io.StringIO()):
            x, s = timed(lambda: bdpy_reconstruct(
                feats, encoder, layer_mapping=mapping, n_iter=iterations, lr=(2.0, 1e-10), momentum=(0.9, 0.9),
                decay=(0.2, 1e-10), layer_weights={k: float(v[0]) for k, v in w.items()}, image_size=start[i].shape,
                initial_image=start[i], preproc=lambda im: np.ascontiguousarray(im.transpose(2, 0, 1)) - mean,
                postproc=lambda im: (im + mean) / 255.0, blurring=True, sigma=(2.0, 0.5), output_dir=tmp,
                save_snapshot=False, disp_interval=10 ** 9, device=str(device)), device)
        secs.append(s / iterations)
        out.append(x)
    return np.stack(out).astype(np.float32), float(np.mean(secs))


def step_recon(plan, save) -> ReconResult:
    from bench_recon import conv_flops
    from brainrecon.nets import load_network
    from brainrecon.recon.icnn import ReconConfig, reconstruct
    from brainrecon.recon.objective import FeatureLoss

    dev, size = torch.device(plan.device), plan.recon_size
    net = on_device(load_network("hed-vgg16"), dev)
    layers = net.layer_names
    flops = 2 * conv_flops(net, size, layers)            # forward + backward to the image (weights frozen)
    rec = ReconResult(str(dev), size, len(layers), flops / 1e9, plan.matmul_n)
    for mode in plan.recon_precisions:
        rec.matmul_tflops[mode] = matmul_tflops(dev, mode, plan.matmul_n, plan.matmul_reps)
    save(rec)
    targets = natural_targets(net, max(plan.recon_batches + (plan.loss_images,)), size, dev)
    for batch in plan.recon_batches:
        for mode in plan.recon_precisions:
            its, times, alone = time_gd(net, targets, plan, batch, mode, dev)
            per = statistics.median(times) / (its * batch)
            rec.timings.append(ReconTiming("brainrecon gd", mode, batch, its, per, flops / per / 1e12,
                                           flops / per / 1e12 / rec.matmul_tflops[mode], [round(t, 4) for t in times],
                                           alone / (its * batch)))
            print(f"recon: gd batch {batch} {mode}: {1e3 * per:.3f} ms per image-iteration", flush=True)
            save(rec)

    # final loss after the same iterations from the same start images, and bdpy on the same problem
    n, its = plan.loss_images, plan.loss_iterations
    t_n = {k: v[:n] for k, v in targets.items()}
    start = torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(0)) * 255   # gd's start (seed 0)
    loss = FeatureLoss(net, t_n)
    with precision("float32"):
        start_loss = loss.evaluate(start.to(dev) / 255)

    def add_loss(impl: str, mode: str, images, per: float) -> None:
        with precision("float32"):
            ratio = (loss.evaluate(torch.as_tensor(images).to(dev)) / start_loss).cpu()
        rec.losses.append(LossRun(impl, mode, n, its, per, float(ratio.mean()), float(ratio.max())))
        save(rec)

    for mode in plan.recon_precisions:
        with precision(mode):
            images, secs = timed(lambda: reconstruct(t_n, _network_for(net, mode, dev), size,
                                                     ReconConfig(iterations=its, batch_size=n, device=str(dev)))[0], dev)
        add_loss(f"brainrecon gd, batch {n}", mode, images, secs / its / n)
    try:
        import bdpy.recon.torch.icnn  # noqa: F401
    except Exception as err:  # noqa: BLE001 - recorded, the rest still runs
        rec.bdpy_status = f"skipped: bdpy is not importable ({type(err).__name__}: {err})"[:300]
        return rec
    start_hwc = start.permute(0, 2, 3, 1).numpy()
    with precision("default"):                # warm-up: bdpy's first call pays for set-up
        run_bdpy({k: v[:1] for k, v in t_n.items()}, net, start_hwc[:1], 2, dev, False)
    for label, trainable in (("bdpy 0.26 iCNN, frozen encoder", False),
                             ("bdpy 0.26 iCNN, encoder as loaded (weights trainable)", True)):
        with precision("default"):
            images, per = run_bdpy(t_n, net, start_hwc, its, dev, trainable)
        add_loss(label, "default", images, per)
        rate = rec.matmul_tflops.get("tf32")
        rec.timings.append(ReconTiming(label, "default", 1, its, per, flops / per / 1e12,
                                       flops / per / 1e12 / rate if rate else None))
        save(rec)
    rec.bdpy_status = "ok"
    return rec


# ----------------------------------------------------------------------------- 4. whole workload
@dataclass
class WorkloadResult:
    entry: str
    device: str
    on_device: str
    train_images: int
    natural_images: int
    image_size: int
    iterations: int
    status: str = "not run"
    simulate_seconds: float | None = None
    run_seconds: float | None = None
    total_seconds: float | None = None      # run.json
    stage_seconds: dict = field(default_factory=dict)
    config_device: str | None = None        # recon.device in the run's config.json
    n_voxels: int | None = None
    n_train_samples: int | None = None
    test_sets: dict = field(default_factory=dict)   # name -> images
    log_tail: str = ""


STAGE_LINE = re.compile(r"^\[\s*([\d.]+)s\] == (.+)$", re.MULTILINE)


def stages_from_log(text: str, end: float | None = None) -> dict[str, float]:
    """Stage seconds from the pipeline's progress lines ("[  12.3s] == stage"); the last stage runs to ``end``."""
    marks = [(float(t), name.strip()) for t, name in STAGE_LINE.findall(text)]
    out = {}
    for (t, name), nxt in zip(marks, marks[1:] + [(end, None)]):
        if nxt[0] is not None:
            out[name] = round(nxt[0] - t, 2)
    return out


def workload_entry() -> str:
    """How ``brainrecon run`` is told the device: "option" (a ``--device`` option), "config" (its config
    file takes the pipeline's settings, ``recon: {device: ...}`` among them) or "python" (neither: the
    pipeline's Python entry point with ``recon.device``)."""
    from brainrecon import cli

    if "device" in inspect.signature(cli.run).parameters:
        return "option"
    keys = cli._run_keys() if hasattr(cli, "_run_keys") else getattr(cli, "RUN_KEYS", ())
    return "config" if "recon" in keys else "python"


def run_pipeline_entry(spec: dict) -> None:
    """``brainrecon run`` with the pipeline's device setting (``recon.device``), for a command line that has
    no ``--device``: the same configuration as the command's defaults plus image size, iterations and device."""
    from brainrecon.pipeline import PipelineConfig, run_pipeline
    from brainrecon.recon.icnn import ReconConfig

    cfg = PipelineConfig(image_size=spec["image_size"],
                         recon=ReconConfig(iterations=spec["iterations"], device=spec["device"]))
    run_pipeline(Path(spec["train"]), {k: Path(v) for k, v in spec["tests"].items()}, Path(spec["images"]),
                 Path(spec["out"]), cfg)


def _run_logged(cmd: list[str], timeout: float, log: Path) -> tuple[int | None, float, str]:
    """(exit code or None on time-out, seconds, output) of ``cmd``, its output also written to ``log``."""
    t0 = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT, env=dict(os.environ, PYTHONUNBUFFERED="1"))
        try:
            code = proc.wait(timeout=max(timeout, 1))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            code = None
    return code, time.perf_counter() - t0, log.read_text(errors="replace")


def step_workload(plan, save, timeout: float) -> WorkloadResult:
    deadline = time.perf_counter() + timeout - 10
    work = Path(plan.work) / "workload"
    work.mkdir(parents=True, exist_ok=True)
    subject, out = work / "subject", work / "run"
    how = workload_entry()
    entry = {"option": f"brainrecon run --device {plan.device}",
             "config": f"brainrecon run CONFIG (CONFIG: recon: {{device: {plan.device}}}; no --device option)",
             "python": "brainrecon.pipeline.run_pipeline with recon.device (brainrecon run cannot set the device)"}[how]
    rec = WorkloadResult(entry, plan.device, "reconstruction only: training features, decoders, decoding and "
                         "scoring run on the CPU (the pipeline's only device setting is recon.device)",
                         plan.work_train, plan.work_natural, plan.work_size, plan.work_iterations)
    py = sys.executable
    code, secs, text = _run_logged([py, "-m", "brainrecon", "simulate", "--out", str(subject), "--n-train",
                                    str(plan.work_train), "--n-test-natural", str(plan.work_natural)],
                                   deadline - time.perf_counter(), work / "simulate.log")
    rec.simulate_seconds = round(secs, 2)
    if code != 0:
        rec.status, rec.log_tail = ("timeout in simulate" if code is None else f"simulate failed ({code})"), text[-1500:]
        return rec
    save(rec)
    tests = {k: str(subject / f"test_{k}.h5") for k in ("natural", "shapes", "letters")}
    if how in ("option", "config"):
        cmd = [py, "-m", "brainrecon", "run", "--train", str(subject / "train.h5"), "--images", str(subject / "images"),
               "--out", str(out), "--image-size", str(plan.work_size), "--iterations", str(plan.work_iterations)]
        for k, p in tests.items():
            cmd += ["--test", f"{k}={p}"]
        if how == "option":
            cmd += ["--device", plan.device]
        else:
            config = work / "device.yaml"
            config.write_text(json.dumps({"recon": {"device": plan.device}}) + "\n")   # JSON is YAML
            cmd.insert(4, str(config))
    else:
        spec = work / "pipeline.json"
        spec.write_text(json.dumps({"train": str(subject / "train.h5"), "tests": tests, "images": str(subject / "images"),
                                    "out": str(out), "image_size": plan.work_size,
                                    "iterations": plan.work_iterations, "device": plan.device}))
        cmd = [py, str(HERE / "gpu_check.py"), "--run-pipeline", str(spec)]
    code, secs, text = _run_logged(cmd, deadline - time.perf_counter(), work / "run.log")
    print(text[-30000:], flush=True)
    rec.run_seconds, rec.log_tail = round(secs, 2), text[-1500:]
    run_json = out / "run.json"
    if code == 0 and run_json.exists():
        info = json.loads(run_json.read_text())
        rec.stage_seconds, rec.total_seconds = info.get("stage_seconds", {}), info.get("total_seconds")
        rec.n_voxels, rec.n_train_samples = info.get("n_voxels"), info.get("n_train_samples")
        rec.status = "ok"
    else:
        rec.stage_seconds = stages_from_log(text)
        last = STAGE_LINE.findall(text)
        if code is None and last:   # the stage it was stopped in, at most this long (log clock from its start)
            rec.stage_seconds[f"{last[-1][1].strip()} (stopped)"] = round(max(secs - float(last[-1][0]), 0.0), 2)
        rec.status = (f"timeout in stage '{last[-1][1].strip()}'" if code is None and last else
                      "timeout" if code is None else f"run failed ({code})")
    try:
        rec.config_device = json.loads((out / "config.json").read_text())["recon"]["device"]
    except (OSError, ValueError, KeyError, TypeError):
        pass
    try:
        metrics = json.loads((out / "metrics.json").read_text())
        rec.test_sets = {k: v.get("n_images") for k, v in metrics.items()}
    except (OSError, ValueError):
        pass
    return rec
