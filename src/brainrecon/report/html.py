"""A self-contained HTML report (images embedded as base64 PNG)."""
from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path

import numpy as np

from ..cache import write_text
from ..data.stimuli import png_bytes
from .imagery import imagery_html

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;color:#222}
h1{font-size:1.6em;margin-bottom:.2em} h2{margin-top:1.8em;border-bottom:1px solid #ddd;padding-bottom:.2em}
.sub{color:#666} table{border-collapse:collapse;margin:.8em 0} td,th{border:1px solid #ddd;padding:.25em .6em;text-align:right}
th{background:#f5f5f5} td:first-child,th:first-child{text-align:left}
.grid{display:grid;gap:2px;align-items:center} .grid img{width:100%;image-rendering:pixelated;display:block}
.rowlabel{font-size:.75em;color:#555;writing-mode:vertical-rl;transform:rotate(180deg);text-align:center}
.big{font-size:1.3em;font-weight:600} .card{display:inline-block;border:1px solid #ddd;border-radius:6px;padding:.6em 1em;margin:.3em}
details{margin:.8em 0} pre{background:#f7f7f7;padding:.8em;overflow:auto;font-size:.8em}
"""


def png_data_uri(image: np.ndarray, scale: int = 1) -> str:
    """(3, H, W) float [0, 1] -> ``data:image/png;base64,...``."""
    if scale > 1:
        image = np.asarray(image).repeat(scale, 1).repeat(scale, 2)             # nearest-neighbour upscaling
    return "data:image/png;base64," + base64.b64encode(png_bytes(image)).decode()


def figure_data_uri(fig) -> str:
    """A matplotlib figure as a PNG data URI (with ``tight_layout``); the figure is closed."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def image_grid(rows: list[tuple[str, np.ndarray]], labels: list[str], per_row: int = 10) -> str:
    """Blocks of ``per_row`` columns; in each block one row per (name, images (n, 3, H, W))."""
    parts = []
    n = len(labels)
    for s in range(0, n, per_row):
        cols = min(per_row, n - s)
        cells = []
        for name, images in rows:
            cells.append(f'<div class="rowlabel">{html.escape(name)}</div>')
            for i in range(s, s + cols):
                cells.append(f'<img src="{png_data_uri(images[i])}" title="{html.escape(labels[i])}">')
        parts.append(f'<div class="grid" style="grid-template-columns:1.2em repeat({cols},1fr);'
                     f'max-width:{cols * 110}px;margin-bottom:10px">{"".join(cells)}</div>')
    return "".join(parts)


def decoding_figure(metrics: dict) -> str:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.4))
    keys = ("profile_correlation", "pattern_correlation", "feature_identification")
    for ax, key in zip(axes, keys):
        for name, m in metrics.items():
            layers = list(m["feature_decoding"])
            ax.plot(range(len(layers)), [m["feature_decoding"][k][key] for k in layers], "o-", label=name, ms=4)
        ax.set_xticks(range(len(layers)), layers, rotation=60, fontsize=8)
        ax.set_title(key.replace("_", " "))
        ax.axhline(0.5 if key == "feature_identification" else 0.0, color="#999", lw=0.8, ls="--")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    return figure_data_uri(fig)


def _analysed_r(m: dict) -> str:
    rel = m.get("test_retest_median_r", {})
    vals = [v for k, v in rel.items() if k.endswith("(analysed)")]
    return f"{vals[0]:.3f}" if vals else ""


def _evolution(labels: list[str], stimuli: np.ndarray, recons: dict, shown: int = 10) -> str:
    """The first ``shown`` reconstructions from fMRI at their snapshot iterations, then final, under the stimuli."""
    snaps = recons.get("snapshots") or {}
    if not snaps:
        return ""
    k = min(shown, len(labels))
    rows = [("stimulus", stimuli[:k])] + [(f"iter {it}", imgs[:k]) for it, imgs in sorted(snaps.items())]
    rows.append(("final", recons["decoded"][:k]))
    return ("<details open><summary>How the reconstructions evolve (iterations "
            + ", ".join(str(it) for it in sorted(snaps)) + ", final)</summary>"
            + image_grid(rows, labels[:k]) + "</details>")


def _pair(m: dict, key: str) -> str:
    """'decoded (true features)' of a similarity score, or '' if not measured (older runs)."""
    if key not in m:
        return ""
    true = m.get(f"{key}_true_features")
    return f"{m[key]:.3f}" + ("" if true is None else f" ({true:.3f})")


def _baseline(m: dict) -> str:
    """The pixel decoder's scores of a test set, or '' if not computed."""
    if "baseline_pixel_identification" not in m:
        return ""
    return (f"{m['baseline_pixel_identification']:.1%} / {m['baseline_pixel_correlation']:.3f} / "
            f"{m['baseline_ssim']:.3f} ({html.escape(str(m.get('baseline_roi', '')))})")


def roi_weights_table(alphas: dict) -> str:
    """The banded decoder's kernel weight of each ROI per layer (run.json's ``alphas``), as a table
    shaded by weight; empty if no layer has ROI weights."""
    layers = [k for k, v in alphas.items() if v.get("roi_weights")]
    if not layers:
        return ""
    rois = list(dict.fromkeys(r for k in layers for r in alphas[k]["roi_weights"]))
    rows = []
    for k in layers:
        w = alphas[k]["roi_weights"]
        rows.append(f"<tr><td>{html.escape(k)}</td>" + "".join(
            f"<td style='background:rgba(31,119,180,{w.get(r, 0.0):.2f})'>{w.get(r, 0.0):.2f}</td>" for r in rois)
            + "</tr>")
    head = "".join(f"<th>{html.escape(r)}</th>" for r in rois)
    return ("<h2>Which area decodes which layer</h2><p class='sub'>Kernel weight of each ROI in the banded decoder "
            "of each layer (sum 1), chosen by leave-one-image-out cross-validation on the training data.</p>"
            f"<table><tr><th>layer</th>{head}</tr>{''.join(rows)}</table>")


EVALUATION_START, EVALUATION_END = "<!--evaluation-->", "<!--/evaluation-->"


def replace_evaluation(path: Path, section: str) -> bool:
    """Put ``section`` (HTML) in place of a written report's evaluation section (a report without one, from
    an earlier release, gets it at its end); False if there is no report."""
    path = Path(path)
    if not path.is_file():
        return False
    doc = path.read_text(encoding="utf-8")
    if EVALUATION_START not in doc or EVALUATION_END not in doc:
        at = doc.rfind("</body>") if "</body>" in doc else len(doc)
        doc = doc[:at] + EVALUATION_START + EVALUATION_END + doc[at:]
    start, end = doc.find(EVALUATION_START) + len(EVALUATION_START), doc.find(EVALUATION_END)
    write_text(path, doc[:start] + section + doc[end:])
    return True


def write_report(path: Path, metrics: dict, run_info: dict, config, sets: dict, evaluation: str = "") -> None:
    """``sets``: {name: (labels, stimuli (n, 3, H, W), {"decoded": images, "true": images,
    "snapshots": {iteration: images}, "pixel decoder": images, "perception": images})}, all but
    "decoded" optional; ``evaluation``: the HTML section of ``brainrecon evaluate``'s results
    (:func:`brainrecon.report.evaluation.evaluation_section`)."""
    summary = ["<table><tr><th>test set</th><th>images</th><th>presentations</th>"
               "<th>pixel identification (decoded)</th><th>pixel identification (true features)</th>"
               "<th>pixel r</th><th>SSIM</th><th>voxel test-retest r</th>"
               "<th>pixel decoder: identification / pixel r / SSIM (ROI)</th></tr>"]
    for name, m in metrics.items():
        true = m.get("pixel_identification_true_features")
        summary.append(f"<tr><td>{html.escape(name)}</td><td>{m['n_images']}</td><td>{m['n_presentations']:g}</td>"
                       f"<td class='big'>{m['pixel_identification']:.1%}</td>"
                       f"<td>{'' if true is None else f'{true:.1%}'}</td>"
                       f"<td>{_pair(m, 'pixel_correlation')}</td><td>{_pair(m, 'ssim')}</td><td>{_analysed_r(m)}</td>"
                       f"<td>{_baseline(m)}</td></tr>")
    summary.append("</table><p class='sub'>Pairwise identification by pixel correlation: the fraction of "
                   "other test images that the reconstruction resembles less than its own stimulus (chance 50%). "
                   "Reconstructions from the true features of each image bound what the reconstruction stage can "
                   "reach; the gap to the decoded row is lost in decoding. Pixel r and SSIM (greyscale, Gaussian window "
                   "sigma 1.5): the mean resemblance of each reconstruction to its own stimulus, from fMRI "
                   "(true features in brackets). Voxel test-retest r: the median over voxels "
                   "of the analysed ROI of the correlation, across images, between two single presentations "
                   "(per-ROI values under each test set). Pixel decoder: the simplest readout, ridge regression from the "
                   "voxels of the cross-validated ROI straight to a 16 x 16 image, upsampled and scored the same way "
                   "(the deep method should beat it). Human judgment of these reconstructions in the browser: "
                   "<code>brainrecon judge serve RUN_FOLDER</code>.</p>")

    sections = []
    for name, (labels, stimuli, recons) in sets.items():
        m = metrics[name]
        rows = [("stimulus", stimuli), ("from fMRI", recons["decoded"])]
        if "true" in recons:
            rows.append(("true features", recons["true"]))
        if "pixel decoder" in recons:
            rows.append(("pixel decoder", recons["pixel decoder"]))
        if "perception" in recons:    # an imagery set: the perception reconstructions of the same targets
            rows.append(("perception", np.nan_to_num(recons["perception"], nan=0.5)))
        rel = m.get("test_retest_median_r", {})
        rel_rows = "".join(f"<tr><td>{html.escape(k)}</td><td>{v:.3f}</td></tr>" for k, v in rel.items())
        true = m.get("pixel_identification_true_features")
        sections.append(
            f"<h2>{html.escape(name)}</h2>"
            f"<div class='card'>pixel identification<br><span class='big'>{m['pixel_identification']:.1%}</span></div>"
            + (f"<div class='card'>from true features<br><span class='big'>{true:.1%}</span></div>" if true is not None else "")
            + f"<div class='card'>{m['n_images']} images x {m['n_presentations']:g} presentations</div>"
            + image_grid(rows, labels)
            + (imagery_html(m["imagery"]) if "imagery" in m else "")
            + _evolution(labels, stimuli, recons)
            + (f"<details><summary>Voxel test-retest reliability (median single-presentation r per ROI)</summary>"
               f"<table><tr><th>ROI</th><th>median r</th></tr>{rel_rows}</table></details>" if rel else ""))

    layer_rows = []
    names = list(metrics)
    layers = list(next(iter(metrics.values()))["feature_decoding"]) if metrics else []
    for layer in layers:
        cells = "".join(f"<td>{metrics[n]['feature_decoding'][layer]['profile_correlation']:.3f}</td>"
                        f"<td>{metrics[n]['feature_decoding'][layer]['pattern_correlation']:.3f}</td>"
                        f"<td>{metrics[n]['feature_decoding'][layer]['feature_identification']:.1%}</td>" for n in names)
        info = run_info.get("alphas", {}).get(layer, {})
        alpha = "" if info.get("alpha") is None else f"{info['alpha']:g}"
        if "test_alpha" in info:   # chosen for each test set's trial-averaged inputs (the single-trial one in brackets)
            used = info["test_alpha"]
            alpha = (f"{next(iter(used.values())):g}" if len(set(used.values())) == 1 else
                     ", ".join(f"{html.escape(n)} {a:g}" for n, a in used.items())) + f" (single trials {info['alpha']:g})"
        if "unit_alpha_median" in info:
            alpha += f" (per unit, median {info['unit_alpha_median']:g})"
        r2 = "" if info.get("unit_r2_median") is None else f"{info['unit_r2_median']:.3f}"
        layer_rows.append(f"<tr><td>{layer}</td><td>{alpha}</td><td>{r2}</td>{cells}</tr>")
    head = "".join(f"<th>{html.escape(n)} profile r</th><th>{html.escape(n)} pattern r</th>"
                   f"<th>{html.escape(n)} identification</th>" for n in names)
    decoding_html = (f"<h2>Feature decoding accuracy per layer</h2><img src='{decoding_figure(metrics)}' style='width:100%'>"
                     f"<details><summary>Table</summary><table><tr><th>layer</th><th title='penalty used to decode each test set, cross-validated for its trial-averaged inputs'>ridge alpha</th>"
                     f"<th title='median over units of the leave-one-image-out R^2 on the training data; "
                     f"the reconstruction weighs units by it'>unit CV R&sup2; (median)</th>{head}</tr>"
                     f"{''.join(layer_rows)}</table></details>") if metrics else ""

    decoding_html += roi_weights_table(run_info.get("alphas", {}))
    fit_note = (" (decoders fit on each image's mean presentation)"
                if config.train_trials == "averaged" and config.decoder in ("kernel", "banded") else "")
    times = "".join(f"<tr><td>{html.escape(k)}</td><td>{v:.1f} s</td></tr>" for k, v in run_info.get("stage_seconds", {}).items())
    doc = f"""<!doctype html><html><head><meta charset="utf-8"><title>brainrecon report</title><style>{CSS}</style></head><body>
<h1>Deep image reconstruction from fMRI</h1>
<p class="sub">brainrecon {html.escape(str(run_info.get('brainrecon', '')))} &middot; network {html.escape(config.network)}
&middot; {config.image_size} px &middot; ROI {html.escape(config.roi)} &middot; {run_info.get('n_voxels', '?')} voxels
&middot; {run_info.get('n_train_samples', '?')} training samples of {run_info.get('n_train_images', '?')} images{fit_note}
&middot; {config.recon.iterations} iterations &middot; total {run_info.get('total_seconds', 0):.0f} s</p>
{''.join(summary)}
{EVALUATION_START}{evaluation}{EVALUATION_END}
{''.join(sections)}
{decoding_html}
<h2>Run</h2><table><tr><th>stage</th><th>time</th></tr>{times}</table>
<details><summary>Configuration and run details</summary><pre>{html.escape(config.model_dump_json(indent=2))}

{html.escape(json.dumps(run_info, indent=2))}</pre></details>
</body></html>"""
    write_text(path, doc)
