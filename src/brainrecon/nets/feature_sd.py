"""The lab's per-channel SD of VGG19 features.

``estimated_cnn_feat_std_VGG_ILSVRC_19_layers_ImgSize_224x224_chwise_dof1.mat`` (from
``brainrecon download vgg19-caffe``) holds the SD (ddof 1) of each channel of each VGG19 layer,
estimated on ImageNet images; reconstruction code scales decoded features so that their mean
channel SD matches the layer's. Layout as the lab's scripts read it with ``scipy.io.loadmat``: one
variable per layer named ``conv1_1`` ... ``conv5_4``, ``fc6``, ``fc7``, ``fc8``, each a MATLAB row
vector ``(1, channels)`` (a fully connected unit counts as a channel).
Uncertain: the shapes were inferred from how the lab's code uses the values (their mean per layer,
or per unit for fully connected layers), so any shape holding ``channels`` values, or a single
value for the whole layer, is accepted.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .vgg import VGG_BLOCKS, conv_layer_names

VGG19_CHANNELS: dict[str, int] = {
    **{name: c for name, c in zip(conv_layer_names("vgg19"),
                                  [c for c, n in VGG_BLOCKS["vgg19"] for _ in range(n)])},
    "fc6": 4096, "fc7": 4096, "fc8": 1000,
}
FEATURE_SD_FILE = "estimated_cnn_feat_std_VGG_ILSVRC_19_layers_ImgSize_224x224_chwise_dof1.mat"


def _read_mat(path: Path) -> dict[str, np.ndarray]:
    import scipy.io

    try:
        data = scipy.io.loadmat(path)
    except NotImplementedError:          # MATLAB v7.3 files are HDF5
        import h5py
        with h5py.File(path, "r") as f:
            return {k: np.asarray(v[()]).T for k, v in f.items() if hasattr(v, "shape")}
    except Exception as err:  # scipy raises several types (MatReadError, ValueError, IndexError...)
        raise ValueError(f"{path} is not a readable MATLAB .mat file ({err}); the file may be truncated: "
                         "download it again with: brainrecon download vgg19-caffe") from err
    return {k: v for k, v in data.items() if not k.startswith("__")}


def load_feature_sd(path, layers=None, channels: dict[str, int] | None = None) -> dict[str, np.ndarray]:
    """``{layer: (channels,) float32}`` per-channel feature SDs from the lab's ``.mat`` file.

    ``layers``: names to read (default all of ``channels``); ``channels``: expected channel count
    per layer (default VGG19's). A layer stored as a single value is repeated over its channels.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such feature-SD file; get it with: brainrecon download vgg19-caffe")
    channels = dict(VGG19_CHANNELS if channels is None else channels)
    layers = list(channels if layers is None else layers)
    data = _read_mat(path)
    missing = [k for k in layers if k not in data]
    if missing:
        raise ValueError(f"{path}: no variable for layer(s) {', '.join(missing)}; it holds {', '.join(sorted(data))}. "
                         f"Pass the VGG19 file {FEATURE_SD_FILE}")
    out = {}
    for layer in layers:
        try:
            v = np.asarray(data[layer], dtype=np.float32).ravel()
        except (TypeError, ValueError) as err:
            raise ValueError(f"{path}: variable {layer!r} is not numeric ({err})") from err
        n = channels.get(layer)
        if n is not None and v.size == 1:
            v = np.full(n, v[0], dtype=np.float32)
        if n is not None and v.size != n:
            raise ValueError(f"{path}: {layer} holds {v.size} values (shape {np.shape(data[layer])}), expected one "
                             f"per channel ({n}); this file is for another network")
        if not np.all(np.isfinite(v)) or np.any(v < 0):
            raise ValueError(f"{path}: {layer} holds negative or non-finite SDs; the file is damaged: "
                             "download it again with: brainrecon download vgg19-caffe --force")
        out[layer] = v
    return out
