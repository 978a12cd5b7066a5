"""Label maps: the image stem of each label of a BData file that labels its samples by number.

A label map is a TSV of two columns, label and image stem (``16<TAB>fixation``); lines starting
with ``#`` and blank lines are skipped. The lab's published stimulus TSVs (no header; columns
stimulus name, stimulus id) are accepted as they are: the label column is the one that holds every
label of the file, and image file extensions are dropped from the stems. Labels are compared as
numbers where both sides are numbers (``1``, ``1.0`` and ``1.000000`` are one label).

The map of the DIR imagery experiment ships with the package: ``dir-imagery``
(``data/labels/dir_imagery.tsv``).
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Sequence

from .bdata import BDataError
from .stimuli import IMAGE_EXTENSIONS

BUILTIN_MAPS = {"dir-imagery": "dir_imagery.tsv"}
IMAGERY_COLOURS = ("red", "green", "blue", "white", "black")
IMAGERY_FORMS = ("small_frame", "plus", "cross")          # small ring (open square), "+", "X"
IMAGERY_SHAPES = tuple(f"{form}_{colour}" for colour in IMAGERY_COLOURS for form in IMAGERY_FORMS)  # lab's order
FIXATION_LABEL = "fixation"

LabelKey = float | str


class LabelMapError(BDataError):
    """A label map that cannot be used; the message names the map file and the fix."""


def label_key(label: object) -> LabelKey:
    """A label as compared across files and maps: a finite number as float, anything else as stripped text."""
    if isinstance(label, (int, float)) and math.isfinite(label):
        return float(label)
    text = str(label).strip()
    try:
        value = float(text)
    except ValueError:
        return text
    return value if math.isfinite(value) else text


def format_label(label: LabelKey) -> str:
    """A label key as text: integral numbers without a decimal point (16.0 -> "16")."""
    if isinstance(label, float):
        return str(int(label)) if label.is_integer() else repr(label)
    return label


def _stem(name: str) -> str:
    name = name.strip()
    return name.rsplit(".", 1)[0] if Path(name).suffix.lower() in IMAGE_EXTENSIONS else name


@dataclass(frozen=True)
class LabelMap:
    """The rows of a label map file: ``rows`` [(line number, first column, second column)].

    Which column holds the labels is decided against a file's labels (:meth:`stems`).
    """
    source: str
    rows: tuple[tuple[int, str, str], ...]

    @property
    def identity(self) -> str:
        """Digest of the map's content (a cache key of what was read with it)."""
        return hashlib.sha256(repr(self.rows).encode()).hexdigest()[:16]

    def _column(self, which: int) -> dict[LabelKey, list[int]]:
        lines: dict[LabelKey, list[int]] = {}
        for row in self.rows:
            lines.setdefault(label_key(row[1 + which]), []).append(row[0])
        return lines

    def stems(self, labels: Sequence[object], where: str) -> dict[LabelKey, str] | None:
        """{label key: image stem} for the labels of a file, or None if neither column holds them all.

        ``where`` names the file in messages. Raises :class:`LabelMapError` if the label column
        repeats a label.
        """
        keys = {label_key(x) for x in labels}
        for which in (0, 1):
            column = self._column(which)
            if keys <= set(column):
                twice = {k: v for k, v in column.items() if len(v) > 1}
                if twice:
                    k, lines = next(iter(twice.items()))
                    raise LabelMapError(
                        f"{self.source}: label {format_label(k)} appears on lines {', '.join(map(str, lines))} (and "
                        f"{len(twice) - 1} other label(s) repeat): each label of {where} needs exactly one image "
                        "stem; remove the duplicate lines")
                return {label_key(row[1 + which]): _stem(row[2 - which]) for row in self.rows}
        return None

    def missing(self, labels: Sequence[object]) -> list[LabelKey]:
        """Labels of ``labels`` not in the map (the fewer of the two columns' misses), numbers first, sorted."""
        keys = list(dict.fromkeys(label_key(x) for x in labels))
        misses = [[k for k in keys if k not in self._column(w)] for w in (0, 1)]
        return sorted(min(misses, key=len), key=lambda k: (isinstance(k, str), k))


def builtin_map_path(name: str) -> Path:
    """The file of a label map shipped with the package (``dir-imagery``)."""
    return Path(str(resources.files("brainrecon.data").joinpath("labels", BUILTIN_MAPS[name])))


def read_label_map(spec: str | Path, option: str = "--labels") -> LabelMap:
    """Read a label map: a builtin name (``dir-imagery``) or a TSV file of two columns.

    ``option`` is how the user gave it (named in messages). Raises :class:`LabelMapError` naming
    the file for a missing file, a line without exactly two columns, or a map without rows.
    """
    spec = str(spec)
    path = builtin_map_path(spec) if spec in BUILTIN_MAPS else Path(spec).expanduser()
    if not path.is_file():
        raise LabelMapError(f"{option}: label map {path} does not exist; give a TSV file of two columns (label, image "
                            f"stem) or a builtin map ({', '.join(BUILTIN_MAPS)})")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as err:
        raise LabelMapError(f"{path}: the label map cannot be read ({err}); give a UTF-8 text file of two "
                            "tab-separated columns: label, image stem") from None
    rows = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        cells = [c.strip() for c in (line.split("\t") if "\t" in line else line.split())]
        if len(cells) != 2 or not all(cells):
            raise LabelMapError(f"{path}: line {number} has {len([c for c in cells if c])} column(s) ({line.strip()!r}); "
                                "a label map has two tab-separated columns on every line: label, image stem")
        rows.append((number, cells[0], cells[1]))
    if not rows:
        raise LabelMapError(f"{path}: the label map has no rows; write one line per label: label<TAB>image stem")
    return LabelMap(str(path), tuple(rows))
