"""The configuration tree: one sub-model per prior, former keys refused with their new place, cache
keys from the settings that decide a result, the CLI options made from the schema, ``--set``."""
import json

import numpy as np
import pytest
from pydantic import ValidationError
from typer.testing import CliRunner

from brainrecon.cli import _run_setup, app
from brainrecon.cli_settings import option_kind, setting_options
from brainrecon.decode.decoder import DecodedFeatures
from brainrecon.evaluate.decoding import DecodingScores
from brainrecon.pipeline import PipelineConfig, feature_accuracy
from brainrecon.recon import checkpoint as ckpt
from brainrecon.recon.config import FORMER_KEYS, ReconConfig

runner = CliRunner()


@pytest.fixture
def inputs(tmp_path):
    """Input paths that exist (the settings are checked before the files are read)."""
    for name in ("train.h5", "test.h5"):
        (tmp_path / name).write_bytes(b"")
    (tmp_path / "images").mkdir()
    return dict(train=tmp_path / "train.h5", test=[f"letters={tmp_path / 'test.h5'}"], images=tmp_path / "images",
                out=tmp_path / "out")


def _cli(inputs, *extra):
    return ["run", "--train", str(inputs["train"]), "--test", inputs["test"][0], "--images", str(inputs["images"]),
            "--out", str(inputs["out"]), *extra]


def _error_line(result) -> str:
    assert result.exit_code == 2, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in result.output, result.output
    return errors[0]


def test_each_prior_has_its_settings_and_the_defaults_are_unchanged():
    cfg = ReconConfig(prior="fourier", iterations=50, fourier={"lr": 0.05}, augment={"rotate": 5.0})
    assert cfg.settings is cfg.fourier and cfg.fourier.lr == 0.05 and cfg.fourier.decay_power == 1.0
    d = ReconConfig()
    assert (d.gd.lr_start, d.gd.lr_end, d.gd.momentum, d.gd.decay_start, d.gd.blur_start, d.gd.blur_end) == \
        (2.0, 1e-10, 0.9, 0.2, 2.0, 0.5)
    assert (d.lbfgs.memory, d.generator.decay, d.fourier.lr, d.dip.lr, d.augment.jitter, d.reference_size) == \
        (10, 0.01, 0.1, 0.01, 8.0, 224)
    with pytest.raises(ValidationError, match="init"):
        ReconConfig(gd={"init": "zeros"})                  # a Literal choice
    with pytest.raises(ValidationError, match="lrr"):
        ReconConfig(fourier={"lrr": 0.1})                  # extra="forbid" in the sub-models too


@pytest.mark.parametrize("old", ["fourier_lr", "dip_augment", "latent_decay", "lbfgs_memory", "chroma_blur",
                                 "augment_jitter", "blur_reference_size"])
def test_a_former_flat_key_names_its_new_place(old):
    with pytest.raises(ValidationError) as err:
        ReconConfig(**{old: 1})
    assert f"{old} is now recon.{FORMER_KEYS[old]}" in str(err.value)
    with pytest.raises(ValidationError, match=f"recon.{FORMER_KEYS[old]}"):
        PipelineConfig(recon={old: 1})


