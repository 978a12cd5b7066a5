"""Image generators: natural-image priors for reconstruction.

Every generator is an ``nn.Module`` with one interface, so the reconstruction engine can optimise a
latent vector instead of pixels:

- ``forward(z)``: ``(n, latent_dim)`` -> ``(n, 3, H, W)`` float RGB in [0, 1] at the native size ``image_size``
  (``H == W``; the caller resizes or crops to its encoder's input);
- ``latent_dim``: int; ``image_size``: int;
- buffers ``latent_lower`` / ``latent_upper`` ``(latent_dim,)``: the box to clip the latent to after each
  step (``clip_latent``); ``+inf`` where a unit has no upper bound;
- ``latent_init(n, generator=None)``: ``(n, latent_dim)`` start latent; with a ``torch.Generator`` small
  random noise is added (then clipped to the box).

Generators are returned in eval mode with frozen parameters (gradients still reach ``z``).
``load_generator(spec)`` builds one: ``builtin`` (shipped with the package) or ``relu7:PATH``.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from torch import nn
import torch.nn.functional as F

GENERATORS = ("builtin", "relu7:PATH")
WEIGHTS_DIR = Path(__file__).parent / "weights"
BUILTIN_WEIGHTS = WEIGHTS_DIR / "builtin_generator.pt"
# sha256 of the shipped builtin weights (scripts/train_generator.py prints it for a new file)
BUILTIN_SHA256 = "6af23592b794d3cfea7a5693bbbf697b7a4f972a0655d713c607e4d969c3a1bf"


class ImageGenerator(nn.Module):
    """Base class: the latent box and start point; subclasses define ``forward``."""

    latent_dim: int
    image_size: int

    def _init_bounds(self, latent_dim: int, persistent: bool) -> None:
        self.latent_dim = latent_dim
        self.register_buffer("latent_lower", torch.zeros(latent_dim), persistent=persistent)
        self.register_buffer("latent_upper", torch.full((latent_dim,), float("inf")), persistent=persistent)

    def clip_latent(self, z: torch.Tensor) -> torch.Tensor:
        """``z`` clipped to ``[latent_lower, latent_upper]`` per unit."""
        return torch.maximum(torch.minimum(z, self.latent_upper), self.latent_lower)

    def _latent_base(self) -> torch.Tensor:
        return torch.zeros(self.latent_dim, device=self.latent_lower.device)

    def _noise_scale(self) -> torch.Tensor:
        return torch.ones(self.latent_dim, device=self.latent_lower.device)

    def latent_init(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """Start latent ``(n, latent_dim)``: the base point, plus N(0, (0.1 x unit scale)^2) noise if ``generator``."""
        z = self._latent_base().expand(n, -1).clone()
        if generator is not None:
            noise = torch.randn(n, self.latent_dim, generator=generator, device=generator.device)
            z = z + 0.1 * self._noise_scale() * noise.to(z.device)
        return self.clip_latent(z)


def _load_state(path: Path, what: str, fix: str) -> dict:
    """``torch.load`` a state dict with errors naming the file and the fix."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for damaged archives
        raise ValueError(f"{path} could not be read as a PyTorch state dict ({type(err).__name__}: {err}); "
                         f"the file may be truncated or damaged: {fix}") from err
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path} holds a {type(state).__name__} that is not a state dict of {what}; {fix}")
    return state


def _shown(keys: list[str], k: int = 4) -> str:
    return ", ".join(keys[:k]) + (f" (+{len(keys) - k} more)" if len(keys) > k else "")


# ---------------------------------------------------------------- the lab's relu7 generator

RELU7_MEAN_BGR = (104.0, 117.0, 123.0)   # the mean the lab adds back to the generator's output
# (name, layer) in order; deconvN upsample 2x (kernel 4, stride 2, padding 1), convN_1 keep the size
# (transposed conv, kernel 3, padding 1)
_RELU7_FC = [("defc7", 4096, 4096), ("defc6", 4096, 4096), ("defc5", 4096, 4096)]
_RELU7_DECONV = [("deconv5", 256, 256, 4), ("conv5_1", 256, 512, 3), ("deconv4", 512, 256, 4),
                 ("conv4_1", 256, 256, 3), ("deconv3", 256, 128, 4), ("conv3_1", 128, 128, 3),
                 ("deconv2", 128, 64, 4), ("deconv1", 64, 32, 4), ("deconv0", 32, 3, 4)]


