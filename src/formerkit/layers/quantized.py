"""Weight-only int8 quantization as a layer: every ``nn.Linear`` of a model can become an ``Int8Linear``.

Each weight row (output channel) is stored as int8 with one float scale,
``scale = max|w_row| / 127`` and ``w_int8 = round(w / scale)`` (symmetric, no zero point);
activations stay in the model's float dtype. ``Int8Linear`` keeps the attribute name of the
layer it replaces, so parameter names and hook points are unchanged; its state_dict holds
``weight`` (int8, (out, in)), ``scale`` (float32, (out,)) and ``bias`` (float).

The token embedding table stays float. When the LM head is tied to it, ``quantize_int8``
gives the head its own int8 copy by default (decoding runs the head on every token, so it
gets the speed-up too, at the cost of an extra vocab x d_model bytes); pass
``quantize_tied_head=False`` to leave the tied head in float instead.

On CPU, bfloat16 inputs of at most ``PACK_MAX_ROWS`` rows (decoding, speculative
verification) run through PyTorch's fused int8 kernel ``torch._weight_int8pack_mm``; every
other input dequantizes the weight on the fly, one block of output rows at a time, and calls
``F.linear`` in the input's dtype (the fused kernel has no fast float32 path).

Saving and loading quantized checkpoints is ``formerkit.checkpoints.quantized``'s job.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from formerkit.errors import InputError

PACK_MAX_ROWS = 8  # above this many rows, dequantize + a float GEMM beats the fused kernel (measured)
CHUNK_ELEMENTS = 1 << 21  # weight elements dequantized at once (an 8 MB float32 block)
_PACK_ALIGN = 16  # the fused kernel reads 16 values at a time with aligned loads and no remainder loop


def quantize_weight(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize a float weight (out, in) per output channel; return int8 weights (out, in) and scales (out,).

    scale = max|w_row| / 127 (float32); w_int8 = round(w / scale), so w ~ w_int8 * scale.
    A row of zeros gets scale 0 and int8 zeros. The int8 weights are contiguous (out, in)
    whatever the layout of ``weight`` (a transposed, file-mapped one included).
    """
    if weight.dim() != 2 or not weight.is_floating_point():
        raise InputError(f"quantize_weight expects a float matrix (out, in), got {weight.dtype} {tuple(weight.shape)}")
    w = weight.detach().float().contiguous()  # (out, in)
    scale = w.abs().amax(dim=1) / 127  # (out,)
    divisor = torch.where(scale > 0, scale, torch.ones_like(scale))  # (out,)
    q = torch.round(w / divisor[:, None]).clamp(-127, 127).to(torch.int8)  # (out, in)
    return q, scale


def input_rows(x: object, in_features: int, layer: str) -> torch.Tensor:
    """A quantized layer's input x (..., in_features) as contiguous rows (N, in_features), checked first.

    InputError naming ``layer`` for a non-float input or a wrong last dimension.
    """
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        kind = x.dtype if isinstance(x, torch.Tensor) else type(x).__name__
        raise InputError(f"{layer} takes floating-point activations, got {kind}")
    if x.shape[-1] != in_features:
        raise InputError(f"{layer} expects inputs with {in_features} features in the last dimension, "
                         f"got shape {tuple(x.shape)}")
    return x.reshape(-1, in_features).contiguous()


class Int8Linear(nn.Module):
    """A linear layer with int8 weights and per-output-channel scales: y = (x @ W_int8^T) * scale + bias."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 device: torch.device | None = None) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("scale", torch.zeros(out_features, dtype=torch.float32, device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, device=device)) if bias else None

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> Int8Linear:
        """An Int8Linear holding the quantized weight of ``linear`` and sharing its bias.

        A layer on the meta device has no values to quantize: its int8 copy only takes the shapes.
        """
        layer = cls(linear.in_features, linear.out_features, bias=False, device=linear.weight.device)
        if not linear.weight.is_meta:
            layer.weight, layer.scale = quantize_weight(linear.weight)
        layer.bias = linear.bias
        return layer

    def dequantize(self) -> torch.Tensor:
        """The float32 weight (out, in) this layer computes with: weight * scale per row."""
        return self.weight.float() * self.scale.float()[:, None]

    def _use_fused_kernel(self, rows: torch.Tensor) -> bool:
        """Whether rows (N, in) can go through ``torch._weight_int8pack_mm``: few bf16 CPU rows, aligned.

        Its vector loads need in_features % 16 == 0 and aligned buffers; it has no autograd formula.
        """
        return (rows.device.type == "cpu" and rows.dtype == torch.bfloat16 and rows.shape[0] <= PACK_MAX_ROWS
                and not rows.requires_grad and self.in_features % _PACK_ALIGN == 0
                and rows.data_ptr() % 64 == 0 and self.weight.data_ptr() % 64 == 0)

    def _dequantized_matmul(self, rows: torch.Tensor) -> torch.Tensor:
        """rows (N, in) -> (N, out) with bias: dequantize blocks of weight rows to the input dtype and multiply."""
        step = max(1, CHUNK_ELEMENTS // self.in_features)
        parts = []
        for start in range(0, self.out_features, step):
            block = slice(start, start + step)
            y = F.linear(rows, self.weight[block].to(rows.dtype))  # (N, step)
            scale = self.scale[block].to(rows.dtype)  # (step,)
            parts.append(y * scale if self.bias is None else torch.addcmul(self.bias[block].to(rows.dtype), y, scale))
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map x (..., in_features) of a float dtype to (..., out_features) in the same dtype."""
        rows = input_rows(x, self.in_features, "Int8Linear")  # (N, in)
        if self._use_fused_kernel(rows):
            out = torch._weight_int8pack_mm(rows, self.weight, self.scale.to(rows.dtype))  # (N, out)
            if self.bias is not None:
                out = out + self.bias.to(out.dtype)
        else:
            out = self._dequantized_matmul(rows)  # (N, out)
        return out.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        """Sizes shown in the module's repr."""
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def swap_linears(model: nn.Module, convert: Callable[[nn.Linear], nn.Module], *,
                 quantize_tied_head: bool = True) -> nn.Module:
    """Replace every ``nn.Linear`` of ``model`` in place by ``convert(linear)``; return the model.

    A linear layer whose weight is an embedding table (a tied LM head) is converted too when
    ``quantize_tied_head``, else left as it is. A layer reused in several places becomes one
    converted module. Module names are unchanged.
    """
    embedded = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}  # tied: the same Parameter
    swapped: dict[int, nn.Module] = {}
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if not isinstance(child, nn.Linear):
                continue
            if id(child.weight) in embedded and not quantize_tied_head:
                continue
            if id(child) not in swapped:
                swapped[id(child)] = convert(child)
            setattr(parent, name, swapped[id(child)])
    return model


def quantize_int8(model: nn.Module, *, quantize_tied_head: bool = True) -> nn.Module:
    """Replace every ``nn.Linear`` of ``model`` in place by an ``Int8Linear``; return the model.

    Embedding tables stay float. A linear layer whose weight is an embedding table (a tied LM
    head) gets its own int8 copy when ``quantize_tied_head`` (the default), else stays float
    and tied. Module names, and so hook points and state_dict names, are unchanged.
    """
    if not isinstance(model, nn.Module):
        raise InputError(f"quantize_int8 takes a torch.nn.Module, got {type(model).__name__}")
    return swap_linears(model, Int8Linear.from_linear, quantize_tied_head=quantize_tied_head)