def test_a_former_key_in_a_yaml_file_is_one_clear_error(inputs, tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text(f"train: {inputs['train']}\ntest: {{letters: {tmp_path / 'test.h5'}}}\n"
                   f"images: {inputs['images']}\nout: {inputs['out']}\nrecon: {{prior: fourier, fourier_lr: 0.05}}\n")
    line = _error_line(runner.invoke(app, ["run", str(cfg)]))
    assert "error: recon: former reconstruction setting(s): fourier_lr is now recon.fourier.lr" in line
    assert "{'prior'" not in line
    cfg.write_text(cfg.read_text().replace("fourier_lr: 0.05", "fourier: {lrr: 0.05}"))
    line = _error_line(runner.invoke(app, ["run", str(cfg)]))
    assert "recon.fourier.lrr: unknown setting; valid: lr, decay_power" in line
    assert not inputs["out"].exists()


def test_the_cache_key_comes_from_the_chosen_priors_settings():
    def key(**recon):
        return PipelineConfig(recon=ReconConfig(**recon)).digest([])

    def fingerprint(**recon):
        return ckpt.fingerprint(ReconConfig(**recon), 32, [])

    base = key(prior="fourier")
    # another prior's settings, or execution settings, do not invalidate a fourier run's reconstructions
    for other in ({"dip": {"lr": 0.5}}, {"gd": {"lr_start": 1.0}}, {"lbfgs": {"memory": 3}},
                  {"generator": {"decay": 0.5}}, {"device": "cuda"}, {"checkpoint_every": 3}):
        assert key(prior="fourier", **other) == base, other
        assert fingerprint(prior="fourier", **other) == fingerprint(prior="fourier"), other
    # its own settings, the transforms it uses and the shared settings do
    for own in ({"fourier": {"lr": 0.05}}, {"augment": {"rotate": 0.0}}, {"iterations": 10}, {"batch_size": 4},
                {"layer_scale": {"conv1_1": 2.0}}, {"reference_size": 112}):
        assert key(prior="fourier", **own) != base, own
        assert fingerprint(prior="fourier", **own) != fingerprint(prior="fourier"), own
    # gd uses no random transforms; dip's settings decide a dip run
    assert key(prior="gd", augment={"rotate": 0.0}) == key(prior="gd")
    assert key(prior="dip", dip={"lr": 0.5}) != key(prior="dip")
    # the decoded features never depend on the reconstruction settings
    assert PipelineConfig(recon={"prior": "dip", "dip": {"lr": 0.5}}).digest([], decoding_only=True) == \
        PipelineConfig().digest([], decoding_only=True)


def test_every_settable_field_has_an_option_and_its_description_as_help():
    options = {o.path: o for o in setting_options()}
    for name, info in PipelineConfig.model_fields.items():
        if option_kind(info.annotation) is not None:          # a field added later gets its option too
            assert (name,) in options, name
    for name in ("prior", "iterations", "device"):
        assert ("recon", name) in options
    assert {o.flag for o in options.values()} >= {"--image-size", "--prior", "--iterations", "--layer-roi",
                                                   "--decoder", "--layers", "--no-true-features", "--snapshots",
                                                   "--alpha-sample-units", "--roi", "--seed", "--generator"}
    text = " ".join(runner.invoke(app, ["run", "--help"]).output.split())
    desc = PipelineConfig.model_fields["alpha_sample_units"].description
    assert "--alpha-sample-units" in text and desc in text and "[default: 256]" in text and "--set" in text
    # a misspelt option is a usage error suggesting the right name
    result = runner.invoke(app, ["run", "--image-sise", "32"])
    assert result.exit_code == 2 and "--image-size" in result.output


def test_set_reaches_any_setting(inputs):
    sets = ["recon.fourier.lr=0.05", "recon.augment={rotate: 4, scale: 0.2}", "executor_options={n_workers: 2}",
            "recon.layer_scale.conv1_1=2", "alpha_sample_units=64"]
    cfg, *_ = _run_setup(None, inputs, {"prior": "fourier", "iterations": 7, "set_": sets})
    assert cfg.recon.prior == "fourier" and cfg.recon.iterations == 7 and cfg.recon.fourier.lr == 0.05
    assert (cfg.recon.augment.rotate, cfg.recon.augment.scale, cfg.recon.augment.jitter) == (4, 0.2, 8.0)
    assert cfg.executor_options == {"n_workers": 2} and cfg.recon.layer_scale == {"conv1_1": 2.0}
    assert cfg.alpha_sample_units == 64
    # --set is applied after the options; an option and the same --set agree
    cfg, *_ = _run_setup(None, inputs, {"iterations": 7, "set_": ["recon.iterations=9"]})
    assert cfg.recon.iterations == 9


@pytest.mark.parametrize("item, needles", [
    ("recon.fourier.lrr=0.1", ["'lrr' is not a setting of recon.fourier", "recon.fourier.lr", "recon.fourier.decay_power"]),
    ("recon.fourrier.lr=0.1", ["'fourrier' is not a setting of recon", "recon.fourier", "recon.dip"]),
    ("imagesize=32", ["'imagesize' is not a setting of the run", "image_size"]),
    ("recon.fourier.lr", ["DOTTED.PATH=VALUE"]),
    ("recon.fourier.lr=-1", ["recon.fourier.lr -1", "greater than 0"]),
    ("recon.iterations=0", ["--iterations 0", "at least 1"]),
])
def test_set_errors_name_the_valid_keys(inputs, item, needles):
    line = _error_line(runner.invoke(app, _cli(inputs, "--set", item)))
    for needle in needles:
        assert needle in line, line
    assert not inputs["out"].exists()


def test_feature_accuracy_is_a_typed_record_per_layer():
    rng = np.random.default_rng(0)
    true = {"a": rng.standard_normal((6, 4, 2, 2)).astype(np.float32)}
    d = DecodedFeatures({"a": true["a"].copy()}, list("uvwxyz"), 1.0, 32,
                        train_mean={"a": np.zeros(16)}, train_sd={"a": np.ones(16)})
    scores = feature_accuracy(d, true)["a"]
    assert isinstance(scores, DecodingScores)
    assert scores.profile_correlation == pytest.approx(1.0) and scores.pattern_correlation == pytest.approx(1.0)
    assert scores.feature_identification == 1.0
    assert list(scores.to_json()) == ["profile_correlation", "pattern_correlation", "feature_identification"]
    assert json.loads(json.dumps(scores.to_json()))["feature_identification"] == 1.0


def test_the_other_commands_do_not_build_the_settings_options():
    """The options are made from the schema when run/compare/demo are used, not at every start."""
    import subprocess
    import sys
    code = ("import sys; from typer.testing import CliRunner; from brainrecon.cli import app; "
            "r = CliRunner().invoke(app, ['--help']); assert r.exit_code == 0 and 'demo' in r.output; "
            "print('brainrecon.pipeline' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
