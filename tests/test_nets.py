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


def _reference_vgg19():
    """An independent VGG19 in torchvision's module layout (random weights)."""
    from torch import nn
    layers, c = [], 3
    for v in [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512, 512, 512, 512, "M"]:
        if v == "M":
            layers.append(nn.MaxPool2d(2, 2))
        else:
            layers += [nn.Conv2d(c, v, 3, padding=1), nn.ReLU()]
            c = v
    model = nn.Module()
    model.features = nn.Sequential(*layers)
    model.avgpool = nn.AdaptiveAvgPool2d((7, 7))
    model.classifier = nn.Sequential(nn.Linear(25088, 4096), nn.ReLU(), nn.Dropout(), nn.Linear(4096, 4096),
                                     nn.ReLU(), nn.Dropout(), nn.Linear(4096, 1000))
    return model.eval()


def test_vgg19_state_dicts(tmp_path):
    torch.manual_seed(0)
    ref = _reference_vgg19()
    path = tmp_path / "vgg19.pth"
    torch.save(ref.state_dict(), path)
    x = torch.rand(2, 3, 64, 64)
    for spec, prep in ((f"vgg19-torchvision:{path}", lambda im: (im - torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1))
                        / torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)),
                       (f"vgg19-caffe:{path}", lambda im: im.flip(1) * 255 - torch.tensor([103.939, 116.779, 123.68]).view(1, 3, 1, 1))):
        net = load_network(spec)
        assert len(net.layer_names) == 19 and net.layer_names[-4:] == ["conv5_4", "fc6", "fc7", "fc8"]
        feats = net(x, ["conv5_4", "fc6", "fc8"])
        with torch.no_grad():
            h = ref.features[:35](prep(x))                   # conv5_4 before its ReLU
            logits = ref.classifier(torch.flatten(ref.avgpool(ref.features(prep(x))), 1))
            fc6 = ref.classifier[0](torch.flatten(ref.avgpool(ref.features(prep(x))), 1))
        torch.testing.assert_close(feats["conv5_4"], h, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(feats["fc6"], fc6, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(feats["fc8"], logits, rtol=1e-4, atol=1e-4)
        assert net.unit_shapes(64)["fc7"] == (4096,) and net.unit_shapes(224)["conv5_4"] == (512, 14, 14)


def test_vgg19_loader_errors(tmp_path):
    from torch import nn
    wrong = tmp_path / "alexnet.pt"
    torch.save(nn.Sequential(nn.Conv2d(3, 96, 11)).state_dict(), wrong)
    with pytest.raises(ValueError, match="not a VGG19 state dict"):
        load_network(f"vgg19-caffe:{wrong}")
    ref = _reference_vgg19()
    good = tmp_path / "vgg19.pt"
    torch.save(ref.state_dict(), good)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[: 10_000_000])
    with pytest.raises(ValueError, match="truncated"):
        load_network(f"vgg19-torchvision:{truncated}")
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        load_network(f"vgg19-caffe:{tmp_path / 'missing.pt'}")
