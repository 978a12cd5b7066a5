import h5py
import numpy as np
import pytest
import torch

from brainrecon.nets import load_network
from brainrecon.nets.vgg import VGGEncoder, hed_weights_path, load_hed_vgg16


def test_hed_weights_convert_from_keras_layout(network):
    """conv1_1 of the torch module equals the Keras kernel applied by hand (BGR, mean subtracted)."""
    with h5py.File(hed_weights_path(), "r") as f:
        kernel = f["block1/layers/conv2d/vars/0"][...]      # (kh, kw, in, out)
        bias = f["block1/layers/conv2d/vars/1"][...]
    rng = np.random.default_rng(0)
    img = rng.random((1, 3, 8, 8)).astype(np.float32)
    out = network(torch.from_numpy(img), ["conv1_1"])["conv1_1"].numpy()
    x = img[0, ::-1] * 255 - np.array([103.939, 116.779, 123.68])[:, None, None]   # RGB -> BGR, 0-255, mean
    x = np.pad(x, ((0, 0), (1, 1), (1, 1)))
    y, xx, o = 4, 5, 7
    manual = sum(kernel[i, j, c, o] * x[c, y + i, xx + j] for i in range(3) for j in range(3) for c in range(3)) + bias[o]
    assert np.isclose(out[0, o, y, xx], manual, rtol=1e-4, atol=1e-3)


def test_layers_by_name_and_shapes(network):
    assert network.layer_names[0] == "conv1_1" and network.layer_names[-1] == "conv5_3" and len(network.layer_names) == 13
    x = torch.rand(2, 3, 48, 48)
    feats = network(x, ["conv1_1", "conv3_2", "conv5_3"])
    shapes = network.unit_shapes(48)
    for k, v in feats.items():
        assert tuple(v.shape[1:]) == shapes[k]
    assert shapes["conv5_3"] == (512, 3, 3)
    pre = network(x, ["conv2_1"])["conv2_1"]
    post = network(x, ["conv2_1"], relu=True)["conv2_1"]
    assert (pre < 0).any() and torch.equal(post, pre.clamp(min=0))


def test_unknown_layer_and_bad_weights(tmp_path):
    net = VGGEncoder("vgg16")
    with pytest.raises(KeyError, match="fc9"):
        net(torch.rand(1, 3, 16, 16), ["fc9"])
    bad = tmp_path / "bad.h5"
    with h5py.File(bad, "w") as f:
        f["x"] = np.zeros(3)
    with pytest.raises(ValueError, match="bad.h5"):
        load_hed_vgg16(bad)
    with pytest.raises(ValueError, match="unknown network"):
        load_network("alexnet")
