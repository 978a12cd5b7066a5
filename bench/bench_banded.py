"""The four feature decoders on one simulated subject: fit time and decoding accuracy per layer.

Kernel ridge (one kernel over all voxels), banded ridge (one kernel per ROI, ROI weights by CV),
voxel selection per unit (the lab's FastL2LiR) and voxel selection per channel, each through
``FeatureDecoder`` (fit + decoding every unit of the chosen layers, all test sets), on the same
training features. Accuracy: the profile correlation (mean over units of the correlation across
test images) and feature identification, against the test images' true features.

    python bench/bench_banded.py --subject DIR [--image-size 32] [--layers conv1_2,conv3_3,conv5_3]
        [--decoders kernel,banded,channel_selection,selection]

``--cost-only``: the banded decoder's fitting cost next to the kernel decoder's at the demo
subject's dimensions (1,200 images x 5 presentations, the simulator's 5,300 voxels in 7 ROIs, 13
layers x 256 sampled units), on random data: the cost depends on the dimensions only.
"""
from __future__ import annotations

import argparse
import resource
import time
from pathlib import Path

import numpy as np


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def cost_only(candidates: int, timed: int) -> None:
    from brainrecon.decode.banded import BandedKernelRidge, bands_of, candidate_weights
    from brainrecon.decode.ridge import DEFAULT_ALPHAS, KernelRidgeDecoder
    from brainrecon.simulate.cortex import DEFAULT_ROIS

    rng = np.random.default_rng(0)
    sizes = [r.n_voxels for r in DEFAULT_ROIS.values()]
    n_images, reps = 1200, 5
    index = np.repeat(np.arange(n_images), reps)
    X = rng.standard_normal((len(index), sum(sizes))).astype(np.float32)
    edges = np.cumsum([0] + sizes)
    bands = bands_of({k: np.arange(edges[i], edges[i + 1]) for i, k in enumerate(DEFAULT_ROIS)}, sum(sizes))
    samples = {f"layer{i}": rng.standard_normal((n_images, 256)).astype(np.float32) for i in range(13)}
    R = [None, 24.0, 20.0, 12.0]                  # single trials and the demo's three test sets
    t0, c0 = time.time(), _cpu()
    kr = KernelRidgeDecoder(DEFAULT_ALPHAS).fit(X, index, True)
    for Y in samples.values():
        kr.cv_scores_averaged(Y, R)
    t_kernel, c_kernel = time.time() - t0, _cpu() - c0
    W = candidate_weights(len(bands), candidates)
    t0, c0 = time.time(), _cpu()
    model = BandedKernelRidge(DEFAULT_ALPHAS, bands, W[:timed]).fit(X, index, True)
    t_base, c_base = time.time() - t0, _cpu() - c0
    t0, c0 = time.time(), _cpu()
    model.search(samples, R)
    t_cand, c_cand = (time.time() - t0) / timed, (_cpu() - c0) / timed
    print(f"kernel decoder fit + CV of 13 layers: {t_kernel:.1f} s wall, {c_kernel:.1f} s CPU")
    print(f"banded: band kernels {t_base:.1f} s wall ({c_base:.1f} s CPU); per ROI weighting {t_cand:.1f} s wall "
          f"({c_cand:.1f} s CPU), measured on {timed}; {len(W)} weightings: "
          f"{t_base + len(W) * t_cand:.0f} s wall ({c_base + len(W) * c_cand:.0f} s CPU)")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--subject", type=Path, help="folder written by brainrecon simulate")
    ap.add_argument("--image-size", type=int, default=32)
    ap.add_argument("--layers", default="conv1_2,conv3_3,conv5_3")
    ap.add_argument("--decoders", default="kernel,banded,channel_selection,selection")
    ap.add_argument("--cache", type=Path, default=None, help="feature cache folder (default: a temporary one)")
    ap.add_argument("--cost-only", action="store_true")
    ap.add_argument("--candidates", type=int, default=16)
    ap.add_argument("--timed", type=int, default=2, help="--cost-only: ROI weightings actually timed")
    args = ap.parse_args()
    if args.cost_only:
        cost_only(args.candidates, args.timed)
        return

    import shutil
    import tempfile

    import brainrecon as br
    from brainrecon.evaluate.decoding import decoding_accuracy
    from brainrecon.nets.features import extract_features

    net = br.load_network("hed-vgg16")
    layers = args.layers.split(",")
    train = br.read_fmri(args.subject / "train.h5")
    tests = {n: br.read_fmri(p) for n in ("natural", "shapes", "letters")
             if (p := args.subject / f"test_{n}.h5").exists()}
    images = br.load_images(args.subject / "images", train.labels)
    cache = args.cache or Path(tempfile.mkdtemp(prefix="bench-banded-"))
    n_pres = sorted({len(t.labels) / len(set(t.labels)) for t in tests.values()})
    br.FeatureDecoder(net, args.image_size, cache_dir=cache, layers=layers, decoder="selection",  # untimed:
                      ).fit(train, images, n_pres)                               # features cached on disk
    rows = []
    for kind in args.decoders.split(","):
        shutil.rmtree(cache / f"tasks-{kind}", ignore_errors=True)           # no decoding task reused
        t0, c0 = time.time(), _cpu()
        dec = br.FeatureDecoder(net, args.image_size, cache_dir=cache, layers=layers, decoder=kind,
                                banded_candidates=args.candidates, tasks_dir=cache / f"tasks-{kind}")
        dec.fit(train, images, n_pres)
        decoded = dec.predict_sets(tests)
        wall, cpu = time.time() - t0, _cpu() - c0
        scores = {}
        for name, d in decoded.items():
            true = extract_features(net, br.load_images(args.subject / "images", d.labels, args.image_size).images,
                                    layers)
            scores[name] = {k: decoding_accuracy(d.features[k], true[k], d.train_mean[k], d.train_sd[k])
                            for k in layers}
        rows.append((kind, wall, cpu, scores, {k: p.roi_weights for k, p in decoded[next(iter(decoded))].alphas.items()}))
        print(f"{kind}: {wall:.1f} s wall, {cpu:.1f} s CPU", flush=True)
    sets = list(tests)
    print("\n| decoder | wall / CPU time (s) | " + " | ".join(f"{s} profile r | {s} feature ident." for s in sets) + " |")
    print("|---|---|" + "---|---|" * len(sets))
    for kind, wall, cpu, scores, _ in rows:
        cells = " | ".join(f"{np.mean([scores[s][k]['profile_correlation'] for k in layers]):.3f} | "
                           f"{np.mean([scores[s][k]['feature_identification'] for k in layers]):.1%}" for s in sets)
        print(f"| {kind} | {wall:.0f} / {cpu:.0f} | {cells} |")
    print("\nprofile r per layer (natural / shapes / letters):")
    for kind, _, _, scores, _ in rows:
        print(f"| {kind} | " + " | ".join(" / ".join(f"{scores[s][k]['profile_correlation']:.3f}" for s in sets)
                                          for k in layers) + " |")
    for kind, _, _, _, weights in rows:
        if kind == "banded":
            print("\nROI weights per layer:")
            for k, w in weights.items():
                print(f"| {k} | " + " | ".join(f"{r} {v:.2f}" for r, v in w.items()) + " |")


if __name__ == "__main__":
    main()
