"""The NSD-era evaluation protocol: its networks' published layouts, strict loading, and its metrics."""
import warnings

import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter
from skimage.color import rgb2gray
from skimage.metrics import structural_similarity

from brainrecon.evaluate.nsd import (NSD_NETWORKS, correlation_distance, network_features, nsd_protocol, resize,
                                     two_way_identification)
from brainrecon.nets.evalnets import (CLIPVisual, EvalNetError, InceptionV3, _BUILDERS, build_eval_network,
                                      load_eval_network)

# Parameter counts published with the weights (torchvision's weight metadata; OpenAI's ViT-L/14 visual tower).
PUBLISHED_PARAMS = {"alexnet": 61_100_840, "inceptionv3": 27_161_264, "efficientnet-b1": 7_794_184,
                    "swav-resnet50": 25_557_032, "clip-vit-l14": 303_966_208}
# A few tensors of each published file, by their names and shapes there.
PUBLISHED_TENSORS = {
    "alexnet": {"features.0.weight": (64, 3, 11, 11), "features.3.weight": (192, 64, 5, 5),
                "features.10.weight": (256, 256, 3, 3), "classifier.1.weight": (4096, 9216),
                "classifier.6.bias": (1000,)},
    "inceptionv3": {"Conv2d_1a_3x3.conv.weight": (32, 3, 3, 3), "Conv2d_1a_3x3.bn.running_var": (32,),
                    "Mixed_5b.branch_pool.conv.weight": (32, 192, 1, 1),
                    "Mixed_6e.branch7x7dbl_5.conv.weight": (192, 192, 1, 7),
                    "Mixed_7c.branch3x3dbl_3b.conv.weight": (384, 384, 3, 1),
                    "AuxLogits.conv1.conv.weight": (768, 128, 5, 5), "AuxLogits.fc.weight": (1000, 768),
                    "fc.weight": (1000, 2048)},
    "efficientnet-b1": {"features.0.0.weight": (32, 3, 3, 3), "features.1.0.block.0.0.weight": (32, 1, 3, 3),
                        "features.1.1.block.1.fc1.weight": (4, 16, 1, 1),
                        "features.2.0.block.0.0.weight": (96, 16, 1, 1),
                        "features.6.4.block.1.0.weight": (1152, 1, 5, 5),
                        "features.7.1.block.3.0.weight": (320, 1920, 1, 1),
                        "features.8.0.weight": (1280, 320, 1, 1), "classifier.1.weight": (1000, 1280)},
    "swav-resnet50": {"conv1.weight": (64, 3, 7, 7), "layer1.0.downsample.0.weight": (256, 64, 1, 1),
                      "layer2.0.conv2.weight": (128, 128, 3, 3), "layer4.2.conv3.weight": (2048, 512, 1, 1),
                      "layer4.2.bn3.running_mean": (2048,)},
    "clip-vit-l14": {"conv1.weight": (1024, 3, 14, 14), "class_embedding": (1024,),
                     "positional_embedding": (257, 1024), "proj": (1024, 768),
                     "transformer.resblocks.23.attn.in_proj_weight": (3072, 1024),
                     "transformer.resblocks.23.attn.out_proj.weight": (1024, 1024),
                     "transformer.resblocks.0.mlp.c_fc.weight": (4096, 1024),
                     "transformer.resblocks.0.mlp.c_proj.weight": (1024, 4096), "ln_post.bias": (1024,)},
}
EFFNET_BLOCKS = [2, 3, 3, 4, 4, 5, 2]     # B0's 1, 2, 2, 3, 3, 4, 1 times depth 1.1, rounded up
SMALL_CLIP = dict(width=64, layers=2, heads=1, patch=14, resolution=224, output_dim=32)


def smooth_images(n: int, size: int = 32, seed: int = 0) -> np.ndarray:
    """(n, 3, size, size) float32 in [0, 1]: low-pass random colour fields quantised to 8 bits, as PNGs are."""
    rng = np.random.default_rng(seed)
    x = gaussian_filter(rng.normal(size=(n, 3, size, size)), sigma=(0, 0, size / 10, size / 10))
    x = (x - x.min(axis=(1, 2, 3), keepdims=True)) / np.ptp(x, axis=(1, 2, 3), keepdims=True)
    return (np.round(x * 255) / 255).astype(np.float32)


