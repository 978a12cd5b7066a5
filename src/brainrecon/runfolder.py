"""The layout of a run folder, in one place: every path a run writes, and who owns the folder.

::

    RUN/config.json                 the run's settings and inputs (``brainrecon run RUN/config.json`` repeats it)
    RUN/run.json                    what the run found and chose: penalties, ROIs, timings, the settings' digest
    RUN/metrics.json                scores per test set
    RUN/evaluation.json             ``brainrecon evaluate``: every metric with its interval, the retrieval check
    RUN/metrics.csv                 the same metrics, one row per test set, source and metric
    RUN/report.html                 the report
    RUN/recon/<set>/<label>.png     reconstructions from decoded features
    RUN/recon_true_features/<set>/<label>.png
    RUN/recon_snapshots/<set>/<label>/iterNNNNN.png
    RUN/judgments/answers.jsonl     human judgments (``brainrecon judge``)
    RUN/cache/                      content-addressed intermediate results (kept across runs)

A run folder belongs to one run: a later run with the same settings and inputs resumes it; one with
other settings or inputs is refused unless ``overwrite`` is given, which removes the earlier run's
outputs (caches are kept; earlier judgments are moved aside, never deleted).
"""
from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

RECON_FOLDERS = {"decoded": "recon", "true": "recon_true_features"}


class RunFolderError(RuntimeError):
    """A run folder that holds another run; the message says what differs and what to do."""


@dataclass(frozen=True)
class RunFolder:
    """Paths of one run folder (nothing is created until written)."""
    root: Path

    def __post_init__(self):
        object.__setattr__(self, "root", Path(self.root))

    @property
    def config(self) -> Path:
        return self.root / "config.json"

    @property
    def run_info(self) -> Path:
        return self.root / "run.json"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.json"

    @property
    def evaluation(self) -> Path:
        return self.root / "evaluation.json"

    @property
    def metrics_csv(self) -> Path:
        return self.root / "metrics.csv"

    @property
    def report(self) -> Path:
        return self.root / "report.html"

    @property
    def cache(self) -> Path:
        return self.root / "cache"

    @property
    def judgments(self) -> Path:
        return self.root / "judgments"

    def answers(self, which: str = "decoded") -> Path:
        """The answers file of human judgments of the ``which`` reconstructions (decoded or true)."""
        return self.judgments / ("answers.jsonl" if which == "decoded" else f"answers_{which}.jsonl")

    def human_scores(self, which: str = "decoded") -> Path:
        return self.root / ("human_judgment.json" if which == "decoded" else f"human_judgment_{which}_features.json")

    def recon_dir(self, which: str = "decoded") -> Path:
        """Folder of the reconstructions (one subfolder per test set): ``which`` decoded or true."""
        return self.root / RECON_FOLDERS[which]

    def recon_png(self, test_set: str, label: str, which: str = "decoded") -> Path:
        return self.recon_dir(which) / test_set / f"{label}.png"

    def snapshot_png(self, test_set: str, label: str, iteration: int) -> Path:
        return self.root / "recon_snapshots" / test_set / label / f"iter{iteration:05d}.png"

    def read_json(self, path: Path) -> dict:
        """A JSON file of the run, or {} if absent or unreadable."""
        try:
            data = json.loads(Path(path).read_text())
            return data if isinstance(data, dict) else {}
        except (OSError, ValueError):
            return {}

    def outputs(self) -> list[Path]:
        """What a run writes outside its cache (present ones)."""
        paths = [self.config, self.run_info, self.metrics, self.evaluation, self.metrics_csv, self.report,
                 self.recon_dir("decoded"), self.recon_dir("true"), self.root / "recon_snapshots",
                 *self.root.glob("human_judgment*.json")]
        return [p for p in paths if p.exists()]

    def claim(self, digest: str, describe: dict, overwrite: bool = False) -> bool:
        """Make the folder this run's: True if it already is (the run resumes), False if it is new or was
        cleared (then a run.json naming the run is written at once, so an interrupted run resumes). Raises :class:`RunFolderError` if it holds another run and ``overwrite`` is False.

        ``digest``: the key of the run's settings and inputs; ``describe``: {name: value} of the
        settings and inputs, compared with the earlier run's to say what differs.
        """
        earlier = self.read_json(self.run_info)
        if earlier.get("config_digest") == digest:
            return True
        if not earlier and not self.outputs():
            self._stub(digest, describe)
            return False
        if not overwrite:
            before = earlier.get("settings", {})
            differ = [k for k in sorted(set(before) | set(describe)) if before.get(k) != describe.get(k)]
            what = ", ".join(differ[:8]) + (" ..." if len(differ) > 8 else "") if differ else "settings or inputs"
            raise RunFolderError(f"{self.root} holds another run (it differs in {what}): give another --out, or "
                                 "--overwrite to replace that run's outputs (its caches are kept)")
        for p in self.outputs():
            shutil.rmtree(p) if p.is_dir() else p.unlink()
        if self.judgments.exists():
            self.judgments.rename(self.root / f"judgments-before-{time.strftime('%Y%m%d-%H%M%S')}")
        self._stub(digest, describe)
        return False

    def _stub(self, digest: str, describe: dict) -> None:
        """run.json of a run under way (replaced when it finishes): an interrupted run resumes."""
        from .cache import write_json
        self.root.mkdir(parents=True, exist_ok=True)
        write_json(self.run_info, {"config_digest": digest, "state": "running", "settings": describe})
