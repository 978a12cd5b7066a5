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


RUN_DEFAULTS = {"roi": "ROI_VC", "layer_roi": {}, "image_size": 224, "iterations": 200, "network": "hed-vgg16",
                "seed": 0, "no_true_features": False}
RUN_KEYS = ("train", "test", "images", "out", *RUN_DEFAULTS)


def _pairs(items, flag: str, example: str) -> dict[str, str]:
    """NAME=VALUE strings (or a mapping from a config file) -> dict."""
    if isinstance(items, dict):
        return {str(k): str(v) for k, v in items.items()}
    parsed = {}
    for item in items:
        name, sep, value = str(item).partition("=")
        if not sep or not name or not value:
            _fail(f"{flag} {item!r}: write it as {example}")
        if name in parsed:
            _fail(f"{flag}: the name {name!r} is given twice; each needs its own name")
        parsed[name] = value
    return parsed


def _read_config(path: Path) -> dict:
    """A YAML run config: the command-line option names as keys; relative paths are taken from its folder."""
    import yaml

    if not path.is_file():
        _fail(f"{path}: no such config file")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        _fail(f"{path} is not valid YAML: {e}")
    if not isinstance(data, dict):
        _fail(f"{path}: a run config is a mapping of option names to values")
    data = {k.replace("-", "_"): v for k, v in data.items()}
    unknown = sorted(set(data) - set(RUN_KEYS))
    if unknown:
        _fail(f"{path}: unknown key(s) {', '.join(unknown)}; valid keys: {', '.join(RUN_KEYS)}")
    base = path.parent
    for key in ("train", "images", "out"):
        if key in data:
            data[key] = base / Path(str(data[key])).expanduser()
    if "test" in data:
        data["test"] = {k: str(base / Path(v).expanduser()) for k, v in _pairs(data["test"], "test", "NAME: PATH").items()}
    return data


@app.command()
def run(config: Optional[Path] = typer.Argument(None, help="YAML file with any of the options below as keys "
                                                         "(options given on the command line win)"),
        train: Optional[Path] = typer.Option(None, help="training fMRI (BData .h5)"),
        test: Optional[list[str]] = typer.Option(None, help="test set as NAME=PATH (repeatable)"),
        images: Optional[Path] = typer.Option(None, help="folder of stimulus images, one file per label (<label>.<ext>)"),
        out: Optional[Path] = typer.Option(None, help="output folder"),
        roi: Optional[str] = typer.Option(None, help="ROI name or union, e.g. ROI_VC or ROI_V1+ROI_V2 (default ROI_VC)"),
        layer_roi: Optional[list[str]] = typer.Option(None, help="LAYER=ROI: decode a layer (or all layers of a prefix such "
                                                                 "as conv1) from another ROI, e.g. conv1=ROI_V1+ROI_V2+ROI_V3 "
                                                                 "(repeatable)"),
        image_size: Optional[int] = typer.Option(None, help="network input size in pixels (default 224)"),
        iterations: Optional[int] = typer.Option(None, help="reconstruction iterations (default 200)"),
        network: Optional[str] = typer.Option(None, help="hed-vgg16 (default), vgg19-caffe:PATH or vgg19-torchvision:PATH"),
        seed: Optional[int] = typer.Option(None, help="random seed (default 0)"),
        no_true_features: Optional[bool] = typer.Option(None, "--no-true-features",
                                                        help="skip reconstructions from true features")):
    """Run the whole pipeline on BData files: decode, reconstruct, evaluate, report."""
    from .pipeline import PipelineConfig, run_pipeline
    from .recon.icnn import ReconConfig

    given = {"train": train, "test": _pairs(test, "--test", "NAME=PATH, e.g. --test natural=test.h5") if test else None,
             "images": images, "out": out, "roi": roi,
             "layer_roi": _pairs(layer_roi, "--layer-roi", "LAYER=ROI, e.g. --layer-roi conv1=ROI_V1+ROI_V2")
             if layer_roi else None, "image_size": image_size, "iterations": iterations, "network": network,
             "seed": seed, "no_true_features": no_true_features}
    opts = {**RUN_DEFAULTS, **(_read_config(config) if config else {}),
            **{k: v for k, v in given.items() if v is not None}}
    missing = [k for k in ("train", "test", "images", "out") if not opts.get(k)]
    if missing:
        _fail("missing " + ", ".join(f"--{k}" for k in missing) + " (on the command line or as keys of the config file)")
    opts = _check_inputs(opts, config, given)
    cfg = PipelineConfig(network=opts["network"], image_size=opts["image_size"], roi=opts["roi"], seed=opts["seed"],
                         layer_rois=_pairs(opts["layer_roi"], "layer_roi", "LAYER: ROI"),
                         recon=ReconConfig(iterations=opts["iterations"], seed=opts["seed"]),
                         true_feature_recon=not opts["no_true_features"])
    tests = {k: Path(v) for k, v in opts["test"].items()}
    _run_guarded(lambda: run_pipeline(Path(opts["train"]), tests, Path(opts["images"]), Path(opts["out"]), cfg))


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


