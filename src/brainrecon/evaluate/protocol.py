"""``brainrecon evaluate``: a run's reconstructions scored by published protocols, with uncertainty.

:func:`evaluate_run` reads a finished run folder (reconstructions as PNG, stimuli through the run's
``run.json``/``config.json``, decoded features from its cache) and writes ``evaluation.json`` and
``metrics.csv`` (schema: docs/evaluation.md). The Kamitani protocol (:func:`kamitani_metrics`):
pairwise identification by pixel correlation and by Euclidean distance, feature identification
through the run's network per layer, n-way identification (2, 5, 10 and all candidates), pixel r and
SSIM, and human judgment where answers were scored. Every metric gets a bootstrap interval over images
and every identification accuracy a permutation p-value (:mod:`.uncertainty`); the retrieval check
(:mod:`.retrieval`) compares each reconstruction with the training images. The NSD protocol comes from
:mod:`.nsd` when installed.
"""
from __future__ import annotations

import csv
import io
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Literal, Mapping

import numpy as np
from scipy.spatial.distance import cdist
from scipy.stats import binomtest

from ..cache import write_json, write_text
from ..data.stimuli import load_image
from ..runfolder import RECON_FOLDERS, RunFolder
from .identification import correlation_matrix
from .judgment import JudgmentError, run_images
from .nsd import MetricValues
from .similarity import pixel_correlation, ssim
from .uncertainty import (bootstrap_identification, bootstrap_mean, n_way_identification, pairwise_from_scores,
                          permutation_p)

Protocol = Literal["kamitani", "nsd", "all"]
PROTOCOLS = ("kamitani", "nsd", "all")
N_WAY = (2, 5, 10, "all")
SCHEMA = "brainrecon.evaluation/1"
CSV_COLUMNS = ("subject", "roi", "test_set", "source", "method", "protocol", "metric", "kind", "value",
               "ci_low", "ci_high", "n", "p_value")
SOURCES = {"decoded": "decoded", "true": "true_features"}      # reconstructions' folder key -> source name


class EvaluationError(ValueError):
    """A run folder that cannot be evaluated; the message names what is missing and what to do."""


def _identification(name: str, scores: np.ndarray) -> MetricValues:
    return MetricValues(name, "identification", pairwise_from_scores(scores), True, "kamitani", scores)


def feature_scores(network, recons: np.ndarray, stimuli: np.ndarray, layers: list[str], batch_size: int = 16,
                   max_bytes: float = 1e9) -> dict[str, np.ndarray]:
    """{layer: (n, n)} Pearson r between the features of reconstruction i and of stimulus j.

    Layers are taken in groups whose features (reconstructions and stimuli, float32) fit in
    ``max_bytes``: one forward pass per group (all layers at once at small image sizes).
    """
    from ..nets.features import extract_features
    units = {k: int(np.prod(v)) for k, v in network.unit_shapes(recons.shape[-1]).items()}
    groups, size = [[]], 0.0
    for layer in layers:
        b = 2 * len(recons) * units[layer] * 4
        if groups[-1] and size + b > max_bytes:
            groups.append([])
            size = 0.0
        groups[-1].append(layer)
        size += b
    out = {}
    for group in groups:
        r = extract_features(network, recons, group, batch_size)
        s = extract_features(network, stimuli, group, batch_size)
        out.update({k: correlation_matrix(r[k], s[k]) for k in group})
    return out


def kamitani_metrics(recons: np.ndarray, stimuli: np.ndarray, network=None, layers: list[str] = (),
                     n_way: tuple = N_WAY, draws: int = 1000, seed: int = 0,
                     features: dict[str, np.ndarray] | None = None) -> list[MetricValues]:
    """The Kamitani protocol's metrics of reconstructions (n, 3, H, W) against their stimuli, row for row.

    Pixel identification by correlation (``pixel_identification``) and by Euclidean distance
    (``pixel_identification_euclidean``), n-way identification by pixel correlation
    (``pixel_identification_{k}way``, ``pixel_identification_allway``; sizes above n are skipped),
    ``pixel_correlation``, ``ssim`` and, given ``network`` and ``layers`` (or precomputed ``features``
    score matrices from :func:`feature_scores`), ``feature_identification_<layer>``.
    """
    recons, stimuli = np.asarray(recons), np.asarray(stimuli)
    n = len(recons)
    pix = correlation_matrix(recons, stimuli)
    dist = cdist(recons.reshape(n, -1).astype(np.float64), stimuli.reshape(n, -1).astype(np.float64))
    out = [_identification("pixel_identification", pix), _identification("pixel_identification_euclidean", -dist)]
    sizes = sorted({n if k == "all" else int(k) for k in n_way if k == "all" or 2 <= int(k) <= n})
    for k in sizes:
        name = "pixel_identification_allway" if k == n else f"pixel_identification_{k}way"
        out.append(MetricValues(name, "identification", n_way_identification(pix, k, draws, seed), True,
                                "kamitani", pix, k))
    out += [MetricValues("pixel_correlation", "similarity", pixel_correlation(recons, stimuli), True, "kamitani"),
            MetricValues("ssim", "similarity", ssim(recons, stimuli), True, "kamitani")]
    if features is None and network is not None and layers:
        features = feature_scores(network, recons, stimuli, list(layers))
    for layer, s in (features or {}).items():
        out.append(_identification(f"feature_identification_{layer}", s))
    return out


