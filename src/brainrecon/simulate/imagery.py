"""Mental imagery as top-down reactivation of the perceptual signal.

The signal an imagined image evokes in a visual area is its perceptual (noise-free) signal scaled
by a gain that rises along the hierarchy (:data:`IMAGERY_GAINS`, fixed by design, never tuned to
results) and by a per-trial vividness factor drawn from U(0.5, 1.5). Fixation trials carry no
signal. The simulator then measures these signals with the same noise as perception.

:func:`imagery_signal` works on any simulator's per-voxel signals and area names, so each
simulator of the package can reuse it; :func:`imagery_design` lays out the trials of the real
experiment (every run shows each of the 26 trial types once: 1-15 shapes, 16 fixation, 17-26
natural images).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# fraction of the perceptual signal reaching each area during imagery
IMAGERY_GAINS = {"V1": 0.25, "V2": 0.3, "V3": 0.35, "hV4": 0.45, "LOC": 0.6, "FFA": 0.6, "PPA": 0.6}
VIVIDNESS_RANGE = (0.5, 1.5)
FIXATION = 16                      # the trial number of fixation in the lab's imagery experiment


@dataclass
class ImageryDesign:
    """Trials of an imagery experiment.

    Attributes
    ----------
    number : (n_trials,) int
        The trial type in the lab's numbering (1-15 shapes, 16 fixation, 17-26 natural images).
    target : (n_trials,) int
        Index of the imagined image among the targets, -1 for fixation.
    runs, blocks : (n_trials,) int
        Run (1-based) and trial position within the run (1-based).
    """
    number: np.ndarray
    target: np.ndarray
    runs: np.ndarray
    blocks: np.ndarray


def imagery_design(numbers: list[int], n_runs: int, rng: np.random.Generator) -> ImageryDesign:
    """Each run holds every trial type of ``numbers`` once, in random order.

    Parameters
    ----------
    numbers : list of int
        Trial types in target order (the lab's 1..26 without 16), plus :data:`FIXATION` anywhere:
        the fixation trial is added to every run whether listed or not.
    n_runs : int
        Runs (the real experiment: 20, so 20 trials per target).
    """
    targets = [n for n in numbers if n != FIXATION]
    types = np.array(targets + [FIXATION])
    index = {n: i for i, n in enumerate(targets)}
    number, runs, blocks = [], [], []
    for run in range(1, n_runs + 1):
        order = types[rng.permutation(len(types))]
        number.extend(order)
        runs.extend([run] * len(order))
        blocks.extend(range(1, len(order) + 1))
    number = np.array(number)
    return ImageryDesign(number, np.array([index.get(int(n), -1) for n in number]), np.array(runs), np.array(blocks))


def imagery_signal(perception: np.ndarray, voxel_roi: np.ndarray, target: np.ndarray, rng: np.random.Generator,
                   gains: dict[str, float] = IMAGERY_GAINS) -> tuple[np.ndarray, np.ndarray]:
    """Noise-free imagery signals of trials from the perceptual signals of their targets.

    Parameters
    ----------
    perception : (n_targets, n_voxels) float
        Noise-free perceptual signal of each target, as the simulator's noise model expects them
        (e.g. standardised per voxel).
    voxel_roi : (n_voxels,) str
        The area of each voxel; every area needs a gain in ``gains``.
    target : (n_trials,) int
        The imagined target of each trial, -1 for fixation (no signal).
    rng : numpy Generator
        Draws the per-trial vividness.
    gains : dict
        Area name -> fraction of the perceptual signal reaching it (default :data:`IMAGERY_GAINS`).

    Returns
    -------
    signal : (n_trials, n_voxels) float64
        ``vividness[t] * gain[roi] * perception[target[t]]``, zero on fixation trials.
    vividness : (n_trials,) float
        U(0.5, 1.5) per trial (drawn for fixation trials too, then unused).
    """
    missing = sorted(set(np.unique(voxel_roi)) - set(gains))
    if missing:
        raise ValueError(f"no imagery gain for area(s) {', '.join(missing)}: give one in gains (known: "
                         f"{', '.join(gains)})")
    gain = np.array([gains[r] for r in voxel_roi], dtype=np.float64)
    target = np.asarray(target)
    vividness = rng.uniform(*VIVIDNESS_RANGE, size=len(target))
    signal = np.zeros((len(target), perception.shape[1]), dtype=np.float64)
    on = target >= 0
    signal[on] = perception[target[on]] * gain * vividness[on, None]
    return signal, vividness
