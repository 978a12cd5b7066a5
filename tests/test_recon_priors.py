"""The reconstruction priors: loss reduction, bounds, generator rendering, snapshots, checkpoint resume."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from brainrecon.data.stimuli import shapes
from brainrecon.recon import checkpoint as ckpt
from brainrecon.recon.icnn import ReconConfig, make_prior, reconstruct
from brainrecon.recon.objective import FeatureLoss, layer_weights
from brainrecon.recon.transforms import RandomAffine, blur_chroma, fit_size, gaussian_blur

SIZE = 32
LAYERS = ["conv1_2", "conv2_2", "conv3_3", "conv4_3"]


class ToyGenerator(nn.Module):
    """The generator interface on a small scale: the latent (n, 3*16*16) is a coarse image, upsampled to
    (n, 3, out, out) and squashed into [0, 1]; latent box [0, 20], start uniform in [0, 10]."""

    def __init__(self, out: int = 40, grid: int = 16):
        super().__init__()
        self.out, self.grid, self.latent_dim = out, grid, 3 * grid * grid
        self.register_buffer("latent_lower", torch.zeros(self.latent_dim))
        self.register_buffer("latent_upper", torch.full((self.latent_dim,), 20.0))

    def latent_init(self, n: int, generator: torch.Generator) -> torch.Tensor:
        return 10 * torch.rand(n, self.latent_dim, generator=generator, device=generator.device)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(z.view(-1, 3, self.grid, self.grid), size=(self.out, self.out), mode="bilinear",
                          align_corners=False)
        return torch.sigmoid((x - 10) / 3)


class Interrupting(nn.Module):
    """The network, raising ``Interrupted`` on call ``after + 1`` (a crash in the middle of an iteration)."""

    class Interrupted(Exception):
        pass

    def __init__(self, net, after: float = float("inf")):
        super().__init__()
        self.net, self.after, self.calls = net, after, 0

    def forward(self, images, layers):
        self.calls += 1
        if self.calls > self.after:
            raise self.Interrupted
        return self.net(images, layers)


@pytest.fixture(scope="module")
def problem(network):
    """Features of 4 shapes (different colours) at 32 px: targets {layer: (4, ...)}."""
    stim = shapes(SIZE)
    x = torch.from_numpy(stim.images[[0, 9, 18, 27]])
    with torch.inference_mode():
        targets = network(x, LAYERS)
    return {k: v.clone() for k, v in targets.items()}


def _old_reconstruct(targets, network, size, cfg):
    """The gradient descent as it was before the priors (the reference for the default)."""
    n = next(iter(targets.values())).shape[0]
    out = []
    step = -(-n // -(-n // cfg.batch_size))
    for b, s in enumerate(range(0, n, step)):
        gen = torch.Generator().manual_seed(cfg.seed * 100003 + b)
        t = {k: v[s:s + step].float() for k, v in targets.items()}
        layers, weights = list(t), layer_weights(t, cfg.layer_scale)
        m = len(next(iter(t.values())))
        mean = torch.tensor([123.68, 116.779, 103.939]).view(1, 3, 1, 1)
        x = torch.rand(m, 3, size, size, generator=gen) * 255 - mean
        delta = torch.zeros_like(x)
        lin = lambda a, c: np.linspace(a, c, cfg.iterations)
        lrs, decays = lin(cfg.gd.lr_start, cfg.gd.lr_end), lin(cfg.gd.decay_start, cfg.gd.decay_end)
        blurs = lin(cfg.gd.blur_start * size / 224, cfg.gd.blur_end * size / 224)
        for it in range(cfg.iterations):
            x.requires_grad_(True)
            feats = network((x + mean) / 255.0, layers)
            loss = sum((weights[k] * (feats[k] - t[k]).flatten(1).pow(2).sum(1)).sum() for k in layers)
            (grad,) = torch.autograd.grad(loss, x)
            with torch.no_grad():
                x = x.detach()
                grad = grad / grad.abs().mean(dim=(1, 2, 3), keepdim=True).clamp(min=1e-12)
                delta = cfg.gd.momentum * delta + lrs[it] * grad
                x = gaussian_blur((1 - decays[it]) * (x - delta), float(blurs[it]))
                if cfg.gd.chroma_blur > 0:
                    x = blur_chroma(x, cfg.gd.chroma_blur)
                x = torch.maximum(torch.minimum(x, 255 - mean), -mean)
        out.append((x + mean) / 255.0)
    return torch.cat(out)


def test_default_is_the_previous_gradient_descent(network, problem):
    cfg = ReconConfig(iterations=8, batch_size=3, gd={"chroma_blur": 1.0}, seed=4)
    images, _ = reconstruct(problem, network, SIZE, cfg)
    assert torch.equal(images, _old_reconstruct(problem, network, SIZE, cfg))
    assert not any(p.requires_grad or p.grad is not None for p in network.parameters())


# prior -> (iterations, bound on the largest final / start loss ratio of the 4 images); measured:
# gd 0.023, lbfgs 0.0012, generator 0.32 (the toy), fourier 0.28, dip 0.27
REDUCTION = {
    "gd": (30, 0.05),
    "lbfgs": (30, 0.01),
    "generator": (60, 0.5),
    "fourier": (60, 0.45),
    "dip": (40, 0.45),
}


@pytest.mark.parametrize("prior", list(REDUCTION))
def test_prior_reduces_feature_loss(network, problem, prior):
    iterations, bound = REDUCTION[prior]
    cfg = ReconConfig(prior=prior, iterations=iterations, snapshots=[0, iterations])
    images, snaps = reconstruct(problem, network, SIZE, cfg, generator=ToyGenerator())
    assert images.shape == (4, 3, SIZE, SIZE) and 0 <= float(images.min()) and float(images.max()) <= 1
    assert torch.equal(snaps[iterations], images)
    loss = FeatureLoss(network, problem)
    ratio = loss.evaluate(images) / loss.evaluate(snaps[0])
    assert float(ratio.max()) < bound, ratio


def test_lbfgs_respects_bounds_and_starts_from_the_mean_colour(network, problem):
    cfg = ReconConfig(prior="lbfgs", iterations=15)
    prior = make_prior(problem, network, SIZE, cfg, seed=0)
    start = prior.images()
    assert torch.allclose(start[:, :, 0, 0], torch.tensor([123.68, 116.779, 103.939]) / 255)
    assert float(start.std(dim=(2, 3)).max()) == 0
    prior.run(0, lambda it: None)
    x = prior.x * 1.0   # pixels 0-255
    assert float(x.min()) >= 0 and float(x.max()) <= 255
    assert float((x == 0).float().mean() + (x == 255).float().mean()) > 0.01   # the bounds are active
    assert prior.result.nit == 15 and prior.evaluations >= 15 and prior.evaluations == prior.result.nfev


@pytest.mark.parametrize("out", [40, 24])
def test_generator_prior_clips_latent_and_renders_it(network, problem, out):
    gen = ToyGenerator(out)
    cfg = ReconConfig(prior="generator", iterations=10)
    prior = make_prior(problem, network, SIZE, cfg, seed=0, generator=gen)
    prior.run(0, lambda it: None)
    z = prior.z
    assert z.shape == (4, 768) and float(z.min()) >= 0 and float(z.max()) <= 20
    assert float((z == 0).float().mean()) > 0.05      # clipping is active
    with torch.no_grad():
        full = gen(z)
    expected = full[:, :, 4:36, 4:36] if out > SIZE else F.interpolate(full, size=(SIZE, SIZE), mode="bilinear")
    assert torch.allclose(prior.images(), expected, atol=1e-6)
    images, _ = reconstruct(problem, network, SIZE, cfg, generator=gen)
    assert torch.allclose(images, expected, atol=1e-6)


def test_generator_prior_needs_a_generator(network, problem):
    with pytest.raises(ValueError, match="generator"):
        reconstruct(problem, network, SIZE, ReconConfig(prior="generator", iterations=1))


@pytest.mark.parametrize("prior", ["gd", "fourier", "dip"])
def test_checkpoint_resume_gives_the_same_images(network, problem, prior, tmp_path):
    cfg = ReconConfig(prior=prior, iterations=12, batch_size=2, checkpoint_every=5, snapshots=[3, 9, 12],
                      dip={"input_noise": 0.05})
    full, full_snaps = reconstruct(problem, network, SIZE, cfg)
    # crash in iteration 8 of the second batch (after batch 1 finished): resume from its iteration 5
    crashing = Interrupting(network, after=12 + 7)
    with pytest.raises(Interrupting.Interrupted):
        reconstruct(problem, crashing, SIZE, cfg, checkpoint=tmp_path / "run")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.batch0000.pt", "run.batch0001.pt"]
    assert torch.load(tmp_path / "run.batch0001.pt", weights_only=True)["iteration"] == 5
    resumed = Interrupting(network)
    images, snaps = reconstruct(problem, resumed, SIZE, cfg, checkpoint=tmp_path / "run")
    assert resumed.calls == 12 - 5
    assert torch.equal(images, full)
    assert sorted(snaps) == [3, 9, 12] and all(torch.equal(snaps[k], full_snaps[k]) for k in snaps)
    # finished: a rerun only reads the checkpoints
    again = Interrupting(network, after=0)
    assert torch.equal(reconstruct(problem, again, SIZE, cfg, checkpoint=tmp_path / "run")[0], full)
    # different settings: the checkpoint is ignored (with a warning) and replaced
    with pytest.warns(UserWarning, match="different settings"):
        other, _ = reconstruct(problem, network, SIZE, cfg.model_copy(update={"seed": 1}), checkpoint=tmp_path / "run")
    assert not torch.equal(other, full)


def test_checkpoint_folder_and_lbfgs_resume(network, problem, tmp_path):
    cfg = ReconConfig(prior="lbfgs", iterations=10, checkpoint_every=4)
    crashing = Interrupting(network, after=9)
    with pytest.raises(Interrupting.Interrupted):
        reconstruct(problem, crashing, SIZE, cfg, checkpoint=tmp_path)
    state = torch.load(tmp_path / "batch0000.pt", weights_only=True)
    assert state["iteration"] in (4, 8)
    images, _ = reconstruct(problem, network, SIZE, cfg, checkpoint=tmp_path)
    assert torch.load(tmp_path / "batch0000.pt", weights_only=True)["iteration"] == 10
    loss = FeatureLoss(network, problem)
    start = torch.tensor([123.68, 116.779, 103.939]).view(1, 3, 1, 1).expand(4, 3, SIZE, SIZE) / 255
    assert float((loss.evaluate(images) / loss.evaluate(start)).max()) < 0.1
    assert not list(tmp_path.glob(".*.tmp"))


def test_snapshots_for_every_prior(network, problem):
    t = {k: v[:1] for k, v in problem.items()}
    for prior in ["gd", "lbfgs", "generator", "fourier", "dip"]:
        images, snaps = reconstruct(t, network, SIZE, ReconConfig(prior=prior, iterations=4, snapshots=[0, 2, 4]),
                                    generator=ToyGenerator())
        assert sorted(snaps) == [0, 2, 4], prior
        assert torch.equal(snaps[4], images) and not torch.equal(snaps[0], snaps[2]), prior


def test_fit_size_and_random_affine():
    x = torch.rand(2, 3, 10, 10)
    assert torch.equal(fit_size(x, 6), x[:, :, 2:8, 2:8])
    assert torch.equal(fit_size(x, 10, crop=8), F.interpolate(x[:, :, 1:9, 1:9], size=(10, 10), mode="bilinear"))
    still = RandomAffine(torch.Generator().manual_seed(0), jitter=0, scale=0, rotate=0)
    assert torch.allclose(still(x), x, atol=1e-5)
    moved = RandomAffine(torch.Generator().manual_seed(0), jitter=3, scale=0.1, rotate=10)(x)
    assert moved.shape == x.shape and not torch.allclose(moved, x, atol=1e-2)


def test_checkpoint_paths(tmp_path):
    assert ckpt.batch_path(tmp_path, 3) == tmp_path / "batch0003.pt"
    assert ckpt.batch_path(tmp_path / "a" / "run", 0) == tmp_path / "a" / "run.batch0000.pt"
    assert ckpt.batch_path(str(tmp_path / "new") + "/", 1) == tmp_path / "new" / "batch0001.pt"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("prior", ["gd", "lbfgs", "dip"])
def test_cuda_matches_cpu(network, problem, prior):
    cfg = ReconConfig(prior=prior, iterations=5)
    cpu, _ = reconstruct(problem, network, SIZE, cfg)
    gpu, _ = reconstruct(problem, network, SIZE, cfg.model_copy(update={"device": "cuda"}))
    assert next(network.parameters()).device.type == "cpu"
    assert gpu.device.type == "cpu" and float((gpu - cpu).abs().max()) < 0.05
