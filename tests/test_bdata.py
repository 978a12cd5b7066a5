"""BData HDF5 reader/writer: raw layout, ROI selection, labels, errors, bdpy compatibility."""
import h5py
import numpy as np
import pytest

from brainrecon.data.bdata import (BData, BDataError, FmriData, name_to_stimulus_id, read_bdata,
                                   read_fmri, stimulus_id_to_name, write_bdata)

N_SAMPLES, N_VOX = 6, 10
NAMES = {1.0: "n01518878_5958", 2.0: "shape_red_square", 3.0: "n02139199_10398"}
STIM = np.array([1, 2, 3, 1, 2, 3], dtype=float)
RUNS = np.array([1, 1, 1, 2, 2, 2], dtype=float)
V1 = np.array([1, 1, 1, 1, 0, 0, 0, 0, 0, 0], dtype=bool)
V2 = np.array([0, 0, 0, 0, 1, 1, 1, 0, 0, 0], dtype=bool)


def make_bdata() -> BData:
    rng = np.random.default_rng(0)
    b = BData()
    b.add(rng.normal(size=(N_SAMPLES, N_VOX)), "VoxelData")
    b.add(RUNS, "Run")
    b.add(STIM, "stimulus_name")
    b.add_vmap("stimulus_name", NAMES)
    b.add_metadata("ROI_V1", np.where(V1, 1.0, np.nan), "V1", where="VoxelData")
    b.add_metadata("ROI_V2", np.where(V2, 1.0, np.nan), "V2", where="VoxelData")
    b.add_metadata("ROI_VC", np.ones(N_VOX), "VC", where="VoxelData")
    for i, axis in enumerate("xyz"):
        b.add_metadata(f"voxel_{axis}", np.arange(N_VOX) * 3.0 + i, f"{axis} (mm)", where="VoxelData")
    return b


@pytest.fixture
def new_file(tmp_path):
    b = make_bdata()
    path = tmp_path / "sub01.h5"
    write_bdata(path, b)
    return path, b


def test_bdata_in_memory():
    b = make_bdata()
    assert b.dataset.shape == (N_SAMPLES, N_VOX + 2)
    assert b.columns("VoxelData").sum() == N_VOX and b.columns("Run").tolist() == [0] * N_VOX + [1, 0]
    np.testing.assert_array_equal(b.select("Run")[:, 0], RUNS)
    assert np.isnan(b.metadata["ROI_V1"][1][N_VOX:]).all()
    assert b.metadata["VoxelData"][0] == "1 = VoxelData"
    assert b.vmap["stimulus_name"] == NAMES
    with pytest.raises(BDataError):
        b.add(np.zeros(3), "bad")
    with pytest.raises(BDataError):
        b.add_vmap("Run", {1.0: "a"})  # no label for run 2


def test_raw_layout(new_file):
    path, b = new_file
    with h5py.File(path, "r") as f:
        assert f["dataset"].shape == (N_SAMPLES, N_VOX + 2) and f["dataset"].dtype == np.float64
        keys = [k.decode() for k in f["metadata/key"][()]]
        assert keys == ["VoxelData", "Run", "stimulus_name", "ROI_V1", "ROI_V2", "ROI_VC",
                        "voxel_x", "voxel_y", "voxel_z"]
        assert f["metadata/value"].shape == (9, N_VOX + 2)
        assert f["metadata/description"][3] == b"V1"
        assert sorted(f["vmap/stimulus_name"]) == ["1.0", "2.0", "3.0"]
        assert f["vmap/stimulus_name/1.0"][()] == b"n01518878_5958"
        np.testing.assert_array_equal(f["dataset"][()], b.dataset)


def test_read_bdata_roundtrip(new_file):
    path, b = new_file
    r = read_bdata(path)
    np.testing.assert_array_equal(r.dataset, b.dataset)
    assert list(r.metadata) == list(b.metadata)
    for k, (d, v) in b.metadata.items():
        assert r.metadata[k][0] == d
        np.testing.assert_array_equal(r.metadata[k][1], v)
    assert r.vmap == b.vmap


def test_read_fmri(new_file):
    path, b = new_file
    d = read_fmri(path)
    assert isinstance(d, FmriData) and d.roi == "ROI_VC" and d.path == path
    assert d.X.dtype == np.float32 and d.X.shape == (N_SAMPLES, N_VOX)
    np.testing.assert_array_equal(d.X, b.dataset[:, :N_VOX].astype(np.float32))
    assert d.labels == [NAMES[s] for s in STIM]
    np.testing.assert_array_equal(d.runs, [1, 1, 1, 2, 2, 2])
    np.testing.assert_array_equal(d.voxel_xyz[:, 0], np.arange(N_VOX) * 3.0)
    np.testing.assert_array_equal(d.voxel_xyz[:, 2], np.arange(N_VOX) * 3.0 + 2)
    v1 = read_fmri(path, "V1")
    assert v1.roi == "ROI_V1"
    np.testing.assert_array_equal(v1.X, b.dataset[:, :N_VOX][:, V1].astype(np.float32))
    np.testing.assert_array_equal(v1.voxel_xyz[:, 1], np.flatnonzero(V1) * 3.0 + 1)
    u = read_fmri(path, "ROI_V2+V1")
    assert u.roi == "ROI_V2+ROI_V1" and u.X.shape == (N_SAMPLES, 7)
    np.testing.assert_array_equal(u.X, b.dataset[:, :7].astype(np.float32))  # column order


