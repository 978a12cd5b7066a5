"""Read and write BData HDF5 files (the format of KamitaniLab's bdpy), without depending on bdpy.

Layout: ``/dataset`` float64 (n_samples, n_columns); ``/metadata/key`` and ``/metadata/description``
variable-length byte strings (n_keys,); ``/metadata/value`` float64 (n_keys, n_columns) with 1/NaN
flags or per-column numbers; ``/vmap/<key>/<float value>`` scalar byte-string labels. Older files
name the groups ``dataSet``/``metaData``.
"""
from __future__ import annotations

import re
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np

_STR = h5py.string_dtype(encoding="ascii")  # what bdpy writes: vlen bytes (UTF-8 content)
_ROW_BLOCK_BYTES = 1 << 26                  # read /dataset in row blocks of at most ~64 MiB


class BDataError(ValueError):
    """User-facing error: message names the file, what is wrong, and the fix."""


def _text(x) -> str:
    return x.decode("utf-8") if isinstance(x, bytes) else str(x)


@dataclass
class BData:
    """In-memory BData: ``dataset`` (n_samples, n_columns) float64, ``metadata`` key ->
    (description, values (n_columns,) float64 with NaN = not set), ``vmap`` key -> {value: label}."""
    dataset: np.ndarray = field(default_factory=lambda: np.zeros((0, 0)))
    metadata: dict[str, tuple[str, np.ndarray]] = field(default_factory=dict)
    vmap: dict[str, dict[float, str]] = field(default_factory=dict)

    @property
    def n_columns(self) -> int:
        return self.dataset.shape[1]

    def add(self, values: np.ndarray, key: str, description: str = "") -> None:
        """Append columns ``values`` (n_samples, k) or (n_samples,) flagged 1 in metadata row ``key``."""
        x = np.asarray(values, dtype=np.float64)
        x = x[:, None] if x.ndim == 1 else x
        if x.ndim != 2:
            raise BDataError(f"BData.add({key!r}): values must be 1-D or 2-D, got shape {x.shape}")
        n_old = self.n_columns
        if n_old == 0 and self.dataset.shape[0] == 0:
            self.dataset = x.copy()
        elif x.shape[0] != self.dataset.shape[0]:
            raise BDataError(f"BData.add({key!r}): {x.shape[0]} rows but the dataset has "
                             f"{self.dataset.shape[0]} samples; pass one row per sample")
        else:
            self.dataset = np.hstack([self.dataset, x])
        pad = np.full(x.shape[1], np.nan)
        for k, (d, v) in self.metadata.items():
            self.metadata[k] = (d, np.concatenate([v, pad]))
        old = self.metadata.get(key, ("", np.full(n_old, np.nan)))[1][:n_old]
        self.metadata[key] = (description or f"1 = {key}",
                              np.concatenate([old, np.ones(x.shape[1])]))

    def add_metadata(self, key: str, values: np.ndarray, description: str = "",
                     where: str | None = None) -> None:
        """Set metadata row ``key``: values (n_columns,), or values for the columns of block
        ``where`` only (length = that block's width; NaN on the other columns)."""
        v = np.asarray(values, dtype=np.float64).ravel()
        if where is not None:
            mask = self.columns(where)
            if v.size != mask.sum():
                raise BDataError(f"BData.add_metadata({key!r}): {v.size} values for the "
                                 f"{mask.sum()} columns of {where!r}; give one value per column")
            row = np.full(self.n_columns, np.nan)
            row[mask] = v
            v = row
        elif v.size != self.n_columns:
            raise BDataError(f"BData.add_metadata({key!r}): {v.size} values for {self.n_columns} "
                             "columns; give one value per column or use where=")
        self.metadata[key] = (description, v)

    def add_vmap(self, key: str, mapping: dict[float, str]) -> None:
        """Labels for the numeric values of per-sample key ``key``; keeps the values present."""
        new = {float(k): str(v) for k, v in mapping.items()}
        old = self.vmap.get(key, {})
        clash = [k for k in new if k in old and old[k] != new[k]]
        if clash:
            raise BDataError(f"BData.add_vmap({key!r}): labels for {clash[:5]} differ from the "
                             "existing vmap; use consistent labels")
        new.update(old)
        used = np.unique(self.select(key))
        used = [float(u) for u in used if not np.isnan(u)]
        missing = [u for u in used if u not in new]
        if missing:
            raise BDataError(f"BData.add_vmap({key!r}): no label for values {missing[:5]}; "
                             "give a label for every value in the data")
        self.vmap[key] = {u: new[u] for u in used}

    def columns(self, key: str) -> np.ndarray:
        """Bool mask (n_columns,) of the columns where metadata[key] == 1."""
        if key not in self.metadata:
            raise BDataError(f"metadata key {key!r} not found; available: {sorted(self.metadata)}")
        return self.metadata[key][1] == 1

    def select(self, key: str) -> np.ndarray:
        """dataset[:, columns(key)] -> (n_samples, k)."""
        return self.dataset[:, self.columns(key)]


