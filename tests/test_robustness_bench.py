"""bench/robustness.py: which cells it runs and the table it writes (no pipeline run here)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

import robustness  # noqa: E402  (bench/ is not a package)


def _args(**kw):
    base = dict(decoders=["kernel", "no-such-decoder", "selection"], priors=["gd", "fourier"], default_prior="gd",
                default_decoder="kernel", image_size=32, iterations=5, n_train=40, voxel_scale=0.25,
                n_test_natural=4, sets=["shapes", "letters"])
    return argparse.Namespace(**{**base, **kw})


def test_cells_skip_refused_decoders_with_a_note(capsys):
    runs = robustness.variants(_args())
    assert list(runs) == ["decoder kernel", "decoder selection", "prior fourier"]   # gd is the kernel cell
    assert "skipping decoder 'no-such-decoder'" in capsys.readouterr().out
    assert runs["prior fourier"].recon.prior == "fourier" and runs["decoder selection"].recon.prior == "gd"
    assert all(r.image_size == 32 and r.recon.iterations == 5 and not r.true_feature_recon for r in runs.values())


def test_reduced_subjects_and_their_keys():
    a = robustness.subject_config("dn-stats:1", _args())
    assert a.model == "dn-stats" and a.stats_cortex.seed == 1 and a.n_train_images == 40 and a.train_reps == 3
    assert a.stats_cortex.rois["V1"].n_voxels == 200
    b = robustness.subject_config("css-vgg:0", _args())
    assert b.cortex.rois["V1"].n_voxels == 350 and b.train_reps == 5
    runs = robustness.variants(_args())
    keys = {robustness.cell_key(s, c, ["shapes"]) for s in (a, b) for c in runs.values()}
    assert len(keys) == 2 * len(runs)


def test_table_means_over_subjects():
    cells = [{"subject": s, "variant": "decoder kernel", "seconds": 10.0 * (i + 1),
              "sets": {"shapes": {"pixel_identification": p, "baseline_pixel_identification": 0.6}}}
             for i, (s, p) in enumerate([("css-vgg:0", 0.8), ("dn-stats:0", 0.7)])]
    text = robustness.markdown(cells, _args(sets=["shapes"]), ["decoder kernel"], ["css-vgg:0", "dn-stats:0"])
    row = next(line for line in text.splitlines() if line.startswith("| decoder kernel"))
    assert "80.0% (60.0%) | 70.0% (60.0%) | **75.0%** | 60.0% | 15 |" in row
    assert "32 px, 5 iterations" in text
