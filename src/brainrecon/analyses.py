"""Analyses that compare runs of the pipeline on the same data: ROIs, layer sets, priors.

Each variant is a :class:`~brainrecon.pipeline.PipelineConfig`; all variants run into
``out/<variant>/`` with one shared cache, so training features are computed once and variants that
differ only in reconstruction settings reuse the decoded features. A comparison report
(``out/report.html``) shows the variants side by side and ``out/comparison.json`` holds the numbers.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .cache import write_json
from .data.bdata import check_rois, roi_keys
from .pipeline import Log, PipelineConfig, check_run, run_pipeline

PAPER_ROIS = ("ROI_V1", "ROI_V2", "ROI_V3", "ROI_hV4", "ROI_HVC", "ROI_VC")
HVC_PARTS = "ROI_LOC+ROI_FFA+ROI_PPA"


def compare_variants(train: Path, tests: dict[str, Path], images: Path, out: Path,
                     variants: dict[str, PipelineConfig], title: str, log: Log | None = None,
                     x_axis: str | None = None, overwrite: bool = False) -> dict:
    """Run every variant and write the comparison; returns {variant: metrics}.

    ``x_axis``: label of the variants' axis for an accuracy-against-variant figure (e.g. "layers");
    ``overwrite``: replace earlier runs in the variants' folders.
    """
    from .report.compare import write_comparison_report

    log = log or Log()
    out = Path(out)
    for name, cfg in variants.items():      # every variant's settings and ROIs, before any of them runs
        check_run(tests, out / _slug(name), cfg)
        for path in [train, *tests.values()]:
            check_rois(path, sorted({cfg.roi, *cfg.layer_rois.values()}))
    out.mkdir(parents=True, exist_ok=True)
    results, folders = {}, {}
    for i, (name, cfg) in enumerate(variants.items()):
        log(f"### variant {i + 1}/{len(variants)}: {name}")
        folders[name] = out / _slug(name)
        results[name] = run_pipeline(train, tests, images, folders[name], cfg, log, cache_root=out / "cache",
                                     overwrite=overwrite)
    table = {name: {s: {"pixel_identification": m["pixel_identification"],
                        **({"pixel_identification_true_features": m["pixel_identification_true_features"]}
                           if "pixel_identification_true_features" in m else {}),
                        **_imagery_columns(m)}
                    for s, m in res.items()} for name, res in results.items()}
    write_json(out / "comparison.json", {"title": title, "variants": table,
                                         "folders": {k: str(v) for k, v in folders.items()}})
    write_comparison_report(out / "report.html", title, results, folders, images, x_axis=x_axis)
    log(f"wrote {out / 'comparison.json'} and {out / 'report.html'}")
    return results


def _imagery_columns(m: dict) -> dict[str, float]:
    """An imagery set's within-family pixel identification, per family (``imagery_<family>_pixel_identification``)."""
    families = m.get("imagery", {}).get("families", {})
    return {f"imagery_{f}_pixel_identification": s["pixel_identification"] for f, s in families.items()}


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in name)


def roi_variants(base: PipelineConfig, train: Path, rois: list[str] | None = None) -> dict[str, PipelineConfig]:
    """One variant per ROI (the paper's V1, V2, V3, V4, HVC, VC by default).

    ROI_HVC falls back to the union of LOC, FFA and PPA in files without an HVC key. Only the first
    variant also reconstructs from true features (they do not depend on the ROI).
    """
    keys = roi_keys(train)
    out = {}
    for roi in rois or PAPER_ROIS:
        key = roi if roi.startswith("ROI_") or "+" in roi else f"ROI_{roi}"
        if key == "ROI_HVC" and key not in keys:
            key = HVC_PARTS
        name = key.removeprefix("ROI_") if key != HVC_PARTS else "HVC"
        out[name] = base.model_copy(update={"roi": key, "layer_rois": {}, "true_feature_recon": not out})
    return out


def layer_variants(base: PipelineConfig, layer_names: list[str]) -> dict[str, PipelineConfig]:
    """The paper's layer-combination analysis: conv1 only, conv1-2, ..., all layers (cumulative blocks).

    All variants decode every layer once and differ only in the layers the reconstruction matches.
    """
    blocks: list[list[str]] = []
    for layer in layer_names:
        block = layer.split("_")[0]
        if blocks and blocks[-1][0].split("_")[0] == block:
            blocks[-1].append(layer)
        else:
            blocks.append([layer])
    variants, used = {}, []
    for block in blocks:
        used = used + block
        first, last = blocks[0][0].split("_")[0], block[0].split("_")[0]
        name = first if first == last else f"{first}-{last}"
        variants[name] = base.model_copy(update={"layers": list(layer_names), "recon_layers": list(used),
                                                 "true_feature_recon": False})
    return variants


def prior_variants(base: PipelineConfig, priors: list[str]) -> dict[str, PipelineConfig]:
    """One variant per reconstruction prior, on the same decoded features."""
    return {p: base.model_copy(update={"recon": base.recon.model_copy(update={"prior": p}),
                                       "true_feature_recon": False}) for p in priors}


def best_variant(results: dict[str, dict], sets: list[str] | None = None) -> str:
    """The variant with the highest mean pixel identification over test sets."""
    return max(results, key=lambda v: np.mean([m["pixel_identification"] for s, m in results[v].items()
                                               if sets is None or s in sets]))
