"""Option values are checked against their types, and the model section follows one rule wherever it is written."""

from __future__ import annotations

import pytest

import formerkit as fk
from formerkit.train import TrainConfig
from formerkit.train.config import _DEFAULT_MODEL


def load_yaml(tmp_path, text: str, *overrides: str) -> TrainConfig:
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return TrainConfig.load(path, list(overrides))


# ---- booleans --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("value", ["maybe", "1", "0", "tRuE", "null"])
def test_a_bool_option_on_the_command_line_takes_only_true_or_false(value):
    with pytest.raises(fk.ConfigError, match=r"log\.tensorboard must be true or false, got "):
        TrainConfig.load(None, ["--log.tensorboard", value])


@pytest.mark.parametrize("value, expected", [("false", False), ("False", False), ("no", False), ("true", True),
                                             ("TRUE", True), ("on", True)])
def test_yaml_spellings_of_booleans_are_booleans(value, expected):
    assert TrainConfig.load(None, [f"--log.tensorboard={value}"]).log.tensorboard is expected


def test_a_bool_option_in_yaml_takes_only_booleans(tmp_path):
    with pytest.raises(fk.ConfigError, match="log.tensorboard must be true or false, got 'maybe'"):
        load_yaml(tmp_path, "log:\n  tensorboard: maybe\n")
    with pytest.raises(fk.ConfigError,
                       match=r"checkpoint.resume must be true, false or a step directory \(step-0000100\), got 1"):
        load_yaml(tmp_path, "checkpoint:\n  resume: 1\n")
    assert load_yaml(tmp_path, "log:\n  tensorboard: no\n").log.tensorboard is False


@pytest.mark.parametrize("value", ["yes", "false", 1, 0, None])
def test_model_config_bool_fields_take_only_booleans(value):
    with pytest.raises(fk.ConfigError, match=f"qkv_bias must be true or false, got {value!r}"):
        fk.ModelConfig(qkv_bias=value)
    assert fk.ModelConfig(qkv_bias=False).qkv_bias is False


def test_model_options_of_a_run_are_type_checked_when_the_config_loads(tmp_path):
    with pytest.raises(fk.ConfigError, match="model.tie_embeddings must be true or false, got 'maybe'"):
        TrainConfig.load(None, ["--model.tie_embeddings", "maybe"])
    with pytest.raises(fk.ConfigError, match="model.d_model must be an integer, got 'wide'"):
        load_yaml(tmp_path, "model:\n  d_model: wide\n")
    with pytest.raises(fk.ConfigError, match="model.attn_scale must be a number or null, got 'x'"):
        TrainConfig.load(None, ["--model.attn_scale", "x"])
    assert load_yaml(tmp_path, "model:\n  rope_theta: 5e5\n").model["rope_theta"] == 5e5  # YAML 1.1 text


# ---- numbers and text ------------------------------------------------------------------------------------


@pytest.mark.parametrize("args, message", [
    (["--train.steps", "many"], "train.steps must be an integer, got 'many'"),
    (["--train.steps", "2.5"], "train.steps must be an integer, got 2.5"),
    (["--train.batch_size", "true"], "train.batch_size must be an integer, got True"),
    (["--optim.lr", "fast"], "optim.lr must be a number, got 'fast'"),
    (["--optim.lr", "false"], "optim.lr must be a number, got False"),
    (["--train.max_minutes", "soon"], "train.max_minutes must be a number or null, got 'soon'"),
    (["--log.samples", "-1"], "log.samples must be an integer >= 0, got -1"),
    (["--log.sample_tokens", "0"], "log.sample_tokens must be a positive integer, got 0"),
])
def test_numbers_are_checked_on_the_command_line(args, message):
    with pytest.raises(fk.ConfigError, match=message):
        TrainConfig.load(None, args)


