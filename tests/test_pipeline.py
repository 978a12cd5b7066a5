"""End to end on a tiny configuration, through the command line, and the user errors it reports."""
import json
import shutil

import h5py
import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from brainrecon.cli import app
from brainrecon.data.bdata import read_bdata, write_bdata

runner = CliRunner()


def _run_args(subject, out, *extra, tests=("natural", "shapes", "letters")):
    args = ["run", "--train", str(subject / "train.h5"), "--images", str(subject / "images"), "--out", str(out),
            "--image-size", "32", "--iterations", "40"]
    for t in tests:
        args += ["--test", f"{t}={subject / f'test_{t}.h5'}"]
    return args + list(extra)


def test_end_to_end_tiny(small_subject, tmp_path):
    subject, _ = small_subject
    out = tmp_path / "run"
    result = runner.invoke(app, _run_args(subject, out))
    assert result.exit_code == 0, result.output
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics) == {"natural", "shapes", "letters"}
    for name, n in (("natural", 6), ("shapes", 40), ("letters", 10)):
        m = metrics[name]
        assert m["n_images"] == n and len(list((out / "recon" / name).glob("*.png"))) == n
        assert 0.0 <= m["pixel_identification"] <= 1.0
        assert set(m["feature_decoding"]) == {f"conv{b}_{i}" for b, k in enumerate([2, 2, 3, 3, 3], 1) for i in range(1, k + 1)}
    # decoders are fit on each training image's mean presentation (the small subject: 200 images x 5)
    assert "fit on the mean presentation of each of 200 images" in result.output
    # the reconstruction weighs units by their cross-validated decoding R^2
    assert "weighs units by decoding reliability in 13 of 13 layers" in result.output
    run_alphas = json.loads((out / "run.json").read_text())["alphas"]
    assert all(0.0 < a["unit_r2_median"] < 1.0 for a in run_alphas.values())
    # each test set's penalty is cross-validated for its trial-averaged inputs: never above the single-trial one
    for a in run_alphas.values():
        assert set(a["test_alpha"]) == {"natural", "shapes", "letters"}
        assert all(t <= a["alpha"] for t in a["test_alpha"].values())
        assert all(r > a["cv_r2"] for r in a["test_cv_r2"].values())   # averaged inputs are predicted better
    assert any(t < a["alpha"] for a in run_alphas.values() for t in a["test_alpha"].values())
    # even this tiny subject carries the shapes' colours: well above chance
    assert metrics["shapes"]["pixel_identification"] > 0.58
    assert metrics["shapes"]["pixel_identification_true_features"] > 0.9
    assert metrics["shapes"]["feature_decoding"]["conv3_1"]["feature_identification"] > 0.7
    # resemblance to the own stimulus: from true features closer than from fMRI, both above nothing
    for key in ("pixel_correlation", "ssim"):
        assert metrics["shapes"][f"{key}_true_features"] > metrics["shapes"][key] > 0.0
    html = (out / "report.html").read_text()
    assert "<th>SSIM</th>" in html
    assert html.count("data:image/png;base64,") > 2 * (6 + 40 + 10) and "test-retest" in html
    assert "(single trials " in html                       # the layer table shows the penalties used
    assert "decoders fit on each image's mean presentation" in html
    # evaluation.json at the end of the run: intervals, the retrieval baseline of every test set, in the report
    results = json.loads((out / "evaluation.json").read_text())["results"]
    assert {r["test_set"] for r in results if r["metric"] == "retrieval_baseline_pixel_identification"} == set(metrics)
    pixel = next(r for r in results if (r["test_set"], r["source"], r["metric"]) == ("shapes", "decoded", "pixel_identification"))
    assert pixel["value"] == pytest.approx(metrics["shapes"]["pixel_identification"], abs=0.02)   # from the 8-bit PNGs
    assert "Evaluation with uncertainty" in html and (out / "metrics.csv").is_file()
    # snapshots: the images at 0, 5, 12.5, 25 and 50% of the iterations, saved and in the report
    label = sorted((out / "recon" / "shapes").glob("*.png"))[0].stem
    snaps = sorted((out / "recon_snapshots" / "shapes" / label).glob("*.png"))
    assert [p.name for p in snaps] == [f"iter{i:05d}.png" for i in (0, 2, 5, 10, 20)]
    first, half = (np.asarray(Image.open(p), float) for p in (snaps[0], snaps[-1]))
    final = np.asarray(Image.open(out / "recon" / "shapes" / f"{label}.png"), float)
    assert np.abs(first - final).mean() > np.abs(half - final).mean()   # the image converges
    evolving = "How the reconstructions evolve (iterations 0, 2, 5, 10, 20, final)"
    assert html.count(evolving) == 3
    # a second run reuses the finished reconstructions (and their snapshots)
    again = runner.invoke(app, _run_args(subject, out))
    assert again.exit_code == 0 and "reused finished reconstructions" in again.output
    assert (out / "report.html").read_text().count(evolving) == 3
    assert json.loads((out / "metrics.json").read_text())["shapes"]["pixel_identification"] == \
        metrics["shapes"]["pixel_identification"]
    # the folder belongs to that run: other settings are refused, naming what differs, unless --overwrite
    refused = runner.invoke(app, _run_args(subject, out, "--unit-weighting", "none"))
    assert refused.exit_code == 2 and "holds another run (it differs in unit_weighting)" in refused.output
    # equal unit weights: a reconstruction setting, the decoded features are reused
    equal = runner.invoke(app, _run_args(subject, out, "--unit-weighting", "none", "--no-true-features",
                                         "--snapshots", "none", "--overwrite"))
    assert equal.exit_code == 0, equal.output
    assert not (out / "recon_true_features").exists() and not (out / "recon_snapshots").exists()  # none stale
    assert "reused decoded features" in equal.output and "weighs units" not in equal.output
    assert not np.array_equal(final, np.asarray(Image.open(out / "recon" / "shapes" / f"{label}.png"), float))
    # other settings (here decoders fit on single presentations, as in the paper) keep the training-feature cache
    other = runner.invoke(app, _run_args(subject, out, tests=("letters",)) + ["--iterations", "3",
                                                                               "--train-trials", "single",
                                                                               "--overwrite"])
    assert other.exit_code == 0, other.output
    assert "fit on 1000 single presentations" in other.output and "reused decoded features" not in other.output
    assert len(list((out / "cache").glob("features-*.h5"))) == 1


