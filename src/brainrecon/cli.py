"""Command line: a thin layer over the Python API (``brainrecon --help``)."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.text import Text

from .cli_settings import settings_command

# Plain click output for usage errors and help: rich's panels re-wrap messages at the terminal width.
app = typer.Typer(add_completion=False, no_args_is_help=True, rich_markup_mode=None, pretty_exceptions_enable=False,
                  help="Deep image reconstruction from fMRI: decode DNN features, reconstruct images, evaluate.")
# Messages are never re-wrapped (a path broken over lines cannot be pasted back), colour only on a terminal.
err = Console(stderr=True, soft_wrap=True, highlight=False)

DEMO = dict(image_size=48, n_train_images=1200, n_test_natural=20)
DEMO_PRIOR = "fourier"   # the prior with the best mean pixel identification on the demo subject (docs/priors.md)


def _say(message: str, style: str | None = None) -> None:
    """One message on stderr, as given (no markup, no wrapping)."""
    err.print(message, style=style, markup=False)


def _warn(message: str) -> None:
    _say(f"warning: {message}", style="yellow")


def _fail(message: str) -> None:
    err.print(Text("error: ", style="bold red") + Text(message))
    raise typer.Exit(2)


def _run_guarded(fn, out: Path | None = None):
    """Run a long command: user errors end with one line (exit 2), Ctrl-C with how to resume (exit 130),
    anything else with one line and the traceback saved to a file (exit 1)."""
    from .data.bdata import BDataError
    from .data.stimuli import StimulusError
    from .pipeline import PipelineError
    try:
        return fn()
    except (BDataError, PipelineError, StimulusError, FileNotFoundError) as e:
        _fail(str(e))
    except KeyboardInterrupt:
        where = f" (finished stages are kept in {out})" if out is not None else ""
        _say(f"interrupted{where}: run the same command again to resume")
        raise typer.Exit(130) from None
    except Exception as e:  # noqa: BLE001 - a bug, not a user error: say so in one line, keep the traceback
        import tempfile
        import traceback
        folder = out if out is not None and out.is_dir() else Path(tempfile.gettempdir())
        log = folder / "brainrecon-error.log"
        log.write_text(traceback.format_exc())
        _say(f"internal error: {type(e).__name__}: {e}. This is a bug in brainrecon, not in your input: please "
             f"report it with the traceback saved in {log}", style="bold red")
        raise typer.Exit(1) from None


OPTION_NAMES = {"n_train_images": "--n-train"}   # simulate's options named otherwise than their fields
SETTING_HINTS = {"image_size": "the networks' conv5 layers sit after four 2x poolings",
                 "iterations": "a reconstruction needs at least one optimisation step"}


def settings_message(error) -> str:
    """A pydantic ``ValidationError`` of the settings as one line naming each option (or the setting's
    dotted path where it has none), its value and the rule; an unknown setting with the valid ones."""
    from .cli_settings import model_at, setting_options
    from .pipeline import PipelineConfig

    flags = {o.path: o.flag for o in setting_options()}
    parts = []
    for e in error.errors():
        loc = tuple(str(x) for x in e["loc"] if isinstance(x, str))
        field = loc[-1] if loc else "setting"
        whole = error.title == "PipelineConfig" and bool(loc) and model_at(PipelineConfig, loc) is not None
        name = flags.get(loc) or (OPTION_NAMES.get(field, "--" + field.replace("_", "-")) if len(loc) <= 1 and not whole
                                  else ".".join(loc))
        msg = e["msg"].removeprefix("Value error, ").replace("greater than or equal to", "at least")
        msg = msg[:1].lower() + msg[1:]
        if e["type"] == "extra_forbidden":
            parent = model_at(PipelineConfig, loc[:-1]) if error.title == "PipelineConfig" else None
            valid = f"; valid: {', '.join(parent.model_fields)}" if parent is not None else ""
            msg = f"unknown setting{valid}"
        hint = f" ({SETTING_HINTS[field]})" if field in SETTING_HINTS and "than" in e["type"] else ""
        value = "" if e["type"] in ("missing", "extra_forbidden") or whole else f" {e['input']!r}"
        parts.append(f"{name}{value}: {msg}{hint}")
    return "; ".join(parts)


@app.command()
def simulate(out: Path = typer.Option(..., help="folder to write the subject to"),
             seed: int = typer.Option(0, help="random seed (subject and stimuli)"),
             n_train: Optional[int] = typer.Option(None, help="training images (default: the model's, "
                                                             "css-vgg 1200, dn-stats 600)"),
             n_test_natural: int = typer.Option(50, help="held-out natural test images"),
             model: str = typer.Option("css-vgg", help="cortex model: css-vgg (the demo's: Gabor-energy early "
                                                       "areas, VGG features in higher areas; 1200 x 5 training "
                                                       "presentations) or dn-stats (an independent one: divisive "
                                                       "normalisation, mid-level statistics, correlated noise; "
                                                       "600 x 3, 8 presentations per test image)")):
    """Simulate a subject: BData fMRI files (train, test_natural, test_shapes, test_letters, test_imagery with its
    label map imagery_labels.tsv) and stimulus images."""
    from .nets import load_network
    from .simulate.subject import SubjectConfig, simulate_subject

    from pydantic import ValidationError

    from .pipeline import check_out_folder

    try:
        cfg = SubjectConfig.for_model(model, seed=seed, n_test_natural=n_test_natural,
                                      **({} if n_train is None else {"n_train_images": n_train}))
    except ValidationError as e:
        _fail(settings_message(e))
    _run_guarded(lambda: check_out_folder(out))
    network = load_network("hed-vgg16") if cfg.model == "css-vgg" else None
    paths = _run_guarded(lambda: simulate_subject(out, cfg, network, progress=_say), out)
    for name, p in paths.items():
        _say(f"{name}: {p}")


INPUTS = ("train", "test", "images", "out")


def _run_keys() -> tuple[str, ...]:
    """Keys of a run config file: the inputs, the settings options, and every PipelineConfig field."""
    from .cli_settings import setting_options
    from .pipeline import PipelineConfig
    return tuple(dict.fromkeys((*INPUTS, *(o.dest for o in setting_options()), *PipelineConfig.model_fields)))


def _pairs(items, flag: str, example: str) -> dict[str, str]:
    """NAME=VALUE strings (or a mapping from a config file) -> dict."""
    if isinstance(items, dict):
        return {str(k): str(v) for k, v in items.items()}
    if not isinstance(items, (list, tuple)):
        _fail(f"{flag} {items!r}: write it as {example}")
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
    unknown = sorted(set(data) - set(_run_keys()))
    if unknown:
        _fail(f"{path}: unknown key(s) {', '.join(unknown)}; valid keys: {', '.join(_run_keys())}")
    base = path.parent
    for key in ("train", "images", "out"):
        if key in data and not isinstance(data[key], str):
            _fail(f"{path}: {key} must be a path, not {data[key]!r}")
        if key in data:
            data[key] = base / Path(str(data[key])).expanduser()
    if "test" in data:
        data["test"] = {k: str(base / Path(v).expanduser()) for k, v in _pairs(data["test"], "test", "NAME: PATH").items()}
    if "labels" in data:
        data["labels"] = {k: _label_map_spec(v, base) for k, v in _pairs(data["labels"], "labels", "NAME: TSV").items()}
    return data


def _label_map_spec(spec: str, base: Path | None = None) -> str:
    """A label map as given: a builtin name stays as it is, a file path becomes absolute (taken from ``base``)."""
    from .data.labelmaps import BUILTIN_MAPS
    if spec in BUILTIN_MAPS:
        return spec
    path = Path(spec).expanduser()
    return str(((base / path) if base is not None and not path.is_absolute() else path).absolute())


INPUT_OPT = dict(
    train=typer.Option(None, help="training fMRI (BData .h5)"),
    test=typer.Option(None, help="test set as NAME=PATH (repeatable)"),
    images=typer.Option(None, help="folder of stimulus images, one file per label (<label>.<ext>)"),
    out=typer.Option(None, help="output folder"),
    overwrite=typer.Option(False, "--overwrite", help="the output folder holds another run (other settings or "
                                                      "inputs): replace that run's outputs (its caches are kept)"),
)
CONFIG_ARG = typer.Argument(None, help="YAML file with any of the options below (or any setting of a run's "
                                       "config.json) as keys; options given on the command line win")


def _settings_options(only: tuple[str, ...] = ()):
    """The settings options made from the config schema (``only``: just these)."""
    from .cli_settings import setting_options
    return [o for o in setting_options() if not only or o.dest in only]


def _settings_tree(file: dict, given: dict, sets: list[str] | None) -> tuple[dict, set[str]]:
    """The PipelineConfig keyword tree from a config file's keys, the options given (which win) and
    the ``--set`` items (applied last); also the top-level keys the command line set."""
    from .cli_settings import SettingsError, parse_value, resolve_set, set_in
    from .pipeline import PipelineConfig

    options = {o.dest: o for o in _settings_options()}
    tree, cli = {}, set()
    try:
        for source, items in (("file", file), ("cli", given)):
            for key, value in items.items():
                if key in INPUTS or value is None:
                    continue
                o = options.get(key)
                if o is not None and o.kind == "pairs":
                    value = _pairs(value, o.flag if source == "cli" else key, f"NAME=VALUE, e.g. {o.flag} conv1=ROI_V1")
                    if key == "labels" and source == "cli":   # label-map paths are taken from the working folder
                        value = {k: _label_map_spec(v) for k, v in value.items()}
                path = o.path if o is not None else (key,)
                set_in(tree, path, parse_value(o, value) if o is not None else value)
                if source == "cli":
                    cli.add(path[0])
        for item in sets or []:
            path, value = resolve_set(PipelineConfig, item)
            set_in(tree, path, value)
            cli.add(path[0])
    except SettingsError as e:
        _fail(str(e))
    return tree, cli


def _make_config(tree: dict):
    """PipelineConfig(**tree), or one line naming each wrong setting."""
    from pydantic import ValidationError

    from .pipeline import PipelineConfig

    if (tree.get("recon") or {}).get("prior") == "generator" and not tree.get("generator"):
        tree["generator"] = "builtin"
    try:
        return PipelineConfig(**tree)
    except ValidationError as e:
        _fail(settings_message(e))


def _run_setup(config: Optional[Path], inputs: dict, settings: dict):
    """Merge the config file (option names or PipelineConfig fields, e.g. a run's config.json), the
    options (which win) and ``--set``; check inputs; -> (PipelineConfig, train, tests, images, out)."""
    settings = dict(settings)
    sets = settings.pop("set_", None)
    inputs = {k: v for k, v in inputs.items() if v is not None}
    if inputs.get("test"):
        inputs["test"] = _pairs(inputs["test"], "--test", "NAME=PATH, e.g. --test natural=test.h5")
    file = _read_config(config) if config else {}
    opts = {**{k: file[k] for k in INPUTS if k in file}, **inputs}
    missing = [k for k in INPUTS if not opts.get(k)]
    if missing:
        _fail("missing " + ", ".join(f"--{k}" for k in missing) + " (on the command line or as keys of the config file)")
    tree, cli = _settings_tree(file, settings, sets)
    opts = _check_inputs({**opts, **{k: tree[k] for k in ("network", "generator") if tree.get(k)}}, config,
                         {k: True for k in cli})
    tree.update({k: opts[k] for k in ("network", "generator") if k in opts})
    cfg = _make_config(tree)
    tests = {k: Path(v) for k, v in opts["test"].items()}
    return cfg, Path(opts["train"]), tests, Path(opts["images"]), Path(opts["out"])


@settings_command(app, _settings_options)
def run(config: Optional[Path] = CONFIG_ARG,
        train: Optional[Path] = INPUT_OPT["train"], test: Optional[list[str]] = INPUT_OPT["test"],
        images: Optional[Path] = INPUT_OPT["images"], out: Optional[Path] = INPUT_OPT["out"],
        overwrite: bool = INPUT_OPT["overwrite"], *, settings: dict):
    """Run the whole pipeline on BData files: decode, reconstruct, evaluate, report."""
    from .pipeline import run_pipeline

    cfg, train_path, tests, images_dir, out_dir = _run_setup(
        config, dict(train=train, test=test, images=images, out=out), settings)
    _run_guarded(lambda: run_pipeline(train_path, tests, images_dir, out_dir, cfg, overwrite=overwrite), out_dir)


COMPARISONS = ("rois", "layers", "priors")


@settings_command(app, _settings_options)
def compare(what: str = typer.Argument(..., help="rois: the paper's ROI analysis (V1, V2, V3, V4, HVC, VC); "
                                              "layers: the layer-combination analysis (conv1, conv1-2, ... all); "
                                              "priors: every reconstruction prior on the same decoded features"),
            config: Optional[Path] = typer.Argument(None, help="YAML run config (as for brainrecon run)"),
            variants: Optional[str] = typer.Option(None, help="comma-separated ROIs or priors to compare "
                                                              "(default: all of the analysis)"),
            train: Optional[Path] = INPUT_OPT["train"], test: Optional[list[str]] = INPUT_OPT["test"],
            images: Optional[Path] = INPUT_OPT["images"], out: Optional[Path] = INPUT_OPT["out"],
            overwrite: bool = INPUT_OPT["overwrite"], *, settings: dict):
    """Run variants of the pipeline on the same data and compare them in one report (out/report.html)."""
    from . import analyses
    from .nets import load_network
    from .recon.config import PRIORS

    if what not in COMPARISONS:
        _fail(f"unknown comparison {what!r}: choose one of {', '.join(COMPARISONS)}")
    cfg, train_path, tests, images_dir, out_dir = _run_setup(
        config, dict(train=train, test=test, images=images, out=out), settings)
    chosen = [v.strip() for v in variants.split(",")] if variants else None
    if what == "rois":
        runs = _run_guarded(lambda: analyses.roi_variants(cfg, train_path, chosen))
        title, axis = "Reconstruction from each visual area", None
    elif what == "layers":
        names = cfg.layers or _run_guarded(lambda: load_network(cfg.network)).layer_names
        runs = analyses.layer_variants(cfg, names)
        title, axis = "Reconstruction from combinations of DNN layers", "layers matched (cumulative)"
    else:
        bad = [p for p in chosen or [] if p not in PRIORS]
        if bad:
            _fail(f"unknown prior(s) {', '.join(bad)}: choose from {', '.join(PRIORS)}")
        runs = analyses.prior_variants(cfg, chosen or list(PRIORS))
        if "generator" in runs and not cfg.generator:
            runs["generator"] = runs["generator"].model_copy(update={"generator": "builtin"})
        title, axis = "Reconstruction priors on the same decoded features", None
    _run_guarded(lambda: analyses.compare_variants(train_path, tests, images_dir, out_dir, runs, title, x_axis=axis,
                                                   overwrite=overwrite), out_dir)


DEMO_OPTIONS = ("image_size", "seed", "iterations", "prior")   # the settings demo takes (others with --set)


@settings_command(app, lambda: _settings_options(DEMO_OPTIONS),
                  defaults={"image_size": DEMO["image_size"], "seed": 0, "iterations": 200, "prior": DEMO_PRIOR})
def demo(out: Path = typer.Option(Path("demo_out"), help="output folder"),
         n_train: int = typer.Option(DEMO["n_train_images"], help="training images"),
         n_test_natural: int = typer.Option(DEMO["n_test_natural"], help="held-out natural test images"),
         compare_priors: bool = typer.Option(False, "--compare-priors",
                                             help="reconstruct with every prior on the same decoded features and "
                                                  "compare them (about 5x the reconstruction time)"),
         *, settings: dict):
    """Simulate a subject, then decode, reconstruct and evaluate it: the whole method offline."""
    import time

    from pydantic import ValidationError

    from .nets import load_network
    from .pipeline import Log, check_out_folder, run_pipeline
    from .simulate.cortex import CortexConfig
    from .simulate.subject import SubjectConfig, simulate_subject

    # every setting is checked before the simulation starts
    settings = dict(settings)
    tree = _settings_tree({}, settings, settings.pop("set_", None))[0]
    # the simulated imagery file labels trials by number, as the lab's files do
    tree.update(labels={"imagery": str((out / "subject" / "imagery_labels.tsv").absolute())},
                exclude_labels=["fixation"])
    cfg = _make_config(tree)
    seed, prior = cfg.seed, cfg.recon.prior
    try:
        sub_cfg = SubjectConfig(seed=seed, n_train_images=n_train, n_test_natural=n_test_natural,
                                cortex=CortexConfig(seed=seed))
    except ValidationError as e:
        _fail(settings_message(e))
    _run_guarded(lambda: check_out_folder(out))
    log = Log()
    t0 = time.time()
    log.stage("simulating a subject")
    subject = out / "subject"
    paths = _run_guarded(lambda: simulate_subject(subject, sub_cfg, load_network("hed-vgg16"),
                                                  progress=lambda m: log("  " + m)), out)
    sim_seconds = round(time.time() - t0, 1)
    tests = {k: v for k, v in paths.items() if k != "train"}
    if compare_priors:
        from . import analyses
        from .recon.config import PRIORS
        order = [p for p in PRIORS if p != "generator"] + ["generator"]
        runs = analyses.prior_variants(cfg.model_copy(update={"generator": "builtin"}), order)
        runs[prior] = runs[prior].model_copy(update={"true_feature_recon": True})
        _run_guarded(lambda: analyses.compare_variants(paths["train"], tests, subject / "images", out, runs,
                                                       "Reconstruction priors on the same decoded features", log=log),
                     out)
    else:
        _run_guarded(lambda: run_pipeline(paths["train"], tests, subject / "images", out, cfg, log=log,
                                          extra={"simulation_seconds": sim_seconds}), out)
    _say(f"done in {time.time() - t0:.0f} s: open {out / 'report.html'}", style="green")


def _check_inputs(opts: dict, config: Optional[Path], given: dict) -> dict:
    """Expand ``~`` in ``KIND:PATH`` specs (network, generator) and take relative ones from a config
    file's folder; then fail, naming the ``brainrecon download`` commands, if an input is missing."""
    from .data.download import missing_artefact_hint
    from .data.registry import STIMULUS_REQUEST_URL

    opts = dict(opts)
    spec_files = []
    file_kinds = {"network": ("vgg19-caffe", "vgg19-torchvision"), "generator": ("relu7",)}
    for key in ("network", "generator"):
        kind, sep, path = str(opts.get(key) or "").partition(":")
        if sep and path and kind in file_kinds[key]:   # other specs are refused by the settings' check
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
    """Download the real fMRI data (four experiments, two releases), the published stimuli and the lab's
    networks from figshare (resumable, verified). $BRAINRECON_MIRROR: another server with the files by
    name; $BRAINRECON_FIGSHARE_API: another figshare API for the file lists that give unpublished ids."""
    from .data.download import DownloadError, describe, download as fetch_artefacts
    from .data.registry import RegistryError

    if list_:
        typer.echo(describe(dest))
        return
    if not names:
        _fail("name what to download, e.g. brainrecon download paper-subject1 (see brainrecon download --list)")
    try:
        paths = fetch_artefacts(names, dest, force=force, log=_say)
    except (DownloadError, RegistryError) as e:
        _fail(str(e))
    except KeyboardInterrupt:
        _say("interrupted: run the same command again to resume")
        raise typer.Exit(130)
    for p in paths:
        typer.echo(str(p))


@app.command()
def evaluate(run_dir: Path = typer.Argument(..., help="folder of a finished run or demo"),
             protocol: str = typer.Option("kamitani", help="kamitani (pixel, feature, n-way and human "
                                                           "identification), nsd (the NSD-era metrics) or all"),
             eval_net: Optional[list[str]] = typer.Option(None, "--eval-net", help="NAME=PATH: weights of an NSD "
                                                                                 "evaluation network (repeatable)"),
             images: Optional[Path] = typer.Option(None, help="stimulus folder (default: the run's)"),
             n_bootstrap: int = typer.Option(2000, min=100, help="bootstrap resamples of the images"),
             n_permutations: int = typer.Option(1000, min=99, help="label permutations per identification"),
             seed: int = typer.Option(0, help="seed of the resamples, permutations and n-way draws"),
             device: str = typer.Option("cpu", help="torch device of the NSD evaluation networks")):
    """Score a run with intervals and p-values and check it against retrieval: RUN_DIR/evaluation.json,
    RUN_DIR/metrics.csv, and the report's evaluation section."""
    from .evaluate.protocol import PROTOCOLS, EvaluationError, evaluate_run
    from .report.evaluation import update_report

    if protocol not in PROTOCOLS:
        _fail(f"--protocol {protocol!r}: use one of {', '.join(PROTOCOLS)}")
    weights = _pairs(eval_net or [], "--eval-net", "NAME=PATH, e.g. --eval-net alexnet=alexnet-owt-7be5be79.pth")
    if not run_dir.is_dir():
        _fail(f"{run_dir} does not exist: give the folder of a finished `brainrecon run` or `brainrecon demo`")

    def work():
        from .pipeline import PipelineError
        try:
            evaluation = evaluate_run(run_dir, protocol, weights, images, n_bootstrap, n_permutations, seed=seed,
                                      device=device, log=_say)
        except EvaluationError as e:
            raise PipelineError(str(e)) from None      # one line, exit 2
        for what, why in evaluation.skipped.items():
            _warn(f"{what} not evaluated: {why}")
        if update_report(evaluation.to_json(), run_dir):
            from .runfolder import RunFolder
            _say(f"updated {RunFolder(run_dir).report}")
        return evaluation

    evaluation = _run_guarded(work, run_dir)
    typer.echo(f"{'test set':<12}{'source':<15}{'metric':<42}{'value':>8}{'95% CI':>18}{'p':>9}")
    for r in evaluation.results:
        p = "" if r.p_value is None else f"{r.p_value:.3g}"
        typer.echo(f"{r.test_set:<12}{r.source:<15}{r.metric:<42}{r.value:>8.3f}"
                   f"{f'{r.ci_low:.3f}-{r.ci_high:.3f}':>18}{p:>9}")


judge_app = typer.Typer(no_args_is_help=True, help="Human judgment: raters pick which of two stimuli a "
                        "reconstruction resembles (the paper's second measure; chance 50%).")
app.add_typer(judge_app, name="judge")
JUDGE = {
    "pairs_per_image": typer.Option(None, help="distractors per reconstruction, drawn at random (default: every "
                                               "other image of its test set)"),
    "seed": typer.Option(0, help="seed of the distractor draw and of each rater's trial order"),
    "which": typer.Option("decoded", help="reconstructions to judge: decoded (from fMRI) or true (from true features)"),
    "images": typer.Option(None, help="stimulus folder (default: the one recorded in the run's run.json)"),
}


def _judge_inputs(run_dir: Path, images: Optional[Path], which: str, pairs_per_image: Optional[int], seed: int):
    from .evaluate.judgment import JudgmentError, make_trials, run_images
    try:
        imgs = run_images(run_dir, images, which)
        return imgs, make_trials(imgs.labels, pairs_per_image, seed, families=imgs.families)
    except JudgmentError as e:
        _fail(str(e))


def _default_answers(run_dir: Path, which: str) -> Path:
    from .runfolder import RunFolder
    return RunFolder(run_dir).answers(which)


@judge_app.command()
def serve(run_dir: Path = typer.Argument(..., help="folder of a finished run or demo"),
          port: int = typer.Option(8000, min=0, max=65535, help="port (0: any free one)"),
          host: str = typer.Option("127.0.0.1", help="address to listen on (0.0.0.0: raters on the local network)"),
          answers: Optional[Path] = typer.Option(None, help="answers file, appended to (default: "
                                                            "RUN_DIR/judgments/answers.jsonl)"),
          pairs_per_image: Optional[int] = JUDGE["pairs_per_image"], seed: int = JUDGE["seed"],
          which: str = JUDGE["which"], images: Optional[Path] = JUDGE["images"]):
    """Serve the judgment page: each rater enters a name and judges the run's trials in an order of their own."""
    from .evaluate.judgment import JudgmentError
    from .evaluate.judgment_app import JudgmentSession, make_server

    imgs, trials = _judge_inputs(run_dir, images, which, pairs_per_image, seed)
    answers = answers or _default_answers(run_dir, which)
    try:
        session = JudgmentSession(imgs, trials, answers, seed, warn=_warn)
        server = make_server(session, host, port)
    except JudgmentError as e:
        _fail(str(e))
    except OSError as e:
        _fail(f"cannot listen on {host}:{port} ({e.strerror or e}): choose another --port")
    sets = ", ".join(f"{s} {len(v)}" for s, v in imgs.labels.items())
    _say(f"{len(trials)} trials per rater ({sets} reconstructions); answers -> {answers}")
    _say(f"open http://{host}:{server.server_address[1]}/ in a browser; Ctrl-C stops (raters resume later)")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        _say(f"stopped; score with: brainrecon judge score {run_dir}")
    finally:
        server.server_close()


@judge_app.command()
def export(run_dir: Path = typer.Argument(..., help="folder of a finished run or demo"),
           rater: str = typer.Option(..., help="the rater this page is for (it fixes their trial order)"),
           out: Path = typer.Option(..., help="HTML file to write"),
           pairs_per_image: Optional[int] = JUDGE["pairs_per_image"], seed: int = JUDGE["seed"],
           which: str = JUDGE["which"], images: Optional[Path] = JUDGE["images"]):
    """Write a self-contained judgment page for one rater; they send back the answers file it downloads."""
    from .evaluate.judgment import JudgmentError
    from .evaluate.judgment_app import export_page

    if out.is_dir():
        _fail(f"{out} is a folder: --out names the HTML file to write, e.g. --out {out / f'{rater.strip()}.html'}")
    imgs, trials = _judge_inputs(run_dir, images, which, pairs_per_image, seed)
    try:
        path = export_page(imgs, trials, rater.strip(), out, seed)
    except JudgmentError as e:
        _fail(str(e))
    except OSError as e:
        _fail(f"cannot write {out} ({e.strerror or e}): choose another --out")
    _say(f"{path}: {len(trials)} trials for {rater}; score their answers with: "
              f"brainrecon judge score {run_dir} --answers answers-{rater}.jsonl")


@judge_app.command()
def score(run_dir: Path = typer.Argument(..., help="folder of the run the judgments are of"),
          answers: Optional[list[Path]] = typer.Option(None, help="answers file(s) (default: "
                                                                  "RUN_DIR/judgments/answers.jsonl)"),
          pairs_per_image: Optional[int] = JUDGE["pairs_per_image"], seed: int = JUDGE["seed"],
          which: str = JUDGE["which"], images: Optional[Path] = JUDGE["images"]):
    """Score judgments per test set; write RUN_DIR/human_judgment.json and add the scores to metrics.json."""
    import json

    from .cache import write_json
    from .evaluate.judgment import JudgmentError, read_answers, score_answers

    imgs, trials = _judge_inputs(run_dir, images, which, pairs_per_image, seed)
    try:
        scores = score_answers(trials, read_answers(answers or [_default_answers(run_dir, which)], warn=_warn))
    except JudgmentError as e:
        _fail(str(e))
    if not scores:
        _fail("the answers files hold no judgments")
    from .runfolder import RunFolder

    suffix = "" if which == "decoded" else "_true_features"
    metrics_path = RunFolder(run_dir).metrics
    try:
        metrics = json.loads(metrics_path.read_text()) if metrics_path.is_file() else {}
    except (ValueError, OSError) as e:
        _fail(f"{metrics_path} cannot be read ({e}): rerun the run's brainrecon command to rewrite it, then score")
    typer.echo(f"{'test set':<12}{'human':>8}{'95% CI':>16}{'judgments':>11}{'raters':>8}{'covered':>9}{'pixel':>8}")
    for name, s in scores.items():
        m = metrics.setdefault(name, {})
        m.update({f"human_identification{suffix}": s["human_identification"],
                  f"human_identification{suffix}_ci95": s["ci95"], f"human_n_judgments{suffix}": s["n_judgments"]})
        pixel = m.get(f"pixel_identification{suffix}")
        ci = f"{s['ci95'][0]:.1%}-{s['ci95'][1]:.1%}"
        typer.echo(f"{name:<12}{s['human_identification']:>8.1%}{ci:>16}"
                   f"{s['n_judgments']:>11}{s['n_raters']:>8}{s['trials_covered']:>9.0%}"
                   f"{'' if pixel is None else f'{pixel:.1%}':>8}")
    out = RunFolder(run_dir).human_scores(which)
    write_json(out, scores)
    write_json(metrics_path, metrics)
    _say(f"wrote {out} and {metrics_path}")
    from .evaluate.protocol import merge_human
    from .report.evaluation import update_report
    evaluation = merge_human(run_dir, which)
    if evaluation is None:
        _say(f"(brainrecon evaluate {run_dir} adds intervals and the report's evaluation section)")
    else:
        _say(f"updated {RunFolder(run_dir).evaluation}, {RunFolder(run_dir).metrics_csv}" +
             (f" and {RunFolder(run_dir).report}" if update_report(evaluation.to_json(), run_dir) else ""))


def main() -> None:  # pragma: no cover
    app()