def test_published_layouts():
    """Our modules hold exactly the published files' tensors: count, names and shapes (meta device: no memory)."""
    for name, cls in _BUILDERS.items():
        with torch.device("meta"):
            net = cls()
        state = net.state_dict()
        assert sum(p.numel() for p in net.parameters()) == PUBLISHED_PARAMS[name], name
        for key, shape in PUBLISHED_TENSORS[name].items():
            assert tuple(state[key].shape) == shape, (name, key)
    with torch.device("meta"):
        eff = _BUILDERS["efficientnet-b1"]()
        clip = CLIPVisual()
    assert [len(stage) for stage in eff.features[1:8]] == EFFNET_BLOCKS
    # OpenAI's visual tower: 8 top-level tensors and 12 per residual block, 24 blocks
    assert len(clip.state_dict()) == 8 + 24 * 12


@pytest.fixture(scope="module")
def weight_files(tmp_path_factory):
    """Weight files in each published format, saved from our randomly initialised networks."""
    out = tmp_path_factory.mktemp("evalnets")
    nets = {name: build_eval_network(name, seed=3) for name in ("alexnet", "inceptionv3", "efficientnet-b1",
                                                                 "swav-resnet50")}
    nets["clip-vit-l14"] = build_eval_network("clip-vit-l14", seed=3, **SMALL_CLIP)
    paths = {"alexnet": out / "alexnet-owt-7be5be79.pth", "inceptionv3": out / "inception_v3_google-0cc3c7bd.pth",
             "efficientnet-b1": out / "efficientnet_b1-c27df63c.pth",
             "swav-resnet50": out / "swav_800ep_pretrain.pth.tar", "clip-vit-l14": out / "ViT-L-14.pt"}
    torch.save(nets["alexnet"].state_dict(), paths["alexnet"])
    torch.save(nets["efficientnet-b1"].state_dict(), paths["efficientnet-b1"])
    # an older torchvision file: no batch-norm counters
    torch.save({k: v for k, v in nets["inceptionv3"].state_dict().items() if "num_batches_tracked" not in k},
               paths["inceptionv3"])
    # SwAV: "module."-prefixed backbone without fc, plus projection head and prototypes
    swav = {f"module.{k}": v for k, v in nets["swav-resnet50"].state_dict().items() if not k.startswith("fc.")}
    swav.update({"module.projection_head.0.weight": torch.zeros(2048, 2048), "module.projection_head.0.bias":
                 torch.zeros(2048), "module.projection_head.1.weight": torch.ones(2048),
                 "module.projection_head.3.weight": torch.zeros(128, 2048),
                 "module.prototypes.weight": torch.zeros(3000, 128)})
    torch.save(swav, paths["swav-resnet50"])

    # OpenAI CLIP: a TorchScript archive of the whole model whose visual.* tensors are the image encoder
    class Model(torch.nn.Module):
        def __init__(self, visual):
            super().__init__()
            self.visual = visual
            self.token_embedding = torch.nn.Embedding(10, 8)
            self.logit_scale = torch.nn.Parameter(torch.ones([]))

        def forward(self, image):
            return self.visual(image)

    with warnings.catch_warnings():      # tracing warns about shape checks it records as constants
        warnings.simplefilter("ignore")
        scripted = torch.jit.trace(Model(nets["clip-vit-l14"]), torch.rand(1, 3, 224, 224))
    scripted.save(str(paths["clip-vit-l14"]))
    return nets, paths


def test_strict_loading_of_published_formats(weight_files):
    nets, paths = weight_files
    for name in NSD_NETWORKS:
        loaded = load_eval_network(name, paths[name])
        source = nets[name].state_dict()
        for key, value in loaded.state_dict().items():
            if name == "swav-resnet50" and key.startswith("fc."):
                continue          # absent from SwAV's checkpoint, never read out
            if "num_batches_tracked" not in key:
                assert torch.equal(value, source[key]), (name, key)
    clip = load_eval_network("clip-vit-l14", paths["clip-vit-l14"])
    assert clip.resolution == 224 and clip.proj.shape == (64, 32)   # size read from the file's shapes
    x = torch.as_tensor(smooth_images(2, 224))
    torch.testing.assert_close(clip(x), nets["clip-vit-l14"](x))


