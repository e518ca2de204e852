"""Numeric precision: what each name means, whether a device supports it, and ``auto`` chosen by measurement.

Whether bf16 beats fp32 depends on the processor, not on the library: on a CPU with AVX-512 BF16 or
AMX a bf16 matrix product runs about twice as fast as fp32, on one with AVX-512 but no BF16
instructions at about half the speed, and on an AVX2-only CPU it can be 50-100x slower (a scalar
fallback). So ``precision="auto"`` measures, at start-up, the work that dominates this model (its
feed-forward matrix products at its own ``d_model`` and ``d_ff``) in each candidate precision on
this device, and picks the fastest.

Each candidate's probe grows its row count 4x at a time from 16 and stops before the next size
would overrun its share of the time budget (a quarter of a second in all by default), so a
precision that is 100x slower is found out after a few small products instead of stalling
start-up, and a fast one is measured at sizes where its kernels reach full speed. The decision
compares time per row at the largest size each reached, taking at every size the fastest of
three calls (a busy machine only ever adds time). On a CPU the probe runs on one thread: the
ratio between the precisions is a property of each core's kernels, and one thread does not stall
at parallel-region barriers when other processes hold the cores. A candidate must be at least ``MARGIN`` faster
than fp32 to be chosen (lower precision costs accuracy; a near tie is not worth it). A probe
that fails (an operation missing on the device) falls back to fp32 with a warning.
"""

from __future__ import annotations

import contextlib
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from formerkit.errors import ConfigError, FormerkitWarning, did_you_mean

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
MARGIN = 1.1  # a lower precision must be this much faster than fp32 to be chosen
STICKY = 1.5  # a resumed run keeps its earlier choice unless it is this much slower than the best
BUDGET_S = 0.25  # wall-clock time the probe may spend (it usually needs much less)
FIRST_ROWS = 16
REPEATS = 3  # calls per size; the fastest counts
MAX_TRAIN_ROWS = 512  # enough rows for the matmul kernels to reach their steady speed


@dataclass(frozen=True)
class PrecisionChoice:
    """The precision a run uses, and why.

    ``measured`` holds, per candidate, the row count the probe reached and its best time there
    (seconds); empty when the precision was given explicitly.
    """

    precision: str
    requested: str
    device: str
    measured: dict[str, tuple[int, float]] = field(default_factory=dict)
    workload: str = ""
    note: str = ""

    @property
    def dtype(self) -> torch.dtype:
        """The torch dtype of the chosen precision."""
        return DTYPES[self.precision]

    def describe(self) -> str:
        """One line: the precision and, for ``auto``, the measurements behind it."""
        if self.requested != "auto":
            return f"precision {self.precision} (as configured){self.note}"
        if not self.measured:
            return f"precision {self.precision} (auto{self.note})"
        per_row = {name: seconds / rows for name, (rows, seconds) in self.measured.items()}
        fastest = min(per_row.values())
        parts = ", ".join(f"{name} {seconds * 1e3:.2f} ms for {rows} rows ({per_row[name] / fastest:.2f}x per row)"
                          for name, (rows, seconds) in self.measured.items())
        return f"precision {self.precision} (auto: measured on {self.device}, {self.workload}: {parts}){self.note}"


def check_precision(precision: str, device: torch.device | str) -> None:
    """Raise ConfigError unless ``precision`` is a known name that ``device`` can run."""
    if precision not in PRECISIONS:
        raise ConfigError(f"precision {precision!r} is not one of {', '.join(PRECISIONS)}"
                          f"{did_you_mean(str(precision), PRECISIONS)}")
    device = torch.device(device)
    if device.type == "cuda" and precision == "bf16" and not torch.cuda.is_bf16_supported():
        name = torch.cuda.get_device_name(device)
        raise ConfigError(f"precision bf16 is not supported on {device} ({name}); use fp16 or fp32, or auto")


def candidates(device: torch.device) -> list[str]:
    """The precisions ``auto`` measures on ``device``: fp32 and bf16 on a CPU, plus fp16 on CUDA."""
    if device.type == "cuda":
        return ["fp32"] + (["bf16"] if torch.cuda.is_bf16_supported() else []) + ["fp16"]
    return ["fp32", "bf16"]


def _autocast(device: torch.device, precision: str):
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=DTYPES[precision])


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _TrainingProbe:
    """Forward and backward through the model's feed-forward pair (d_model -> d_ff -> d_model) under autocast."""

    workload = "feed-forward forward+backward"

    def __init__(self, d_model: int, d_ff: int, device: torch.device) -> None:
        generator = torch.Generator().manual_seed(0)
        self.w_in = (torch.randn(d_ff, d_model, generator=generator) / d_model**0.5).to(device).requires_grad_()
        self.w_out = (torch.randn(d_model, d_ff, generator=generator) / d_ff**0.5).to(device).requires_grad_()
        self.d_model, self.device = d_model, device

    def __call__(self, precision: str, rows: int) -> None:
        x = torch.randn(rows, self.d_model, device=self.device)  # (N, d_model)
        with _autocast(self.device, precision):
            y = F.linear(F.gelu(F.linear(x, self.w_in)), self.w_out)  # (N, d_model)
        y.float().square().mean().backward()
        self.w_in.grad = self.w_out.grad = None


