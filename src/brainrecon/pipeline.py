"""The stages wired together: fMRI + images -> features -> decoders -> reconstructions -> metrics -> report.

``run_pipeline`` is what ``brainrecon run`` and ``brainrecon demo`` call. Everything a run makes goes
to its output folder; finished stages (feature cache, decoded features, reconstructions) are
reused when the run is repeated with the same configuration, so an interrupted run resumes.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from pydantic import Field, field_validator, model_validator

from . import __version__
from .cache import load_npy, load_npz, load_or_none, save_npy, save_npz, write_json
from .data.bdata import FmriData, check_rois, read_fmri, roi_keys
from .data.labelmaps import LabelMap, read_label_map
from .data.stimuli import StimulusError, StimulusSet, load_stimulus_set, png_bytes
from .decode.decoder import DecodedFeatures, DecoderConfig, FeatureDecoder, load_decoded, save_decoded
from .decode.decoder import roi_for_layer as _roi_for_layer
from .decode.pixels import PixelChoice, PixelDecoder
from .decode.rescale import rescale_decoded
from .evaluate.decoding import DecodingScores, decoding_accuracy
from .evaluate.reliability import retest_reliability
from .evaluate.scores import evaluate
from .nets import load_network
from .nets.features import extract_features
from .recon.config import SUBMODELS
from .recon.icnn import Reconstruction, ReconConfig, reconstruct_decoded
from .runfolder import RunFolder, RunFolderError


class PipelineError(RuntimeError):
    """A problem with the user's inputs; the message says which file and what to do."""


MIN_IMAGE_SIZE = 16   # the VGG networks' conv5 layers sit after four 2x poolings: 16 px give them 1 x 1
EXECUTION = {"executor", "executor_options", "batch_size", "chunk_units", "feature_cache_gb",
             "evaluation"}  # never change the reconstructions or metrics.json


