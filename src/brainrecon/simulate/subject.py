"""Simulate a subject of the deep image reconstruction experiment and write it like the real data.

Output folder::

    train.h5                 training fMRI (n_train_images x train_reps samples), BData
    test_natural.h5          held-out natural images x natural_reps
    test_shapes.h5           40 shapes x shapes_reps
    test_letters.h5          10 letters x letters_reps
    test_imagery.h5          imagery of 25 targets (15 shapes, 10 natural test images) in imagery_runs runs, each
                             target and one fixation trial per run, labelled by number like the lab's files
    imagery_labels.tsv       the image stem of each imagery trial number (1-15 shapes, 16 fixation, 17-26 natural)
    images/<label>.png       every stimulus, labels as in the files' stimulus_name
    simulation.json          the configuration used

Two independent cortex models (``SubjectConfig.model``): ``"css-vgg"`` (:mod:`.cortex`, the demo's:
Gabor-energy CSS early areas, higher areas pooling VGG features) and ``"dn-stats"``
(:mod:`.statscortex`: divisive-normalisation early areas, higher areas mixing mid-level image
statistics, spatially correlated noise with run effects). :meth:`SubjectConfig.for_model` gives each
model's default design (the second: 600 training images x 3, 8 presentations per test image).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Literal

import numpy as np
import torch
from PIL import Image
from pydantic import BaseModel, Field

from ..data.bdata import BData, write_bdata
from ..data.labelmaps import FIXATION_LABEL, IMAGERY_SHAPES
from ..data.natural import natural_images
from ..data.stimuli import StimulusSet, letters, shapes
from .cortex import CortexConfig, SyntheticCortex
from .statscortex import StatsCortex, StatsCortexConfig

MODELS = ("css-vgg", "dn-stats")
# each model's default design; css-vgg: the paper's (1,200 x 5; 24 / 20 / 12 presentations)
MODEL_DESIGNS = {"css-vgg": {},
                 "dn-stats": {"n_train_images": 600, "train_reps": 3, "natural_reps": 8, "shapes_reps": 8,
                              "letters_reps": 8}}

from .imagery import FIXATION, imagery_design, imagery_signal

N_IMAGERY_NATURAL = 10   # natural test images among the imagery targets (trial numbers 17-26)


class SubjectConfig(BaseModel):
    """What to simulate. Presentation counts default to the paper's (``for_model``: a model's design)."""
    model: Literal["css-vgg", "dn-stats"] = "css-vgg"
    seed: int = Field(0, ge=0)
    n_train_images: int = Field(1200, ge=2)
    n_test_natural: int = Field(50, ge=2)     # pairwise identification needs two images
    train_reps: int = Field(5, ge=1)
    natural_reps: int = Field(24, ge=1)
    shapes_reps: int = Field(20, ge=1)
    letters_reps: int = Field(12, ge=1)
    imagery_runs: int = Field(20, ge=1)       # imagery runs: each imagines every target once (+ one fixation trial)
    stimulus_size: int = Field(128, ge=16)    # pixels of the saved stimulus images
    images_per_run: int = Field(50, ge=1)
    cortex: CortexConfig = CortexConfig()            # model "css-vgg"
    stats_cortex: StatsCortexConfig = StatsCortexConfig()  # model "dn-stats"

    @classmethod
    def for_model(cls, model: str, seed: int = 0, **settings) -> "SubjectConfig":
        """The default design of ``model`` with its cortex seeded by ``seed``; ``settings`` override."""
        cortex = {"cortex": CortexConfig(seed=seed)} if model == "css-vgg" else \
            {"stats_cortex": StatsCortexConfig(seed=seed)}
        return cls(**{"model": model, "seed": seed, **MODEL_DESIGNS.get(model, {}), **cortex, **settings})

    def build_cortex(self, network):
        """The configured model's cortex (``network``: the DNN the css-vgg model's higher areas pool)."""
        if self.model == "dn-stats":
            return StatsCortex(self.stats_cortex)
        return SyntheticCortex(self.cortex, network)


def presentation_order(n_images: int, reps: int, per_run: int, rng: np.random.Generator):
    """(image index, run, block) per sample: each repetition shows every image once, in runs."""
    idx, runs, blocks, run = [], [], [], 0
    for _ in range(reps):
        order = rng.permutation(n_images)
        for s in range(0, n_images, per_run):
            chunk = order[s:s + per_run]
            run += 1
            idx.extend(chunk)
            runs.extend([run] * len(chunk))
            blocks.extend(range(1, len(chunk) + 1))
    return np.array(idx), np.array(runs), np.array(blocks)


def to_bdata(responses: np.ndarray, labels: list[str] | None, runs: np.ndarray, blocks: np.ndarray,
             cortex: SyntheticCortex, numbers: np.ndarray | None = None) -> BData:
    """BData in the layout of the lab's preprocessed files (VoxelData, ROI_*, voxel_xyz, Run, Block, and
    stimulus_name with a vmap, or with ``numbers`` a numeric ``Label`` as the lab's imagery files)."""
    n, v = responses.shape
    b = BData(dataset=np.zeros((n, 0)), metadata={}, vmap={})
    b.add(responses, "VoxelData", "fMRI voxel responses")
    vox = cortex.voxels
    for roi in cortex.config.rois:
        b.add_metadata(f"ROI_{roi}", np.where(vox.roi == roi, 1.0, np.nan), f"1 = ROI {roi}", where="VoxelData")
    b.add_metadata("ROI_VC", np.ones(v), "1 = ROI VC (all visual cortex voxels)", where="VoxelData")
    for k, axis in enumerate("xyz"):
        b.add_metadata(f"voxel_{axis}", vox.xyz[:, k].astype(float), f"voxel {axis} coordinate (mm)", where="VoxelData")
    b.add(runs.astype(float), "Run", "run number")
    b.add(blocks.astype(float), "Block", "block number within run")
    if numbers is not None:
        b.add(np.asarray(numbers, dtype=float), "Label", "imagery trial type (1-15 shapes, 16 fixation, 17-26 natural)")
        return b
    unique = list(dict.fromkeys(labels))
    code = {lab: float(i + 1) for i, lab in enumerate(unique)}
    b.add(np.array([code[lab] for lab in labels]), "stimulus_name", "stimulus name (see vmap)")
    b.add_vmap("stimulus_name", {c: lab for lab, c in code.items()})
    return b