def test_wrong_files_are_named_with_what_was_expected(weight_files, tmp_path):
    _, paths = weight_files
    with pytest.raises(EvalNetError) as err:
        load_eval_network("inceptionv3", paths["alexnet"])
    msg = str(err.value)
    assert str(paths["alexnet"]) in msg and "inception_v3_google-0cc3c7bd.pth" in msg and "Conv2d_1a_3x3" in msg
    assert "features.0.weight" in msg      # what the file holds instead
    with pytest.raises(EvalNetError, match="no CLIP image encoder.*ViT-L-14.pt"):
        load_eval_network("clip-vit-l14", paths["efficientnet-b1"])
    state = torch.load(paths["efficientnet-b1"], weights_only=True)
    state["features.8.0.weight"] = torch.zeros(1280, 321, 1, 1)
    torch.save(state, tmp_path / "b1.pth")
    with pytest.raises(EvalNetError, match=r"features\.8\.0\.weight has shape \(1280, 321, 1, 1\).*\(1280, 320, 1, 1\)"):
        load_eval_network("efficientnet-b1", tmp_path / "b1.pth")
    (tmp_path / "junk.pth").write_text("not a weight file")
    with pytest.raises(EvalNetError, match="junk.pth could not be read.*alexnet-owt-7be5be79.pth"):
        load_eval_network("alexnet", tmp_path / "junk.pth")
    with pytest.raises(FileNotFoundError, match="nope.pth.*swav_800ep_pretrain.pth.tar"):
        load_eval_network("swav-resnet50", tmp_path / "nope.pth")


def test_two_way_identification_against_brute_force():
    rng = np.random.default_rng(0)
    true = rng.normal(size=(12, 30))
    pred = true + rng.normal(scale=2.0, size=true.shape)
    pred[3] = pred[4]                 # two reconstructions alike
    true[7] = true[8]                 # two ground truths alike: r ties, which count as failures
    pred[8] = true[8]
    n = len(true)
    expected = np.zeros(n)
    for j in range(n):
        for i in range(n):
            if i != j and np.corrcoef(true[i], pred[j])[0, 1] < np.corrcoef(true[j], pred[j])[0, 1]:
                expected[j] += 1 / (n - 1)
    np.testing.assert_allclose(two_way_identification(pred, true), expected)
    assert two_way_identification(pred, true)[8] == pytest.approx(10 / 11)   # ground truth 7 ties: not beaten
    np.testing.assert_allclose(two_way_identification(true[:7], true[:7]), 1.0)
    with pytest.raises(ValueError, match="at least two"):
        two_way_identification(pred[:1], true[:1])


def test_identical_images_100_random_pairs_chance():
    """AlexNet(2)/(5) with random weights: own stimuli are identified always, noisy copies nearly always,
    unrelated images at chance."""
    n = 30
    stimuli = smooth_images(n, seed=1)
    noisy = np.clip(stimuli + np.random.default_rng(3).normal(scale=0.15, size=stimuli.shape), 0, 1)
    both = network_features("alexnet", np.concatenate([stimuli, smooth_images(n, seed=2), noisy]), None)
    assert both["features.4"].shape == (3 * n, 192 * 31 * 31) and both["features.11"].shape == (3 * n, 256 * 15 * 15)
    for layer in ("features.4", "features.11"):
        feats, others, degraded = both[layer][:n], both[layer][n:2 * n], both[layer][2 * n:]
        assert two_way_identification(feats, feats).min() == 1.0
        chance = two_way_identification(others, feats).mean()
        assert 0.3 < chance < 0.7, (layer, chance)
        assert two_way_identification(degraded, feats).mean() > 0.9      # resemblance is identified


