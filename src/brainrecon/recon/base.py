"""What every prior shares: random streams, schedules, and the step/run/state interface."""
from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from .config import ReconConfig
from .objective import FeatureLoss

# mean colour of the network input space, RGB 0-255 (the Caffe ImageNet mean)
PIXEL_MEAN = (123.68, 116.779, 103.939)


def linear_schedule(start: float, end: float, n: int) -> np.ndarray:
    return np.linspace(start, end, n) if n > 1 else np.array([start])


class Streams:
    """Random streams of one batch: ``cpu`` for start values (the same on every device) and
    ``device`` for draws during the optimisation (the same object on the CPU)."""

    def __init__(self, seed: int, device: torch.device):
        self.cpu = torch.Generator().manual_seed(seed)
        self.device = self.cpu if device.type == "cpu" else torch.Generator(device=device).manual_seed(seed)

    def state_dict(self) -> dict:
        return {"cpu": self.cpu.get_state(), "device": self.device.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.cpu.set_state(state["cpu"])
        self.device.set_state(state["device"])


class Prior:
    """One batch's optimisation: ``step(it)`` advances it, ``images()`` gives (n, 3, size, size) in [0, 1].

    Subclasses set their tensors in ``__init__`` and list the names of the ones that make up the
    state in ``state_names`` (tensors or modules/optimisers with ``state_dict``).
    """
    state_names: tuple[str, ...] = ()

    def __init__(self, loss: FeatureLoss, size: int, cfg: ReconConfig, streams: Streams, device: torch.device):
        self.loss, self.size, self.cfg, self.streams, self.device = loss, size, cfg, streams, device
        self.n = loss.n

    def step(self, it: int) -> None:
        raise NotImplementedError

    def images(self) -> torch.Tensor:
        raise NotImplementedError

    def run(self, start: int, on_iteration: Callable[[int], None]) -> None:
        """Steps ``start`` ... ``iterations - 1``, calling ``on_iteration(done)`` after each."""
        for it in range(start, self.cfg.iterations):
            self.step(it)
            on_iteration(it + 1)

    def state_dict(self) -> dict:
        out = {}
        for name in self.state_names:
            v = getattr(self, name)
            out[name] = v.detach().clone() if isinstance(v, torch.Tensor) else v.state_dict()
        return out

    def load_state_dict(self, state: dict) -> None:
        for name in self.state_names:
            v = getattr(self, name)
            if isinstance(v, torch.Tensor):
                with torch.no_grad():
                    v.copy_(state[name].to(v.device))
            else:
                v.load_state_dict(state[name])
