"""How the pipeline's choices hold up across subjects: every decoder and every prior on several
simulated subjects (two seeds of each simulator), with the pixel-decoder baseline beside them.

Cells: each decoder with the default prior, and each prior with the default decoder, on every
subject; each cell is one ``run_pipeline`` run. Runs of one subject share its cache (training
features, and decoded features across priors). Cells run one after another; a finished cell is
kept in ``WORK/cells/`` under a key of the settings and skipped when the script is run again
(resume). Decoders the current ``DecoderConfig`` refuses are skipped with a note.

Writes the cells as JSON (``--json``, default ``bench/results/robustness.json``) and, with
``--write``, the Markdown table to docs/robustness.md (the reduced settings in its header).

    python bench/robustness.py                          # the full table (see docs/robustness.md for its cost)
    python bench/robustness.py --subjects css-vgg:0,dn-stats:0 --decoders kernel --priors gd,fourier \\
        --image-size 32 --iterations 30 --n-train 300 --voxel-scale 0.5 --sets shapes,letters --write
"""
from __future__ import annotations

import argparse
import hashlib
import json
import time
from pathlib import Path

import numpy as np
import torch
from pydantic import ValidationError

from brainrecon.nets import load_network
from brainrecon.pipeline import Log, PipelineConfig, run_pipeline
from brainrecon.recon.icnn import ReconConfig
from brainrecon.simulate.subject import SubjectConfig, simulate_subject

from _machine import cpu_name  # noqa: E402 - bench/ is the script's folder

DECODERS = ("kernel", "banded", "selection", "channel_selection")
PRIORS = ("gd", "lbfgs", "fourier", "dip", "generator")
SETS = ("natural", "shapes", "letters")


def subject_config(spec: str, args) -> SubjectConfig:
    """``MODEL:SEED`` -> the model's default design, reduced by ``--n-train`` / ``--voxel-scale`` / size."""
    model, _, seed = spec.partition(":")
    cfg = SubjectConfig.for_model(model, seed=int(seed or 0), n_test_natural=args.n_test_natural,
                                  **({"n_train_images": args.n_train} if args.n_train else {}))
    if args.voxel_scale != 1.0:
        key = "cortex" if model == "css-vgg" else "stats_cortex"
        cortex = getattr(cfg, key)
        rois = {k: v.model_copy(update={"n_voxels": max(20, round(v.n_voxels * args.voxel_scale))})
                for k, v in cortex.rois.items()}
        cfg = cfg.model_copy(update={key: cortex.model_copy(update={"rois": rois})})
    return cfg


def ensure_subject(folder: Path, cfg: SubjectConfig, network, log: Log) -> Path:
    """The subject simulated into ``folder`` (reused when ``simulation.json`` says it was made with ``cfg``)."""
    done = folder / "simulation.json"
    if not (done.exists() and json.loads(done.read_text()) == json.loads(cfg.model_dump_json())):
        log.stage(f"simulating {folder.name}")
        simulate_subject(folder, cfg, network if cfg.model == "css-vgg" else None, progress=lambda m: log("  " + m))
    return folder


def make_config(args, decoder: str, prior: str) -> PipelineConfig:
    """One cell's run settings (reconstruction from decoded features only, no end-of-run evaluation)."""
    return PipelineConfig(decoder=decoder, generator="builtin" if prior == "generator" else None,
                          recon=ReconConfig(prior=prior, iterations=args.iterations), image_size=args.image_size,
                          true_feature_recon=False, snapshots=[], seed=0, evaluation=False)