def test_numbers_are_checked_in_yaml(tmp_path):
    with pytest.raises(fk.ConfigError, match="optim.lr must be a number, got 'fast'"):
        load_yaml(tmp_path, "optim:\n  lr: fast\n")
    with pytest.raises(fk.ConfigError, match=r"eval.every must be an integer, got \[1, 2\]"):
        load_yaml(tmp_path, "eval:\n  every: [1, 2]\n")
    assert load_yaml(tmp_path, "optim:\n  lr: 3e-4\n").optim.lr == 3e-4
    assert TrainConfig.load(None, ["--train.max_minutes", "null"]).train.max_minutes is None


def test_text_options_keep_their_text(tmp_path):
    cfg = TrainConfig.load(None, ["--checkpoint.run_dir", "2024", "--data.source", "1e3", "--train.device", "cpu"])
    assert (cfg.checkpoint.run_dir, cfg.data.source) == ("2024", "1e3")
    assert TrainConfig.load(None, ["--data.tokenizer", "null"]).data.tokenizer is None
    assert TrainConfig.load(None, ["--data.source="]).data.source is None
    with pytest.raises(fk.ConfigError, match="checkpoint.run_dir must be a string, got 2024"):
        load_yaml(tmp_path, "checkpoint:\n  run_dir: 2024\n")


def test_a_section_must_be_a_mapping(tmp_path):
    with pytest.raises(fk.ConfigError, match='section "log" must be a mapping of options'):
        load_yaml(tmp_path, "log: 3\n")
    with pytest.raises(fk.ConfigError, match='section "model" must be a mapping of options'):
        load_yaml(tmp_path, "model: gpt2\n")
    assert load_yaml(tmp_path, "log:\n", "--log.every", "5").log.every == 5  # an empty section takes overrides
    with pytest.raises(fk.ConfigError, match='section "model" must be a mapping of options'):
        TrainConfig(model="gpt2")


# ---- the model section: one rule -------------------------------------------------------------------------


def test_sizes_without_a_preset_start_from_the_default_model_in_yaml_and_on_the_command_line(tmp_path):
    from_yaml = load_yaml(tmp_path, "model:\n  n_layers: 2\n")
    from_cli = TrainConfig.load(None, ["--model.n_layers", "2"])
    assert from_yaml.model == from_cli.model == {**_DEFAULT_MODEL, "n_layers": 2}
    built = from_yaml.model_config(vocab_size=300)
    assert (built.d_model, built.resid_dropout, built.attn_dropout, built.embed_dropout) == (320, 0.0, 0.0, 0.0)
    assert TrainConfig.load(None, []).model == _DEFAULT_MODEL
    assert load_yaml(tmp_path, "model:\n").model == _DEFAULT_MODEL


def test_a_named_preset_brings_all_its_own_values_wherever_it_is_named(tmp_path):
    expected = {"preset": "gpt2", "n_layers": 2}
    assert load_yaml(tmp_path, "model:\n  preset: gpt2\n  n_layers: 2\n").model == expected
    assert TrainConfig.load(None, ["--model.preset", "gpt2", "--model.n_layers", "2"]).model == expected
    assert load_yaml(tmp_path, "model:\n  n_layers: 2\n", "--model.preset", "gpt2").model == expected
    built = TrainConfig.load(None, ["--model.preset", "gpt2", "--model.n_layers", "2"]).model_config(300)
    assert (built.d_model, built.resid_dropout) == (768, 0.1)  # gpt2's own width and dropout


def test_init_from_gets_no_default_sizes(tmp_path):
    assert load_yaml(tmp_path, "model:\n  init_from: some/dir\n  resid_dropout: 0.2\n").model == {
        "init_from": "some/dir", "resid_dropout": 0.2}
    assert TrainConfig.load(None, ["--model.init_from", "some/dir"]).model == {"init_from": "some/dir"}
    assert load_yaml(tmp_path, "train:\n  steps: 200\n", "--model.init_from", "x").model == {"init_from": "x"}


def test_train_help_states_the_rules(capsys):
    from formerkit.cli import main

    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "unless the config file or the command line names model.preset or model.init_from" in out
    assert "a boolean option takes true or false" in out