def _check_inputs(opts: dict, config: Optional[Path], given: dict) -> dict:
    """Expand ``~`` in ``KIND:PATH`` specs (network, generator) and take relative ones from a config
    file's folder; then fail, naming the ``brainrecon download`` commands, if an input is missing."""
    from .data.download import missing_artefact_hint
    from .data.registry import STIMULUS_REQUEST_URL

    opts = dict(opts)
    spec_files = []
    for key in ("network", "generator"):
        kind, sep, path = str(opts.get(key) or "").partition(":")
        if sep and path:
            p = Path(path).expanduser()
            if config is not None and given.get(key) is None and not p.is_absolute():
                p = config.parent / p
            opts[key] = f"{kind}:{p}"
            spec_files.append(p)
    files = [Path(opts["train"]), *(Path(v) for v in opts["test"].values()), *spec_files]
    missing = list(dict.fromkeys(str(p) for p in files if not p.exists()))
    problems = []
    if missing:
        hint = missing_artefact_hint(missing)
        fix = f"download with: {hint}" if hint else "check the paths"
        problems.append(f"no such file: {', '.join(missing)}; {fix}")
    if not Path(opts["images"]).is_dir():
        problems.append(f"no such image folder: {opts['images']}; the stimulus images are not published (ImageNet "
                        f"licence): ask the lab for them at {STIMULUS_REQUEST_URL}, then put them in this folder "
                        "named by ImageNet id, e.g. n01518878_5958.JPEG (subfolders are searched)")
    if problems:
        _fail("\n".join(problems))
    return opts


@app.command()
def download(names: Optional[list[str]] = typer.Argument(None, help="artefacts, groups (paper-subject1, models, all) "
                                                                    "or prefixes (fmri/sub-01); see --list"),
             dest: Optional[Path] = typer.Option(None, help="download folder (default: $BRAINRECON_HOME, "
                                                            "else ~/.cache/brainrecon)"),
             list_: bool = typer.Option(False, "--list", help="list the artefacts and groups, and what is downloaded"),
             force: bool = typer.Option(False, "--force", help="download again even if already complete")):
    """Download the real fMRI data and the lab's networks from figshare (resumable, verified)."""
    from .data.download import DownloadError, describe, download as fetch_artefacts
    from .data.registry import RegistryError

    if list_:
        typer.echo(describe(dest))
        return
    if not names:
        _fail("name what to download, e.g. brainrecon download paper-subject1 (see brainrecon download --list)")
    try:
        paths = fetch_artefacts(names, dest, force=force, log=lambda m: err.print(m, highlight=False, markup=False))
    except (DownloadError, RegistryError) as e:
        _fail(str(e))
    except KeyboardInterrupt:
        err.print("interrupted: run the same command again to resume")
        raise typer.Exit(130)
    for p in paths:
        typer.echo(str(p))


def main() -> None:  # pragma: no cover
    app()
