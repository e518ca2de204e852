"""Sequence-to-sequence training of an encoder-decoder model on (source, target) pairs.

Teacher forcing: the decoder reads ``[start] + target`` and learns to predict
``target + [EOS]``, where the start token is the tokenizer's pad id (the convention of T5 and
Marian, and what ``generate``/``generate_text`` start encoder-decoder decoding from). Padding
is right-aligned and ignored by the loss (label -100); the decoder needs no padding mask because
causal attention never lets a real position see the padding after it. The loss is
cross-entropy against the label-smoothed target distribution. Evaluation reports the
held-out loss and the BLEU, chrF and exact match of beam-search translations.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from formerkit.data.pairs import ParallelData, load_pairs
from formerkit.data.synthetic import is_synthetic, synthetic_pairs
from formerkit.errors import ConfigError, DataError
from formerkit.generate.translate import beam_texts
from formerkit.heads import IGNORE_INDEX
from formerkit.model import Transformer
from formerkit.tokenizers import Tokenizer
from formerkit.train.config import TrainConfig
from formerkit.train.distributed import DistInfo
from formerkit.train.objectives import Batch, step_generator
from formerkit.train.seq2seq_eval import translation_metrics


def label_smoothed_loss(logits: torch.Tensor, labels: torch.Tensor, smoothing: float) -> torch.Tensor:
    """Mean cross-entropy against ``(1 - smoothing) * one_hot(label) + smoothing / V`` over non-ignored positions.

    logits: (..., V); labels: (...) with -100 where there is no target. Equals
    ``F.cross_entropy(..., label_smoothing=smoothing, ignore_index=-100)``. Returns a scalar.
    """
    log_probs = torch.log_softmax(logits.float(), dim=-1)  # (..., V)
    keep = labels != IGNORE_INDEX  # (...)
    nll = -log_probs.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)  # (...)
    uniform = -log_probs.mean(-1)  # (...) cross-entropy against the uniform distribution
    per_token = (1.0 - smoothing) * nll + smoothing * uniform  # (...)
    return (per_token * keep).sum() / keep.sum().clamp(min=1)


def teacher_forcing(targets: list[list[int]], start_id: int, eos_id: int, pad_id: int) -> tuple[torch.Tensor,
                                                                                                  torch.Tensor]:
    """Decoder inputs ``[start] + target`` and labels ``target + [EOS]``, right-padded to one width.

    Returns (decoder_input_ids (B, T), labels (B, T)): inputs padded with ``pad_id``, labels with -100.
    """
    width = max(len(t) for t in targets) + 1
    inputs = torch.full((len(targets), width), pad_id, dtype=torch.long)  # (B, T)
    labels = torch.full((len(targets), width), IGNORE_INDEX, dtype=torch.long)  # (B, T)
    for i, target in enumerate(targets):
        row = torch.tensor(target, dtype=torch.long)
        inputs[i, 0] = start_id
        inputs[i, 1 : len(target) + 1] = row
        labels[i, : len(target)] = row
        labels[i, len(target)] = eos_id
    return inputs, labels


def pad_sources(sources: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad source id rows into ids (B, S) and an attention mask (B, S) of 1/0."""
    width = max(len(s) for s in sources)
    ids = torch.full((len(sources), width), pad_id, dtype=torch.long)  # (B, S)
    mask = torch.zeros((len(sources), width), dtype=torch.long)  # (B, S)
    for i, source in enumerate(sources):
        ids[i, : len(source)] = torch.tensor(source, dtype=torch.long)
        mask[i, : len(source)] = 1
    return ids, mask


def load_parallel(spec: str | None, *, source_field: str, target_field: str, synthetic_size: int,
                  val_fraction: float, seed: int) -> tuple[ParallelData, ParallelData]:
    """The (train, held-out) pairs of a run: a synthetic task (``synthetic:NAME``) or a TSV/JSONL file split."""
    if not spec:
        raise ConfigError("train.objective=seq2seq needs --data.source: a TSV file (source<TAB>target per line), a "
                          ".jsonl file of {\"source\": ..., \"target\": ...} records, or a synthetic task such as "
                          "synthetic:digits-to-words")
    if is_synthetic(spec):
        return synthetic_pairs(spec, size=synthetic_size, val_fraction=val_fraction, seed=seed)
    data = load_pairs(spec, source_field=source_field, target_field=target_field)
    if len(data) < 2:
        raise DataError(f"{spec} holds {len(data)} pair; seq2seq training needs at least 2 (one held out)")
    return data.split(val_fraction, seed)


