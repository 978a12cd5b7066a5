"""Checkpoints of a reconstruction: one file per batch, written atomically (temporary file, then rename).

A checkpoint holds the batch's optimisation state, the iterations done, its random-stream states,
the snapshots so far, and a key that fingerprints the problem (settings, targets, network and
generator weights); a checkpoint whose key differs from the current problem's is ignored.
"""
from __future__ import annotations

import hashlib
import os
import warnings
from pathlib import Path

import torch

from .config import ReconConfig


def batch_path(checkpoint: str | os.PathLike, batch: int) -> Path:
    """``FOLDER/batch0003.pt`` for an existing folder (or a path ending in '/'), else ``PREFIX.batch0003.pt``."""
    s = os.fspath(checkpoint)
    if s.endswith(("/", os.sep)) or Path(s).is_dir():
        return Path(s) / f"batch{batch:04d}.pt"
    return Path(f"{s}.batch{batch:04d}.pt")


def _update(h, t: torch.Tensor) -> None:
    t = t.detach().to("cpu").contiguous()
    h.update(f"{t.dtype}{tuple(t.shape)}".encode())
    h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")


def fingerprint(cfg: ReconConfig, size: int, modules: list[torch.nn.Module],
                tensors: dict[str, torch.Tensor] | None = None) -> str:
    """Digest of the settings that decide the result (:meth:`ReconConfig.result_json`), size, module tensors (weights,
    buffers) and other named tensors of the problem (e.g. the loss's unit weights)."""
    h = hashlib.blake2b(digest_size=16)
    h.update(cfg.result_json().encode())
    h.update(str(size).encode())
    for m in modules:
        for v in list(m.parameters()) + list(m.buffers()):
            _update(h, v)
    for k, v in sorted((tensors or {}).items()):
        h.update(k.encode())
        _update(h, v)
    return h.hexdigest()


def batch_key(base: str, batch: int, targets: dict[str, torch.Tensor]) -> str:
    """Digest of a batch: the run's fingerprint, the batch index and its targets."""
    h = hashlib.blake2b(f"{base}/{batch}".encode(), digest_size=16)
    for k, v in targets.items():
        h.update(k.encode())
        _update(h, v)
    return h.hexdigest()


def save(path: Path, state: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load(path: Path, key: str, warn=None) -> dict | None:
    """The state saved at ``path`` (tensors on the CPU) if it exists and has ``key``, else None (with a warning,
    through ``warn`` or :func:`warnings.warn`, if a file is there but unreadable or from another problem: it is
    overwritten by the next save)."""
    warn = warn or warnings.warn
    if not path.exists():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - a damaged file (torch raises several types): start again
        warn(f"  warning: ignoring unreadable checkpoint {path} ({type(err).__name__}: {err}); starting the batch again")
        return None
    if not isinstance(state, dict) or state.get("key") != key:
        warn(f"  warning: ignoring checkpoint {path}: it belongs to different settings, targets or weights")
        return None
    return state
