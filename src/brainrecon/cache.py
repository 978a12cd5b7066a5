"""Files of a run folder's cache: written atomically, read back tolerantly.

Every cache file (training statistics, decoded features, reconstructions, decoding tasks) is
written to a temporary name in its folder and renamed into place, so an interrupted run never
leaves a half-written file under a final name. A cache file that cannot be read back (damaged
disk, a copy cut short, a file from an incompatible release) is treated as absent: it is moved
aside with a warning and its result computed again, never a fatal error.
"""
from __future__ import annotations

import json
import os
import tempfile
import warnings
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

T = TypeVar("T")
Warn = Callable[[str], None]


@contextmanager
def atomic_path(path: str | os.PathLike):
    """Yield a temporary path beside ``path``; rename it onto ``path`` if the block succeeds.

    The temporary file keeps ``path``'s suffix (``.npz``, ``.h5``) so that writers that add or check
    suffixes behave; on any error (Ctrl-C included) it is removed and ``path`` is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=f".tmp{path.suffix}", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_npy(path: str | os.PathLike, array: np.ndarray) -> None:
    """``np.save`` to ``path`` atomically."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.save(f, array)


def save_npz(path: str | os.PathLike, **arrays: np.ndarray) -> None:
    """``np.savez`` to ``path`` atomically."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, **arrays)


def write_text(path: str | os.PathLike, text: str) -> None:
    """Write a text file (JSON, HTML) atomically: readers see the old file or the new one, never half."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json(path: str | os.PathLike, data: Any) -> None:
    """``json.dumps(data, indent=2)`` to ``path`` atomically."""
    write_text(path, json.dumps(data, indent=2))


def _default_warn(message: str) -> None:
    warnings.warn(message, stacklevel=3)


def load_or_none(path: str | os.PathLike, loader: Callable[[Path], T], warn: Warn | None = None) -> T | None:
    """``loader(path)``, or None if the file is absent or cannot be read.

    An unreadable file is renamed to ``<name>.damaged`` (kept for inspection, out of the way of the
    next write) and ``warn`` is told which file and why; the caller then computes the result again.
    """
    path = Path(path)
    if not path.exists():
        return None
    try:
        return loader(path)
    except Exception as err:  # noqa: BLE001 - numpy, zipfile, h5py and json each raise their own types
        damaged = path.with_name(path.name + ".damaged")
        try:
            os.replace(path, damaged)
            where = f"moved to {damaged.name}"
        except OSError:
            where = "left in place"
        (warn or _default_warn)(f"warning: cache file {path} is unreadable ({type(err).__name__}: {err}); "
                                f"{where}, computing it again")
        return None


def load_npz(path: Path) -> dict[str, np.ndarray]:
    """Every array of an ``.npz`` file, read now (so a damaged member fails here, not later)."""
    with np.load(path) as z:
        return {k: z[k] for k in z.files}


def load_npy(path: Path) -> np.ndarray:
    """An ``.npy`` array (not memory-mapped: a damaged file fails here)."""
    return np.load(path, allow_pickle=False)
