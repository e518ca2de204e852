"""Knowledge distillation: a student learns from a teacher's logits and last-layer self-attention.

``Distiller`` computes the loss of one batch: ``alpha * KD + (1 - alpha) * task`` on the logits
(causal LM, masked LM or classification), plus ``attention_weight`` times MiniLM's deep
self-attention loss on the last layer, read through the layers' hook points: the attention KL
and the value-relation KL when teacher and student have the same head count, else MiniLMv2's
q-q, k-k and v-v relations over ``relation_heads`` heads. ``distill`` runs the loop: formerkit's
AdamW groups and learning-rate schedule, batches of a training objective (formerkit.train.objectives).
The losses themselves are plain functions in ``formerkit.compress.distill_losses``.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from formerkit.compress.distill_losses import (
    attention_kl,
    check_temperature_alpha,
    kd_loss,
    mix_losses,
    multihead_relation_kl,
    value_relation_kl,
)
from formerkit.errors import ConfigError, InputError
from formerkit.heads import IGNORE_INDEX, classification_loss, token_loss
from formerkit.interp.run import hooks
from formerkit.model import Transformer
from formerkit.train.config import OptimSection
from formerkit.train.optim import build_optimizer, lr_at

OBJECTIVES = ("causal", "mlm", "classify")


def objective_of(model: Transformer) -> str:
    """The task a model's head serves: "causal" (decoder + LM head), "mlm" (masked-LM head) or "classify".

    Raises ConfigError for models distillation does not cover (encoder-decoder, images, no head).
    """
    cfg = model.config
    if cfg.kind == "encoder-decoder" or cfg.patch_size is not None:
        raise ConfigError(f"distillation covers text decoders and encoders; this is a {cfg.kind} model"
                          + (" of images" if cfg.patch_size is not None else ""))
    if cfg.head == "classifier":
        return "classify"
    if cfg.head == "mlm":
        return "mlm"
    if cfg.head == "lm" and cfg.kind == "decoder":
        return "causal"
    raise ConfigError(f"distillation needs a causal LM, masked-LM or classifier head; this model has "
                      f"head={cfg.head!r} (kind={cfg.kind!r})")


def check_pair(teacher: Transformer, student: Transformer) -> str:
    """Check that ``student`` can learn from ``teacher``; return their objective (see ``objective_of``).

    Both need the same task, the same vocabulary size and, for classifiers, the same number of labels.
    Raises ConfigError saying what differs.
    """
    task, student_task = objective_of(teacher), objective_of(student)
    if task != student_task:
        raise ConfigError(f"the teacher is a {task} model but the student a {student_task} one; give the student the "
                          f"teacher's kind and head ({teacher.config.kind}, {teacher.config.head})")
    t, s = teacher.config, student.config
    if t.vocab_size != s.vocab_size:
        raise ConfigError(f"the teacher's vocab_size is {t.vocab_size} but the student's {s.vocab_size}; the student "
                          "must read the teacher's tokens: set its vocab_size to the teacher's")
    if task == "classify" and t.num_labels != s.num_labels:
        raise ConfigError(f"the teacher has {t.num_labels} labels but the student {s.num_labels}; set the student's "
                          f"num_labels to {t.num_labels}")
    return task


@dataclass(frozen=True)
class DistillSettings:
    """How the losses are weighed.

    temperature: softens both distributions of the logit KD. alpha: weight of the KD loss against the
    task loss (1 - alpha). attention_weight: weight of the last-layer attention loss (0: off).
    relation_heads: MiniLMv2 relation heads; None: MiniLM's per-head losses when the head counts match,
    else gcd of the two head counts.
    """

    temperature: float = 2.0
    alpha: float = 0.5
    attention_weight: float = 0.0
    relation_heads: int | None = None

    def __post_init__(self) -> None:
        check_temperature_alpha(self.temperature, self.alpha)
        if not isinstance(self.attention_weight, (int, float)) or not self.attention_weight >= 0:
            raise InputError(f"attention_weight must be >= 0 (0 turns the attention loss off), "
                             f"got {self.attention_weight!r}")
        if self.relation_heads is not None and (not isinstance(self.relation_heads, int) or self.relation_heads < 1):
            raise InputError(f"relation_heads must be a positive integer or None, got {self.relation_heads!r}")


def _last_attention(model: Transformer) -> str:
    return f"blocks.{model.config.n_layers - 1}.attn"


@contextlib.contextmanager
def capture_attention(model: Transformer, scores: bool):
    """Within the block, record the last layer's q, k, v ((B, T, H, D), before rotary) and, with ``scores``,
    its attention scores before the softmax ((B, H, T, S)); yields the dict they are stored in, by name.

    Gradients flow through the stored tensors.
    """
    prefix = _last_attention(model)
    store: dict[str, torch.Tensor] = {}
    names = ["q", "k", "v"] + (["attn_scores"] if scores else [])

    def keep(name: str) -> Callable:
        def save(activation: torch.Tensor, hook) -> None:
            store[name] = activation
        return save

    with hooks(model, [(f"{prefix}.hook_{name}", keep(name)) for name in names]):
        yield store


def _kv_per_head(x: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Repeat grouped k/v heads (B, T, KV, D) to the query heads (B, T, H, D), as attention uses them."""
    return x.repeat_interleave(n_heads // x.shape[2], dim=2) if x.shape[2] != n_heads else x


@dataclass
class Distiller:
    """The distillation loss of a (teacher, student) pair on batches of a training objective."""

    teacher: Transformer
    student: Transformer
    settings: DistillSettings = field(default_factory=DistillSettings)

    def __post_init__(self) -> None:
        self.task = check_pair(self.teacher, self.student)
        t, s = self.teacher.config, self.student.config
        self.same_heads = t.n_heads == s.n_heads and self.settings.relation_heads is None
        self.relation_heads = self.settings.relation_heads or math.gcd(t.n_heads, s.n_heads)

    def losses(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """All parts of the loss of one batch: "loss" (what to minimize), "task", "kd" and "attention".

        With alpha = 0 and no attention loss only "loss" and "task" (the teacher is not run).

        batch: the objective's batch: causal {"x", "y"}, mlm {"x", "labels"}, classify {"x", "mask", "labels"}.
        """
        attend = self.settings.attention_weight > 0
        with self._capture(self.student, attend) as student_acts:
            student_logits = self._logits(self.student, batch)
        task, kd_mask = self._task(student_logits, batch)
        if self.settings.alpha == 0 and not attend:  # the task loss alone: the teacher is not needed
            return {"task": task.detach(), "loss": task}
        with torch.no_grad(), self._capture(self.teacher, attend) as teacher_acts:
            teacher_logits = self._logits(self.teacher, batch)
        kd = kd_loss(student_logits, teacher_logits, self.settings.temperature, kd_mask)
        loss = mix_losses(kd, task, self.settings.alpha)
        out = {"task": task.detach(), "kd": kd.detach()}
        if attend:
            attention = self._attention_loss(teacher_acts, student_acts, batch.get("mask"))
            loss = loss + self.settings.attention_weight * attention
            out["attention"] = attention.detach()
        out["loss"] = loss
        return out

    def _capture(self, model: Transformer, attend: bool):
        if not attend:
            return contextlib.nullcontext({})
        return capture_attention(model, scores=self.same_heads)

    def _logits(self, model: Transformer, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Logits (B, T, V) or (B, C) of ``model`` on the batch's inputs."""
        return model(batch["x"], batch.get("mask")).logits

    def _task(self, logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The task loss of the student's logits, and the positions the KD loss counts ((B, T), or None: all)."""
        if self.task == "causal":
            return token_loss(logits, batch["y"]), batch["y"] != IGNORE_INDEX
        if self.task == "mlm":
            return token_loss(logits, batch["labels"]), batch["labels"] != IGNORE_INDEX
        return classification_loss(logits, batch["labels"]), None

    def _attention_loss(self, teacher: dict[str, torch.Tensor], student: dict[str, torch.Tensor],
                        mask: torch.Tensor | None) -> torch.Tensor:
        """MiniLM (same heads: attention KL + value-relation KL) or MiniLMv2 (q/k/v relations) on the last layer."""
        causal = self.task == "causal"
        if self.same_heads:
            heads = self.teacher.config.n_heads
            return (attention_kl(teacher["attn_scores"], student["attn_scores"], mask)
                    + value_relation_kl(_kv_per_head(teacher["v"], heads), _kv_per_head(student["v"], heads),
                                        mask, causal))
        return multihead_relation_kl(teacher, student, self.relation_heads, mask, causal)


@dataclass
class DistillResult:
    """What a distillation run did: its last training losses, the student's and teacher's evaluation."""

    steps: int
    seconds: float
    train: dict[str, float]
    student: dict[str, float]
    teacher: dict[str, float]


def distill(distiller: Distiller, objective, *, steps: int, optim: OptimSection | None = None,
            log_every: int = 0, log: Callable[[str], None] = print) -> DistillResult:
    """Train ``distiller.student`` for ``steps`` optimizer steps on ``objective``'s batches; return the result.

    objective: a formerkit.train.objectives objective (``train_batch(step)`` and ``evaluate``) whose
    batches fit the pair's task. optim: AdamW and schedule options (default: ``OptimSection()`` with
    warmup capped at a tenth of the steps). The teacher stays frozen in eval mode. Both models are
    evaluated on the objective's validation data at the end.
    """
    if not isinstance(steps, int) or steps < 1:
        raise InputError(f"steps must be a positive integer, got {steps!r}")
    optim = optim or OptimSection(warmup_steps=max(1, min(100, steps // 10)))
    teacher, student = distiller.teacher, distiller.student
    teacher.eval().requires_grad_(False)
    student.train()
    optimizer = build_optimizer(student, optim, kernel="foreach")
    device = next(student.parameters()).device
    start, last = time.perf_counter(), {}
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, optim, steps)
        batch = {k: v.to(device) for k, v in objective.train_batch(step).items()}
        parts = distiller.losses(batch)
        parts["loss"].backward()
        if optim.grad_clip:
            torch.nn.utils.clip_grad_norm_(student.parameters(), optim.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        last = {k: float(v.detach()) for k, v in parts.items()}
        if log_every and (step + 1) % log_every == 0:
            log(f"step {step + 1}/{steps} " + " ".join(f"{k} {v:.4f}" for k, v in last.items()))
    seconds = time.perf_counter() - start
    student.eval()
    return DistillResult(steps, seconds, last, _evaluate(objective, student, device),
                         _evaluate(objective, teacher, device))


def _evaluate(objective, model: nn.Module, device: torch.device) -> dict[str, float]:
    return objective.evaluate(model, device, contextlib.nullcontext)
