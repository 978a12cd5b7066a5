"""Mental imagery: the simulated imagery file, label maps, imagery runs and their within-family scores."""
import json

import h5py
import numpy as np
import pytest
from typer.testing import CliRunner

from brainrecon.cli import app
from brainrecon.data.bdata import BDataError, read_bdata, read_fmri, roi_keys
from brainrecon.data.labelmaps import (IMAGERY_SHAPES, LabelMapError, builtin_map_path, label_key, read_label_map)
from brainrecon.evaluate.imagery import (attribute_identification, family_identification, information_bound,
                                         score_imagery)
from brainrecon.evaluate.judgment import make_trials
from brainrecon.simulate.cortex import DEFAULT_ROIS
from brainrecon.simulate.imagery import IMAGERY_GAINS, imagery_design, imagery_signal

runner = CliRunner()
NATURAL_DIR = ["n02416519_12793", "n01443537_22563", "n01677366_18182", "n02128385_20264", "n01858441_11077",
               "n02690373_7713", "n02882301_14188", "n03710193_22225", "n04297750_25624", "n04507155_21299"]


# ---- the simulated imagery experiment ---------------------------------------------------------

def test_imagery_signal_applies_the_gains():
    rng = np.random.default_rng(0)
    rois = np.array(["V1"] * 3 + ["hV4"] * 2 + ["PPA"])
    perception = rng.normal(size=(4, 6))
    target = np.array([0, 3, -1, 2, 2])
    signal, vivid = imagery_signal(perception, rois, target, np.random.default_rng(1))
    gain = np.array([0.25] * 3 + [0.45] * 2 + [0.6])
    assert ((vivid >= 0.5) & (vivid <= 1.5)).all()
    for t, k in enumerate(target):
        expected = np.zeros(6) if k < 0 else perception[k] * gain * vivid[t]
        np.testing.assert_allclose(signal[t], expected)
    with pytest.raises(ValueError, match="no imagery gain for area.*MT"):
        imagery_signal(perception, np.array(["V1"] * 5 + ["MT"]), target, rng)
    design = imagery_design([1, 2, 3, 16, 17], 4, rng)
    assert len(design.number) == 4 * 5 and (design.number == 16).sum() == 4
    for run in range(1, 5):
        assert sorted(design.number[design.runs == run]) == [1, 2, 3, 16, 17]
    np.testing.assert_array_equal(design.target[design.number == 17], 3)
    assert (design.target[design.number == 16] == -1).all()


def test_simulated_imagery_file(small_subject):
    subject, paths = small_subject
    raw = read_bdata(paths["imagery"])
    assert "stimulus_name" not in raw.metadata and not raw.vmap        # labelled by number, like the lab's files
    numbers = raw.select("Label")[:, 0]
    runs = raw.select("Run")[:, 0]
    # 15 shapes + 6 natural images (the small subject has 6) + fixation, once per run, 20 runs
    expected = list(range(1, 23))
    assert len(numbers) == 20 * 22 and sorted(set(runs)) == list(range(1, 21))
    for r in range(1, 21):
        assert sorted(numbers[runs == r]) == expected
    rows = [line.split("\t") for line in (subject / "imagery_labels.tsv").read_text().splitlines()]
    assert [int(n) for n, _ in rows] == expected
    assert [s for _, s in rows[:15]] == list(IMAGERY_SHAPES) and rows[15][1] == "fixation"
    natural = list(dict.fromkeys(read_fmri(paths["natural"]).labels))
    assert {s for _, s in rows[16:]} == set(natural)
    for _, stem in rows[:15] + rows[16:]:
        assert (subject / "images" / f"{stem}.png").exists()
    with pytest.raises(BDataError, match="labelled by number only.*--labels NAME=TSV"):
        read_fmri(paths["imagery"])
    f = read_fmri(paths["imagery"], label_map=read_label_map(subject / "imagery_labels.tsv"), exclude=["fixation"])
    assert len(f.labels) == 20 * 21 and "fixation" not in f.labels
    assert f.read_roi("ROI_V1").labels == f.labels
    # the raw label works as well as the image stem
    g = read_fmri(paths["imagery"], label_map=read_label_map(subject / "imagery_labels.tsv"), exclude=["16"])
    np.testing.assert_array_equal(f.X, g.X)


