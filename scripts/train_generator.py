"""Train the builtin generator (brainrecon.nets.generator.BuiltinGenerator) on CPU.

Data: a pool of images made once from a seeded random stream, each encoded once (the encoder is most of
the cost, so each image is reused over several passes):
- random crops (scale, position, flip) of the TRAINING part of each scikit-image picture
  (brainrecon.data.natural.split_source: the held-out test tiles are never seen);
- procedural scenes: random backgrounds (flat, gradient, smooth noise) with random rectangles, ellipses,
  polygons, strokes and text-like glyphs in random colours;
both with colour jitter (brightness, contrast, saturation). The latent bounds and scales come from the pool.

Loss: pixel MSE on the batch + ``feat_weight`` x normalised MSE of hed-vgg16 conv2_2 and conv3_1
(pre-ReLU) features on the first ``feat_batch`` images of each batch.

    nice -n 10 python scripts/train_generator.py --max-minutes 47

writes ``<out>/builtin_generator.pt`` (float16 state dict) and ``<out>/builtin_generator.json`` (settings,
loss curves, held-out test-tile scores, time, sha256). Checkpoints are written as it goes.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import string
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont

from brainrecon.data.natural import SOURCES, load_source, natural_images, split_source
from brainrecon.nets import load_network
from brainrecon.nets.generator import BUILTIN_LATENT_SHAPE, BUILTIN_WIDTHS, BuiltinGenerator

FEAT_LAYERS = ("conv2_2", "conv3_1")  # conv1_2 as well gave stripe artefacts
GLYPHS = string.ascii_letters + string.digits + "#$%&*+=?@<>{}[]~"


def random_colour(rng: np.random.Generator) -> tuple[int, int, int]:
    """Uniform RGB, or (30%) a saturated corner of the colour cube, or (15%) a grey."""
    u = rng.random()
    if u < 0.3:
        c = rng.integers(0, 2, 3) * 255
    elif u < 0.45:
        c = np.full(3, rng.integers(0, 256))
    else:
        c = rng.integers(0, 256, 3)
    return tuple(int(v) for v in c)


def random_background(rng: np.random.Generator, big: int) -> Image.Image:
    kind = rng.random()
    if kind < 0.4:
        return Image.new("RGB", (big, big), random_colour(rng))
    if kind < 0.7:  # linear gradient between two colours in a random direction
        a, b = np.array(random_colour(rng), float), np.array(random_colour(rng), float)
        theta = rng.uniform(0, 2 * np.pi)
        yy, xx = np.mgrid[0:big, 0:big] / big - 0.5
        t = np.clip((xx * np.cos(theta) + yy * np.sin(theta)) + 0.5, 0, 1)[..., None]
        return Image.fromarray((a * (1 - t) + b * t).astype(np.uint8))
    cells = int(rng.integers(2, 9))  # smooth colour noise
    small = rng.integers(0, 256, (cells, cells, 3), dtype=np.uint8)
    return Image.fromarray(small).resize((big, big), Image.BICUBIC)


def random_scene(rng: np.random.Generator, size: int) -> np.ndarray:
    """A procedural scene ``(3, size, size)`` float32 in [0, 1] (drawn at 2x, then downsampled)."""
    big = 2 * size
    img = random_background(rng, big)
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(1, 7))):
        kind = rng.choice(["rect", "ellipse", "polygon", "stroke", "glyph"], p=[0.22, 0.22, 0.16, 0.2, 0.2])
        colour = random_colour(rng)
        cx, cy = rng.uniform(0, big, 2)
        half = rng.uniform(0.05, 0.45) * big
        aspect = np.exp(rng.uniform(-0.8, 0.8))
        box = [cx - half * aspect, cy - half / aspect, cx + half * aspect, cy + half / aspect]
        width = int(rng.integers(2, max(3, big // 8)))
        fill = rng.random() < 0.6
        if kind == "rect":
            draw.rectangle(box, fill=colour if fill else None, outline=colour, width=width)
        elif kind == "ellipse":
            draw.ellipse(box, fill=colour if fill else None, outline=colour, width=width)
        elif kind == "polygon":
            k = int(rng.integers(3, 7))
            angles = np.sort(rng.uniform(0, 2 * np.pi, k))
            radii = half * rng.uniform(0.4, 1.0, k)
            pts = [(float(cx + r * np.cos(a)), float(cy + r * np.sin(a))) for a, r in zip(angles, radii)]
            draw.polygon(pts, fill=colour if fill else None, outline=colour, width=width)
        elif kind == "stroke":
            pts = [tuple(float(v) for v in rng.uniform(0, big, 2)) for _ in range(int(rng.integers(2, 6)))]
            draw.line(pts, fill=colour, width=width, joint="curve")
        else:  # a few random characters, possibly rotated
            text = "".join(rng.choice(list(GLYPHS), int(rng.integers(1, 4))))
            font = ImageFont.load_default(size=int(rng.uniform(0.15, 0.7) * big))
            layer = Image.new("L", (big, big), 0)
            ImageDraw.Draw(layer).text((float(cx - half), float(cy - half)), text, fill=255, font=font,
                                       stroke_width=int(rng.integers(0, 4)), stroke_fill=255)
            if rng.random() < 0.5:
                layer = layer.rotate(float(rng.uniform(-45, 45)), resample=Image.BILINEAR, center=(float(cx), float(cy)))
            img.paste(Image.new("RGB", (big, big), colour), (0, 0), layer)
    if rng.random() < 0.2:
        img = img.transpose(Image.FLIP_TOP_BOTTOM)
    return np.asarray(img.resize((size, size), Image.LANCZOS), np.float32).transpose(2, 0, 1) / 255.0


def natural_crop(rng: np.random.Generator, parts: list[np.ndarray], size: int) -> np.ndarray:
    """A random square crop of a training part ``(3, size, size)`` float32 in [0, 1]."""
    train = parts[int(rng.integers(len(parts)))]
    h, w = train.shape[:2]
    side = max(8, int(min(h, w) * rng.uniform(0.15, 1.0)))
    y, x = rng.integers(0, h - side + 1), rng.integers(0, w - side + 1)
    crop = train[y:y + side, x:x + side]
    if rng.random() < 0.5:
        crop = crop[:, ::-1]
    pil = Image.fromarray((np.clip(crop, 0, 1) * 255).round().astype(np.uint8))
    return np.asarray(pil.resize((size, size), Image.LANCZOS), np.float32).transpose(2, 0, 1) / 255.0


def colour_jitter(x: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    n = x.shape[0]
    bright = torch.from_numpy(rng.uniform(-0.1, 0.1, (n, 1, 1, 1))).float()
    contrast = torch.from_numpy(rng.uniform(0.75, 1.25, (n, 1, 1, 1))).float()
    sat = torch.from_numpy(rng.uniform(0.6, 1.3, (n, 1, 1, 1))).float()
    grey = x.mean(1, keepdim=True)
    x = grey + (x - grey) * sat
    mean = x.mean((1, 2, 3), keepdim=True)
    return ((x - mean) * contrast + mean + bright).clamp(0, 1)


def make_batch(rng, parts, n, size, natural_fraction):
    imgs = [natural_crop(rng, parts, size) if rng.random() < natural_fraction else random_scene(rng, size)
            for _ in range(n)]
    return colour_jitter(torch.from_numpy(np.stack(imgs)), rng).contiguous(memory_format=torch.channels_last)


def pixel_corr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    a, b = a.flatten(1), b.flatten(1)
    a, b = a - a.mean(1, keepdim=True), b - b.mean(1, keepdim=True)
    return (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1) + 1e-8)


def evaluate(gen, encoder, tiles):
    gen.eval()
    with torch.no_grad():
        out = gen(gen.clip_latent(BuiltinGenerator.encode(encoder, tiles)))
    gen.train()
    r = pixel_corr(out, tiles)
    return {"pixel_corr_mean": float(r.mean()), "pixel_corr_median": float(r.median()),
            "mse": float(F.mse_loss(out, tiles))}


def report(weights: Path, figure: Path) -> None:
    """Scores of the saved generator on held-out tiles, shapes and letters; a figure of originals vs reconstructions."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from brainrecon.data.stimuli import letters, shapes
    from brainrecon.nets.generator import load_builtin_generator

    gen = load_builtin_generator(weights, sha256="")
    encoder = load_network("hed-vgg16")
    size = gen.image_size
    sets = {"natural (held-out tiles)": natural_images(1, 1000, size, seed=0)[1].images,
            "shapes": shapes(size).images, "letters": letters(size).images}
    recon, rows = {}, []
    for name, images in sets.items():
        x = torch.from_numpy(images)
        with torch.no_grad():
            recon[name] = gen(gen.clip_latent(BuiltinGenerator.encode(encoder, x)))
        a, b = recon[name].flatten(1), x.flatten(1)
        a, b = a - a.mean(1, keepdim=True), b - b.mean(1, keepdim=True)
        corr = (a / a.norm(dim=1, keepdim=True)) @ (b / b.norm(dim=1, keepdim=True)).T
        ident = ((corr < corr.diag()[:, None]).sum(1).float() / (len(x) - 1)).mean()
        print(f"{name}: n={len(x)} pixel corr mean {corr.diag().mean():.3f} median {corr.diag().median():.3f}, "
              f"pairwise identification {100 * ident:.1f}%")
    picks = [("natural (held-out tiles)", list(range(0, 50, 4))), ("shapes", [0, 10, 17, 26, 35, 39]),
             ("letters", [0, 2, 5, 7, 8, 9])]
    ncol = max(len(i) for _, i in picks)
    fig, axes = plt.subplots(2 * len(picks), ncol, figsize=(ncol * 1.1, 2 * len(picks) * 1.2))
    for r, (name, idx) in enumerate(picks):
        for c in range(ncol):
            for k, img in enumerate((sets[name], recon[name].numpy())):
                ax = axes[2 * r + k, c]
                ax.axis("off")
                if c < len(idx):
                    ax.imshow(img[idx[c]].transpose(1, 2, 0).clip(0, 1))
            axes[2 * r, 0].set_title(f"{name}: original (top), encoder -> generator (bottom)", loc="left", fontsize=8)
    fig.subplots_adjust(left=0.01, right=0.99, bottom=0.01, top=0.95, wspace=0.05, hspace=0.35)
    fig.savefig(figure, dpi=110)
    print(f"wrote {figure}")


