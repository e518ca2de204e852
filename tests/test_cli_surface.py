"""The command line tells the truth: its version, its defaults, refused nonsense counts, and warnings on the console."""

from __future__ import annotations

import argparse
import importlib.metadata

import pytest
import torch

import formerkit as fk
from formerkit.cli import build_parser, main


def test_version_is_the_installed_package_version(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out == f"formerkit {importlib.metadata.version('formerkit')}\n"


def _subcommands() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(sub.choices)


def test_every_subcommand_help_shows_its_defaults():
    for name, parser in _subcommands().items():
        text = " ".join(parser.format_help().split())
        one_of = [a for group in parser._mutually_exclusive_groups if group.required for a in group._group_actions]
        for action in parser._actions:
            flag = isinstance(action, (argparse._HelpAction, argparse._StoreTrueAction))
            if flag or action.required or action in one_of:  # nothing to default
                continue
            if action.default is None or "default" in (action.help or ""):
                assert "default" in (action.help or ""), f"{name} {action.option_strings}: say the default in words"
            else:
                assert f"(default: {action.default})" in text, f"{name} {action.option_strings}"


@pytest.mark.parametrize("argv, message", [
    (["sample", "--num-samples", "-1"], "argument --num-samples: expected an integer >= 1, got -1"),
    (["sample", "--num-samples", "0"], "argument --num-samples: expected an integer >= 1, got 0"),
    (["sample", "--max-new-tokens", "-5"], "argument --max-new-tokens: expected an integer >= 1, got -5"),
    (["sample", "--top-k", "-1"], "argument --top-k: expected an integer >= 0, got -1"),
    (["sample", "--num-samples", "two"], "argument --num-samples: expected an integer >= 1, got 'two'"),
    (["generate", "--max-new-tokens", "0"], "argument --max-new-tokens: expected an integer >= 1, got 0"),
    (["generate", "--top-k", "0"], "argument --top-k: expected an integer >= 1, got 0"),
    (["generate", "--num-beams", "-2"], "argument --num-beams: expected an integer >= 1, got -2"),
    (["generate", "--truncate", "middle"], "argument --truncate: invalid choice: 'middle'"),
])
def test_nonsense_counts_are_usage_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([*argv, "--checkpoint", "unused"])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


@pytest.fixture(scope="module")
def char_checkpoint(tmp_path_factory, one_thread):
    path = tmp_path_factory.mktemp("char")
    tokenizer = fk.CharTokenizer.from_texts(["abcdefghij "])
    torch.manual_seed(0)
    cfg = fk.ModelConfig.from_preset("gpt2", n_layers=1, d_model=16, n_heads=2, d_ff=32, max_seq_len=16,
                                     vocab_size=tokenizer.vocab_size)
    fk.save_pretrained(fk.Transformer(cfg), path)
    tokenizer.save(path)
    return path


@pytest.mark.parametrize("command", ["sample", "generate"])
def test_unknown_prompt_characters_are_a_warning_on_the_console(char_checkpoint, command, capsys):
    assert main([command, "--checkpoint", str(char_checkpoint), "--prompt", "abcé", "--max-new-tokens", "3"]) == 0
    err = capsys.readouterr().err
    assert err.count("formerkit: warning: prompt characters unknown to the char tokenizer become <unk>: 'é'") == 1


@pytest.mark.parametrize("command", ["sample", "generate"])
def test_truncate_on_the_command_line(char_checkpoint, command, capsys):
    argv = [command, "--checkpoint", str(char_checkpoint), "--prompt", "abcdefghij" * 2, "--max-new-tokens", "4"]
    assert main(argv) == 2
    assert "shorten the prompt by 8 tokens, to 12" in capsys.readouterr().err
    assert main([*argv, "--truncate", "right", "--temperature", "0"]) == 0
    assert capsys.readouterr().out.startswith("abcdefghijab")


def test_a_config_warning_shows_on_the_console_once(tmp_path, capsys):
    argv = ["train", "--train.steps", "5", "--data.source", str(tmp_path / "missing.txt"),
            "--checkpoint.run_dir", str(tmp_path / "run")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("formerkit: warning: optim.warmup_steps=100 >= train.steps=5") == 1
    assert "formerkit: error: data source" in err