def test_imagery_gains_in_the_simulated_file(small_subject):
    """Imagery regressed on perception per ROI recovers the gains: cov(imagery, perception half 1) /
    cov(perception half 1, perception half 2) is unbiased by the noise (the halves' noise is independent)."""
    subject, paths = small_subject
    lmap = read_label_map(subject / "imagery_labels.tsv")
    slopes = {}
    for roi in DEFAULT_ROIS:
        key = f"ROI_{roi}"
        im = read_fmri(paths["imagery"], key, label_map=lmap, exclude=["fixation"])
        X_im, labs = im.average_by_label()
        halves = [[], []]
        for name in ("shapes", "natural"):
            p = read_fmri(paths[name], key)
            lab = np.array(p.labels)
            for target in labs:
                rows = np.flatnonzero(lab == target)
                if rows.size:
                    halves[0].append((target, p.X[rows[0::2]].mean(0)))
                    halves[1].append((target, p.X[rows[1::2]].mean(0)))
        h1, h2 = (dict(h) for h in halves)
        a = np.stack([X_im[labs.index(t)] for t in h1])
        b, c = np.stack(list(h1.values())), np.stack(list(h2.values()))
        a, b, c = (x - x.mean(0) for x in (a, b, c))           # each voxel centred over the targets
        slopes[roi] = float((a * b).sum() / (b * c).sum())
    order = ["V1", "V2", "V3", "hV4"]
    assert all(slopes[x] < slopes[y] for x, y in zip(order, order[1:])), slopes
    assert slopes["hV4"] < min(slopes[r] for r in ("LOC", "FFA", "PPA")), slopes
    for roi, s in slopes.items():
        assert abs(s - IMAGERY_GAINS[roi]) < 0.3 * IMAGERY_GAINS[roi], slopes


# ---- label maps -------------------------------------------------------------------------------

def test_builtin_dir_imagery_map():
    m = read_label_map("dir-imagery")
    stems = m.stems(range(1, 27), "file")
    assert [stems[float(i)] for i in range(1, 16)] == list(IMAGERY_SHAPES)
    assert IMAGERY_SHAPES[:3] == ("small_frame_red", "plus_red", "cross_red") and IMAGERY_SHAPES[-1] == "cross_black"
    assert stems[16.0] == "fixation" and [stems[float(i)] for i in range(17, 27)] == NATURAL_DIR
    assert builtin_map_path("dir-imagery").name == "dir_imagery.tsv"


def test_label_map_both_column_orders(tmp_path):
    ours = tmp_path / "ours.tsv"
    ours.write_text("# label, stem\n1\tplus_red\n2.0\tcross_red\n\n3\tfixation\n")
    assert read_label_map(ours).stems([1.0, 2, "3"], "f") == {1.0: "plus_red", 2.0: "cross_red", 3.0: "fixation"}
    lab = tmp_path / "ArtificialImage.tsv"       # the lab's layout: no header, stimulus name then id
    lab.write_text("colorExpStim01_red_square.tif\t1\ncolorExpStim02_red_smallring.tif\t2\n")
    assert read_label_map(lab).stems([2.0, 1.0], "f") == {1.0: "colorExpStim01_red_square",
                                                         2.0: "colorExpStim02_red_smallring"}
    natural = tmp_path / "NaturalImageTest.tsv"
    natural.write_text("n01443537_22563.JPEG\t1443537.022563\nn01621127_19020.JPEG\t1621127.01902\n")
    assert read_label_map(natural).stems([1621127.01902], "f")[1621127.01902] == "n01621127_19020"
    # names (a vmap's labels) map too
    assert read_label_map(ours).stems(["cross_red"], "f") == {"plus_red": "1", "cross_red": "2.0", "fixation": "3"}
    assert read_label_map(ours).stems([4.0], "f") is None and read_label_map(ours).missing([1, 4, 5]) == [4.0, 5.0]
    assert label_key(" 16 ") == label_key(16) == 16.0 and label_key("fixation") == "fixation"