def save(gen, path: Path) -> str:
    state = {k: v.detach().to(torch.float16).contiguous() for k, v in gen.state_dict().items()}
    torch.save(state, path)
    return hashlib.sha256(path.read_bytes()).hexdigest()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=1800)
    p.add_argument("--pool", type=int, default=8192, help="training images (encoded once)")
    p.add_argument("--feat-batch", type=int, default=8, help="images per batch that get the feature loss")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--feat-weight", type=float, default=0.01)
    p.add_argument("--feat-layers", default=",".join(FEAT_LAYERS), help="encoder layers of the feature loss")
    p.add_argument("--natural-fraction", type=float, default=0.6)
    p.add_argument("--bound-quantile", type=float, default=0.999)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--log-every", type=int, default=25)
    p.add_argument("--val-every", type=int, default=200)
    p.add_argument("--max-minutes", type=float, default=0, help="stop early (recorded) after this wall time; 0: never")
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "src/brainrecon/nets/weights")
    p.add_argument("--report", type=Path, metavar="FIGURE", help="do not train: score <out>/builtin_generator.pt "
                   "and draw originals vs reconstructions to FIGURE")
    args = p.parse_args()
    if args.report:
        torch.set_num_threads(args.threads)
        return report(args.out / "builtin_generator.pt", args.report)

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    weights, record_path = args.out / "builtin_generator.pt", args.out / "builtin_generator.json"
    t0 = time.time()
    size = BuiltinGenerator.image_size

    # channels-last memory is markedly faster for CPU convolutions
    encoder = load_network("hed-vgg16").to(memory_format=torch.channels_last)
    parts = [split_source(load_source(name))[0] for name in SOURCES]  # training parts only
    tiles = torch.from_numpy(natural_images(1, 1000, size, seed=0)[1].images)  # held-out test tiles (eval only)
    print(f"data ready: {len(parts)} pictures, {len(tiles)} held-out tiles ({time.time() - t0:.0f} s)", flush=True)

    gen = BuiltinGenerator().to(memory_format=torch.channels_last)
    # the pool: images and their latents; latent statistics (per-channel scale, mean start point, per-unit upper bound)
    images, latents = [], []
    with torch.no_grad():
        for i in range(math.ceil(args.pool / 64)):
            batch = make_batch(rng, parts, 64, size, args.natural_fraction)
            images.append(batch.to(torch.float16))
            latents.append(BuiltinGenerator.encode(encoder, batch))
            if i % 20 == 0:
                print(f"pool {64 * (i + 1)}/{args.pool} ({time.time() - t0:.0f} s)", flush=True)
    images, lat = torch.cat(images)[:args.pool], torch.cat(latents)[:args.pool]
    c = BUILTIN_LATENT_SHAPE[0]
    gen.latent_scale.copy_(lat.view(len(lat), c, -1).square().mean((0, 2)).sqrt().clamp_min(1e-3))
    gen.latent_mean.copy_(lat.mean(0))
    rank = int(round(args.bound_quantile * (len(lat) - 1))) + 1  # nearest-rank quantile per unit
    gen.latent_upper.copy_(lat.kthvalue(rank, dim=0).values)
    print(f"pool of {len(lat)} images: latent upper bound median {gen.latent_upper.median():.2f}, "
          f"{int((gen.latent_upper == 0).sum())} always-zero units ({time.time() - t0:.0f} s)", flush=True)

    opt = torch.optim.Adam(gen.parameters(), lr=args.lr, betas=(0.9, 0.99))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 50) * 0.5 * (1 + math.cos(math.pi * min(s, args.steps) / args.steps)))
    curve, val_curve, acc, t_train, stopped = [], [], np.zeros(3), time.time(), None
    val_curve.append({"step": 0, **evaluate(gen, encoder, tiles)})
    nf, layers = args.feat_batch, args.feat_layers.split(",")
    for step in range(1, args.steps + 1):
        idx = torch.from_numpy(rng.choice(len(images), args.batch, replace=False))
        real = images[idx].float().contiguous(memory_format=torch.channels_last)
        fake = gen(lat[idx])
        with torch.no_grad():
            feats = encoder(real[:nf], layers)
        pix = F.mse_loss(fake, real)
        fake_feats = encoder(fake[:nf], layers)
        feat = sum(F.mse_loss(fake_feats[k], feats[k]) / feats[k].square().mean() for k in layers) / len(layers)
        loss = pix + args.feat_weight * feat
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        acc += [loss.item(), pix.item(), feat.item()]
        if step % args.log_every == 0:
            elapsed = time.time() - t_train
            loss_m, pix_m, feat_m = acc / args.log_every
            acc[:] = 0
            curve.append({"step": step, "loss": loss_m, "pixel_mse": pix_m, "feature_loss": feat_m,
                          "lr": sched.get_last_lr()[0], "elapsed_s": round(elapsed, 1)})
            print(f"step {step}/{args.steps} loss {loss_m:.4f} pix {pix_m:.4f} feat {feat_m:.3f} "
                  f"({elapsed / step:.2f} s/step, {elapsed / 60:.1f} min)", flush=True)
        over = args.max_minutes and (time.time() - t0) > 60 * args.max_minutes
        if step % args.val_every == 0 or step == args.steps or over:
            val_curve.append({"step": step, **evaluate(gen, encoder, tiles)})
            print(f"  held-out tiles: {val_curve[-1]}", flush=True)
            sha = save(gen, weights)
            record = {
                "settings": {**{k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                             "image_size": size, "latent_shape": BUILTIN_LATENT_SHAPE, "widths": BUILTIN_WIDTHS,
                             "encoder": "hed-vgg16",
                             "torch": torch.__version__},
                "steps_done": step, "finished": step == args.steps, "stopped_early": bool(over),
                "train_seconds": round(time.time() - t_train, 1), "total_seconds": round(time.time() - t0, 1),
                "n_parameters": sum(p.numel() for p in gen.parameters()),
                "loss_curve": curve, "heldout_curve": val_curve, "sha256": sha,
            }
            record_path.write_text(json.dumps(record, indent=1))
            if over:
                stopped = step
                break
    print(f"done: {stopped or args.steps} steps in {(time.time() - t0) / 60:.1f} min; {weights} sha256 {sha}", flush=True)


if __name__ == "__main__":
    main()
