"""Speed choices a training run measures at start-up: the attention kernel and the AdamW implementation.

Both alternatives compute the same numbers to rounding (attention: to 1e-5, tested; AdamW: the
same update up to a last bit now and then), so the faster one can be taken wherever it is faster,
and which one is depends on the machine. Not bit for bit, though: two fresh runs that time
differently may choose differently and part in the last bits (a resumed run reuses its choices);
fix ``train.attention`` and ``optim.kernel`` for runs that must match bit for bit.

- attention: PyTorch's fused ``scaled_dot_product_attention`` kernel, or the model's explicit
  path (``q @ k^T``, softmax, ``@ v``), which stores the (B, H, T, T) probabilities and so only
  pays for short contexts. Timed as one layer's forward + backward at the run's batch, heads,
  context and precision.
- AdamW: ``fused=True`` (one kernel per parameter group) or the default ``foreach`` kernels, timed
  as one step over a copy of (up to 16M elements of) the model's parameters.

An explicit ``train.attention`` / ``optim.fused`` skips the measurement. A resumed run passes the
choice it started with as ``previous``: it is kept unless the new measurement finds it at least
``STICKY`` times slower than the best (another machine), so a resume on the same machine computes
exactly what the uninterrupted run would.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from formerkit.layers.attention import Attention
from formerkit.model import Transformer
from formerkit.precision import DTYPES, PrecisionChoice, resolve_precision
from formerkit.train.config import TrainConfig
from formerkit.train.distributed import DistInfo, broadcast_object

MARGIN = 1.05  # the alternative to the default must be at least this much faster
STICKY = 1.5  # a resumed run keeps its earlier choice unless it is this much slower than the best
MAX_EXPLICIT_CONTEXT = 1024  # longer contexts keep the fused kernel (the explicit path stores T x T)
PROBE_ELEMENTS = 16_000_000
REPEATS = 3


@dataclass(frozen=True)
class SpeedChoice:
    """One measured choice: what was taken, the default it was compared with, and the seconds behind it."""

    what: str
    chosen: str
    seconds: dict[str, float] = field(default_factory=dict)
    note: str = ""

    def describe(self) -> str:
        """``attention eager (sdpa 12.10 ms, eager 8.20 ms)``, or with its note when nothing was measured."""
        if not self.seconds:
            return f"{self.what} {self.chosen} ({self.note})"
        times = ", ".join(f"{name} {s * 1e3:.2f} ms" for name, s in self.seconds.items())
        return f"{self.what} {self.chosen} ({times}{'; ' + self.note if self.note else ''})"


def pick(seconds: dict[str, float], default: str, previous: str | None = None) -> str:
    """The default unless another option is ``MARGIN`` faster; a ``previous`` choice stays unless ``STICKY`` slower."""
    best = min(seconds, key=seconds.get)
    if previous in seconds and seconds[previous] <= STICKY * seconds[best]:
        return previous
    return best if seconds[default] >= MARGIN * seconds[best] else default


def _best_time(fn: Callable[[], None], device: torch.device) -> float:
    fn()  # warm up
    times = []
    for _ in range(REPEATS):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return min(times)


def choose_attention(model: Transformer, rows: int, seq_len: int, precision: str, device: torch.device,
                     requested: str = "auto", previous: str | None = None) -> SpeedChoice:
    """``sdpa`` or ``eager`` for training ``model`` on batches of ``rows`` sequences of ``seq_len`` tokens."""
    if requested != "auto":
        return SpeedChoice("attention", requested, note="as configured")
    cfg = model.config
    if seq_len > MAX_EXPLICIT_CONTEXT or cfg.sliding_window is not None or cfg.position in ("alibi", "relative"):
        return SpeedChoice("attention", "sdpa", note="fused kernel: long context or a position bias")
    H, D = max(cfg.layer_config(i).n_heads for i in range(cfg.n_layers)), cfg.head_dim  # a pruned model: per layer
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(rows, H, seq_len, D, generator=generator).to(device).requires_grad_() for _ in range(3))
    autocast = contextlib.nullcontext() if precision == "fp32" else torch.autocast(device.type, DTYPES[precision])
    scale = D**-0.5

    def sdpa() -> None:
        with autocast:
            z = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)  # (B, H, T, D)
        z.float().sum().backward()

    future = torch.ones(seq_len, seq_len, dtype=torch.bool, device=device).triu(1)

    def eager() -> None:  # the model's explicit path (layers/attention.py)
        with autocast:
            scores = (q @ k.transpose(-1, -2)).float() * scale  # (B, H, T, T)
            pattern = scores.masked_fill(future, torch.finfo(scores.dtype).min).softmax(-1).to(v.dtype)
            z = pattern @ v  # (B, H, T, D)
        z.float().sum().backward()

    try:
        seconds = {"sdpa": _best_time(sdpa, device), "eager": _best_time(eager, device)}
    except RuntimeError as err:  # out of memory for the explicit scores, a missing kernel
        return SpeedChoice("attention", "sdpa", note=f"the explicit path failed to run: {err}")
    return SpeedChoice("attention", pick(seconds, "sdpa", previous), seconds, "one layer, forward + backward")


def choose_fused_adamw(model: nn.Module, device: torch.device, requested: str = "auto",
                       previous: str | None = None) -> SpeedChoice:
    """``fused`` or ``foreach`` AdamW for ``model``'s parameters on ``device``."""
    if requested != "auto":
        return SpeedChoice("AdamW", requested, note="as configured")
    params, total = [], 0
    for p in model.parameters():
        if total + p.numel() > PROBE_ELEMENTS and params:
            break
        params.append(p.detach().clone().requires_grad_())
        total += p.numel()
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    seconds = {}
    try:
        for name in ("foreach", "fused"):
            optimizer = torch.optim.AdamW(params, lr=1e-4, **{name: True})
            seconds[name] = _best_time(optimizer.step, device)
    except (RuntimeError, TypeError) as err:  # no fused kernel for this device or dtype
        return SpeedChoice("AdamW", "foreach", note=f"fused AdamW is not available here: {err}")
    return SpeedChoice("AdamW", pick(seconds, "foreach", previous), seconds,
                       f"one step over {total / 1e6:.1f}M parameters")