class PipelineConfig(DecoderConfig):
    """Everything that decides a run's result: the decoding settings (:class:`DecoderConfig`), the
    network, the reconstruction (:class:`ReconConfig`) and its evaluation. One seed: ``seed`` also
    seeds the reconstruction. Unknown fields and out-of-range values are refused."""
    network: str = Field("hed-vgg16", description="hed-vgg16, vgg19-caffe:PATH or vgg19-torchvision:PATH")
    image_size: int = Field(224, ge=MIN_IMAGE_SIZE, description="network input size in pixels")
    roi: str = Field("ROI_VC", description="ROI name or union, e.g. ROI_VC or ROI_V1+ROI_V2")
    recon_layers: list[str] | None = Field(None, description="comma-separated layers whose features the "
                                                             "reconstruction matches (default: all decoded)")
    unit_weighting: Literal["reliability", "none"] = Field(
        "reliability", description="reconstruction loss per unit: reliability (each unit weighted by its "
                                   "cross-validated decoding R^2, layers up to 200,000 units, feature cache on disk) "
                                   "or none (all units equal, as in the paper)")
    recon: ReconConfig = Field(ReconConfig(), description="reconstruction settings (brainrecon.ReconConfig)")
    generator: str | None = Field(None, description="generator for --prior generator: builtin (default) or "
                                                    "relu7:PATH to the lab's generator_relu7.pt")
    rescale: bool = Field(False, description="rescale decoded features to the true features' SD (paper; off: "
                                             "measured better here)")
    true_feature_recon: bool = Field(True, description="also reconstruct from the true features (upper bound); "
                                                       "--no-true-features skips them")
    snapshots: list[int] | None = Field(None, description="comma-separated iterations whose images are kept and "
                                                          "shown in the report (default: 0 and 5, 12.5, 25, 50% of "
                                                          "the iterations; 'none' for none)")
    pixel_baseline: bool = Field(True, description="also fit and score a linear pixel decoder (voxels -> 16x16 image, ROI and penalty by cross-validation) beside the reconstructions")
    evaluation: bool = Field(True, description="end the run with the evaluation protocol (evaluation.json, "
                                               "metrics.csv, intervals, retrieval check); off: `brainrecon "
                                               "evaluate RUN` does it later")
    exclude_labels: list[str] = Field([], description="labels whose trials are left out of every test set, e.g. "
                                                      "fixation (labels without images; repeatable)")
    labels: dict[str, str] = Field({}, description="NAME=TSV: the image stem of each label of test set NAME, for "
                                                   "files that label samples by number (TSV of label, image stem; "
                                                   "builtin: dir-imagery, the DIR imagery experiment; repeatable)")

    @model_validator(mode="after")
    def _one_seed(self) -> "PipelineConfig":
        if self.recon.seed != self.seed:
            object.__setattr__(self, "recon", self.recon.model_copy(update={"seed": self.seed}))
        return self

    @field_validator("snapshots")
    @classmethod
    def _snapshots(cls, v: list[int] | None) -> list[int] | None:
        if v is not None and any(i < 0 for i in v):
            raise ValueError("snapshot iterations are 0 or more")
        return v

    @field_validator("generator")
    @classmethod
    def _generator(cls, v: str | None) -> str | None:
        kind, sep, path = (v or "builtin").partition(":")
        if not ((kind == "builtin" and not sep) or (kind == "relu7" and sep and path)):
            raise ValueError("the generator is builtin or relu7:PATH (the lab's generator_relu7.pt)")
        return v

    def decoder_settings(self) -> dict:
        """The :class:`DecoderConfig` fields of this config (what ``FeatureDecoder`` takes)."""
        return self.model_dump(include=set(DecoderConfig.model_fields))

    def digest(self, inputs: list[Path] = (), decoding_only: bool = False, images: str = "") -> str:
        """Key of the run's cached results: the settings that decide them and the inputs' identity
        (fMRI files by path, size and time; ``images``: the identity of the stimulus images used).

        ``decoding_only``: the key of the decoded features: the decoding settings, network, image
        size, ROI and how test labels are read only (so runs that differ in reconstruction settings share them).
        """
        decoding = set(DecoderConfig.model_fields) | {"network", "image_size", "roi", "exclude_labels", "labels"}
        fields = (decoding if decoding_only else set(type(self).model_fields)) - EXECUTION
        if not decoding_only and self.recon.prior != "generator":
            fields -= {"generator"}
        ident = [(str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in map(Path, inputs) if p.exists()]
        recon = "" if decoding_only else self.recon.result_json()   # the chosen prior's settings only
        text = self.model_dump_json(include=fields - {"recon"}) + recon + json.dumps(ident) + images
        return hashlib.sha256(text.encode()).hexdigest()[:16]


IMAGERY_SET = "imagery"
IMAGERY_MAP = "dir-imagery"


def is_imagery(name: str, config: PipelineConfig) -> bool:
    """A test set is scored as imagery when it is named ``imagery`` or read with the ``dir-imagery`` label map."""
    return name == IMAGERY_SET or config.labels.get(name) == IMAGERY_MAP


def label_maps(tests: dict[str, Path], config: PipelineConfig) -> dict[str, LabelMap]:
    """The label map of each test set that has one (``config.labels``), read and checked."""
    unknown = [n for n in config.labels if n not in tests]
    if unknown:
        raise PipelineError(f"--labels {unknown[0]}={config.labels[unknown[0]]}: no test set is named {unknown[0]} "
                            f"(test sets: {', '.join(tests)}); name the test set as in --test NAME=PATH")
    return {name: read_label_map(spec, option=f"--labels {name}={spec}") for name, spec in config.labels.items()}


def snapshot_iterations(config: PipelineConfig) -> list[int]:
    """Iterations whose images are kept while reconstructing from decoded features (the final one is the result)."""
    its = config.recon.iterations
    chosen = config.snapshots if config.snapshots is not None else [0, its // 20, its // 8, its // 4, its // 2]
    return sorted({i for i in chosen if 0 <= i < its})


class Log:
    """Progress lines with elapsed time."""

    def __init__(self, quiet: bool = False):
        self.t0 = time.time()
        self.quiet = quiet
        self.times: dict[str, float] = {}
        self._stage, self._stage_t = None, self.t0

    def __call__(self, msg: str) -> None:
        if not self.quiet:
            print(f"[{time.time() - self.t0:7.1f}s] {msg}", flush=True)

    def stage(self, name: str) -> None:
        now = time.time()
        if self._stage:
            self.times[self._stage] = round(now - self._stage_t, 2)
        self._stage, self._stage_t = name, now
        if name:
            self(f"== {name}")


@dataclass
class TestSet:
    name: str
    path: Path
    fmri: FmriData
    labels: list[str]          # unique labels, in order of first appearance
    X: np.ndarray              # (n_labels, n_voxels) trial-averaged
    n_presentations: float
    images: np.ndarray = field(default=None)  # (n_labels, 3, S, S)
    imagery: bool = False                      # scored as imagery (within families, beside perception)


def load_inputs(train_path: Path, tests: dict[str, Path], images_dir: Path, config: PipelineConfig,
                log: Log) -> tuple[FmriData, np.ndarray, list[str], StimulusSet, list[TestSet]]:
    """Read and check everything: (train fMRI, train image index per sample, train labels, train images
    (a StimulusSet of ``train_labels`` at the image size), test sets)."""
    extra_rois = sorted(set(config.layer_rois.values()) - {config.roi})
    for path in [train_path, *tests.values()]:
        check_rois(path, extra_rois)
    train = read_fmri(train_path, config.roi)
    train_labels = list(dict.fromkeys(train.labels))
    index = {lab: i for i, lab in enumerate(train_labels)}
    image_index = np.array([index[lab] for lab in train.labels])
    sets = []
    maps = label_maps(tests, config)
    for name, path in tests.items():
        fmri = read_fmri(path, config.roi, label_map=maps.get(name), exclude=config.exclude_labels)
        if fmri.X.shape[1] != train.X.shape[1]:
            raise PipelineError(
                f"{path} has {fmri.X.shape[1]} voxels in {config.roi} but the training file {train_path} has "
                f"{train.X.shape[1]}: train and test files must come from the same subject and preprocessing")
        if np.isfinite(fmri.voxel_xyz).all() and np.isfinite(train.voxel_xyz).all() \
                and not np.allclose(fmri.voxel_xyz, train.voxel_xyz):
            raise PipelineError(f"{path}: the voxel coordinates of {config.roi} differ from those of {train_path}; "
                                "train and test files must list the same voxels in the same order")
        X, labels = fmri.average_by_label()
        if len(labels) < 2:
            raise PipelineError(f"{path} holds presentations of {len(labels)} image ({labels[0]}): pairwise "
                                "identification needs at least two images per test set; add images or merge "
                                "this test set with another")
        order = np.argsort(labels, kind="stable")  # a stable, readable order (labels sorted)
        X, labels = X[order], [labels[i] for i in order]
        sets.append(TestSet(name, Path(path), fmri, labels, X, len(fmri.labels) / len(labels),
                            imagery=is_imagery(name, config)))
    log(f"train: {len(train.labels)} samples of {len(train_labels)} images, {train.X.shape[1]} voxels ({config.roi})")
    for s in sets:
        log(f"test '{s.name}': {len(s.labels)} images x {s.n_presentations:g} presentations")
    try:
        train_images = load_stimulus_set("train", images_dir, train_labels, config.image_size)
    except (FileNotFoundError, StimulusError) as err:
        raise PipelineError(str(err)) from None
    for s in sets:
        try:
            s.images = load_stimulus_set(s.name, images_dir, s.labels, config.image_size).images
        except FileNotFoundError as err:
            raise PipelineError(f"test set '{s.name}' ({s.path}): {err} Trials of labels that have no image (fixation, "
                                "rest) are left out with --exclude-label NAME (repeatable)") from None
        except StimulusError as err:
            raise PipelineError(str(err)) from None
    return train, image_index, train_labels, train_images, sets


TEST_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


@dataclass
class RunModels:
    """What a run's settings resolve to, checked before any work: the network, the decoded and
    matched layers, and the generator (None unless the prior is ``generator``)."""
    network: torch.nn.Module
    layers: list[str]
    recon_layers: list[str]
    generator: torch.nn.Module | None


def check_out_folder(out: Path) -> None:
    """Refuse an output folder that is a file or cannot be created (nothing is created here)."""
    if out.exists() and not out.is_dir():
        raise PipelineError(f"{out} is a file: a run writes a folder; choose another --out")
    parent = next(p for p in [out, *out.absolute().parents] if p.exists())
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise PipelineError(f"cannot create the output folder {out}: {parent} is not a writable folder; "
                            "choose another --out")


def check_run(tests: dict[str, Path], out: Path, config: PipelineConfig) -> RunModels:
    """Check every setting that can be checked before the work starts (test-set names, the output
    folder, the network and its layers at this image size, the generator, the device) and load the
    models. Raises :class:`PipelineError` with one message naming the setting and the fix."""
    if not tests:
        raise PipelineError("no test set: give at least one with --test NAME=PATH")
    bad = [n for n in tests if not TEST_NAME.fullmatch(n)]
    if bad:
        raise PipelineError(f"test set name(s) {', '.join(map(repr, bad))}: use letters, digits, '_', '-' and '.' "
                            "(the name becomes a folder of the run), e.g. --test natural=test.h5")
    check_out_folder(Path(out))
    label_maps(tests, config)
    try:
        network = load_network(config.network)
    except (ValueError, FileNotFoundError) as err:
        raise PipelineError(str(err)) from None
    names = list(network.layer_names)
    layers = config.layers or names
    unknown = [k for k in layers if k not in names]
    if unknown or not layers:
        raise PipelineError(f"unknown layer(s) {', '.join(unknown) or '(none given)'} in --layers: the network "
                            f"{config.network} has {', '.join(names)}")
    recon_layers = config.recon_layers or layers
    unknown = [k for k in recon_layers if k not in layers]
    if unknown:
        raise PipelineError(f"recon_layers {', '.join(unknown)} are not among the decoded layers {', '.join(layers)}")
    for key in config.layer_rois:
        if not any(k == key or k.startswith(key + "_") for k in layers):
            raise PipelineError(f"--layer-roi {key}={config.layer_rois[key]}: no decoded layer is named {key} or "
                                f"starts with {key}_ (layers: {', '.join(layers)})")
    shapes = network.unit_shapes(config.image_size)
    empty = [k for k in layers if not all(shapes[k])]
    if empty:
        raise PipelineError(f"--image-size {config.image_size} is too small for layer(s) {', '.join(empty)} "
                            "(no units left after the network's poolings): use a larger --image-size")
    generator = None
    if config.recon.prior == "generator":
        from .nets.generator import load_generator
        try:
            generator = load_generator(config.generator or "builtin")
        except (ValueError, FileNotFoundError) as err:
            raise PipelineError(str(err)) from None
    device = config.recon.device
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise PipelineError(f"device {device!r} is not a torch device: use cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise PipelineError(f"device {device!r}: this machine's PyTorch sees no CUDA GPU; use device cpu")
    return RunModels(network, layers, recon_layers, generator)


def roi_for_layer(layer: str, config: PipelineConfig) -> str:
    """The ROI whose voxels decode ``layer``: the longest matching key of ``layer_rois``, else ``roi``."""
    return _roi_for_layer(layer, config.roi, config.layer_rois)


def reliability_by_roi(path: Path, fmri: FmriData) -> dict[str, float]:
    """Median single-presentation test-retest r per ROI of a test file (and of the analysed ROI)."""
    out = {}
    for key in roi_keys(path):
        sub = fmri.read_roi(key)
        r = retest_reliability(sub.X, sub.labels)
        if np.isfinite(r).any():
            out[key] = float(np.nanmedian(r))
    r = retest_reliability(fmri.X, fmri.labels)
    if np.isfinite(r).any():
        out[f"{fmri.roi} (analysed)"] = float(np.nanmedian(r))
    return out


def _save_png(image: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(png_bytes(image))


def decode_sets(train: FmriData, train_images: StimulusSet, sets: list[TestSet], models: RunModels,
                config: PipelineConfig, cache_root: Path, dcache: Path, log: Log) -> dict[str, DecodedFeatures]:
    """Decoded features of every test set: reused from ``dcache`` when a run with the same decoding
    settings and inputs finished them, else fitted and decoded (and saved there)."""
    decoded = load_decoded(dcache, log) if (dcache / "complete").exists() else None
    if decoded is not None and set(decoded) == {s.name for s in sets}:
        log.stage("decoding")
        log(f"  reused decoded features from {dcache}")
        return decoded
    (dcache / "complete").unlink(missing_ok=True)
    settings = config.decoder_settings() | {"layers": models.layers}
    decoder = FeatureDecoder(models.network, config.image_size, cache_dir=cache_root,
                             tasks_dir=dcache / "decoded_chunks", log=log, **settings).fit(
        train, train_images, n_presentations=sorted({s.n_presentations for s in sets}))
    if config.unit_weighting == "reliability" and not (decoder.store_ == "disk" and config.decoder in ("kernel", "banded")):
        log("  note: reliability weights need a kernel (or banded) decoder and the training features on disk; "
            "the reconstruction weighs every unit equally")
    decoded = decoder.predict_sets({s.name: s.fmri for s in sets})
    save_decoded(dcache, decoded)
    (dcache / "complete").touch()
    return decoded


def feature_accuracy(decoded: DecodedFeatures, true: dict[str, np.ndarray]) -> dict[str, DecodingScores]:
    """Per layer: profile and pattern correlation and feature identification of decoded against true
    features ``true`` {layer: (n, *unit_shape)}."""
    out = {}
    for layer, d in decoded.features.items():
        t = true[layer].reshape(len(d), -1)
        out[layer] = decoding_accuracy(d.reshape(len(t), -1), t, decoded.train_mean[layer].ravel(),
                                       decoded.train_sd[layer])
    return out


def reconstruct_set(s: TestSet, kind: str, features: DecodedFeatures, models: RunModels, config: PipelineConfig,
                    cache: Path, folder: RunFolder, log: Log) -> Reconstruction:
    """The reconstructions of one test set from ``kind`` (decoded or true) features: reused when finished
    (checkpointed batches otherwise resume), and written as PNGs into the run folder."""
    log.stage(f"reconstructing '{s.name}' from {kind} features ({len(s.labels)} images, "
              f"{config.recon.iterations} iterations)")
    npy, snap_file = cache / f"recon_{s.name}_{kind}.npy", cache / f"recon_{s.name}_{kind}_snapshots.npz"
    images = load_or_none(npy, load_npy, log)
    if images is not None and images.shape != (len(s.labels), 3, config.image_size, config.image_size):
        log(f"  warning: {npy} holds images of shape {images.shape}; computing them again")
        images = None
    if images is not None:
        snaps = {int(k): v for k, v in (load_or_none(snap_file, load_npz, log) or {}).items()}
        log(f"  reused finished reconstructions of {len(images)} images from {npy}")
        rec = Reconstruction(images, s.labels, snaps)
    else:
        recon_cfg = config.recon.model_copy(   # snapshots are kept (and shown) for the decoded features only
            update={"snapshots": snapshot_iterations(config) if kind == "decoded" else []})
        rec = reconstruct_decoded(features, models.network, recon_cfg, unit_weighting=config.unit_weighting,
                                  layers=models.recon_layers, generator=models.generator,
                                  checkpoint=cache / f"checkpoint_{s.name}_{kind}",
                                  progress=lambda i, n: log(f"  {i}/{n} images"), log=log)
        save_npz(snap_file, **{str(it): v for it, v in rec.snapshots.items()})
        save_npy(npy, rec.images)
    for lab, img in zip(s.labels, rec.images):
        _save_png(img, folder.recon_png(s.name, lab, kind))
    if kind == "decoded":
        for it, imgs in rec.snapshots.items():
            for lab, img in zip(s.labels, imgs):
                _save_png(img, folder.snapshot_png(s.name, lab, it))
    return rec


def _describe(config: PipelineConfig, train_path: Path, tests: dict[str, Path], images_dir: Path) -> dict:
    """The settings and inputs of a run, flat, to say what differs from an earlier run in the same folder."""
    flat = {k: v for k, v in config.model_dump(exclude={"recon"} | EXECUTION).items()}
    for k, v in json.loads(config.recon.result_json()).items():   # the chosen prior's settings, one key each
        sub = k in SUBMODELS
        flat.update({f"recon.{k}.{kk}": vv for kk, vv in v.items()} if sub else {f"recon.{k}": v})
    flat.update(train=str(train_path), images=str(images_dir), **{f"test {k}": str(v) for k, v in tests.items()})
    return json.loads(json.dumps(flat, default=str))


def run_pipeline(train_path: Path, tests: dict[str, Path], images_dir: Path, out: Path,
                 config: PipelineConfig | None = None, log: Log | None = None, extra: dict | None = None,
                 cache_root: Path | None = None, overwrite: bool = False) -> dict:
    """Run every stage: decode, reconstruct, evaluate, report (``brainrecon run``).

    Writes the run folder (:class:`~brainrecon.runfolder.RunFolder`: metrics.json, report.html,
    recon/<set>/<label>.png, snapshots, config.json, run.json). ``cache_root`` (default
    ``out/cache``) holds the reusable intermediate results; runs that share it share their training
    features. A folder holding another run is refused unless ``overwrite``. Returns the metrics.
    """
    from .report.html import write_report

    config, log, out = config or PipelineConfig(), log or Log(), Path(out)
    tests = {k: Path(v) for k, v in tests.items()}
    models = check_run(tests, out, config)      # every setting, before any work
    torch.manual_seed(config.seed)
    log.stage("loading fMRI and images")
    train, image_index, train_labels, train_images, sets = load_inputs(train_path, tests, images_dir, config, log)
    identity = "|".join([train_images.identity, *(StimulusSet(s.name, s.labels, s.images).identity for s in sets),
                         *(s.fmri.label_map.identity for s in sets if s.fmri.label_map is not None)])
    digest = config.digest([train_path, *tests.values()], images=identity)
    folder, settings = RunFolder(out), _describe(config, train_path, tests, images_dir)
    try:
        resumed = folder.claim(digest, settings, overwrite)
    except RunFolderError as err:
        raise PipelineError(str(err)) from None
    if resumed:
        log(f"  resuming the run in {out}")
    cache_root = Path(cache_root) if cache_root is not None else folder.cache
    cache = cache_root / digest
    cache.mkdir(parents=True, exist_ok=True)
    write_json(folder.config, run_config_json(config, train_path, tests, images_dir))

    dcache = cache_root / f"decoded-{config.digest([train_path, *tests.values()], True, identity)}"
    decoded = decode_sets(train, train_images, sets, models, config, cache_root, dcache, log)
    baselines = pixel_baselines(train_path, image_index, train_images, sets, config, cache, log) \
        if config.pixel_baseline else {}
    metrics, shown = {}, {}
    for s in sets:
        metrics[s.name], shown[s.name] = _run_set(s, decoded[s.name], models, config, cache, folder, log,
                                                  first=s is sets[0])
        if s.name in baselines:
            images, choice = baselines[s.name]
            metrics[s.name].update(baseline_metrics(images, choice, s))
            shown[s.name][2]["pixel decoder"] = images
    for s in sets:
        if s.imagery:
            metrics[s.name]["imagery"], shown[s.name][2]["perception"] = imagery_scores(s, sets, shown, log)
    log.stage("")
    write_json(folder.metrics, metrics)
    run_info = {"brainrecon": __version__, "config_digest": digest, "train": str(train_path),
                "tests": {k: str(v) for k, v in tests.items()}, "images": str(images_dir),
                "n_voxels": int(train.X.shape[1]), "n_train_samples": len(train.labels),
                "n_train_images": len(train_labels),
                "alphas": {k: p.to_json() for k, p in next(iter(decoded.values())).alphas.items()},
                "layer_rois": {layer: roi_for_layer(layer, config) for layer in models.layers},
                "stage_seconds": log.times, "total_seconds": round(time.time() - log.t0, 1),
                "settings": settings, "decoded_cache": str(dcache), **(extra or {})}
    write_json(folder.run_info, run_info)
    evaluation = _evaluate(folder, log) if config.evaluation else ""
    write_report(folder.report, metrics, run_info, config, shown, evaluation=evaluation)
    log(f"wrote {folder.metrics} and {folder.report}")
    return metrics


def _evaluate(folder: RunFolder, log: Log) -> str:
    """The Kamitani protocol with intervals and the retrieval check (evaluation.json, metrics.csv); the
    report's section of them."""
    from .evaluate.protocol import evaluate_run
    from .report.evaluation import evaluation_section
    log.stage("evaluating: intervals, n-way identification, retrieval check")
    evaluation = evaluate_run(folder.root, "kamitani", log=log)
    log.stage("")
    return evaluation_section(evaluation.to_json(), folder)


def _run_set(s: TestSet, d: DecodedFeatures, models: RunModels, config: PipelineConfig, cache: Path,
             folder: RunFolder, log: Log, first: bool = False) -> tuple[dict, tuple]:
    """Reconstruct and score one test set: (its metrics.json entry, what the report shows of it)."""
    true = extract_features(models.network, s.images, models.layers)
    accuracy = feature_accuracy(d, true)
    log(f"  profile r '{s.name}': " + ", ".join(f"{k} {v.profile_correlation:.3f}" for k, v in accuracy.items()))
    if config.rescale:
        d = replace(d, features={k: rescale_decoded(v, d.train_mean[k].reshape(v.shape[1:]), d.channel_sd[k])
                                 for k, v in d.features.items()})
    # imagery targets are images of the perception sets: their true features are the same, not reconstructed again
    kinds = {"decoded": d, **({"true": replace(d, features=true)} if config.true_feature_recon and not s.imagery else {})}
    if first and config.unit_weighting == "reliability" and d.unit_r2:
        log(f"  reconstruction loss weighs units by decoding reliability in "
            f"{sum(k in d.unit_r2 for k in models.recon_layers)} of {len(models.recon_layers)} layers")
    recs = {kind: reconstruct_set(s, kind, f, models, config, cache, folder, log) for kind, f in kinds.items()}
    log.stage(f"evaluating '{s.name}'")
    entry = set_metrics(s, recs, accuracy)
    log(f"  pixel identification {entry['pixel_identification']:.3f}" +
        (f" (true features {entry['pixel_identification_true_features']:.3f})" if "true" in recs else ""))
    shown = {k: r.images for k, r in recs.items()}
    if recs["decoded"].snapshots:
        shown["snapshots"] = recs["decoded"].snapshots
    return entry, (s.labels, s.images, shown)


def baseline_rois(path: Path, roi: str) -> list[str]:
    """Candidate ROIs of the pixel decoder: the analysed ROI, the early areas (ROI_LVC, else the union
    of V1, V2, V3) and the higher ones (ROI_HVC, else the union of hV4/V4, LOC, FFA, PPA), each where
    the file has it. (Each candidate costs one kernel ridge fit and its cross-validation.)"""
    keys = roi_keys(path)

    def union(names: tuple[str, ...], whole: str) -> list[str]:
        if whole in keys:
            return [whole]
        present = [k for k in names if k in keys]
        return ["+".join(present)] if len(present) >= 2 else []

    early = union(("ROI_V1", "ROI_V2", "ROI_V3"), "ROI_LVC")
    higher = union(("ROI_hV4", "ROI_V4", "ROI_LOC", "ROI_FFA", "ROI_PPA"), "ROI_HVC")
    return list(dict.fromkeys([roi, *early, *higher]))


def pixel_baselines(train_path: Path, image_index: np.ndarray, train_images: StimulusSet, sets: list[TestSet],
                    config: PipelineConfig, cache: Path, log: Log) -> dict[str, tuple[np.ndarray, PixelChoice]]:
    """The linear pixel decoder's predictions of every test set, (n, 3, S, S) at the image size, and
    what cross-validation chose for it (ROI, penalty), reused from ``cache`` when finished."""
    log.stage("pixel-decoder baseline")
    out = {}
    for s in sets:
        npy, info = cache / f"baseline_{s.name}.npy", cache / f"baseline_{s.name}.json"
        images = load_or_none(npy, load_npy, log) if info.exists() else None
        if images is not None and images.shape == s.images.shape:
            out[s.name] = (images, PixelChoice(**json.loads(info.read_text())))
    todo = [s for s in sets if s.name not in out]
    if not todo:
        log("  reused the pixel decoder's predictions")
        return out
    rois = baseline_rois(train_path, config.roi)
    X = {roi: read_fmri(train_path, roi).X for roi in rois}
    reps = sorted({s.n_presentations for s in todo})
    decoder = PixelDecoder(alphas=np.asarray(config.alphas)).fit(X, image_index, train_images.images, reps)
    for s in todo:
        choice = decoder.choice(s.n_presentations)
        Xt, labels = s.fmri.read_roi(choice.roi).average_by_label()
        Xt = Xt[[labels.index(lab) for lab in s.labels]]
        images = decoder.predict_images(Xt, config.image_size, s.n_presentations)
        save_npy(npy := cache / f"baseline_{s.name}.npy", images)
        write_json(cache / f"baseline_{s.name}.json", choice.to_json())
        log(f"  '{s.name}': {choice.roi}, alpha {choice.alpha:g} (leave-one-image-out R^2 {choice.cv_r2:.3f}) -> {npy.name}")
        out[s.name] = (images, choice)
    return out


def baseline_metrics(images: np.ndarray, choice: PixelChoice, s: TestSet) -> dict:
    """metrics.json keys of the pixel decoder on one test set (``baseline_*``)."""
    scores = evaluate(images, s.images).summary()
    return {**{f"baseline_{k}": v for k, v in scores.items()}, "baseline_roi": choice.roi,
            "baseline_alpha": choice.alpha, "baseline_cv_r2": choice.cv_r2}


def set_metrics(s: TestSet, recs: dict[str, Reconstruction], accuracy: dict[str, DecodingScores]) -> dict:
    """metrics.json's entry of one test set."""
    scores = evaluate(recs["decoded"].images, s.images)
    entry = {**scores.summary(), "n_images": len(s.labels), "n_presentations": s.n_presentations,
             "feature_decoding": {layer: a.to_json() for layer, a in accuracy.items()},
             "per_image_pixel_identification": dict(zip(s.labels, map(float, scores.per_image_identification))),
             "test_retest_median_r": reliability_by_roi(s.path, s.fmri)}
    if "true" in recs:
        entry.update(evaluate(recs["true"].images, s.images).summary("_true_features"))
    return entry


def imagery_scores(s: TestSet, sets: list[TestSet], shown: dict, log: Log) -> tuple[dict, np.ndarray]:
    """metrics.json's ``imagery`` entry of an imagery set (within-family scores beside the perception sets'
    reconstructions of the same targets, and the per-ROI information bound), and those perception
    reconstructions (n, 3, H, W), NaN for targets no perception set of the run holds."""
    from .evaluate.imagery import information_bound, score_imagery

    recon = shown[s.name][2]["decoded"]
    perceived = {lab: (p, i) for p in sets if not p.imagery for i, lab in enumerate(p.labels)}
    perception = np.full(recon.shape, np.nan, dtype=np.float32)
    for i, lab in enumerate(s.labels):
        if lab in perceived:
            p, j = perceived[lab]
            perception[i] = shown[p.name][2]["decoded"][j]
    scores = score_imagery(recon, s.images, s.labels, perception)
    held = [lab for lab in s.labels if lab in perceived]
    if len(held) >= 2:
        sources = {perceived[lab][0].name: perceived[lab][0] for lab in held}
        shared = [k for k in roi_keys(s.path) if all(k in roi_keys(p.path) for p in sources.values())]
        for key in shared:
            X, labs = s.fmri.read_roi(key).average_by_label()
            imagery = dict(zip(labs, X))
            seen = {}
            for p in sources.values():
                X, labs = p.fmri.read_roi(key).average_by_label()
                seen.update({lab: x for lab, x in zip(labs, X) if lab in imagery})
            scores.information_bound[key] = information_bound(np.stack([imagery[lab] for lab in held]),
                                                              np.stack([seen[lab] for lab in held]), held)
    for f, fs in scores.families.items():
        log(f"  imagery '{s.name}' {f}: pixel identification within the family {fs.pixel_identification:.3f}" +
            ("" if fs.perception_pixel_identification is None else
             f" (perception of the same targets {fs.perception_pixel_identification:.3f})"))
    return scores.to_json(), perception


def run_config_json(config: PipelineConfig, train_path: Path, tests: dict[str, Path], images_dir: Path) -> dict:
    """config.json: the inputs (absolute paths) and every setting, readable back by ``brainrecon run``."""
    return {"train": str(Path(train_path).resolve()), "test": {k: str(Path(v).resolve()) for k, v in tests.items()},
            "images": str(Path(images_dir).resolve()), **json.loads(config.model_dump_json())}
