"""Training objectives: what a batch is, how its loss is computed, and how a model is evaluated.

Every objective draws the batch of optimizer step ``k`` from a generator seeded by
(seed, k) over the *global* batch, and each process keeps its own rows. So the data
position is the step number (exact resume), and processes never overlap.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from formerkit.data import WindowBatches, eval_batches
from formerkit.heads import IGNORE_INDEX
from formerkit.layers.moe import router_losses

Batch = dict[str, torch.Tensor]


def step_generator(seed: int, step: int, salt: int) -> torch.Generator:
    """A CPU generator whose stream depends only on (seed, step, salt)."""
    return torch.Generator().manual_seed((seed * 1_000_003 + step) * 31 + salt)


def split_micro(batch: Batch, parts: int) -> list[Batch]:
    """Split every tensor of a batch into ``parts`` equal micro-batches along dim 0."""
    chunks = {k: v.chunk(parts) for k, v in batch.items()}
    return [{k: chunks[k][i] for k in batch} for i in range(parts)]


def with_router_losses(loss: torch.Tensor, model, coefs: tuple[float, float]) -> torch.Tensor:
    """``loss`` + aux_coef * load-balancing loss + z_coef * router z-loss of ``model``'s latest forward.

    ``model``: the module, or the trainer's wrapper of it (its ``module``). ``coefs`` is (aux_coef,
    z_coef); a model without experts (or both coefficients 0) returns ``loss``.
    """
    module = model if isinstance(model, nn.Module) else model.module
    losses = router_losses(module) if any(coefs) else None
    if losses is None:
        return loss
    return loss + coefs[0] * losses[0] + coefs[1] * losses[1]


def output_z_loss(logits: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
    """The output z-loss (PaLM; Wortsman et al. 2024): mean over positions of log(Z)^2, Z = sum over the vocabulary
    of exp(logits).

    ``logits`` (..., V); ``keep`` (...) a boolean mask of the positions that count (all when None).
    Returns a scalar (computed in fp32). It pulls the softmax normalizer towards 1, which keeps the
    output logits from drifting to large magnitudes at high learning rates.
    """
    log_z = torch.logsumexp(logits.float(), dim=-1)  # (...)
    if keep is not None:
        log_z = log_z[keep]
    return log_z.square().mean()


class Objective(Protocol):
    """The interface the trainer uses."""

    def train_batch(self, step: int) -> Batch: ...

    def loss(self, model: nn.Module, batch: Batch) -> torch.Tensor: ...

    def evaluate(self, model: nn.Module, device: torch.device, autocast) -> dict[str, float]: ...

    def tokens(self, batch: Batch) -> int: ...


def bytes_per_token(tokens, tokenizer, *, batch_size: int, seq_len: int, max_batches: int) -> float:
    """UTF-8 bytes per target token over the fixed evaluation windows of ``tokens`` (decoded text, specials skipped).

    Turns a loss in nats per token into bits per byte: ``loss / ln 2 / bytes_per_token``.
    """
    text_bytes, count = 0, 0
    for _, y in eval_batches(tokens, batch_size=batch_size, seq_len=seq_len, max_batches=max_batches):
        for row in y:  # (T,)
            text_bytes += len(tokenizer.decode(row.tolist()).encode("utf-8"))
            count += row.numel()
    return text_bytes / count


@dataclass
class CausalLM:
    """Next-token prediction on random windows of a token array.

    With ``bytes_per_token`` (of the evaluation windows) the evaluation also reports bits per byte.
    ``router_coefs``: (load-balancing, z-loss) coefficients of a mixture of experts' training loss;
    ``z_loss_coef``: weight of the output z-loss (``output_z_loss``) in the training loss (0: off).
    """

    train: WindowBatches
    val_tokens: object
    seq_len: int
    eval_batch_size: int
    eval_batches: int
    bytes_per_token: float | None = None
    router_coefs: tuple[float, float] = (0.0, 0.0)
    z_loss_coef: float = 0.0

    def train_batch(self, step: int) -> Batch:
        """Rows of step ``step`` for this process: input x (B, T) and targets y (B, T)."""
        x, y = self.train.batch(step)
        return {"x": x, "y": y}

    def loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        """Mean next-token cross-entropy of the batch (+ ``z_loss_coef`` x the output z-loss, + the router losses
        of a mixture of experts); while training a model with early exits, both are the mean of the LM head's
        and every exit's (the exits are trained jointly)."""
        heads = self._heads(model, batch)
        loss = self._cross_entropy(heads, batch)
        if self.z_loss_coef:
            loss = loss + self.z_loss_coef * sum(output_z_loss(logits) for logits in heads) / len(heads)
        return with_router_losses(loss, model, self.router_coefs)

    def cross_entropy(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        """Mean next-token cross-entropy of the batch, averaged over the LM head and any early exits' logits."""
        return self._cross_entropy(self._heads(model, batch), batch)

    @staticmethod
    def _heads(model: nn.Module, batch: Batch) -> list[torch.Tensor]:
        out = model(batch["x"])
        return [out.logits, *(out.exit_logits or [])]  # each (B, T, V)

    @staticmethod
    def _cross_entropy(heads: list[torch.Tensor], batch: Batch) -> torch.Tensor:
        targets = batch["y"].flatten()
        return sum(F.cross_entropy(logits.flatten(0, 1).float(), targets) for logits in heads) / len(heads)

    def tokens(self, batch: Batch) -> int:
        """Tokens the batch trains on."""
        return batch["x"].numel()

    @torch.no_grad()
    def evaluate(self, model: nn.Module, device: torch.device, autocast) -> dict[str, float]:
        """Validation loss (nats per token), perplexity and bits per byte over fixed windows of the validation split."""
        total, count = 0.0, 0
        for x, y in eval_batches(self.val_tokens, batch_size=self.eval_batch_size, seq_len=self.seq_len,
                                 max_batches=self.eval_batches):
            with autocast():
                total += self.cross_entropy(model, {"x": x.to(device), "y": y.to(device)}).item() * x.numel()
            count += x.numel()
        loss = total / count
        out = {"loss": loss, "perplexity": math.exp(min(loss, 50.0))}
        if self.bytes_per_token:
            out["bits_per_byte"] = loss / math.log(2) / self.bytes_per_token
        return out


def mask_tokens(x: torch.Tensor, generator: torch.Generator, *, probability: float, mask_id: int,
                vocab_size: int, special: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT masking: choose ``probability`` of the tokens; of those 80% -> mask, 10% -> random, 10% kept.

    x: (B, T). special: ids never chosen. Returns (inputs (B, T), labels (B, T) with -100 where not chosen).
    """
    chosen = torch.rand(x.shape, generator=generator) < probability
    chosen &= ~torch.isin(x, special)
    labels = torch.where(chosen, x, torch.full_like(x, IGNORE_INDEX))
    roll = torch.rand(x.shape, generator=generator)
    random_ids = torch.randint(0, vocab_size, x.shape, generator=generator)
    inputs = torch.where(chosen & (roll < 0.8), torch.full_like(x, mask_id), x)
    inputs = torch.where(chosen & (roll >= 0.8) & (roll < 0.9), random_ids, inputs)
    return inputs, labels


@dataclass
class MaskedLM:
    """BERT-style masked-token prediction on random windows."""

    train: WindowBatches
    val_tokens: object
    seq_len: int
    eval_batch_size: int
    eval_batches: int
    probability: float
    mask_id: int
    vocab_size: int
    special: torch.Tensor
    seed: int
    router_coefs: tuple[float, float] = (0.0, 0.0)  # (load-balancing, z-loss) of a mixture of experts
    z_loss_coef: float = 0.0  # weight of the output z-loss over the masked positions

    def _mask(self, x: torch.Tensor, step: int, salt: int) -> Batch:
        inputs, labels = mask_tokens(x, step_generator(self.seed, step, salt), probability=self.probability,
                                     mask_id=self.mask_id, vocab_size=self.vocab_size, special=self.special)
        return {"x": inputs, "labels": labels}

    def train_batch(self, step: int) -> Batch:
        """This process's rows of step ``step``, masked; the masking depends only on (seed, step, row)."""
        x, _ = self.train.batch(step)
        rows = [self._mask(row[None], step, 1000 + self.train.rank * x.shape[0] + i) for i, row in enumerate(x)]
        return {k: torch.cat([r[k] for r in rows]) for k in ("x", "labels")}

    def loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        """Mean cross-entropy over the masked positions (+ ``z_loss_coef`` x their output z-loss, + the router
        losses of a mixture of experts)."""
        logits = model(batch["x"]).logits  # (B, T, V)
        loss = F.cross_entropy(logits.flatten(0, 1).float(), batch["labels"].flatten(), ignore_index=IGNORE_INDEX)
        if self.z_loss_coef:
            loss = loss + self.z_loss_coef * output_z_loss(logits, batch["labels"] != IGNORE_INDEX)
        return with_router_losses(loss, model, self.router_coefs)

    def tokens(self, batch: Batch) -> int:
        """Tokens the batch reads."""
        return batch["x"].numel()

    @torch.no_grad()
    def evaluate(self, model: nn.Module, device: torch.device, autocast) -> dict[str, float]:
        """Masked-token loss, perplexity and accuracy on validation windows with fixed masks."""
        total, correct, count = 0.0, 0, 0
        windows = eval_batches(self.val_tokens, batch_size=self.eval_batch_size, seq_len=self.seq_len,
                               max_batches=self.eval_batches)
        for i, (x, _) in enumerate(windows):
            batch = {k: v.to(device) for k, v in self._mask(x, -1 - i, 0).items()}
            with autocast():
                logits = model(batch["x"]).logits.float()
            chosen = batch["labels"] != IGNORE_INDEX
            total += F.cross_entropy(logits[chosen], batch["labels"][chosen], reduction="sum").item()
            correct += int((logits[chosen].argmax(-1) == batch["labels"][chosen]).sum())
            count += int(chosen.sum())
        loss = total / max(count, 1)
        return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "accuracy": correct / max(count, 1)}


@dataclass
class Classification:
    """Sequence classification from labeled texts; reports accuracy."""

    train_texts: list[str]
    train_labels: torch.Tensor
    val_texts: list[str]
    val_labels: torch.Tensor
    tokenizer: object
    seq_len: int
    batch_size: int
    rank: int
    world_size: int
    seed: int

    def _encode(self, texts: list[str], labels: torch.Tensor) -> Batch:
        ids, mask = self.tokenizer.batch(texts, max_length=self.seq_len)
        return {"x": ids, "mask": mask, "labels": labels}

    def train_batch(self, step: int) -> Batch:
        """This process's rows of a random global batch of examples for step ``step``."""
        rows = torch.randint(0, len(self.train_texts), (self.batch_size,), generator=step_generator(self.seed, step, 7))
        local = self.batch_size // self.world_size
        rows = rows[self.rank * local : (self.rank + 1) * local].tolist()
        return self._encode([self.train_texts[i] for i in rows], self.train_labels[rows])

    def loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        """Cross-entropy of the class logits."""
        return model(batch["x"], batch["mask"], labels=batch["labels"]).loss

    def tokens(self, batch: Batch) -> int:
        """Real (unpadded) tokens in the batch."""
        return int(batch["mask"].sum())

    @torch.no_grad()
    def evaluate(self, model: nn.Module, device: torch.device, autocast) -> dict[str, float]:
        """Loss and accuracy over the whole validation split."""
        total, correct = 0.0, 0
        for start in range(0, len(self.val_texts), 64):
            texts = self.val_texts[start : start + 64]
            batch = {k: v.to(device) for k, v in
                     self._encode(texts, self.val_labels[start : start + 64]).items()}
            with autocast():
                out = model(batch["x"], batch["mask"], labels=batch["labels"])
            total += out.loss.item() * len(texts)
            correct += int((out.logits.argmax(-1) == batch["labels"]).sum())
        n = max(len(self.val_texts), 1)
        return {"loss": total / n, "accuracy": correct / n}