@dataclass
class Estimate:
    """A metric's value over a test set with its 95% interval, and (identification) its p-value."""
    test_set: str
    source: str
    metric: str
    kind: str
    protocol: str
    higher_is_better: bool
    value: float
    ci_low: float
    ci_high: float
    n: int
    p_value: float | None
    resampled: str
    per_image: dict[str, float] = field(default_factory=dict)

    def to_json(self) -> dict:
        return {k: (None if isinstance(v, float) and not np.isfinite(v) else v) for k, v in asdict(self).items()}


def estimate(m: MetricValues, labels: list[str], test_set: str, source: str, n_boot: int = 2000,
             n_perm: int = 1000, seed: int = 0, level: float = 0.95) -> Estimate:
    """The mean of ``m`` over images, its percentile bootstrap interval and (identification) permutation p.

    A pairwise identification with a score matrix is recomputed among each resample of images; other
    metrics (n-way identification included) resample their per-image values. The p-value shuffles the
    stimuli's labels (pairwise; n-way: its expectation given each image's wins).
    """
    v = np.asarray(m.per_image, np.float64)
    ok = np.isfinite(v)
    scores, n_way = m.scores, m.n_way
    if scores is not None and n_way == 2:
        lo, hi = bootstrap_identification(scores, n_boot, seed, level)
        resampled = "images, identification recomputed among the resampled images"
    else:
        lo, hi = bootstrap_mean(v, n_boot, seed, level)
        resampled = "images' values"
    p = None
    if m.kind == "identification" and scores is not None:
        p = permutation_p(scores, n_way, n_perm, seed)
    return Estimate(test_set, source, m.name, m.kind, m.protocol, m.higher_is_better, float(v[ok].mean()),
                    lo, hi, int(ok.sum()), p, resampled,
                    {lab: float(x) for lab, x, good in zip(labels, v, ok) if good})


@dataclass
class Evaluation:
    """Everything ``brainrecon evaluate`` found about one run (``evaluation.json``)."""
    run: str
    subject: str
    roi: str
    method: str
    protocols: list[str]
    settings: dict
    results: list[Estimate]
    retrieval: dict = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)

    def to_json(self) -> dict:
        return {"schema": SCHEMA, "run": self.run, "subject": self.subject, "roi": self.roi, "method": self.method,
                "protocols": self.protocols, "settings": self.settings,
                "results": [r.to_json() for r in self.results], "retrieval": self.retrieval, "skipped": self.skipped}

    def csv_text(self) -> str:
        """metrics.csv: one row per test set, source and metric (``CSV_COLUMNS``)."""
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(CSV_COLUMNS)
        for r in self.results:
            cells = [self.subject, self.roi, r.test_set, r.source, self.method, r.protocol, r.metric, r.kind,
                     r.value, r.ci_low, r.ci_high, r.n, r.p_value]
            w.writerow(["" if c is None or (isinstance(c, float) and not np.isfinite(c)) else
                        (f"{c:.6g}" if isinstance(c, float) else c) for c in cells])
        return buf.getvalue()

    def get(self, test_set: str, source: str, metric: str) -> Estimate | None:
        return next((r for r in self.results if (r.test_set, r.source, r.metric) == (test_set, source, metric)), None)


def _read_png(path: Path) -> np.ndarray:
    from PIL import Image
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"), np.float32).transpose(2, 0, 1) / 255.0


def _run_settings(folder: RunFolder) -> dict:
    config = folder.read_json(folder.config)
    if not config:
        raise EvaluationError(f"{folder.config} is missing or unreadable: evaluate the folder of a finished "
                              "`brainrecon run` or `brainrecon demo`")
    return config