def test_label_map_errors(tmp_path):
    with pytest.raises(LabelMapError, match="nope.tsv does not exist.*dir-imagery"):
        read_label_map(tmp_path / "nope.tsv", option="--labels imagery=nope.tsv")
    bad = tmp_path / "three.tsv"
    bad.write_text("1\tplus_red\n2\tcross_red\textra\n")
    with pytest.raises(LabelMapError, match=r"three.tsv: line 2 has 3 column\(s\).*two tab-separated columns"):
        read_label_map(bad)
    one = tmp_path / "one.tsv"
    one.write_text("1\n")
    with pytest.raises(LabelMapError, match="one.tsv: line 1 has 1 column"):
        read_label_map(one)
    empty = tmp_path / "empty.tsv"
    empty.write_text("# nothing\n")
    with pytest.raises(LabelMapError, match="empty.tsv: the label map has no rows"):
        read_label_map(empty)
    dup = tmp_path / "dup.tsv"
    dup.write_text("1\tplus_red\n2\tcross_red\n1.0\tplus_blue\n")
    with pytest.raises(LabelMapError, match="dup.tsv: label 1 appears on lines 1, 3"):
        read_label_map(dup).stems([1, 2], "f")


def test_labels_of_the_file_missing_from_the_map(small_subject, tmp_path):
    subject, paths = small_subject
    short = tmp_path / "short.tsv"
    short.write_text("".join(line + "\n" for line in (subject / "imagery_labels.tsv").read_text().splitlines()[:-2]))
    with pytest.raises(BDataError, match=r"test_imagery.h5: 2 label\(s\) of its 'Label' column are not in the label "
                                         r"map .*short.tsv: 21, 22"):
        read_fmri(paths["imagery"], label_map=read_label_map(short))


# ---- family scores against brute force --------------------------------------------------------

def _brute_identification(pred, target, members):
    out = []
    for i in members:
        r = lambda a, b: np.corrcoef(a.ravel(), b.ravel())[0, 1]     # noqa: E731
        own = r(pred[i], target[i])
        others = [r(pred[i], target[j]) for j in members if j != i]
        out.append(np.mean([1.0 if own > o else 0.5 if own == o else 0.0 for o in others]))
    return np.array(out)


def test_family_identification_against_brute_force():
    rng = np.random.default_rng(4)
    labels = ["test_a", *IMAGERY_SHAPES[:7], "test_b", "test_c", *IMAGERY_SHAPES[7:]]
    target = rng.random((len(labels), 3, 6, 6))
    pred = target + rng.normal(0, 0.6, target.shape)
    fam = family_identification(pred, target, labels)
    shapes = [i for i, lab in enumerate(labels) if lab in IMAGERY_SHAPES]
    natural = [i for i, lab in enumerate(labels) if lab not in IMAGERY_SHAPES]
    np.testing.assert_allclose(fam["shapes"], _brute_identification(pred, target, shapes))
    np.testing.assert_allclose(fam["natural"], _brute_identification(pred, target, natural))
    # colour: candidates of the same form; shape: of the same colour
    for attribute, same in (("colour", 0), ("form", 1)):
        got = attribute_identification(pred, target, labels, attribute)
        parts = {i: labels[i].rpartition("_")[::2] for i in shapes}
        expected = []
        for i in shapes:
            cand = [j for j in shapes if j != i and parts[j][same] == parts[i][same]]
            expected.append(_brute_identification(pred, target, [i, *cand])[0])
        np.testing.assert_allclose(got, expected)
    s = score_imagery(pred, target, labels).families
    assert s["shapes"].pixel_identification == pytest.approx(fam["shapes"].mean())
    assert s["natural"].colour_identification is None and s["shapes"].colour_identification is not None
    # the information bound: centred patterns, identified within the family
    im, pe = rng.normal(size=(len(labels), 50)), rng.normal(size=(len(labels), 50))
    pe[:, :] += 5.0                                      # a shared offset does not count
    bound = information_bound(im, pe, labels)
    idx = np.array(shapes)
    np.testing.assert_allclose(bound["shapes"], _brute_identification(im[idx] - im[idx].mean(0),
                                                                       pe[idx] - pe[idx].mean(0),
                                                                       list(range(len(idx)))).mean())


