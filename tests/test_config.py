"""Config files for `nin train --config`: TOML, YAML and a run's own config.json, layered on a preset and
under command-line flags, with one-line errors for malformed files and settings."""

from __future__ import annotations

import json

import pytest

from nin.cli.main import main
from nin.errors import NinError
from nin.training.config import RunConfig, load_config, preset, read_config_file

TOML = """
preset = "d2l"
seed = 3

[model]
options = { mlp_layers = 1 }

[train]
lr = 0.04
epochs = 20
batch_size = 64
milestones = [0.3, 0.6]
"""

YAML = """
preset: d2l
seed: 3
model:
  options: {mlp_layers: 1}
train:
  lr: 0.04
  epochs: 20
  batch_size: 64
  milestones: [0.3, 0.6]
"""


def test_toml_and_yaml_give_the_same_config_layered_on_the_preset(tmp_path):
    (tmp_path / "a.toml").write_text(TOML)
    (tmp_path / "a.yaml").write_text(YAML)
    a, b = load_config(tmp_path / "a.toml"), load_config(tmp_path / "a.yaml")
    assert a == b
    assert (a.seed, a.train.lr, a.train.epochs, a.train.batch_size) == (3, 0.04, 20, 64)
    assert a.train.milestones == (0.3, 0.6) and a.model.options == {"mlp_layers": 1}
    d2l = preset("d2l")
    assert a.model.name == "nin_d2l" and a.data.resize == 224 and a.train.momentum == d2l.train.momentum == 0.0


def test_every_preset_survives_the_json_round_trip_and_validates():
    from nin.training.config import PRESETS

    assert {"default", "d2l", "nin-cifar10", "fast", "best"} <= set(PRESETS)
    for name in PRESETS:
        cfg = preset(name)
        cfg.validate()
        assert RunConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


@pytest.mark.slow
def test_a_run_repeats_from_its_config_json_and_flags_override_the_file(capsys, tmp_path, fashion_mnist):
    (tmp_path / "c.toml").write_text('[data]\nsubset = 256\ntest_subset = 200\n[train]\nepochs = 1\nbatch_size = 64\n')
    first = tmp_path / "first"
    assert main(["train", "--config", str(tmp_path / "c.toml"), "--lr", "0.05", "--out", str(first), "--quiet"]) == 0
    saved = json.loads((first / "config.json").read_text())["config"]
    assert saved["train"]["lr"] == 0.05 and saved["data"]["subset"] == 256 and saved["train"]["batch_size"] == 64
    again = tmp_path / "again"
    assert main(["train", "--config", str(first / "config.json"), "--out", str(again), "--quiet"]) == 0
    assert json.loads((again / "config.json").read_text())["config"] == saved
    m1, m2 = ((d / "metrics.csv").read_text().splitlines()[1].split(",")[:5] for d in (first, again))
    assert m1 == m2  # seeded: the same run, step for step (train loss and accuracy)


def test_another_model_in_the_file_drops_the_presets_options(tmp_path):
    (tmp_path / "m.toml").write_text('[model]\nname = "nin28"\n')
    cfg = load_config(tmp_path / "m.toml", "nin-cifar10")
    assert cfg.model.name == "nin28" and cfg.model.options == {} and cfg.data.dataset == "cifar10"