def _expect_error(args, *needles):
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    text = " ".join(result.output.split())
    for needle in needles:
        assert needle in text, text
    assert "Traceback" not in result.output


def test_user_errors(small_subject, tmp_path):
    subject, paths = small_subject
    out = tmp_path / "err"
    _expect_error(_run_args(subject, out, tests=("shapes",)) + ["--roi", "ROI_V9"], "ROI_V9", "train.h5")
    missing = ["run", "--train", str(tmp_path / "nope.h5"), "--test", f"x={paths['shapes']}",
               "--images", str(subject / "images"), "--out", str(out)]
    _expect_error(missing, "nope.h5", "no such file")
    notbdata = tmp_path / "plain.h5"
    with h5py.File(notbdata, "w") as f:
        f["x"] = np.zeros(3)
    _expect_error(["run", "--train", str(notbdata), "--test", f"x={paths['shapes']}", "--images",
                   str(subject / "images"), "--out", str(out)], "plain.h5", "not a BData file")
    # labels with no image
    images = tmp_path / "images"
    shutil.copytree(subject / "images", images)
    (images / "letter_A.png").unlink()
    _expect_error(["run", "--train", str(paths["train"]), "--test", f"letters={paths['letters']}", "--images",
                   str(images), "--out", str(out)], "letter_A", str(images))
    # NaN voxels
    b = read_bdata(paths["letters"])
    vox = np.flatnonzero(b.columns("VoxelData"))
    b.dataset[3, vox[5]] = np.nan
    nan_file = tmp_path / "nan.h5"
    write_bdata(nan_file, b)
    _expect_error(["run", "--train", str(paths["train"]), "--test", f"letters={nan_file}", "--images",
                   str(subject / "images"), "--out", str(out)], "nan.h5", "NaN")
    # train/test voxel mismatch
    b = read_bdata(paths["letters"])
    keep = np.ones(b.dataset.shape[1], bool)
    keep[vox[:10]] = False
    b.dataset = b.dataset[:, keep]
    b.metadata = {k: (d, v[keep]) for k, (d, v) in b.metadata.items()}
    fewer = tmp_path / "fewer.h5"
    write_bdata(fewer, b)
    _expect_error(["run", "--train", str(paths["train"]), "--test", f"letters={fewer}", "--images",
                   str(subject / "images"), "--out", str(out)], "fewer.h5", "voxels", "same subject")
    _expect_error(_run_args(subject, out, tests=()) + ["--test", "justapath.h5"], "NAME=PATH")


