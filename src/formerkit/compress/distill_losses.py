"""Distillation losses as plain functions: logit KD (Hinton et al.), MiniLM's deep self-attention
distillation (attention distributions and value relations) and MiniLMv2's multi-head relations.

Every attention-side loss is a KL divergence between two "relation" distributions over key
positions: ``KL(teacher || student)`` per (row, relation head, query position), averaged over the
relation heads and the real query positions. Relations are given as scores before the softmax
(masked entries at a very negative value, as ``hook_attn_scores`` holds them), so the
log-probabilities are computed stably with ``log_softmax``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from formerkit.errors import InputError


def check_temperature_alpha(temperature: float, alpha: float) -> None:
    """Raise InputError unless ``temperature > 0`` and ``0 <= alpha <= 1``."""
    if not isinstance(temperature, (int, float)) or not temperature > 0:
        raise InputError(f"temperature must be a positive number (1 = the plain softmax; 2 to 4 softens it), "
                         f"got {temperature!r}")
    if not isinstance(alpha, (int, float)) or not 0 <= alpha <= 1:
        raise InputError(f"alpha must be in [0, 1] (the weight of the distillation loss; 1 - alpha weighs the task "
                         f"loss), got {alpha!r}")


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0,
            mask: torch.Tensor | None = None) -> torch.Tensor:
    """Logit distillation: ``T^2 * KL(softmax(teacher / T) || softmax(student / T))``, averaged over positions.

    student_logits, teacher_logits: (..., V) on the same vocabulary or label set. mask: (...) true
    (or 1) at the positions that count (e.g. labels != -100); None: all. Returns a scalar (0 when no
    position counts). The T^2 factor keeps the gradient's scale independent of T.
    """
    check_temperature_alpha(temperature, 0.0)
    if student_logits.shape != teacher_logits.shape:
        raise InputError(f"student logits {tuple(student_logits.shape)} and teacher logits "
                         f"{tuple(teacher_logits.shape)} differ in shape; distillation needs the same vocabulary "
                         "(or label set) and the same inputs")
    log_p_s = F.log_softmax(student_logits.float() / temperature, dim=-1)  # (..., V)
    log_p_t = F.log_softmax(teacher_logits.float() / temperature, dim=-1)  # (..., V)
    per_position = (log_p_t.exp() * (log_p_t - log_p_s)).sum(-1)  # (...)
    return _masked_mean(per_position, mask) * temperature**2


def mix_losses(kd: torch.Tensor, task: torch.Tensor, alpha: float) -> torch.Tensor:
    """``alpha * kd + (1 - alpha) * task``: the distillation loss mixed with the task loss."""
    check_temperature_alpha(1.0, alpha)
    return alpha * kd + (1 - alpha) * task


def _masked_mean(values: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean of ``values`` where ``mask`` (same shape, or None: everywhere) is true; 0 for an empty mask."""
    if mask is None:
        return values.mean()
    weights = mask.to(values.dtype)
    return (values * weights).sum() / weights.sum().clamp(min=1)


def relation_kl(teacher_scores: torch.Tensor, student_scores: torch.Tensor,
                mask: torch.Tensor | None = None) -> torch.Tensor:
    """KL(softmax(teacher) || softmax(student)) over the last axis, averaged over heads and real query rows.

    teacher_scores, student_scores: (B, R, T, S) relation scores before the softmax (masked keys very
    negative, e.g. ``torch.finfo(float32).min``). mask: (B, T) 1 for real query positions; None: all.
    Returns a scalar.
    """
    if teacher_scores.shape != student_scores.shape:
        raise InputError(f"teacher relations {tuple(teacher_scores.shape)} and student relations "
                         f"{tuple(student_scores.shape)} differ in shape; MiniLM's attention and value relations "
                         "need equal head counts (use relation heads, MiniLMv2's form, when they differ)")
    log_p_t = F.log_softmax(teacher_scores.float(), dim=-1)  # (B, R, T, S)
    log_p_s = F.log_softmax(student_scores.float(), dim=-1)
    p_t = log_p_t.exp()
    per_row = torch.where(p_t > 0, p_t * (log_p_t - log_p_s), torch.zeros_like(p_t)).sum(-1)  # (B, R, T)
    rows = None if mask is None else mask.bool()[:, None, :].expand_as(per_row)
    return _masked_mean(per_row, rows)


