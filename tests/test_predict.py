"""formerkit predict: a trained classifier's labels, masked-LM fills against transformers, the command, errors."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import pytest
import torch

import formerkit as fk
from conftest import reinit_for_parity, require
from formerkit.cli import main
from formerkit.errors import CheckpointError, InputError
from formerkit.train import TrainConfig, train

os.environ.setdefault("HF_HUB_OFFLINE", "1")

TINY = dict(n_layers=1, d_model=32, n_heads=4, d_ff=64, max_seq_len=32)
GOOD, BAD = ["great", "lovely", "fine"], ["awful", "bad", "poor"]
WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "cat", "dog", "sat", "on", "mat", "a", "red", "blue",
         "ran", "park", "in", "."]


def _review(i: int) -> dict[str, str]:
    good = i % 2 == 0
    return {"text": f"the movie number {i} was {(GOOD if good else BAD)[i % 3]}", "label": "pos" if good else "neg"}


@pytest.fixture(scope="module")
def classifier_run(tmp_path_factory, one_thread) -> Path:
    """A run directory holding a tiny byte-level classifier trained on 'pos'/'neg' reviews."""
    root = tmp_path_factory.mktemp("classify")
    data = root / "reviews.jsonl"
    data.write_text("".join(json.dumps(_review(i)) + "\n" for i in range(200)))
    args = ["--train.objective", "classify", "--data.source", str(data), "--data.tokenizer", "byte",
            "--model.n_layers", "2", "--model.d_model", "32", "--model.n_heads", "4", "--model.d_ff", "64",
            "--model.max_seq_len", "64", "--train.seq_len", "48", "--train.batch_size", "16", "--train.steps", "80",
            "--train.precision", "fp32", "--optim.lr", "3e-3", "--optim.warmup_steps", "5", "--eval.every", "80",
            "--checkpoint.every", "80", "--checkpoint.run_dir", str(root / "run"), "--log.every", "80",
            "--log.progress", "false"]
    result = train(TrainConfig.load(None, args))
    assert result.val["accuracy"] >= 0.9
    return root / "run"


def _direct_probabilities(model: fk.Transformer, tokenizer, text: str) -> torch.Tensor:
    """Softmax of the model's logits for one unpadded text, computed without the predict module."""
    with torch.no_grad():
        logits = model(torch.tensor([tokenizer.encode(text)])).logits  # (1, num_labels)
    return logits[0].softmax(-1)


@pytest.mark.slow
def test_classify_names_labels_with_softmax_probabilities(classifier_run):
    model, tokenizer = fk.from_pretrained(classifier_run), fk.load_tokenizer(classifier_run)
    assert model.config.label_names == ["neg", "pos"]  # the training run recorded the data's names
    reviews = [_review(i) for i in range(200, 212)]
    results = fk.classify(model, tokenizer, [r["text"] for r in reviews], batch_size=5)
    assert sum(res["label"] == r["label"] for res, r in zip(results, reviews, strict=True)) >= 11
    for res, review in zip(results, reviews, strict=True):
        assert res["text"] == review["text"] and list(res["probabilities"]) == ["neg", "pos"]
        probs = torch.tensor(list(res["probabilities"].values()))
        assert probs.sum().item() == pytest.approx(1.0, abs=1e-6)
        assert torch.allclose(probs, _direct_probabilities(model, tokenizer, review["text"]), atol=1e-5)
        assert res["probability"] == max(res["probabilities"].values())
    single = fk.classify(model, tokenizer, reviews[0]["text"])  # a str gives one dict, whatever the batch
    assert single["label"] == results[0]["label"] and single["probability"] == pytest.approx(results[0]["probability"])