def _human(folder: RunFolder, which: str, test_set: str, labels: list[str]) -> tuple[MetricValues, float] | None:
    """Human identification per image from the scored judgments (``judge score``), and its binomial p."""
    scores = folder.read_json(folder.human_scores(which)).get(test_set)
    if not scores and folder.answers(which).is_file():       # answers not scored yet: every pair, as served by default
        from .judgment import make_trials, read_answers, score_answers
        try:
            scores = score_answers(make_trials({test_set: labels}),
                                   [a for a in read_answers(folder.answers(which), warn=lambda msg: None)
                                    if a.get("test_set", str(a["trial"]).split("/")[0]) == test_set]).get(test_set)
        except JudgmentError:                                # another draw of pairs: `judge score` with its options
            return None
    if not scores or "per_image" not in scores:
        return None
    per = np.array([scores["per_image"].get(lab, np.nan) for lab in labels], np.float64)
    k = int(round(scores["human_identification"] * scores["n_judgments"]))
    p = float(binomtest(k, scores["n_judgments"], 0.5, alternative="greater").pvalue)
    return MetricValues("human_identification", "identification", per, True, "kamitani"), p


def _decoded_features(folder: RunFolder, run_info: dict):
    from ..decode.decoder import load_decoded
    where = run_info.get("decoded_cache")
    candidates = [Path(where)] if where else [p.parent for p in folder.cache.glob("decoded-*/complete")]
    if len(candidates) != 1 or not (candidates[0] / "complete").exists():
        return None
    return load_decoded(candidates[0])


def evaluate_run(run_dir: str | Path, protocol: Protocol = "kamitani", weights: Mapping[str, str | Path] = {},
                 images: Path | None = None, n_boot: int = 2000, n_perm: int = 1000, n_way_draws: int = 1000,
                 seed: int = 0, retrieval: bool = True, device: str = "cpu",
                 log: Callable[[str], None] | None = None) -> Evaluation:
    """Evaluate a finished run folder and write ``RUN/evaluation.json`` and ``RUN/metrics.csv``.

    Parameters
    ----------
    run_dir : the run folder.
    protocol : "kamitani", "nsd" (the NSD-era metrics, :mod:`.nsd`) or "all".
    weights : {evaluation network name: weights file} for the NSD protocol.
    images : the stimulus folder (default: the run's).
    n_boot, n_perm : bootstrap resamples and label permutations; ``n_way_draws``: random candidate
        sets per image of an n-way identification; ``seed`` seeds all three.
    retrieval : also run the retrieval check (needs the training file and images).

    Raises
    ------
    EvaluationError : the folder is not a finished run, or ``protocol`` is unknown.
    """
    log = log or (lambda msg: None)
    t0 = time.time()
    if protocol not in PROTOCOLS:
        raise EvaluationError(f"unknown protocol {protocol!r}: use one of {', '.join(PROTOCOLS)}")
    folder = RunFolder(Path(run_dir))
    config = _run_settings(folder)
    run_info = folder.read_json(folder.run_info)
    recon_cfg = config.get("recon") or {}
    method = str(recon_cfg.get("prior", "?")) if isinstance(recon_cfg, dict) else "?"
    subject = Path(str(config.get("train", "subject"))).stem
    roi = str(config.get("roi", ""))
    settings = {"n_bootstrap": n_boot, "n_permutations": n_perm, "n_way": list(N_WAY), "n_way_draws": n_way_draws,
                "seed": seed, "confidence": 0.95, "images": "reconstruction PNGs; stimuli at their size (LANCZOS)",
                "tie": "equal up to 1e-12 counts one half"}
    evaluation = Evaluation(str(folder.root), subject, roi, method, [], settings, [])
    kamitani = protocol in ("kamitani", "all")
    network, layers = None, []
    if kamitani:
        from ..nets import load_network
        try:
            network = load_network(config.get("network", "hed-vgg16"))
        except (ValueError, FileNotFoundError) as e:
            raise EvaluationError(f"the run's network ({folder.config}): {e}") from None
        layers = list(config.get("layers") or network.layer_names)
        evaluation.protocols.append("kamitani")
    nsd = None
    if protocol in ("nsd", "all"):
        from . import nsd
        evaluation.protocols.append("nsd")

    shown: dict[str, dict[str, tuple]] = {}     # set -> source -> (labels, recons, stimuli, feature scores)
    for which in [w for w in RECON_FOLDERS if folder.recon_dir(w).is_dir()]:
        try:
            imgs = run_images(folder.root, images, which)
        except JudgmentError as e:
            raise EvaluationError(str(e)) from None
        source = SOURCES[which]
        order = list(config.get("test") or {}) if isinstance(config.get("test"), dict) else []
        rank = {name: i for i, name in enumerate(order)}
        for test_set, paths in sorted(imgs.recon.items(), key=lambda kv: rank.get(kv[0], len(rank))):
            labels = list(paths)
            recons = np.stack([_read_png(paths[lab]) for lab in labels])
            stimuli = np.stack([load_image(imgs.stimuli[test_set][lab], recons.shape[-1]) for lab in labels])
            log(f"  evaluating '{test_set}' ({source}, {len(labels)} images)")
            metrics: list[tuple[MetricValues, float | None]] = []
            features = feature_scores(network, recons, stimuli, layers) if kamitani else {}
            shown.setdefault(test_set, {})[source] = (labels, recons, stimuli, features)
            if kamitani:
                metrics += [(m, None) for m in kamitani_metrics(recons, stimuli, network, layers, N_WAY,
                                                                n_way_draws, seed, features)]
                human = _human(folder, which, test_set, labels)
                if human:
                    metrics.append(human)
            if nsd is not None:
                # the published protocol resizes each ground truth from its own resolution
                full = np.stack([load_image(imgs.stimuli[test_set][lab], nsd.PIXEL_SIZE) for lab in labels])
                found, skipped = nsd.nsd_protocol(recons, full, weights, device=device, log=log)
                metrics += [(m, None) for m in found]
                evaluation.skipped.update(skipped)
            for m, p in metrics:
                est = estimate(m, labels, test_set, source, n_boot, n_perm, seed)
                if p is not None:
                    est.p_value, est.resampled = p, "images' values; p: one-sided binomial test of the judgments"
                evaluation.results.append(est)
    if not shown:
        raise EvaluationError(f"{folder.recon_dir()} does not exist: evaluate the folder of a finished "
                              "`brainrecon run` or `brainrecon demo`")
    if kamitani and retrieval:
        _retrieval(evaluation, folder, config, run_info, images, network, layers, shown, n_boot, n_perm, seed, log)
    evaluation.settings["seconds"] = round(time.time() - t0, 1)
    write_json(folder.evaluation, evaluation.to_json())
    write_text(folder.metrics_csv, evaluation.csv_text())
    log(f"wrote {folder.evaluation} and {folder.metrics_csv}")
    return evaluation