def write_bdata(path, bdata: BData) -> None:
    """Write ``bdata`` as a bdpy-compatible HDF5 file (readable by ``bdpy.BData(path)``)."""
    keys = list(bdata.metadata)
    values = (np.vstack([bdata.metadata[k][1] for k in keys]) if keys
              else np.zeros((0, bdata.n_columns)))
    with h5py.File(path, "w") as f:
        f.create_dataset("dataset", data=np.asarray(bdata.dataset, dtype=np.float64))
        f.create_dataset("metadata/key", data=[k.encode() for k in keys], dtype=_STR)
        f.create_dataset("metadata/description",
                         data=[bdata.metadata[k][0].encode() for k in keys], dtype=_STR)
        f.create_dataset("metadata/value", data=values.astype(np.float64))
        g = f.create_group("vmap")
        for key, mapping in bdata.vmap.items():
            sub = g.create_group(key)
            for val, label in mapping.items():
                sub.create_dataset(str(float(val)), data=label.encode(), dtype=_STR)


def _open(path) -> tuple[Path, h5py.File]:
    path = Path(path)
    if not path.exists():
        raise BDataError(f"{path}: no such file; check the path (and that the data were downloaded)")
    if not path.is_file() or not h5py.is_hdf5(path):
        raise BDataError(f"{path}: not an HDF5 file; BData files are HDF5 written by bdpy (.h5), "
                         "convert .mat files with bdpy or pass the .h5 file")
    with _reading(path):
        return path, h5py.File(path, "r")


@contextmanager
def _reading(path: Path):
    """Turn HDF5 read errors (a truncated or damaged file) into one BDataError naming the file."""
    try:
        yield
    except OSError as err:
        raise BDataError(f"{path}: the HDF5 file is damaged or incomplete ({' '.join(str(err).split())}); "
                         "it was probably cut short while copying or downloading: copy or download it again "
                         "(brainrecon download NAME --force for a published file)") from None


def _parts(path: Path, f: h5py.File):
    """(dataset h5py.Dataset, keys, descriptions, values (n_keys, n_columns), vmap)."""
    ds = f.get("dataset", f.get("dataSet"))
    md = f.get("metadata", f.get("metaData"))
    if not isinstance(ds, h5py.Dataset) or not isinstance(md, h5py.Group) \
            or not {"key", "value"} <= set(md):
        raise BDataError(f"{path}: not a BData file (needs /dataset and /metadata/key, "
                         f"/metadata/value; found {sorted(f)}); pass a file written by bdpy")
    keys = [_text(k).strip() for k in np.ravel(md["key"][()])]
    desc = ([_text(d) for d in np.ravel(md["description"][()])]
            if "description" in md else [""] * len(keys))
    vals = np.atleast_2d(np.asarray(md["value"][()], dtype=np.float64))
    n_cols = ds.shape[1] if ds.ndim == 2 else 0
    if vals.shape != (len(keys), n_cols) and vals.T.shape == (len(keys), n_cols):
        vals = vals.T  # written column-major (e.g. by MATLAB)
    if ds.ndim != 2 or vals.shape != (len(keys), n_cols):
        raise BDataError(f"{path}: inconsistent BData: dataset {ds.shape}, {len(keys)} metadata "
                         f"keys, metadata values {vals.shape}; rewrite the file with bdpy")
    vmap = {k: {float(v): _text(d[()]) for v, d in g.items()}
            for k, g in f.get("vmap", {}).items()}
    return ds, keys, desc, vals, vmap


