"""Report comparing variants of a run (ROIs, layer sets, priors) side by side."""
from __future__ import annotations

import html
from pathlib import Path

import numpy as np
from PIL import Image

from ..cache import write_text
from ..runfolder import RunFolder
from ..data.stimuli import load_stimulus_set
from .html import CSS, figure_data_uri, image_grid


def _load_png(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.float32).transpose(2, 0, 1) / 255.0


def accuracy_figure(results: dict[str, dict], x_axis: str) -> str:
    """Pixel identification per test set against the variants (in order)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results)
    sets = list(next(iter(results.values())))
    fig, ax = plt.subplots(figsize=(1.2 + 0.9 * len(names), 3.4))
    for s in sets:
        ax.plot(range(len(names)), [results[v][s]["pixel_identification"] for v in names], "o-", label=s)
    ax.axhline(0.5, color="#999", lw=0.8, ls="--")
    ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
    ax.set_xlabel(x_axis)
    ax.set_ylabel("pixel identification")
    ax.set_ylim(0.3, 1.0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return figure_data_uri(fig)


def _imagery_table(results: dict[str, dict], names: list[str], sets: list[str]) -> str:
    """Within-family pixel identification of the imagery sets per variant (the paper's ROI analysis of imagery)."""
    cols = [(s, f) for s in sets for f in results[names[0]][s].get("imagery", {}).get("families", {})]
    if not cols:
        return ""
    head = "".join(f"<th>{html.escape(s)}: {html.escape(f)}</th>" for s, f in cols)
    rows = "".join(f"<tr><td>{html.escape(v)}</td>" + "".join(
        f"<td>{results[v][s]['imagery']['families'][f]['pixel_identification']:.1%}</td>" for s, f in cols) + "</tr>"
        for v in names)
    return (f"<table><tr><th>variant</th>{head}</tr>{rows}</table><p class='sub'>Imagery: pixel identification "
            "within each family of targets (imagined shapes among the shapes, natural images among the natural "
            "ones; chance 50%).</p>")


def write_comparison_report(path: Path, title: str, results: dict[str, dict], folders: dict[str, Path],
                            images_dir: Path, x_axis: str | None = None) -> None:
    """``results`` {variant: metrics}; reconstructions read from ``folders[variant]/recon/<set>/``."""
    names = list(results)
    sets = list(next(iter(results.values())))
    head = "".join(f"<th>{html.escape(s)}</th>" for s in sets)
    best = {s: max(names, key=lambda v: results[v][s]["pixel_identification"]) for s in sets}
    rows = []
    for v in names:
        cells = "".join((f"<td class='big'>" if best[s] == v else "<td>") +
                        f"{results[v][s]['pixel_identification']:.1%}</td>" for s in sets)
        rows.append(f"<tr><td>{html.escape(v)}</td>{cells}<td>{np.mean([results[v][s]['pixel_identification'] for s in sets]):.1%}</td></tr>")
    table = (f"<table><tr><th>variant</th>{head}<th>mean</th></tr>{''.join(rows)}</table>"
             "<p class='sub'>Pixel-correlation pairwise identification of the reconstructions from decoded features "
             "(chance 50%); the best per test set in bold. Each variant's own report is in its folder.</p>")
    table += _imagery_table(results, names, sets)
    figure = f"<img src='{accuracy_figure(results, x_axis)}'>" if x_axis else ""
    sections = []
    for s in sets:
        labels = list(results[names[0]][s]["per_image_pixel_identification"])
        recons = {v: np.stack([_load_png(RunFolder(folders[v]).recon_png(s, lab)) for lab in labels]) for v in names}
        size = next(iter(recons.values())).shape[-1]
        stimuli = load_stimulus_set(s, images_dir, labels, size).images
        sections.append(f"<h2>{html.escape(s)}</h2>" + image_grid([("stimulus", stimuli)] + list(recons.items()), labels))
    links = "".join(f"<li><a href='{html.escape(str(Path(folders[v]).name))}/report.html'>{html.escape(v)}</a></li>"
                    for v in names)
    doc = f"""<!doctype html><html><head><meta charset="utf-8"><title>{html.escape(title)}</title><style>{CSS}</style></head><body>
<h1>{html.escape(title)}</h1>
{table}{figure}
{''.join(sections)}
<h2>Reports of the variants</h2><ul>{links}</ul>
</body></html>"""
    write_text(path, doc)
