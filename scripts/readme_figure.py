"""Compose docs/demo.png (stimuli above reconstructions) from a finished demo folder.

Usage: python scripts/readme_figure.py demo_out docs/demo.png
"""
import json
import sys
from pathlib import Path

import numpy as np
from PIL import Image

out, target = Path(sys.argv[1]), Path(sys.argv[2])
metrics = json.loads((out / "metrics.json").read_text())
picks = {"natural": 8, "shapes": 8, "letters": 8}
tile, gap = 96, 6
columns = []
for name, k in picks.items():
    labels = sorted(metrics[name]["per_image_pixel_identification"])
    step = max(1, len(labels) // k)
    for lab in labels[::step][:k]:
        stim = Image.open(out / "subject" / "images" / f"{lab}.png").convert("RGB").resize((tile, tile), Image.LANCZOS)
        rec = Image.open(out / "recon" / name / f"{lab}.png").convert("RGB").resize((tile, tile), Image.NEAREST)
        columns.append((stim, rec))
    columns.append(None)
columns = columns[:-1]
width = sum(tile if c else gap * 3 for c in columns) + gap * (len(columns) - 1)
canvas = Image.new("RGB", (width, 2 * tile + gap), "white")
x = 0
for c in columns:
    if c is None:
        x += gap * 4
        continue
    canvas.paste(c[0], (x, 0))
    canvas.paste(c[1], (x, tile + gap))
    x += tile + gap
target.parent.mkdir(parents=True, exist_ok=True)
canvas.save(target)
print(f"wrote {target}")
