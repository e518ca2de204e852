"""``Linear``: ``nn.Linear`` whose few-row products on the CPU run with the kernel measured fastest.

Decoding multiplies one row (or a few) by every weight matrix. torch sends that to its BLAS as
a matrix product with few rows, which on some CPUs runs on one thread (half the memory
bandwidth of a 2-core machine) or with a poor blocking for so few rows. Two other forms of the
same product, both on the weight as it is (viewed, never copied), can be faster:

- "split": one ``bmm`` (k, N, in) x (k, in, out/k) over ``k`` slices of the output features (k =
  torch's threads), so each thread reads its own slice of the weight;
- "transposed": ``weight @ x.T`` (out, N), transposed back, so BLAS sees a tall product with
  the few rows as its narrow side.

Each output is the same dot product (the sums may round differently). Which is faster depends on
the machine, the dtype and the number of rows, so nothing is assumed: ``tune_linears(model)`` (run
when generation starts) times the three on the model's own weights, per dtype and row count, once
per process and thread count, and ``Linear.forward`` follows the table. Training, autograd and
accelerators always take ``F.linear``.
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F
from torch import nn

FEW_ROWS = 16  # products with at most this many rows may take another kernel; more rows go to BLAS's threaded gemm
BUCKETS = (1, 4, FEW_ROWS)  # a choice is made per bucket: 1 row, 2-4 rows, 5-FEW_ROWS rows (probed at its size)
PROBE_BYTES = 256 * 2**20  # time at most this many bytes of weights per pass (more than any L3 cache)
MIN_GAIN = 1.1  # another kernel must be this much faster to replace F.linear
KERNELS = ("linear", "split", "transposed")

# (dtype, rows bucket, threads) -> kernel name (one of KERNELS); filled by tune_linears
_CHOICES: dict[tuple[torch.dtype, int, int], str] = {}


def _bucket(rows: int) -> int:
    """The row count a choice is made for: the first of ``BUCKETS`` that holds ``rows`` (rows <= FEW_ROWS)."""
    return next(bucket for bucket in BUCKETS if rows <= bucket)


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


def transposed_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` as ``(weight @ x.T).T``.

    x (..., in), weight (out, in) in any layout; returns (..., out).
    """
    rows = x.reshape(-1, x.shape[-1])  # (N, in)
    y = torch.mm(weight, rows.t()).t().contiguous()  # (N, out) from (out, N)
    if bias is not None:
        y = y + bias
    return y.view(*x.shape[:-1], weight.shape[0])


def _product(kernel: str, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` computed by ``kernel`` (split: over as many slices as torch has threads)."""
    if kernel == "split":
        return split_linear(x, weight, bias, torch.get_num_threads())
    if kernel == "transposed":
        return transposed_linear(x, weight, bias)
    return F.linear(x, weight, bias)


class Linear(nn.Linear):
    """``nn.Linear`` (same parameters, names and initialization) with the measured few-row CPU kernel."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map x (..., in_features) to (..., out_features): F.linear, or the kernel measured faster for few rows."""
        if _CHOICES and x.device.type == "cpu" and not torch.is_grad_enabled():
            rows = x.numel() // max(x.shape[-1], 1)
            if rows <= FEW_ROWS:
                threads = torch.get_num_threads()
                kernel = _CHOICES.get((x.dtype, _bucket(rows), threads), "linear")
                if kernel == "transposed" or (kernel == "split" and self.out_features % threads == 0):
                    return _product(kernel, x, self.weight, self.bias)
        return F.linear(x, self.weight, self.bias)


def _pass_seconds(layers: list[Linear], rows: int, kernel: str, dtype: torch.dtype) -> float:
    """Seconds of one product of ``rows`` rows with every layer's weight by ``kernel``: best of 3 passes."""
    inputs = {n: torch.randn(rows, n, dtype=dtype) for n in {m.in_features for m in layers}}
    best = float("inf")
    for _ in range(4):  # the first pass warms up
        start = time.perf_counter()
        for m in layers:
            _product(kernel, inputs[m.in_features], m.weight, None)
        best = min(best, time.perf_counter() - start)
    return best


def tune_linears(model: nn.Module) -> dict[tuple[torch.dtype, int, int], str]:
    """Choose, once per dtype, row bucket and thread count, the kernel of ``model``'s few-row CPU ``Linear`` products.

    Times one pass over the model's own weights (up to ``PROBE_BYTES``) with ``F.linear``, the
    transposed product and (with 2 threads or more) the split one, at each of ``BUCKETS`` rows;
    the fastest other kernel is kept where it is ``MIN_GAIN`` times faster than
    ``F.linear``. Does nothing for a model on an accelerator or without ``Linear`` layers.
    Returns the whole table of choices: (dtype, rows, threads) -> kernel name.
    """
    threads = torch.get_num_threads()
    layers = [m for m in model.modules() if isinstance(m, Linear) and m.weight.device.type == "cpu"
              and m.weight.is_floating_point()]
    if not layers:
        return dict(_CHOICES)
    dtype = layers[0].weight.dtype
    if all((dtype, bucket, threads) in _CHOICES for bucket in BUCKETS):
        return dict(_CHOICES)  # measured already (the common case: every call after the first)
    divisible = [m for m in layers if m.out_features % threads == 0] if threads > 1 else []  # the split's
    candidates = ("transposed", "split") if divisible else ("transposed",)  # slices must be equal
    chosen, total = [], 0
    for m in sorted(divisible or layers, key=lambda m: -m.weight.numel()):
        if total >= PROBE_BYTES:
            break
        chosen.append(m)
        total += m.weight.numel() * m.weight.element_size()
    with torch.no_grad():
        for bucket in BUCKETS:
            plain = _pass_seconds(chosen, bucket, "linear", dtype)
            seconds = {kernel: _pass_seconds(chosen, bucket, kernel, dtype) for kernel in candidates}
            best = min(seconds, key=seconds.get)
            _CHOICES[dtype, bucket, threads] = best if plain >= MIN_GAIN * seconds[best] else "linear"
    return dict(_CHOICES)


def linear_choices() -> dict[tuple[torch.dtype, int, int], str]:
    """The choices made so far in this process: (dtype, rows bucket, threads) -> kernel name (``KERNELS``)."""
    return dict(_CHOICES)