def merge_human(run_dir: str | Path, which: str = "decoded", n_boot: int | None = None,
                seed: int | None = None) -> Evaluation | None:
    """Replace the human-judgment rows of a run's evaluation.json (and metrics.csv) with those of its
    scored judgments (``brainrecon judge score`` writes them); None if the run has no evaluation.json.
    The bootstrap settings are the evaluation's own unless given."""
    folder = RunFolder(Path(run_dir))
    data = folder.read_json(folder.evaluation)
    if not data.get("results"):
        return None
    fields = set(Estimate.__dataclass_fields__)
    results = [Estimate(**{k: v for k, v in r.items() if k in fields}) for r in data["results"]]
    settings = data.get("settings", {})
    n_boot = n_boot or settings.get("n_bootstrap", 2000)
    seed = settings.get("seed", 0) if seed is None else seed
    source = SOURCES[which]
    results = [r for r in results if not (r.metric == "human_identification" and r.source == source)]
    for test_set in dict.fromkeys(r.test_set for r in results):
        own = next((r for r in results if (r.test_set, r.source, r.metric) == (test_set, source, "pixel_identification")),
                   None)
        human = _human(folder, which, test_set, list(own.per_image)) if own else None
        if human:
            est = estimate(human[0], list(own.per_image), test_set, source, n_boot, 0, seed)
            est.p_value, est.resampled = human[1], "images' values; p: one-sided binomial test of the judgments"
            results.insert(results.index(own) + 1, est)
    evaluation = Evaluation(data.get("run", str(folder.root)), data.get("subject", ""), data.get("roi", ""),
                            data.get("method", ""), data.get("protocols", []), settings, results,
                            data.get("retrieval", {}), data.get("skipped", {}))
    write_json(folder.evaluation, evaluation.to_json())
    write_text(folder.metrics_csv, evaluation.csv_text())
    return evaluation


