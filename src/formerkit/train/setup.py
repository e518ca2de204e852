"""Assembling a run: its tokenizer, its data and objective, and the model config they imply."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from formerkit.checkpoints import load_config
from formerkit.config import ModelConfig
from formerkit.data import LabeledData, TextSource, WindowBatches, load_corpus, load_labeled_jsonl
from formerkit.data.topics import NAME as TOPICS_NAME
from formerkit.data.topics import topic_splits
from formerkit.errors import CheckpointError, ConfigError, DataError
from formerkit.tokenizers import Tokenizer, build_tokenizer, load_tokenizer
from formerkit.train.config import TrainConfig
from formerkit.train.distributed import DistInfo, barrier
from formerkit.train.images import ImageClassification, image_model_options, image_splits
from formerkit.train.init_from import init_model_options
from formerkit.train.objectives import CausalLM, Classification, MaskedLM, bytes_per_token
from formerkit.train.seq2seq import build_seq2seq, run_pairs

DEFAULT_CACHE = Path.home() / ".cache" / "formerkit" / "tokens"


def prepare_tokenizer(cfg: TrainConfig, run_dir: Path, resumed: Tokenizer | None, source: TextSource | None,
                      info: DistInfo):
    """The run's tokenizer: ``resumed`` (the checkpoint's) when resuming, else built once (on rank 0) and saved."""
    if cfg.train.objective == "image-classify":  # images need no tokenizer
        return None
    if resumed is not None:
        return resumed
    init_from = cfg.model.get("init_from")
    if cfg.data.tokenizer is None and init_from:
        try:
            return load_tokenizer(init_from)
        except CheckpointError as err:
            raise ConfigError(f"model.init_from={init_from} has no tokenizer to train with ({err}); name one with "
                              "--data.tokenizer") from err
    saved = run_dir / "tokenizer"
    if info.is_main:
        if source is not None:
            texts = source.documents
        elif cfg.train.objective == "seq2seq":  # one shared vocabulary: both sides of the training pairs
            pairs = run_pairs(cfg)[0]
            texts = lambda: iter(pairs.texts())  # noqa: E731
        else:
            train_texts = labeled_splits(cfg)[0].texts
            texts = lambda: iter(train_texts)  # noqa: E731
        tokenizer = build_tokenizer(cfg.data.tokenizer or "bpe", texts, vocab_size=cfg.data.vocab_size)
        tokenizer.save(saved)
    barrier(info)
    return load_tokenizer(saved)


def labeled_splits(cfg: TrainConfig) -> tuple[LabeledData, LabeledData]:
    """The (train, validation) texts of a classification run: ``synthetic:topics`` or a JSONL file, split."""
    if cfg.data.source == TOPICS_NAME:
        return topic_splits(cfg.data.val_fraction, cfg.train.seed)
    if not cfg.data.source:
        raise ConfigError("train.objective=classify needs --data.source: a JSONL file of "
                          f"{{'{cfg.data.text_field}': ..., '{cfg.data.label_field}': ...}} records, or "
                          f"{TOPICS_NAME} (a synthetic task)")
    data = load_labeled_jsonl(cfg.data.source, text_field=cfg.data.text_field, label_field=cfg.data.label_field)
    return data.split(cfg.data.val_fraction, cfg.train.seed)


def _model_config(cfg: TrainConfig, vocab_size: int, num_labels: int | None = None) -> ModelConfig:
    """The run's ModelConfig, with the head (and kind) its objective needs unless the user chose them."""
    objective = cfg.train.objective
    needs = {"causal": {"head": "lm"}, "mlm": {"kind": "encoder", "head": "mlm"},
             "classify": {"head": "classifier"}, "seq2seq": {"kind": "encoder-decoder", "head": "lm"},
             "image-classify": {"kind": "encoder", "head": "classifier"}}[objective]
    init_from = cfg.model.get("init_from")
    if init_from:
        options = {k: v for k, v in cfg.model.items() if k not in ("init_from", "preset")}
        if cfg.data.tokenizer is None:  # the checkpoint's own tokenizer: keep its (possibly padded) table
            vocab_size = max(vocab_size, load_config(init_from).vocab_size)
        values = {**init_model_options(init_from, options, needs), "init_from": init_from}
    else:
        values = {**needs, **cfg.model}
    for key, value in needs.items():
        if values[key] != value:
            raise ConfigError(f"train.objective={objective} needs model.{key}={value}, got {values[key]!r}")
    if objective == "mlm":
        values.setdefault("norm_placement", "pre")
    if objective == "classify" and values.get("kind", "decoder") == "decoder":
        values.setdefault("pooling", "last")
    merged = TrainConfig.from_dict({**cfg.to_dict(), "model": values})
    model_cfg = merged.model_config(vocab_size, num_labels)
    if model_cfg.position == "learned" and model_cfg.max_seq_len < cfg.train.seq_len and model_cfg.patch_size is None:
        raise ConfigError(f"train.seq_len={cfg.train.seq_len} exceeds model.max_seq_len={model_cfg.max_seq_len}; "
                          "raise --model.max_seq_len or lower --train.seq_len")
    return model_cfg


