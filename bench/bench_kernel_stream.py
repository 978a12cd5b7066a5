"""Kernel ridge decoding of every conv layer at 224 px, training features streamed (not stored).

Simulates a subject (1,200 training images x 5 presentations, 50 natural test images), then runs the
pipeline's decoding stage only: one forward pass for statistics and penalty choice, one to
accumulate the decoded features. Reports wall time per stage, peak resident memory and the
decoding accuracy per layer; appends a section to docs/benchmarks.md with --write.

    python bench/bench_kernel_stream.py [--image-size 224] [--write]
"""
from __future__ import annotations

import argparse
import json
import resource
import shutil
import time
from pathlib import Path

import numpy as np

from brainrecon.nets import load_network
from brainrecon.nets.features import extract_features
from brainrecon.decode.decoder import FeatureDecoder
from brainrecon.pipeline import Log, PipelineConfig, feature_accuracy, load_inputs

from _subject import bench_subject  # noqa: E402 - bench/ is the script's folder


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--work", type=Path, default=Path("bench_out/kernel_stream"))
    ap.add_argument("--store", default="stream", choices=["stream", "disk"])
    ap.add_argument("--write", action="store_true", help="append the result to docs/benchmarks.md")
    args = ap.parse_args()

    log = Log()
    network = load_network("hed-vgg16")
    subject = bench_subject(args.work / "subject", network, log)
    cfg = PipelineConfig(image_size=args.image_size, feature_store=args.store)
    log.stage("loading")
    t0 = time.time()
    train, image_index, labels, train_images, sets = load_inputs(
        subject / "train.h5", {"natural": subject / "test_natural.h5"}, subject / "images", cfg, log)
    t_load = time.time() - t0
    layers = network.layer_names
    cache = args.work / "cache"
    shutil.rmtree(cache, ignore_errors=True)   # nothing reused: both passes are timed
    cache.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    decoder = FeatureDecoder(network, args.image_size, cache_dir=cache, tasks_dir=cache / "decoded", log=log,
                             feature_store=args.store).fit(train, train_images)
    decoded = decoder.predict_sets({s.name: s.fmri for s in sets})
    t_decode = time.time() - t0
    rss = peak_rss_gb()
    log.stage("scoring")
    true = extract_features(network, sets[0].images, layers)
    scores = feature_accuracy(decoded["natural"], true)
    log.stage("")
    units = sum(int(np.prod(v.shape[1:])) for v in decoded["natural"].features.values())
    # the penalty that decoded the test set (cross-validated for its averaged trials), else the layer's
    alphas = {k: p.to_json() for k, p in decoded["natural"].alphas.items()}
    used = {k: v.get("test_alpha", {}).get("natural", v["alpha"]) for k, v in alphas.items()}
    result = {"image_size": args.image_size, "layers": len(layers), "units": units, "n_train_samples": len(image_index),
              "n_voxels": int(train.X.shape[1]), "store": args.store, "load_seconds": round(t_load, 1),
              "decode_seconds": round(t_decode, 1), "stage_seconds": log.times, "peak_rss_gb": round(rss, 2),
              "profile_r": {k: round(v.profile_correlation, 3) for k, v in scores.items()},
              "pattern_r": {k: round(v.pattern_correlation, 3) for k, v in scores.items()},
              "feature_identification": {k: round(v.feature_identification, 4) for k, v in scores.items()},
              "alphas": used, "single_trial_alphas": {k: v["alpha"] for k, v in alphas.items()}}
    print(json.dumps(result, indent=2))
    if args.write:
        rows = "\n".join(f"| {k} | {used[k]:g} | {scores[k].profile_correlation:.3f} | "
                         f"{scores[k].pattern_correlation:.3f} | {scores[k].feature_identification:.1%} |"
                         for k in layers)
        text = f"""
## Kernel ridge, all conv layers at {args.image_size} px, features streamed

`python bench/bench_kernel_stream.py --image-size {args.image_size} --write` (2 cores, no GPU).
Simulated subject: {len(image_index)} training samples of {len(labels)} images, {train.X.shape[1]} voxels (VC),
50 natural test images; the default network's {len(layers)} conv layers, {units:,} units per image.

| | |
|---|---|
| decoding stage (two forward passes, penalty choice, decoding) | {t_decode:.0f} s |
| stage times | {", ".join(f"{k}: {v:.0f} s" for k, v in log.times.items() if k != "loading")} |
| peak resident memory (whole process, incl. {len(labels)} training images in memory) | {rss:.1f} GB |
| memory bound of the streamed decoder | (n_test + batch) x units x 4 B + units x 20 B (statistics) + batch x largest layer x 4 B |

| layer | alpha | profile r | pattern r | feature identification |
|---|---|---|---|---|
{rows}
"""
        docs = Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md"
        docs.write_text((docs.read_text() if docs.exists() else "# Benchmarks\n") + text)


if __name__ == "__main__":
    main()