def test_bdpy_written_files_run(small_subject, tmp_path):
    """The pipeline runs on files written by bdpy itself (another subject than the demo's)."""
    bdpy = pytest.importorskip("bdpy")
    subject, paths = small_subject
    rewritten = tmp_path / "bdpy_subject"
    rewritten.mkdir()
    for name in ("train", "shapes"):
        src = read_bdata(paths[name])
        b = bdpy.BData()
        for key, (desc, values) in src.metadata.items():
            if key in ("VoxelData", "Run", "Block", "stimulus_name"):
                cols = values == 1
                b.add(src.dataset[:, cols], key)
        for key, (desc, values) in src.metadata.items():
            if key.startswith("ROI_") or key.startswith("voxel_"):
                b.add_metadata(key, values[src.columns("VoxelData")], desc, where="VoxelData")
        b.add_vmap("stimulus_name", src.vmap["stimulus_name"])
        b.save(str(rewritten / f"{name}.h5"))
    out = tmp_path / "out"
    result = runner.invoke(app, ["run", "--train", str(rewritten / "train.h5"), "--test",
                                 f"shapes={rewritten / 'shapes.h5'}", "--images", str(subject / "images"),
                                 "--out", str(out), "--image-size", "32", "--iterations", "40",
                                 "--no-true-features"])
    assert result.exit_code == 0, result.output
    assert json.loads((out / "metrics.json").read_text())["shapes"]["pixel_identification"] > 0.58


def test_layer_rois(small_subject, tmp_path):
    from brainrecon.pipeline import PipelineConfig, roi_for_layer

    cfg = PipelineConfig(layer_rois={"conv1": "ROI_V1", "conv1_2": "ROI_V2", "conv5_3": "ROI_LOC"})
    assert [roi_for_layer(k, cfg) for k in ("conv1_1", "conv1_2", "conv2_1", "conv5_3")] == \
        ["ROI_V1", "ROI_V2", "ROI_VC", "ROI_LOC"]
    subject, _ = small_subject
    out = tmp_path / "rois"
    result = runner.invoke(app, _run_args(subject, out, tests=("shapes",)) +
                           ["--iterations", "5", "--no-true-features", "--layer-roi", "conv1=ROI_V1+ROI_V2+ROI_V3",
                            "--no-evaluation"])
    assert result.exit_code == 0, result.output
    # --no-evaluation: no evaluation files, the report without its section, metrics.json as always
    assert not (out / "evaluation.json").exists() and not (out / "metrics.csv").exists()
    assert "pixel_identification" in json.loads((out / "metrics.json").read_text())["shapes"]
    run = json.loads((out / "run.json").read_text())
    assert run["layer_rois"]["conv1_1"] == "ROI_V1+ROI_V2+ROI_V3" and run["layer_rois"]["conv2_1"] == "ROI_VC"
    assert "decoder for ROI_V1+ROI_V2+ROI_V3" in result.output


def test_per_unit_penalties(small_subject, tmp_path):
    subject, _ = small_subject
    out = tmp_path / "unit_alpha"
    result = runner.invoke(app, _run_args(subject, out, tests=("shapes",)) +
                           ["--iterations", "3", "--no-true-features", "--layers", "conv2_1,conv5_3",
                            "--alpha-per", "unit", "--snapshots", "none"])
    assert result.exit_code == 0, result.output
    assert "per-unit penalties are chosen for single presentations" in " ".join(result.output.split())
    alphas = json.loads((out / "run.json").read_text())["alphas"]
    units = {"conv2_1": 128 * 16 * 16, "conv5_3": 512 * 2 * 2}
    for layer, n in units.items():
        chosen = {float(a): c for a, c in alphas[layer]["unit_alpha_counts"].items()}
        assert sum(chosen.values()) == n and alphas[layer]["alpha_per"] == "unit" and "test_alpha" not in alphas[layer]
        layer_alpha = alphas[layer]["alpha"]
        assert all(layer_alpha / 30 <= a <= layer_alpha * 30 for a in chosen)
    assert len(chosen) > 1                       # units differ in their best penalty
    assert all(-1.0 < alphas[k]["unit_r2_median"] < 1.0 for k in units)
    assert not (out / "recon_snapshots").exists()
    assert "(per unit, median " in (out / "report.html").read_text()
    m = json.loads((out / "metrics.json").read_text())["shapes"]
    assert m["feature_decoding"]["conv5_3"]["profile_correlation"] > 0.2


