"""How sure the robustness table's differences are: each cell against the defaults, paired by image.

For every cell of ``bench/robustness.py`` and every subject where both it and the defaults' cell
finished, each test image's pixel identification (metrics.json ``per_image_pixel_identification``)
under the cell minus under the defaults; the statistic is the table's: mean over images, then over
the sets (equal weight), then over the subjects. Its 95% interval resamples the images within every
subject and set (paired bootstrap). With ``--write`` the table goes to docs/robustness.md.

    python bench/robustness_paired.py --write
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from robustness import write_between  # noqa: E402 - bench/ is the script's folder

SETS = ("natural", "shapes", "letters")


def per_image(run: Path, sets: tuple[str, ...]) -> dict[str, dict[str, float]] | None:
    """{set: {image: identification}} of a finished run folder, or None."""
    path = run / "metrics.json"
    if not path.exists():
        return None
    metrics = json.loads(path.read_text())
    return {s: metrics[s]["per_image_pixel_identification"] for s in sets}


def paired(base: list[dict], other: list[dict], sets: tuple[str, ...], n_boot: int, seed: int
           ) -> tuple[float, float, float]:
    """(difference, 2.5th, 97.5th percentile) of other - base over subjects, sets and images."""
    rng = np.random.default_rng(seed)
    diffs = [[np.array([o[s][k] - b[s][k] for k in b[s]]) for s in sets] for b, o in zip(base, other)]
    stat = np.mean([np.mean([d.mean() for d in subject]) for subject in diffs])
    boots = [np.mean([np.mean([d[rng.integers(0, len(d), len(d))].mean() for d in subject])
                      for subject in diffs]) for _ in range(n_boot)]
    lo, hi = np.percentile(boots, [2.5, 97.5])
    return float(stat), float(lo), float(hi)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", type=Path, default=Path("bench_out/robustness"))
    ap.add_argument("--subjects", default="css-vgg:0,css-vgg:1,dn-stats:0,dn-stats:1")
    ap.add_argument("--defaults", default="decoder kernel", help="the cell the others are compared with")
    ap.add_argument("--cells", default="decoder banded,decoder channel_selection,decoder selection,"
                                       "prior lbfgs,prior fourier,prior dip,prior generator")
    ap.add_argument("--n-bootstrap", type=int, default=4000)
    ap.add_argument("--write", action="store_true", help="write the table to docs/robustness.md")
    args = ap.parse_args()
    subjects = [s for s in args.subjects.split(",") if s]

    def run(spec: str, cell: str) -> Path:
        return args.work / "runs" / spec.replace(":", "-") / cell.replace(" ", "-")

    lines = [f"| cell against the defaults ({args.defaults}) | subjects | difference (points) | 95% interval |",
             "|---|---|---|---|"]
    for cell in [c for c in args.cells.split(",") if c]:
        pairs = [(per_image(run(s, args.defaults), SETS), per_image(run(s, cell), SETS), s) for s in subjects]
        pairs = [p for p in pairs if p[0] is not None and p[1] is not None]
        if not pairs:
            continue
        diff, lo, hi = paired([p[0] for p in pairs], [p[1] for p in pairs], SETS, args.n_bootstrap, seed=0)
        lines.append(f"| {cell} | {', '.join(p[2] for p in pairs)} | {100 * diff:+.2f} | "
                     f"[{100 * lo:+.2f}, {100 * hi:+.2f}] |")
    table = "\n".join(lines) + "\n"
    print(table)
    if args.write:
        write_between(Path(__file__).resolve().parents[1] / "docs" / "robustness.md", "robustness paired", table)


if __name__ == "__main__":
    main()