@pytest.mark.slow
def test_predict_command_on_a_run_directory(classifier_run, tmp_path, capsys, monkeypatch):
    texts = [_review(300)["text"], _review(301)["text"]]
    assert main(["predict", "--checkpoint", str(classifier_run), "--json", *texts]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [line["text"] for line in lines] == texts and [line["label"] for line in lines] == ["pos", "neg"]
    model, tokenizer = fk.from_pretrained(classifier_run), fk.load_tokenizer(classifier_run)
    for line in lines:
        expected = _direct_probabilities(model, tokenizer, line["text"])
        assert torch.allclose(torch.tensor([line["probabilities"]["neg"], line["probabilities"]["pos"]]), expected,
                              atol=1e-5)
    assert main(["predict", "--checkpoint", str(classifier_run), texts[0]]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == texts[0] and out[1].startswith("  pos 0.") and "| neg 0." in out[1]

    records = tmp_path / "in.jsonl"
    records.write_text("".join(json.dumps({"review": t, "id": i}) + "\n" for i, t in enumerate(texts)))
    assert main(["predict", "--checkpoint", str(classifier_run), "--json", "--input", str(records),
                 "--text-field", "review"]) == 0
    assert [json.loads(line)["label"] for line in capsys.readouterr().out.splitlines()] == ["pos", "neg"]
    monkeypatch.setattr("sys.stdin", io.StringIO(f"{texts[1]}\n\n{texts[0]}\n"))
    assert main(["predict", "--checkpoint", str(classifier_run), "--json"]) == 0
    assert [json.loads(line)["label"] for line in capsys.readouterr().out.splitlines()] == ["neg", "pos"]
    assert main(["predict", "--checkpoint", str(classifier_run), "--input", str(records)]) == 2
    err = capsys.readouterr().err
    assert 'line 1: the "text" field is missing' in err and "--text-field" in err


def _save(tmp_path: Path, name: str, tokenizer=None, **config) -> Path:
    """A natively saved random model with a byte tokenizer beside it."""
    torch.manual_seed(0)
    path = tmp_path / name
    fk.save_pretrained(fk.Transformer(fk.ModelConfig(vocab_size=259, **TINY, **config)), path)
    (tokenizer or fk.ByteTokenizer()).save(path)
    return path


def test_a_classifier_without_names_labels_by_index(tmp_path, capsys):
    path = _save(tmp_path, "unnamed", kind="encoder", head="classifier", num_labels=3)
    result = fk.classify(fk.from_pretrained(path), fk.load_tokenizer(path), ["some text", "other text"])
    assert all(list(r["probabilities"]) == ["0", "1", "2"] and r["label"] in ("0", "1", "2") for r in result)
    assert main(["predict", "--checkpoint", str(path), "--top-k", "2", "some text"]) == 0
    assert capsys.readouterr().out.splitlines()[1].count("|") == 1  # --top-k labels shown


def _bert_mlm_dir(path: Path) -> Path:
    """A randomly initialised transformers BertForMaskedLM with a word-level [MASK] tokenizer, saved to ``path``."""
    transformers = require("transformers")
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2),
                                                                                                ("[SEP]", 3)])
    tok.add_special_tokens(WORDS[:5])
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=len(WORDS), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=64, max_position_embeddings=32)
    reinit_for_parity(transformers.BertForMaskedLM(config)).eval().save_pretrained(path)
    tok.save(str(path / "tokenizer.json"))
    specials = {"pad_token": "[PAD]", "unk_token": "[UNK]", "cls_token": "[CLS]", "sep_token": "[SEP]",
                "mask_token": "[MASK]"}
    (path / "special_tokens_map.json").write_text(json.dumps(specials))
    (path / "tokenizer_config.json").write_text(json.dumps({**specials, "model_max_length": 32}))
    return path


