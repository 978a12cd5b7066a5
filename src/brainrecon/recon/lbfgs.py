"""L-BFGS-B on pixels with box bounds (``prior="lbfgs"``), the paper's other pixel-space variant.

The batch's pixels (RGB, 0-255) form one vector of n*3*size*size bounded variables started from the
mean colour; scipy drives the optimisation, torch computes the summed loss and its gradient (float64
at the scipy boundary: one host copy of the image and the gradient per evaluation). One iteration
may take several evaluations (line search): ``evaluations`` counts them, capped by
``lbfgs.max_evals``. Convergence tolerances are zero, so it runs ``iterations`` iterations unless the
line search fails. A resumed run restarts the optimiser (its curvature memory is not saved) from
the saved image, for the remaining iterations.
"""
from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from scipy.optimize import Bounds, minimize

from .base import PIXEL_MEAN, Prior


class PixelLBFGS(Prior):
    state_names = ("x",)

    def __init__(self, loss, size, cfg, streams, device):
        super().__init__(loss, size, cfg, streams, device)
        mean = torch.tensor(PIXEL_MEAN, dtype=torch.float64).view(1, 3, 1, 1)
        self.x = mean.expand(self.n, 3, size, size).clone()   # (n, 3, size, size) float64 on the CPU, 0-255
        self.evaluations = 0

    def images(self) -> torch.Tensor:
        return (self.x / 255.0).float().to(self.device)

    def _fun(self, flat: np.ndarray) -> tuple[float, np.ndarray]:
        x = torch.from_numpy(flat).view(self.x.shape).to(self.device, torch.float32).requires_grad_(True)
        loss = self.loss(x / 255.0).sum()
        (grad,) = torch.autograd.grad(loss, x)
        self.evaluations += 1
        return float(loss.detach()), grad.to("cpu", torch.float64).numpy().ravel()

    def run(self, start: int, on_iteration: Callable[[int], None]) -> None:
        remaining = self.cfg.iterations - start
        if remaining <= 0:
            return
        done = start

        def callback(intermediate_result):
            nonlocal done
            self.x = torch.from_numpy(intermediate_result.x.copy()).view(self.x.shape)
            done += 1
            on_iteration(done)

        max_evals = self.cfg.lbfgs.max_evals or 4 * remaining + 20
        res = minimize(self._fun, self.x.numpy().ravel(), jac=True, method="L-BFGS-B", bounds=Bounds(0.0, 255.0),
                       callback=callback, options={"maxiter": remaining, "maxfun": max_evals,
                                                   "maxcor": self.cfg.lbfgs.memory, "ftol": 0.0, "gtol": 0.0})
        self.x = torch.from_numpy(res.x.copy()).view(self.x.shape)
        self.result = res
