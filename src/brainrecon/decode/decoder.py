"""Feature decoding as an estimator: fMRI voxels -> every unit of a network's layers.

:class:`FeatureDecoder` is what ``brainrecon run`` uses and what a notebook calls::

    decoder = FeatureDecoder(net, image_size=64).fit(train, load_images("stimuli/", train.labels))
    decoded = decoder.predict(test)          # DecodedFeatures

Behind it sit the solvers of :mod:`.ridge` (kernel ridge, penalty by exact leave-one-image-out
cross-validation) and :mod:`.selection` (the lab's voxel selection), and the decoding of
:mod:`.streaming` (training features cached on disk as resumable tasks, or streamed; any executor).
"""
from __future__ import annotations

import hashlib
import json
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import h5py
import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator

from ..cache import load_npz, load_or_none, save_npz, write_json
from ..data.bdata import FmriData, read_fmri, roi_columns
from .banded import BandedKernelRidge, bands_of, candidate_weights
from .channels import channel_groups, readout_channel_selection
from .ridge import DEFAULT_ALPHAS, KernelRidgeDecoder, unit_r2
from .streaming import (LayerStats, combination_weights, read_unit_results, readout_cached, readout_selection,
                        readout_stream, training_pass)


class DecoderConfig(BaseModel):
    """Settings of feature decoding (shared by :class:`FeatureDecoder`, ``PipelineConfig`` and the CLI)."""
    model_config = ConfigDict(extra="forbid")

    layers: list[str] | None = Field(None, description=(
        "comma-separated layers to decode (default: all of the network)"))
    layer_rois: dict[str, str] = Field({}, description=(
        "LAYER=ROI: decode a layer (or all layers of a prefix such as conv1) from another ROI, e.g. "
        "conv1=ROI_V1+ROI_V2+ROI_V3 (repeatable)"))
    decoder: Literal["kernel", "banded", "selection", "channel_selection"] = Field("kernel", description=(
        "kernel (all-voxel ridge, penalty by cross-validation), banded (one kernel per ROI: ROI weights and "
        "penalty by cross-validation), selection (the lab's FastL2LiR: top 500 voxels per unit, alpha 100) or "
        "channel_selection (top 500 voxels per channel of units, one solve per channel)"))
    banded_candidates: int = Field(16, ge=0, description=(
        "banded: random ROI weightings tried besides the uniform one and each ROI alone"))
    alphas: list[float] = Field(default_factory=lambda: DEFAULT_ALPHAS.tolist(), min_length=1, description=(
        "comma-separated ridge penalties searched by cross-validation"))
    alpha_sample_units: int = Field(256, ge=1, description="units per layer used to choose its penalty")
    alpha_per: Literal["layer", "unit"] = Field("layer", description=(
        "kernel ridge penalty: layer (one per layer, by cross-validation on a sample of its units) or unit "
        "(each unit its own, for layers up to unit_alpha_max_units units; needs the feature cache on disk)"))
    alpha_cv: Literal["averaged", "single"] = Field("averaged", description=(
        "what the layer's ridge penalty is cross-validated for: averaged (inputs averaged over as many "
        "presentations as each test set has, so each test set gets its own penalty) or single (single "
        "presentations)"))
    train_trials: Literal["averaged", "single"] = Field("averaged", description=(
        "what the kernel decoder is fit on: averaged (each training image's mean presentation) or single "
        "(every presentation, as in the paper)"))
    unit_alpha_max_units: int = Field(200_000, ge=0, description=(
        "alpha_per unit: larger layers keep one penalty (cost 2 n_images^2 flops per unit and penalty)"))
    unit_alpha_span: float = Field(30.0, ge=1.0, description=(
        "alpha_per unit: penalties searched within this factor of the layer's"))
    unit_weight_max_units: int = Field(200_000, ge=0, description=(
        "per-unit R^2 for layers up to this size (cost 2 n_images^2 flops per unit); larger: none"))
    selection_alpha: float = Field(100.0, gt=0, description=(
        "penalty of the voxel-selection decoder (the lab's default)"))
    selection_voxels: int = Field(500, ge=1, description=(
        "voxels per unit of the voxel-selection decoder (the lab's default)"))
    selection_fc_group: int = Field(256, ge=1, description=(
        "channel_selection: units sharing their voxels in a layer without channels"))
    feature_store: Literal["auto", "disk", "stream"] = Field("auto", description=(
        "training features: disk (HDF5 cache), stream (never stored), auto (stream when the cache would "
        "exceed feature_cache_gb)"))
    feature_cache_gb: float = Field(8.0, gt=0, description=(
        "auto streams when the feature cache would be larger than this"))
    batch_size: int = Field(16, ge=1, description="images per forward pass when extracting features")
    chunk_units: int = Field(65536, ge=1, description="units per decoding task (cached features)")
    executor: str = Field("local", description=(
        "decoding tasks: local, processes:N, dask, dask:ADDRESS, dask-jobqueue:CLASS"))
    executor_options: dict = Field({}, description="keyword arguments of the Dask cluster")
    seed: int = Field(0, ge=0, description="random seed (decoding and reconstruction)")

    @field_validator("alphas")
    @classmethod
    def _positive_alphas(cls, v: list[float]) -> list[float]:
        if not all(np.isfinite(a) and a > 0 for a in v):
            raise ValueError("ridge penalties must be finite and > 0")
        return v

    @field_validator("executor")
    @classmethod
    def _executor(cls, v: str) -> str:
        from ..executors import check_spec
        return check_spec(v)


