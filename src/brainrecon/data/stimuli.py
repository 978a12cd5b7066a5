"""Stimulus sets: natural images from scikit-image, the paper's shapes and letters, image folders.

Images are ``(n, 3, H, W)`` float32 RGB in [0, 1] (the package-wide convention).
"""
from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".gif", ".webp")
BACKGROUND = 0.5  # mid grey, the background of the artificial stimuli

SHAPE_COLOURS = {
    "red": (1, 0, 0), "green": (0, 1, 0), "blue": (0, 0, 1), "cyan": (0, 1, 1),
    "magenta": (1, 0, 1), "yellow": (1, 1, 0), "white": (1, 1, 1), "black": (0, 0, 0),
}
SHAPES = ("square", "small_frame", "large_frame", "plus", "cross")
LETTERS = tuple("ACEINORSTU")


class StimulusError(ValueError):
    """An image file that cannot be read; the message names the file and the fix."""


@dataclass
class StimulusSet:
    """Named images: ``images`` (n, 3, H, W) float32 in [0, 1], ``labels`` (n,)."""
    name: str
    labels: list[str]
    images: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)

    @cached_property
    def identity(self) -> str:
        """Digest of the images' pixels (a cache key of what was computed from them)."""
        return hashlib.sha256(np.ascontiguousarray(self.images, np.float32).tobytes()).hexdigest()[:16]


@dataclass
class Stimuli:
    """Image files of labels, loaded on demand at the size a stage needs (:func:`load_images`).

    ``labels`` (unique, in order of first appearance), ``paths`` {label: file}.
    """
    labels: list[str]
    paths: dict[str, Path]

    def __len__(self) -> int:
        return len(self.labels)

    def load(self, size: int) -> StimulusSet:
        """The images as a :class:`StimulusSet` (n, 3, size, size), centre-cropped to a square."""
        return StimulusSet("images", list(self.labels), np.stack([load_image(self.paths[lab], size) for lab in self.labels]))

    @property
    def identity(self) -> str:
        """Digest of the files used (path, size, modification time): changes when an image changes."""
        h = hashlib.sha256()
        for lab in self.labels:
            st = self.paths[lab].stat()
            h.update(f"{lab}|{self.paths[lab].resolve()}|{st.st_size}|{st.st_mtime_ns}\n".encode())
        return h.hexdigest()[:16]


def load_images(directory: str | Path, labels, size: int | None = None) -> Stimuli | StimulusSet:
    """The stimulus image of each label in ``directory`` (found by file stem, subfolders included).

    Parameters
    ----------
    directory : path
        Folder of images named ``<label>.<ext>`` (any common extension and case).
    labels : sequence of str
        Labels, e.g. an ``FmriData``'s per-sample labels; repeats are dropped (first appearance kept).
    size : int, optional
        Load now at this size and return a :class:`StimulusSet` (n, 3, size, size); default a
        :class:`Stimuli` that each stage loads at its own size.
    """
    labels = list(dict.fromkeys(labels))
    stimuli = Stimuli(labels, find_images(Path(directory), labels))
    return stimuli if size is None else stimuli.load(size)


def _shape_mask(shape: str, size: int) -> np.ndarray:
    """Boolean (size, size) mask of one of the paper's five shapes."""
    yy, xx = np.mgrid[0:size, 0:size] + 0.5
    c = size / 2
    dx, dy = np.abs(xx - c), np.abs(yy - c)
    half, bar = 0.3 * size, 0.075 * size
    if shape == "square":
        return (dx < half) & (dy < half)
    if shape == "small_frame":
        h = 0.2 * size
        return (np.maximum(dx, dy) < h) & (np.maximum(dx, dy) >= h - bar)
    if shape == "large_frame":
        h = 0.4 * size
        return (np.maximum(dx, dy) < h) & (np.maximum(dx, dy) >= h - bar)
    if shape == "plus":
        return ((dx < bar) & (dy < half + bar)) | ((dy < bar) & (dx < half + bar))
    if shape == "cross":
        u, v = (xx - c + yy - c) / np.sqrt(2), (xx - c - (yy - c)) / np.sqrt(2)
        return ((np.abs(u) < bar) & (np.abs(v) < half + bar)) | ((np.abs(v) < bar) & (np.abs(u) < half + bar))
    raise ValueError(f"unknown shape {shape!r}")


def shapes(size: int) -> StimulusSet:
    """The 40 artificial shapes (5 shapes x 8 colours) on mid grey, labels ``<shape>_<colour>``."""
    labels, images = [], []
    for shape in SHAPES:
        mask = _shape_mask(shape, size)
        for colour, rgb in SHAPE_COLOURS.items():
            img = np.full((3, size, size), BACKGROUND, np.float32)
            for ch in range(3):
                img[ch][mask] = rgb[ch]
            labels.append(f"{shape}_{colour}")
            images.append(img)
    return StimulusSet("shapes", labels, np.stack(images))