def read_bdata(path) -> BData:
    """Read a whole BData file (``dataset``/``metadata`` or ``dataSet``/``metaData`` names)."""
    path, f = _open(path)
    with f, _reading(path):
        ds, keys, desc, vals, vmap = _parts(path, f)
        return BData(np.asarray(ds[()], dtype=np.float64),
                     {k: (d, v.copy()) for k, d, v in zip(keys, desc, vals)}, vmap)


def _read_columns(ds: h5py.Dataset, idx: np.ndarray) -> np.ndarray:
    """ds[:, idx] as float32 for sorted column indices, in row blocks of the bounding column range."""
    lo, hi = int(idx[0]), int(idx[-1]) + 1
    n = ds.shape[0]
    out = np.empty((n, idx.size), dtype=np.float32)
    rows = max(1, _ROW_BLOCK_BYTES // (8 * (hi - lo)))
    if ds.chunks:
        rows = max(ds.chunks[0], rows // ds.chunks[0] * ds.chunks[0])
    rel, contiguous = idx - lo, hi - lo == idx.size
    for r in range(0, n, rows):
        block = ds[r:r + rows, lo:hi]
        out[r:r + rows] = block if contiguous else block[:, rel]
    return out


def stimulus_id_to_name(x: float) -> str:
    """ImageNet float id -> name: 1518878.005958 -> "n01518878_5958" (fraction * 1e6 = image id)."""
    if not np.isfinite(x) or x < 0:
        raise BDataError(f"stimulus id {x!r} is not a non-negative number; cannot make an image name")
    wnid = int(np.floor(x))
    return f"n{wnid:08d}_{int(round((x - wnid) * 1e6))}"


def name_to_stimulus_id(name: str) -> float:
    """ImageNet name -> float id: "n01518878_5958" -> 1518878.005958."""
    m = re.fullmatch(r"n(\d{8})_(\d{1,6})", name)
    if not m:
        raise BDataError(f"stimulus name {name!r} is not ImageNet-style 'nXXXXXXXX_N' (N < 1e6); "
                         "use a vmap for other labels")
    return float(f"{int(m.group(1))}.{int(m.group(2)):06d}")


@dataclass
class FmriData:
    """Voxel responses of one ROI: ``X`` (n_samples, n_voxels) float32, ``labels`` (n_samples,),
    ``runs`` (n_samples,) int, ``voxel_xyz`` (n_voxels, 3) float (NaN if absent); ``label_map`` and
    ``exclude``: how the file's labels were read (:func:`read_fmri`)."""
    X: np.ndarray
    labels: list[str]
    runs: np.ndarray
    voxel_xyz: np.ndarray
    roi: str
    path: Path
    label_map: object = None
    exclude: tuple[str, ...] = ()

    def read_roi(self, roi: str) -> "FmriData":
        """Another ROI of the same file, its labels read the same way (label map, excluded labels)."""
        return read_fmri(self.path, roi, label_map=self.label_map, exclude=self.exclude)

    def average_by_label(self) -> tuple[np.ndarray, list[str]]:
        """Trials averaged per label -> ((n_labels, n_voxels), labels in order of first appearance)."""
        order = list(dict.fromkeys(self.labels))
        pos = {lab: i for i, lab in enumerate(order)}
        inv = np.array([pos[lab] for lab in self.labels], dtype=np.intp)
        sums = np.zeros((len(order), self.X.shape[1]), dtype=np.float64)
        np.add.at(sums, inv, self.X)
        return (sums / np.bincount(inv, minlength=len(order))[:, None]).astype(self.X.dtype), order


def _labels(path, ds, keys, vals, vmap) -> list[str]:
    def column(key, pos=0):
        cols = np.flatnonzero(vals[keys.index(key)] == 1)
        return None if cols.size <= pos else ds[:, int(cols[pos])]

    for key, pos in (("stimulus_name", 0), ("stimulus_id", 0), ("Label", 1)):
        v = column(key, pos) if key in keys else None
        if v is None:
            continue
        m = vmap.get(key, {})
        missing = sorted({float(x) for x in v[np.isfinite(v)]} - set(m))
        if m and not missing:
            return [m[float(x)] if np.isfinite(x) else "n/a" for x in v]
        if m and key == "stimulus_name":
            raise BDataError(f"{path}: values {missing[:5]} of {key!r} have no label in "
                             f"/vmap/{key}; add them to the vmap (bdpy add_vmap)")
        if key != "stimulus_name":
            return [stimulus_id_to_name(float(x)) if np.isfinite(x) else "n/a" for x in v]
    numbered = [name for name, _ in _label_columns(ds, keys, vals, vmap)]
    if numbered:
        raise BDataError(f"{path}: the samples are labelled by number only ({', '.join(dict.fromkeys(numbered))}); "
                         "give the image of each number with a label map: --labels NAME=TSV (two columns: label, image "
                         "stem; the DIR imagery experiment's map is builtin: --labels NAME=dir-imagery)")
    raise BDataError(f"{path}: no stimulus labels found (looked for 'stimulus_name' with a vmap, "
                     f"'stimulus_id', 'Label'); keys present: {keys}; add a stimulus_name column")


LABEL_KEYS = ("stimulus_name", "imagery_image_index", "category_index", "Label", "stimulus_id")  # per-sample label columns


def _label_columns(ds, keys, vals, vmap) -> list[tuple[str, list]]:
    """Every per-sample column that may hold the labels, in the order tried: (key, values), values being
    the vmap's names where the vmap names every value, else the numbers (NaN: None)."""
    out = []
    for key in LABEL_KEYS:
        if key not in keys:
            continue
        m = vmap.get(key, {})
        for col in np.flatnonzero(vals[keys.index(key)] == 1):
            v = ds[:, int(col)]
            finite = v[np.isfinite(v)]
            if m and {float(x) for x in finite} <= set(m):
                out.append((key, [m[float(x)] if np.isfinite(x) else None for x in v]))
            else:
                out.append((key, [float(x) if np.isfinite(x) else None for x in v]))
    return out


def _mapped_labels(path, ds, keys, vals, vmap, label_map) -> tuple[list[str], list]:
    """(image stem, raw label) of every sample, through ``label_map``: the first label column whose every
    label the map holds. Raises :class:`BDataError` naming the file and the map otherwise."""
    from .labelmaps import format_label, label_key

    columns = _label_columns(ds, keys, vals, vmap)
    if not columns:
        raise BDataError(f"{path}: no label column to look up in the label map {label_map.source} (looked for "
                         f"{', '.join(LABEL_KEYS)}; keys present: {keys})")
    for key, values in columns:
        present = [v for v in values if v is not None]
        stems = label_map.stems(present, str(path))
        if stems is not None:
            return [stems[label_key(v)] if v is not None else "n/a" for v in values], values
    key, values = min(columns, key=lambda c: len(label_map.missing([v for v in c[1] if v is not None])))
    missing = label_map.missing([v for v in values if v is not None])
    shown = ", ".join(format_label(k) for k in missing[:10]) + (f" and {len(missing) - 10} more" if len(missing) > 10 else "")
    raise BDataError(f"{path}: {len(missing)} label(s) of its {key!r} column are not in the label map "
                     f"{label_map.source}: {shown}; add a line 'label<TAB>image stem' for each to the map, or give "
                     "the map of this experiment")


def _roi_mask(path: Path, keys: list[str], vals: np.ndarray, roi: str) -> tuple[str, np.ndarray]:
    """(canonical name, column indices) of ``roi`` (a name, a name without ``ROI_``, or a union ``A+B``)."""
    rois = [k for k in keys if k.startswith("ROI_")]
    names, mask = [], np.zeros(vals.shape[1], dtype=bool)
    for part in (p.strip() for p in roi.split("+")):
        name = part if part in keys else f"ROI_{part}"
        if not part or name not in keys:
            raise BDataError(f"{path}: unknown ROI {part!r}; available ROIs: {rois}; "
                             "pass one of them (or a union like ROI_V1+ROI_V2)")
        names.append(name)
        mask |= vals[keys.index(name)] == 1
    if "VoxelData" in keys:
        mask &= vals[keys.index("VoxelData")] == 1
    idx = np.flatnonzero(mask)
    roi_name = "+".join(names)
    if idx.size == 0:
        raise BDataError(f"{path}: ROI {roi_name} has no voxel columns; choose another ROI from {rois}")
    return roi_name, idx


def check_rois(path, rois) -> None:
    """Raise :class:`BDataError` unless every ROI of ``rois`` exists in the file and has voxels
    (reads the metadata only)."""
    path, f = _open(path)
    with f, _reading(path):
        _, keys, _, vals, _ = _parts(path, f)
        for roi in rois:
            _roi_mask(path, keys, vals, roi)


def read_fmri(path, roi: str = "ROI_VC", label_map=None, exclude=()) -> FmriData:
    """Voxel responses of ``roi`` ("ROI_VC", "VC", or a union "ROI_V1+ROI_V2"), stimulus labels and
    runs, reading only the needed columns of /dataset.

    ``label_map`` (a :class:`~brainrecon.data.labelmaps.LabelMap`): the image stem of each label of a
    file that labels samples by number (every label of the file must be in it). ``exclude``: labels
    whose samples are left out (image stems or the file's own labels, e.g. ``fixation`` or ``16``).
    """
    path, f = _open(path)
    with f, _reading(path):
        ds, keys, _, vals, vmap = _parts(path, f)
        roi_name, idx = _roi_mask(path, keys, vals, roi)
        if ds.shape[0] == 0:
            raise BDataError(f"{path}: the file holds no samples (its dataset has 0 rows); pass a file with "
                             "the fMRI samples of at least one presentation")
        if label_map is not None:
            labels, raw = _mapped_labels(path, ds, keys, vals, vmap, label_map)
        else:
            labels = _labels(path, ds, keys, vals, vmap)
            raw = labels
        keep = _kept(path, labels, raw, exclude)
        X = _read_columns(ds, idx)
        bad = ~np.isfinite(X)
        if bad.any():
            raise BDataError(f"{path}: ROI {roi_name} has NaN/inf values in {bad.any(1).sum()} of "
                             f"{X.shape[0]} samples and {bad.any(0).sum()} of {X.shape[1]} voxels; "
                             "remove those voxels (drop columns with non-finite values) or use "
                             "another ROI")
        runs = np.zeros(X.shape[0], dtype=np.int64)
        if "Run" in keys and (vals[keys.index("Run")] == 1).any():
            runs = np.nan_to_num(ds[:, int(np.flatnonzero(vals[keys.index("Run")] == 1)[0])])
            runs = runs.astype(np.int64)
        xyz = np.stack([vals[keys.index(k)][idx] if k in keys else np.full(idx.size, np.nan)
                        for k in ("voxel_x", "voxel_y", "voxel_z")], axis=1)
    if not keep.all():
        X, runs, labels = X[keep], runs[keep], [lab for lab, k in zip(labels, keep) if k]
    return FmriData(X, labels, runs, xyz, roi_name, path, label_map, tuple(exclude))


def _kept(path: Path, labels: list[str], raw: list, exclude) -> np.ndarray:
    """(n_samples,) bool: samples whose label (image stem or the file's own label) is not excluded.
    Raises :class:`BDataError` if no sample is left."""
    keep = np.ones(len(labels), dtype=bool)
    if not exclude:
        return keep
    from .labelmaps import label_key

    dropped = {label_key(x) for x in exclude}
    keep = np.array([label_key(lab) not in dropped and (r is None or label_key(r) not in dropped)
                     for lab, r in zip(labels, raw)], dtype=bool)
    if not keep.any():
        raise BDataError(f"{path}: --exclude-label {', '.join(map(str, exclude))} leaves no sample; exclude only the "
                         "labels without images (such as fixation)")
    return keep


def roi_keys(path) -> list[str]:
    """Names of the ROI metadata keys (``ROI_*``) of a BData file, in file order."""
    path, f = _open(path)
    with f, _reading(path):
        _, keys, _, _, _ = _parts(path, f)
    return [k for k in keys if k.startswith("ROI_")]


def roi_columns(path, roi: str = "ROI_VC") -> dict[str, np.ndarray]:
    """For every ROI key of the file, the positions (ascending) of its voxels among the columns of
    ``roi`` as :func:`read_fmri` returns them (empty where the two do not overlap)."""
    path, f = _open(path)
    with f, _reading(path):
        _, keys, _, vals, _ = _parts(path, f)
        _, idx = _roi_mask(path, keys, vals, roi)
        out = {}
        for k in keys:
            if k.startswith("ROI_"):
                member = vals[keys.index(k)][idx] == 1
                out[k] = np.flatnonzero(member)
    return out
