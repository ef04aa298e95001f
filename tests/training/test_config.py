import argparse
import re
from pathlib import Path

import pytest

from training.config import PRESETS, add_config_arguments, build_config, config_from_args, load_yaml


def _parse(argv):
    parser = argparse.ArgumentParser()
    add_config_arguments(parser)
    return config_from_args(parser.parse_args(argv))


def test_precedence_defaults_preset_yaml_cli(tmp_path):
    yaml_file = tmp_path / "c.yaml"
    yaml_file.write_text(
        "preset: study\nepochs: 7\nlr: 0.02\ndatasets:\n  - source: a.csv\n    species: dog\n"
    )
    config = _parse(["--config", str(yaml_file), "--lr", "0.05", "--hflip", "false"])
    assert config.preset == "study"
    assert config.batch_size == PRESETS["study"]["batch_size"] == 300  # from the preset
    assert config.epochs == 7  # YAML over preset
    assert config.lr == 0.05  # command line over YAML
    assert config.hflip is False
    assert config.datasets[0].species == "dog"


def test_cli_datasets_replace_yaml_and_config_is_frozen(tmp_path):
    config = _parse(["--dataset", "x.csv:cattle", "--dataset", "y.csv"])
    assert [(d.source, d.species) for d in config.datasets] == [("x.csv", "cattle"), ("y.csv", None)]
    with pytest.raises(AttributeError):
        config.lr = 1.0  # type: ignore[misc]


def test_saved_config_reloads_identically(tmp_path):
    config = build_config({"datasets": [{"source": "a.csv", "species": "dog", "weight": 2.0}], "epochs": 3})
    config.save(tmp_path / "config.yaml")
    assert _parse(["--config", str(tmp_path / "config.yaml")]) == config


@pytest.mark.parametrize(
    "values, message",
    [
        ({"loss": "softmax"}, "loss must be"),
        ({"loss": "triplet"}, "samples_per_individual"),
        (
            {"loss": "triplet", "samples_per_individual": 4, "batch_size": 18},
            "multiple of samples_per_individual",
        ),
        ({"preset": "turbo"}, "unknown preset"),
        ({"learning_rate": 1}, "unknown configuration keys"),
        ({"train_fraction": 0}, "train_fraction"),
        ({"train_fraction": 1.5}, "train_fraction"),
        ({"train_on_test": True, "train_fraction": 0.5}, "leave train_fraction at 1"),
    ],
)
def test_invalid_configurations_are_refused(values, message):
    with pytest.raises(ValueError, match=message):
        build_config(values)


def test_every_option_has_help():
    parser = argparse.ArgumentParser()
    add_config_arguments(parser)
    for action in parser._actions:
        if action.option_strings and action.dest != "help":
            assert action.help and len(action.help) > 10, action.dest


def test_study_configs_build_and_run_all_trains_sources_first():
    study = Path(__file__).resolve().parents[2] / "configs" / "study"
    script = (study / "run_all.sh").read_text()
    listed = re.search(r"runs=\(([^)]*)\)", script.split("if [", 1)[1]).group(1).split()
    configs = {path.stem: build_config(load_yaml(path)) for path in study.glob("*.yaml")}
    assert sorted(listed) == sorted(configs), "run_all.sh must list every study config once"
    for name, config in configs.items():
        assert config.name == name, f"{name}.yaml writes to runs/study/{config.name}"
        if config.init_from:
            source = Path(config.init_from).parts[2]  # runs/study/<run>/artifacts/<species>
            assert listed.index(source) < listed.index(name), f"{name} runs before its source {source}"
