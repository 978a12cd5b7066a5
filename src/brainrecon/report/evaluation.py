"""The report's evaluation section, drawn from ``evaluation.json`` (``brainrecon evaluate``).

Bars with 95% intervals per metric and test set, the retrieval baseline beside the reconstruction's
score, the n-way identification curves, a table of every metric (interval, n, permutation p) and
each reconstruction next to its nearest training image and the retrieval baseline's answer.
"""
from __future__ import annotations

import html
from pathlib import Path

import numpy as np

from ..data.stimuli import load_image
from ..runfolder import RunFolder
from .html import figure_data_uri, image_grid

BARS = [("pixel_identification", "pixel corr."), ("pixel_identification_euclidean", "pixel Eucl."),
        ("human_identification", "human"), ("retrieval_baseline_pixel_identification", "retrieval baseline"),
        ("stimulus_beats_training_pixel", "stimulus beats training")]
SOURCE_COLOURS = {"decoded": "#2b6cb0", "true_features": "#a0aec0"}


def _rows(evaluation: dict) -> dict[tuple[str, str, str], dict]:
    return {(r["test_set"], r["source"], r["metric"]): r for r in evaluation.get("results", [])}


def _sets(evaluation: dict) -> list[str]:
    return list(dict.fromkeys(r["test_set"] for r in evaluation.get("results", [])))


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _err(r: dict) -> list[list[float]]:
    lo, hi = r.get("ci_low"), r.get("ci_high")
    if lo is None or hi is None:
        return [[0.0], [0.0]]
    return [[max(r["value"] - lo, 0.0)], [max(hi - r["value"], 0.0)]]


def bars_figure(evaluation: dict) -> str:
    """Identification metrics per test set, decoded and true-feature reconstructions, with 95% intervals."""
    plt = _pyplot()
    rows, sets = _rows(evaluation), _sets(evaluation)
    fig, axes = plt.subplots(1, len(sets), figsize=(4.2 * len(sets), 3.4), squeeze=False)
    for ax, test_set in zip(axes[0], sets):
        names = [(k, label) for k, label in BARS if any((test_set, s, k) in rows for s in SOURCE_COLOURS)]
        for i, (key, _) in enumerate(names):
            for j, (source, colour) in enumerate(SOURCE_COLOURS.items()):
                r = rows.get((test_set, source, key))
                if r is None:
                    continue
                x = i + (j - 0.5) * 0.38
                ax.bar(x, r["value"], 0.36, color="#dd6b20" if key.startswith("retrieval") else colour,
                       yerr=_err(r), capsize=3, label=source if i == 0 else None)
        ax.set_xticks(range(len(names)), [label for _, label in names], rotation=30, ha="right", fontsize=8)
        ax.axhline(0.5, color="#999", lw=0.8, ls="--")
        ax.set_ylim(0, 1.05)
        ax.set_title(test_set)
        ax.grid(alpha=0.3, axis="y")
    axes[0][0].legend(fontsize=7, loc="lower left")
    return figure_data_uri(fig)


def n_way_figure(evaluation: dict) -> str:
    """n-way identification by pixel correlation against the number of candidates, with intervals and chance."""
    plt = _pyplot()
    rows = _rows(evaluation)
    fig, ax = plt.subplots(figsize=(5, 3.4))
    for test_set in _sets(evaluation):
        pts = []
        for (s, source, metric), r in rows.items():
            if s == test_set and source == "decoded" and metric.startswith("pixel_identification_") \
                    and metric.endswith("way"):
                k = r["n"] if metric.endswith("allway") else int(metric.split("_")[-1][:-3])
                pts.append((k, r))
        if not pts:
            continue
        pts.sort(key=lambda p: p[0])
        ks = [k for k, _ in pts]
        line = ax.errorbar(ks, [r["value"] for _, r in pts],
                           yerr=np.hstack([_err(r) for _, r in pts]), marker="o", capsize=3, label=test_set)
        ax.plot(ks, [1 / k for k in ks], ls=":", color=line[0].get_color(), lw=1)
    ax.set_xscale("log")
    ticks = sorted({int(x) for line in ax.get_lines() for x in line.get_xdata()})
    ax.set_xticks(ticks, [str(t) for t in ticks])
    ax.minorticks_off()
    ax.set_xlabel("candidates (n-way; dotted: chance 1/n)")
    ax.set_ylabel("identification")
    ax.set_ylim(0, 1.05)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return figure_data_uri(fig)


def _fmt(r: dict) -> str:
    pct = r["kind"] == "identification" or r["metric"].startswith("stimulus_beats")
    f = (lambda v: f"{v:.1%}") if pct else (lambda v: f"{v:.3f}")
    ci = "" if r.get("ci_low") is None else f" [{f(r['ci_low'])}, {f(r['ci_high'])}]"
    return f"{f(r['value'])}{ci}"


def _p(r: dict) -> str:
    return "" if r.get("p_value") is None else f"{r['p_value']:.3g}"


