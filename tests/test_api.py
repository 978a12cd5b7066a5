"""The public API (the README's snippet), the run folder as one run's, and cache keys that cover what
decides a result."""
import json
import shutil

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

import brainrecon as br
from brainrecon.analyses import prior_variants
from brainrecon.cli import app

runner = CliRunner()


def _run(subject, out, *extra, images=None):
    return ["run", "--train", str(subject / "train.h5"), "--test", f"letters={subject / 'test_letters.h5'}",
            "--images", str(images or subject / "images"), "--out", str(out), "--image-size", "32",
            "--iterations", "6", "--snapshots", "none", *extra]


def test_the_readme_snippet_gives_the_pipelines_results(small_subject, tmp_path):
    subject, paths = small_subject
    stimuli = subject / "images"
    # the README's snippet, at small sizes
    train = br.read_fmri(paths["train"], roi="ROI_VC")
    test = br.read_fmri(paths["letters"], roi="ROI_VC")
    net = br.load_network("hed-vgg16")
    decoder = br.FeatureDecoder(net, image_size=32).fit(train, br.load_images(stimuli, train.labels))
    decoded = decoder.predict(test)
    images = br.reconstruct(decoded, net, br.ReconConfig(prior="fourier", iterations=6))
    scores = br.evaluate(images, br.load_images(stimuli, decoded.labels))

    assert decoded.labels == sorted(set(test.labels)) and decoded.n_presentations == 12
    assert decoded.features["conv3_1"].shape == (10, 256, 8, 8) and decoded.unit_r2["conv3_1"].shape == (256, 8, 8)
    assert set(decoded.alphas) == set(net.layer_names) and decoded.alphas["conv1_1"].test_alpha["test"] > 0
    assert decoder.penalties_["conv1_1"].alpha >= decoded.alphas["conv1_1"].test_alpha["test"]
    assert np.asarray(images).shape == (10, 3, 32, 32) and 0 <= scores.pixel_identification <= 1
    # the same run through the pipeline: the same decoded features and scores
    metrics = br.run_pipeline(paths["train"], {"letters": paths["letters"]}, stimuli, tmp_path / "run",
                              br.PipelineConfig(image_size=32, true_feature_recon=False, snapshots=[],
                                                recon=br.ReconConfig(prior="fourier", iterations=6)))
    z = np.load(next((tmp_path / "run" / "cache").glob("decoded-*/decoded.npz")))
    for layer in net.layer_names:
        np.testing.assert_allclose(z[f"letters/{layer}"], decoded.features[layer], rtol=1e-5, atol=1e-5)
    assert metrics["letters"]["pixel_identification"] == pytest.approx(scores.pixel_identification)
    assert metrics["letters"]["ssim"] == pytest.approx(float(scores.ssim.mean()), abs=1e-6)


def test_a_runs_config_json_repeats_it(small_subject, tmp_path):
    subject, _ = small_subject
    first = runner.invoke(app, _run(subject, tmp_path / "a", "--prior", "fourier", "--no-true-features"))
    assert first.exit_code == 0, first.output
    again = runner.invoke(app, ["run", str(tmp_path / "a" / "config.json"), "--out", str(tmp_path / "b")])
    assert again.exit_code == 0, again.output
    a, b = (json.loads((tmp_path / x / "metrics.json").read_text()) for x in "ab")
    assert a["letters"]["pixel_identification"] == b["letters"]["pixel_identification"]
    assert json.loads((tmp_path / "b" / "config.json").read_text())["recon"]["prior"] == "fourier"
    # every setting can be given in a config file, a misspelt one is named with the valid ones
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(f"train: {subject / 'train.h5'}\ntest: {{letters: {subject / 'test_letters.h5'}}}\n"
                   f"images: {subject / 'images'}\nout: {tmp_path / 'c'}\nimage_size: 32\n"
                   "recon: {iterations: 3, fourier: {lr: 0.05}, prior: fourier}\nalpha_sampel_units: 64\n")
    bad = runner.invoke(app, ["run", str(cfg)])
    assert bad.exit_code == 2 and "unknown key(s) alpha_sampel_units" in bad.output and "alpha_sample_units" in bad.output
    cfg.write_text(cfg.read_text().replace("alpha_sampel_units", "alpha_sample_units"))
    ok = runner.invoke(app, ["run", str(cfg), "--no-true-features", "--set", "recon.augment.rotate=5"])
    assert ok.exit_code == 0, ok.output
    written = json.loads((tmp_path / "c" / "config.json").read_text())
    assert written["alpha_sample_units"] == 64 and written["recon"]["fourier"]["lr"] == 0.05
    assert written["recon"]["augment"]["rotate"] == 5 and written["true_feature_recon"] is False


def test_other_images_are_another_run(small_subject, tmp_path):
    """Changing the stimulus images must not reuse what was computed from the old ones."""
    subject, _ = small_subject
    out = tmp_path / "run"
    first = runner.invoke(app, _run(subject, out, "--no-true-features"))
    assert first.exit_code == 0, first.output
    images = tmp_path / "images"
    shutil.copytree(subject / "images", images)
    a, b = images / "letter_A.png", images / "letter_O.png"          # two test images swapped
    pa, pb = Image.open(a).copy(), Image.open(b).copy()
    pb.save(a)
    pa.save(b)
    refused = runner.invoke(app, _run(subject, out, "--no-true-features", images=images))
    assert refused.exit_code == 2 and "holds another run" in refused.output and "images" in refused.output
    redone = runner.invoke(app, _run(subject, out, "--no-true-features", "--overwrite", images=images))
    assert redone.exit_code == 0, redone.output
    assert "reused decoded features" not in redone.output
    assert "reused finished reconstructions" not in redone.output


def test_streamed_and_cached_runs_do_not_share_their_decoded_features(small_subject, tmp_path):
    """A streamed run has no per-unit reliabilities; a later default run must compute them, not reuse it."""
    subject, paths = small_subject
    out = tmp_path / "run"
    args = (paths["train"], {"letters": paths["letters"]}, subject / "images", out)
    recon = br.ReconConfig(iterations=4)
    br.run_pipeline(*args, br.PipelineConfig(image_size=32, feature_store="stream", true_feature_recon=False,
                                             snapshots=[], recon=recon))
    assert "unit_r2_median" not in json.loads((out / "run.json").read_text())["alphas"]["conv1_1"]
    br.run_pipeline(*args, br.PipelineConfig(image_size=32, true_feature_recon=False, snapshots=[], recon=recon),
                    overwrite=True)
    assert "unit_r2_median" in json.loads((out / "run.json").read_text())["alphas"]["conv1_1"]


def test_prior_variants_share_the_decoded_features():
    base = br.PipelineConfig(image_size=32)
    runs = prior_variants(base, ["gd", "fourier", "generator"])
    runs["generator"] = runs["generator"].model_copy(update={"generator": "builtin"})   # as `compare priors` does
    keys = {name: cfg.digest([], decoding_only=True) for name, cfg in runs.items()}
    assert len(set(keys.values())) == 1, keys
    assert len({cfg.digest([]) for cfg in runs.values()}) == 3       # but not the reconstructions
    # one seed: the reconstruction's follows the run's
    assert br.PipelineConfig(seed=5).recon.seed == 5
