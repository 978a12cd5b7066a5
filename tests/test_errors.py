"""Every mistake ends with one clear message (exit 2, no traceback, nothing written) before any work;
cache files are written atomically and an unreadable one is recomputed; Ctrl-C says how to resume."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from brainrecon.cache import atomic_path, load_npy, load_or_none, save_npy
from brainrecon.cli import app
from brainrecon.data.bdata import read_bdata, write_bdata

runner = CliRunner()


def _args(subject, out, *extra, test="letters", test_file=None):
    return ["run", "--train", str(subject / "train.h5"), "--test", f"{test}={test_file or subject / 'test_letters.h5'}",
            "--images", str(subject / "images"), "--out", str(out), "--image-size", "32", "--iterations", "4",
            *extra]


def _one_error(args, *needles, env=None, max_seconds=30.0):
    """Run the CLI; it must exit 2 with one 'error:' line holding every needle, verbatim, and no traceback."""
    t0 = time.time()
    result = runner.invoke(app, args, env=env)
    assert result.exit_code == 2, result.output
    assert time.time() - t0 < max_seconds, "the mistake was found only after the work started"
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.output
    for needle in needles:
        assert needle in errors[0], errors[0]       # on one line: never re-wrapped
    assert "Traceback" not in result.output and "pydantic" not in result.output
    return errors[0]


def test_messages_are_never_rewrapped(tmp_path):
    """A long path stays on one line at any terminal width, with no colour codes off a terminal."""
    deep = tmp_path / ("a-rather-long-folder-name-" * 4) / "and-deeper" / "run"
    line = _one_error(["judge", "score", str(deep)], f"{deep}/recon does not exist", env={"COLUMNS": "40"})
    assert len(line) > 150
    # a real process without a terminal, 40 columns
    proc = subprocess.run([sys.executable, "-m", "brainrecon", "judge", "score", str(deep)], capture_output=True,
                          text=True, env={**os.environ, "COLUMNS": "40", "TERM": "xterm-256color"},
                          stdin=subprocess.DEVNULL)
    assert proc.returncode == 2
    assert f"error: {deep}/recon does not exist" in proc.stderr.splitlines()[0]
    assert "\x1b[" not in proc.stderr
    # click's own usage errors are one plain line too (no box re-wrapped at the width)
    result = runner.invoke(app, ["run", "--image-size", "abc"], env={"COLUMNS": "40"})
    assert result.exit_code == 2 and "Invalid value for '--image-size'" in result.output
    assert "─" not in result.output and "│" not in result.output


@pytest.mark.parametrize("which", ["train", "test"])
def test_truncated_hdf5(small_subject, tmp_path, which):
    subject, paths = small_subject
    cut = tmp_path / f"cut_{which}.h5"
    data = paths["train" if which == "train" else "letters"].read_bytes()
    cut.write_bytes(data[:len(data) // 3])
    out = tmp_path / "out"
    args = _args(subject, out, test_file=cut if which == "test" else None)
    if which == "train":
        args[2] = str(cut)
    _one_error(args, str(cut), "damaged or incomplete", "download it again")
    assert not out.exists()


def test_test_file_without_samples(small_subject, tmp_path):
    subject, paths = small_subject
    b = read_bdata(paths["letters"])
    b.dataset = b.dataset[:0]
    empty = tmp_path / "empty.h5"
    write_bdata(empty, b)
    _one_error(_args(subject, tmp_path / "out", test_file=empty), str(empty), "holds no samples")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_damaged_stimulus_image(small_subject, tmp_path, damage):
    subject, _ = small_subject
    images = tmp_path / "images"
    shutil.copytree(subject / "images", images)
    png = images / "letter_C.png"
    png.write_bytes(png.read_bytes()[:120] if damage == "truncated" else b"\x89PNG not really" + os.urandom(64))
    args = _args(subject, tmp_path / "out")
    args[args.index("--images") + 1] = str(images)
    _one_error(args, str(png), "not a readable image", "replace it")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("extra, needles", [
    (["--image-size", "0"], ["--image-size 0", "at least 16", ]),
    (["--image-size", "-32"], ["--image-size -32", "16"]),
    (["--image-size", "8"], ["--image-size 8", "16"]),
    (["--iterations", "0"], ["--iterations 0", "at least 1"]),
    (["--iterations", "-5"], ["--iterations -5"]),
    (["--prior", "nonsense"], ["--prior 'nonsense'", "'fourier'"]),
    (["--layers", "conv9_9"], ["unknown layer(s) conv9_9", "conv5_3"]),
    (["--layer-roi", "conv9=ROI_V1"], ["--layer-roi conv9=ROI_V1", "no decoded layer"]),
    (["--layer-roi", "conv1=ROI_V9"], ["unknown ROI 'ROI_V9'", "train.h5"]),
    (["--executor", "nonsense"], ["--executor 'nonsense'", "processes:N"]),
    (["--executor", "processes:x"], ["processes:N"]),
    (["--decoder", "lasso"], ["--decoder 'lasso'", "'kernel'"]),
    (["--alpha-per", "voxel"], ["--alpha-per 'voxel'"]),
    (["--snapshots", "a,b"], ["--snapshots"]),
    (["--seed", "-1"], ["--seed -1"]),
    (["--prior", "generator", "--generator", "relu9:x.pt"], ["--generator 'relu9:x.pt'", "relu7:PATH"]),
])
def test_bad_settings_are_refused_before_any_work(small_subject, tmp_path, extra, needles):
    subject, _ = small_subject
    line = _one_error(_args(subject, tmp_path / "out", *extra), *needles, max_seconds=15)
    assert "errors.pydantic.dev" not in line and "validation error" not in line
    assert not (tmp_path / "out").exists()          # nothing written


def test_bad_generator_file_and_out_file_are_refused_before_any_work(small_subject, tmp_path):
    subject, _ = small_subject
    bad = tmp_path / "gen" / "generator_relu7.pt"
    (bad.parent / "act_range" / "3x").mkdir(parents=True)
    (bad.parent / "act_range" / "3x" / "relu7.txt").write_text("\n".join(["1.0"] * 4096))
    bad.write_bytes(os.urandom(2048))
    _one_error(_args(subject, tmp_path / "out", "--prior", "generator", "--generator", f"relu7:{bad}"),
               str(bad), max_seconds=15)
    assert not (tmp_path / "out").exists()
    a_file = tmp_path / "results.txt"
    a_file.write_text("keep me")
    _one_error(_args(subject, a_file), str(a_file), "is a file", "another --out")
    assert a_file.read_text() == "keep me"
    _one_error(_args(subject, tmp_path / "out", test="bad/name"), "'bad/name'", "--test natural=")
    _one_error(["demo", "--out", str(a_file)], str(a_file), "is a file")
    _one_error(["demo", "--out", str(tmp_path / "d"), "--iterations", "0"], "--iterations 0")
    _one_error(["simulate", "--out", str(tmp_path / "s"), "--n-train", "1"], "--n-train 1")
    assert not (tmp_path / "d").exists() and not (tmp_path / "s").exists()


def test_compare_checks_every_variant_before_running_any(small_subject, tmp_path):
    subject, _ = small_subject
    args = _args(subject, tmp_path / "cmp")
    args[0:1] = ["compare", "rois", "--variants", "V1,V9"]
    _one_error(args, "ROI_V9", max_seconds=15)
    assert not (tmp_path / "cmp").exists()


def test_atomic_writes_leave_nothing_half_written(tmp_path):
    target = tmp_path / "recon.npy"
    save_npy(target, np.arange(5))
    with pytest.raises(KeyboardInterrupt):
        with atomic_path(target) as tmp, open(tmp, "wb") as f:
            f.write(b"half")
            raise KeyboardInterrupt
    assert np.array_equal(np.load(target), np.arange(5))           # the old file, whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["recon.npy"]  # no temporary left
    target.write_bytes(target.read_bytes()[:40])                    # damaged behind our back
    warnings = []
    assert load_or_none(target, load_npy, warnings.append) is None
    assert "unreadable" in warnings[0] and str(target) in warnings[0]
    assert not target.exists() and (tmp_path / "recon.npy.damaged").exists()


def test_unreadable_cache_files_are_recomputed(small_subject, tmp_path):
    """Damage every kind of cache file of a finished run: the rerun warns, recomputes and gives the same result."""
    subject, _ = small_subject
    out = tmp_path / "run"
    args = _args(subject, out, "--no-true-features", "--snapshots", "none")
    first = runner.invoke(app, args)
    assert first.exit_code == 0, first.output
    metrics = json.loads((out / "metrics.json").read_text())
    cache = out / "cache"
    damaged = [next(cache.glob("stats-*.npz")), next(cache.glob("decoded-*/decoded.npz")),
               next(cache.glob("*/recon_letters_decoded.npy")), next(cache.glob("decoded-*/decoded_chunks/conv3_1-0.npy"))]
    for p in damaged:
        p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
    again = runner.invoke(app, args)
    assert again.exit_code == 0, again.output
    for p in damaged:
        assert f"cache file {p} is unreadable" in again.output, again.output
    assert "Traceback" not in again.output
    assert "reused 12 of 13 finished decoding tasks" in again.output
    redone = json.loads((out / "metrics.json").read_text())
    assert redone["letters"]["pixel_identification"] == metrics["letters"]["pixel_identification"]
    ok = runner.invoke(app, args)                                    # and a third run reuses everything
    assert "is unreadable (" not in ok.output and "reused decoded features" in ok.output
    assert "reused finished reconstructions of 10 images" in ok.output


def test_ctrl_c_says_how_to_resume_and_the_rerun_says_what_it_reused(small_subject, tmp_path):
    subject, _ = small_subject
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "brainrecon", *_args(subject, out, "--no-true-features")]
    cmd[cmd.index("--iterations") + 1] = "120"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    # a shell that starts jobs in the background makes them ignore SIGINT, and Python then keeps it ignored:
    # give the run the default disposition a terminal gives it
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            stdin=subprocess.DEVNULL, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    seen = []
    for line in proc.stdout:                       # interrupt while reconstructing, after the first checkpoint
        seen.append(line)
        if "reconstructing 'letters'" in line:
            t0 = time.time()
            while not list(out.glob("cache/*/checkpoint_letters_decoded*.pt")) and time.time() - t0 < 300:
                time.sleep(0.05)
            proc.send_signal(signal.SIGINT)
            break
    rest, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert err.strip().splitlines() == [f"interrupted (finished stages are kept in {out}): run the same command "
                                        "again to resume"]
    assert not list(out.glob("cache/**/*.tmp*")), "a temporary file was left behind"
    resumed = runner.invoke(app, _args(subject, out, "--no-true-features", "--iterations", "120"))
    assert resumed.exit_code == 0, resumed.output
    assert "reused training statistics" not in resumed.output           # the decoded features are reused whole
    assert "reused decoded features" in resumed.output
    assert "from its checkpoint" in resumed.output                       # the reconstruction resumes


def test_python_api_checks_settings_too(small_subject, tmp_path):
    from pydantic import ValidationError

    from brainrecon.pipeline import PipelineConfig, PipelineError, run_pipeline
    with pytest.raises(ValidationError):
        PipelineConfig(alpha_pre=3.0)                                    # a typo is not silently ignored
    subject, paths = small_subject
    with pytest.raises(PipelineError, match="no test set"):
        run_pipeline(paths["train"], {}, subject / "images", tmp_path / "o")
    with pytest.raises(PipelineError, match="unknown layer"):
        run_pipeline(paths["train"], {"letters": paths["letters"]}, subject / "images", tmp_path / "o",
                     PipelineConfig(layers=["fc9"]))
    assert not Path(tmp_path / "o").exists()