@pytest.mark.slow
def test_fill_mask_matches_transformers(tmp_path, capsys):
    transformers = require("transformers")
    path = _bert_mlm_dir(tmp_path / "bert")
    texts = ["the cat sat on the [MASK] .", "a [MASK] dog ran in the [MASK]", "[MASK] cat"]
    ours = fk.fill_mask(fk.from_pretrained(path), fk.load_tokenizer(path), texts, top_k=4, batch_size=2)

    hf_tok = transformers.PreTrainedTokenizerFast(tokenizer_file=str(path / "tokenizer.json"), mask_token="[MASK]",
                                                  pad_token="[PAD]")
    batch = hf_tok(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = transformers.BertForMaskedLM.from_pretrained(path).eval()(**batch).logits  # (B, T, V)
    for b, result in enumerate(ours):
        positions = (batch["input_ids"][b] == hf_tok.mask_token_id).nonzero().flatten().tolist()
        assert result["text"] == texts[b] and [m["position"] for m in result["masks"]] == positions
        for mask, position in zip(result["masks"], positions, strict=True):
            reference = logits[b, position].softmax(-1)  # (V,)
            top = reference.topk(4)
            fills = mask["fills"]
            assert [f["probability"] for f in fills] == pytest.approx(top.values.tolist(), abs=1e-4)
            assert all(abs(reference[f["id"]].item() - f["probability"]) < 1e-4 for f in fills)
            assert [f["token"] for f in fills] == [WORDS[f["id"]] for f in fills]
            assert top.values[0] > 2 * top.values[-1]  # the scores are not a near-uniform tie
    assert len(ours[1]["masks"]) == 2

    assert main(["predict", "--checkpoint", str(path), "--top-k", "3", texts[1]]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == texts[1] and out[1].startswith("  mask 1: ") and out[2].count("|") == 2
    assert out[1].split()[2] == ours[1]["masks"][0]["fills"][0]["token"]


@pytest.mark.parametrize("kind", ["byte", "char", "bpe"])
def test_fill_mask_with_formerkit_tokenizers_equals_brute_force(tmp_path, kind):
    texts = ["the cat sat on the mat", "a dog ran in the park"]
    tokenizer = fk.build_tokenizer(kind, lambda: texts, vocab_size=300)
    torch.manual_seed(0)
    model = fk.Transformer(fk.ModelConfig(kind="encoder", head="mlm", vocab_size=tokenizer.vocab_size, **TINY,
                                          init_std=0.3)).eval()
    text = "the <mask> sat on <mask> mat"
    result = fk.fill_mask(model, tokenizer, text, top_k=3)
    ids = tokenizer.encode("the ") + [tokenizer.mask_id] + tokenizer.encode(" sat on ") + [tokenizer.mask_id] + \
        tokenizer.encode(" mat")
    if kind == "bpe":  # a tokenizer.json tokenizer reads <mask> in the text itself
        ids = tokenizer.encode(text)
    with torch.no_grad():
        probs = model(torch.tensor([ids])).logits[0].softmax(-1)  # (T, V)
    positions = [i for i, t in enumerate(ids) if t == tokenizer.mask_id]
    assert [m["position"] for m in result["masks"]] == positions and len(positions) == 2
    for mask, position in zip(result["masks"], positions, strict=True):
        top = probs[position].topk(3)
        assert [f["id"] for f in mask["fills"]] == top.indices.tolist()
        assert [f["probability"] for f in mask["fills"]] == pytest.approx(top.values.tolist(), abs=1e-6)


def test_errors_name_the_problem_and_the_fix(tmp_path, capsys, monkeypatch):
    mlm = _save(tmp_path, "mlm", kind="encoder", head="mlm")
    model, tokenizer = fk.from_pretrained(mlm), fk.load_tokenizer(mlm)
    with pytest.raises(InputError, match=r"text 2 \('no mask here'\) has no <mask> token.*write <mask> where"):
        fk.fill_mask(model, tokenizer, ["a <mask>", "no mask here"])
    with pytest.raises(InputError, match="has its <mask> beyond the first 32 tokens"):
        fk.fill_mask(model, tokenizer, "x" * 40 + "<mask>")
    with pytest.raises(InputError, match="top_k must be an integer >= 1"):
        fk.fill_mask(model, tokenizer, "a <mask>", top_k=0)
    with pytest.raises(InputError, match="head='mlm', not 'classifier'; use fill_mask"):
        fk.classify(model, tokenizer, "text")
    with pytest.raises(InputError, match="no texts"):
        fk.fill_mask(model, tokenizer, [])
    with pytest.raises(InputError, match="text 1 is empty"):
        fk.fill_mask(model, tokenizer, ["  "])
    no_mask = fk.HFTokenizer(fk.train_bpe(["some text"], 300)._tok, special_tokens={"pad_token": "<pad>"})
    with pytest.raises(CheckpointError, match="no mask token"):
        fk.fill_mask(model, no_mask, "a <mask>")

    assert main(["predict", "--checkpoint", str(mlm), "a sentence"]) == 2
    assert "has no <mask> token" in capsys.readouterr().err
    monkeypatch.setattr("sys.stdin", io.StringIO("\n  \n"))
    assert main(["predict", "--checkpoint", str(mlm)]) == 2
    assert "no texts to predict" in capsys.readouterr().err
    records = tmp_path / "texts.jsonl"
    records.write_text('{"text": "a <mask>"}\n')
    assert main(["predict", "--checkpoint", str(mlm), "--input", str(records), "more"]) == 2
    assert "not both" in capsys.readouterr().err
    assert main(["predict", "--checkpoint", str(mlm), "--top-k", "0", "a <mask>"]) == 2
    assert "--top-k must be >= 1" in capsys.readouterr().err

    for name, config, hint in [("gpt", {"head": "lm"}, "formerkit generate"),
                               ("base", {"kind": "encoder", "head": "none"}, "formerkit embed")]:
        path = _save(tmp_path, name, **config)
        assert main(["predict", "--checkpoint", str(path), "text"]) == 2
        err = capsys.readouterr().err
        assert f"has head={config['head']!r}" in err and hint in err
    vit = tmp_path / "vit"
    fk.save_pretrained(fk.Transformer(fk.ModelConfig.from_preset("vit-digits", n_layers=1)), vit)
    assert main(["predict", "--checkpoint", str(vit), "text"]) == 2
    assert "image classifier" in capsys.readouterr().err