def metrics_table(evaluation: dict) -> str:
    head = "<tr><th>test set</th><th>source</th><th>metric</th><th>value [95% CI]</th><th>n</th><th>p</th></tr>"
    body = "".join(f"<tr><td>{html.escape(r['test_set'])}</td><td>{html.escape(r['source'])}</td>"
                   f"<td>{html.escape(r['metric'])}</td><td>{_fmt(r)}</td><td>{r['n']}</td><td>{_p(r)}</td></tr>"
                   for r in evaluation.get("results", []))
    return f"<table>{head}{body}</table>"


def _retrieval_grid(evaluation: dict, folder: RunFolder, test_set: str, stimuli: dict[str, Path],
                    shown: int = 10) -> str:
    entry = evaluation.get("retrieval", {}).get(test_set, {})
    decoded = entry.get("decoded")
    if not decoded:
        return ""
    near = decoded["nearest"][:shown]
    labels = [n["label"] for n in near]
    recon_paths = [folder.recon_png(test_set, lab) for lab in labels]
    if not all(p.is_file() for p in recon_paths) or not all(lab in stimuli for lab in labels):
        return ""
    size = _png_size(recon_paths[0])
    rows = [("stimulus", np.stack([load_image(stimuli[lab], size) for lab in labels])),
            ("from fMRI", np.stack([load_image(p, size) for p in recon_paths])),
            ("nearest training", np.stack([load_image(decoded["train_paths"][n["nearest_pixel"]], size) for n in near]))]
    base = entry.get("baseline")
    if base:
        rows.append(("retrieval answer", np.stack([load_image(base["train_paths"][base["answers"][lab]], size)
                                                   for lab in labels])))
    beats = sum(n["stimulus_beats_training_pixel"] for n in decoded["nearest"])
    return (f"<p class='sub'>{test_set}: the own stimulus resembles the reconstruction more than every training image "
            f"does for {beats} of {len(decoded['nearest'])} reconstructions (pixel correlation).</p>"
            + image_grid(rows, labels))


def _png_size(path: Path) -> int:
    from PIL import Image
    with Image.open(path) as im:
        return im.size[0]


def evaluation_section(evaluation: dict, folder: RunFolder) -> str:
    """The report's HTML section of ``evaluation`` (evaluation.json's content) of run ``folder``."""
    if not evaluation.get("results"):
        return ""
    rows, sets = _rows(evaluation), _sets(evaluation)
    cards = []
    for test_set in sets:
        own = rows.get((test_set, "decoded", "pixel_identification"))
        base = rows.get((test_set, "decoded", "retrieval_baseline_pixel_identification"))
        human = rows.get((test_set, "decoded", "human_identification"))
        if own is None:
            continue
        cards.append(f"<div class='card'>{html.escape(test_set)}<br>reconstruction <span class='big'>{_fmt(own)}</span>"
                     + (f"<br>retrieval baseline <span class='big'>{_fmt(base)}</span>" if base else "")
                     + (f"<br>human <span class='big'>{_fmt(human)}</span>" if human else "") + "</div>")
    from ..evaluate.judgment import JudgmentError, run_images
    try:
        stimuli = run_images(folder.root).stimuli
    except (JudgmentError, OSError):     # the stimuli moved: the grid is left out, the numbers stay
        stimuli = {}
    grids = "".join(_retrieval_grid(evaluation, folder, s, stimuli.get(s, {})) for s in sets)
    skipped = "".join(f"<li>{html.escape(k)}: {html.escape(v)}</li>" for k, v in evaluation.get("skipped", {}).items())
    s = evaluation.get("settings", {})
    return (
        "<h2>Evaluation with uncertainty</h2>"
        + "".join(cards)
        + f"<p class='sub'>Pixel-correlation identification of the reconstructions from fMRI and, beside it, the "
          "retrieval baseline: the same score reached by answering each test sample with the training image whose "
          "features best match its decoded features. A reconstruction above its baseline shows more than a "
          f"decoder that picks a training image. Brackets: 95% bootstrap intervals over images "
          f"({s.get('n_bootstrap', '?')} resamples); p: label permutation ({s.get('n_permutations', '?')} "
          "permutations). Method: docs/evaluation.md.</p>"
        + f"<img src='{bars_figure(evaluation)}' style='max-width:100%'>"
        + f"<img src='{n_way_figure(evaluation)}' style='max-width:48%'>"
        + ("<h3>Each reconstruction, its nearest training image and the retrieval baseline's answer</h3>" + grids
           if grids else "")
        + f"<details><summary>Every metric (evaluation.json, metrics.csv)</summary>{metrics_table(evaluation)}</details>"
        + (f"<p class='sub'>Not evaluated:</p><ul>{skipped}</ul>" if skipped else ""))


def update_report(evaluation: dict, run_dir: Path) -> bool:
    """Put ``evaluation``'s section into run ``run_dir``'s report.html; False if the run has no report."""
    from .html import replace_evaluation
    folder = RunFolder(Path(run_dir))
    if not folder.report.is_file():
        return False
    return replace_evaluation(folder.report, evaluation_section(evaluation, folder))
