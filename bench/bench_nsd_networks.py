"""Cost of the NSD protocol's evaluation networks: seconds per image at the protocol's input size.

Each network is built at full size with random weights (the cost does not depend on the weights) and
run on ``--images`` images (64 px, upsampled as the protocol does) in batches of ``--batch``; every
image passes through each network once per evaluation (reconstruction and stimulus: twice per test
image). Prints one JSON record per network.

    python bench/bench_nsd_networks.py --images 8 --threads 1 [--device cuda]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _machine import cpu_name  # noqa: E402

from brainrecon.evaluate.nsd import NSD_NETWORKS, _LAYERS, _features  # noqa: E402
from brainrecon.nets.evalnets import build_eval_network  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    images = np.random.default_rng(0).random((args.images, 3, 64, 64), dtype=np.float32)
    for name in NSD_NETWORKS:
        t0 = time.perf_counter()
        net = build_eval_network(name)
        built = time.perf_counter() - t0
        _features(net, images[:1], _LAYERS[name], args.device, 1)          # warm-up
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        _features(net, images, _LAYERS[name], args.device, args.batch)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
        print(json.dumps({"network": name, "layers": _LAYERS[name], "device": args.device,
                          "threads": args.threads, "cpu": cpu_name(), "images": args.images,
                          "build_s": round(built, 2), "s_per_image": round(seconds / args.images, 4)}), flush=True)
        del net


if __name__ == "__main__":
    main()