def letters(size: int) -> StimulusSet:
    """The 10 black letters A C E I N O R S T U on mid grey, labels ``letter_<X>``."""
    big = 4 * size  # draw large, then downsample with antialiasing
    font = ImageFont.load_default(size=int(0.8 * big))
    images = []
    for letter in LETTERS:
        canvas = Image.new("L", (big, big), int(BACKGROUND * 255))
        draw = ImageDraw.Draw(canvas)
        left, top, right, bottom = draw.textbbox((0, 0), letter, font=font)
        draw.text(((big - (right - left)) / 2 - left, (big - (bottom - top)) / 2 - top), letter, fill=0, font=font,
                  stroke_width=big // 40, stroke_fill=0)
        grey = np.asarray(canvas.resize((size, size), Image.LANCZOS), np.float32) / 255.0
        images.append(np.repeat(grey[None], 3, axis=0))
    return StimulusSet("letters", [f"letter_{c}" for c in LETTERS], np.stack(images))


def resize(image: np.ndarray, size: int) -> np.ndarray:
    """(H, W, 3) float [0, 1] -> (3, size, size) float32 with antialiasing."""
    pil = Image.fromarray((np.clip(image, 0, 1) * 255).round().astype(np.uint8))
    return np.asarray(pil.resize((size, size), Image.LANCZOS), np.float32).transpose(2, 0, 1) / 255.0


def to_rgb(array: np.ndarray) -> np.ndarray:
    """Any skimage/PIL array (grey, bool, RGBA, uint8, float) -> (H, W, 3) float32 in [0, 1]."""
    a = np.asarray(array)
    if a.dtype == bool:
        a = a.astype(np.float32)
    elif a.dtype == np.uint8:
        a = a.astype(np.float32) / 255.0
    else:
        a = a.astype(np.float32)
        a = (a - a.min()) / max(float(a.max() - a.min()), 1e-8)
    if a.ndim == 2:
        a = np.repeat(a[..., None], 3, axis=2)
    return np.ascontiguousarray(a[..., :3])


def load_image(path: Path, size: int) -> np.ndarray:
    """An image file -> (3, size, size) float32 RGB; grey, palette and CMYK images are converted.

    Raises :class:`StimulusError` naming the file if it is not a readable image (truncated, corrupt).
    """
    try:
        with Image.open(path) as im:
            rgb = im.convert("RGB")
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        raise StimulusError(f"{path}: not a readable image ({type(err).__name__}: {err}); the file is damaged "
                            "or cut short: replace it with a valid image file") from None
    w, h = rgb.size
    side = min(w, h)  # centre square crop, as the paper's stimuli are square
    rgb = rgb.crop(((w - side) // 2, (h - side) // 2, (w - side) // 2 + side, (h - side) // 2 + side))
    return np.asarray(rgb.resize((size, size), Image.LANCZOS), np.float32).transpose(2, 0, 1) / 255.0


def png_bytes(image: np.ndarray) -> bytes:
    """(3, H, W) float RGB in [0, 1] -> PNG file bytes (8 bits per channel)."""
    buf = io.BytesIO()
    Image.fromarray((np.clip(image, 0, 1).transpose(1, 2, 0) * 255).round().astype(np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def find_images(directory: Path, labels: list[str]) -> dict[str, Path]:
    """Map each label to ``directory/<label>.<ext>`` (any common extension, any case).

    Raises ``FileNotFoundError`` naming the labels that have no image.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"image folder {directory} does not exist; pass the folder that holds the stimulus images")
    by_stem: dict[str, Path] = {}
    for p in sorted(directory.rglob("*")):
        if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file():
            by_stem.setdefault(p.stem, p)
    missing = [lab for lab in dict.fromkeys(labels) if lab not in by_stem]
    if missing:
        shown = ", ".join(missing[:10]) + (f" and {len(missing) - 10} more" if len(missing) > 10 else "")
        raise FileNotFoundError(
            f"{len(missing)} stimulus label(s) have no image in {directory}: {shown}. "
            f"Each label needs a file named <label>.png/.jpg/.JPEG/... (searched {len(by_stem)} images, "
            "subfolders included).")
    return {lab: by_stem[lab] for lab in labels}


def load_stimulus_set(name: str, directory: Path, labels: list[str], size: int) -> StimulusSet:
    """Load the images of ``labels`` (unique, in order) from ``directory``."""
    loaded = Stimuli(list(labels), find_images(directory, labels)).load(size)
    return StimulusSet(name, loaded.labels, loaded.images)
