"""Human-judgment identification (the paper's second measure of reconstruction quality).

A rater sees a reconstruction and two candidates, its own stimulus and another image of the same
test set, and picks the one the reconstruction resembles. Accuracy is the fraction of correct
picks over all judgments; chance is 0.5. With every ordered pair of a test set judged once, a rater
who picks by pixel correlation scores exactly the pixel-correlation identification
(:func:`~brainrecon.evaluate.identification.pairwise_identification`, ties aside).

This module holds what does not depend on how trials are shown: the trials of a run folder, the
answers file (JSON lines, one judgment per line, appended as they come, so a session can stop and
resume) and the scores. Each judgment is appended as one complete line in one write, so a crash can
only cut short the last line: reading drops such a torn last line with a warning, and
:func:`repair_answers` also cuts it off the file before a server appends to it.
:mod:`~brainrecon.evaluate.judgment_app` shows the trials in a browser.
"""
from __future__ import annotations

import json
import os
import unicodedata
import warnings
import zlib
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
from scipy.stats import binomtest

from ..data.stimuli import find_images
from ..runfolder import RECON_FOLDERS, RunFolder

MAX_RATER_LENGTH = 100
BAD_NAME_CATEGORIES = {"Cc", "Cs", "Zl", "Zp"}     # controls, lone surrogates, line and paragraph separators

Warn = Callable[[str], None]


class JudgmentError(ValueError):
    """A run folder or answers file that cannot be judged or scored (the message says why)."""


@dataclass(frozen=True)
class Trial:
    """One judgment: the reconstruction of ``label`` against its stimulus and ``distractor``'s."""
    test_set: str
    label: str
    distractor: str

    @property
    def id(self) -> str:
        return f"{self.test_set}/{self.label}/{self.distractor}"


@dataclass
class RunImages:
    """Where a run's reconstructions and stimuli are: ``recon[set][label]``, ``stimuli[set][label]`` (paths);
    ``families[set][label]``: the family of each target of an imagery set (trials stay within a family)."""
    recon: dict[str, dict[str, Path]]
    stimuli: dict[str, dict[str, Path]]
    families: dict[str, dict[str, str]] = field(default_factory=dict)

    @property
    def labels(self) -> dict[str, list[str]]:
        return {s: list(v) for s, v in self.recon.items()}


def run_images(run_dir: Path, images: Path | None = None, which: str = "decoded") -> RunImages:
    """The reconstructions (``which``: decoded or true features) and stimuli of a run folder.

    ``images``: the stimulus folder; default the one recorded in the run's ``run.json``.
    """
    run_dir = Path(run_dir)
    if which not in RECON_FOLDERS:
        raise JudgmentError(f"unknown reconstructions {which!r}: use one of {', '.join(RECON_FOLDERS)}")
    run = RunFolder(run_dir)
    folder = run.recon_dir(which)
    if not folder.is_dir():
        raise JudgmentError(f"{folder} does not exist: judge the folder of a finished `brainrecon run` or "
                            "`brainrecon demo` (it holds recon/<test set>/<label>.png)")
    if images is None:
        info = run.run_info
        if not info.is_file():
            raise JudgmentError(f"{info} is missing, so the stimulus folder is unknown: pass --images DIR")
        try:
            images = Path(json.loads(info.read_text())["images"])
        except (ValueError, KeyError, TypeError, OSError) as e:
            raise JudgmentError(f"{info} does not name the stimulus folder ({type(e).__name__}: {e}): "
                                "pass --images DIR") from None
    recon = {d.name: {p.stem: p for p in sorted(d.glob("*.png"))} for d in sorted(folder.iterdir()) if d.is_dir()}
    recon = {s: v for s, v in recon.items() if v}
    if not recon:
        raise JudgmentError(f"no reconstructions (<test set>/<label>.png) in {folder}")
    few = [s for s, v in recon.items() if len(v) < 2]
    if few:
        raise JudgmentError(f"test set(s) {', '.join(few)} in {folder} hold fewer than two reconstructions: "
                            "a judgment needs another image of the same set")
    try:
        stimuli = {s: find_images(Path(images), list(v)) for s, v in recon.items()}
    except FileNotFoundError as e:
        raise JudgmentError(f"{e} (stimulus folder of {run_dir}; pass --images DIR if it moved)") from None
    return RunImages(recon, stimuli, imagery_families(run))


def imagery_families(run: RunFolder) -> dict[str, dict[str, str]]:
    """{set: {label: family}} of the run's imagery sets, from the ``imagery`` entries of its metrics.json."""
    try:
        metrics = json.loads(run.metrics.read_text()) if run.metrics.is_file() else {}
    except (ValueError, OSError):
        return {}
    return {name: {lab: fam for fam, s in m["imagery"]["families"].items() for lab in s["labels"]}
            for name, m in metrics.items() if isinstance(m, dict) and "families" in m.get("imagery", {})}


