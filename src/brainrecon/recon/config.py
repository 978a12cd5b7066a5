"""Reconstruction settings: one pydantic model shared by every prior."""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

PRIORS = ("gd", "lbfgs", "generator", "fourier", "dip")


class ReconConfig(BaseModel):
    """Reconstruction settings.

    ``prior`` picks what is optimised; ``iterations`` is the number of optimisation steps for
    every prior (L-BFGS: scipy's ``maxiter``). Fields prefixed ``lbfgs_``, ``latent_``/``generator_``,
    ``fourier_``, ``dip_`` belong to that prior; the gradient-descent fields (``lr_*``, ``momentum``)
    serve ``gd`` and ``generator``. Blur sizes are in pixels at ``blur_reference_size`` (224 px),
    scaled to the image size; so are the augmentation shifts. Unknown fields are refused.
    """
    model_config = ConfigDict(extra="forbid")

    prior: Literal["gd", "lbfgs", "generator", "fourier", "dip"] = "gd"
    iterations: int = Field(200, ge=1)
    # gradient descent on pixels ("gd", the paper's default) and on the latent ("generator")
    lr_start: float = 2.0
    lr_end: float = 1e-10
    momentum: float = 0.9
    decay_start: float = 0.2       # pixel decay towards the mean colour ("gd")
    decay_end: float = 1e-10
    blur_start: float = 2.0        # Gaussian blur sigma every step ("gd")
    blur_end: float = 0.5
    blur_reference_size: int = 224
    init: str = "noise"            # "gd" start image: "noise" (uniform 0-255) or "mean" (the mean colour)
    chroma_blur: float = 0.0       # "gd": extra Gaussian blur (pixels) of the colour-opponent channels only
    # L-BFGS-B on pixels in [0, 255], started from the mean colour
    lbfgs_memory: int = 10         # stored correction pairs (scipy's maxcor)
    lbfgs_max_evals: int = 0       # cap on loss+gradient evaluations of the batch; 0: 4 per iteration + 20
    # latent of a generator module (the paper's DGN condition)
    latent_decay: float = 0.01     # latent shrinks by this fraction every step
    generator_crop: int | None = None  # centre-crop the generator output to this size first (224 for the 256-px DGN)
    # Fourier-space image with decorrelated colour, optimised with Adam under random transforms
    fourier_lr: float = 0.1
    fourier_decay_power: float = 1.0   # spectrum scaled by 1 / f**power
    fourier_init_std: float = 0.01
    fourier_sigmoid: bool = True       # sigmoid (else clamp of 0.5 + x) onto [0, 1]
    fourier_decorrelate: bool = True   # parametrise in ImageNet's decorrelated colour space
    # deep image prior: an untrained convolutional decoder per image, its weights optimised with Adam
    dip_lr: float = 0.01
    dip_channels: int = 32             # feature channels of every decoder layer
    dip_levels: int = 4                # 2x upsampling stages from the fixed noise input
    dip_input_channels: int = 16       # channels of the fixed noise input at size / 2**levels
    dip_input_noise: float = 0.0       # SD of fresh noise added to the input every step (0: fixed input)
    # random transforms applied before the network each step ("fourier"; "dip" with dip_augment)
    augment_jitter: float = 8.0        # shift, uniform in +-pixels (at 224 px)
    augment_scale: float = 0.1         # scale factor, uniform in 1 +- this
    augment_rotate: float = 10.0       # rotation, uniform in +- degrees
    dip_augment: bool = False
    # execution
    batch_size: int = Field(16, ge=1)
    seed: int = 0
    device: str = "cpu"                # torch device of the optimisation ("cpu", "cuda", "cuda:1")
    checkpoint_every: int = Field(20, ge=1)  # iterations between checkpoints (with reconstruct(checkpoint=...))
    snapshots: list[int] = []          # iterations whose images are kept (0: the start image)
    layer_scale: dict[str, float] = {}  # extra per-layer weight multipliers (default 1)
