"""The simulated subject the benchmarks share: made once in a work folder, then reused."""
from __future__ import annotations

from pathlib import Path

from brainrecon.pipeline import Log
from brainrecon.simulate.cortex import CortexConfig
from brainrecon.simulate.subject import SubjectConfig, simulate_subject


def bench_subject(folder: Path, network, log: Log, n_train: int = 1200, n_test_natural: int = 50) -> Path:
    """``folder`` holding a seed-0 simulated subject (simulated there first if missing)."""
    if not (folder / "simulation.json").exists():
        log.stage(f"simulating a subject ({n_train} training images, {n_test_natural} natural test images)")
        simulate_subject(folder, SubjectConfig(seed=0, n_train_images=n_train, n_test_natural=n_test_natural,
                                               cortex=CortexConfig(seed=0)), network, progress=lambda m: None)
    return folder
