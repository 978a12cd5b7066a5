"""All-voxel kernel ridge vs the lab's voxel-selection ridge, on the same units of a simulated subject.

Decoding accuracy (profile correlation, pattern correlation, feature identification) per layer on a
random sample of units, for every test set. Kernel ridge: penalty chosen per layer by
leave-one-image-out CV; selection: FastL2LiR's top 500 voxels per unit, alpha 100, z-scored data.

    python bench/bench_decoder_choice.py --subject DIR [--image-size 48] [--units 2000] [--write]
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from brainrecon.decode.ridge import KernelRidgeDecoder
from brainrecon.decode.selection import VoxelSelectionRidge
from brainrecon.decode.streaming import training_pass
from brainrecon.evaluate.decoding import decoding_accuracy
from brainrecon.nets import load_network
from brainrecon.nets.features import extract_features
from brainrecon.pipeline import Log, PipelineConfig, load_inputs


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--subject", type=Path, required=True, help="folder written by brainrecon simulate")
    ap.add_argument("--image-size", type=int, default=48)
    ap.add_argument("--units", type=int, default=2000, help="units sampled per layer")
    ap.add_argument("--write", action="store_true")
    args = ap.parse_args()

    log = Log()
    cfg = PipelineConfig(image_size=args.image_size)
    tests = {n: args.subject / f"test_{n}.h5" for n in ("natural", "shapes", "letters")}
    train, image_index, labels, train_images, sets = load_inputs(args.subject / "train.h5", tests,
                                                                 args.subject / "images", cfg, log)
    net = load_network("hed-vgg16")
    layers = net.layer_names
    counts = np.bincount(image_index)
    log.stage("features")
    stats = training_pass(net, train_images.images, layers, counts, n_sample=args.units, seed=1)
    true = {s.name: extract_features(net, s.images, layers) for s in sets}
    log.stage("decoders")
    kr = KernelRidgeDecoder().fit(train.X, image_index)
    Xt = np.vstack([s.X for s in sets])
    Xz = ((train.X - kr.mean_) / kr.sd_).astype(np.float32)
    Xtz = ((Xt - kr.mean_) / kr.sd_).astype(np.float32)
    rows, t_kernel, t_sel = [], 0.0, 0.0
    for layer in layers:
        st = stats[layer]
        Y = st.sample                                                      # (n_images, k)
        mean, sd = st.mean[st.sample_index], st.sd[st.sample_index]
        t0 = time.time()
        alpha, _ = kr.choose_alpha(Y)
        pred_k = kr.predict(kr.test_weights(Xt, alpha), Y, mean)
        t_kernel += time.time() - t0
        t0 = time.time()
        sdp = np.where(sd > 0, sd, 1)
        pred_s = VoxelSelectionRidge().fit_predict(Xz, ((Y - mean) / sdp)[image_index], Xtz, alpha=100.0,
                                                   n_feat=500) * sdp + mean
        t_sel += time.time() - t0
        row = 0
        for s in sets:
            n = len(s.labels)
            t = true[s.name][layer].reshape(n, -1)[:, st.sample_index]
            a = decoding_accuracy(pred_k[row:row + n], t, mean, sd).to_json()
            b = decoding_accuracy(pred_s[row:row + n], t, mean, sd).to_json()
            rows.append((layer, s.name, a, b))
            row += n
        log(f"  {layer}: kernel alpha {alpha:g}")
    log.stage("")
    print(f"{'layer':8s} {'set':8s}  kernel prof/pat/ident   selection prof/pat/ident")
    for layer, name, a, b in rows:
        print(f"{layer:8s} {name:8s}  {a['profile_correlation']:.3f} {a['pattern_correlation']:.3f} "
              f"{a['feature_identification']:.3f}   {b['profile_correlation']:.3f} {b['pattern_correlation']:.3f} "
              f"{b['feature_identification']:.3f}")
    summary = {}
    for name in tests:
        for key in ("profile_correlation", "pattern_correlation", "feature_identification"):
            summary[(name, key)] = (np.mean([a[key] for _, n, a, _ in rows if n == name]),
                                    np.mean([b[key] for _, n, _, b in rows if n == name]))
    for (name, key), (a, b) in summary.items():
        print(f"mean over layers  {name:8s} {key:24s} kernel {a:.3f}  selection {b:.3f}")
    print(f"time: kernel {t_kernel:.1f} s, selection {t_sel:.1f} s for {args.units} units x {len(layers)} layers")
    if args.write:
        table = "\n".join(f"| {name} | {key.replace('_', ' ')} | {a:.3f} | {b:.3f} |"
                          for (name, key), (a, b) in summary.items())
        text = f"""
## Which decoder: all-voxel kernel ridge vs voxel selection (FastL2LiR)

`python bench/bench_decoder_choice.py --subject SUBJECT --image-size {args.image_size} --units {args.units} --write`.
Simulated subject ({len(image_index)} training samples, {train.X.shape[1]} VC voxels), the default network at
{args.image_size} px, {args.units} random units per layer, means over the {len(layers)} layers. Kernel ridge: penalty by
leave-one-image-out CV per layer; selection: top 500 voxels per unit by |r|, alpha 100 (the lab's defaults).

| test set | score | kernel ridge | voxel selection |
|---|---|---|---|
{table}

Time for these units: kernel {t_kernel:.1f} s, selection {t_sel:.1f} s.
"""
        docs = Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md"
        docs.write_text(docs.read_text() + text)


if __name__ == "__main__":
    main()
