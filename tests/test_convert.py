"""formerkit convert: every path round-tripped and used, tokenizers of every kind, special ids, stale targets."""

from __future__ import annotations

import json
import logging
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

import formerkit as fk
from conftest import PARITY_STD, PARITY_TOL, parity_error
from formerkit.cli import main
from formerkit.convert import convert
from formerkit.train import TrainConfig, train

pytestmark = pytest.mark.usefixtures("one_thread")

SMALL = dict(n_layers=1, d_model=32, n_heads=4, d_ff=64, max_seq_len=32)
PROMPT = "def "


def tiny(preset: str = "gpt2", vocab_size: int = 259, **kw) -> fk.Transformer:
    """A one-layer model of ``preset`` with random weights, in eval mode."""
    torch.manual_seed(0)
    if preset in ("bart-base", "t5-small"):
        kw.setdefault("n_decoder_layers", 1)
    if preset == "t5-small":
        kw.setdefault("d_head", 8)
    return fk.Transformer(fk.ModelConfig.from_preset(preset, **{**SMALL, "vocab_size": vocab_size, **kw})).eval()


def logits(model: fk.Transformer, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


def token_ids(config: dict) -> dict[str, int | None]:
    return {k: v for k, v in config.items() if k.endswith("_token_id")}


@contextmanager
def transformers_messages() -> Iterator[list[str]]:
    """Collect what transformers logs at WARNING or above, and Python warnings, while the block runs."""
    messages: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            messages.append(record.getMessage())

    handler = Collect(logging.WARNING)
    logger = logging.getLogger("transformers")  # transformers' root logger does not propagate to the root
    level = logger.level  # other test modules silence transformers; this block needs its warnings
    logger.setLevel(logging.WARNING)
    logger.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield messages
        messages.extend(str(w.message) for w in caught)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def id_warnings(messages: list[str]) -> list[str]:
    return [m for m in messages if "token_id" in m or "vocabulary" in m]


# ---- special token ids in a written config.json ---------------------------------------------------------------

@pytest.mark.parametrize("preset", ["gpt2", "llama", "bert-base", "bart-base", "t5-small"])
def test_hf_config_without_a_tokenizer_keeps_ids_inside_the_vocabulary(tmp_path, preset):
    kw = {"n_kv_heads": 2} if preset == "llama" else {}
    fk.save_pretrained(tiny(preset, vocab_size=259, **kw), tmp_path, format="hf")
    ids = token_ids(json.loads((tmp_path / "config.json").read_text()))
    assert ids and all(v is None or 0 <= v < 259 for v in ids.values())
    if preset == "gpt2":  # transformers' default 50256 would lie outside: written as null so it is not filled in
        assert ids["eos_token_id"] is None and ids["bos_token_id"] is None
    if preset == "llama":  # defaults inside the vocabulary are kept
        assert (ids["bos_token_id"], ids["eos_token_id"]) == (1, 2)


def test_hf_config_keeps_gpt2s_own_ids_for_its_vocabulary(tmp_path):
    fk.save_pretrained(tiny("gpt2", vocab_size=50257, d_model=8, n_heads=2), tmp_path, format="hf")
    ids = token_ids(json.loads((tmp_path / "config.json").read_text()))
    assert (ids["bos_token_id"], ids["eos_token_id"]) == (50256, 50256)


def test_transformers_reads_the_written_config_without_an_id_warning(tmp_path):
    from transformers import AutoConfig

    fk.save_pretrained(tiny("gpt2", vocab_size=261), tmp_path / "new", format="hf")
    with transformers_messages() as messages:
        AutoConfig.from_pretrained(tmp_path / "new")
    assert id_warnings(messages) == []
    # control: the config formerkit used to write (no ids: GPT-2's 50256 filled in) does draw the warning
    old = {k: v for k, v in json.loads((tmp_path / "new" / "config.json").read_text()).items()
           if not k.endswith("_token_id")}
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "config.json").write_text(json.dumps(old))
    with transformers_messages() as messages:
        AutoConfig.from_pretrained(tmp_path / "old")
    assert any("50256" in m for m in id_warnings(messages))


