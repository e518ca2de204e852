"""Smoke test of examples/length_extrapolation.py on a tiny corpus, so the example cannot rot."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from conftest import ROOT, load_script


@pytest.fixture(scope="module")
def example():
    return load_script("examples/length_extrapolation.py")


@pytest.mark.slow
def test_extrapolation_table(example, tmp_path, capsys):
    corpus = Path(json.__file__).parent  # a few files of the standard library's own source
    out = example.main(["--positions", "alibi,learned", "--steps", "3", "--eval-lens", "16,32", "--train-len", "16",
                        "--layers", "1", "--d-model", "32", "--batch-size", "4", "--eval-tokens", "256",
                        "--source", str(corpus), "--cache-dir", str(tmp_path / "cache"),
                        "--out", str(tmp_path / "runs"),
                        "--precision", "fp32"])
    text = capsys.readouterr().out
    assert "positions >= 16 only" in text and "all losses finite: True" in text
    assert set(out) == {"alibi", "learned"}
    for by_length in out.values():
        assert by_length[16][1] is None  # nothing lies beyond the training length at L = train length
        every, beyond = by_length[32]
        assert math.isfinite(every) and math.isfinite(beyond)
        assert 0 < every < 10  # byte-level losses start near ln(256) = 5.5


@pytest.mark.parametrize("name", ["demo", "translate", "digits"])
def test_example_configs_load(name):
    """Every shipped run config parses and names a valid model (the embedded tasks' documented commands)."""
    from formerkit.train import TrainConfig

    cfg = TrainConfig.load(ROOT / "examples" / f"{name}.yaml")
    model = cfg.model_config(vocab_size=256, num_labels=10)
    assert cfg.train.steps > 0 and model.n_layers > 0


def test_demo_sweep_candidates_are_valid_run_configs(tmp_path):
    sweep = load_script("examples/demo_sweep.py")
    import yaml

    from formerkit.train import TrainConfig

    base = tmp_path / "base.yaml"
    base.write_text(yaml.safe_dump(sweep.BASE))
    for name, overrides in sweep.CANDIDATES.items():
        config = sweep.CONFIG if name == "demo.yaml" else base
        cfg = TrainConfig.load(config, [*overrides, "--checkpoint.run_dir", str(tmp_path / name)])
        assert cfg.model_config(cfg.data.vocab_size).n_layers >= 2
    tiny = TrainConfig.load(sweep.CONFIG, ["--model.n_layers", "1", "--model.d_model", "32", "--model.n_heads", "2",
                                           "--model.d_ff", "64", "--train.batch_size", "2", "--train.seq_len", "16"])
    assert 0 < sweep.step_seconds(tiny, 300, steps=1) < 10
