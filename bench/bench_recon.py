"""Benchmark of the reconstruction: brainrecon's gradient descent against bdpy's iCNN, and every prior.

    python bench/bench_recon.py                 # gd vs bdpy at 224 px (hed-vgg16, all 13 conv layers)
    python bench/bench_recon.py --priors        # time per iteration of every prior at 48 px, batch 16
    python bench/bench_recon.py --write docs/benchmarks.md   # also write the "Reconstruction" section

Times are the minimum over ``--repeats`` runs (the machine may be shared). The fraction of peak
relates the convolution FLOPs of an iteration (forward, plus the backward pass to the input only:
the weights are frozen, so about twice the forward) to the float32 GEMM throughput measured here.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import io
import os
import platform
import re
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from brainrecon.data.natural import natural_images
from brainrecon.nets import load_network
from brainrecon.recon.base import PIXEL_MEAN
from brainrecon.recon.icnn import ReconConfig, reconstruct
from brainrecon.recon.objective import FeatureLoss, layer_weights


def gemm_gflops(n: int = 2048, repeats: int = 5) -> dict[str, float]:
    """float32 GEMM throughput (GFLOP/s, best of ``repeats``) of torch.mm and numpy's BLAS."""
    a, b = torch.rand(n, n), torch.rand(n, n)
    out = {}
    for name, mm, args in [("torch.mm", torch.mm, (a, b)), ("numpy", np.matmul, (a.numpy(), b.numpy()))]:
        mm(*args)
        best = min(_timed(lambda mm=mm, args=args: mm(*args)) for _ in range(repeats))
        out[name] = 2 * n ** 3 / best / 1e9
    return out


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def conv_flops(network, size: int, layers: list[str]) -> float:
    """Forward FLOPs (2 per multiply-add) of one image through the convolutions up to the deepest of ``layers``."""
    shapes = network.unit_shapes(size)
    last = max(network.layer_names.index(k) for k in layers)
    total = 0.0
    for conv, name in zip(network.convs[:last + 1], network.layer_names):
        c_out, h, w = shapes[name]
        total += 2 * conv.in_channels * c_out * conv.kernel_size[0] * conv.kernel_size[1] * h * w
    return total


class BdpyEncoder(nn.Module):
    """Our encoder as bdpy wants it: ``forward(x)`` with x (1, 3, H, W) RGB 0-255 minus the mean colour
    (bdpy's image space here) runs it, bdpy's hooks on ``convs[i]`` read the layers. (The conversion
    to [0, 1] is done here: bdpy's ``encoder_preproc`` replaces the image tensor by a non-leaf one,
    and its gradient normalisation then fails.)"""

    def __init__(self, net, layers):
        super().__init__()
        self.net, self.layers, self.convs = net, layers, net.convs
        self.register_buffer("pixel_mean", torch.tensor(PIXEL_MEAN).view(1, 3, 1, 1))

    def forward(self, x):
        return self.net((x + self.pixel_mean) / 255.0, self.layers)


def run_bdpy(targets: dict[str, torch.Tensor], network, start: np.ndarray, iterations: int,
             trainable: bool = False) -> tuple[np.ndarray, float]:
    """bdpy's iCNN for each image (it does one at a time): (images (n, 3, H, W) in [0, 1], seconds per iteration).

    Same network, targets, layer weights, schedules (lr 2 -> 1e-10, momentum 0.9, decay 0.2 -> 1e-10,
    blur 2 -> 0.5) and start images (``start`` (n, H, W, 3) 0-255) as brainrecon's gd.
    ``trainable``: give bdpy a copy of the network whose weights require gradients, as a network
    built and filled with ``load_state_dict`` is (bdpy never freezes its encoder: it zeroes the
    weight gradients it accumulates); otherwise the frozen network (bdpy's best case).
    """
    if trainable:
        network = copy.deepcopy(network).requires_grad_(True)
    from bdpy.recon.torch.icnn import reconstruct as bdpy_reconstruct

    layers = list(targets)
    mapping = {k: f"convs[{network.layer_names.index(k)}]" for k in layers}
    encoder = BdpyEncoder(network, layers)
    mean = np.array(PIXEL_MEAN, dtype=np.float32).reshape(3, 1, 1)
    out, secs = [], []
    for i in range(len(start)):
        feats = {k: v[i:i + 1].numpy() for k, v in targets.items()}
        w = layer_weights({k: v[i:i + 1] for k, v in targets.items()})
        weights = {k: float(v[0]) for k, v in w.items()}
        with tempfile.TemporaryDirectory() as tmp, contextlib.redirect_stdout(io.StringIO()):
            t0 = time.perf_counter()
            x = bdpy_reconstruct(
                feats, encoder, layer_mapping=mapping, n_iter=iterations, lr=(2.0, 1e-10), momentum=(0.9, 0.9),
                decay=(0.2, 1e-10), layer_weights=weights, image_size=start[i].shape, initial_image=start[i],
                preproc=lambda im: np.ascontiguousarray(im.transpose(2, 0, 1)) - mean,  # HWC 0-255 -> CHW - mean
                postproc=lambda im: (im + mean) / 255.0,
                blurring=True, sigma=(2.0, 0.5), output_dir=tmp, save_snapshot=False, disp_interval=10 ** 9)
            secs.append((time.perf_counter() - t0) / iterations)
        out.append(x)
    return np.stack(out).astype(np.float32), float(np.mean(secs))


