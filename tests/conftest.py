"""Shared fixtures: a small simulated subject, made once per test session."""
from __future__ import annotations

import pytest

from brainrecon.nets import load_network
from brainrecon.simulate.cortex import DEFAULT_ROIS, CortexConfig
from brainrecon.simulate.subject import SubjectConfig, simulate_subject


def small_subject_config(seed: int = 1, n_train: int = 200, n_test_natural: int = 6) -> SubjectConfig:
    """A reduced subject (fewer voxels and images, paper presentation counts) for fast tests."""
    rois = {k: v.model_copy(update={"n_voxels": max(40, v.n_voxels // 5)}) for k, v in DEFAULT_ROIS.items()}
    return SubjectConfig(seed=seed, n_train_images=n_train, n_test_natural=n_test_natural, stimulus_size=64,
                         cortex=CortexConfig(seed=seed, grid=32, rois=rois))


@pytest.fixture(scope="session")
def network():
    return load_network("hed-vgg16")


@pytest.fixture(scope="session")
def small_subject(tmp_path_factory, network):
    out = tmp_path_factory.mktemp("subject")
    paths = simulate_subject(out, small_subject_config(), network, progress=lambda m: None)
    return out, paths