def _retrieval(evaluation: Evaluation, folder: RunFolder, config: dict, run_info: dict, images: Path | None,
               network, layers: list[str], shown: dict, n_boot: int, n_perm: int, seed: int, log) -> None:
    """The retrieval check of every test set (see :mod:`.retrieval`), into ``evaluation``."""
    from ..data.bdata import BDataError, read_fmri
    from ..data.stimuli import find_images
    from ..nets.features import extract_features
    from .retrieval import nearest_training, retrieval_answers, similarity_to_training

    train, images_dir = config.get("train"), images or config.get("images") or run_info.get("images")
    try:
        train_labels = list(dict.fromkeys(read_fmri(train, config.get("roi", "ROI_VC")).labels))
        paths = find_images(Path(images_dir), train_labels)
    except (BDataError, FileNotFoundError, OSError, TypeError) as e:
        evaluation.skipped["retrieval"] = f"the training images could not be read ({e})"
        return
    decoded = _decoded_features(folder, run_info)
    if decoded is None:
        evaluation.skipped["retrieval_baseline"] = ("the run's decoded features are not in its cache "
                                                    f"({folder.cache}): rerun the run to make them")
    size = next(iter(next(iter(shown.values())).values()))[1].shape[-1]     # the reconstructions' size
    pixel_q, feature_q = {}, {}
    for test_set, by_source in shown.items():
        for source, (labels, recons, stimuli, _) in by_source.items():
            pixel_q[f"{test_set}/{source}"] = recons
            if source == "decoded":
                feature_q[f"{test_set}/{source}"] = extract_features(network, recons, layers)
        if decoded is not None and test_set in decoded:
            d = decoded[test_set]
            order = [d.labels.index(lab) for lab in by_source[next(iter(by_source))][0]]
            feature_q[f"{test_set}/decoded_features"] = {k: v[order] for k, v in d.features.items() if k in layers}
    log(f"  retrieval check against {len(paths)} training images")
    sim = similarity_to_training(paths, size, pixel_q, feature_q, network)
    for test_set, by_source in shown.items():
        entry = evaluation.retrieval.setdefault(test_set, {})
        for source, (labels, recons, stimuli, features) in by_source.items():
            key = f"{test_set}/{source}"
            stim_px = np.diag(correlation_matrix(recons, stimuli))
            feat_r = stim_ft = None
            if key in sim.features:
                feat_r = sim.feature_mean(key)
                stim_ft = np.mean([np.diag(features[k]) for k in feature_q[key]], axis=0)   # r with own stimulus
            near = nearest_training(labels, sim.labels, sim.pixels[key], stim_px, feat_r, stim_ft)
            beats = np.array([n.stimulus_beats_training_pixel for n in near], np.float64)
            evaluation.results.append(estimate(MetricValues("stimulus_beats_training_pixel", "similarity", beats, True,
                                                            "kamitani"), labels, test_set, source, n_boot, n_perm, seed))
            if feat_r is not None:
                beats = np.array([n.stimulus_beats_training_feature for n in near], np.float64)
                evaluation.results.append(estimate(MetricValues("stimulus_beats_training_feature", "similarity", beats,
                                                                True, "kamitani"), labels, test_set, source, n_boot,
                                                   n_perm, seed))
            entry[source] = {"nearest": [n.to_json() for n in near],
                             "train_paths": {n.nearest_pixel: str(paths[n.nearest_pixel]) for n in near}}
        key = f"{test_set}/decoded_features"
        if key in sim.features:
            labels, _, stimuli, _ = by_source["decoded"] if "decoded" in by_source else next(iter(by_source.values()))
            answers = retrieval_answers(sim.feature_mean(key), sim.labels)
            retrieved = np.stack([load_image(paths[a], size) for a in answers])
            m = _identification("retrieval_baseline_pixel_identification", correlation_matrix(retrieved, stimuli))
            evaluation.results.append(estimate(m, labels, test_set, "decoded", n_boot, n_perm, seed))
            per_layer = {}
            for layer, r in sim.features[key].items():
                ans = retrieval_answers(r, sim.labels)
                imgs = np.stack([load_image(paths[a], size) for a in ans])
                per_layer[layer] = float(pairwise_from_scores(correlation_matrix(imgs, stimuli)).mean())
            entry["baseline"] = {"answers": dict(zip(labels, answers)), "per_layer_pixel_identification": per_layer,
                                 "train_paths": {a: str(paths[a]) for a in answers}}
    evaluation.settings["retrieval"] = {"n_train_images": len(paths), "layers": layers,
                                        "feature_r": "Pearson r per layer, averaged over layers"}