def relation_scores(x: torch.Tensor, relation_heads: int | None = None, mask: torch.Tensor | None = None,
                    causal: bool = False) -> torch.Tensor:
    """Self-relation scores ``x_r x_r^T / sqrt(d_r)`` per relation head, masked for the softmax.

    x: (B, T, H, D) per-head queries, keys or values (as ``hook_q``/``hook_k``/``hook_v`` hold them).
    relation_heads: None keeps the model's H heads (MiniLM's value relation); a number R splits the
    concatenated (B, T, H * D) into R heads of H * D / R (MiniLMv2), which lets models of different
    head counts and widths be compared. mask: (B, T) 1 for real tokens (padded keys are masked);
    causal: mask keys after the query. Returns (B, R, T, T).
    """
    B, T, H, D = x.shape
    if relation_heads is not None:
        if H * D % relation_heads:
            raise InputError(f"{relation_heads} relation heads do not divide the width {H * D} (= {H} heads x {D}); "
                             "choose a divisor of both the teacher's and the student's attention widths")
        x = x.reshape(B, T, relation_heads, H * D // relation_heads)  # (B, T, R, d_r)
    x = x.transpose(1, 2).float()  # (B, R, T, d_r)
    scores = x @ x.transpose(-1, -2) / x.shape[-1] ** 0.5  # (B, R, T, T)
    low = torch.finfo(scores.dtype).min
    if mask is not None:
        scores = scores.masked_fill(~mask.bool()[:, None, None, :], low)
    if causal:
        future = torch.ones(T, T, dtype=torch.bool, device=x.device).triu(1)
        scores = scores.masked_fill(future, low)
    return scores


def attention_kl(teacher_scores: torch.Tensor, student_scores: torch.Tensor,
                 mask: torch.Tensor | None = None) -> torch.Tensor:
    """MiniLM's attention transfer: KL of the teacher's attention distributions from the student's.

    teacher_scores, student_scores: (B, H, T, S) attention scores before the softmax (what
    ``hook_attn_scores`` holds; the softmax of each row is the attention distribution). Both
    need the same head count. mask: (B, T) real query positions. Returns a scalar.
    """
    return relation_kl(teacher_scores, student_scores, mask)


def value_relation_kl(teacher_v: torch.Tensor, student_v: torch.Tensor, mask: torch.Tensor | None = None,
                      causal: bool = False) -> torch.Tensor:
    """MiniLM's value relation: KL of ``softmax(V V^T / sqrt(d_head))`` per head, teacher from student.

    teacher_v, student_v: (B, T, H, D) with the same H (D may differ). mask: (B, T) real tokens;
    causal: relate each position only to itself and earlier ones. Returns a scalar.
    """
    return relation_kl(relation_scores(teacher_v, None, mask, causal), relation_scores(student_v, None, mask, causal),
                       mask)


def multihead_relation_kl(teacher: dict[str, torch.Tensor], student: dict[str, torch.Tensor], relation_heads: int,
                          mask: torch.Tensor | None = None, causal: bool = False) -> torch.Tensor:
    """MiniLMv2: the sum of the q-q, k-k and v-v relation KLs over ``relation_heads`` relation heads.

    teacher, student: {"q", "k", "v"} -> (B, T, H, D) tensors; head counts and widths may differ
    between them (``relation_heads`` must divide each width H * D). Returns a scalar.
    """
    total = torch.zeros((), device=teacher["q"].device)
    for name in ("q", "k", "v"):
        total = total + relation_kl(relation_scores(teacher[name], relation_heads, mask, causal),
                                    relation_scores(student[name], relation_heads, mask, causal), mask)
    return total
