"""brainrecon evaluate: uncertainty, n-way identification, the retrieval check, evaluation.json / metrics.csv."""
import csv
import json

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from brainrecon.cli import app
from brainrecon.data.bdata import read_fmri
from brainrecon.data.stimuli import find_images, load_image
from brainrecon.decode.decoder import DecodedFeatures, LayerPenalty, save_decoded
from brainrecon.evaluate.protocol import CSV_COLUMNS, SCHEMA, evaluate_run
from brainrecon.evaluate.retrieval import nearest_training, retrieval_answers, similarity_to_training
from brainrecon.evaluate.uncertainty import (bootstrap_identification, bootstrap_mean, n_way_expected,
                                             n_way_identification, pairwise_from_scores, permutation_p, win_matrix)
from brainrecon.nets.features import extract_features

SIZE = 16
LAYERS = ["conv1_1", "conv3_1"]


def _noisy_scores(rng, n, signal):
    """Score matrix of reconstructions that resemble their own stimulus by ``signal`` (0: random pairing)."""
    return rng.normal(size=(n, n)) + signal * np.eye(n)


def test_bootstrap_interval_of_a_constant_is_a_point_and_covers_a_known_mean():
    assert bootstrap_mean(np.full(20, 0.7)) == pytest.approx((0.7, 0.7))
    rng = np.random.default_rng(0)
    covered = []
    for trial in range(200):                                   # the mean (0) of N(0, 1) samples of 40
        lo, hi = bootstrap_mean(rng.normal(size=40), n_boot=500, seed=trial)
        covered.append(lo <= 0.0 <= hi)
    assert 0.88 <= np.mean(covered) <= 0.99                    # 95% nominal (percentile intervals run a bit short)


def test_bootstrap_identification_recomputes_among_the_resampled_images():
    rng = np.random.default_rng(1)
    scores = _noisy_scores(rng, 9, 1.0)
    w = win_matrix(scores)
    assert w.sum(1) / 8 == pytest.approx(pairwise_from_scores(scores))
    # brute force: the same draws, each drawn image against the drawn images that are other images
    n_boot, n = 300, 9
    idx = np.random.default_rng(5).integers(0, n, (n_boot, n))
    stats = []
    for draw in idx:
        accs = [np.mean([w[a, b] for b in draw if b != a]) for a in draw if (draw != a).any()]
        stats.append(np.mean(accs))
    expected = np.quantile(stats, [0.025, 0.975])
    assert bootstrap_identification(scores, n_boot, seed=5) == pytest.approx(tuple(expected))
    perfect = np.eye(n) + 0.01 * rng.normal(size=(n, n))
    assert bootstrap_identification(perfect) == (1.0, 1.0)


def test_permutation_p_small_when_perfect_and_uniform_at_random():
    rng = np.random.default_rng(2)
    assert permutation_p(_noisy_scores(rng, 20, 6.0), n_perm=999) == pytest.approx(1 / 1000)
    assert permutation_p(_noisy_scores(rng, 20, 6.0), n_way=5, n_perm=999) == pytest.approx(1 / 1000)
    ps = np.array([permutation_p(_noisy_scores(rng, 12, 0.0), n_perm=199, seed=i) for i in range(150)])
    assert 0.4 < ps.mean() < 0.6                               # uniform: mean 0.5
    assert np.mean(ps < 0.05) < 0.1 and np.mean(ps > 0.5) > 0.35


def test_n_way_identification_against_its_expectation():
    rng = np.random.default_rng(3)
    scores = _noisy_scores(rng, 15, 1.0)
    pairwise = pairwise_from_scores(scores)
    wins = pairwise * 14
    assert n_way_expected(wins, 15, 2) == pytest.approx(pairwise)         # 2-way is pairwise, exactly
    two = n_way_identification(scores, 2, draws=4000, seed=0)
    assert np.abs(two - pairwise).max() < 0.04 and abs(two.mean() - pairwise.mean()) < 0.01
    five = n_way_identification(scores, 5, draws=4000, seed=0)
    assert np.abs(five - n_way_expected(wins, 15, 5)).max() < 0.04
    everyone = n_way_identification(scores, 15)
    assert everyone == pytest.approx((pairwise == 1.0).astype(float))     # all candidates: beats every one
    assert 1 / 5 < five.mean() < pairwise.mean()
    with pytest.raises(ValueError):
        n_way_identification(scores, 16)