@pytest.mark.parametrize("preset", ["gpt2", "llama", "bart-base"])
def test_hf_config_takes_ids_from_the_tokenizer(tmp_path, preset):
    kw = {"n_kv_heads": 2} if preset == "llama" else {}
    model = tiny(preset, vocab_size=259, **kw)
    fk.save_pretrained(model, tmp_path, format="hf", tokenizer=fk.ByteTokenizer())
    ids = token_ids(json.loads((tmp_path / "config.json").read_text()))
    assert ids["eos_token_id"] == 257 and ids["bos_token_id"] == 257  # no bos token: texts follow eos
    if preset == "bart-base":
        assert ids["forced_eos_token_id"] == 257
    assert ids["pad_token_id"] == 256
    assert fk.load_tokenizer(tmp_path).fingerprint() == fk.ByteTokenizer().fingerprint()


def test_hf_config_takes_bos_and_pad_of_an_hf_tokenizer(tmp_path):
    tok = fk.train_bpe(["hello world"] * 20, 270)
    tok.special_tokens["bos_token"] = "<mask>"  # any token of the vocabulary will do as a bos
    fk.save_pretrained(tiny("gpt2", vocab_size=270), tmp_path, format="hf", tokenizer=tok)
    ids = token_ids(json.loads((tmp_path / "config.json").read_text()))
    assert ids == {"bos_token_id": tok.mask_id, "eos_token_id": tok.eos_id, "pad_token_id": tok.pad_id}


def test_tokenizer_ids_outside_the_model_vocabulary_are_dropped(tmp_path):
    fk.save_pretrained(tiny("gpt2", vocab_size=200), tmp_path, format="hf", tokenizer=fk.ByteTokenizer())
    assert set(token_ids(json.loads((tmp_path / "config.json").read_text())).values()) == {None}


def test_saved_hf_tokenizer_keeps_its_config_and_names_a_class(tmp_path):
    tok = fk.train_bpe(["hello world"] * 20, 270)
    tok.save(tmp_path / "a")
    assert json.loads((tmp_path / "a" / "tokenizer_config.json").read_text())["tokenizer_class"] == \
        "PreTrainedTokenizerFast"
    config = json.loads((tmp_path / "a" / "tokenizer_config.json").read_text())
    (tmp_path / "a" / "tokenizer_config.json").write_text(json.dumps({**config, "tokenizer_class": "GPT2Tokenizer",
                                                                       "chat_template": "{{ x }}"}))
    fk.save_pretrained(tiny("gpt2", vocab_size=270), tmp_path / "a", format="hf")
    convert(tmp_path / "a", tmp_path / "b")
    written = json.loads((tmp_path / "b" / "tokenizer_config.json").read_text())
    assert (written["tokenizer_class"], written["chat_template"], written["eos_token"]) == \
        ("GPT2Tokenizer", "{{ x }}", "<|endoftext|>")


# ---- sources: quantized, without a tokenizer, bad format -------------------------------------------------------

def test_quantized_source_converts_to_native_and_refuses_hf(tmp_path, capsys):
    model = fk.quantize_int8(tiny())
    fk.save_quantized(model, tmp_path / "q")
    fk.ByteTokenizer().save(tmp_path / "q")
    convert(tmp_path / "q", tmp_path / "copy")
    copy = fk.from_pretrained(tmp_path / "copy")
    assert any(isinstance(m, fk.Int8Linear) for m in copy.modules())
    ids = torch.randint(0, 259, (1, 6))
    assert torch.equal(logits(copy, ids), logits(model, ids))
    assert fk.generate_text(copy, fk.load_tokenizer(tmp_path / "copy"), PROMPT, max_new_tokens=4) == \
        fk.generate_text(model, fk.ByteTokenizer(), PROMPT, max_new_tokens=4)
    capsys.readouterr()
    assert main(["convert", "--checkpoint", str(tmp_path / "q"), "--out", str(tmp_path / "hf"), "--format", "hf"]) == 2
    err = capsys.readouterr().err
    assert "int8" in err and "--format native" in err
    assert not (tmp_path / "hf").exists()