def test_protocol_on_all_networks(weight_files):
    """Every metric in the published order; reconstructions equal to their stimuli score perfectly."""
    _, paths = weight_files
    stimuli = smooth_images(3, seed=4)
    messages = []
    metrics, skipped = nsd_protocol(stimuli, stimuli, paths, log=messages.append)
    assert skipped == {}
    assert [m.name for m in metrics] == ["pixcorr", "ssim", "alexnet2", "alexnet5", "inceptionv3", "clip",
                                        "effnet", "swav"]
    for m in metrics:
        assert m.per_image.shape == (3,)
        if m.kind == "distance":
            assert not m.higher_is_better and np.abs(m.per_image).max() < 1e-5, m.name
        else:
            assert m.higher_is_better and m.mean() == pytest.approx(1.0, abs=1e-6), m.name
    protocol = {m.name: m.protocol for m in metrics}
    assert "425 px" in protocol["ssim"] and "sigma 1.5" in protocol["ssim"]
    assert "342 px" in protocol["inceptionv3"] and "255 px" in protocol["effnet"] and "features.4" in protocol["alexnet2"]
    assert metrics[2].to_json()["n"] == 3 and len(messages) == 5


def test_missing_weights_are_skipped_with_where_to_get_them(tmp_path, weight_files):
    stimuli = smooth_images(3, seed=5)
    recons = np.clip(stimuli + 0.1 * smooth_images(3, seed=6), 0, 1)
    metrics, skipped = nsd_protocol(recons, stimuli, {"alexnet": tmp_path / "nope.pth"})
    assert [m.name for m in metrics] == ["pixcorr", "ssim"]
    assert set(skipped) == {"alexnet2", "alexnet5", "inceptionv3", "clip", "effnet", "swav"}
    assert "nope.pth" in skipped["alexnet2"] and "https://download.pytorch.org/models/alexnet-owt-7be5be79.pth" \
        in skipped["alexnet2"]
    assert "ViT-L-14.pt" in skipped["clip"] and "openaipublic" in skipped["clip"]
    # reconstructions at the run's size, stimuli at their own: both resized to each protocol size
    metrics, _ = nsd_protocol(recons[:, :, ::2, ::2], stimuli, {"alexnet": weight_files[1]["alexnet"]})
    assert [m.name for m in metrics] == ["pixcorr", "ssim", "alexnet2", "alexnet5"]
    assert 0.5 < metrics[0].mean() < 1 and metrics[2].per_image.shape == (3,)
    with pytest.raises(ValueError, match="unknown evaluation network.*clip-vit-l14"):
        nsd_protocol(recons, stimuli, {"clip": "ViT-L-14.pt"})


