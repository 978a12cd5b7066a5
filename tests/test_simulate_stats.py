"""The second, independent simulator (model "dn-stats")."""
import numpy as np
import pytest
import torch

from brainrecon.data.bdata import read_fmri, roi_keys
from brainrecon.evaluate.reliability import retest_reliability
from brainrecon.simulate.statscortex import STATS_ROIS, StatsCortex, StatsCortexConfig
from brainrecon.simulate.subject import SubjectConfig, simulate_subject


def stats_config(seed: int = 3, n_train: int = 120) -> SubjectConfig:
    rois = {k: v.model_copy(update={"n_voxels": max(30, v.n_voxels // 6)}) for k, v in STATS_ROIS.items()}
    return SubjectConfig.for_model("dn-stats", seed=seed, n_train_images=n_train, n_test_natural=8,
                                   stimulus_size=64, stats_cortex=StatsCortexConfig(seed=seed, grid=32, rois=rois))


@pytest.fixture(scope="module")
def stats_subject(tmp_path_factory):
    out = tmp_path_factory.mktemp("stats_subject")
    return out, simulate_subject(out, stats_config(), None, progress=lambda m: None)


def test_design_and_files(stats_subject):
    out, paths = stats_subject
    cfg = stats_config()
    assert (cfg.train_reps, cfg.natural_reps, cfg.shapes_reps, cfg.letters_reps) == (3, 8, 8, 8)
    assert SubjectConfig.for_model("dn-stats").n_train_images == 600
    assert sum(s.n_voxels for s in STATS_ROIS.values()) == 3000
    n_vox = sum(s.n_voxels for s in cfg.stats_cortex.rois.values())
    train = read_fmri(paths["train"])
    assert train.X.shape == (120 * 3, n_vox) and len(set(train.labels)) == 120
    for name, n in (("natural", 8), ("shapes", 40), ("letters", 10)):
        f = read_fmri(paths[name])
        assert f.X.shape == (n * 8, n_vox) and len(set(f.labels)) == n
        assert all((out / "images" / f"{lab}.png").exists() for lab in set(f.labels))
    assert {"ROI_V1", "ROI_V2", "ROI_V3", "ROI_hV4", "ROI_LOC", "ROI_FFA", "ROI_PPA", "ROI_VC"} <= set(roi_keys(paths["train"]))
    assert read_fmri(paths["train"], "ROI_V1").X.shape[1] == cfg.stats_cortex.rois["V1"].n_voxels
    assert np.isfinite(train.voxel_xyz).all() and len(np.unique(train.runs)) > 1


def test_noise_is_plausible(stats_subject):
    """Single-presentation test-retest r: neither noiseless nor pure noise; early areas above high ones."""
    _, paths = stats_subject
    med = {}
    for roi in ("ROI_V1", "ROI_V2", "ROI_FFA", "ROI_PPA", "ROI_VC"):
        f = read_fmri(paths["natural"], roi)
        med[roi] = float(np.nanmedian(retest_reliability(f.X, f.labels)))
    assert 0.08 <= med["ROI_VC"] <= 0.5, med
    assert min(med["ROI_V1"], med["ROI_V2"]) > 0.1, med
    # noise is spatially correlated: nearby voxels' residuals correlate more than distant ones'
    f = read_fmri(paths["train"], "ROI_V1")
    means, labels = f.average_by_label()
    resid = f.X - means[[labels.index(lab) for lab in f.labels]]
    c = np.corrcoef(resid.T)
    d = np.linalg.norm(f.voxel_xyz[:, None] - f.voxel_xyz[None], axis=-1)
    near, far = c[(d > 0) & (d < 2)].mean(), c[d > 20].mean()
    assert near > far + 0.1, (near, far)


def test_deterministic_per_seed(tmp_path):
    a = simulate_subject(tmp_path / "a", stats_config(n_train=20), None, progress=lambda m: None)
    b = simulate_subject(tmp_path / "b", stats_config(n_train=20), None, progress=lambda m: None)
    np.testing.assert_array_equal(read_fmri(a["letters"]).X, read_fmri(b["letters"]).X)
    c = simulate_subject(tmp_path / "c", stats_config(seed=4, n_train=20), None, progress=lambda m: None)
    assert not np.allclose(read_fmri(a["letters"]).X, read_fmri(c["letters"]).X)


def test_roi_response_is_the_signal_of_that_area():
    cfg = stats_config().stats_cortex
    cortex = StatsCortex(cfg)
    rng = np.random.default_rng(0)
    images = torch.from_numpy(rng.random((12, 3, 64, 64)).astype(np.float32))
    full = cortex.signal(images, reference=True)
    np.testing.assert_allclose(full.mean(0), 0, atol=1e-4)
    sd = full.std(0, ddof=1)
    live = sd > 0.5        # voxels whose pRF lies beyond the 12-deg stimulus see nothing of it (signal 0)
    np.testing.assert_allclose(sd[live], 1, atol=1e-3)
    assert live.mean() > 0.8 and np.abs(full[:, ~live]).max() < 1e-6
    for roi in ("V1", "FFA"):
        np.testing.assert_allclose(cortex.roi_response(images[:5], roi), full[:5, cortex.roi_index(roi)], atol=1e-5)
    with pytest.raises(KeyError, match="areas are"):
        cortex.roi_response(images, "V9")


def test_cli_model_option(tmp_path):
    from typer.testing import CliRunner

    from brainrecon.cli import app
    result = CliRunner().invoke(app, ["simulate", "--out", str(tmp_path / "s"), "--model", "gabor"])
    assert result.exit_code == 2 and "--model 'gabor'" in result.output and "'dn-stats'" in result.output
    assert "Traceback" not in result.output and not (tmp_path / "s").exists()