class _InferenceProbe:
    """A forward through the model's feed-forward pair with weights stored in the candidate precision."""

    workload = "feed-forward forward"

    def __init__(self, d_model: int, d_ff: int, device: torch.device) -> None:
        generator = torch.Generator().manual_seed(0)
        self.fp32 = (torch.randn(d_ff, d_model, generator=generator).to(device) / d_model**0.5,
                     torch.randn(d_model, d_ff, generator=generator).to(device) / d_ff**0.5)
        self.weights: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.d_model, self.device = d_model, device

    def __call__(self, precision: str, rows: int) -> None:
        if precision not in self.weights:
            self.weights[precision] = tuple(w.to(DTYPES[precision]) for w in self.fp32)
        w_in, w_out = self.weights[precision]
        x = torch.randn(rows, self.d_model, device=self.device, dtype=DTYPES[precision])  # (N, d_model)
        with torch.no_grad():
            F.linear(F.gelu(F.linear(x, w_in)), w_out)  # (N, d_model)


def _time(probe: Callable[[str, int], None], precision: str, rows: int, device: torch.device) -> float:
    """Seconds for one call of the probe."""
    _synchronize(device)
    start = time.perf_counter()
    probe(precision, rows)
    _synchronize(device)
    return time.perf_counter() - start


def _best_of(probe: Callable[[str, int], None], name: str, rows: int, device: torch.device) -> float:
    return min(_time(probe, name, rows, device) for _ in range(REPEATS))


def measure(probe: Callable[[str, int], None], names: list[str], rows: int, device: torch.device,
            budget_s: float = BUDGET_S) -> dict[str, tuple[int, float]]:
    """Time ``probe`` for each precision in ``names`` at growing row counts up to ``rows``, within ``budget_s``.

    Each candidate gets an equal share of the budget and grows 4x at a time from ``FIRST_ROWS``
    while the next size fits its share; at each size it is timed ``REPEATS`` times and the
    fastest call counts (other processes only ever add time). Returns {name: (rows reached,
    best seconds there)}; candidates that fail are left out with a warning. Raises
    RuntimeError when the probe fails for fp32 itself.
    """
    first = min(FIRST_ROWS, rows)
    working: list[str] = []
    for name in names:  # warm up (kernel creation) at the smallest size; drop what fails
        try:
            probe(name, first)
            working.append(name)
        except (RuntimeError, NotImplementedError) as err:
            if name == "fp32":
                raise
            warnings.warn(f"precision probe: {name} failed on {device} ({err}); not considered", FormerkitWarning,
                          stacklevel=3)
    share = budget_s / len(working)
    out = {}
    for name in working:
        started, size = time.perf_counter(), first
        while True:
            seconds = _best_of(probe, name, size, device)
            out[name] = (size, seconds)
            spent = time.perf_counter() - started
            if size >= rows or spent + REPEATS * 4 * seconds > share:  # the next size would overrun the share
                break
            size = min(rows, size * 4)
    return out


def resolve_precision(requested: str, device: torch.device | str, *, d_model: int, d_ff: int, rows: int,
                      training: bool = True, budget_s: float = BUDGET_S,
                      previous: str | None = None) -> PrecisionChoice:
    """The precision to run with: ``requested`` itself, or for ``"auto"`` the fastest measured on ``device``.

    ``d_model``/``d_ff`` give the model's feed-forward shape and ``rows`` the tokens one step
    processes (training: batch x sequence length, capped at 512 for the probe; inference: the
    batch of a decode step). ``training`` probes forward + backward under autocast; otherwise a
    forward with weights stored in the candidate dtype (how generation runs). ``previous`` (a
    resumed run's earlier choice) is kept unless it measures ``STICKY`` times slower than the best.
    Returns a ``PrecisionChoice`` whose ``describe()`` is the line to log.
    """
    device = torch.device(device)
    check_precision(requested, device)
    if requested != "auto":
        return PrecisionChoice(requested, requested, str(device))
    names = candidates(device)
    rows = max(1, min(rows, MAX_TRAIN_ROWS) if training else rows)
    probe_cls = _TrainingProbe if training else _InferenceProbe
    threads = torch.get_num_threads()
    try:
        if device.type == "cpu":  # one thread: a busy machine stalls parallel regions, not single-core kernels
            torch.set_num_threads(1)
        probe = probe_cls(d_model, d_ff, device)
        measured = measure(probe, names, rows, device, budget_s)
    except (RuntimeError, NotImplementedError) as err:
        warnings.warn(f"the precision probe failed on {device} ({err}); using fp32", FormerkitWarning, stacklevel=2)
        return PrecisionChoice("fp32", "auto", str(device), note=f"; the probe failed: {err}")
    finally:
        torch.set_num_threads(threads)
    return choose(measured, str(device), probe_cls.workload, previous)


def choose(measured: dict[str, tuple[int, float]], device: str, workload: str,
           previous: str | None = None) -> PrecisionChoice:
    """Pick from {name: (rows, seconds)}: the least time per row, unless it beats fp32's by less than ``MARGIN``.

    A ``previous`` choice among the candidates stays unless it is ``STICKY`` times slower than the fastest.
    """
    per_row = {name: seconds / rows for name, (rows, seconds) in measured.items()}
    fastest = min(per_row, key=per_row.get)
    if previous in per_row and per_row[previous] <= STICKY * per_row[fastest]:
        return PrecisionChoice(previous, "auto", device, measured, workload, note="; kept from the run's start")
    if fastest == "fp16" and "bf16" in per_row and per_row["bf16"] <= MARGIN * per_row["fp16"]:
        fastest = "bf16"  # near a tie, bf16: fp32's range, no loss scaling
    chosen = fastest if per_row["fp32"] >= MARGIN * per_row[fastest] else "fp32"
    return PrecisionChoice(chosen, "auto", device, measured, workload)
