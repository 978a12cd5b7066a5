"""One ridge penalty per layer against one per unit, on the demo's simulated subject.

Simulates the demo subject (or reuses it), then runs the pipeline's decoding stage twice on the same
cached training features: ``alpha_per: layer`` (the default: penalty by grouped cross-validation on
256 units per layer) and ``alpha_per: unit`` (every unit's own penalty by leave-one-image-out error,
searched within a factor 30 of the layer's). Prints decoding accuracy per layer and test set and the
time of each decoding stage; with --write, appends a section to docs/benchmarks.md.

    python bench/bench_unit_alpha.py [--work bench_out/unit_alpha] [--write]
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from brainrecon.cli import DEMO
from brainrecon.nets import load_network
from brainrecon.nets.features import extract_features
from brainrecon.decode.decoder import FeatureDecoder
from brainrecon.pipeline import Log, PipelineConfig, feature_accuracy, load_inputs

from _subject import bench_subject  # noqa: E402 - bench/ is the script's folder

SCORES = ("profile_correlation", "pattern_correlation", "feature_identification")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", type=Path, default=Path("bench_out/unit_alpha"))
    ap.add_argument("--write", action="store_true", help="append the result to docs/benchmarks.md")
    args = ap.parse_args()

    log = Log()
    network = load_network("hed-vgg16")
    subject = bench_subject(args.work / "subject", network, log, DEMO["n_train_images"], DEMO["n_test_natural"])
    tests = {k: subject / f"test_{k}.h5" for k in ("natural", "shapes", "letters")}
    layers = network.layer_names
    results, seconds, alphas_of = {}, {}, {}
    for mode in ("layer", "unit"):
        cfg = PipelineConfig(image_size=DEMO["image_size"], feature_store="disk", alpha_per=mode)
        train, image_index, labels, train_images, sets = load_inputs(subject / "train.h5", tests, subject / "images",
                                                                     cfg, log)
        cache = args.work / "cache"
        cache.mkdir(parents=True, exist_ok=True)
        settings = dict(cache_dir=cache, log=log, feature_store="disk", alpha_per=mode)
        if mode == "layer":   # the training features once, outside the timed stages
            FeatureDecoder(network, DEMO["image_size"], tasks_dir=cache / "warm", **settings).fit(train, train_images)
        t0 = time.time()
        decoder = FeatureDecoder(network, DEMO["image_size"], tasks_dir=cache / f"decoded-{mode}-{t0:.0f}",
                                 **settings).fit(train, train_images)
        decoded = decoder.predict_sets({s.name: s.fmri for s in sets})
        seconds[mode] = time.time() - t0
        alphas_of[mode] = {k: p.to_json() for k, p in next(iter(decoded.values())).alphas.items()}
        results[mode] = {s.name: {k: v.to_json() for k, v in feature_accuracy(
            decoded[s.name], extract_features(network, s.images, layers)).items()} for s in sets}
    print(json.dumps({"seconds": seconds, "results": results}, indent=1, default=float))

    names = list(tests)
    rows = []
    for k in layers:
        ua = alphas_of["unit"][k]
        cells = " | ".join(f"{results['layer'][n][k]['profile_correlation']:.3f} / "
                           f"{results['unit'][n][k]['profile_correlation']:.3f}" for n in names)
        rows.append(f"| {k} | {alphas_of['layer'][k]['alpha']:g} | {ua.get('unit_alpha_median', float('nan')):g} | {cells} |")
    means = []
    for score in SCORES:
        cells = " | ".join(f"{np.mean([results['layer'][n][k][score] for k in layers]):.3f} / "
                           f"{np.mean([results['unit'][n][k][score] for k in layers]):.3f}" for n in names)
        means.append(f"| {score.replace('_', ' ')} | {cells} |")
    text = f"""
## Ridge penalty per layer or per unit (demo subject)

`python bench/bench_unit_alpha.py --write` (2 cores, no GPU). The demo's simulated subject
({len(image_index):,} training samples of {len(labels):,} images, {train.X.shape[1]:,} voxels, {DEMO['image_size']} px, 13
layers), decoded twice from the same cached training features. Decoding stage: **{seconds['layer']:.0f} s** with
one penalty per layer, **{seconds['unit']:.0f} s** with one per unit (penalties within a factor 30 of the
layer's; the leave-one-image-out matrices cost one (samples x voxels) x (voxels x images) product per
penalty, then 2 x images^2 flops per unit and penalty).

Means over the 13 layers, per layer / per unit:

| score | {' | '.join(names)} |
|---|{'---|' * len(names)}
{chr(10).join(means)}

Profile correlation per layer, per layer / per unit:

| layer | layer alpha | median unit alpha | {' | '.join(names)} |
|---|---|---|{'---|' * len(names)}
{chr(10).join(rows)}
"""
    print(text)
    if args.write:
        docs = Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md"
        docs.write_text(docs.read_text().rstrip() + "\n" + text)


if __name__ == "__main__":
    main()
