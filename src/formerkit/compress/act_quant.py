"""Activation outliers and simulated int8 activation quantisation (W8A8), as "Quantizable Transformers" measures them.

``activation_outliers`` reads each block's output (``hook_resid_post``) and reports its largest magnitude
(the infinity norm) and kurtosis: outliers that attention heads create to "do nothing" show up as a
few huge features, a large infinity norm and a kurtosis far above a Gaussian's 3.

``quantized_activations`` simulates per-tensor symmetric int8 quantisation of the input of every linear
layer inside the blocks: ``calibrate_activation_ranges`` records each input's largest magnitude over
calibration batches, and while the context is open each input is rounded to ``scale * round(x / scale)``
with ``scale = range / 127``. One outlier stretches the range and costs every other value its precision,
which is the quantisation gap the clipped softmax and gated attention set out to close.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import torch
from torch import nn

from formerkit.interp import run_with_cache

INT8_MAX = 127


def kurtosis(x: torch.Tensor) -> torch.Tensor:
    """Kurtosis ``E[(x - mean)^4] / var^2`` of x (..., d) over its last dim; returns (...,)."""
    centered = x - x.mean(dim=-1, keepdim=True)
    var = centered.pow(2).mean(dim=-1)
    return centered.pow(4).mean(dim=-1) / var.pow(2).clamp(min=torch.finfo(x.dtype).tiny)


@torch.no_grad()
def activation_outliers(model: nn.Module, batches: Iterable[torch.Tensor]) -> dict[str, float]:
    """Over the token-id batches (B, T): the largest |value| of any block's output (``max_inf_norm``) and the
    kurtosis over features averaged over tokens and layers (``mean_kurtosis``), and the largest per-layer
    mean kurtosis (``max_layer_kurtosis``)."""
    largest, kurt_sum, count = 0.0, None, 0
    for ids in batches:
        _, cache = run_with_cache(model, ids, names_filter=lambda name: name.endswith("hook_resid_post"))
        stacked = torch.stack([cache[name].float() for name in cache.keys()])  # (L, B, T, d_model)
        largest = max(largest, float(stacked.abs().max()))
        per_layer = kurtosis(stacked).flatten(1).sum(dim=1)  # (L,)
        kurt_sum = per_layer if kurt_sum is None else kurt_sum + per_layer
        count += ids.numel()
    if kurt_sum is None:
        raise ValueError("activation_outliers needs at least one batch")
    layer_means = kurt_sum / count
    return {"max_inf_norm": largest, "mean_kurtosis": float(layer_means.mean()),
            "max_layer_kurtosis": float(layer_means.max())}


def _block_linears(model: nn.Module) -> dict[str, nn.Module]:
    """The linear layers inside the model's blocks (full-precision, int8 or int4), by module name."""
    return {name: module for name, module in model.named_modules()
            if ".blocks." in f".{name}" and hasattr(module, "in_features") and hasattr(module, "out_features")}


@torch.no_grad()
def calibrate_activation_ranges(model: nn.Module, batches: Iterable[torch.Tensor]) -> dict[str, float]:
    """The largest |input| of every linear layer inside the blocks over the token-id batches, by module name."""
    ranges: dict[str, float] = {}
    handles = []
    for name, module in _block_linears(model).items():
        def record(_module, args, name=name) -> None:
            ranges[name] = max(ranges.get(name, 0.0), float(args[0].abs().max()))
        handles.append(module.register_forward_pre_hook(record))
    try:
        for ids in batches:
            model(ids)
    finally:
        for handle in handles:
            handle.remove()
    return ranges


def fake_quantize(x: torch.Tensor, value_range: float) -> torch.Tensor:
    """x rounded to the int8 grid of ``value_range``: ``scale * clamp(round(x / scale), -127, 127)``."""
    scale = max(value_range, torch.finfo(torch.float32).tiny) / INT8_MAX
    return (x / scale).round().clamp(-INT8_MAX, INT8_MAX) * scale


@contextmanager
def quantized_activations(model: nn.Module, ranges: dict[str, float]) -> Iterator[None]:
    """While open, every linear layer named in ``ranges`` sees its input fake-quantized to int8 on its range."""
    linears = _block_linears(model)
    unknown = sorted(set(ranges) - set(linears))
    if unknown:
        raise ValueError(f"no linear layer inside the blocks is named {unknown[0]!r}; calibrate this model")
    handles = [linears[name].register_forward_pre_hook(
        lambda _module, args, r=r: (fake_quantize(args[0], r), *args[1:])) for name, r in ranges.items()]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