def test_run_with_a_vgg19_state_dict(small_subject, tmp_path, monkeypatch):
    """All 19 paper layers (conv1_1 ... fc8) flow through decoding and reconstruction."""
    import torch
    from brainrecon.nets.vgg import VGGEncoder

    torch.manual_seed(0)
    net = VGGEncoder("vgg19", classifier=True, ceil_mode=False)
    state = {}
    k = 0
    for conv in net.convs:                      # torchvision's key layout: features.N, classifier.N
        state[f"features.{k}.weight"], state[f"features.{k}.bias"] = conv.weight * 0.5, conv.bias
        k += 2 if k not in (2, 7, 16, 25) else 3
    for j, fc in zip((0, 3, 6), net.fcs):
        state[f"classifier.{j}.weight"], state[f"classifier.{j}.bias"] = fc.weight, fc.bias
    path = tmp_path / "VGG_ILSVRC_19_layers.pt"
    torch.save(state, path)
    subject, _ = small_subject
    out = tmp_path / "vgg19"
    result = runner.invoke(app, _run_args(subject, out, tests=("shapes",)) +
                           ["--iterations", "3", "--no-true-features", "--network", f"vgg19-caffe:{path}"])
    assert result.exit_code == 0, result.output
    layers = json.loads((out / "metrics.json").read_text())["shapes"]["feature_decoding"]
    assert len(layers) == 19 and list(layers)[-3:] == ["fc6", "fc7", "fc8"]
    bad = runner.invoke(app, _run_args(subject, out, tests=("shapes",)) + ["--network", "resnet50"])
    assert bad.exit_code == 2 and "unknown network" in bad.output

    # the real-data example config runs to the end with fixture files where the downloads would be
    from pathlib import Path
    home = tmp_path / "user" / ".cache" / "brainrecon"
    (home / "fmri").mkdir(parents=True)
    (home / "models" / "VGG_ILSVRC_19_layers").mkdir(parents=True)
    shutil.copy(subject / "train.h5", home / "fmri" / "sub-01_perceptionNaturalImageTraining_original_VC.h5")
    shutil.copy(subject / "test_natural.h5", home / "fmri" / "sub-01_perceptionNaturalImageTest_original_VC.h5")
    shutil.copy(path, home / "models" / "VGG_ILSVRC_19_layers" / "VGG_ILSVRC_19_layers.pt")
    shutil.copytree(subject / "images", home / "images")
    example = Path(__file__).resolve().parents[1] / "examples" / "dir-subject1-vgg19.yaml"
    monkeypatch.setenv("HOME", str(tmp_path / "user"))
    result = runner.invoke(app, ["run", str(example), "--out", str(tmp_path / "example"), "--image-size", "32",
                                 "--iterations", "2", "--no-true-features"])
    assert result.exit_code == 0, result.output
    metrics = json.loads((tmp_path / "example" / "metrics.json").read_text())
    assert metrics["natural"]["n_images"] == 6 and len(metrics["natural"]["feature_decoding"]) == 19


def test_run_from_a_config_file(small_subject, tmp_path):
    """`brainrecon run CONFIG.yaml`: option names as keys, paths relative to the file, flags win."""
    subject, _ = small_subject
    shutil.copytree(subject, tmp_path / "data")
    cfg = tmp_path / "study.yaml"
    cfg.write_text("train: data/train.h5\ntest:\n  letters: data/test_letters.h5\nimages: data/images\n"
                   "out: results\nimage_size: 32\niterations: 50\nno_true_features: true\n"
                   "layer_roi:\n  conv1: ROI_V1+ROI_V2\n")
    result = runner.invoke(app, ["run", str(cfg), "--iterations", "4"])
    assert result.exit_code == 0, result.output
    out = tmp_path / "results"
    config = json.loads((out / "config.json").read_text())
    assert config["recon"]["iterations"] == 4 and config["image_size"] == 32
    assert config["layer_rois"] == {"conv1": "ROI_V1+ROI_V2"} and config["true_feature_recon"] is False
    assert json.loads((out / "metrics.json").read_text())["letters"]["n_images"] == 10
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: data/train.h5\nepochs: 3\n")
    _expect_error(["run", str(bad)], "bad.yaml", "unknown key(s) epochs", "valid keys")
    partial = tmp_path / "partial.yaml"
    partial.write_text("train: data/train.h5\n")
    _expect_error(["run", str(partial)], "missing --test, --images, --out")


def test_compare_layers_and_rois(small_subject, tmp_path):
    subject, _ = small_subject
    out = tmp_path / "layers"
    args = ["compare", "layers", "--train", str(subject / "train.h5"), "--images", str(subject / "images"),
            "--test", f"letters={subject / 'test_letters.h5'}", "--out", str(out), "--image-size", "32",
            "--iterations", "3", "--layers", "conv1_1,conv2_1,conv3_1"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    comparison = json.loads((out / "comparison.json").read_text())
    assert list(comparison["variants"]) == ["conv1", "conv1-conv2", "conv1-conv3"]
    # one decoding serves every layer set: the later variants reuse it
    assert result.output.count("reused decoded features") == 2
    for name in comparison["variants"]:
        assert len(list((out / name / "recon" / "letters").glob("*.png"))) == 10
    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 4 * 10 + 1      # stimuli, three variants, the figure

    out = tmp_path / "rois"
    args[1] = "rois"
    args[args.index("--out") + 1] = str(out)
    result = runner.invoke(app, args + ["--variants", "V1,HVC"])
    assert result.exit_code == 0, result.output
    comparison = json.loads((out / "comparison.json").read_text())
    assert list(comparison["variants"]) == ["V1", "HVC"]
    assert json.loads((out / "V1" / "config.json").read_text())["roi"] == "ROI_V1"
    assert json.loads((out / "HVC" / "config.json").read_text())["roi"] == "ROI_LOC+ROI_FFA+ROI_PPA"
