import h5py
import numpy as np

from brainrecon.data.bdata import read_fmri, roi_keys
from brainrecon.evaluate.reliability import retest_reliability
from brainrecon.nets import load_network
from brainrecon.simulate.subject import simulate_subject

from conftest import small_subject_config


def test_layout_like_the_real_data(small_subject):
    out, paths = small_subject
    assert set(paths) == {"train", "natural", "shapes", "letters", "imagery"}
    with h5py.File(paths["train"], "r") as f:
        keys = [k.decode() for k in f["metadata/key"][...]]
        assert f["dataset"].dtype == np.float64 and "stimulus_name" in f["vmap"]
    for k in ("VoxelData", "ROI_V1", "ROI_V2", "ROI_V3", "ROI_hV4", "ROI_LOC", "ROI_FFA", "ROI_PPA", "ROI_VC",
              "voxel_x", "voxel_y", "voxel_z", "Run", "Block", "stimulus_name"):
        assert k in keys
    train = read_fmri(paths["train"])
    assert len(train.labels) == 200 * 5 and len(set(train.labels)) == 200
    shapes = read_fmri(paths["shapes"])
    assert len(shapes.labels) == 40 * 20
    assert len(read_fmri(paths["letters"]).labels) == 10 * 12
    assert len(read_fmri(paths["natural"]).labels) == 6 * 24
    for lab in set(shapes.labels):
        assert (out / "images" / f"{lab}.png").exists()
    assert sum(read_fmri(paths["train"], k).X.shape[1] for k in roi_keys(paths["train"]) if k != "ROI_VC") \
        == train.X.shape[1]


def test_noise_is_realistic(small_subject):
    """Single-presentation test-retest r: median 0.1-0.3 overall, higher in early than in high areas."""
    _, paths = small_subject
    med = {}
    for roi in ("ROI_V1", "ROI_V2", "ROI_LOC", "ROI_FFA", "ROI_PPA", "ROI_VC"):
        f = read_fmri(paths["shapes"], roi)
        med[roi] = np.nanmedian(retest_reliability(f.X, f.labels))
    assert 0.1 <= med["ROI_VC"] <= 0.3, med
    assert min(med["ROI_V1"], med["ROI_V2"]) > max(med["ROI_FFA"], med["ROI_PPA"]), med
    # fresh noise on every presentation: two presentations of one image differ
    f = read_fmri(paths["shapes"])
    first = [i for i, lab in enumerate(f.labels) if lab == f.labels[0]]
    assert not np.allclose(f.X[first[0]], f.X[first[1]])


def test_seeded_and_reproducible(tmp_path, small_subject):
    cfg = small_subject_config(seed=1, n_train=20, n_test_natural=2)
    a = simulate_subject(tmp_path / "a", cfg, load_network(), progress=lambda m: None)
    b = simulate_subject(tmp_path / "b", cfg, load_network(), progress=lambda m: None)
    np.testing.assert_array_equal(read_fmri(a["letters"]).X, read_fmri(b["letters"]).X)
    c = simulate_subject(tmp_path / "c", small_subject_config(seed=2, n_train=20, n_test_natural=2),
                         load_network(), progress=lambda m: None)
    assert not np.allclose(read_fmri(a["letters"]).X, read_fmri(c["letters"]).X)