def test_read_columns_in_row_blocks(tmp_path, monkeypatch):
    import brainrecon.data.bdata as mod
    monkeypatch.setattr(mod, "_ROW_BLOCK_BYTES", 8 * 16)  # force many blocks
    b = make_bdata()
    write_bdata(tmp_path / "a.h5", b)
    d = read_fmri(tmp_path / "a.h5", "ROI_V1+ROI_V2")
    np.testing.assert_array_equal(d.X, b.dataset[:, :7].astype(np.float32))
    v = np.where(np.arange(N_VOX) % 3 == 0, 1.0, np.nan)  # non-contiguous ROI
    b.add_metadata("ROI_odd", v, where="VoxelData")
    write_bdata(tmp_path / "b.h5", b)
    d = read_fmri(tmp_path / "b.h5", "odd")
    np.testing.assert_array_equal(d.X, b.dataset[:, [0, 3, 6, 9]].astype(np.float32))


IDS = {1518878.005958: "n01518878_5958", 2139199.010398: "n02139199_10398",
       3041632.000001: "n03041632_1", 4254680.999999: "n04254680_999999", 1443537.0: "n01443537_0"}


def test_stimulus_id_names():
    for x, name in IDS.items():
        assert stimulus_id_to_name(x) == name
        assert name_to_stimulus_id(name) == x
        assert stimulus_id_to_name(name_to_stimulus_id(name)) == name
    for bad in ("shape_red_square", "n123_4", "n01518878_1234567"):
        with pytest.raises(BDataError):
            name_to_stimulus_id(bad)


def _write_old(path, dataset, keys, values):
    with h5py.File(path, "w") as f:
        f.create_dataset("dataSet", data=dataset)
        f.create_dataset("metaData/key", data=[k.encode() for k in keys], dtype=h5py.string_dtype())
        f.create_dataset("metaData/description", data=[b""] * len(keys), dtype=h5py.string_dtype())
        f.create_dataset("metaData/value", data=np.asarray(values, dtype=float))


def test_old_layout_label_block(tmp_path):
    ids = np.array(list(IDS))
    x = np.arange(5 * 3, dtype=float).reshape(5, 3)
    data = np.column_stack([x, np.ones(5), ids, np.arange(5.0)])  # Label block: type, id, other
    n = np.nan
    values = [[1, 1, 1, n, n, n], [1, n, 1, n, n, n], [n, n, n, 1, 1, 1]]
    _write_old(tmp_path / "old.h5", data, ["VoxelData", "ROI_VC", "Label"], values)
    d = read_fmri(tmp_path / "old.h5", "VC")
    assert d.labels == list(IDS.values())
    np.testing.assert_array_equal(d.X, x[:, [0, 2]].astype(np.float32))
    np.testing.assert_array_equal(d.runs, np.zeros(5))
    assert np.isnan(d.voxel_xyz).all() and d.voxel_xyz.shape == (2, 3)
    r = read_bdata(tmp_path / "old.h5")
    np.testing.assert_array_equal(r.dataset, data)
    assert list(r.metadata) == ["VoxelData", "ROI_VC", "Label"]


def test_old_layout_stimulus_id_column(tmp_path):
    ids = np.array(list(IDS))
    data = np.column_stack([np.ones((5, 2)), ids, [1, 1, 2, 2, 3]])
    n = np.nan
    values = [[1, 1, n, n], [1, n, n, n], [n, n, 1, n], [n, n, n, 1]]
    _write_old(tmp_path / "old.h5", data, ["VoxelData", "ROI_V1", "stimulus_id", "Run"], values)
    d = read_fmri(tmp_path / "old.h5", "ROI_V1")
    assert d.labels == list(IDS.values()) and d.X.shape == (5, 1)
    np.testing.assert_array_equal(d.runs, [1, 1, 2, 2, 3])


def test_average_by_label():
    X = np.array([[1, 2], [10, 20], [3, 4], [5, 9], [30, 40]], dtype=np.float32)
    d = FmriData(X, ["b", "a", "b", "b", "a"], np.zeros(5, int), np.full((2, 3), np.nan), "ROI_VC",
                 None)
    avg, labels = d.average_by_label()
    assert labels == ["b", "a"]
    np.testing.assert_allclose(avg, [[3, 5], [20, 30]])


