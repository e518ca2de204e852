"""Start-up speed choices: attention kernel and AdamW kernel, measured, equal in result, kept on resume."""

from __future__ import annotations

import pytest
import torch

import formerkit as fk
from formerkit.train import tuning
from formerkit.train.config import OptimSection
from formerkit.train.optim import build_optimizer


def tiny(**kw) -> fk.Transformer:
    torch.manual_seed(0)
    return fk.Transformer(fk.ModelConfig.from_preset("gpt2", n_layers=2, d_model=32, n_heads=4, d_ff=64,
                                                     vocab_size=64, max_seq_len=32, **kw))


def test_pick_rule():
    assert tuning.pick({"sdpa": 1.0, "eager": 0.5}, "sdpa") == "eager"
    assert tuning.pick({"sdpa": 1.0, "eager": 0.97}, "sdpa") == "sdpa"  # within the margin: the default
    assert tuning.pick({"sdpa": 1.0, "eager": 1.2}, "sdpa", previous="eager") == "eager"  # sticky on resume
    assert tuning.pick({"sdpa": 1.0, "eager": 2.0}, "sdpa", previous="eager") == "sdpa"  # unless far slower


def test_attention_choice_is_measured_and_either_backend_gives_the_same_training_step():
    model = tiny()
    choice = tuning.choose_attention(model, rows=4, seq_len=32, precision="fp32", device=torch.device("cpu"))
    assert choice.chosen in ("sdpa", "eager") and set(choice.seconds) == {"sdpa", "eager"}
    assert "attention" in choice.describe() and "ms" in choice.describe()
    ids = torch.randint(0, 64, (3, 32))
    grads = {}
    for backend in ("sdpa", "eager"):
        copy = tiny()
        tuning.use_attention(copy, backend)
        assert all(m.backend == backend for m in copy.modules() if isinstance(m, fk.layers.attention.Attention))
        out = copy(ids, labels=ids)
        out.loss.backward()
        grads[backend] = (out.loss.detach(), copy.blocks[0].attn.qkv.weight.grad.clone())
        assert copy.config.attn_backend == "sdpa"  # the config (what is saved) keeps its own setting
    assert torch.allclose(grads["sdpa"][0], grads["eager"][0], atol=1e-5)
    assert torch.allclose(grads["sdpa"][1], grads["eager"][1], atol=1e-5)


def test_attention_keeps_the_fused_kernel_where_the_explicit_path_does_not_pay():
    cpu = torch.device("cpu")
    assert tuning.choose_attention(tiny(), 2, 4096, "fp32", cpu).chosen == "sdpa"
    assert tuning.choose_attention(tiny(position="alibi"), 2, 32, "fp32", cpu).chosen == "sdpa"
    assert tuning.choose_attention(tiny(), 2, 32, "fp32", cpu, requested="eager").describe() == \
        "attention eager (as configured)"


def test_adamw_kernels_give_the_same_update():
    results = {}
    for kernel in ("fused", "foreach"):
        model = tiny()
        optimizer = build_optimizer(model, OptimSection(), kernel)
        assert optimizer.defaults[kernel] is True
        ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(1))
        model(ids, labels=ids).loss.backward()
        optimizer.step()
        results[kernel] = model.blocks[1].mlp.fc_in.weight.detach().clone()
    assert torch.allclose(results["fused"], results["foreach"], atol=1e-6)
    choice = tuning.choose_fused_adamw(tiny(), torch.device("cpu"))
    assert choice.chosen in ("fused", "foreach") and set(choice.seconds) == {"foreach", "fused"}


@pytest.mark.parametrize("saved_kernel, kernel", [("foreach", "fused"), ("fused", "foreach")])
def test_a_resume_that_switches_the_adamw_kernel_steps_under_a_gradient_scaler(saved_kernel, kernel):
    from formerkit.train.parallel import load_optimizer_state, optimizer_state

    model = tiny()
    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(1))
    first = build_optimizer(model, OptimSection(), saved_kernel)
    model(ids, labels=ids).loss.backward()
    first.step()
    resumed = build_optimizer(model, OptimSection(lr=1e-3), kernel)
    load_optimizer_state(model, resumed, optimizer_state(model, first))
    assert all(group[kernel] is True and group["lr"] == first.param_groups[0]["lr"] for group in resumed.param_groups)
    scaler = torch.amp.GradScaler("cpu")
    scaler.scale(model(ids, labels=ids).loss).backward()
    scaler.step(resumed)  # the scaler checks the kernel the optimizer was built with
    assert all(int(s["step"]) == 2 for s in resumed.state.values())


@pytest.mark.slow
def test_a_resumed_run_keeps_its_choices(tmp_path, monkeypatch):
    from formerkit.train import train
    from test_train import config

    first = tuning.SpeedChoice("attention", "eager", {"sdpa": 1.0, "eager": 0.5})
    monkeypatch.setattr(tuning, "choose_attention", lambda *a, **k: first)
    train(config(tmp_path, "--log.samples", "0", steps=10))
    state = torch.load(tmp_path / "run" / "checkpoints" / "step-0000010" / "trainer_state.pt", weights_only=True)
    assert state["choices"]["attention"] == "eager" and state["choices"]["precision"] == "fp32"
    seen = {}

    def record(model, rows, seq_len, precision, device, requested="auto", previous=None):
        seen["previous"] = previous
        return tuning.SpeedChoice("attention", previous or "sdpa")

    monkeypatch.setattr(tuning, "choose_attention", record)
    train(config(tmp_path, "--log.samples", "0", "--optim.schedule_restart", "true", steps=12))
    assert seen["previous"] == "eager"