def test_judgment_trials_stay_within_a_family():
    labels = {"imagery": ["plus_red", "cross_red", "test_a", "test_b", "test_c"], "shapes": ["x", "y"]}
    fams = {"imagery": {"plus_red": "shapes", "cross_red": "shapes", "test_a": "natural", "test_b": "natural",
                        "test_c": "natural"}}
    trials = make_trials(labels, families=fams)
    assert len(trials) == 2 * 1 + 3 * 2 + 2
    assert all(fams["imagery"][t.label] == fams["imagery"][t.distractor] for t in trials if t.test_set == "imagery")


# ---- imagery runs through the command line ----------------------------------------------------

def _args(subject, out, *extra):
    return ["run", "--train", str(subject / "train.h5"), "--images", str(subject / "images"), "--out", str(out),
            "--image-size", "32", "--iterations", "30", "--no-true-features", "--snapshots", "none",
            "--test", f"shapes={subject / 'test_shapes.h5'}", "--test", f"natural={subject / 'test_natural.h5'}",
            "--test", f"imagery={subject / 'test_imagery.h5'}", *extra]


def _expect_error(args, *needles):
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    text = " ".join(result.output.split())
    for needle in needles:
        assert needle in text, text
    assert "Traceback" not in result.output


def test_run_imagery_with_labels_and_excluded_fixation(small_subject, tmp_path):
    subject, _ = small_subject
    tsv = subject / "imagery_labels.tsv"
    out = tmp_path / "run"
    result = runner.invoke(app, _args(subject, out, "--labels", f"imagery={tsv}", "--exclude-label", "fixation"))
    assert result.exit_code == 0, result.output
    metrics = json.loads((out / "metrics.json").read_text())
    m = metrics["imagery"]
    assert m["n_images"] == 21 and m["n_presentations"] == 20
    assert sorted(p.stem for p in (out / "recon" / "imagery").glob("*.png")) == sorted(
        [*IMAGERY_SHAPES, *json.loads(json.dumps(m["imagery"]["families"]["natural"]["labels"]))])
    shapes = m["imagery"]["families"]["shapes"]
    assert shapes["n_targets"] == 15 and m["imagery"]["families"]["natural"]["n_targets"] == 6
    for key in ("pixel_identification", "perception_pixel_identification", "colour_identification",
                "shape_identification", "perception_colour_identification", "perception_shape_identification"):
        assert 0.0 <= shapes[key] <= 1.0
    # the imagined shapes' colours reach the reconstructions even on this tiny subject (chance 0.5)
    assert shapes["pixel_identification"] > 0.55 and shapes["colour_identification"] > 0.55
    bound = m["imagery"]["information_bound"]
    assert set(bound) == set(roi_keys(subject / "test_imagery.h5"))
    assert bound["ROI_VC"]["shapes"] > 0.75 and bound["ROI_VC"]["natural"] > 0.6
    assert "imagery" not in metrics["shapes"]
    html = (out / "report.html").read_text()
    assert "Imagery against perception of the same targets" in html and "Information bound" in html
    assert ">perception<" in html
    config = json.loads((out / "config.json").read_text())
    assert config["labels"] == {"imagery": str(tsv)} and config["exclude_labels"] == ["fixation"]
    # the judgment app draws imagery trials within a family
    from brainrecon.evaluate.judgment import run_images
    imgs = run_images(out)
    assert imgs.families["imagery"]["plus_red"] == "shapes"
    trials = make_trials(imgs.labels, families=imgs.families)
    assert sum(t.test_set == "imagery" for t in trials) == 15 * 14 + 6 * 5
    # a YAML file with a label map relative to its folder
    (tmp_path / "maps").mkdir()
    (tmp_path / "maps" / "img.tsv").write_text(tsv.read_text())
    yaml_file = tmp_path / "study.yaml"
    yaml_file.write_text("labels: {imagery: maps/img.tsv}\nexclude_label: fixation\n")
    again = runner.invoke(app, ["run", str(yaml_file), *_args(subject, tmp_path / "run2")[1:], "--iterations", "2"])
    assert again.exit_code == 0, again.output
    assert json.loads((tmp_path / "run2" / "config.json").read_text())["labels"] == {
        "imagery": str(tmp_path / "maps" / "img.tsv")}


