"""Label names: ModelConfig validation, native and Hugging Face round trips, what transformers reads, training."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

import formerkit as fk
from conftest import require
from formerkit.errors import ConfigError
from formerkit.train import TrainConfig
from formerkit.train.distributed import DistInfo
from formerkit.train.init_from import init_model_options
from formerkit.train.setup import build_objective

os.environ.setdefault("HF_HUB_OFFLINE", "1")
INFO = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))

BERT = dict(kind="encoder", vocab_size=60, d_model=32, n_layers=1, n_heads=4, d_ff=64, max_seq_len=16,
            norm_placement="post", final_norm=False, embed_norm=True, type_vocab_size=2, activation="gelu",
            head="classifier", pooler=True, pooling="cls", norm_eps=1e-12, pad_token_id=0)


def test_label_names_are_validated():
    cfg = fk.ModelConfig(**BERT, num_labels=3, label_names=("neg", "neutral", "pos"))
    assert cfg.label_names == ["neg", "neutral", "pos"]  # a tuple is stored as a list
    with pytest.raises(ConfigError, match=r"label_names has 2 names but num_labels=3.*num_labels=2"):
        fk.ModelConfig(**BERT, num_labels=3, label_names=["neg", "pos"])
    with pytest.raises(ConfigError, match=r"label_names must be distinct, but 'pos' appears more than once"):
        fk.ModelConfig(**BERT, num_labels=3, label_names=["pos", "neg", "pos"])
    with pytest.raises(ConfigError, match="label_names must be a list of strings"):
        fk.ModelConfig(**BERT, num_labels=2, label_names=[0, 1])
    with pytest.raises(ConfigError, match="label_names must be a list of strings"):
        fk.ModelConfig(**BERT, num_labels=2, label_names="ab")
    with pytest.raises(ConfigError, match="label_names has 3 names"):
        fk.ModelConfig(**BERT).replace(label_names=["a", "b", "c"])


def test_native_round_trip_keeps_names(tmp_path):
    cfg = fk.ModelConfig(**BERT, num_labels=2, label_names=["neg", "pos"])
    assert fk.ModelConfig.from_json(cfg.to_json()) == cfg
    fk.save_pretrained(fk.Transformer(cfg), tmp_path)
    assert json.loads((tmp_path / "formerkit_config.json").read_text())["label_names"] == ["neg", "pos"]
    assert fk.from_pretrained(tmp_path).config.label_names == ["neg", "pos"]


def test_hf_export_and_import_of_names():
    cfg = fk.ModelConfig(**BERT, num_labels=3, label_names=["neg", "neutral", "pos"])
    hf = fk.config_to_hf(cfg)
    assert hf["id2label"] == {"0": "neg", "1": "neutral", "2": "pos"}
    assert hf["label2id"] == {"neg": 0, "neutral": 1, "pos": 2}
    assert fk.config_from_hf(hf) == cfg
    unnamed = fk.ModelConfig(**BERT, num_labels=3)  # transformers' default names mean "no names"
    assert fk.config_to_hf(unnamed)["id2label"] == {"0": "LABEL_0", "1": "LABEL_1", "2": "LABEL_2"}
    assert fk.config_from_hf(fk.config_to_hf(unnamed)) == unnamed
    keys_out_of_order = {**hf, "id2label": {"2": "pos", "0": "neg", "1": "neutral"}}
    assert fk.config_from_hf(keys_out_of_order).label_names == ["neg", "neutral", "pos"]
    for odd in ({"0": "a", "1": "a"}, {"0": "a", "5": "b"}):  # maps formerkit cannot hold: read without names
        read = fk.config_from_hf({**hf, "id2label": odd})
        assert read.num_labels == 2 and read.label_names is None


def test_vit_classifier_names_round_trip():
    cfg = fk.ModelConfig.from_preset("vit-digits", num_labels=3, label_names=["zero", "one", "two"])
    assert fk.config_to_hf(cfg)["id2label"] == {"0": "zero", "1": "one", "2": "two"}
    assert fk.config_from_hf(fk.config_to_hf(cfg)) == cfg


@pytest.mark.slow
def test_transformers_reads_the_names_of_a_saved_hf_dir(tmp_path):
    transformers = require("transformers")
    cfg = fk.ModelConfig(**BERT, num_labels=3, label_names=["neg", "neutral", "pos"])
    fk.save_pretrained(fk.Transformer(cfg), tmp_path, format="hf")
    auto = transformers.AutoConfig.from_pretrained(tmp_path)
    assert auto.id2label == {0: "neg", 1: "neutral", 2: "pos"} and auto.label2id == {"neg": 0, "neutral": 1, "pos": 2}
    model = transformers.BertForSequenceClassification.from_pretrained(tmp_path)
    assert model.config.num_labels == 3 and model.config.id2label[2] == "pos"
    model.save_pretrained(tmp_path / "again")  # and formerkit reads what transformers writes
    assert fk.from_pretrained(tmp_path / "again").config.label_names == ["neg", "neutral", "pos"]


def test_init_from_leaves_the_names_to_the_new_data(tmp_path):
    cfg = fk.ModelConfig(**BERT, num_labels=2, label_names=["neg", "pos"])
    fk.save_pretrained(fk.Transformer(cfg), tmp_path)
    values = init_model_options(tmp_path, {"num_labels": 3}, {"head": "classifier"})
    assert "label_names" not in values
    assert fk.ModelConfig.from_dict(values).num_labels == 3  # a checkpoint's 2 names would not fit 3 classes


def _run_config(tmp_path: Path, *extra: str) -> TrainConfig:
    return TrainConfig.load(None, ["--data.tokenizer", "byte", "--model.n_layers", "1", "--model.d_model", "32",
                                   "--model.n_heads", "4", "--model.d_ff", "64", "--train.seq_len", "32",
                                   "--checkpoint.run_dir", str(tmp_path / "run"), *extra])


@pytest.mark.parametrize("labels, extra, names", [
    (["pos", "neg", "meh"], [], ["meh", "neg", "pos"]),  # string labels: in sorted order, as their ids are
    ([1, 0, 1], ["--model.num_labels", "3"], ["0", "1", "2"]),  # a class the data never shows: its id
    ([1, 0, 1], ["--model.label_names", "[bad, good]"], ["bad", "good"]),  # the user names integer classes
])
def test_a_classify_run_records_its_label_names(tmp_path, labels, extra, names):
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"text": f"text {i}", "label": label}) + "\n"
                            for i, label in enumerate(labels * 4)))
    cfg = _run_config(tmp_path, "--train.objective", "classify", "--data.source", str(data), *extra)
    _, model_cfg, _ = build_objective(cfg, fk.ByteTokenizer(), None, INFO)
    assert model_cfg.label_names == names and model_cfg.num_labels == len(names)


def test_an_image_classify_run_records_its_label_names(tmp_path):
    cfg = _run_config(tmp_path, "--train.objective", "image-classify", "--data.source", "digits",
                      "--model.preset", "vit-digits")
    _, model_cfg, _ = build_objective(cfg, None, None, INFO)
    assert model_cfg.label_names == [str(i) for i in range(10)]