def _relu7_aliases() -> dict[str, str]:
    """The lab's layer names -> their second name in the ``defc`` / ``deconv`` sequences (``defc7`` -> ``defc.0``)."""
    names = [n for n, *_ in _RELU7_FC]
    aliases = {n: f"defc.{2 * i}" for i, n in enumerate(names)}
    aliases.update({n: f"deconv.{2 * i}" for i, (n, *_) in enumerate(_RELU7_DECONV)})
    return aliases


class Relu7Generator(ImageGenerator):
    """Dosovitskiy & Brox (2016) generator from CaffeNet relu7 (fc7) features, as released by the Kamitani lab.

    ``z`` (n, 4096) -> three fully connected layers (``defc7``, ``defc6``, ``defc5``, 4096 units) -> reshape
    (256, 4, 4) -> transposed convolutions ``deconv5 conv5_1 deconv4 conv4_1 deconv3 conv3_1 deconv2 deconv1
    deconv0`` -> (n, 3, 256, 256); LeakyReLU(0.3) after every layer but the last. The lab's state dict names
    every layer twice, by name (``defc7.weight``) and by position in the ``defc`` / ``deconv`` sequences
    (``defc.0.weight``); this module has the same 48 keys.

    The network's own output (``forward_caffe``) is a Caffe input image: BGR, 0-255 scale, minus the mean
    (104, 117, 123), not bounded. ``forward`` adds the mean back, flips to RGB, divides by 255 and clips
    to [0, 1]. The latent box is [0, upper] with upper from ``act_range/3x/relu7.txt`` (``+inf`` until
    ``set_bounds`` is called); the start latent is 0, as in the lab's code.
    """

    image_size = 256

    def __init__(self):
        super().__init__()
        self._init_bounds(4096, persistent=False)
        self.register_buffer("caffe_mean", torch.tensor(RELU7_MEAN_BGR).view(1, 3, 1, 1), persistent=False)
        for name, c_in, c_out in _RELU7_FC:
            setattr(self, name, nn.Linear(c_in, c_out))
        for name, c_in, c_out, k in _RELU7_DECONV:
            setattr(self, name, nn.ConvTranspose2d(c_in, c_out, k, stride=2 if k == 4 else 1, padding=1))
        fc = [m for name, *_ in _RELU7_FC for m in (getattr(self, name), nn.LeakyReLU(0.3))]
        deconv = [m for name, *_ in _RELU7_DECONV for m in (getattr(self, name), nn.LeakyReLU(0.3))][:-1]
        self.defc = nn.Sequential(*fc)          # the same layers again, under the lab's second names
        self.deconv = nn.Sequential(*deconv)

    def set_bounds(self, upper: torch.Tensor) -> "Relu7Generator":
        """Set the per-unit upper bound ``(4096,)`` of the latent (the lower bound stays 0)."""
        if tuple(upper.shape) != (self.latent_dim,):
            raise ValueError(f"upper bounds must have shape ({self.latent_dim},), got {tuple(upper.shape)}")
        self.latent_upper.copy_(upper)
        return self

    def _noise_scale(self) -> torch.Tensor:
        upper = self.latent_upper
        return torch.where(torch.isfinite(upper), upper / 3, torch.ones_like(upper))  # bounds are 3 SD

    def forward_caffe(self, z: torch.Tensor) -> torch.Tensor:
        """``(n, 4096)`` -> ``(n, 3, 256, 256)`` in the lab's convention (BGR, 0-255 minus the mean)."""
        if z.ndim != 2 or z.shape[1] != self.latent_dim:
            raise ValueError(f"latent must be (n, {self.latent_dim}), got {tuple(z.shape)}")
        return self.deconv(self.defc(z).view(-1, 256, 4, 4))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        bgr = self.forward_caffe(z) + self.caffe_mean
        return (bgr.flip(1) / 255.0).clamp(0.0, 1.0)