def feature_problem(size: int, n: int):
    """(network, layers, targets of ``n`` held-out natural images at ``size`` px, their FeatureLoss)."""
    net = load_network("hed-vgg16")
    layers = net.layer_names
    _, test = natural_images(1, n, size)
    with torch.inference_mode():
        targets = {k: v.clone() for k, v in net(torch.from_numpy(test.images), layers).items()}
    return net, layers, targets, FeatureLoss(net, targets)


def bench_vs_bdpy(args) -> list[str]:
    size, n, its = args.size, args.images, args.iterations
    net, layers, targets, loss = feature_problem(size, n)
    peak = gemm_gflops()
    flops = 2 * conv_flops(net, size, layers)  # forward + backward to the input, per image-iteration
    cfg = ReconConfig(iterations=its, batch_size=n)
    gen = torch.Generator().manual_seed(cfg.seed * 100003)   # the start images of brainrecon's single batch
    start = (torch.rand(n, 3, size, size, generator=gen) * 255).permute(0, 2, 3, 1).numpy()
    start_loss = loss.evaluate(torch.from_numpy(start).permute(0, 3, 1, 2) / 255)

    rows = []
    for label, batch in [(f"brainrecon gd, batch {n}", n), ("brainrecon gd, batch 1", 1)]:
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            images, _ = reconstruct(targets, net, size, cfg.model_copy(update={"batch_size": batch}))
            times.append((time.perf_counter() - t0) / its / n)
        ratio = loss.evaluate(images) / start_loss if batch == n else None
        rows.append((label, min(times), ratio))
        print(label, [round(t, 3) for t in times], flush=True)
    for label, trainable in [("bdpy 0.26 iCNN (one image at a time), frozen encoder", False),
                             ("bdpy 0.26 iCNN (one image at a time), encoder as loaded (weights trainable)", True)]:
        times = []
        for _ in range(args.repeats):
            bd_images, sec = run_bdpy(targets, net, start, its, trainable=trainable)
            times.append(sec)
            print(label, round(sec, 3), flush=True)
        rows.append((label, min(times), loss.evaluate(torch.from_numpy(bd_images)) / start_loss))

    best = max(peak.values())
    lines = [f"### brainrecon gd vs bdpy ({size} px, hed-vgg16 all 13 conv layers, {n} images, {its} iterations)", "",
             (f"float32 GEMM here: torch.mm {peak['torch.mm']:.0f} GFLOP/s, numpy {peak['numpy']:.0f} GFLOP/s "
              f"(peak taken as {best:.0f}). One image-iteration: {flops / 1e9:.1f} GFLOP of convolutions "
              "(forward + backward to the input)."), "",
             "| run | s per image-iteration | GFLOP/s | fraction of GEMM peak | final / start feature loss (mean, max) |",
             "|---|---|---|---|---|"]
    for label, t, ratio in rows:
        r = "-" if ratio is None else f"{float(ratio.mean()):.3f}, {float(ratio.max()):.3f}"
        lines.append(f"| {label} | {t:.3f} | {flops / t / 1e9:.0f} | {flops / t / 1e9 / best:.0%} | {r} |")
    return lines


