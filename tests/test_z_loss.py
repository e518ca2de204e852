"""The output z-loss (train.z_loss_coef): closed form, in the causal and masked-LM losses, in a training run."""

from __future__ import annotations

import math

import pytest
import torch

import formerkit as fk
from formerkit.errors import ConfigError
from formerkit.heads import IGNORE_INDEX
from formerkit.train import TrainConfig, train
from formerkit.train.logging import read_metrics
from formerkit.train.objectives import CausalLM, MaskedLM, output_z_loss
from test_train import config


def brute_force_z(logits: torch.Tensor, keep: torch.Tensor | None = None) -> float:
    """mean over kept positions of (log sum_v exp(logit_v))^2, one position at a time in float64."""
    rows = logits.double().reshape(-1, logits.shape[-1])
    mask = torch.ones(rows.shape[0], dtype=torch.bool) if keep is None else keep.reshape(-1)
    values = [math.log(sum(math.exp(float(v)) for v in row)) ** 2 for row, k in zip(rows, mask, strict=True) if k]
    return sum(values) / len(values)


def test_closed_form_and_mask():
    assert float(output_z_loss(torch.zeros(3, 5, 4))) == pytest.approx(math.log(4) ** 2)
    logits = torch.randn(2, 6, 11) * 3
    keep = torch.rand(2, 6) > 0.5
    keep[0, 0] = True
    assert float(output_z_loss(logits)) == pytest.approx(brute_force_z(logits), rel=1e-5)
    assert float(output_z_loss(logits, keep)) == pytest.approx(brute_force_z(logits, keep), rel=1e-5)
    shifted = logits - torch.logsumexp(logits, -1, keepdim=True)  # normalizer 1: no z-loss
    assert float(output_z_loss(shifted)) < 1e-10


def _tiny(kind: str = "decoder") -> fk.Transformer:
    torch.manual_seed(0)
    preset = "gpt2" if kind == "decoder" else "bert-base"
    return fk.Transformer(fk.ModelConfig.from_preset(preset, vocab_size=40, d_model=32, n_layers=2, n_heads=4,
                                                     d_ff=64, max_seq_len=16)).eval()  # no dropout


def test_causal_loss_adds_the_weighted_z_loss():
    model = _tiny()
    x, y = torch.randint(0, 40, (3, 12)), torch.randint(0, 40, (3, 12))
    batch = {"x": x, "y": y}
    plain = CausalLM(None, None, 12, 1, 1).loss(model, batch)
    with_z = CausalLM(None, None, 12, 1, 1, z_loss_coef=0.3).loss(model, batch)
    with torch.no_grad():
        logits = model(x).logits
    assert float((with_z - plain).detach()) == pytest.approx(0.3 * brute_force_z(logits), rel=1e-4)


def test_masked_lm_z_loss_counts_only_masked_positions():
    model = _tiny("encoder")
    x = torch.randint(0, 40, (2, 10))
    labels = torch.full_like(x, IGNORE_INDEX)
    labels[0, 3], labels[1, 7], labels[1, 1] = 5, 6, 7
    objective = MaskedLM(None, None, 10, 1, 1, 0.15, 0, 40, torch.tensor([0]), 0, z_loss_coef=2.0)
    batch = {"x": x, "labels": labels}
    diff = objective.loss(model, batch) - MaskedLM(None, None, 10, 1, 1, 0.15, 0, 40, torch.tensor([0]), 0).loss(
        model, batch)
    with torch.no_grad():
        logits = model(x).logits
    assert float(diff.detach()) == pytest.approx(2.0 * brute_force_z(logits, labels != IGNORE_INDEX), rel=1e-4)


def test_bad_coefficients_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="z_loss_coef must be a finite number >= 0"):
        config(tmp_path, "--train.z_loss_coef", "-1")
    with pytest.raises(ConfigError, match="z_loss_coef applies to objective=causal or mlm"):
        TrainConfig.load(None, ["--train.objective", "seq2seq", "--train.z_loss_coef", "1e-4"])


@pytest.mark.slow
def test_training_with_z_loss_pulls_the_normalizer_towards_one(tmp_path):
    """The same run with and without a strong z-loss: on the corpus' text the z-loss run ends with a smaller log Z."""
    mean_log_z = {}
    for coef in ("0", "0.5"):
        out = tmp_path / coef
        train(config(out, "--train.z_loss_coef", coef, steps=30))
        train_losses = [r["loss"] for r in read_metrics(out / "run" / "metrics.jsonl") if r["split"] == "train"]
        model = fk.from_pretrained(out / "run").eval()
        text = (out / "corpus" / "module_3.py").read_bytes()[:64]
        with torch.no_grad():
            logits = model(torch.tensor([list(text)])).logits  # byte tokenizer: ids are the bytes
        mean_log_z[coef] = float(torch.logsumexp(logits, -1).mean())
        if coef != "0":  # the logged training loss includes the z-loss: about 0.5 * log(259)^2 more at step 1
            assert train_losses[0] > math.log(259) + 0.4 * math.log(259) ** 2
    assert mean_log_z["0.5"] < 0.9 * mean_log_z["0"]