def test_imagery_errors(small_subject, tmp_path):
    subject, _ = small_subject
    tsv = subject / "imagery_labels.tsv"
    out = tmp_path / "err"
    _expect_error(_args(subject, out), "test_imagery.h5", "labelled by number only", "--labels NAME=TSV")
    _expect_error(_args(subject, out, "--labels", f"imagery={tsv}"), "test set 'imagery'", "fixation",
                  "--exclude-label NAME")
    _expect_error(_args(subject, out, "--labels", f"imagey={tsv}"), "--labels imagey=", "no test set is named imagey")
    _expect_error(_args(subject, out, "--labels", f"imagery={tmp_path / 'none.tsv'}"), "none.tsv does not exist")
    # the DIR map names ImageNet images that the simulated subject does not have
    _expect_error(_args(subject, out, "--labels", "imagery=dir-imagery", "--exclude-label", "fixation"),
                  "n02416519_12793", "--exclude-label NAME")
    assert not out.exists()


def test_run_on_a_bdpy_imagery_file_with_vmap_and_fixation(small_subject, tmp_path):
    """An imagery file written by bdpy itself, stimulus names in a vmap, fixation trials named 'fixation'."""
    bdpy = pytest.importorskip("bdpy")
    subject, paths = small_subject
    src = read_bdata(paths["imagery"])
    names = dict(line.split("\t") for line in (subject / "imagery_labels.tsv").read_text().splitlines())
    b = bdpy.BData()
    for key in ("VoxelData", "Run", "Block"):
        b.add(src.dataset[:, src.columns(key)], key)
    b.add(src.select("Label")[:, 0], "stimulus_name")
    for key, (desc, values) in src.metadata.items():
        if key.startswith("ROI_") or key.startswith("voxel_"):
            b.add_metadata(key, values[src.columns("VoxelData")], desc, where="VoxelData")
    b.add_vmap("stimulus_name", {float(k): v for k, v in names.items()})
    path = tmp_path / "imagery_bdpy.h5"
    b.save(str(path))
    with h5py.File(path) as f:
        assert f["vmap/stimulus_name"]
    out = tmp_path / "bdpy_run"
    args = ["run", "--train", str(subject / "train.h5"), "--images", str(subject / "images"), "--out", str(out),
            "--image-size", "32", "--iterations", "5", "--snapshots", "none", "--test", f"imagery={path}",
            "--test", f"shapes={subject / 'test_shapes.h5'}", "--no-true-features"]
    _expect_error(args, "have no image in", ": fixation.", "--exclude-label NAME")
    result = runner.invoke(app, args + ["--exclude-label", "fixation"])
    assert result.exit_code == 0, result.output
    m = json.loads((out / "metrics.json").read_text())["imagery"]
    assert m["n_images"] == 21 and m["imagery"]["families"]["shapes"]["n_targets"] == 15
    # only shapes were perceived in this run: the natural family has no perception score, the bound covers the shapes
    assert "perception_pixel_identification" not in m["imagery"]["families"]["natural"]
    assert set(m["imagery"]["information_bound"]["ROI_VC"]) == {"shapes"}


def test_compare_rois_with_an_imagery_set(small_subject, tmp_path):
    subject, _ = small_subject
    out = tmp_path / "rois"
    args = ["compare", "rois", "--variants", "V1,VC", "--train", str(subject / "train.h5"), "--images",
            str(subject / "images"), "--out", str(out), "--image-size", "32", "--iterations", "3",
            "--snapshots", "none", "--no-true-features", "--test", f"shapes={subject / 'test_shapes.h5'}",
            "--test", f"imagery={subject / 'test_imagery.h5'}", "--labels",
            f"imagery={subject / 'imagery_labels.tsv'}", "--exclude-label", "fixation"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    comparison = json.loads((out / "comparison.json").read_text())
    for variant in ("V1", "VC"):
        imagery = comparison["variants"][variant]["imagery"]
        assert 0.0 <= imagery["imagery_shapes_pixel_identification"] <= 1.0
        assert 0.0 <= imagery["imagery_natural_pixel_identification"] <= 1.0