def bench_priors(args) -> list[str]:
    size, n, its = 48, 16, args.prior_iterations
    net, layers, targets, loss = feature_problem(size, n)
    grey = torch.tensor(PIXEL_MEAN).view(1, 3, 1, 1).expand(n, 3, size, size) / 255
    reference = loss.evaluate(grey)   # the priors start differently: compare to the mean-colour image
    generator, note = None, ""
    try:  # the paper's DGN architecture (random weights: only its cost matters here)
        from brainrecon.nets.generator import Relu7Generator
        generator = Relu7Generator().eval().requires_grad_(False)
        note = ("generator: the relu7 DGN architecture with random weights (its output hardly depends on the "
                "latent, so its loss says nothing), 256 px output cropped to 224 and resized to 48")
    except Exception as err:  # noqa: BLE001 - the generator module is optional here
        note = f"generator prior skipped ({type(err).__name__}: {err})"
    priors = [p for p in ["gd", "lbfgs", "generator", "fourier", "dip"] if p != "generator" or generator is not None]
    times, ratios = {p: [] for p in priors}, {}
    for _ in range(args.repeats):   # round robin, so that changes in the machine's load hit every prior alike
        for prior in priors:
            cfg = ReconConfig(prior=prior, iterations=its, batch_size=n, generator={"crop": 224})
            t0 = time.perf_counter()
            images, _ = reconstruct(targets, net, size, cfg, generator=generator)
            times[prior].append((time.perf_counter() - t0) / its)
            ratios[prior] = float((loss.evaluate(images) / reference).median())
            print(prior, round(times[prior][-1], 3), round(ratios[prior], 3), flush=True)
    t_net = []
    for _ in range(args.repeats):   # the network alone: forward + backward to the input of the batch
        x = torch.rand(n, 3, size, size, requires_grad=True)
        t_net.append(_timed(lambda x=x: torch.autograd.grad(loss(x).sum(), x)))
    flops = 2 * conv_flops(net, size, layers)
    lines = [f"### Priors ({size} px, batch {n}, hed-vgg16 all 13 conv layers, {its} iterations)", "",
             ("| prior | s per iteration (batch of 16) | s per image-iteration | loss after "
              f"{its} iterations / loss of the mean-colour image (median) |"), "|---|---|---|---|"]
    for prior in priors:
        t = min(times[prior])
        lines.append(f"| {prior} | {t:.3f} | {t / n:.4f} | {ratios[prior]:.3f} |")
    lines += ["", (f"The network alone (forward + backward to the input, batch of 16): {min(t_net):.3f} s; "
                   f"{flops / 1e9:.2f} GFLOP of convolutions per image-iteration. {note}.")]
    return lines


def write_section(path: Path, lines: list[str]) -> None:
    """Replace (or append) the '## Reconstruction' section of ``path``, leaving other sections alone."""
    section = "## Reconstruction\n\n" + "\n".join(lines).rstrip() + "\n"
    text = path.read_text() if path.exists() else ""
    m = re.search(r"^## Reconstruction\n.*?(?=^## |\Z)", text, flags=re.DOTALL | re.MULTILINE)
    if m:
        text = text[:m.start()] + section + ("\n" if text[m.end():] else "") + text[m.end():]
    else:
        text = (text.rstrip() + "\n\n" if text.strip() else "") + section
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--images", type=int, default=3)
    p.add_argument("--iterations", type=int, default=20)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--priors", action="store_true", help="also time every prior at 48 px, batch 16")
    p.add_argument("--prior-iterations", type=int, default=10)
    p.add_argument("--skip-bdpy", action="store_true", help="only the priors")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    p.add_argument("--write", type=Path, help="write the results as the 'Reconstruction' section of this file")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
        try:  # numpy's BLAS too, so that its GEMM peak is measured on as many threads
            from threadpoolctl import threadpool_limits
            threadpool_limits(args.threads)
        except ImportError:
            print("threadpoolctl is not installed: numpy's GEMM uses all cores", file=sys.stderr)
    command = " ".join(["python bench/bench_recon.py", *(sys.argv[1:] if argv is None else argv)])
    lines = [(f"Run with `{command}` on {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__} "
              f"({torch.get_num_threads()} threads). Times are the minimum of {args.repeats} runs."), ""]
    if not args.skip_bdpy:
        lines += bench_vs_bdpy(args) + [""]
    if args.priors:
        lines += bench_priors(args) + [""]
    print("\n".join(lines))
    if args.write:
        write_section(args.write, lines)


if __name__ == "__main__":
    main()
