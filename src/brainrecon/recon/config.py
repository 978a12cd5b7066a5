"""Reconstruction settings: the shared fields and one sub-model per prior.

``ReconConfig(prior="fourier", iterations=200, fourier=FourierSettings(lr=0.05))``: ``prior`` picks
what is optimised and only that prior's sub-model (plus ``augment`` for the priors that use random
transforms) decides the result; :meth:`ReconConfig.result_json` is that part, the key of cached
reconstructions. Unknown fields are refused; a key of the former flat layout (``fourier_lr``) is
refused with its new place (``recon.fourier.lr``).
"""
from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

PRIORS = ("gd", "lbfgs", "generator", "fourier", "dip")


class _Settings(BaseModel):
    model_config = ConfigDict(extra="forbid")


class GdSettings(_Settings):
    """Gradient descent on pixels (``prior="gd"``, the paper's default): momentum steps along the
    gradient normalised by its mean absolute value, decay towards the mean colour, Gaussian blur."""
    lr_start: float = Field(2.0, description="learning rate at the first iteration (linear schedule)")
    lr_end: float = Field(1e-10, description="learning rate at the last iteration")
    momentum: float = Field(0.9, description="momentum of the gradient steps")
    decay_start: float = Field(0.2, description="pixel decay towards the mean colour at the first iteration")
    decay_end: float = Field(1e-10, description="pixel decay at the last iteration")
    blur_start: float = Field(2.0, description="Gaussian blur sigma (pixels at reference_size) at the first iteration")
    blur_end: float = Field(0.5, description="Gaussian blur sigma at the last iteration")
    init: Literal["noise", "mean"] = Field("noise", description="start image: noise (uniform 0-255) or mean "
                                                                "(the mean colour)")
    chroma_blur: float = Field(0.0, ge=0, description="extra Gaussian blur (pixels) of the colour-opponent "
                                                      "channels only, every step")


class LbfgsSettings(_Settings):
    """L-BFGS-B on pixels in [0, 255] (``prior="lbfgs"``), started from the mean colour."""
    memory: int = Field(10, ge=1, description="stored correction pairs (scipy's maxcor)")
    max_evals: int = Field(0, ge=0, description="cap on loss+gradient evaluations of a batch; 0: 4 per "
                                                "iteration + 20")


class GeneratorSettings(_Settings):
    """Gradient descent on the latent of a generator module (``prior="generator"``, the paper's DGN)."""
    lr_start: float = Field(2.0, description="learning rate at the first iteration (linear schedule)")
    lr_end: float = Field(1e-10, description="learning rate at the last iteration")
    momentum: float = Field(0.9, description="momentum of the latent steps")
    decay: float = Field(0.01, description="the latent shrinks by this fraction every step")
    crop: int | None = Field(None, ge=1, description="centre-crop the generator output to this size first "
                                                     "(224 for the 256-px DGN)")


class FourierSettings(_Settings):
    """A Fourier-space image with decorrelated colour, optimised with Adam under random transforms
    (``prior="fourier"``)."""
    lr: float = Field(0.1, gt=0, description="Adam learning rate")
    decay_power: float = Field(1.0, description="spectrum scaled by 1 / f**decay_power")
    init_std: float = Field(0.01, ge=0, description="SD of the random start spectrum")
    sigmoid: bool = Field(True, description="map onto [0, 1] by a sigmoid (else a clamp of 0.5 + x)")
    decorrelate: bool = Field(True, description="parametrise in ImageNet's decorrelated colour space")


class DipSettings(_Settings):
    """Deep image prior (``prior="dip"``): an untrained convolutional decoder per image whose weights
    are optimised with Adam."""
    lr: float = Field(0.01, gt=0, description="Adam learning rate")
    channels: int = Field(32, ge=1, description="feature channels of every decoder layer")
    levels: int = Field(4, ge=0, description="2x upsampling stages from the fixed noise input")
    input_channels: int = Field(16, ge=1, description="channels of the fixed noise input at size / 2**levels")
    input_noise: float = Field(0.0, ge=0, description="SD of fresh noise added to the input every step "
                                                      "(0: fixed input)")
    augment: bool = Field(False, description="feed randomly shifted / scaled / rotated images to the network "
                                             "(the augment settings)")


class AugmentSettings(_Settings):
    """Random transforms applied to the image before the network every step (``fourier``; ``dip``
    with ``dip.augment``)."""
    jitter: float = Field(8.0, ge=0, description="shift, uniform in +- pixels (at reference_size)")
    scale: float = Field(0.1, ge=0, description="scale factor, uniform in 1 +- this")
    rotate: float = Field(10.0, ge=0, description="rotation, uniform in +- degrees")