def use_attention(model: nn.Module, backend: str) -> None:
    """Run every attention layer of ``model`` with ``backend`` (the saved config keeps its own setting)."""
    for module in model.modules():
        if isinstance(module, Attention):
            module.backend = backend


@dataclass(frozen=True)
class RunChoices:
    """What a run measured and chose at start-up; saved in its checkpoints so a resume keeps them."""

    precision: PrecisionChoice
    attention: SpeedChoice
    adamw: SpeedChoice

    def saved(self) -> dict[str, str]:
        """The choices as a checkpoint stores them."""
        return {"precision": self.precision.precision, "attention": self.attention.chosen,
                "adamw": self.adamw.chosen}


def make_choices(cfg: TrainConfig, model: Transformer, info: DistInfo, previous: dict[str, str]) -> RunChoices:
    """Measure and choose precision, attention kernel and AdamW kernel for this run; rank 0 decides for all.

    ``previous`` holds a resumed run's earlier choices (empty for a new run).
    """
    choices = None
    if info.is_main:
        t, model_cfg = cfg.train, model.config
        rows = t.batch_size // (t.grad_accum * info.world_size)  # sequences per micro-step and process
        d_ff = max(model_cfg.layer_config(i).d_ff for i in range(model_cfg.n_layers))  # pruned: per layer
        precision = resolve_precision(t.precision, info.device, d_model=model_cfg.d_model, d_ff=d_ff,
                                      rows=rows * t.seq_len, previous=previous.get("precision"))
        attention = SpeedChoice("attention", "sdpa", note="image model") if model_cfg.patch_size else \
            choose_attention(model, rows, t.seq_len, precision.precision, info.device, t.attention,
                             previous.get("attention"))
        adamw = SpeedChoice("AdamW", "foreach", note="sharded parameters") if t.fsdp else \
            choose_fused_adamw(model, info.device, cfg.optim.kernel, previous.get("adamw"))
        choices = RunChoices(precision, attention, adamw)
    return broadcast_object(choices, info)