def best_prior(args, subjects: list[str]) -> str:
    """The prior whose cells (with the default decoder) have the best pixel identification averaged over
    the subjects and the sets; every such cell must be finished (``--default-prior best``)."""
    means, missing = {}, []
    for prior in args.priors:
        key_cfg = make_config(args, args.default_decoder, prior)
        scores = []
        for spec in subjects:
            path = args.work / "cells" / f"{cell_key(subject_config(spec, args), key_cfg, args.sets)}.json"
            if not path.exists():
                missing.append(f"{spec} / prior {prior}")
                continue
            sets = json.loads(path.read_text())["sets"]
            scores.append(np.mean([sets[s]["pixel_identification"] for s in args.sets]))
        means[prior] = float(np.mean(scores)) if scores else np.nan
    if missing:
        raise SystemExit("--default-prior best needs every prior's cell first; missing: " + ", ".join(missing))
    print("mean pixel identification over subjects and sets: "
          + ", ".join(f"{k} {v:.3f}" for k, v in means.items()), flush=True)
    return max(means, key=means.get)


def variants(args) -> dict[str, PipelineConfig]:
    """{cell name: run settings}: each decoder with the default prior, each prior with the default decoder."""
    out = {}
    for decoder in args.decoders:
        try:
            out[f"decoder {decoder}"] = make_config(args, decoder, args.default_prior)
        except ValidationError as err:
            print(f"note: skipping decoder {decoder!r}: this version's DecoderConfig refuses it "
                  f"({err.errors()[0]['msg']})", flush=True)
    for prior in args.priors:
        if prior != args.default_prior or f"decoder {args.default_decoder}" not in out:
            out[f"prior {prior}"] = make_config(args, args.default_decoder, prior)
    return out


def cell_key(subject: SubjectConfig, config: PipelineConfig, sets: list[str]) -> str:
    text = subject.model_dump_json() + config.model_dump_json() + ",".join(sets)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def run_cell(subject_dir: Path, run_dir: Path, cache: Path, config: PipelineConfig, sets: list[str]) -> dict:
    t0 = time.time()
    tests = {k: subject_dir / f"test_{k}.h5" for k in sets}
    metrics = run_pipeline(subject_dir / "train.h5", tests, subject_dir / "images", run_dir, config,
                           log=Log(quiet=True), cache_root=cache, overwrite=True)
    keep = ("pixel_identification", "pixel_correlation", "ssim", "baseline_pixel_identification",
            "baseline_pixel_correlation", "baseline_ssim", "baseline_roi")
    run = json.loads((run_dir / "run.json").read_text())
    return {"seconds": round(time.time() - t0, 1), "stage_seconds": run.get("stage_seconds", {}),
            "sets": {k: {f: m[f] for f in keep if f in m} for k, m in metrics.items()}}


def markdown(cells: list[dict], args, names: list[str], subjects: list[str]) -> str:
    """The table: one row per cell and test set; pixel identification per subject (the pixel decoder's
    in brackets) and the means over subjects."""
    by = {(c["subject"], c["variant"]): c for c in cells}
    head = (f"Settings: {args.image_size} px, {args.iterations} iterations, reconstruction from decoded features only; "
            f"subjects {', '.join(subjects)} ({'model default' if not args.n_train else args.n_train} training images, "
            f"voxels x {args.voxel_scale:g}, {args.n_test_natural} natural test images); sets {', '.join(args.sets)}; "
            f"default decoder {args.default_decoder}, default prior {args.default_prior}. Machine: {cpu_name()}. "
            "Pixel identification from fMRI, the pixel decoder's in brackets.\n\n")
    lines = [f"| cell | test set | {' | '.join(subjects)} | mean | pixel decoder (mean) | seconds per run (mean) |",
             "|---|---|" + "---|" * (len(subjects) + 3)]
    for name in names:
        kind, _, value = name.partition(" ")
        label = (f"decoder {value} (prior {args.default_prior})" if kind == "decoder"
                 else f"prior {value} (decoder {args.default_decoder})")
        for s in args.sets:
            vals, base, secs = [], [], []
            for subj in subjects:
                c = by.get((subj, name))
                m = c["sets"].get(s) if c else None
                vals.append(None if m is None else (m["pixel_identification"],
                                                    m.get("baseline_pixel_identification", np.nan)))
                if m is not None:
                    base.append(vals[-1][1])
                    secs.append(c["seconds"])
            done = [v[0] for v in vals if v is not None]
            if not done:
                continue
            shown = " | ".join("-" if v is None else f"{v[0]:.1%} ({v[1]:.1%})" for v in vals)
            mean = f"{np.mean(done):.1%}" + ("" if len(done) == len(vals) else f" ({len(done)} of {len(vals)})")
            lines.append(f"| {label} | {s} | {shown} | **{mean}** | {np.nanmean(base):.1%} | {np.mean(secs):.0f} |")
    return head + "\n".join(lines) + "\n"