@dataclass
class LayerPenalty:
    """How a layer was decoded: its ROI and ridge penalty (single-trial CV), per test set the penalty
    cross-validated for that set's averaged inputs, and per-unit summaries where computed."""
    roi: str
    alpha: float
    cv_r2: float | None = None
    test_alpha: dict[str, float] | None = None
    test_cv_r2: dict[str, float] | None = None
    alpha_per: str | None = None
    unit_alpha_median: float | None = None
    unit_alpha_counts: dict[str, int] | None = None
    unit_r2_median: float | None = None
    voxels_per_unit: int | None = None
    roi_weights: dict[str, float] | None = None   # banded decoder: the kernel weight of each ROI (sum 1)

    def to_json(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None}

    @classmethod
    def from_json(cls, data: dict) -> "LayerPenalty":
        return cls(**data)


@dataclass
class DecodedFeatures:
    """Decoded features of one test set.

    Attributes
    ----------
    features : {layer: (n, *unit_shape) float32}
        The decoded features, one row per label.
    labels : list of str (n,)
        The test images, sorted; each row decoded from the average of its presentations.
    n_presentations : float
        Presentations per image in the test fMRI (the inputs' averaging).
    image_size : int
        Network input size the features belong to.
    unit_r2 : {layer: unit_shape float32}
        Each unit's leave-one-image-out decoding R^2 on the training data (where computed).
    alphas : {layer: LayerPenalty}
        How each layer was decoded.
    train_mean, train_sd : {layer: (units,)}
        Per-unit mean and SD of the training images' features (z-scoring for decoding accuracy).
    channel_sd : {layer: float}
        Mean channel SD of the training features (the paper's rescaling target).
    """
    features: dict[str, np.ndarray]
    labels: list[str]
    n_presentations: float
    image_size: int
    unit_r2: dict[str, np.ndarray] = field(default_factory=dict)
    alphas: dict[str, LayerPenalty] = field(default_factory=dict)
    train_mean: dict[str, np.ndarray] = field(default_factory=dict)
    train_sd: dict[str, np.ndarray] = field(default_factory=dict)
    channel_sd: dict[str, float] = field(default_factory=dict)

    @property
    def layers(self) -> list[str]:
        return list(self.features)

    def __len__(self) -> int:
        return len(self.labels)


def save_decoded(folder: Path, decoded: dict[str, DecodedFeatures]) -> None:
    """Write decoded test sets (sharing their training statistics) to ``folder`` atomically."""
    first = next(iter(decoded.values()))
    arrays = {f"{s}/{k}": v for s, d in decoded.items() for k, v in d.features.items()}
    arrays.update({f"unit_r2/{k}": v for k, v in first.unit_r2.items()})
    arrays.update({f"mean/{k}": v for k, v in first.train_mean.items()})
    arrays.update({f"sd/{k}": v for k, v in first.train_sd.items()})
    save_npz(folder / "decoded.npz", **arrays)
    meta = {"sets": {s: {"labels": d.labels, "n_presentations": d.n_presentations} for s, d in decoded.items()},
            "image_size": first.image_size, "channel_sd": first.channel_sd,
            "alphas": {k: p.to_json() for k, p in first.alphas.items()}}
    write_json(folder / "decoded.json", meta)