@pytest.mark.parametrize("name, text, needle", [
    ("bad.toml", "[train\nlr = 1", "not valid TOML"),
    ("bad.yaml", "train: [1, 2", "not valid YAML"),
    ("bad.json", "{", "not valid JSON"),
    ("list.yaml", "- 1\n- 2\n", "expected a table"),
    ("typo.toml", "[train]\nlearning_rate = 0.1\n", "unknown train setting(s): learning_rate"),
    ("type.toml", '[train]\nlr = "fast"\n', "train.lr must be float, got 'fast'"),
    ("int.toml", "[train]\nepochs = 2.5\n", "train.epochs must be int"),
    ("lit.toml", '[train]\nschedule = "linear"\n', "train.schedule must be one of"),
    ("preset.toml", 'preset = "turbo"\n', "unknown preset 'turbo'"),
    ("config.ini", "[train]\n", "unknown config format"),
    ("missing.toml", None, "no such file or directory"),
])
def test_malformed_config_files_are_one_line_errors_naming_the_file(capsys, tmp_path, name, text, needle):
    path = tmp_path / name
    if text is not None:
        path.write_text(text)
    assert main(["train", "--config", str(path), "--out", str(tmp_path / "r"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(path) in err and needle in err and "Traceback" not in err
    assert not (tmp_path / "r").exists()  # nothing was created


def test_a_run_directorys_config_json_gives_its_config_part(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"config": {"seed": 7}, "env": {"torch": "x"}}))
    assert read_config_file(tmp_path / "config.json") == {"seed": 7}
    assert load_config(tmp_path / "config.json").seed == 7
    (tmp_path / "plain.json").write_text(json.dumps({"env": {}}))  # not a run's file: env is an unknown setting
    with pytest.raises(NinError, match="unknown RunConfig setting"):
        load_config(tmp_path / "plain.json")


# ----------------------------------------------------- one override path, flags derived from the fields


def test_override_type_checks_and_copies():
    from nin.training.config import override, preset

    base = preset("default")
    cfg = override(base, {"train.milestones": [0.3, 0.6], "train.lr": 1, "data.subset": 100})
    assert cfg.train.milestones == (0.3, 0.6) and cfg.train.lr == 1.0 and isinstance(cfg.train.lr, float)
    assert base.train.milestones == (0.5, 0.75) and base.data.subset is None
    with pytest.raises(NinError, match="train.epochs must be int"):
        override(base, {"train.epochs": "many"})
    with pytest.raises(NinError, match="no setting 'data.sbset'; did you mean 'data.subset'"):
        override(base, {"data.sbset": 1})


def test_a_new_model_name_starts_from_no_options():
    from nin.training.config import override, preset

    cfg = override(preset("default"), {"model.options.width": 0.5})
    assert override(cfg, {"model.name": "nin_d2l"}).model.options == {}
    assert override(cfg, {"model.name": "nin28"}).model.options == {"width": 0.5}  # the same model keeps them
    assert override(cfg, {"model.name": "nin_d2l", "model.options.mlp_layers": 1}).model.options == {"mlp_layers": 1}


def test_train_flags_are_derived_from_the_config_fields():
    """Every field a flag stands for gives it its help text, its parser and its default (None: not given), so a
    new setting needs one field: the flag below comes from TrainConfig.label_smoothing's declaration."""
    from dataclasses import fields

    from nin.cli.main import build_parser
    from nin.cli.options import SETTING, settings_given
    from nin.training.config import TrainConfig

    train = build_parser()._subparsers._group_actions[0].choices["train"]
    actions = {a.dest: a for a in train._actions}
    field = next(f for f in fields(TrainConfig) if f.name == "label_smoothing")
    action = actions[SETTING + "train.label_smoothing"]
    assert action.help == field.metadata["help"] and action.default is None
    assert action.option_strings == ["--label-smoothing"]
    args = train.parse_args(["--label-smoothing", "0.05", "--no-nesterov", "--schedule", "step"])
    assert settings_given(args) == {"train.label_smoothing": 0.05, "train.nesterov": False, "train.schedule": "step"}
    assert settings_given(train.parse_args(["--no-download", "--checkpoint-every", "5"])) == {
        "data.download": False, "checkpoint.every_steps": 5}


def test_every_documented_setting_of_a_run_is_a_flag_of_nin_train():
    """A field with help text is a flag, with no list to update: the flags of nin train are the fields."""
    from dataclasses import fields

    from nin.cli.main import build_parser
    from nin.cli.options import SETTING
    from nin.data import DataConfig
    from nin.training.config import CheckpointConfig, ModelConfig, RunConfig, TrainConfig

    train = build_parser()._subparsers._group_actions[0].choices["train"]
    dests = {a.dest for a in train._actions}
    for cls, section in ((TrainConfig, "train."), (DataConfig, "data."), (CheckpointConfig, "checkpoint."),
                         (ModelConfig, "model."), (RunConfig, "")):
        documented = [f.name for f in fields(cls) if f.metadata.get("help")]
        assert documented and all(SETTING + section + name in dests for name in documented), cls.__name__