def make_trials(labels: dict[str, list[str]], pairs_per_image: int | None = None, seed: int = 0,
                families: dict[str, dict[str, str]] | None = None) -> list[Trial]:
    """Trials for every reconstruction: all other images of its set as distractors, or
    ``pairs_per_image`` of them drawn at random (seeded), in set and label order.

    ``families``: {set: {label: family}} for imagery sets, whose distractors are drawn from the
    label's own family only (imagined shapes against shapes, natural images against natural ones).
    """
    rng = np.random.default_rng(seed)
    trials = []
    families = families or {}
    for test_set, labs in labels.items():
        fam = families.get(test_set, {})
        for label in labs:
            others = [o for o in labs if o != label and fam.get(o) == fam.get(label)]
            if pairs_per_image is not None and pairs_per_image < len(others):
                if pairs_per_image < 1:
                    raise JudgmentError("pairs per image must be at least 1")
                others = [others[i] for i in sorted(rng.choice(len(others), pairs_per_image, replace=False))]
            trials += [Trial(test_set, label, o) for o in others]
    return trials


def valid_rater(rater: object) -> str:
    """A rater's name, stripped; raises :class:`JudgmentError` unless it is a non-empty string of at
    most ``MAX_RATER_LENGTH`` characters without control characters, line breaks (U+2028, U+2029)
    or lone surrogates. Other characters (any script, emoji, joiners) are names' own."""
    if not isinstance(rater, str):
        raise JudgmentError(f"the rater name must be a string, not {type(rater).__name__}")
    rater = rater.strip()
    if not rater:
        raise JudgmentError("enter a rater name")
    if len(rater) > MAX_RATER_LENGTH:
        raise JudgmentError(f"a rater name has at most {MAX_RATER_LENGTH} characters")
    if any(unicodedata.category(c) in BAD_NAME_CATEGORIES for c in rater):
        raise JudgmentError("a rater name cannot hold control characters, line breaks or lone surrogates")
    return rater


def _rater_seed(rater: str, seed: int) -> int:
    return zlib.crc32(f"{seed}:{rater}".encode())


def rater_order(trials: list[Trial], rater: str, seed: int = 0) -> list[tuple[Trial, bool]]:
    """The trials in this rater's own random order, each with whether its stimulus is shown on the
    left; the same for the same rater and seed (so an interrupted session resumes as it was)."""
    rng = np.random.default_rng(_rater_seed(rater, seed))
    order = rng.permutation(len(trials))
    left = rng.random(len(trials)) < 0.5
    return [(trials[i], bool(left[i])) for i in order]


def answer_record(trial: Trial, rater: str, choice: str, stimulus_left: bool, rt_ms: float | None = None) -> dict:
    """One line of the answers file; raises :class:`JudgmentError` if ``choice`` is not a candidate."""
    if choice not in (trial.label, trial.distractor):
        raise JudgmentError(f"choice {choice!r} is not a candidate of trial {trial.id}")
    return {"trial": trial.id, **asdict(trial), "rater": rater, "choice": choice,
            "correct": choice == trial.label, "stimulus_left": stimulus_left,
            "rt_ms": None if rt_ms is None else round(float(rt_ms))}


def _warn(message: str) -> None:
    warnings.warn(message, stacklevel=3)


def _parse_answers(path: Path, data: bytes) -> tuple[list[dict], tuple[int, int, bytes] | None]:
    """The judgments in ``data`` (the bytes of answers file ``path``) and its torn last line, if any:
    (line number, offset of its first byte, its bytes). A bad line elsewhere raises."""
    out, end = [], 0
    lines = data.split(b"\n")                 # the last item follows the last newline (b"" if none does)
    for n, line in enumerate(lines, 1):
        start, end = end, end + len(line) + 1
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except (ValueError, RecursionError):   # not JSON (or not UTF-8)
            if n == len(lines):                 # the last line, without its newline: a write cut short
                return out, (n, start, line)
            rec = None
        if not isinstance(rec, dict) or not {"trial", "rater", "choice"} <= rec.keys():
            raise JudgmentError(f"{path}, line {n}: not a judgment (a JSON object with trial, rater and "
                                "choice); remove the line or fix it")
        out.append(rec)
    return out, None


def _torn_message(path: Path, n: int, line: bytes) -> str:
    text = line.decode("utf-8", "replace")
    return (f"{path}, line {n}: dropped a torn last line (a write cut short, e.g. by a crash): "
            f"{text[:60]!r}{'...' if len(text) > 60 else ''} ({len(line)} bytes)")


