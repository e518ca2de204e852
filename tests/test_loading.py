"""Lean loading: from_pretrained builds on the meta device and reads each tensor once into place.

What it must keep: no random initialization of real tensors, the requested dtype and device,
the buffers a normal build computes, tied weights as one tensor, and the same logits as
building the model, copying the checkpoint in and casting afterwards.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import formerkit as fk
from conftest import ROOT
from formerkit.checkpoints.directory import load_config
from formerkit.checkpoints.files import CheckpointTensors, read_weights
from formerkit.checkpoints.hf import sources_from_hf
from formerkit.checkpoints.hf_families import family_of
from formerkit.checkpoints.loading import build_on_meta, build_tensor, load_weights_into, tied_names
from formerkit.presets import PRESETS

SMALL = dict(n_layers=2, d_model=32, n_heads=4, d_ff=48, vocab_size=64, max_seq_len=32)
IMAGE = dict(n_layers=2, d_model=32, n_heads=4, d_ff=48, image_size=8, patch_size=2, num_channels=3,
             max_seq_len=17, num_labels=5)

pytestmark = pytest.mark.usefixtures("one_thread")


def _small(preset: str, **kw) -> fk.Transformer:
    torch.manual_seed(0)
    sizes = IMAGE if PRESETS[preset].get("patch_size") else SMALL
    extra = {"n_decoder_layers": 2} if PRESETS[preset]["kind"] == "encoder-decoder" else {}
    return fk.Transformer(fk.ModelConfig.from_preset(preset, **{**sizes, **extra, **kw})).eval()


def _inputs(model: fk.Transformer) -> dict[str, torch.Tensor]:
    cfg = model.config
    g = torch.Generator().manual_seed(1)
    if cfg.patch_size is not None:
        return {"pixel_values": torch.randn(2, cfg.num_channels, cfg.image_size, cfg.image_size, generator=g)}
    ids = torch.randint(0, cfg.vocab_size, (2, 7), generator=g)
    return {"input_ids": ids, **({"decoder_input_ids": ids} if cfg.kind == "encoder-decoder" else {})}


def _logits(model: fk.Transformer) -> torch.Tensor:
    with torch.no_grad():
        out = model(**_inputs(model))
    return out.logits if out.logits is not None else out.hidden_states


def _old_path(directory, dtype=None) -> fk.Transformer:
    """What from_pretrained did before: a randomly initialized model, every tensor copied in, then cast."""
    cfg = load_config(directory)
    model = fk.Transformer(cfg)
    tensors = read_weights(directory)
    if (directory / "config.json").is_file():
        sources = sources_from_hf(cfg, family_of(cfg), tensors, model.state_dict(), tied_names(model))
        tensors = {name: build_tensor(source, tensors) for name, source in sources.items()}
    load_weights_into(model, tensors, directory)
    return model.to(dtype=dtype).eval()


# every preset family, each saved in the formats it has
CASES = [("gpt2", "hf"), ("gpt2", "native"), ("llama", "hf"), ("bert-base", "hf"), ("minilm-l6", "hf"),
         ("t5-small", "hf"), ("t5-v1.1-small", "hf"), ("bart-base", "hf"), ("vit-digits", "hf"),
         ("vaswani-base", "native")]


@pytest.fixture(params=CASES, ids=[f"{p}-{f}" for p, f in CASES])
def saved(request, tmp_path):
    preset, format = request.param
    model = _small(preset)
    fk.save_pretrained(model, tmp_path, format=format)
    return model, tmp_path


def _refusing_real_tensors(fn):
    def guarded(tensor, *args, **kwargs):
        if not tensor.is_meta:
            raise AssertionError(f"torch.nn.init.{fn.__name__} initialised a real tensor {tuple(tensor.shape)}")
        return fn(tensor, *args, **kwargs)
    return guarded


def test_no_real_tensor_is_initialised(saved, monkeypatch):
    model, directory = saved
    for name in dir(torch.nn.init):
        if name.endswith("_") and not name.startswith("_"):
            monkeypatch.setattr(torch.nn.init, name, _refusing_real_tensors(getattr(torch.nn.init, name)))
    with pytest.raises(AssertionError, match="initialised a real tensor"):  # the guard works on a normal build
        fk.Transformer(model.config)
    loaded = fk.from_pretrained(directory)
    assert torch.equal(_logits(loaded), _logits(model))


def test_logits_equal_the_old_path_in_float32_and_bfloat16(saved):
    model, directory = saved
    loaded = fk.from_pretrained(directory)
    assert torch.equal(_logits(loaded), _logits(_old_path(directory)))
    assert torch.equal(_logits(loaded), _logits(model))
    half = fk.from_pretrained(directory, dtype=torch.bfloat16)
    assert torch.equal(_logits(half), _logits(_old_path(directory, torch.bfloat16)))


def test_bfloat16_parameters_equal_the_float32_checkpoint_cast(saved):
    model, directory = saved
    loaded = fk.from_pretrained(directory, dtype=torch.bfloat16, device="cpu")
    ours = dict(loaded.named_parameters())
    assert ours.keys() == dict(model.named_parameters()).keys()
    for name, param in model.named_parameters():
        assert ours[name].dtype == torch.bfloat16 and ours[name].device.type == "cpu", name
        assert torch.equal(ours[name], param.detach().to(torch.bfloat16)), name
        assert ours[name].requires_grad and ours[name].is_contiguous(), name
    for name, buffer in loaded.named_buffers():  # as Module.to converts them
        assert buffer.dtype == (torch.bfloat16 if buffer.is_floating_point() else buffer.dtype), name


def test_tied_weights_stay_one_tensor(saved):
    model, directory = saved
    for dtype in (None, torch.bfloat16):
        loaded = fk.from_pretrained(directory, dtype=dtype)
        assert tied_names(loaded) == tied_names(model)
        if loaded.lm_head is not None and loaded.config.tie_embeddings:
            assert loaded.lm_head.proj.weight is loaded.tok_embed.weight


def test_loaded_weights_are_the_models_own(saved):
    """Changing a loaded parameter in place changes neither the (memory-mapped) file nor the next load."""
    model, directory = saved
    loaded = fk.from_pretrained(directory)
    with torch.no_grad():
        for param in loaded.parameters():
            param.add_(1.0)
    assert torch.equal(_logits(fk.from_pretrained(directory)), _logits(model))


def _buffers(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return dict(model.named_buffers())


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_buffers_after_a_meta_build_equal_a_normal_build(preset):
    cfg = _small(preset).config
    _check_buffers(cfg)


@pytest.mark.parametrize("kw", [dict(position="alibi", n_heads=6, d_model=48), dict(position="sinusoidal"),
                                dict(position="rope", rotary_fraction=0.5), dict(position="relative"),
                                dict(position="none")])
def test_buffers_of_every_position_scheme(kw):
    _check_buffers(fk.ModelConfig(**{**SMALL, **kw}))


def _check_buffers(cfg: fk.ModelConfig) -> None:
    meta = build_on_meta(cfg)
    assert all(p.is_meta for p in meta.parameters())
    normal = fk.Transformer(cfg)
    ours, theirs = _buffers(meta), _buffers(normal)
    assert ours.keys() == theirs.keys()
    assert set(ours) == {n for n, _ in normal.named_buffers()} - set(normal.state_dict())  # none is saved
    for name, buffer in theirs.items():
        assert ours[name].dtype == buffer.dtype and torch.equal(ours[name], buffer), name


def test_an_int8_checkpoint_loads_lean_with_a_float_tied_head(tmp_path, monkeypatch):
    model = fk.quantize_int8(_small("gpt2"), quantize_tied_head=False)
    fk.save_quantized(model, tmp_path)
    for name in dir(torch.nn.init):
        if name.endswith("_") and not name.startswith("_"):
            monkeypatch.setattr(torch.nn.init, name, _refusing_real_tensors(getattr(torch.nn.init, name)))
    loaded = fk.from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert loaded.lm_head.proj.weight is loaded.tok_embed.weight
    assert isinstance(loaded.blocks[0].attn.qkv, fk.Int8Linear) and loaded.blocks[0].attn.qkv.weight.dtype == torch.int8
    assert loaded.blocks[0].attn.qkv.scale.dtype == torch.bfloat16
    assert torch.equal(_logits(fk.from_pretrained(tmp_path)), _logits(model))


def test_checkpoint_tensors_read_lazily(tmp_path):
    model = _small("gpt2")
    fk.save_pretrained(model, tmp_path, format="hf")
    tensors = CheckpointTensors(tmp_path)
    assert set(tensors) == set(read_weights(tmp_path)) and len(tensors) == len(read_weights(tmp_path))
    assert torch.equal(tensors["transformer.wte.weight"], model.tok_embed.weight)


@pytest.mark.parametrize("kw, fragment", [
    (dict(dtype=torch.int8), "floating-point torch.dtype"),
    (dict(dtype="bfloat16"), "floating-point torch.dtype"),
    (dict(device="no-such-device"), "device='no-such-device'"),
    (dict(device="meta"), "device='meta' holds no values"),
])
def test_bad_dtype_or_device_is_named(tmp_path, kw, fragment):
    fk.save_pretrained(_small("gpt2"), tmp_path)
    with pytest.raises(fk.InputError, match=fragment):
        fk.from_pretrained(tmp_path, **kw)


def test_device_accepts_a_torch_device(tmp_path):
    fk.save_pretrained(_small("llama"), tmp_path)
    loaded = fk.from_pretrained(tmp_path, device=torch.device("cpu"))
    assert {p.device.type for p in loaded.parameters()} == {"cpu"}
    assert loaded.rotary.inv_freq.device.type == "cpu"


def test_loading_does_not_import_the_compiler_stack(tmp_path):
    """Initialising meta tensors runs torch's Python reference kernels, whose first use imports torch._dynamo:
    seconds of every fresh process. from_pretrained skips initialization on the meta device instead."""
    paths = []
    for preset, format in [("gpt2", "hf"), ("llama", "hf"), ("t5-small", "hf"), ("vit-digits", "hf"),
                           ("vaswani-base", "native"), ("bert-base", "hf")]:
        fk.save_pretrained(_small(preset), tmp_path / preset, format=format)
        paths.append(str(tmp_path / preset))
    fk.save_quantized(fk.quantize_int8(_small("llama")), tmp_path / "int8")
    paths.append(str(tmp_path / "int8"))
    script = ("import sys, formerkit\n"
              f"for path in {paths!r}:\n"
              "    formerkit.from_pretrained(path)\n"
              "print('torch._dynamo' in sys.modules)\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "False"


def _mapped_from(path) -> list[tuple[int, int]]:
    """The address ranges where this process maps ``path`` (Linux's /proc/self/maps)."""
    ranges = []
    for line in open("/proc/self/maps"):
        fields = line.split()
        if len(fields) >= 6 and fields[5] == str(path):
            start, end = (int(x, 16) for x in fields[0].split("-"))
            ranges.append((start, end))
    return ranges


def _in_file(tensor: torch.Tensor, ranges: list[tuple[int, int]]) -> bool:
    return any(start <= tensor.data_ptr() < end for start, end in ranges)


@pytest.mark.parametrize("preset, copied", [("gpt2", set()), ("llama", {"attn.qkv.weight"})])
def test_tensors_used_as_stored_are_the_files_memory_map(tmp_path, preset, copied):
    """Zero copy where the layout allows: GPT-2's transposed Conv1D weights are views of the mapped file;
    Llama's separate q, k, v are concatenated into formerkit's fused qkv, a copy."""
    model = _small(preset)
    fk.save_pretrained(model, tmp_path, format="hf")
    loaded = fk.from_pretrained(tmp_path)
    ranges = _mapped_from((tmp_path / "model.safetensors").resolve())
    for name, param in loaded.named_parameters():
        assert _in_file(param, ranges) == (name.split(".", 2)[-1] not in copied), name
    assert torch.equal(_logits(loaded), _logits(model))
    as_bf16 = fk.from_pretrained(tmp_path, dtype=torch.bfloat16)  # a cast is a copy
    ranges = _mapped_from((tmp_path / "model.safetensors").resolve())
    assert not any(_in_file(p, ranges) for p in as_bf16.parameters())


def test_a_bfloat16_checkpoint_loads_in_place_as_bfloat16(tmp_path):
    fk.save_pretrained(_small("gpt2").to(torch.bfloat16), tmp_path, format="hf")
    loaded = fk.from_pretrained(tmp_path, dtype=torch.bfloat16)
    ranges = _mapped_from((tmp_path / "model.safetensors").resolve())
    assert all(_in_file(p, ranges) for p in loaded.parameters())


def test_a_mapped_model_survives_its_directory_being_saved_over(tmp_path):
    """formerkit replaces files atomically, so a model still mapping the old file keeps its weights."""
    first, second = _small("gpt2"), _small("gpt2", init_std=0.5)
    fk.save_pretrained(first, tmp_path, format="hf")
    loaded = fk.from_pretrained(tmp_path)
    fk.save_pretrained(second, tmp_path, format="hf")
    assert torch.equal(_logits(loaded), _logits(first))
    assert torch.equal(_logits(fk.from_pretrained(tmp_path)), _logits(second))


@pytest.mark.parametrize("fused", [False, True])
def test_a_mapped_model_trains(tmp_path, fused):
    """Transposed, file-mapped parameters take gradients and AdamW steps like owned ones."""
    no_dropout = dict(attn_dropout=0.0, resid_dropout=0.0, embed_dropout=0.0)
    model = _small("gpt2", **no_dropout)
    fk.save_pretrained(model, tmp_path, format="hf")
    loaded = fk.from_pretrained(tmp_path).train()
    model.train()
    optimizers = [torch.optim.AdamW(m.parameters(), lr=1e-2, fused=fused) for m in (model, loaded)]
    ids = _inputs(model)["input_ids"]
    for _ in range(2):
        for m, opt in zip((model, loaded), optimizers, strict=True):
            opt.zero_grad()
            m(ids, labels=ids).loss.backward()
            opt.step()
    for (name, ours), theirs in zip(loaded.named_parameters(), model.parameters(), strict=True):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6, msg=name)
    assert torch.equal(_logits(fk.from_pretrained(tmp_path)), _logits(_small("gpt2", **no_dropout)))