def load_decoded(folder: Path, warn: Callable[[str], None] | None = None) -> dict[str, DecodedFeatures] | None:
    """Decoded test sets saved by :func:`save_decoded`, or None if absent, unreadable or incomplete."""
    z = load_or_none(folder / "decoded.npz", load_npz, warn)
    meta = load_or_none(folder / "decoded.json", lambda p: json.loads(p.read_text()), warn)
    if z is None or meta is None:
        return None
    try:
        alphas = {k: LayerPenalty.from_json(v) for k, v in meta["alphas"].items()}
        out = {}
        for s, m in meta["sets"].items():
            out[s] = DecodedFeatures({k: z[f"{s}/{k}"] for k in alphas}, m["labels"], m["n_presentations"],
                                     meta["image_size"], {k[8:]: v for k, v in z.items() if k.startswith("unit_r2/")},
                                     alphas, {k: z[f"mean/{k}"] for k in alphas}, {k: z[f"sd/{k}"] for k in alphas},
                                     meta["channel_sd"])
        return out
    except (KeyError, TypeError) as err:
        if warn:
            warn(f"  warning: {folder} lacks {err}; decoding again")
        return None


def _quiet(_msg: str) -> None:
    pass


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


def roi_for_layer(layer: str, roi: str, layer_rois: dict[str, str]) -> str:
    """The ROI whose voxels decode ``layer``: the longest matching key of ``layer_rois``, else ``roi``."""
    keys = [k for k in layer_rois if layer == k or layer.startswith(k + "_")]
    return layer_rois[max(keys, key=len)] if keys else roi


@dataclass
class _TestInputs:
    """One test set's trial-averaged voxels per ROI, rows in ``labels`` order."""
    labels: list[str]
    n_presentations: float
    X: dict[str, np.ndarray]


