"""Evaluation of mental imagery as in the lab's work: everything within a family of targets.

The imagery targets form two families: the 15 imagined shapes (three forms x five colours, the
labels of :data:`~brainrecon.data.labelmaps.IMAGERY_SHAPES`) and the natural images (every other
label). Scores, all pairwise identification (chance 0.5, ties count one half):

- pixel identification within each family: a reconstruction against the other targets of its family;
- for the shapes, colour identification (candidates: the same form in the other colours) and shape
  identification (candidates: the same colour in the other forms);
- the same within-family identification of the perception reconstructions of the same targets;
- the information bound: each trial-averaged imagery voxel pattern identified among the perception
  patterns of the same family's targets, per ROI (each voxel centred on its mean over the family's
  targets in each condition, so the shared response does not count).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..data.labelmaps import IMAGERY_SHAPES
from .identification import correlation_matrix, pairwise_identification

FAMILIES = ("shapes", "natural")


def imagery_family(label: str) -> str:
    """``shapes`` for an imagined shape (:data:`IMAGERY_SHAPES`), else ``natural``."""
    return "shapes" if label in IMAGERY_SHAPES else "natural"


def family_members(labels: list[str]) -> dict[str, np.ndarray]:
    """{family: indices into ``labels``} for the families with at least two members (in :data:`FAMILIES` order)."""
    fam = np.array([imagery_family(lab) for lab in labels])
    return {f: np.flatnonzero(fam == f) for f in FAMILIES if (fam == f).sum() >= 2}


def family_identification(pred: np.ndarray, target: np.ndarray, labels: list[str]) -> dict[str, np.ndarray]:
    """Pairwise identification of each prediction among the targets of its own family.

    Parameters
    ----------
    pred, target : (n, ...) arrays
        Reconstructions (or patterns) and their targets, row for row.
    labels : list of str (n,)

    Returns
    -------
    dict
        {family: (n_family,) per-item identification}, families with two or more members.
    """
    return {f: pairwise_identification(pred[idx], target[idx]) for f, idx in family_members(labels).items()}


def _split(label: str) -> tuple[str, str]:
    form, _, colour = label.rpartition("_")
    return form, colour


def attribute_identification(pred: np.ndarray, target: np.ndarray, labels: list[str],
                             attribute: str) -> np.ndarray:
    """Per imagined shape: the share of candidates that differ from its target only in ``attribute``
    (``colour``: the same form in other colours; ``form``: the same colour in other forms) whose pixel
    correlation with the reconstruction is lower than its target's (ties count one half).

    Returns (n_shapes,) in the order of the shape labels in ``labels``; shapes without candidates are left out.
    """
    if attribute not in ("colour", "form"):
        raise ValueError("attribute is colour or form")
    shapes = [i for i, lab in enumerate(labels) if lab in IMAGERY_SHAPES]
    corr = correlation_matrix(pred[shapes], target[shapes])
    parts = [_split(labels[i]) for i in shapes]
    out = []
    for a, (form, colour) in enumerate(parts):
        cand = [b for b, (f, c) in enumerate(parts) if b != a and
                ((f == form and c != colour) if attribute == "colour" else (c == colour and f != form))]
        if not cand:
            continue
        diff = corr[a, a] - corr[a, cand]
        tie = np.abs(diff) <= 1e-12
        out.append(float(np.mean(np.where(tie, 0.5, diff > 0))))
    return np.array(out)


def information_bound(imagery: np.ndarray, perception: np.ndarray, labels: list[str]) -> dict[str, float]:
    """Identification of trial-averaged imagery patterns among the perception patterns of the same family.

    Parameters
    ----------
    imagery, perception : (n, n_voxels)
        Trial-averaged voxel patterns of the same targets, row for row.
    labels : list of str (n,)

    Returns
    -------
    dict
        {family: mean identification}; each voxel is centred on its mean over the family's targets
        within each condition first.
    """
    out = {}
    for f, idx in family_members(labels).items():
        a = imagery[idx] - imagery[idx].mean(0)
        b = perception[idx] - perception[idx].mean(0)
        out[f] = float(pairwise_identification(a, b).mean())
    return out


@dataclass
class FamilyScores:
    """Imagery scores of one family of targets (identification: mean over its targets; chance 0.5)."""
    family: str
    labels: list[str]
    pixel_identification: float
    perception_pixel_identification: float | None = None   # perception reconstructions of the same targets
    colour_identification: float | None = None             # shapes only
    shape_identification: float | None = None
    perception_colour_identification: float | None = None
    perception_shape_identification: float | None = None

    def to_json(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if v is not None and k != "family"} | {"n_targets": len(self.labels)}


@dataclass
class ImageryScores:
    """Scores of an imagery test set: per family, and the per-ROI information bound {roi: {family: value}}."""
    families: dict[str, FamilyScores]
    information_bound: dict[str, dict[str, float]] = field(default_factory=dict)

    def to_json(self) -> dict:
        return {"families": {f: s.to_json() for f, s in self.families.items()},
                "information_bound": self.information_bound}


def _mean(x: np.ndarray) -> float | None:
    return float(np.mean(x)) if len(x) else None


def score_imagery(recon: np.ndarray, stimuli: np.ndarray, labels: list[str],
                  perception: np.ndarray | None = None) -> ImageryScores:
    """Within-family scores of imagery reconstructions (n, 3, H, W) against their stimuli (n, 3, H, W).

    ``perception``: the perception reconstructions of the same targets, row for row (rows of NaN
    where a target was not perceived in the run); scored the same way on the targets that have one.
    """
    families = {}
    members = family_members(labels)
    for f, idx in members.items():
        labs = [labels[i] for i in idx]
        s = FamilyScores(f, labs, float(pairwise_identification(recon[idx], stimuli[idx]).mean()))
        if f == "shapes":
            s.colour_identification = _mean(attribute_identification(recon[idx], stimuli[idx], labs, "colour"))
            s.shape_identification = _mean(attribute_identification(recon[idx], stimuli[idx], labs, "form"))
        if perception is not None:
            seen = [i for i in idx if np.isfinite(perception[i]).all()]
            if len(seen) >= 2:
                p, t, pl = perception[seen], stimuli[seen], [labels[i] for i in seen]
                s.perception_pixel_identification = float(pairwise_identification(p, t).mean())
                if f == "shapes":
                    s.perception_colour_identification = _mean(attribute_identification(p, t, pl, "colour"))
                    s.perception_shape_identification = _mean(attribute_identification(p, t, pl, "form"))
        families[f] = s
    return ImageryScores(families)
