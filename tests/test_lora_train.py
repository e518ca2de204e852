"""LoRA fine-tuning through the trainer: ``--lora.r`` on top of ``--model.init_from``."""

from __future__ import annotations

import pytest
import torch

import formerkit as fk
from conftest import parity_error, require
from formerkit.compress import load_adapter
from formerkit.train import TrainConfig, train

peft = require("peft")
transformers = require("transformers")

transformers.logging.set_verbosity_error()


def _corpus(tmp_path):
    root = tmp_path / "corpus"
    root.mkdir()
    for i in range(6):
        (root / f"m{i}.py").write_text("".join(f"def f_{i}_{j}(x):\n    return x + {j}\n" for j in range(30)))
    return root


def _options(tmp_path, steps: int) -> list[str]:
    return ["--model.init_from", str(tmp_path / "base"), "--data.source", str(tmp_path / "corpus"),
            "--lora.r", "8", "--lora.alpha", "16", "--lora.target", "q,v,fc_in,fc_out",
            "--train.steps", str(steps), "--train.batch_size", "4", "--train.seq_len", "32",
            "--train.precision", "fp32", "--optim.lr", "3e-2", "--optim.warmup_steps", "2", "--eval.batches", "2",
            "--eval.every", "100", "--checkpoint.every", "8", "--log.samples", "0", "--log.progress", "false",
            "--log.tensorboard", "false", "--checkpoint.run_dir", str(tmp_path / "run"),
            "--data.cache_dir", str(tmp_path / "cache"), "--train.attention", "sdpa", "--optim.kernel", "foreach"]


def _loss(model, ids):
    with torch.no_grad():
        return float(model(ids, labels=ids).loss)


def test_lora_run_lowers_the_loss_and_writes_a_peft_adapter(tmp_path):
    torch.manual_seed(0)
    cfg = fk.ModelConfig.from_preset("gpt2", n_layers=2, d_model=32, n_heads=4, d_ff=64, vocab_size=259,
                                     max_seq_len=64)
    fk.save_pretrained(fk.Transformer(cfg), tmp_path / "base", format="hf")
    fk.ByteTokenizer().save(tmp_path / "base")
    _corpus(tmp_path)
    result = train(TrainConfig.load(None, _options(tmp_path, 8)))
    assert result.step == 8
    # resumes at step 8: frozen weights from init_from, adapters from the trainer state
    resumed = train(TrainConfig.load(None, [*_options(tmp_path, 16), "--optim.schedule_restart", "true"]))
    assert resumed.step == 16

    text = (tmp_path / "corpus" / "m0.py").read_text()[:60]
    ids = torch.tensor([fk.ByteTokenizer().encode(text)])
    base = fk.from_pretrained(tmp_path / "base")
    tuned = load_adapter(fk.from_pretrained(tmp_path / "base"), tmp_path / "run" / "adapter")
    assert _loss(tuned, ids) < _loss(base, ids) - 0.1
    merged = fk.from_pretrained(tmp_path / "run")  # the step checkpoint holds the merged model
    with torch.no_grad():
        assert parity_error(merged(ids).logits, tuned(ids).logits) < 1e-4
    reference = peft.PeftModel.from_pretrained(
        transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base"), tmp_path / "run" / "adapter").eval()
    with torch.no_grad():
        assert parity_error(tuned(ids).logits, reference(input_ids=ids).logits) < 1e-4
    names = sorted(k for k in torch.load(tmp_path / "run" / "checkpoints" / "step-0000016" / "trainer_state.pt",
                                         weights_only=True)["optimizer"]["state"])
    assert names and all(".adapters." in n for n in names)  # only adapter parameters were optimized


def test_lora_needs_init_from():
    with pytest.raises(fk.ConfigError, match="--model.init_from"):
        TrainConfig.load(None, ["--lora.r", "4"])