PRIOR_SETTINGS: dict[str, tuple[str, ...]] = {   # the sub-models that decide each prior's result
    "gd": ("gd",), "lbfgs": ("lbfgs",), "generator": ("generator",),
    "fourier": ("fourier", "augment"), "dip": ("dip", "augment"),
}
SUBMODELS = ("gd", "lbfgs", "generator", "fourier", "dip", "augment")
EXECUTION_FIELDS = frozenset({"device", "checkpoint_every"})   # never change a result

# the former flat keys -> their place in the tree (refused with this place named)
FORMER_KEYS = {
    **{k: f"gd.{k}" for k in ("lr_start", "lr_end", "momentum", "decay_start", "decay_end", "blur_start",
                              "blur_end", "init", "chroma_blur")},
    "blur_reference_size": "reference_size",
    "lbfgs_memory": "lbfgs.memory", "lbfgs_max_evals": "lbfgs.max_evals",
    "latent_decay": "generator.decay", "generator_crop": "generator.crop",
    **{f"fourier_{k}": f"fourier.{k}" for k in ("lr", "decay_power", "init_std", "sigmoid", "decorrelate")},
    **{f"dip_{k}": f"dip.{k}" for k in ("lr", "channels", "levels", "input_channels", "input_noise", "augment")},
    **{f"augment_{k}": f"augment.{k}" for k in ("jitter", "scale", "rotate")},
}


class ReconConfig(_Settings):
    """Reconstruction settings.

    ``prior`` picks what is optimised; ``iterations`` is the number of optimisation steps for every
    prior (L-BFGS: scipy's ``maxiter``). Each prior's own settings are a sub-model (``gd``, ``lbfgs``,
    ``generator``, ``fourier``, ``dip``; ``augment`` for the random transforms of ``fourier`` and
    ``dip``). Blur sizes and augmentation shifts are in pixels at ``reference_size`` (224 px), scaled
    to the image size. Unknown fields are refused.
    """
    prior: Literal["gd", "lbfgs", "generator", "fourier", "dip"] = Field(
        "gd", description="reconstruction prior: gd (paper, pixels), lbfgs (paper, pixels), generator (paper's "
                          "DGN: see --generator), fourier, dip")
    iterations: int = Field(200, ge=1, description="reconstruction iterations")
    gd: GdSettings = GdSettings()
    lbfgs: LbfgsSettings = LbfgsSettings()
    generator: GeneratorSettings = GeneratorSettings()
    fourier: FourierSettings = FourierSettings()
    dip: DipSettings = DipSettings()
    augment: AugmentSettings = AugmentSettings()
    reference_size: int = Field(224, ge=1, description="image size (pixels) at which blur sizes and shifts "
                                                       "are given; scaled to the image size")
    batch_size: int = Field(16, ge=1, description="images optimised together")
    seed: int = Field(0, description="random seed of the reconstruction")
    device: str = Field("cpu", description="torch device of the optimisation: cpu, cuda or cuda:N")
    checkpoint_every: int = Field(20, ge=1, description="iterations between checkpoints (with "
                                                        "reconstruct(checkpoint=...))")
    snapshots: list[int] = Field([], description="iterations whose images are kept (0: the start image)")
    layer_scale: dict[str, float] = Field({}, description="LAYER=FACTOR: extra weight multiplier of a layer in "
                                                          "the reconstruction loss (default 1; repeatable)")

    @model_validator(mode="before")
    @classmethod
    def _former_keys(cls, data: Any) -> Any:
        if isinstance(data, dict):
            old = [k for k in data if k in FORMER_KEYS]
            if old:
                moved = ", ".join(f"{k} is now recon.{FORMER_KEYS[k]}" for k in old)
                raise ValueError(f"former reconstruction setting(s): {moved} (e.g. recon: {{"
                                 f"{FORMER_KEYS[old[0]].split('.')[0]}: {{...}}}} in YAML)")
        return data

    @property
    def settings(self) -> BaseModel:
        """The sub-model of the chosen prior (e.g. ``self.fourier`` for ``prior="fourier"``)."""
        return getattr(self, self.prior)

    def result_json(self) -> str:
        """What decides the reconstructions, as JSON: the shared fields (not ``device`` or
        ``checkpoint_every``) and the chosen prior's sub-models only, so that a change of another
        prior's settings keeps them."""
        others = set(SUBMODELS) - set(PRIOR_SETTINGS[self.prior])
        return self.model_dump_json(exclude=others | EXECUTION_FIELDS)