def test_source_without_a_tokenizer_converts_with_a_one_line_warning(tmp_path, capsys):
    fk.save_pretrained(tiny(), tmp_path / "src")
    assert main(["convert", "--checkpoint", str(tmp_path / "src"), "--out", str(tmp_path / "hf"),
                 "--format", "hf"]) == 0
    captured = capsys.readouterr()
    assert captured.err.count("\n") == 1 and "has no tokenizer" in captured.err
    assert "wrote hf checkpoint" in captured.out
    assert sorted(p.name for p in (tmp_path / "hf").iterdir()) == ["config.json", "model.safetensors"]


def test_unknown_format_names_the_flag(tmp_path):
    fk.save_pretrained(tiny(), tmp_path / "src")
    with pytest.raises(fk.InputError, match="--format"):
        convert(tmp_path / "src", tmp_path / "out", format="onnx")


# ---- targets ---------------------------------------------------------------------------------------------------

def _old_bpe_checkpoint(directory: Path) -> None:
    """An older checkpoint: native model with a BPE tokenizer and a quantization marker."""
    fk.save_pretrained(tiny("llama", vocab_size=270, n_kv_heads=2), directory)
    fk.train_bpe(["hello world"] * 20, 270).save(directory)
    (directory / "quantization.json").write_text("{}")


def test_target_holding_a_checkpoint_is_refused_and_left_alone(tmp_path, capsys):
    fk.save_pretrained(tiny(), tmp_path / "src", tokenizer=fk.ByteTokenizer())
    _old_bpe_checkpoint(tmp_path / "out")
    before = {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()}
    with pytest.raises(fk.CheckpointError) as err:
        convert(tmp_path / "src", tmp_path / "out", format="hf")
    for name in ("formerkit_config.json", "model.safetensors", "tokenizer.json", "quantization.json", "--overwrite"):
        assert name in str(err.value)
    assert main(["convert", "--checkpoint", str(tmp_path / "src"), "--out", str(tmp_path / "out")]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()} == before


def test_overwrite_removes_exactly_the_old_checkpoint(tmp_path, capsys):
    source = tiny()
    fk.save_pretrained(source, tmp_path / "src", tokenizer=fk.ByteTokenizer())
    _old_bpe_checkpoint(tmp_path / "out")
    (tmp_path / "out" / "1_Pooling").mkdir()  # a stale sentence-transformers pooling config would set the pooling
    (tmp_path / "out" / "1_Pooling" / "config.json").write_text('{"pooling_mode_cls_token": true}')
    (tmp_path / "out" / "README.md").write_text("notes")
    capsys.readouterr()
    assert main(["convert", "--checkpoint", str(tmp_path / "src"), "--out", str(tmp_path / "out"), "--format", "hf",
                 "--overwrite"]) == 0
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert ("removed formerkit_config.json, quantization.json, tokenizer.json, tokenizer_config.json, "
            "1_Pooling/config.json") in err
    assert "overwrote model.safetensors" in err
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == \
        ["README.md", "config.json", "formerkit_tokenizer.json", "model.safetensors"]
    assert (tmp_path / "out" / "README.md").read_text() == "notes"
    ids = torch.randint(0, 259, (1, 6))
    loaded = fk.from_pretrained(tmp_path / "out")
    assert loaded.config == fk.from_pretrained(convert(tmp_path / "src", tmp_path / "clean", format="hf")).config
    assert torch.equal(logits(loaded, ids), logits(source, ids))
    assert isinstance(fk.load_tokenizer(tmp_path / "out"), fk.ByteTokenizer)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no staging left behind