@dataclass
class Seq2Seq:
    """Teacher-forced training on parallel text; evaluation by held-out loss and beam-search translation."""

    train_pairs: ParallelData
    val_pairs: ParallelData
    tokenizer: Tokenizer
    max_len: int
    batch_size: int
    rank: int
    world_size: int
    seed: int
    smoothing: float
    loss_batches: int
    eval_pairs: int
    num_beams: int
    max_new_tokens: int

    def __post_init__(self) -> None:
        if self.tokenizer.eos_id is None:
            raise ConfigError("train.objective=seq2seq needs a tokenizer with an end-of-sequence token")
        if self.max_len < 2:
            raise ConfigError(f"train.seq_len={self.max_len} is too short for seq2seq: a target needs a token and EOS")
        self._train = (self._encode(self.train_pairs.sources), self._encode(self.train_pairs.targets, 1))
        self._val = (self._encode(self.val_pairs.sources), self._encode(self.val_pairs.targets, 1))

    def _encode(self, texts: list[str], room: int = 0) -> list[list[int]]:
        """Ids of each text without special tokens, cut to ``max_len - room`` (room: for the EOS label)."""
        return [ids[: self.max_len - room] for ids in self.tokenizer.encode_many(texts)]

    def _batch(self, sources: list[list[int]], targets: list[list[int]]) -> Batch:
        tok = self.tokenizer
        src, src_mask = pad_sources(sources, tok.pad_id)
        dec_in, labels = teacher_forcing(targets, tok.pad_id, tok.eos_id, tok.pad_id)
        return {"src": src, "src_mask": src_mask, "dec_in": dec_in, "labels": labels}

    def train_batch(self, step: int) -> Batch:
        """This process's rows of a random global batch of pairs for step ``step``: source, decoder input, labels."""
        rows = torch.randint(0, len(self.train_pairs), (self.batch_size,),
                             generator=step_generator(self.seed, step, 11))
        local = self.batch_size // self.world_size
        rows = rows[self.rank * local : (self.rank + 1) * local].tolist()
        return self._batch([self._train[0][i] for i in rows], [self._train[1][i] for i in rows])

    def loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        """Label-smoothed cross-entropy of the target tokens (and EOS) under teacher forcing."""
        logits = model(batch["src"], batch["src_mask"], decoder_input_ids=batch["dec_in"]).logits  # (B, T, V)
        return label_smoothed_loss(logits, batch["labels"], self.smoothing)

    def tokens(self, batch: Batch) -> int:
        """Real source tokens plus predicted target tokens of the batch."""
        return int(batch["src_mask"].sum()) + int((batch["labels"] != IGNORE_INDEX).sum())

    @torch.no_grad()
    def evaluate(self, model: nn.Module, device: torch.device, autocast) -> dict[str, float]:
        """Held-out loss (no smoothing) and perplexity over the first ``loss_batches`` batches of held-out
        pairs, then BLEU, chrF and exact match of beam-search translations of the first ``eval_pairs``."""
        total, count = 0.0, 0
        for start in range(0, min(len(self.val_pairs), self.loss_batches * self.batch_size), self.batch_size):
            end = start + self.batch_size
            batch = {k: v.to(device) for k, v in self._batch(self._val[0][start:end], self._val[1][start:end]).items()}
            with autocast():
                logits = model(batch["src"], batch["src_mask"], decoder_input_ids=batch["dec_in"]).logits
            n = int((batch["labels"] != IGNORE_INDEX).sum())
            total += label_smoothed_loss(logits, batch["labels"], 0.0).item() * n
            count += n
        loss = total / max(count, 1)
        pairs = self.val_pairs.take(list(range(min(self.eval_pairs, len(self.val_pairs)))))
        with autocast():
            hypotheses = self.translate(model, pairs.sources)
        return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), **translation_metrics(hypotheses, pairs.targets)}

    def examples(self, model: nn.Module, count: int, autocast) -> list[str]:
        """The first ``count`` held-out pairs as "source -> translation" lines, marked against the reference."""
        pairs = self.val_pairs.take(list(range(min(count, len(self.val_pairs)))))
        with autocast():
            hypotheses = self.translate(model, pairs.sources)
        return [f"{s}\n  -> {h}\n  {'correct' if h.strip() == r.strip() else 'reference: ' + r}"
                for s, h, r in zip(pairs.sources, hypotheses, pairs.targets, strict=True)]

    def translate(self, model: nn.Module, sources: list[str]) -> list[str]:
        """Beam-search translations of ``sources`` with this run's beam settings."""
        return beam_texts(unwrap(model), self.tokenizer, sources, num_beams=self.num_beams,
                          max_new_tokens=self.max_new_tokens, batch_size=self.batch_size)


def run_pairs(cfg: TrainConfig) -> tuple[ParallelData, ParallelData]:
    """The (train, held-out) pairs a run's ``data`` section names, split with ``train.seed``."""
    d = cfg.data
    return load_parallel(d.source, source_field=d.source_field, target_field=d.target_field,
                         synthetic_size=d.synthetic_size, val_fraction=d.val_fraction, seed=cfg.train.seed)


def build_seq2seq(cfg: TrainConfig, tokenizer: Tokenizer, info: DistInfo) -> Seq2Seq:
    """The seq2seq objective of a run: its pairs, encoded with ``tokenizer``, with this process's share of batches."""
    train_pairs, val_pairs = run_pairs(cfg)
    t, e = cfg.train, cfg.eval
    return Seq2Seq(train_pairs, val_pairs, tokenizer, t.seq_len, t.batch_size, info.rank, info.world_size, t.seed,
                   t.label_smoothing, e.batches, e.translate_pairs, e.num_beams, e.max_new_tokens)


def unwrap(model: object) -> Transformer:
    """The formerkit model inside the training wrappers (formerkit's Wrapped, DDP, torch.compile)."""
    while not isinstance(model, Transformer):
        inner = getattr(model, "_orig_mod", None) or getattr(model, "module", None)
        if inner is None:
            raise TypeError(f"cannot find the formerkit model inside a {type(model).__name__}")
        model = inner
    return model