def load_relu7_generator(path: str | Path) -> Relu7Generator:
    """The lab's ``generator_relu7.pt`` (a plain state dict) as a frozen ``Relu7Generator`` without bounds.

    Accepts the lab's 48-key layout, or either half of it (only ``defc7.weight``-style keys, or only
    ``defc.0.weight``-style keys).
    """
    path = Path(path)
    fix = ("download bvlc_reference_caffenet_generator_ILSVRC2012_Training.zip (figshare article 21564384) "
           "and pass the generator_relu7.pt it holds")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such generator file; {fix}")
    state = _load_state(path, "the relu7 generator", fix)
    with torch.device("meta"):  # skip the random init of 56 M weights that are overwritten below
        net = Relu7Generator()
    net = net.to_empty(device="cpu")
    net.latent_lower.zero_()
    net.latent_upper.fill_(float("inf"))
    net.caffe_mean.copy_(torch.tensor(RELU7_MEAN_BGR).view(1, 3, 1, 1))
    aliases = _relu7_aliases()
    params = [f"{name}.{p}" for name in aliases for p in ("weight", "bias")]
    alias_of = {f"{name}.{p}": f"{aliases[name]}.{p}" for name in aliases for p in ("weight", "bias")}
    missing = [k for k in params if k not in state and alias_of[k] not in state]
    unexpected = [k for k in state if k not in alias_of and k not in alias_of.values()]
    if missing or unexpected:
        parts = ([f"lacks {len(missing)} of its {len(params)} tensors ({_shown(missing)})"] if missing else []) + \
                ([f"has {len(unexpected)} unknown keys ({_shown(unexpected)})"] if unexpected else [])
        raise ValueError(f"{path} is not the relu7 generator's state dict: it {' and '.join(parts)}; {fix}")
    own = dict(net.named_parameters())
    for key in params:
        tensor = state[key] if key in state else state[alias_of[key]]
        if tuple(tensor.shape) != tuple(own[key].shape):
            raise ValueError(f"{path}: {key} has shape {tuple(tensor.shape)}, the relu7 generator needs "
                             f"{tuple(own[key].shape)}; this is a different network. {fix}")
        own[key].data.copy_(tensor.float())
    return net.eval().requires_grad_(False)