def _tokenizer_words(cfg: TrainConfig, tokenizer: Tokenizer) -> str:
    """How the log names the run's tokenizer, with its real vocabulary size (and the size asked for a new BPE)."""
    kind = cfg.data.tokenizer
    if kind is None and cfg.model.get("init_from"):
        return f"the tokenizer of {cfg.model['init_from']} ({tokenizer.vocab_size:,} tokens)"
    if kind in (None, "bpe"):
        return f"byte-level BPE learned here: {tokenizer.vocab_size:,} tokens (asked {cfg.data.vocab_size:,})"
    if kind in ("byte", "char"):
        return f"{kind} tokenizer ({tokenizer.vocab_size:,} tokens)"
    return f"the tokenizer in {kind} ({tokenizer.vocab_size:,} tokens)"


def build_objective(cfg: TrainConfig, tokenizer, source: TextSource | None, info: DistInfo):
    """Load the data for ``cfg.train.objective``; return (objective, ModelConfig, a one-line data summary)."""
    t = cfg.train
    eval_batch = t.batch_size  # the same windows whatever the accumulation or process count
    if t.objective == "image-classify":  # vocab_size is unused by image models
        splits = image_splits(cfg)
        model_cfg = _model_config(image_model_options(cfg, splits.train), 1, len(splits.train.label_names))
        model_cfg = model_cfg.replace(label_names=model_cfg.label_names or splits.train.label_names)
        line = (f"data: {splits.train.description}: {len(splits.train):,} training, {len(splits.val):,} validation "
                f"and {len(splits.test):,} test images, {len(splits.train.label_names)} classes")
        return ImageClassification(splits, t.batch_size, info.rank, info.world_size, t.seed,
                                   model_cfg.num_image_tokens, cfg.data.augment_shift), model_cfg, line
    if t.objective == "classify":
        train, val = labeled_splits(cfg)
        names = train.label_names
        chosen = cfg.model.get("num_labels", len(names))
        if chosen < len(names):
            raise DataError(f"{cfg.data.source} holds {len(names)} distinct labels "
                            f"({', '.join(names[:10])}{', ...' if len(names) > 10 else ''}), "
                            f"more than model.num_labels={chosen}; raise --model.num_labels or leave it unset "
                            "to take the count from the data")
        model_cfg = _model_config(cfg, tokenizer.vocab_size, num_labels=chosen)
        names = names + [str(i) for i in range(len(names), chosen)]  # classes the data never shows: their ids
        model_cfg = model_cfg.replace(label_names=model_cfg.label_names or names)
        objective = Classification(train.texts, torch.tensor(train.labels), val.texts, torch.tensor(val.labels),
                                   tokenizer, t.seq_len, t.batch_size, info.rank, info.world_size, t.seed)
        line = (f"data: {cfg.data.source}: {len(train):,} training and {len(val):,} validation texts, labels "
                f"{', '.join(names[:10])}{', ...' if len(names) > 10 else ''}; {_tokenizer_words(cfg, tokenizer)}")
        return objective, model_cfg, line
    if t.objective == "seq2seq":  # decoding starts from the pad id, as seq2seq training teaches it to
        model_cfg = dataclasses.replace(_model_config(cfg, tokenizer.vocab_size), pad_token_id=tokenizer.pad_id,
                                        decoder_start_token_id=tokenizer.pad_id)
        objective = build_seq2seq(cfg, tokenizer, info)
        line = (f"data: {cfg.data.source}: {len(objective.train_pairs):,} training and "
                f"{len(objective.val_pairs):,} held-out pairs; {_tokenizer_words(cfg, tokenizer)}")
        return objective, model_cfg, line
    cache = Path(cfg.data.cache_dir) if cfg.data.cache_dir else DEFAULT_CACHE
    if info.is_main:
        corpus = load_corpus(source, tokenizer, cache_dir=cache, val_fraction=cfg.data.val_fraction)
    barrier(info)
    if not info.is_main:
        corpus = load_corpus(source, tokenizer, cache_dir=cache, val_fraction=cfg.data.val_fraction)
    if len(corpus.val) < t.seq_len + 1:
        raise DataError(f"the validation split has {len(corpus.val)} tokens, fewer than seq_len+1={t.seq_len + 1}; "
                        "use more text, a larger --data.val_fraction or a smaller --train.seq_len")
    model_cfg = _model_config(cfg, tokenizer.vocab_size)
    line = (f"data: {source.describe()}; {corpus.documents - corpus.val_documents:,} training documents "
            f"({len(corpus.train):,} tokens) and {corpus.val_documents:,} validation documents "
            f"({len(corpus.val):,} tokens); {_tokenizer_words(cfg, tokenizer)}")
    windows = WindowBatches(corpus.train, batch_size=t.batch_size, seq_len=t.seq_len, seed=t.seed,
                            rank=info.rank, world_size=info.world_size)
    if t.objective == "causal":
        per_token = bytes_per_token(corpus.val, tokenizer, batch_size=eval_batch, seq_len=t.seq_len,
                                    max_batches=cfg.eval.batches)
        return CausalLM(windows, corpus.val, t.seq_len, eval_batch, cfg.eval.batches, per_token,
                        (t.router_aux_loss_coef, t.router_z_loss_coef), t.z_loss_coef), model_cfg, line
    if tokenizer.mask_id is None:
        raise ConfigError("train.objective=mlm needs a tokenizer with a mask token")
    special = torch.tensor([i for i in (tokenizer.pad_id, tokenizer.eos_id, tokenizer.mask_id) if i is not None])
    objective = MaskedLM(windows, corpus.val, t.seq_len, eval_batch, cfg.eval.batches, t.mlm_probability,
                         tokenizer.mask_id, tokenizer.vocab_size, special, t.seed,
                         (t.router_aux_loss_coef, t.router_z_loss_coef), t.z_loss_coef)
    return objective, model_cfg, line
