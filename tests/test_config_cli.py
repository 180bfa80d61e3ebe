"""SpectralVolumeConfig validation and the recipe parser's YAML rules."""

import pytest
import yaml

from hf_specvol.cli import RecipeParser
from hf_specvol.config import SpectralVolumeConfig
from hf_specvol.models import ModelArguments
from hf_specvol.pipeline import BooleanTaskArguments


@pytest.mark.parametrize("field, value", [
    ("spectral_volume_coef", -0.1),
    ("spectral_schedule", "cosine"),
    ("spectral_expansion_epochs", 20.0),  # longer than num_train_epochs=3
    ("ntk_probe_size", 0),
    ("ntk_interval_steps", -1),
    ("ntk_lambda_growth", 0.5),
    ("spectral_eps", 0.0),
    ("rank_snapshot_epochs", [0]),
])
def test_bad_values_name_the_field(tmp_path, field, value):
    with pytest.raises(ValueError, match=field):
        SpectralVolumeConfig(output_dir=str(tmp_path / "out"), num_train_epochs=3, **{field: value})
    assert not (tmp_path / "out").exists()


def test_defaults(tmp_path):
    args = SpectralVolumeConfig(output_dir=str(tmp_path), num_train_epochs=10)
    assert args.rank_snapshot_epochs == [10]
    assert args.restore_callback_states_from_checkpoint is True
    assert args.spectral_schedule == "fixed"


def _parser():
    return RecipeParser((BooleanTaskArguments, ModelArguments, SpectralVolumeConfig))


def test_yaml_defaults_and_cli_wins(tmp_path):
    config = tmp_path / "recipe.yaml"
    config.write_text(yaml.safe_dump({"n_bits": 12, "k": 3, "hidden_size": 32, "num_train_epochs": 4,
                                      "spectral_volume_coef": 0.3, "output_dir": str(tmp_path / "o"),
                                      "rank_snapshot_epochs": [2, 4]}))
    task, model, train = _parser().parse_args_and_config(["--config", str(config), "--k", "5",
                                                          "--spectral_volume_coef", "0.05"])
    assert (task.n_bits, task.k, model.hidden_size) == (12, 5, 32)
    assert train.spectral_volume_coef == 0.05 and train.num_train_epochs == 4
    assert train.rank_snapshot_epochs == [2, 4]


def test_unknown_yaml_key_fails(tmp_path):
    config = tmp_path / "recipe.yaml"
    config.write_text("n_bits: 12\nnot_a_field: 1\n")
    with pytest.raises(SystemExit, match="not_a_field"):
        _parser().parse_args_and_config(["--config", str(config)])


def test_unknown_cli_flag_fails():
    with pytest.raises((SystemExit, ValueError)):
        _parser().parse_args_and_config(["--not_a_flag", "1"])


@pytest.mark.parametrize("kwargs, field", [
    ({"model_type": "bert-nope"}, "model_type"),
    ({"model_type": "t5"}, "model_type"),  # a seq2seq model is not a causal LM
    ({"hidden_size": 30, "num_heads": 4}, "hidden_size"),
])
def test_bad_model_arguments(kwargs, field):
    with pytest.raises(ValueError, match=field):
        ModelArguments(**kwargs)


def test_unknown_task():
    with pytest.raises(ValueError, match="task"):
        BooleanTaskArguments(task="xor")


def test_invalid_value_is_one_error_line(capsys):
    with pytest.raises(SystemExit) as exit_info:
        _parser().parse_args_and_config(["--spectral_volume_coef", "-1", "--num_train_epochs", "5"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "error:" in err and "spectral_volume_coef=-1" in err and "Traceback" not in err


def test_impossible_task_fails_at_parse_time():
    with pytest.raises(ValueError, match="train_size"):
        BooleanTaskArguments(n_bits=4, k=3, train_size=20)  # only 16 strings of 4 bits


@pytest.mark.parametrize("field, value", [("spectral_volume_coef", float("inf")), ("learning_rate", float("nan")),
                                          ("spectral_eps", float("nan")), ("spectral_decay_epochs", float("inf")),
                                          ("spectral_include", "(["), ("spectral_exclude", "*x")])
def test_non_finite_values_and_bad_regexes_are_refused(tmp_path, field, value):
    with pytest.raises(ValueError, match=field):
        SpectralVolumeConfig(output_dir=str(tmp_path / "out"), num_train_epochs=3, **{field: value})


def test_window_check_ignored_when_penalty_is_off(tmp_path):
    args = SpectralVolumeConfig(output_dir=str(tmp_path), num_train_epochs=1, spectral_volume_coef=0.0)
    assert args.spectral_expansion_epochs > args.num_train_epochs


def test_malformed_yaml_is_one_error(tmp_path):
    config = tmp_path / "bad.yaml"
    config.write_text("n_bits: [1, 2\n")
    with pytest.raises(SystemExit, match="not valid YAML"):
        _parser().parse_args_and_config(["--config", str(config)])
    with pytest.raises(SystemExit, match="cannot read"):
        _parser().parse_args_and_config(["--config", str(tmp_path)])
