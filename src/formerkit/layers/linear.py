"""``Linear``: ``nn.Linear`` whose few-row products on the CPU may run split across threads, as measured fastest.

Decoding multiplies one row (or a few) by every weight matrix. torch sends that to its BLAS,
which on some CPUs runs a matrix-vector product on one thread: half the memory bandwidth of a
2-core machine. The same product as one batched product over ``k`` slices of the output
features, ``bmm`` (k, N, in) x (k, in, out/k), runs the slices on torch's threads; the weight is
only viewed, never copied, and each output is the same dot product.

Which is faster depends on the machine, the dtype and the number of rows, so nothing is
assumed: ``tune_linears(model)`` (run when generation starts) times both on the model's own
weights, per dtype and row count, once per process and thread count, and ``Linear.forward``
follows the table. Training, autograd and accelerators always take ``F.linear``.
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F
from torch import nn

FEW_ROWS = 16  # products with at most this many rows may be split; more rows go to BLAS's threaded gemm
PROBE_BYTES = 256 * 2**20  # time at most this many bytes of weights per pass (more than any L3 cache)
MIN_GAIN = 1.1  # the split must be this much faster to replace F.linear

# (dtype, rows bucket, threads) -> slices (1: F.linear); filled by tune_linears
_SPLITS: dict[tuple[torch.dtype, int, int], int] = {}


def _bucket(rows: int) -> int:
    """The row count a choice is made for: 1 (one sequence decoding) or FEW_ROWS (a small batch)."""
    return 1 if rows == 1 else FEW_ROWS


def split_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, slices: int) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` as one ``bmm`` over ``slices`` equal slices of the output features.

    x (..., in), weight (out, in) in any layout, out divisible by ``slices``; returns (..., out).
    """
    rows = x.reshape(-1, x.shape[-1])  # (N, in)
    n, out = rows.shape[0], weight.shape[0]
    parts = weight.unflatten(0, (slices, out // slices)).transpose(1, 2)  # (k, in, out/k), a view
    y = torch.bmm(rows.expand(slices, -1, -1), parts)  # (k, N, out/k)
    y = y.transpose(0, 1).reshape(n, out)  # (N, out)
    if bias is not None:
        y = y + bias
    return y.view(*x.shape[:-1], out)


class Linear(nn.Linear):
    """``nn.Linear`` (same parameters, names and initialization) with the measured few-row CPU kernel."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map x (..., in_features) to (..., out_features): F.linear, or its split form where measured faster."""
        if _SPLITS and x.device.type == "cpu" and not torch.is_grad_enabled():
            rows = x.numel() // max(x.shape[-1], 1)
            if rows <= FEW_ROWS:
                slices = _SPLITS.get((x.dtype, _bucket(rows), torch.get_num_threads()), 1)
                if slices > 1 and self.out_features % slices == 0:
                    return split_linear(x, self.weight, self.bias, slices)
        return F.linear(x, self.weight, self.bias)


def _pass_seconds(layers: list[Linear], rows: int, slices: int, dtype: torch.dtype) -> float:
    """Seconds of one product of ``rows`` rows with every layer's weight: best of 3 passes."""
    inputs = {n: torch.randn(rows, n, dtype=dtype) for n in {m.in_features for m in layers}}
    best = float("inf")
    for _ in range(4):  # the first pass warms up
        start = time.perf_counter()
        for m in layers:
            x = inputs[m.in_features]
            if slices > 1:
                split_linear(x, m.weight, None, slices)
            else:
                F.linear(x, m.weight)
        best = min(best, time.perf_counter() - start)
    return best


def tune_linears(model: nn.Module) -> dict[tuple[torch.dtype, int, int], int]:
    """Choose, once per dtype, row bucket and thread count, whether ``model``'s CPU ``Linear``s split their products.

    Times one pass over the model's own weights (up to ``PROBE_BYTES``) with ``F.linear`` and
    with ``split_linear`` over as many slices as torch has threads, at 1 row and at
    ``FEW_ROWS`` rows; the split is kept where it is ``MIN_GAIN`` times faster. Does nothing
    for a model on an accelerator, with one thread, or without ``Linear`` layers. Returns the
    whole table of choices: (dtype, rows, threads) -> slices (1: ``F.linear``).
    """
    threads = torch.get_num_threads()
    first = next(model.parameters(), None)
    if first is not None and all((first.dtype, bucket, threads) in _SPLITS for bucket in (1, FEW_ROWS)):
        return dict(_SPLITS)  # measured already (the common case: every call after the first)
    layers = [m for m in model.modules() if isinstance(m, Linear) and m.weight.device.type == "cpu"
              and m.weight.is_floating_point() and m.out_features % threads == 0]
    if threads < 2 or not layers:
        return dict(_SPLITS)
    dtype = layers[0].weight.dtype
    if all((dtype, bucket, threads) in _SPLITS for bucket in (1, FEW_ROWS)):
        return dict(_SPLITS)
    chosen, total = [], 0
    for m in sorted(layers, key=lambda m: -m.weight.numel()):
        if total >= PROBE_BYTES:
            break
        chosen.append(m)
        total += m.weight.numel() * m.weight.element_size()
    with torch.no_grad():
        for bucket in (1, FEW_ROWS):
            plain = _pass_seconds(chosen, bucket, 1, dtype)
            split = _pass_seconds(chosen, bucket, threads, dtype)
            _SPLITS[dtype, bucket, threads] = threads if plain >= MIN_GAIN * split else 1
    return dict(_SPLITS)


def linear_choices() -> dict[tuple[torch.dtype, int, int], int]:
    """The choices made so far in this process: (dtype, rows bucket, threads) -> slices (1: ``F.linear``)."""
    return dict(_SPLITS)