def read_answers(paths: list[Path] | Path, warn: Warn | None = None) -> list[dict]:
    """All judgments of one or more answers files (JSON lines).

    Parameters
    ----------
    paths : the answers file(s).
    warn : called with a message for each torn last line (a last line without its newline that is
        not JSON, as a crash mid-write leaves): the line is dropped. Default :func:`warnings.warn`.

    Raises
    ------
    JudgmentError : a missing file, or a bad line other than a torn last one (naming file and line).
    """
    out = []
    for path in [paths] if isinstance(paths, (str, Path)) else paths:
        path = Path(path)
        if not path.is_file():
            raise JudgmentError(f"answers file {path} does not exist")
        records, torn = _parse_answers(path, path.read_bytes())
        if torn:
            (warn or _warn)(_torn_message(path, torn[0], torn[2]))
        out += records
    return out


def repair_answers(path: Path, warn: Warn | None = None) -> list[dict]:
    """The judgments of answers file ``path``, made safe to append to.

    A torn last line (see :func:`read_answers`) is copied to ``<path>.torn`` (appended, flushed), then
    cut off ``path`` (one truncation: a crash in between leaves it to be cut again), with a ``warn``
    message; a last line without its newline gets one. Other bad lines raise :class:`JudgmentError`.
    """
    path = Path(path)
    if not path.is_file():
        raise JudgmentError(f"answers file {path} is not a file")
    data = path.read_bytes()
    records, torn = _parse_answers(path, data)
    if torn:
        n, start, line = torn
        kept = path.with_name(path.name + ".torn")
        _append(kept, line + b"\n")
        os.truncate(path, start)
        (warn or _warn)(f"{_torn_message(path, n, line)}; its bytes are kept in {kept}")
    elif data and not data.endswith(b"\n"):
        _append(path, b"\n")
    return records


def _append(path: Path, data: bytes) -> None:
    """Append ``data`` in one write (O_APPEND) and flush it to disk."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
    try:
        while data:
            data = data[os.write(fd, data):]
        os.fsync(fd)
    finally:
        os.close(fd)


def append_answer(path: Path, record: dict) -> None:
    """Append one judgment (:func:`answer_record`) to answers file ``path`` as one complete line."""
    _append(Path(path), (json.dumps(record, allow_nan=False) + "\n").encode())


def _wilson(k: int, n: int) -> list[float]:
    ci = binomtest(k, n).proportion_ci(0.95, method="wilson")
    return [float(ci.low), float(ci.high)]


def _fraction_correct(rows: list[tuple[str, str, bool, str]], column: int) -> dict[str, float]:
    """Fraction correct per value of ``rows``' column (0: rater, 1: label); rows (rater, label, correct, trial)."""
    groups: dict[str, list[bool]] = {}
    for row in rows:
        groups.setdefault(row[column], []).append(row[2])
    return {g: float(np.mean(v)) for g, v in sorted(groups.items())}


def score_answers(trials: list[Trial], answers: list[dict]) -> dict[str, dict]:
    """Scores per test set from judgments of ``trials``.

    Each rater's first judgment of a trial counts; judgments of unknown trials raise (the answers
    belong to another run or another draw of pairs). Returns, per set: ``human_identification``
    (fraction correct over judgments), ``n_judgments``, ``n_raters``, ``ci95`` (Wilson interval),
    ``trials_covered`` (fraction of the set's trials judged at least once), ``per_rater`` and
    ``per_image`` (fraction correct).
    """
    by_id = {t.id: t for t in trials}
    seen: set[tuple[str, str]] = set()
    rows: dict[str, list[tuple[str, str, bool, str]]] = {}        # per set: (rater, label, correct, trial)
    for rec in answers:
        t = by_id.get(rec["trial"])
        if t is None:
            raise JudgmentError(f"judgment of trial {rec['trial']!r} (rater {rec['rater']!r}) is not a trial of "
                                "this run: score answers with the run and --pairs-per-image/--seed they were made with")
        if rec["choice"] not in (t.label, t.distractor):
            raise JudgmentError(f"judgment of trial {t.id} by {rec['rater']!r} chose {rec['choice']!r}, "
                                "not one of its candidates")
        if (rec["rater"], t.id) in seen:
            continue
        seen.add((rec["rater"], t.id))
        rows.setdefault(t.test_set, []).append((rec["rater"], t.label, rec["choice"] == t.label, t.id))
    n_trials = Counter(t.test_set for t in trials)
    out = {}
    for test_set in [s for s in n_trials if s in rows]:        # in the trials' order
        r = rows[test_set]
        k, n = sum(c for _, _, c, _ in r), len(r)
        out[test_set] = {"human_identification": k / n, "n_judgments": n, "n_raters": len({x[0] for x in r}),
                         "ci95": _wilson(k, n), "trials_covered": len({x[3] for x in r}) / n_trials[test_set],
                         "per_rater": _fraction_correct(r, 0), "per_image": _fraction_correct(r, 1)}
    return out