def test_failed_conversion_leaves_the_target_as_it_was(tmp_path):
    fk.save_pretrained(tiny(position="alibi"), tmp_path / "src")  # no Hugging Face family has ALiBi
    _old_bpe_checkpoint(tmp_path / "out")
    before = {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()}
    with pytest.raises(fk.ConfigError, match="format='native'"):
        convert(tmp_path / "src", tmp_path / "out", format="hf", overwrite=True)
    assert {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()} == before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_empty_or_missing_target_is_fine(tmp_path):
    fk.save_pretrained(tiny(), tmp_path / "src", tokenizer=fk.ByteTokenizer())
    (tmp_path / "empty").mkdir()
    convert(tmp_path / "src", tmp_path / "empty", format="hf")
    convert(tmp_path / "src", tmp_path / "new" / "deeper")
    assert (tmp_path / "empty" / "config.json").is_file()
    assert (tmp_path / "new" / "deeper" / "formerkit_config.json").is_file()


def _fake_run(run: Path) -> Path:
    step = run / "checkpoints" / "step-0000001"
    fk.save_pretrained(tiny(), step, tokenizer=fk.ByteTokenizer())
    (run / "checkpoints" / "latest").write_text("step-0000001\n")
    return step


def test_converting_onto_the_source_is_an_error(tmp_path):
    fk.save_pretrained(tiny(), tmp_path / "src")
    with pytest.raises(fk.CheckpointError, match="is the source checkpoint"):
        convert(tmp_path / "src", tmp_path / "src", format="hf", overwrite=True)
    step = _fake_run(tmp_path / "run")
    for out in (tmp_path / "run", step):
        with pytest.raises(fk.CheckpointError, match="is the source checkpoint"):
            convert(tmp_path / "run", out, overwrite=True)
    with pytest.raises(fk.CheckpointError, match="training run directory"):
        convert(tmp_path / "src", tmp_path / "run", overwrite=True)
    assert (tmp_path / "src" / "formerkit_config.json").is_file() and not (tmp_path / "src" / "config.json").exists()


# ---- trained runs: every path, used ----------------------------------------------------------------------------