class FeatureDecoder:
    """Linear decoders from voxels to every unit of a network's layers, in the style of scikit-learn.

    Parameters
    ----------
    network : VGGEncoder
        The network whose features are decoded (``brainrecon.load_network``).
    image_size : int
        Network input size in pixels.
    cache_dir : path, optional
        Where the training features (HDF5, with ``feature_store`` disk) and statistics are kept and
        reused by later fits; default a temporary folder owned by the decoder.
    tasks_dir : path, optional
        Where finished decoding tasks are saved (a rerun resumes them); default inside ``cache_dir``.
    log : callable, optional
        Progress messages (a ``pipeline.Log`` also gets its stages named).
    **settings
        Any field of :class:`DecoderConfig` (layers, layer_rois, decoder, alphas, alpha_per,
        alpha_cv, train_trials, feature_store, executor, ...); unknown names are refused.

    Attributes (after ``fit``)
    ----------------------------
    layers_ : list of str
        The decoded layers.
    unit_shapes_ : {layer: tuple}
        Each layer's unit shape at ``image_size``.
    stats_ : {layer: LayerStats}
        Training features' per-unit mean, SD and the penalty-choosing unit sample.
    decoders_ : {roi: KernelRidgeDecoder or BandedKernelRidge}
        The fitted solver of each ROI (``decoder: banded``: one kernel ridge per ROI weighting).
    band_choice_ : {layer: int}
        ``decoder: banded``: the ROI weighting (row of the solver's ``weights``) chosen for each layer.
    penalties_ : {layer: LayerPenalty}
        The single-trial cross-validated penalty of each layer and its ROI.
    store_ : {"disk", "stream"}
        Where the training features live while decoding.
    """

    def __init__(self, network, image_size: int = 224, *, cache_dir: str | Path | None = None,
                 tasks_dir: str | Path | None = None, log: Callable[[str], None] | None = None, **settings):
        self.network = network
        self.image_size = int(image_size)
        self.config = DecoderConfig(**settings)
        self._tmp = None
        if cache_dir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="brainrecon-decoder-")
            cache_dir = self._tmp.name
        self.cache_dir = Path(cache_dir)
        self.tasks_dir = Path(tasks_dir) if tasks_dir is not None else None
        self.log = log or _quiet

    # ------------------------------------------------------------------ fit
    def _stage(self, name: str) -> None:
        stage = getattr(self.log, "stage", None)
        (stage or self.log)(name if stage else f"== {name}")

    def fit(self, train: FmriData, images, n_presentations: list[float] = ()) -> "FeatureDecoder":
        """Fit on training fMRI and the images its samples saw.

        Parameters
        ----------
        train : FmriData
            Training samples (n_samples, n_voxels) of one ROI with their labels.
        images : StimulusSet or Stimuli
            The training images: ``labels`` (unique) and ``images`` (n_images, 3, H, W) at
            ``image_size`` (a :class:`~brainrecon.data.stimuli.Stimuli` is loaded at that size).
        n_presentations : list of float, optional
            Presentations per image of the test sets to come: their penalties' cross-validation
            shares its work with the fit's (``predict`` computes others when needed).
        """
        self._cv_tables: dict[str, dict] = {}
        self._expected_presentations = [float(r) for r in n_presentations]
        cfg = self.config
        stimuli = _at_size(images, self.image_size)
        index = {lab: i for i, lab in enumerate(stimuli.labels)}
        missing = sorted({lab for lab in train.labels if lab not in index})
        if missing:
            raise ValueError(f"{len(missing)} training label(s) have no image: {', '.join(missing[:5])}")
        self.train_, self.images_ = train, stimuli.images
        self.image_index_ = np.array([index[lab] for lab in train.labels])
        self.counts_ = np.bincount(self.image_index_, minlength=len(stimuli.labels))
        self.layers_ = list(cfg.layers or self.network.layer_names)
        shapes = self.network.unit_shapes(self.image_size)
        self.unit_shapes_ = {k: shapes[k] for k in self.layers_}
        units = self.units_ = {k: int(np.prod(s)) for k, s in self.unit_shapes_.items()}
        cache_bytes = 4 * len(stimuli.images) * sum(units.values())
        store = "disk" if cfg.decoder in _SELECTION else cfg.feature_store   # selection needs whole features
        if store == "auto":
            store = "disk" if cache_bytes <= cfg.feature_cache_gb * 1e9 else "stream"
        self.store_ = store
        if cfg.alpha_per == "unit" and cfg.decoder in _KERNEL and store != "disk":
            raise ValueError("alpha_per 'unit' needs the training features on disk, but they are streamed "
                             f"({cache_bytes / 1e9:.1f} GB): set feature_store: disk (and feature_cache_gb) "
                             "or use alpha_per: layer")
        key = hashlib.sha256(json.dumps([self.network.spec if hasattr(self.network, "spec") else
                                         type(self.network).__name__, self.image_size, self.layers_,
                                         stimuli.labels, stimuli.identity]).encode()).hexdigest()[:16]
        self.feature_path_ = self.cache_dir / f"features-{key}.h5"
        stats_path = self.cache_dir / f"stats-{key}-{cfg.alpha_sample_units}-{cfg.seed}.npz"
        self._stage(f"features of {len(stimuli.images)} training images ({len(self.layers_)} layers, "
                    f"{self.image_size} px, {cache_bytes / 1e9:.1f} GB: "
                    f"{'cached on disk' if store == 'disk' else 'streamed'})")
        self.stats_ = self._training_stats(stats_path)
        self._stage("fitting decoders")
        self._fit_solvers()
        return self

    def _progress(self, i: int, n: int) -> None:
        if i == n or i % (20 * self.config.batch_size) == 0:
            self.log(f"  {i}/{n} images")

    def _training_stats(self, stats_path: Path) -> dict[str, LayerStats]:
        cfg, disk = self.config, self.store_ == "disk"
        lstats = _load_training_stats(stats_path, self.feature_path_ if disk else None, self.layers_,
                                      self.units_, len(self.images_), self.log)
        if lstats is not None:
            self.log(f"  reused training statistics from {stats_path.name}" +
                     (f" and feature cache {self.feature_path_.name}" if disk else ""))
            return lstats
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        lstats = training_pass(self.network, self.images_, self.layers_, self.counts_, cfg.alpha_sample_units,
                               seed=cfg.seed, batch_size=cfg.batch_size, cache=self.feature_path_ if disk else None,
                               progress=self._progress)
        save_npz(stats_path, **{f"{k}/{f}": getattr(v, f) for k, v in lstats.items()
                                for f in ("shape", "mean", "sd", "channel_sd", "sample_index", "sample")})
        return lstats

    def _roi(self, layer: str) -> str:
        return roi_for_layer(layer, self.train_.roi, self.config.layer_rois)

    def _fit_solvers(self) -> None:
        cfg = self.config
        average = cfg.train_trials == "averaged" and cfg.decoder in _KERNEL
        self.decoders_ = {}
        self.band_choice_: dict[str, int] = {}
        self._band_scores: dict[str, np.ndarray] = {}         # banded: single-presentation CV R^2 (weightings, alphas)
        averaged = self._expected_presentations if cfg.alpha_cv == "averaged" else []
        for roi in dict.fromkeys(self._roi(k) for k in self.layers_):
            X = self.train_.X if roi == self.train_.roi else read_fmri(self.train_.path, roi).X
            self.log(f"  decoder for {roi}: {X.shape[1]} voxels, fit on "
                     + (f"the mean presentation of each of {len(self.counts_)} images" if average
                        else f"{len(self.image_index_)} single presentations"))
            if cfg.decoder == "banded":
                self.decoders_[roi] = self._fit_banded(roi, X, average, [None, *averaged])
            else:
                self.decoders_[roi] = KernelRidgeDecoder(np.array(cfg.alphas)).fit(X, self.image_index_, average)
        self.penalties_ = {}
        for layer in self.layers_:
            dec = self._decoder(layer)
            scores = self._cv_scores(layer, [None, *averaged])[None]
            self.penalties_[layer] = LayerPenalty(self._roi(layer), float(dec.alphas[int(np.argmax(scores))]),
                                                  float(scores.max()))
            if cfg.decoder == "banded":
                model = self.decoders_[self._roi(layer)]
                self.penalties_[layer].roi_weights = {
                    b.name: float(w) for b, w in zip(model.bands, model.weights[self.band_choice_[layer]])}

    def _fit_banded(self, roi: str, X: np.ndarray, average: bool, n_averages: list) -> BandedKernelRidge:
        """The banded decoder of ``roi``: every candidate ROI weighting scored on the unit sample of each
        of its layers; per layer the weighting of the best single-presentation CV R^2 is kept."""
        cfg = self.config
        bands = bands_of(roi_columns(self.train_.path, roi), X.shape[1])
        weights = candidate_weights(len(bands), cfg.banded_candidates, cfg.seed)
        if len(bands) == 1:
            self.log(f"  note: {self.train_.path} has no smaller ROIs inside {roi}: the banded decoder is the kernel "
                     "decoder (pass a file with ROI_V1, ROI_V2, ... or decode with --decoder kernel)")
        self.log(f"  {len(bands)} bands ({', '.join(f'{b.name} {len(b.columns)}' for b in bands)}): "
                 f"{len(weights)} ROI weightings x {len(cfg.alphas)} penalties")
        model = BandedKernelRidge(np.array(cfg.alphas), bands, weights).fit(X, self.image_index_, average)
        layers = [k for k in self.layers_ if self._roi(k) == roi]
        n_averages = list(dict.fromkeys(n_averages))
        scores = model.search({k: self.stats_[k].sample for k in layers}, n_averages)
        for k in layers:
            c = int(np.argmax(scores[k][:, 0].max(1)))              # single presentations (n_averages[0] is None)
            self.band_choice_[k] = c
            self._band_scores[k] = scores[k][:, 0]
            self._cv_tables[k] = dict(zip(n_averages, scores[k][c]))
        model.release(set())
        return model

    def _decoder(self, layer: str) -> KernelRidgeDecoder:
        """The kernel ridge decoder of ``layer`` (banded: its ROI weighting's)."""
        dec = self.decoders_[self._roi(layer)]
        return dec.decoder(self.band_choice_[layer], keep=True) if isinstance(dec, BandedKernelRidge) else dec

    def _cv_scores(self, layer: str, n_averages: list) -> dict:
        """{R: leave-one-image-out R^2 (n_alphas,)} of a layer for inputs averaged over R presentations
        (None: single presentations), computed once per layer and R."""
        table = self._cv_tables.setdefault(layer, {})
        todo = [r for r in dict.fromkeys(n_averages) if r not in table]
        if todo:
            dec = self._decoder(layer)
            table.update(zip(todo, dec.cv_scores_averaged(self.stats_[layer].sample, todo)))
        return table

    # ------------------------------------------------------------------ predict
    def predict(self, test: FmriData) -> DecodedFeatures:
        """Decode one test set (trials averaged per label; labels sorted)."""
        return self.predict_sets({"test": test})["test"]

    def _test_inputs(self, test: FmriData) -> _TestInputs:
        X, labels = test.average_by_label()
        order = np.argsort(labels, kind="stable")
        labels = [labels[i] for i in order]
        by_roi = {}
        for roi in self.decoders_:
            if roi == test.roi:
                by_roi[roi] = X[order]
            else:
                Xr, lr = test.read_roi(roi).average_by_label()
                by_roi[roi] = Xr[[lr.index(lab) for lab in labels]]
        return _TestInputs(labels, len(test.labels) / len(labels), by_roi)

    def predict_sets(self, tests: dict[str, FmriData]) -> dict[str, DecodedFeatures]:
        """Decode several test sets in one pass over the training features; each set's penalty is
        cross-validated for its number of presentations (``alpha_cv: averaged``)."""
        cfg = self.config
        sets = {name: self._test_inputs(t) for name, t in tests.items()}
        penalties = {k: LayerPenalty(**asdict(p)) for k, p in self.penalties_.items()}
        C = self._combinations(sets, penalties)
        per_unit = self._per_unit_plans(sets, penalties, C) if cfg.decoder in _KERNEL else []
        self._stage(f"decoding {sum(len(s.labels) for s in sets.values())} test images "
                    f"({sum(self.units_.values()):,} units)")
        tasks_dir = self.tasks_dir or self.cache_dir / f"tasks-{self._tasks_key(sets)}"
        flat = self._readout(sets, penalties, C, tasks_dir)
        unit_r2s = self._unit_results(per_unit, penalties, tasks_dir)
        out, row = {}, 0
        for name, s in sets.items():
            n = len(s.labels)
            out[name] = DecodedFeatures(
                {k: flat[k][row:row + n].reshape(n, *self.unit_shapes_[k]) for k in self.layers_}, s.labels,
                s.n_presentations, self.image_size, unit_r2s, penalties,
                {k: self.stats_[k].mean for k in self.layers_}, {k: self.stats_[k].sd for k in self.layers_},
                {k: float(self.stats_[k].channel_sd) for k in self.layers_})
            row += n
        return out

    def _tasks_key(self, sets: dict[str, _TestInputs]) -> str:
        h = hashlib.sha256(self.config.model_dump_json(exclude={"executor", "executor_options", "batch_size",
                                                                 "feature_store", "feature_cache_gb"}).encode())
        h.update(self.feature_path_.name.encode())
        for name, s in sets.items():
            h.update(name.encode())
            for roi, X in s.X.items():
                h.update(roi.encode())
                h.update(np.ascontiguousarray(X).tobytes())
        return h.hexdigest()[:16]

    def _combinations(self, sets: dict[str, _TestInputs], penalties: dict[str, LayerPenalty]) -> dict:
        """Per layer the readout weights C (n_test, n_images) at each set's penalty (kernel decoder)."""
        cfg = self.config
        if cfg.decoder not in _KERNEL:
            return {}
        per_unit_alpha = cfg.alpha_per == "unit"
        averaged = sorted({s.n_presentations for s in sets.values()}) \
            if cfg.alpha_cv == "averaged" and not per_unit_alpha else []
        if cfg.alpha_cv == "averaged" and per_unit_alpha:
            self.log("  note: per-unit penalties are chosen for single presentations (alpha_cv applies to "
                     "alpha_per: layer)")
        elif cfg.alpha_cv == "averaged" and self.counts_.max() < 2:
            self.log("  note: no training image is shown twice, so the trial noise cannot be measured; "
                     "penalties are chosen for single presentations")
            averaged = []
        C = {}
        for layer in self.layers_:
            dec, p = self._decoder(layer), penalties[layer]
            table = self._cv_scores(layer, [None] + averaged)
            test_scores = {n: table[s.n_presentations if averaged else None] for n, s in sets.items()}
            test_alpha = {n: float(dec.alphas[int(np.argmax(v))]) for n, v in test_scores.items()}
            if averaged:
                p.test_alpha, p.test_cv_r2 = test_alpha, {n: float(v.max()) for n, v in test_scores.items()}
            for sc in {id(v): v for v in [table[None], *test_scores.values()]}.values():
                if (warning := grid_edge_warning(layer, dec.alphas, sc)):
                    self.log(warning)
            self.log(f"  {layer}: alpha {p.alpha:g} (CV R2 {p.cv_r2:.3f})" + ("; averaged test trials: " + ", ".join(
                f"{n} {a:g}" for n, a in test_alpha.items()) if averaged else "") + ("; ROI weights " + ", ".join(
                f"{r} {w:.2f}" for r, w in p.roi_weights.items()) if p.roi_weights else ""))
            C[layer] = combination_weights(np.vstack([dec.test_weights(s.X[p.roi], test_alpha[n])
                                                      for n, s in sets.items()]), dec.image_weights())
        return C

    def _per_unit_plans(self, sets: dict[str, _TestInputs], penalties: dict[str, LayerPenalty],
                        C: dict) -> list[tuple[str, bool]]:
        """Turn ``C[layer]`` into (C per penalty, leave-one-image-out matrices, penalties) where units get
        their own penalty (``alpha_per: unit``) or their CV R^2 measured; returns (layer, own penalty).

        Banded decoder: a unit's own choice is among the ROI weightings, each at its best penalty for
        the layer's unit sample (one leave-one-image-out matrix per weighting)."""
        cfg = self.config
        per_unit_alpha = cfg.alpha_per == "unit"
        if not (per_unit_alpha or self.store_ == "disk"):
            return []
        grids: dict[str, tuple[bool, list[tuple[int | None, int]]]] = {}   # layer: (own, [(weighting, penalty index)])
        for layer in self.layers_:
            alpha, n = penalties[layer].alpha, self.units_[layer]
            alphas, choice = np.array(cfg.alphas), self.band_choice_.get(layer)
            own = per_unit_alpha and n <= cfg.unit_alpha_max_units
            if own and choice is not None:
                grid = [(c, int(np.argmax(sc))) for c, sc in enumerate(self._band_scores[layer])]
            elif own:
                grid = [(None, i) for i, a in enumerate(alphas) if alpha / cfg.unit_alpha_span <= a <= alpha * cfg.unit_alpha_span]
            elif n <= cfg.unit_weight_max_units:
                grid = [(choice, int(np.argmin(np.abs(alphas - alpha))))]
            else:
                self.log(f"  {layer}: {n:,} units > unit_{'alpha' if per_unit_alpha else 'weight'}_max_units: "
                         "no per-unit " + ("penalties" if per_unit_alpha else "reliability"))
                continue
            grids[layer] = (own, grid)
        need: dict[tuple, dict[int, bool]] = {}                  # (roi, weighting): {penalty index: test weights needed}
        for layer, (own, grid) in grids.items():
            for c, i in grid:
                d = need.setdefault((penalties[layer].roi, c), {})
                d[i] = d.get(i, False) or own
        loo, combos = {}, {}
        for roi in dict.fromkeys(r for r, _ in need):
            todo = [(c, i) for (r, c), d in need.items() if r == roi for i in d]
            weightings = {c for c, _ in todo} - {None}
            self.log(f"  leave-one-image-out matrices for {roi}: {len(todo)}"
                     + (f" (over {len(weightings)} ROI weightings)" if weightings else " penalties"))
        for (roi, c), todo in need.items():                      # one decoder at a time (banded: one per weighting)
            model = self.decoders_[roi]
            dec = model if c is None else model.decoder(c)
            loo.update({(roi, c, i): P for i, P in zip(todo, dec.loo_matrices(list(todo)))})
            for i in (i for i, test in todo.items() if test):
                combos[roi, c, i] = combination_weights(
                    np.vstack([dec.test_weights(s.X[roi], dec.alphas[i]) for s in sets.values()]), dec.image_weights())
        plans = []
        for layer, (own, grid) in grids.items():
            roi = penalties[layer].roi
            # not own: the units' R^2 at the single-presentation penalty; decoding keeps each test set's penalty
            Cs = np.stack([combos[roi, c, i] for c, i in grid]) if own else C[layer][None]
            C[layer] = (Cs, np.stack([loo[roi, c, i] for c, i in grid]), np.array(cfg.alphas)[[i for _, i in grid]])
            plans.append((layer, own))
        return plans

    def _readout(self, sets: dict[str, _TestInputs], penalties: dict[str, LayerPenalty], C: dict,
                 tasks_dir: Path) -> dict[str, np.ndarray]:
        from ..executors import make_executor

        cfg = self.config
        if cfg.decoder in _KERNEL and self.store_ == "stream":
            return readout_stream(self.network, self.images_, C, cfg.batch_size, progress=self._progress)
        if cfg.decoder in _SELECTION:
            inputs = {}
            for layer in self.layers_:
                dec = self.decoders_[penalties[layer].roi]
                Xt = (np.vstack([s.X[penalties[layer].roi] for s in sets.values()]) - dec.mean_) / dec.sd_
                inputs[layer] = (dec.Xz_.astype(np.float32), self.image_index_, Xt.astype(np.float32),
                                 self.stats_[layer].mean, self.stats_[layer].sd, cfg.selection_alpha,
                                 cfg.selection_voxels)
                penalties[layer] = LayerPenalty(penalties[layer].roi, cfg.selection_alpha,
                                                voxels_per_unit=cfg.selection_voxels)
        executor = make_executor(cfg.executor, cfg.executor_options)
        try:
            if cfg.decoder == "channel_selection":
                groups = {k: channel_groups(self.unit_shapes_[k], cfg.selection_fc_group) for k in self.layers_}
                return readout_channel_selection(self.feature_path_, self.units_, groups, inputs, tasks_dir, executor,
                                                 cfg.chunk_units, progress=lambda i, n: self.log(f"  {i}/{n} tasks"),
                                                 log=self.log)
            if cfg.decoder == "selection":
                return readout_selection(self.feature_path_, self.units_, inputs, tasks_dir, executor,
                                         cfg.chunk_units, progress=lambda i, n: self.log(f"  {i}/{n} tasks"),
                                         log=self.log)
            return readout_cached(self.feature_path_, C, self.units_, tasks_dir, executor, cfg.chunk_units,
                                  progress=lambda i, n: self.log(f"  {i}/{n} tasks") if i == n or i % 50 == 0
                                  else None, log=self.log)
        finally:
            if executor is not None:
                executor.close()

    def _unit_results(self, plans: list[tuple[str, bool]], penalties: dict[str, LayerPenalty],
                      tasks_dir: Path) -> dict[str, np.ndarray]:
        """Each planned layer's per-unit R^2 (and per-unit penalties), read from the finished tasks."""
        cfg, n_samples, out = self.config, int(self.counts_.sum()), {}
        for layer, own in plans:
            p = penalties[layer]
            if own:
                ua = read_unit_results(tasks_dir, layer, self.units_[layer], cfg.chunk_units, "alpha")
                values, counts = np.unique(ua, return_counts=True)
                p.alpha_per, p.unit_alpha_median = "unit", float(np.median(ua))
                p.unit_alpha_counts = {f"{v:g}": int(c) for v, c in zip(values, counts)}
                self.log(f"  {layer}: per-unit penalties, median {np.median(ua):g} (layer {p.alpha:g})")
            r2 = unit_r2(read_unit_results(tasks_dir, layer, self.units_[layer], cfg.chunk_units, "cverror"),
                         self.stats_[layer].sd, n_samples)
            p.unit_r2_median = float(np.median(r2))
            out[layer] = r2.reshape(self.unit_shapes_[layer])
        return out


_KERNEL = ("kernel", "banded")                   # decoders that are a kernel ridge (readout C Y)
_SELECTION = ("selection", "channel_selection")  # decoders that select voxels per unit or channel


def _at_size(images, size: int):
    """A StimulusSet at ``size`` px from a StimulusSet or a lazily loaded Stimuli."""
    from ..data.stimuli import Stimuli
    if isinstance(images, Stimuli):
        return images.load(size)
    if images.images.shape[-1] != size:
        raise ValueError(f"the images are {images.images.shape[-1]} px but the decoder's image_size is {size}: "
                         "load them at that size (or pass brainrecon.load_images(...), which is loaded to fit)")
    return images


def _load_training_stats(stats_path: Path, feat_path: Path | None, layers: list[str], units: dict[str, int],
                         n_images: int, log) -> dict[str, LayerStats] | None:
    """The saved training statistics per layer (and, with ``feat_path``, a check that the feature cache
    opens and holds every layer whole), or None if absent or unreadable (with a warning)."""
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
                    k in f and f[k].shape == (n_images, units[k]) for k in layers)
        if not load_or_none(feat_path, check, log):
            if feat_path.exists():
                log(f"  warning: {feat_path} does not hold these layers' features; computing them again")
            return None
    return lstats