def _blocky(rng, n):
    return np.kron(rng.random((n, 3, 4, 4)), np.ones((1, 1, SIZE // 4, SIZE // 4))).astype(np.float32)


def _save(image, path):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray((image.transpose(1, 2, 0) * 255).round().astype(np.uint8)).save(path)


def test_retrieval_finds_the_planted_training_images(tmp_path, network):
    rng = np.random.default_rng(4)
    train = _blocky(rng, 30)
    for i, im in enumerate(train):
        _save(im, tmp_path / "train" / f"t{i:02d}.png")
    paths = find_images(tmp_path / "train", [f"t{i:02d}" for i in range(30)])
    train = np.stack([load_image(p, SIZE) for p in paths.values()])          # as read back (8 bits)
    planted = [7, 3, 21, 0, 29]
    true = extract_features(network, train[planted], LAYERS)
    decoded = {k: v + 0.3 * v.std() * rng.normal(size=v.shape) for k, v in true.items()}
    recon = np.clip(train[planted] + 0.05 * rng.normal(size=train[planted].shape), 0, 1).astype(np.float32)
    sim = similarity_to_training(paths, SIZE, {"recon": recon}, {"decoded": decoded}, network, batch_size=8)
    labels = list(paths)
    assert retrieval_answers(sim.feature_mean("decoded"), labels) == [labels[i] for i in planted]
    pixel_r = np.array([[np.corrcoef(r.ravel(), t.ravel())[0, 1] for t in train] for r in recon])
    assert sim.pixels["recon"] == pytest.approx(pixel_r, abs=1e-5)
    one_layer_a_pass = similarity_to_training(paths, SIZE, {}, {"decoded": decoded}, network, max_bytes=1)
    for layer in LAYERS:                                     # layers in groups under a memory budget: the same r
        assert one_layer_a_pass.features["decoded"][layer] == pytest.approx(sim.features["decoded"][layer], abs=1e-5)
    # a reconstruction of training image 7 whose "stimulus" is another image: the training image wins
    other = np.array([np.corrcoef(r.ravel(), s.ravel())[0, 1] for r, s in zip(recon, train[[1, 2, 4, 5, 6]])])
    near = nearest_training(["a", "b", "c", "d", "e"], labels, sim.pixels["recon"], other)
    assert [n.nearest_pixel for n in near] == [labels[i] for i in planted]
    assert not any(n.stimulus_beats_training_pixel for n in near)
    own = np.array([np.corrcoef(r.ravel(), s.ravel())[0, 1] + 1e-3 for r, s in zip(recon, train[planted])])
    assert all(n.stimulus_beats_training_pixel for n in nearest_training(list("abcde"), labels, pixel_r, own))


@pytest.fixture(scope="module")
def mini_run(small_subject, network, tmp_path_factory):
    """A finished run in miniature over the small subject: noisy 16 px reconstructions of the natural
    and letter test images, the decoded features planted (each that of a chosen training image)."""
    subject, _ = small_subject
    run = tmp_path_factory.mktemp("mini") / "run"
    rng = np.random.default_rng(6)
    images = subject / "images"
    train_labels = list(dict.fromkeys(read_fmri(subject / "train.h5", "ROI_VC").labels))
    decoded, planted = {}, {}
    for name in ("natural", "letters"):
        labels = sorted(dict.fromkeys(read_fmri(subject / f"test_{name}.h5", "ROI_VC").labels))
        stim = np.stack([load_image(p, SIZE) for p in find_images(images, labels).values()])
        recon = np.clip(stim + rng.normal(0, 0.25, stim.shape), 0, 1)
        for lab, im in zip(labels, recon):
            _save(im, run / "recon" / name / f"{lab}.png")
        for lab, im in zip(labels, np.clip(stim + rng.normal(0, 0.05, stim.shape), 0, 1)):
            _save(im, run / "recon_true_features" / name / f"{lab}.png")
        picks = rng.choice(len(train_labels), len(labels), replace=False)
        planted[name] = [train_labels[i] for i in picks]
        train_imgs = np.stack([load_image(p, SIZE) for p in find_images(images, planted[name]).values()])
        feats = extract_features(network, train_imgs, LAYERS)
        decoded[name] = DecodedFeatures(feats, labels, 1.0, SIZE, {}, {k: LayerPenalty("ROI_VC", 1.0) for k in LAYERS},
                                        {k: np.zeros(1) for k in LAYERS}, {k: np.ones(1) for k in LAYERS},
                                        {k: 1.0 for k in LAYERS})
    dcache = run / "cache" / "decoded-planted"
    save_decoded(dcache, decoded)
    (dcache / "complete").touch()
    (run / "config.json").write_text(json.dumps({"train": str(subject / "train.h5"), "images": str(images),
                                                 "network": "hed-vgg16", "layers": LAYERS, "roi": "ROI_VC",
                                                 "recon": {"prior": "gd"}}))
    (run / "run.json").write_text(json.dumps({"images": str(images), "decoded_cache": str(dcache)}))
    (run / "metrics.json").write_text(json.dumps({"natural": {"pixel_identification": 0.123456789}}))
    return run, planted


def test_evaluation_files_and_pixcorr_from_the_pngs(mini_run):
    run, planted = mini_run
    metrics_before = (run / "metrics.json").read_bytes()
    ev = evaluate_run(run, n_boot=300, n_perm=199, n_way_draws=200)
    data = json.loads((run / "evaluation.json").read_text())
    assert data["schema"] == SCHEMA and data["protocols"] == ["kamitani"] and data["method"] == "gd"
    assert data["subject"] == "train" and data["roi"] == "ROI_VC" and data["settings"]["n_bootstrap"] == 300
    with open(run / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert tuple(rows[0]) == CSV_COLUMNS and len(rows) == len(data["results"])
    names = {(r["test_set"], r["source"], r["metric"]) for r in rows}
    for name in ("natural", "letters"):
        for metric in ("pixel_identification", "pixel_identification_euclidean", "pixel_identification_2way",
                       "pixel_identification_5way", "pixel_identification_allway", "pixel_correlation", "ssim",
                       "feature_identification_conv1_1", "feature_identification_conv3_1",
                       "stimulus_beats_training_pixel"):
            assert (name, "decoded", metric) in names and (name, "true_features", metric) in names
        assert (name, "decoded", "retrieval_baseline_pixel_identification") in names
    assert ("letters", "decoded", "pixel_identification_10way") not in names  # 10 letters: 10-way is all-way
    assert ("natural", "decoded", "pixel_identification_10way") not in names  # 6 natural images: no 10-way
    for r in data["results"]:
        assert r["ci_low"] - 1e-9 <= r["value"] <= r["ci_high"] + 1e-9 and r["n"] > 0
        assert (r["p_value"] is not None) == (r["kind"] == "identification")
    # PixCorr and identification as numpy computes them from the PNGs and the stimuli at their size
    for name in ("natural", "letters"):
        pngs = sorted((run / "recon" / name).glob("*.png"))
        rec = np.stack([np.asarray(Image.open(p).convert("RGB"), np.float64).transpose(2, 0, 1).ravel() / 255 for p in pngs])
        images = json.loads((run / "run.json").read_text())["images"]
        stim = np.stack([load_image(p, SIZE).ravel() for p in find_images(images, [p.stem for p in pngs]).values()])
        r = np.corrcoef(rec, stim)[:len(pngs), len(pngs):]
        pixcorr = ev.get(name, "decoded", "pixel_correlation")
        assert pixcorr.value == pytest.approx(np.mean(np.diag(r)), abs=1e-6)
        assert list(pixcorr.per_image.values()) == pytest.approx(np.diag(r), abs=1e-6)
        ident = np.mean([(r[i, i] > np.delete(r[i], i)).mean() for i in range(len(r))])
        assert ev.get(name, "decoded", "pixel_identification").value == pytest.approx(ident)
        assert ev.get(name, "true_features", "pixel_identification").value > 0.9
        # the retrieval baseline answers with the planted training images, scored like a reconstruction
        base = data["retrieval"][name]["baseline"]
        assert list(base["answers"].values()) == planted[name]
        retrieved = np.stack([load_image(p, SIZE).ravel() for p in find_images(images, planted[name]).values()])
        rb = np.corrcoef(retrieved, stim)[:len(pngs), len(pngs):]
        expected = np.mean([(rb[i, i] > np.delete(rb[i], i)).mean() for i in range(len(rb))])
        assert ev.get(name, "decoded", "retrieval_baseline_pixel_identification").value == pytest.approx(expected)
        assert len(data["retrieval"][name]["decoded"]["nearest"]) == len(pngs)
    assert (run / "metrics.json").read_bytes() == metrics_before


def test_cli_evaluate_writes_both_files_and_names_what_it_skipped(mini_run, tmp_path):
    run, _ = mini_run
    (run / "evaluation.json").unlink(missing_ok=True)
    result = CliRunner().invoke(app, ["evaluate", str(run), "--protocol", "all", "--n-bootstrap", "200",
                                      "--n-permutations", "99"])
    assert result.exit_code == 0, result.output
    assert (run / "evaluation.json").is_file() and (run / "metrics.csv").is_file()
    assert "pixel_identification" in result.output and "NSD protocol" in result.output
    assert "no weight file" in result.output    # the networks without a file are named, the rest still ran
    assert "pixcorr" in result.output
    bad = CliRunner().invoke(app, ["evaluate", str(run), "--protocol", "mine"])
    assert bad.exit_code == 2 and "--protocol 'mine'" in bad.output
    empty = tmp_path / "empty"
    empty.mkdir()
    missing = CliRunner().invoke(app, ["evaluate", str(empty)])
    assert missing.exit_code == 2 and "config.json" in missing.output and "finished" in missing.output


def test_answers_not_yet_scored_count_as_human_judgment(mini_run):
    from brainrecon.evaluate.judgment import answer_record, append_answer, make_trials
    run, _ = mini_run
    labels = sorted(p.stem for p in (run / "recon" / "natural").glob("*.png"))
    trials = make_trials({"natural": labels})
    answers = run / "judgments" / "answers.jsonl"
    answers.parent.mkdir(exist_ok=True)
    for i, t in enumerate(trials):                        # right on the first 20 of 30 pairs
        append_answer(answers, answer_record(t, "ann", t.label if i < 20 else t.distractor, True))
    try:
        ev = evaluate_run(run, n_boot=200, n_perm=99, n_way_draws=50)
    finally:
        answers.unlink()
    human = ev.get("natural", "decoded", "human_identification")
    assert human.value == pytest.approx(np.mean([min(max(20 - 5 * i, 0), 5) / 5 for i in range(6)]))
    assert human.n == 6 and ev.get("letters", "decoded", "human_identification") is None


def test_scored_judgments_merge_into_the_evaluation_and_the_report(mini_run):
    from scipy.stats import binomtest

    from brainrecon.evaluate.protocol import merge_human
    from brainrecon.report.evaluation import update_report
    run, _ = mini_run
    evaluate_run(run, n_boot=200, n_perm=99, n_way_draws=50)
    labels = sorted(p.stem for p in (run / "recon" / "natural").glob("*.png"))
    per_image = dict(zip(labels, [1.0, 0.8, 0.6, 1.0, 0.4, 0.8]))
    (run / "human_judgment.json").write_text(json.dumps({"natural": {
        "human_identification": 0.7666666666666667, "n_judgments": 30, "per_image": per_image}}))
    ev = merge_human(run)
    human = ev.get("natural", "decoded", "human_identification")
    assert human.value == pytest.approx(np.mean(list(per_image.values())))
    assert human.ci_low < human.value < human.ci_high
    assert human.p_value == pytest.approx(binomtest(23, 30, 0.5, alternative="greater").pvalue)
    assert ev.get("letters", "decoded", "human_identification") is None
    rows = (run / "metrics.csv").read_text()
    assert "natural,decoded,gd,kamitani,human_identification,identification,0.766667" in rows
    assert len(merge_human(run).results) == len(ev.results)                  # merged again: replaced, not added
    (run / "report.html").write_text("<!doctype html><html><body><h1>report</h1></body></html>")
    assert update_report(ev.to_json(), run)
    page = (run / "report.html").read_text()
    assert "<h1>report</h1>" in page and "Evaluation with uncertainty" in page and "retrieval baseline" in page
    assert "nearest training" in page and page.count("<!--evaluation-->") == 1
    assert update_report(ev.to_json(), run) and (run / "report.html").read_text() == page     # replaced in place


def test_judge_score_merges_into_the_evaluation_and_re_renders_the_report(mini_run):
    from brainrecon.evaluate.judgment import answer_record, append_answer, make_trials
    run, _ = mini_run
    evaluate_run(run, n_boot=200, n_perm=99, n_way_draws=50)
    (run / "report.html").write_text("<!doctype html><html><body><h1>report</h1><!--evaluation--><!--/evaluation-->"
                                     "</body></html>")
    labels = sorted(p.stem for p in (run / "recon" / "letters").glob("*.png"))
    answers = run / "judgments" / "answers.jsonl"
    answers.parent.mkdir(exist_ok=True)
    answers.unlink(missing_ok=True)
    for t in make_trials({"letters": labels}):                 # every pair right except those of the first letter
        append_answer(answers, answer_record(t, "bo", t.distractor if t.label == labels[0] else t.label, False))
    result = CliRunner().invoke(app, ["judge", "score", str(run)])
    assert result.exit_code == 0, result.output
    assert "evaluation.json" in result.output and "report.html" in result.output
    rows = json.loads((run / "evaluation.json").read_text())["results"]
    human = next(r for r in rows if (r["test_set"], r["source"], r["metric"]) == ("letters", "decoded", "human_identification"))
    assert human["value"] == pytest.approx(0.9) and human["per_image"][labels[0]] == 0.0 and human["n"] == 10
    page = (run / "report.html").read_text()
    assert "human <span class='big'>90.0%" in page and page.count("<!--evaluation-->") == 1


def test_nsd_metrics_through_evaluate_get_intervals_and_permutation_p(mini_run, tmp_path):
    """--protocol nsd with an AlexNet weight file (a random network saved in torchvision's layout):
    AlexNet(2)/(5) identification carry their score matrix, so they get a bootstrap interval and a
    permutation p-value like the Kamitani metrics; the networks without a file are named as skipped."""
    import torch

    from brainrecon.evaluate import nsd
    from brainrecon.evaluate.protocol import evaluate_run
    from brainrecon.nets.evalnets import build_eval_network

    run, _ = mini_run
    weights = tmp_path / "alexnet-owt-7be5be79.pth"
    torch.save(build_eval_network("alexnet", seed=3).state_dict(), weights)
    before = (run / "metrics.json").read_bytes()
    ev = evaluate_run(run, "nsd", {"alexnet": weights}, n_boot=200, n_perm=99, log=lambda m: None)
    for metric in ("alexnet2", "alexnet5"):
        est = ev.get("natural", "decoded", metric)
        assert est is not None and est.p_value is not None and 0 < est.p_value <= 1
        assert est.ci_low <= est.value <= est.ci_high
    assert {"inceptionv3", "clip", "effnet", "swav"} <= set(ev.skipped)
    assert ev.get("natural", "decoded", "pixcorr") is not None
    assert (run / "metrics.json").read_bytes() == before
    assert nsd.MetricValues is __import__("brainrecon.evaluate.protocol", fromlist=["x"]).MetricValues