def _corpus(root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for i in range(4):
        (root / f"module_{i}.py").write_text("".join(f"def function_{i}_{j}(x):\n    return x * {j} + {i}\n"
                                                     for j in range(30)))
    return root


def _train(tmp: Path, name: str, tokenizer: str, *extra: str) -> Path:
    """A tiny run of a few steps in ``tmp / name``; returns its run directory.

    The weights start at std 0.3 (``PARITY_STD``), so that the comparisons with transformers can fail.
    """
    run = tmp / name
    args = ["--model.init_std", str(PARITY_STD),
            "--model.n_layers", "1", "--model.d_model", "32", "--model.n_heads", "4", "--model.d_ff", "64",
            "--model.max_seq_len", "64", "--data.source", str(_corpus(tmp / "corpus")), "--data.tokenizer", tokenizer,
            "--data.vocab_size", "300", "--data.cache_dir", str(tmp / "cache"), "--data.val_fraction", "0.2",
            "--train.steps", "4", "--train.batch_size", "4", "--train.seq_len", "32", "--train.precision", "fp32",
            "--optim.lr", "3e-3", "--eval.every", "4", "--eval.batches", "1", "--checkpoint.every", "4",
            "--checkpoint.run_dir", str(run), "--log.progress", "false", "--log.samples", "0", *extra]
    train(TrainConfig.load(None, args))
    return run


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """Run directories of a GPT-2-style decoder per tokenizer kind, and of a BERT-style masked LM."""
    tmp = tmp_path_factory.mktemp("runs")
    out = {kind: _train(tmp, kind, kind) for kind in ("byte", "char", "bpe")}
    out["mlm"] = _train(tmp, "mlm", "byte", "--model.preset", "bert-base", "--model.norm_placement", "post",
                        "--train.objective", "mlm")
    return out


def _check_hf_dir(directory: Path, source: fk.Transformer, tokenizer: fk.Tokenizer, kind: str) -> None:
    """transformers loads ``directory`` without an id warning, its logits equal formerkit's, and (BPE) its tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with transformers_messages() as messages:
        hf = AutoModelForCausalLM.from_pretrained(directory).eval()
    assert id_warnings(messages) == []
    config = json.loads((directory / "config.json").read_text())
    assert (config["eos_token_id"], config["bos_token_id"]) == (tokenizer.eos_id, tokenizer.eos_id)
    assert all(v is None or 0 <= v < source.config.vocab_size for v in token_ids(config).values())
    ids = torch.tensor([tokenizer.encode("def function_1(x):\n    return x")])
    with torch.no_grad():
        assert parity_error(hf(ids).logits, logits(source, ids)) < PARITY_TOL
    if kind == "bpe":
        with transformers_messages() as messages:
            theirs = AutoTokenizer.from_pretrained(directory)
        assert id_warnings(messages) == []
        text = "def function_7(x):\n    return x * 3"
        assert theirs(text).input_ids == tokenizer.encode(text)
        assert theirs.decode(tokenizer.encode(text)) == text
        assert (theirs.eos_token_id, theirs.pad_token_id) == (tokenizer.eos_id, tokenizer.pad_id)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["byte", "char", "bpe"])
def test_every_path_round_trips_and_generates(runs, tmp_path, capsys, kind):
    run = runs[kind]
    source, tokenizer = fk.from_pretrained(run), fk.load_tokenizer(run)
    expected = fk.generate_text(source, tokenizer, PROMPT, max_new_tokens=12)
    outputs = {
        "run->hf": convert(run, tmp_path / "hf", format="hf"),
        "run->native": convert(run, tmp_path / "native"),
    }
    outputs["hf->native"] = convert(outputs["run->hf"], tmp_path / "back")
    assert main(["convert", "--checkpoint", str(outputs["run->native"]), "--out", str(tmp_path / "hf2"),
                 "--format", "hf"]) == 0
    outputs["native->hf"] = tmp_path / "hf2"
    capsys.readouterr()
    ids = torch.tensor([tokenizer.encode("def function_2(x):")])
    for name, out in outputs.items():
        model, tok = fk.from_pretrained(out), fk.load_tokenizer(out)
        assert type(tok) is type(tokenizer) and tok.fingerprint() == tokenizer.fingerprint(), name
        torch.testing.assert_close(logits(model, ids), logits(source, ids), atol=1e-6, rtol=0)
        assert fk.generate_text(model, tok, PROMPT, max_new_tokens=12) == expected, name
        assert main(["generate", "--checkpoint", str(out), "--prompt", PROMPT, "--max-new-tokens", "12",
                     "--no-stream"]) == 0
        assert capsys.readouterr().out == expected + "\n", name
        if name.endswith("hf"):
            _check_hf_dir(out, source, tokenizer, kind)


@pytest.mark.slow
def test_encoder_run_converts_to_bert_and_back(runs, tmp_path, capsys):
    from transformers import AutoModelForMaskedLM

    run = runs["mlm"]
    source, tokenizer = fk.from_pretrained(run), fk.load_tokenizer(run)
    assert main(["convert", "--checkpoint", str(run), "--out", str(tmp_path / "hf"), "--format", "hf"]) == 0
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert (config["model_type"], config["pad_token_id"]) == ("bert", tokenizer.pad_id)
    with transformers_messages() as messages:
        hf = AutoModelForMaskedLM.from_pretrained(tmp_path / "hf").eval()
    assert id_warnings(messages) == []
    ids = torch.tensor([tokenizer.encode("def function_3(x): return x")])
    with torch.no_grad():
        assert parity_error(hf(ids).logits, logits(source, ids)) < PARITY_TOL
    convert(tmp_path / "hf", tmp_path / "native")
    back = fk.from_pretrained(tmp_path / "native")
    torch.testing.assert_close(logits(back, ids), logits(source, ids), atol=1e-6, rtol=0)
    sentences = ["def f(x): return x", "def g(y): return y"]
    capsys.readouterr()
    assert main(["embed", "--checkpoint", str(tmp_path / "native"), "--json", *sentences]) == 0
    vectors = torch.tensor([json.loads(line)["embedding"] for line in capsys.readouterr().out.splitlines()])
    torch.testing.assert_close(vectors, fk.embed(source, tokenizer, sentences), atol=1e-5, rtol=0)