def test_errors(tmp_path, new_file):
    path, b = new_file
    missing = tmp_path / "nope.h5"
    with pytest.raises(BDataError, match="no such file.*check the path") as e:
        read_fmri(missing)
    assert str(missing) in str(e.value)
    text = tmp_path / "text.h5"
    text.write_text("hello")
    with pytest.raises(BDataError, match="not an HDF5 file") as e:
        read_bdata(text)
    assert str(text) in str(e.value)
    other = tmp_path / "other.h5"
    with h5py.File(other, "w") as f:
        f["x"] = np.zeros(3)
    with pytest.raises(BDataError, match="not a BData file") as e:
        read_fmri(other)
    assert str(other) in str(e.value)
    with pytest.raises(BDataError, match="unknown ROI 'FFA'.*ROI_V1.*ROI_V2.*ROI_VC") as e:
        read_fmri(path, "FFA")
    assert str(path) in str(e.value)

    nolab = BData()
    nolab.add(np.ones((3, 4)), "VoxelData")
    nolab.add(np.ones(3), "Run")
    nolab.add_metadata("ROI_VC", np.ones(4), where="VoxelData")
    nolab.add_metadata("ROI_empty", np.full(4, np.nan), where="VoxelData")
    write_bdata(tmp_path / "nolab.h5", nolab)
    with pytest.raises(BDataError, match="no stimulus labels.*VoxelData.*Run") as e:
        read_fmri(tmp_path / "nolab.h5")
    assert str(tmp_path / "nolab.h5") in str(e.value)
    with pytest.raises(BDataError, match="ROI_empty has no voxel columns") as e:
        read_fmri(tmp_path / "nolab.h5", "empty")
    assert str(tmp_path / "nolab.h5") in str(e.value)

    b.dataset[1, 2] = np.nan
    b.dataset[4, 2] = np.inf
    b.dataset[0, 8] = np.nan
    bad = tmp_path / "nan.h5"
    write_bdata(bad, b)
    with pytest.raises(BDataError, match="3 of 6 samples and 2 of 10 voxels; remove those voxels") as e:
        read_fmri(bad)
    assert str(bad) in str(e.value)
    np.testing.assert_array_equal(read_fmri(bad, "V2").X.shape, (6, 3))  # ROI without the NaNs


# ---- bdpy compatibility (runs only where bdpy is installed) -----------------------------------

def test_bdpy_writes_we_read(tmp_path):
    bdpy = pytest.importorskip("bdpy")
    ref = make_bdata()
    b = bdpy.BData()
    b.add(ref.select("VoxelData"), "VoxelData")
    b.add(RUNS, "Run")
    b.add(STIM, "stimulus_name")
    b.add_vmap("stimulus_name", dict(NAMES))
    for k in ("ROI_V1", "ROI_V2", "ROI_VC", "voxel_x", "voxel_y", "voxel_z"):
        desc, v = ref.metadata[k]
        b.add_metadata(k, v[:N_VOX], desc, where="VoxelData")
    path = tmp_path / "bdpy.h5"
    b.save(str(path))
    d = read_fmri(path, "ROI_V1+ROI_V2")
    np.testing.assert_array_equal(d.X, ref.dataset[:, :7].astype(np.float32))
    assert d.labels == [NAMES[s] for s in STIM]
    np.testing.assert_array_equal(d.runs, [1, 1, 1, 2, 2, 2])
    np.testing.assert_array_equal(d.voxel_xyz, np.stack([ref.metadata[f"voxel_{a}"][1][:7]
                                                         for a in "xyz"], 1))
    r = read_bdata(path)
    np.testing.assert_array_equal(r.dataset, ref.dataset)
    for k, (desc, v) in ref.metadata.items():
        assert r.metadata[k][0] == desc
        np.testing.assert_array_equal(r.metadata[k][1], v)
    assert r.vmap == {"stimulus_name": NAMES}


def test_we_write_bdpy_reads(tmp_path):
    bdpy = pytest.importorskip("bdpy")
    ref = make_bdata()
    path = tmp_path / "ours.h5"
    write_bdata(path, ref)
    b = bdpy.BData(str(path))
    np.testing.assert_array_equal(b.dataset, ref.dataset)
    assert list(b.metadata.key) == list(ref.metadata)
    assert list(b.metadata.description) == [d for d, _ in ref.metadata.values()]
    np.testing.assert_array_equal(b.metadata.value, np.vstack([v for _, v in ref.metadata.values()]))
    assert b.get_vmap("stimulus_name") == NAMES
    assert b.get_labels("stimulus_name") == [NAMES[s] for s in STIM]
    np.testing.assert_array_equal(b.select("ROI_V1"), ref.dataset[:, :4])
    np.testing.assert_array_equal(b.get_metadata("voxel_x", where="VoxelData"),
                                  np.arange(N_VOX) * 3.0)
