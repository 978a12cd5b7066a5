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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import h5py
import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator

from . import __version__
from .cache import load_npy, load_npz, load_or_none, save_npy, save_npz, write_json, write_text
from .data.bdata import FmriData, check_rois, read_fmri, roi_keys
from .data.stimuli import StimulusError, load_stimulus_set, png_bytes
from .decode.rescale import rescale_decoded
from .decode.ridge import DEFAULT_ALPHAS, KernelRidgeDecoder, unit_r2
from .evaluate.decoding import decoding_accuracy
from .evaluate.identification import pairwise_identification
from .evaluate.reliability import retest_reliability
from .evaluate.similarity import pixel_correlation, ssim
from .nets import load_network
from .nets.features import extract_features
from .recon.icnn import ReconConfig, display_normalise, reconstruct
from .recon.objective import reliability_weights


class PipelineError(RuntimeError):
    """A problem with the user's inputs; the message says which file and what to do."""


MIN_IMAGE_SIZE = 16   # the VGG networks' conv5 layers sit after four 2x poolings: 16 px give them 1 x 1


class PipelineConfig(BaseModel):
    """Everything that decides a run's result. Unknown fields and out-of-range values are refused."""
    model_config = ConfigDict(extra="forbid")

    network: str = "hed-vgg16"
    image_size: int = Field(224, ge=MIN_IMAGE_SIZE)
    layers: list[str] | None = None          # decoded layers; None: every layer of the network
    recon_layers: list[str] | None = None    # layers whose features the reconstruction matches; None: all decoded
    roi: str = "ROI_VC"
    layer_rois: dict[str, str] = {}           # layer name or prefix -> ROI decoding it, e.g. {"conv1": "ROI_V1+ROI_V2+ROI_V3"}
    alphas: list[float] = Field(default_factory=lambda: DEFAULT_ALPHAS.tolist(), min_length=1)
    alpha_sample_units: int = Field(256, ge=1)  # units per layer used to choose its penalty
    decoder: Literal["kernel", "selection"] = "kernel"  # "kernel": all-voxel kernel ridge, penalty by CV; "selection": FastL2LiR
    alpha_per: Literal["layer", "unit"] = "layer"  # kernel ridge penalty: "layer" (CV on a unit sample) or "unit" (each unit's own)
    alpha_cv: Literal["averaged", "single"] = "averaged"  # layer penalty scored for each test set's trial-averaged inputs, or single trials
    train_trials: Literal["averaged", "single"] = "averaged"  # kernel decoder fit on each training image's mean presentation, or on every presentation (paper)
    unit_alpha_max_units: int = Field(200_000, ge=0)  # alpha_per "unit": larger layers keep one penalty (cost 2 n_images^2 flops per unit and penalty)
    unit_alpha_span: float = Field(30.0, ge=1.0)      # alpha_per "unit": penalties searched within this factor of the layer's
    unit_weighting: Literal["reliability", "none"] = "reliability"  # reconstruction loss per unit: its cross-validated decoding R^2, or equal
    unit_weight_max_units: int = Field(200_000, ge=0)  # per-unit R^2 for layers up to this size (cost 2 n_images^2 flops per unit); larger: equal weights
    selection_alpha: float = Field(100.0, gt=0)  # penalty of the voxel-selection decoder (the lab's default)
    selection_voxels: int = Field(500, ge=1)     # voxels per unit of the voxel-selection decoder (the lab's default)
    recon: ReconConfig = ReconConfig()
    generator: str | None = None             # for recon.prior "generator": "builtin" or "relu7:PATH"
    rescale: bool = False                    # rescale decoded features to the true features SD (paper); off: measured better here
    true_feature_recon: bool = True          # also reconstruct from the true features (upper bound)
    snapshots: list[int] | None = None       # iterations whose images are kept (from decoded features); None: 0, 5%, 12.5%, 25%, 50%
    feature_store: Literal["auto", "disk", "stream"] = "auto"  # training features: "disk" (HDF5 cache), "stream" (never stored), "auto"
    feature_cache_gb: float = Field(8.0, gt=0)  # "auto" streams when the cache would be larger than this
    batch_size: int = Field(16, ge=1)        # images per forward pass when extracting features
    chunk_units: int = Field(65536, ge=1)    # units per decoding task (cached features)
    executor: str = "local"                  # decoding tasks: local, processes:N, dask, dask:ADDRESS, dask-jobqueue:CLASS
    executor_options: dict = {}              # keyword arguments of the Dask cluster
    seed: int = Field(0, ge=0)

    @field_validator("alphas")
    @classmethod
    def _positive_alphas(cls, v: list[float]) -> list[float]:
        if not all(np.isfinite(a) and a > 0 for a in v):
            raise ValueError("ridge penalties must be finite and > 0")
        return v

    @field_validator("snapshots")
    @classmethod
    def _snapshots(cls, v: list[int] | None) -> list[int] | None:
        if v is not None and any(i < 0 for i in v):
            raise ValueError("snapshot iterations are 0 or more")
        return v

    @field_validator("executor")
    @classmethod
    def _executor(cls, v: str) -> str:
        from .executors import check_spec
        return check_spec(v)

    @field_validator("generator")
    @classmethod
    def _generator(cls, v: str | None) -> str | None:
        kind, sep, path = (v or "builtin").partition(":")
        if not ((kind == "builtin" and not sep) or (kind == "relu7" and sep and path)):
            raise ValueError("the generator is builtin or relu7:PATH (the lab's generator_relu7.pt)")
        return v

    def digest(self, inputs: list[Path] = (), decoding_only: bool = False) -> str:
        """Key of the run's cached results: the settings that change them and the input files' identity.

        ``decoding_only``: the key of the decoded features, which reconstruction settings do not change.
        """
        exclude = {"executor", "executor_options", "batch_size", "chunk_units", "feature_store", "feature_cache_gb"}
        if decoding_only:
            exclude |= {"recon", "recon_layers", "rescale", "true_feature_recon", "snapshots", "unit_weighting"}
        ident = [(str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in map(Path, inputs) if p.exists()]
        text = self.model_dump_json(exclude=exclude) + json.dumps(ident)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


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


def _check_fmri(fmri: FmriData) -> None:
    bad = ~np.isfinite(fmri.X)
    if bad.any():
        raise PipelineError(f"{fmri.path}: {int(bad.any(0).sum())} voxel(s) of {fmri.roi} hold NaN or inf values; "
                            "remove those voxels from the file or choose another ROI with --roi")


def load_inputs(train_path: Path, tests: dict[str, Path], images_dir: Path, config: PipelineConfig,
                log: Log) -> tuple[FmriData, np.ndarray, list[str], np.ndarray, list[TestSet]]:
    """Read and check everything: (train fMRI, train image index per sample, train labels, train images, test sets)."""
    extra_rois = sorted(set(config.layer_rois.values()) - {config.roi})
    for path in [train_path, *tests.values()]:
        check_rois(path, extra_rois)
    train = read_fmri(train_path, config.roi)
    _check_fmri(train)
    train_labels = list(dict.fromkeys(train.labels))
    index = {lab: i for i, lab in enumerate(train_labels)}
    image_index = np.array([index[lab] for lab in train.labels])
    sets = []
    for name, path in tests.items():
        fmri = read_fmri(path, config.roi)
        _check_fmri(fmri)
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
        sets.append(TestSet(name, Path(path), fmri, labels, X, len(fmri.labels) / len(labels)))
    log(f"train: {len(train.labels)} samples of {len(train_labels)} images, {train.X.shape[1]} voxels ({config.roi})")
    for s in sets:
        log(f"test '{s.name}': {len(s.labels)} images x {s.n_presentations:g} presentations")
    try:
        train_images = load_stimulus_set("train", images_dir, train_labels, config.image_size).images
        for s in sets:
            s.images = load_stimulus_set(s.name, images_dir, s.labels, config.image_size).images
    except (FileNotFoundError, StimulusError) as err:
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
    keys = [k for k in config.layer_rois if layer == k or layer.startswith(k + "_")]
    return config.layer_rois[max(keys, key=len)] if keys else config.roi


def reliability_by_roi(path: Path, fmri: FmriData) -> dict[str, float]:
    """Median single-presentation test-retest r per ROI of a test file (and of the analysed ROI)."""
    out = {}
    for key in roi_keys(path):
        sub = read_fmri(path, key)
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


def image_scores(images: np.ndarray, stimuli: np.ndarray, suffix: str = "") -> tuple[np.ndarray, dict[str, float]]:
    """Per-image pixel identification (n,) and the set's mean pixel identification, pixel
    correlation and SSIM (keys end in ``suffix``) of reconstructions against their stimuli (n, 3, H, W)."""
    ident = pairwise_identification(images, stimuli)
    return ident, {f"pixel_identification{suffix}": float(ident.mean()),
                   f"pixel_correlation{suffix}": float(pixel_correlation(images, stimuli).mean()),
                   f"ssim{suffix}": float(ssim(images, stimuli).mean())}


def grid_edge_warning(layer: str, alphas: np.ndarray, scores: np.ndarray, tol: float = 1e-3) -> str | None:
    """A warning if the best penalty is at an end of the grid and the CV R^2 still improves there by
    more than ``tol`` (a flat end means the penalty hardly matters there); scores (n_alphas,)."""
    best = int(np.argmax(scores))
    if len(scores) < 2 or best not in (0, len(scores) - 1):
        return None
    if scores[best] - scores[1 if best == 0 else -2] <= tol:
        return None
    return (f"  warning: {layer} penalty {alphas[best]:g} is at the edge of the search grid, where the "
            "cross-validated R^2 still improves: widen alphas")


def _load_training_stats(stats_path: Path, feat_path: Path | None, layers: list[str], shapes: dict, n_images: int,
                         log: Log):
    """The saved training statistics per layer (and, with ``feat_path``, a check that the feature cache
    opens and holds every layer whole), or None if absent or unreadable (with a warning)."""
    from .decode.streaming import LayerStats

    if feat_path is not None and not feat_path.exists():
        return None
    z = load_or_none(stats_path, load_npz, log)
    if z is None:
        return None
    try:
        lstats = {k: LayerStats(tuple(z[f"{k}/shape"]), z[f"{k}/mean"], z[f"{k}/sd"], float(z[f"{k}/channel_sd"]),
                                z[f"{k}/sample_index"], z[f"{k}/sample"]) for k in layers}
    except KeyError as err:
        log(f"  warning: {stats_path} lacks {err}; computing the training statistics again")
        return None
    if feat_path is not None:
        def check(path: Path) -> bool:
            with h5py.File(path, "r") as f:
                return bool(f.attrs.get("complete", False)) and all(
                    k in f and f[k].shape == (n_images, int(np.prod(shapes[k]))) for k in layers)
        if not load_or_none(feat_path, check, log):
            if feat_path.exists():
                log(f"  warning: {feat_path} does not hold these layers' features; computing them again")
            return None
    return lstats


def decode_stage(train_path: Path, train: FmriData, image_index: np.ndarray, train_labels: list[str],
                 train_images: np.ndarray, sets: list[TestSet], network, layers: list[str], config: PipelineConfig,
                 cache_root: Path, cache: Path, log: Log):
    """Fit the decoders and decode every test set.

    Returns (decoded {set: {layer: (n, *shape)}}, empty decoding-score dicts per set,
    statistics {"<layer>/mean" (shape), "<layer>/sd" (units,), "<layer>/true_sd", "<layer>/cv_r2", and with the
    feature cache on disk "<layer>/unit_r2" (shape): each unit's leave-one-image-out R^2},
    {layer: {"alpha", "cv_r2", "roi", "unit_r2_median"}}).
    """
    from .decode.streaming import (combination_weights, read_unit_results, readout_cached, readout_stream,
                                   training_pass)
    from .executors import make_executor

    shapes = network.unit_shapes(config.image_size)
    units = {k: int(np.prod(shapes[k])) for k in layers}
    counts = np.bincount(image_index, minlength=len(train_labels))
    cache_bytes = 4 * len(train_images) * sum(units.values())
    mode = config.feature_store
    if config.decoder == "selection":
        mode = "disk"     # each unit's own voxels: its training features are needed whole
    if mode == "auto":
        mode = "disk" if cache_bytes <= config.feature_cache_gb * 1e9 else "stream"
    per_unit_alpha = config.alpha_per == "unit" and config.decoder == "kernel"
    if per_unit_alpha and mode != "disk":
        raise PipelineError("alpha_per 'unit' needs the training features on disk, but they are streamed "
                            f"({cache_bytes / 1e9:.1f} GB): set feature_store: disk (and feature_cache_gb) "
                            "or use alpha_per: layer")
    # each unit's cross-validated R^2 (shown in the report; weighs the units of the reconstruction loss)
    unit_reliability = mode == "disk" and config.decoder == "kernel"
    if not unit_reliability and config.unit_weighting == "reliability":
        log("  note: reliability weights need the kernel decoder and the training features on disk; "
            "the reconstruction weighs every unit equally")

    # training features depend only on the network, input size, layers and images: shared by runs that differ otherwise
    feat_key = hashlib.sha256(json.dumps([config.network, config.image_size, layers, train_labels]).encode()).hexdigest()[:16]
    feat_path = cache_root / f"features-{feat_key}.h5"
    stats_path = cache_root / f"stats-{feat_key}-{config.alpha_sample_units}-{config.seed}.npz"
    log.stage(f"features of {len(train_images)} training images ({len(layers)} layers, {config.image_size} px, "
              f"{cache_bytes / 1e9:.1f} GB: {'cached on disk' if mode == 'disk' else 'streamed'})")
    progress = lambda i, n: log(f"  {i}/{n} images") if i == n or i % (20 * config.batch_size) == 0 else None
    lstats = _load_training_stats(stats_path, feat_path if mode == "disk" else None, layers, shapes, len(train_images),
                                  log)
    if lstats is not None:
        log(f"  reused training statistics from {stats_path.name}" +
            (f" and feature cache {feat_path.name}" if mode == "disk" else ""))
    else:
        lstats = training_pass(network, train_images, layers, counts, config.alpha_sample_units, seed=config.seed,
                               batch_size=config.batch_size, cache=feat_path if mode == "disk" else None,
                               progress=progress)
        save_npz(stats_path, **{f"{k}/{f}": getattr(v, f) for k, v in lstats.items()
                                for f in ("shape", "mean", "sd", "channel_sd", "sample_index", "sample")})

    log.stage("fitting decoders")
    decoders: dict[str, tuple[KernelRidgeDecoder, dict[str, np.ndarray]]] = {}

    def decoder_for(layer: str) -> tuple[KernelRidgeDecoder, dict[str, np.ndarray]]:
        """The decoder of the layer's ROI and the test sets' trial-averaged voxels of that ROI."""
        roi = roi_for_layer(layer, config)
        if roi not in decoders:
            if roi == config.roi:
                X_train, X_test = train.X, {s.name: s.X for s in sets}
            else:
                sub = read_fmri(train_path, roi)
                _check_fmri(sub)
                X_train, X_test = sub.X, {}
                for s in sets:
                    sub = read_fmri(s.path, roi)
                    _check_fmri(sub)
                    X, labels = sub.average_by_label()
                    X_test[s.name] = X[[labels.index(lab) for lab in s.labels]]
            average = config.train_trials == "averaged" and config.decoder == "kernel"
            log(f"  decoder for {roi}: {X_train.shape[1]} voxels, fit on "
                + (f"the mean presentation of each of {len(counts)} images" if average
                   else f"{len(image_index)} single presentations"))
            decoders[roi] = (KernelRidgeDecoder(np.array(config.alphas)).fit(X_train, image_index, average), X_test)
        return decoders[roi]

    C, alphas, stats = {}, {}, {}
    # score penalties for inputs averaged as each test set's are (kernel decoder, one penalty per layer)
    averaged = sorted({s.n_presentations for s in sets}) if config.alpha_cv == "averaged" and not per_unit_alpha else []
    if config.alpha_cv == "averaged" and per_unit_alpha:
        log("  note: per-unit penalties are chosen for single presentations (alpha_cv applies to alpha_per: layer)")
    elif config.alpha_cv == "averaged" and counts.max() < 2:
        log("  note: no training image is shown twice, so the trial noise cannot be measured; "
            "penalties are chosen for single presentations")
    for layer in layers:
        decoder, test_X = decoder_for(layer)
        st = lstats[layer]
        # single presentations (None: the per-unit statistics use this penalty), then each test set's averaging
        table = dict(zip([None] + averaged, decoder.cv_scores_averaged(st.sample, [None] + averaged)))
        scores = table[None]
        alpha = float(decoder.alphas[int(np.argmax(scores))])
        alphas[layer] = {"alpha": alpha, "cv_r2": float(scores.max()), "roi": roi_for_layer(layer, config)}
        test_scores = {s.name: table[s.n_presentations if averaged else None] for s in sets}
        test_alpha = {n: float(decoder.alphas[int(np.argmax(v))]) for n, v in test_scores.items()}
        if averaged:
            alphas[layer]["test_alpha"] = test_alpha
            alphas[layer]["test_cv_r2"] = {n: float(v.max()) for n, v in test_scores.items()}
        for sc in {id(v): v for v in [scores, *test_scores.values()]}.values():
            if (warning := grid_edge_warning(layer, decoder.alphas, sc)):
                log(warning)
        log(f"  {layer}: alpha {alpha:g} (CV R2 {scores.max():.3f})" + ("; averaged test trials: " + ", ".join(
            f"{n} {a:g}" for n, a in test_alpha.items()) if averaged else ""))
        C[layer] = combination_weights(np.vstack([decoder.test_weights(test_X[s.name], test_alpha[s.name])
                                                  for s in sets]), decoder.image_weights())
        stats[f"{layer}/mean"] = st.mean.reshape(shapes[layer])
        stats[f"{layer}/sd"] = st.sd
        stats[f"{layer}/true_sd"] = np.float32(st.channel_sd)
        stats[f"{layer}/cv_r2"] = np.float32(scores.max())

    per_unit = []
    if per_unit_alpha or unit_reliability:
        loo: dict[tuple[str, int], np.ndarray] = {}       # per (ROI, penalty): shared by the ROI's layers
        combos: dict[tuple[str, int], np.ndarray] = {}
        for layer in layers:
            decoder, test_X = decoder_for(layer)
            roi, alpha = roi_for_layer(layer, config), alphas[layer]["alpha"]
            own_alpha = per_unit_alpha and units[layer] <= config.unit_alpha_max_units
            if own_alpha:
                grid = [i for i, a in enumerate(decoder.alphas)
                        if alpha / config.unit_alpha_span <= a <= alpha * config.unit_alpha_span]
            elif unit_reliability and units[layer] <= config.unit_weight_max_units:
                grid = [int(np.argmin(np.abs(decoder.alphas - alpha)))]
            else:
                log(f"  {layer}: {units[layer]:,} units > unit_{'alpha' if per_unit_alpha else 'weight'}_max_units: "
                    "no per-unit " + ("penalties" if per_unit_alpha else "reliability"))
                continue
            todo = [i for i in grid if (roi, i) not in loo]
            if todo:
                log(f"  leave-one-image-out matrices for {roi}: {len(todo)} penalties")
                loo.update({(roi, i): P for i, P in zip(todo, decoder.loo_matrices(todo))})
            if own_alpha:
                for i in grid:
                    if (roi, i) not in combos:
                        combos[roi, i] = combination_weights(
                            np.vstack([decoder.test_weights(test_X[s.name], decoder.alphas[i]) for s in sets]),
                            decoder.image_weights())
                Cs = np.stack([combos[roi, i] for i in grid])
            else:   # the units' R^2 at the single-presentation penalty; decoding keeps each test set's penalty
                Cs = C[layer][None]
            C[layer] = (Cs, np.stack([loo[roi, i] for i in grid]), decoder.alphas[grid])
            per_unit.append((layer, own_alpha))

    log.stage(f"decoding {sum(len(s.labels) for s in sets)} test images ({sum(units.values()):,} units)")
    if config.decoder == "selection":
        from .decode.streaming import readout_selection
        inputs = {}
        for layer in layers:
            decoder, test_X = decoder_for(layer)
            Xt = (np.vstack([test_X[s.name] for s in sets]) - decoder.mean_) / decoder.sd_
            inputs[layer] = (decoder.Xz_.astype(np.float32), image_index, Xt.astype(np.float32),
                             lstats[layer].mean, lstats[layer].sd, config.selection_alpha, config.selection_voxels)
            alphas[layer] = {"alpha": config.selection_alpha, "voxels_per_unit": config.selection_voxels,
                             "roi": roi_for_layer(layer, config)}
        executor = make_executor(config.executor, config.executor_options)
        try:
            flat = readout_selection(feat_path, units, inputs, cache / "decoded_chunks", executor, config.chunk_units,
                                     progress=lambda i, n: log(f"  {i}/{n} tasks"), log=log)
        finally:
            if executor is not None:
                executor.close()
    elif mode == "disk":
        executor = make_executor(config.executor, config.executor_options)
        try:
            flat = readout_cached(feat_path, C, units, cache / "decoded_chunks", executor, config.chunk_units,
                                  progress=lambda i, n: log(f"  {i}/{n} tasks") if i == n or i % 50 == 0 else None,
                                  log=log)
        finally:
            if executor is not None:
                executor.close()
    else:
        flat = readout_stream(network, train_images, C, config.batch_size, progress=progress)
    n_samples = int(counts.sum())
    for layer, own_alpha in per_unit:
        done = cache / "decoded_chunks"
        if own_alpha:
            ua = read_unit_results(done, layer, units[layer], config.chunk_units, "alpha")
            values, counts_a = np.unique(ua, return_counts=True)
            alphas[layer].update(alpha_per="unit", unit_alpha_median=float(np.median(ua)),
                                 unit_alpha_counts={f"{v:g}": int(c) for v, c in zip(values, counts_a)})
            stats[f"{layer}/unit_alpha"] = ua.reshape(shapes[layer])
            log(f"  {layer}: per-unit penalties, median {np.median(ua):g} (layer {alphas[layer]['alpha']:g})")
        r2 = unit_r2(read_unit_results(done, layer, units[layer], config.chunk_units, "cverror"),
                     lstats[layer].sd, n_samples)
        alphas[layer]["unit_r2_median"] = float(np.median(r2))
        stats[f"{layer}/unit_r2"] = r2.reshape(shapes[layer])
    decoded, row = {}, 0
    for s in sets:
        decoded[s.name] = {k: flat[k][row:row + len(s.labels)].reshape(len(s.labels), *shapes[k]) for k in layers}
        row += len(s.labels)
    return decoded, {s.name: {} for s in sets}, stats, alphas


def _load_decoded(dcache: Path, sets: list[TestSet], layers: list[str], log: Log):
    """The decoded features, statistics and penalties of a finished decoding, or None (with a warning)
    if a file of it is unreadable or lacks a test set or layer: then decoding runs again."""
    z = load_or_none(dcache / "decoded.npz", load_npz, log)
    stats = load_or_none(dcache / "feature_stats.npz", load_npz, log)
    alphas = load_or_none(dcache / "alphas.json", lambda p: json.loads(p.read_text()), log)
    if z is None or stats is None or alphas is None:
        return None
    try:
        decoded = {s.name: {k: z[f"{s.name}/{k}"] for k in layers} for s in sets}
    except KeyError as err:
        log(f"  warning: {dcache / 'decoded.npz'} lacks {err}; decoding again")
        return None
    return decoded, stats, alphas


def run_pipeline(train_path: Path, tests: dict[str, Path], images_dir: Path, out: Path,
                 config: PipelineConfig | None = None, log: Log | None = None, extra: dict | None = None,
                 cache_root: Path | None = None) -> dict:
    """Run every stage; writes ``out/metrics.json``, ``out/report.html``, ``out/recon/<set>/<label>.png``
    (and ``out/recon_snapshots/<set>/<label>/iterNNNNN.png``, the images at earlier iterations).

    ``cache_root`` (default ``out/cache``) holds the reusable intermediate results; runs that share
    it share their training features. Returns the metrics dictionary.
    """
    from .report.html import write_report

    config = config or PipelineConfig()
    log = log or Log()
    out = Path(out)
    tests = {k: Path(v) for k, v in tests.items()}
    models = check_run(tests, out, config)      # every setting, before any work
    network, layers, recon_layers, generator = models.network, models.layers, models.recon_layers, models.generator
    torch.manual_seed(config.seed)

    log.stage("loading fMRI and images")
    train, image_index, train_labels, train_images, sets = load_inputs(train_path, tests, images_dir, config, log)
    digest = config.digest([train_path, *tests.values()])
    out.mkdir(parents=True, exist_ok=True)
    cache_root = Path(cache_root) if cache_root is not None else out / "cache"
    cache = cache_root / digest
    cache.mkdir(parents=True, exist_ok=True)
    write_text(out / "config.json", config.model_dump_json(indent=2))

    dcache = cache_root / f"decoded-{config.digest([train_path, *tests.values()], decoding_only=True)}"
    reused = _load_decoded(dcache, sets, layers, log) if (dcache / "complete").exists() else None
    if reused is not None:
        log.stage("decoding")
        decoded, stats, alphas = reused
        decoding = {s.name: {} for s in sets}
        log(f"  reused decoded features from {dcache}")
    else:
        dcache.mkdir(parents=True, exist_ok=True)
        (dcache / "complete").unlink(missing_ok=True)
        decoded, decoding, stats, alphas = decode_stage(train_path, train, image_index, train_labels, train_images,
                                                        sets, network, layers, config, cache_root, dcache, log)
        save_npz(dcache / "decoded.npz", **{f"{s}/{k}": v for s, d in decoded.items() for k, v in d.items()})
        save_npz(dcache / "feature_stats.npz", **stats)
        write_json(dcache / "alphas.json", alphas)
        (dcache / "complete").touch()
    true_feats = {s.name: extract_features(network, s.images, layers) for s in sets}
    for s in sets:
        for layer in layers:
            t = true_feats[s.name][layer].reshape(len(s.labels), -1)
            decoding[s.name][layer] = decoding_accuracy(decoded[s.name][layer].reshape(len(t), -1), t,
                                                        stats[f"{layer}/mean"].ravel(), stats[f"{layer}/sd"])
        log(f"  profile r '{s.name}': " + ", ".join(f"{k} {v['profile_correlation']:.3f}"
                                                     for k, v in decoding[s.name].items()))
    for s in sets:
        decoded[s.name] = {k: decoded[s.name][k] for k in recon_layers}
        true_feats[s.name] = {k: true_feats[s.name][k] for k in recon_layers}
        if config.rescale:
            decoded[s.name] = {k: rescale_decoded(v, stats[f"{k}/mean"], float(stats[f"{k}/true_sd"]))
                               for k, v in decoded[s.name].items()}
    unit_weights = {}
    if config.unit_weighting == "reliability":
        unit_weights = {k: reliability_weights(stats[f"{k}/unit_r2"]) for k in recon_layers if f"{k}/unit_r2" in stats}
        if unit_weights:
            log(f"  reconstruction loss weighs units by decoding reliability in {len(unit_weights)} of "
                f"{len(recon_layers)} layers")
    metrics: dict = {}
    recon_images: dict[str, dict[str, np.ndarray]] = {}
    for s in sets:
        kinds = {"decoded": decoded[s.name]}
        if config.true_feature_recon:
            kinds["true"] = true_feats[s.name]
        recon_images[s.name] = {}
        for kind, targets in kinds.items():
            log.stage(f"reconstructing '{s.name}' from {kind} features ({len(s.labels)} images, "
                      f"{config.recon.iterations} iterations)")
            npy = cache / f"recon_{s.name}_{kind}.npy"
            snap_file = cache / f"recon_{s.name}_{kind}_snapshots.npz"
            recon_cfg = config.recon.model_copy(   # snapshots are kept (and shown) for the decoded features only
                update={"snapshots": snapshot_iterations(config) if kind == "decoded" else []})
            images = load_or_none(npy, load_npy, log)
            if images is not None and images.shape != (len(s.labels), 3, config.image_size, config.image_size):
                log(f"  warning: {npy} holds images of shape {images.shape}; computing them again")
                images = None
            if images is not None:
                snaps = {int(k): v for k, v in (load_or_none(snap_file, load_npz, log) or {}).items()}
                log(f"  reused finished reconstructions of {len(images)} images from {npy}")
            else:
                t = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in targets.items()}
                raw, raw_snaps = reconstruct(t, network, config.image_size, recon_cfg, generator=generator,
                                             progress=lambda i, n: log(f"  {i}/{n} images"),
                                             checkpoint=cache / f"checkpoint_{s.name}_{kind}",
                                             unit_weights=unit_weights, log=log)
                images = display_normalise(raw.numpy())
                snaps = {it: display_normalise(v.numpy()) for it, v in sorted(raw_snaps.items())}
                save_npz(snap_file, **{str(it): v for it, v in snaps.items()})
                save_npy(npy, images)
            recon_images[s.name][kind] = images
            folder = out / "recon" / s.name if kind == "decoded" else out / "recon_true_features" / s.name
            for lab, img in zip(s.labels, images):
                _save_png(img, folder / f"{lab}.png")
            if kind == "decoded" and snaps:
                recon_images[s.name]["snapshots"] = snaps
                for it, imgs in snaps.items():
                    for lab, img in zip(s.labels, imgs):
                        _save_png(img, out / "recon_snapshots" / s.name / lab / f"iter{it:05d}.png")

        log.stage(f"evaluating '{s.name}'")
        ident, scores = image_scores(recon_images[s.name]["decoded"], s.images)
        entry = {
            **scores,
            "n_images": len(s.labels),
            "n_presentations": s.n_presentations,
            "feature_decoding": decoding[s.name],
            "per_image_pixel_identification": dict(zip(s.labels, map(float, ident))),
            "test_retest_median_r": reliability_by_roi(s.path, s.fmri),
        }
        if config.true_feature_recon:
            entry.update(image_scores(recon_images[s.name]["true"], s.images, "_true_features")[1])
        metrics[s.name] = entry
        log(f"  pixel identification {entry['pixel_identification']:.3f}" +
            (f" (true features {entry['pixel_identification_true_features']:.3f})" if config.true_feature_recon else ""))
    log.stage("")

    write_json(out / "metrics.json", metrics)
    run_info = {"brainrecon": __version__, "config_digest": digest, "train": str(train_path),
                "tests": {k: str(v) for k, v in tests.items()}, "images": str(images_dir),
                "n_voxels": int(train.X.shape[1]), "n_train_samples": len(train.labels),
                "n_train_images": len(train_labels), "alphas": alphas,
                "layer_rois": {layer: roi_for_layer(layer, config) for layer in layers}, "stage_seconds": log.times,
                "total_seconds": round(time.time() - log.t0, 1), **(extra or {})}
    write_json(out / "run.json", run_info)
    write_report(out / "report.html", metrics, run_info, config,
                 {s.name: (s.labels, s.images, recon_images[s.name]) for s in sets})
    log(f"wrote {out / 'metrics.json'} and {out / 'report.html'}")
    return metrics