def simulate_subject(out: Path, config: SubjectConfig, network,
                     progress: Callable[[str], None] = print) -> dict[str, Path]:
    """Write a simulated subject to ``out``; returns {"train": path, "natural": path, ...}.

    ``network``: the VGG encoder of the css-vgg model's higher areas (unused by dn-stats; may be None).
    """
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(config.seed)
    progress("building stimuli")
    train, natural = natural_images(config.n_train_images, config.n_test_natural, config.stimulus_size, config.seed)
    sets = {"train": (train, config.train_reps), "natural": (natural, config.natural_reps),
            "shapes": (shapes(config.stimulus_size), config.shapes_reps),
            "letters": (letters(config.stimulus_size), config.letters_reps)}
    for stim, _ in sets.values():
        for lab, img in zip(stim.labels, stim.images):
            Image.fromarray((img.transpose(1, 2, 0) * 255).round().astype(np.uint8)).save(out / "images" / f"{lab}.png")

    cortex = config.build_cortex(network)
    paths = {}
    for name, (stim, reps) in sets.items():
        progress(f"simulating fMRI: {name} ({len(stim)} images x {reps} presentations)")
        # the cortex sees exactly the saved (8-bit) pixels
        images = torch.from_numpy(np.round(stim.images * 255) / 255).float()
        signal = cortex.signal(images, reference=(name == "train"))
        idx, runs, blocks = presentation_order(len(stim), reps, config.images_per_run, rng)
        responses = (cortex.measure(signal[idx], rng, runs=runs, blocks=blocks) if config.model == "dn-stats"
                     else cortex.measure(signal[idx], rng))
        labels = [stim.labels[i] for i in idx]
        path = out / ("train.h5" if name == "train" else f"test_{name}.h5")
        write_bdata(path, to_bdata(responses, labels, runs, blocks, cortex))
        paths[name] = path
    paths["imagery"] = simulate_imagery(out, natural, cortex, config, rng, progress)
    (out / "simulation.json").write_text(json.dumps(config.model_dump(), indent=2))
    return paths


def imagery_targets(natural: StimulusSet, size: int) -> tuple[list[int], StimulusSet]:
    """The imagery targets in the lab's numbering: (trial numbers, images); 1-15 the shapes, 17-26 the
    first (up to) ten natural test images."""
    shape_set = shapes(size)
    by_label = dict(zip(shape_set.labels, shape_set.images))
    k = min(N_IMAGERY_NATURAL, len(natural))
    labels = list(IMAGERY_SHAPES) + natural.labels[:k]
    images = np.stack([by_label[lab] for lab in IMAGERY_SHAPES] + list(natural.images[:k]))
    numbers = list(range(1, len(IMAGERY_SHAPES) + 1)) + list(range(FIXATION + 1, FIXATION + 1 + k))
    return numbers, StimulusSet("imagery", labels, images)


def simulate_imagery(out: Path, natural: StimulusSet, cortex: SyntheticCortex, config: SubjectConfig,
                     rng: np.random.Generator, progress: Callable[[str], None] = print) -> Path:
    """Write ``test_imagery.h5`` and its label map ``imagery_labels.tsv`` (the cortex must have seen the
    training images); returns the BData file's path."""
    numbers, targets = imagery_targets(natural, config.stimulus_size)
    progress(f"simulating fMRI: imagery ({len(targets)} targets + fixation x {config.imagery_runs} runs)")
    perception = cortex.signal(torch.from_numpy(np.round(targets.images * 255) / 255).float())
    design = imagery_design(numbers, config.imagery_runs, rng)
    signal, _ = imagery_signal(perception, cortex.voxels.roi, design.target, rng)
    responses = (cortex.measure(signal, rng, runs=design.runs, blocks=design.blocks) if config.model == "dn-stats"
                 else cortex.measure(signal, rng))
    path = out / "test_imagery.h5"
    write_bdata(path, to_bdata(responses, None, design.runs, design.blocks, cortex, numbers=design.number))
    rows = [(n, lab) for n, lab in zip(numbers, targets.labels)] + [(FIXATION, FIXATION_LABEL)]
    (out / "imagery_labels.tsv").write_text("".join(f"{n}\t{lab}\n" for n, lab in sorted(rows)))
    return path