def _bilinear_matrix(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) linear interpolation at half-pixel centres, clamped at the borders."""
    src = np.clip((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0, None)
    lo = np.floor(src).astype(int)
    hi = np.minimum(lo + 1, n_in - 1)
    w = np.zeros((n_out, n_in))
    w[np.arange(n_out), lo] += 1 - (src - lo)
    w[np.arange(n_out), hi] += src - lo
    return w


def test_pixcorr_and_ssim_against_numpy_and_skimage(tmp_path):
    """The protocol on images read from PNG files, against NumPy and scikit-image on independently upsampled copies."""
    from PIL import Image
    originals = {"stimulus": smooth_images(3, size=64, seed=7)}
    originals["recon"] = np.clip(originals["stimulus"] + 0.15 * (smooth_images(3, size=64, seed=8) - 0.5), 0, 1)
    loaded = {}
    for kind, images in originals.items():
        for i, image in enumerate(images):
            Image.fromarray(np.round(image.transpose(1, 2, 0) * 255).astype(np.uint8)).save(tmp_path / f"{kind}{i}.png")
        loaded[kind] = np.stack([np.asarray(Image.open(tmp_path / f"{kind}{i}.png"), dtype=np.float32).transpose(2, 0, 1)
                                 / 255 for i in range(len(images))])
    stimuli, recons = loaded["stimulus"], loaded["recon"]
    metrics, _ = nsd_protocol(recons, stimuli)
    w = _bilinear_matrix(64, 425)
    up = lambda a: w @ a.astype(np.float64) @ w.T     # noqa: E731  (rows, then columns)
    r_up, s_up = up(recons), up(stimuli)
    np.testing.assert_allclose(resize(recons, 425).numpy(), r_up, atol=1e-5)
    pixcorr = [np.corrcoef(r.ravel(), s.ravel())[0, 1] for r, s in zip(r_up, s_up)]
    ssim = [structural_similarity(rgb2gray(r.transpose(1, 2, 0)), rgb2gray(s.transpose(1, 2, 0)),
                                  gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=1.0)
            for r, s in zip(r_up, s_up)]
    np.testing.assert_allclose(metrics[0].per_image, pixcorr, atol=1e-5)
    np.testing.assert_allclose(metrics[1].per_image, ssim, atol=1e-4)
    assert 0.3 < metrics[1].mean() < 0.999


def test_inception_input_transform_and_distance():
    """torchvision's transform_input after ImageNet normalisation is (x - 0.5) / 0.5 on [0, 1] images."""
    x = torch.rand(2, 3, 8, 8)
    torch.testing.assert_close(InceptionV3().normalise(x), (x - 0.5) / 0.5)
    rng = np.random.default_rng(3)
    a, b = rng.normal(size=(5, 20)), rng.normal(size=(5, 20))
    from scipy.spatial.distance import correlation
    np.testing.assert_allclose(correlation_distance(a, b), [correlation(u, v) for u, v in zip(a, b)])


def test_forward_passes_against_the_published_computation():
    """AlexNet's features.4 and the CLIP image embedding recomputed from the state dicts with plain tensor ops."""
    import torch.nn.functional as F
    x = torch.as_tensor(smooth_images(2, 64, seed=9))
    alex = build_eval_network("alexnet", seed=1)
    w = alex.state_dict()
    mean, std = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1), torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    h = F.relu(F.conv2d((x - mean) / std, w["features.0.weight"], w["features.0.bias"], stride=4, padding=2))
    h = F.relu(F.conv2d(F.max_pool2d(h, 3, 2), w["features.3.weight"], w["features.3.bias"], padding=2))
    torch.testing.assert_close(alex.taps(x, ["features.4"])["features.4"], h)

    clip = build_eval_network("clip-vit-l14", seed=1, **SMALL_CLIP)
    s = clip.state_dict()
    img = F.interpolate(x, size=224, mode="bilinear", align_corners=False)
    z = (img - torch.tensor(CLIPVisual.mean).view(1, 3, 1, 1)) / torch.tensor(CLIPVisual.std).view(1, 3, 1, 1)
    t = F.conv2d(z, s["conv1.weight"], stride=14).flatten(2).transpose(1, 2)            # (n, 256, width)
    t = torch.cat([s["class_embedding"].expand(len(t), 1, -1), t], 1) + s["positional_embedding"]
    ln = lambda v, k: F.layer_norm(v, v.shape[-1:], s[f"{k}.weight"], s[f"{k}.bias"])   # noqa: E731
    t = ln(t, "ln_pre")
    for b in range(SMALL_CLIP["layers"]):
        p = f"transformer.resblocks.{b}."
        q, k, v = (ln(t, p + "ln_1") @ s[p + "attn.in_proj_weight"].T + s[p + "attn.in_proj_bias"]).chunk(3, -1)
        att = torch.softmax(q @ k.transpose(1, 2) / q.shape[-1] ** 0.5, -1) @ v          # one head (width 64)
        t = t + att @ s[p + "attn.out_proj.weight"].T + s[p + "attn.out_proj.bias"]
        u = ln(t, p + "ln_2") @ s[p + "mlp.c_fc.weight"].T + s[p + "mlp.c_fc.bias"]
        t = t + (u * torch.sigmoid(1.702 * u)) @ s[p + "mlp.c_proj.weight"].T + s[p + "mlp.c_proj.bias"]
    expected = ln(t[:, 0], "ln_post") @ s["proj"]
    torch.testing.assert_close(clip(img), expected, rtol=1e-4, atol=1e-5)