def summary(cells: list[dict], args, names: list[str], subjects: list[str]) -> str:
    """The README's table: per cell the mean pixel identification over subjects for each set, and each
    subject's shapes score against its pixel decoder (the baseline row: the pixel decoder's means)."""
    by = {(c["subject"], c["variant"]): c for c in cells}
    sets = list(args.sets)
    short = {s: s.replace("css-vgg", "css").replace("dn-stats", "dn") for s in subjects}
    head = (f"| mean over {len(subjects)} subjects | " + " | ".join(sets) + " | shapes: "
            + ", ".join(short[s] for s in subjects) + " | seconds: decoding, reconstruction |\n|---|"
            + "---|" * (len(sets) + 2) + "\n")

    def seconds(c: dict, prefixes: tuple[str, ...]) -> float:
        return sum(v for k, v in c.get("stage_seconds", {}).items() if k.startswith(prefixes))
    rows, base = [], {}
    for name in names:
        kind, _, value = name.partition(" ")
        label = (f"decoder `{value}`, prior `{args.default_prior}`" if kind == "decoder"
                 else f"prior `{value}`, decoder `{args.default_decoder}`")
        if kind == "decoder" and value == args.default_decoder:
            label = f"**defaults** (decoder `{value}`, prior `{args.default_prior}`)"
        got = {s: by[(s, name)] for s in subjects if (s, name) in by}
        if not got:
            continue
        if len(got) < len(subjects):
            label += f" ({', '.join(short[s] for s in got)} only)"
        means = [np.mean([c["sets"][k]["pixel_identification"] for c in got.values()]) for k in sets]
        for s, c in got.items():
            for k in sets:
                base.setdefault((s, k), c["sets"][k].get("baseline_pixel_identification", np.nan))
        shapes = ", ".join(f"{got[s]['sets']['shapes']['pixel_identification']:.1%}" if s in got else "-"
                           for s in subjects) if "shapes" in sets else ""
        dec = np.mean([seconds(c, ("fitting", "decoding")) for c in got.values()])
        rec = np.mean([seconds(c, ("reconstructing",)) for c in got.values()])
        cost = f"{dec:.0f}, {rec:.0f}" if kind == "decoder" else f"(shared), {rec:.0f}"
        rows.append(f"| {label} | " + " | ".join(f"{m:.1%}" for m in means) + f" | {shapes} | {cost} |")
    if base:
        means = [np.nanmean([base.get((s, k), np.nan) for s in subjects]) for k in sets]
        shapes = ", ".join(f"{base[(s, 'shapes')]:.1%}" if (s, "shapes") in base else "-"
                           for s in subjects) if "shapes" in sets else ""
        pix = np.mean([seconds(c, ("pixel-decoder",)) for s in subjects for c in [by.get((s, names[0]))] if c])
        rows.append("| linear pixel decoder (baseline) | " + " | ".join(f"{m:.1%}" for m in means)
                    + f" | {shapes} | {pix:.0f} |")
    return head + "\n".join(rows) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", type=Path, default=Path("bench_out/robustness"))
    ap.add_argument("--subjects", default="css-vgg:0,css-vgg:1,dn-stats:0,dn-stats:1", help="MODEL:SEED,...")
    ap.add_argument("--decoders", default=",".join(DECODERS))
    ap.add_argument("--priors", default=",".join(PRIORS))
    ap.add_argument("--default-decoder", default=PipelineConfig().decoder)
    ap.add_argument("--default-prior", default=PipelineConfig().recon.prior,
                    help="the prior of the decoder cells; best: the prior with the best mean over the subjects "
                         "of --choose-on and the sets (its cells must be finished)")
    ap.add_argument("--choose-on", default="", help="subjects whose prior cells choose --default-prior best "
                                                    "(default: --subjects)")
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--iterations", type=int, default=200)
    ap.add_argument("--n-train", type=int, default=0, help="training images (0: each model's default)")
    ap.add_argument("--voxel-scale", type=float, default=1.0, help="fraction of each area's voxels")
    ap.add_argument("--n-test-natural", type=int, default=50)
    ap.add_argument("--sets", default=",".join(SETS))
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--table-only", action="store_true", help="run no cell: the table of the finished ones")
    ap.add_argument("--json", type=Path, default=Path("bench/results/robustness.json"))
    ap.add_argument("--write", action="store_true", help="write the table to docs/robustness.md")
    args = ap.parse_args()
    for key in ("decoders", "priors", "sets"):
        setattr(args, key, [x for x in getattr(args, key).split(",") if x])
    if args.threads:
        torch.set_num_threads(args.threads)

    log = Log()
    network = load_network("hed-vgg16")
    subjects = [s for s in args.subjects.split(",") if s]
    if args.default_prior == "best":
        args.default_prior = best_prior(args, [s for s in args.choose_on.split(",") if s] or subjects)
        print(f"default prior: {args.default_prior}", flush=True)
    runs = variants(args)
    cells = []
    for spec in subjects:
        sub_cfg = subject_config(spec, args)
        folder = args.work / "subjects" / spec.replace(":", "-")
        if not args.table_only:
            ensure_subject(folder, sub_cfg, network, log)
        for name, cfg in runs.items():
            key = cell_key(sub_cfg, cfg, args.sets)
            path = args.work / "cells" / f"{key}.json"
            if path.exists():
                log(f"{spec} / {name}: finished earlier ({path})")
                cells.append(json.loads(path.read_text()))
                continue
            if args.table_only:
                log(f"{spec} / {name}: not run (--table-only)")
                continue
            log.stage(f"{spec} / {name}")
            result = run_cell(folder, args.work / "runs" / spec.replace(":", "-") / name.replace(" ", "-"),
                              args.work / "cache" / spec.replace(":", "-"), cfg, args.sets)
            result.update(subject=spec, variant=name, key=key)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(result, indent=1))
            log("  " + ", ".join(f"{k} {v['pixel_identification']:.3f} (pixel decoder "
                                 f"{v.get('baseline_pixel_identification', float('nan')):.3f})"
                                 for k, v in result["sets"].items()) + f"; {result['seconds']:.0f} s")
            cells.append(result)
    log.stage("")
    table = markdown(cells, args, list(runs), subjects)
    short = summary(cells, args, list(runs), subjects)
    print(table)
    print(short)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"settings": {k: (str(v) if isinstance(v, Path) else v)
                                                  for k, v in vars(args).items() if k not in ("work", "json")},
                                     "cells": cells}, indent=1))
    if args.write:
        root = Path(__file__).resolve().parents[1]
        write_between(root / "docs" / "robustness.md", "robustness table", table)
        for doc in (root / "docs" / "robustness.md", root / "README.md"):
            write_between(doc, "robustness summary", short)


def write_between(doc: Path, name: str, text: str) -> None:
    """Put ``text`` between ``<!-- NAME -->`` and ``<!-- end NAME -->`` in ``doc`` (appended when absent)."""
    start, end = f"<!-- {name} -->", f"<!-- end {name} -->"
    old = doc.read_text() if doc.exists() else "# Robustness across simulated subjects\n"
    if start not in old:
        old = old.rstrip("\n") + f"\n\n{start}\n{end}\n"
    before, _, after = old.partition(start)
    rest = after[after.find(end):] if end in after else end + "\n"
    doc.write_text(before + start + "\n" + text + rest)


if __name__ == "__main__":
    main()
