"""Command line: a thin layer over the Python API (``brainrecon --help``)."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Deep image reconstruction from fMRI: decode DNN features, reconstruct images, evaluate.")
err = Console(stderr=True)

DEMO = dict(image_size=48, n_train_images=1200, n_test_natural=20)


def _fail(message: str) -> None:
    err.print(f"[bold red]error:[/] {message}", highlight=False)
    raise typer.Exit(2)


def _run_guarded(fn):
    from .data.bdata import BDataError
    from .pipeline import PipelineError
    try:
        return fn()
    except (BDataError, PipelineError, FileNotFoundError) as e:
        _fail(str(e))


@app.command()
def simulate(out: Path = typer.Option(..., help="folder to write the subject to"),
             seed: int = typer.Option(0, help="random seed (subject and stimuli)"),
             n_train: int = typer.Option(1200, help="training images"),
             n_test_natural: int = typer.Option(50, help="held-out natural test images")):
    """Simulate a subject: BData fMRI files (train, test_natural, test_shapes, test_letters) and stimulus images."""
    from .nets import load_network
    from .simulate.cortex import CortexConfig
    from .simulate.subject import SubjectConfig, simulate_subject

    cfg = SubjectConfig(seed=seed, n_train_images=n_train, n_test_natural=n_test_natural,
                        cortex=CortexConfig(seed=seed))
    paths = _run_guarded(lambda: simulate_subject(out, cfg, load_network("hed-vgg16"), progress=err.print))
    for name, p in paths.items():
        err.print(f"{name}: {p}")


def _parse_tests(tests: list[str]) -> dict[str, Path]:
    parsed = {}
    for t in tests:
        name, sep, path = t.partition("=")
        if not sep or not name or not path:
            _fail(f"--test {t!r}: write it as NAME=PATH, e.g. --test natural=test_natural.h5")
        if name in parsed:
            _fail(f"--test: the name {name!r} is given twice; each test set needs its own name")
        parsed[name] = Path(path)
    return parsed


@app.command()
def run(train: Path = typer.Option(..., help="training fMRI (BData .h5)"),
        test: list[str] = typer.Option(..., help="test set as NAME=PATH (repeatable)"),
        images: Path = typer.Option(..., help="folder of stimulus images, one file per label (<label>.<ext>)"),
        out: Path = typer.Option(..., help="output folder"),
        roi: str = typer.Option("ROI_VC", help="ROI name or union, e.g. ROI_VC or ROI_V1+ROI_V2"),
        layer_roi: list[str] = typer.Option([], help="LAYER=ROI: decode a layer (or all layers of a prefix such as conv1) "
                                                     "from another ROI, e.g. conv1=ROI_V1+ROI_V2+ROI_V3 (repeatable)"),
        image_size: int = typer.Option(224, help="network input size in pixels"),
        iterations: int = typer.Option(200, help="reconstruction iterations"),
        network: str = typer.Option("hed-vgg16", help="network (hed-vgg16)"),
        seed: int = typer.Option(0),
        no_true_features: bool = typer.Option(False, help="skip reconstructions from true features")):
    """Run the whole pipeline on BData files: decode, reconstruct, evaluate, report."""
    from .pipeline import PipelineConfig, run_pipeline
    from .recon.icnn import ReconConfig

    layer_rois = {}
    for item in layer_roi:
        layer, sep, name = item.partition("=")
        if not sep or not layer or not name:
            _fail(f"--layer-roi {item!r}: write it as LAYER=ROI, e.g. --layer-roi conv1=ROI_V1+ROI_V2")
        layer_rois[layer] = name
    cfg = PipelineConfig(network=network, image_size=image_size, roi=roi, seed=seed, layer_rois=layer_rois,
                         recon=ReconConfig(iterations=iterations, seed=seed), true_feature_recon=not no_true_features)
    tests = _parse_tests(test)
    _run_guarded(lambda: run_pipeline(train, tests, images, out, cfg))


@app.command()
def demo(out: Path = typer.Option(Path("demo_out"), help="output folder"),
         seed: int = typer.Option(0, help="random seed"),
         image_size: int = typer.Option(DEMO["image_size"], help="network input size in pixels"),
         n_train: int = typer.Option(DEMO["n_train_images"], help="training images"),
         n_test_natural: int = typer.Option(DEMO["n_test_natural"], help="held-out natural test images"),
         iterations: int = typer.Option(200, help="reconstruction iterations")):
    """Simulate a subject, then decode, reconstruct and evaluate it: the whole method offline."""
    import time

    from .nets import load_network
    from .pipeline import Log, PipelineConfig, run_pipeline
    from .recon.icnn import ReconConfig
    from .simulate.cortex import CortexConfig
    from .simulate.subject import SubjectConfig, simulate_subject

    log = Log()
    t0 = time.time()
    log.stage("simulating a subject")
    subject = out / "subject"
    sub_cfg = SubjectConfig(seed=seed, n_train_images=n_train, n_test_natural=n_test_natural,
                            cortex=CortexConfig(seed=seed))
    paths = _run_guarded(lambda: simulate_subject(subject, sub_cfg, load_network("hed-vgg16"),
                                                  progress=lambda m: log("  " + m)))
    sim_seconds = round(time.time() - t0, 1)
    cfg = PipelineConfig(image_size=image_size, seed=seed, recon=ReconConfig(iterations=iterations, seed=seed))
    tests = {k: v for k, v in paths.items() if k != "train"}
    _run_guarded(lambda: run_pipeline(paths["train"], tests, subject / "images", out, cfg, log=log,
                                      extra={"simulation_seconds": sim_seconds}))
    err.print(f"[green]done in {time.time() - t0:.0f} s:[/] open {out / 'report.html'}")


def main() -> None:  # pragma: no cover
    app()
