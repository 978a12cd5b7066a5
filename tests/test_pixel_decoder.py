"""The linear pixel-decoder baseline (decode/pixels.py)."""
import numpy as np
import pytest

from brainrecon.decode.pixels import PixelDecoder, downsample, upsample
from brainrecon.evaluate.identification import pairwise_identification


def smooth_images(n: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """Random smooth colour images (n, 3, size, size) in [0, 1]."""
    return upsample(rng.random((n, 3, 4, 4)).astype(np.float32), size)


def planted(rng, n_train=120, n_test=20, reps=3, test_reps=8, n_vox=150, noise=1.0):
    """Voxels that are a random linear function of the 16 x 16 images plus noise; an uninformative ROI too."""
    train, test = smooth_images(n_train, 32, rng), smooth_images(n_test, 32, rng)
    W = rng.normal(0, 1, (16 * 16 * 3, n_vox)) / 16
    def fmri(images, r):
        signal = downsample(images, 16).reshape(len(images), -1) @ W
        idx = np.repeat(np.arange(len(images)), r)
        return signal[idx] + rng.normal(0, noise * signal.std(), (len(idx), n_vox)), idx
    X, idx = fmri(train, reps)
    Xt, tidx = fmri(test, test_reps)
    Xt = np.stack([Xt[tidx == i].mean(0) for i in range(n_test)])
    junk = rng.normal(0, 1, X.shape)
    return train, test, X, idx, Xt, junk


def test_recovers_planted_images_and_picks_the_informative_roi():
    rng = np.random.default_rng(0)
    train, test, X, idx, Xt, junk = planted(rng)
    dec = PixelDecoder(size=16).fit({"ROI_junk": junk, "ROI_good": X}, idx, train, n_averages=[8, None])
    assert dec.choice(8).roi == "ROI_good" and dec.choice(None).roi == "ROI_good"
    assert dec.choice(8).cv_r2 > 0.3 > dec.cv_scores_["ROI_junk"].max()
    assert dec.choice(8).alpha <= dec.choice(None).alpha      # averaged inputs carry less noise: less penalty
    pred = dec.predict_images(Xt, 32, n_average=8)
    assert pred.shape == test.shape and pred.min() >= 0 and pred.max() <= 1
    assert pairwise_identification(pred, test).mean() > 0.95
    with pytest.raises(KeyError, match="n_averages"):
        dec.choice(3)


def brute_force_scores(X, idx, Y_images, alphas):
    """Leave-one-image-out R^2 per penalty by refitting ridge (with an unpenalised intercept) per fold."""
    Xz = (X - X.mean(0)) / X.std(0, ddof=1)
    Y = Y_images[idx]
    Y = (Y - Y.mean(0)) / Y.std(0)
    out = []
    for a in alphas:
        sse = np.zeros(Y.shape[1])
        for i in np.unique(idx):
            tr, te = idx != i, idx == i
            mx, my = Xz[tr].mean(0), Y[tr].mean(0)
            Xc = Xz[tr] - mx
            W = Xc.T @ np.linalg.solve(Xc @ Xc.T + a * np.eye(len(Xc)), Y[tr] - my)
            sse += ((my + (Xz[te] - mx) @ W - Y[te]) ** 2).sum(0)
        out.append(np.mean(1 - sse / len(Y)))
    return np.array(out)


@pytest.mark.parametrize("reps, averaged", [(3, False), (1, True)])
def test_loo_penalty_choice_matches_brute_force_refits(reps, averaged):
    rng = np.random.default_rng(1)
    train, _, X, idx, _, _ = planted(rng, n_train=40, n_test=2, reps=reps, n_vox=300, noise=0.7)
    alphas = np.logspace(-1, 4, 8)
    dec = PixelDecoder(size=4, alphas=alphas, average_trials=averaged).fit({"ROI_VC": X}, idx, train)
    expected = brute_force_scores(X, idx, downsample(train, 4).reshape(len(train), -1).astype(np.float64), alphas)
    np.testing.assert_allclose(dec.cv_scores_["ROI_VC"][0], expected, atol=1e-4)
    assert dec.choice().alpha == alphas[np.argmax(expected)]
    assert 0 < np.argmax(expected) < len(alphas) - 1 and expected.max() > 0.1   # a real choice, not an edge


def test_pipeline_reports_the_baseline(small_subject, tmp_path):
    from brainrecon.pipeline import Log, PipelineConfig, baseline_rois, run_pipeline
    from brainrecon.recon.icnn import ReconConfig

    subject, paths = small_subject
    tests = {k: v for k, v in paths.items() if k not in ("train", "imagery")}   # perception sets
    cfg = PipelineConfig(image_size=32, layers=["conv1_1", "conv2_1"], true_feature_recon=False,
                         recon=ReconConfig(iterations=3), snapshots=[])
    out = tmp_path / "run"
    metrics = run_pipeline(paths["train"], tests, subject / "images", out, cfg, log=Log(quiet=True))
    candidates = baseline_rois(paths["train"], "ROI_VC")
    assert candidates == ["ROI_VC", "ROI_V1+ROI_V2+ROI_V3", "ROI_hV4+ROI_LOC+ROI_FFA+ROI_PPA"]
    for m in metrics.values():
        assert m["baseline_roi"] in candidates and m["baseline_alpha"] in cfg.alphas
        assert 0.0 <= m["baseline_pixel_identification"] <= 1.0 and -1 <= m["baseline_ssim"] <= 1
    # the shapes' colours are in the voxels: the linear readout finds them
    assert metrics["shapes"]["baseline_pixel_identification"] > 0.7
    assert metrics["shapes"]["baseline_pixel_correlation"] > 0.2
    html = (out / "report.html").read_text()
    assert html.count(">pixel decoder<") == 1 + 4 + 1 and "pixel decoder: identification" in html
    again = run_pipeline(paths["train"], tests, subject / "images", out, cfg, log=Log(quiet=True))
    assert again["letters"]["baseline_pixel_identification"] == metrics["letters"]["baseline_pixel_identification"]