def load_latent_bounds(path: str | Path, n_units: int = 4096) -> torch.Tensor:
    """Per-unit latent upper bounds ``(n_units,)`` from a text file such as ``act_range/3x/relu7.txt``.

    The lab writes the numbers separated by spaces (on one line, sometimes with a trailing space); any
    whitespace or comma layout is read, as long as there are exactly ``n_units`` finite, non-negative numbers.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such bounds file; it comes in the generator's archive under act_range/3x/")
    text = path.read_text(errors="replace").replace(",", " ")
    try:
        values = [float(tok) for tok in text.split()]
    except ValueError as err:
        raise ValueError(f"{path} is not a list of numbers ({err}); pass the act_range bounds file") from err
    if len(values) != n_units:
        raise ValueError(f"{path} holds {len(values)} numbers, but the generator's latent has {n_units} units; "
                         "pass the bounds file of this generator's layer")
    bounds = torch.tensor(values, dtype=torch.float32)
    if not torch.isfinite(bounds).all() or (bounds < 0).any():
        raise ValueError(f"{path}: bounds must be finite and >= 0 (the latent is post-ReLU)")
    return bounds


def relu7_bounds_path(generator_path: str | Path) -> Path:
    """``<dir of generator_path>/act_range/3x/relu7.txt``, or the older name ``fc7.txt`` if only that exists."""
    folder = Path(generator_path).parent / "act_range" / "3x"
    for name in ("relu7.txt", "fc7.txt"):
        if (folder / name).is_file():
            return folder / name
    raise FileNotFoundError(
        f"no latent bounds next to {generator_path}: expected {folder / 'relu7.txt'} (or fc7.txt). Unzip the whole "
        "bvlc_reference_caffenet_generator_ILSVRC2012_Training.zip so that act_range/ sits beside generator_relu7.pt")


# ---------------------------------------------------------------- builtin generator

BUILTIN_LATENT_SHAPE = (512, 4, 4)        # post-ReLU conv4_3 of a 64x64 image, 2x2 max-pooled ("pool4")
BUILTIN_WIDTHS = (256, 192, 128, 64, 32)  # channels at 4, 8, 16, 32, 64 px


class BuiltinGenerator(ImageGenerator):
    """Feature-inversion generator: hed-vgg16 ``pool4`` features of a 64x64 image -> the image.

    The latent is the flattened ``(512, 4, 4)`` map of post-ReLU ``conv4_3`` max-pooled 2x2, computed by
    ``encode`` (8,192 units, bounded to ``[0, upper]`` with the upper bound estimated on training images).
    Convolutional decoder: 1x1 and 3x3 convolutions at 4x4, then four (nearest 2x upsampling, 3x3 conv;
    a second 3x3 conv at 8 and 16 px) stages to 64x64, LeakyReLU(0.2), sigmoid output.
    """

    image_size = 64

    def __init__(self):
        super().__init__()
        c, h, w = BUILTIN_LATENT_SHAPE
        self._init_bounds(c * h * w, persistent=True)
        self.register_buffer("latent_scale", torch.ones(c))          # per-channel RMS of training latents
        self.register_buffer("latent_mean", torch.zeros(c * h * w))  # mean training latent: the start point
        widths = BUILTIN_WIDTHS
        self.stem = nn.Sequential(nn.Conv2d(c, widths[0], 1), nn.LeakyReLU(0.2),
                                  nn.Conv2d(widths[0], widths[0], 3, padding=1), nn.LeakyReLU(0.2))
        stages = []
        for c_in, c_out in zip(widths[:-1], widths[1:]):
            layers = [nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(c_in, c_out, 3, padding=1), nn.LeakyReLU(0.2)]
            if c_out >= 128:  # a second conv up to 16x16 (cost)
                layers += [nn.Conv2d(c_out, c_out, 3, padding=1), nn.LeakyReLU(0.2)]
            stages.append(nn.Sequential(*layers))
        self.stages = nn.Sequential(*stages)
        self.to_rgb = nn.Conv2d(widths[-1], 3, 3, padding=1)
        for m in self.modules():  # variance-preserving start (the default init shrinks the signal layer by layer)
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, a=0.2, nonlinearity="leaky_relu")
                nn.init.zeros_(m.bias)
        nn.init.normal_(self.to_rgb.weight, std=1e-3)

    def _latent_base(self) -> torch.Tensor:
        return self.latent_mean

    def _noise_scale(self) -> torch.Tensor:
        return self.latent_scale.repeat_interleave(BUILTIN_LATENT_SHAPE[1] * BUILTIN_LATENT_SHAPE[2])

    @staticmethod
    def encode(encoder: nn.Module, images: torch.Tensor) -> torch.Tensor:
        """Latent ``(n, 8192)`` of RGB [0, 1] images ``(n, 3, 64, 64)`` through the hed-vgg16 encoder."""
        x = encoder(images, ["conv4_3"])["conv4_3"]
        return F.max_pool2d(F.relu(x), 2, 2, ceil_mode=True).flatten(1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        if z.ndim != 2 or z.shape[1] != self.latent_dim:
            raise ValueError(f"latent must be (n, {self.latent_dim}), got {tuple(z.shape)}")
        x = z.reshape(-1, *BUILTIN_LATENT_SHAPE) / self.latent_scale.view(1, -1, 1, 1)
        return torch.sigmoid(self.to_rgb(self.stages(self.stem(x))))


def load_builtin_generator(path: str | Path | None = None, sha256: str | None = None) -> BuiltinGenerator:
    """The shipped ``BuiltinGenerator`` (float16 file) as float32, checked against ``BUILTIN_SHA256``.

    For a retrained file elsewhere pass its ``path`` and ``sha256`` (``""`` skips the check).
    """
    path = Path(path) if path is not None else BUILTIN_WEIGHTS
    expected = BUILTIN_SHA256 if sha256 is None else sha256
    fix = "reinstall brainrecon, or retrain it with scripts/train_generator.py"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: the builtin generator's weights are missing; {fix}")
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if expected and digest != expected:
        raise ValueError(f"{path} has sha256 {digest}, the shipped file has {expected}: it is damaged or was "
                         f"replaced; {fix} (a retrained file needs BUILTIN_SHA256 updated in {Path(__file__).name})")
    state = _load_state(path, "the builtin generator", fix)
    net = BuiltinGenerator()
    own = net.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    wrong = [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or wrong:
        raise ValueError(f"{path} does not match this version's builtin generator (missing {_shown(missing)}; "
                         f"unexpected {_shown(unexpected)}; other shapes {_shown(wrong)}); {fix}")
    net.load_state_dict({k: v.float() for k, v in state.items()})
    return net.eval().requires_grad_(False)


def load_generator(spec: str = "builtin") -> ImageGenerator:
    """Build a generator from its spec.

    ``builtin``: the generator shipped with the package (64x64 output; ``BuiltinGenerator``).
    ``relu7:PATH``: the lab's ``generator_relu7.pt`` (256x256 output), with its latent bounds read from
    ``<dir of PATH>/act_range/3x/relu7.txt``.
    """
    if spec == "builtin":
        return load_builtin_generator()
    kind, sep, path = spec.partition(":")
    if kind == "relu7" and sep and path:
        bounds = relu7_bounds_path(path)  # fail before reading 200 MB of weights
        return load_relu7_generator(path).set_bounds(load_latent_bounds(bounds))
    raise ValueError(f"unknown generator {spec!r}; available: {', '.join(GENERATORS)}")
