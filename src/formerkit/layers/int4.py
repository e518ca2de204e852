"""Weight-only int4 quantization as a layer: every ``nn.Linear`` of a model can become an ``Int4Linear``.

Each weight row is cut into groups of ``group_size`` (32, 64 or 128) consecutive input
features; each group gets its own float scale and is stored as 4-bit codes ``q`` in 0..15:

    w ~ (q - zero) * scale

Asymmetric (the default): ``scale = (max(w, 0) - min(w, 0)) / 15`` over the group and an
integer zero point ``zero = round(-min / scale)`` in 0..15. Symmetric: ``scale = max|w| / 7``
and ``zero = 8`` for every group (not stored). Codes are rounded to nearest, so every weight is
within ``scale / 2`` of its dequantized value. An ``in_features`` that is not a multiple of the
group size is refused (InputError naming the group sizes that divide it); nothing is padded.

The state_dict is portable, independent of any kernel: ``qweight`` (uint8, (out, in / 2), two
codes per byte, the even input feature in the low nibble), ``scale`` (float32, (out, groups)),
``zero`` (uint8, (out, groups); asymmetric only) and ``bias`` (float, kept as it was).
``Int4Linear`` keeps the attribute name of the layer it replaces, so hook points are unchanged.

On CPU, bfloat16 inputs of at most ``PACK_MAX_ROWS`` rows run through PyTorch's int4 kernel
``aten._weight_int4pack_mm_for_cpu`` (it computes ``(q - 8) * s + z`` per group, so the zero
point becomes ``z = (8 - zero) * scale``); its packed weight is made on first use and kept
beside the portable one (a second copy of half a byte per weight). Float32 inputs do not take
it (it has no fast float32 path: slower than dequantizing, measured), nor do inputs needing
gradients, out_features not a multiple of 16, or other devices: those dequantize the weight
block by block and multiply, in float32 on CPU (faster than a bfloat16 GEMM there, measured)
and in the input's dtype elsewhere.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from formerkit.errors import InputError
from formerkit.layers.quantized import CHUNK_ELEMENTS, input_rows, swap_linears

GROUP_SIZES = (32, 64, 128)
PACK_MAX_ROWS = 128  # above this many bf16 rows, dequantize + a float32 GEMM beats the int4 kernel (measured)
_PACK_OUT_ALIGN = 16  # the kernel's packing needs out_features % 16 == 0
_SYMMETRIC_ZERO = 8
_HAS_KERNEL = hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu")  # torch builds without it take the fallback


def check_group_size(in_features: int, group_size: int) -> None:
    """Raise InputError unless ``group_size`` is one of GROUP_SIZES and divides ``in_features``."""
    if group_size not in GROUP_SIZES:
        raise InputError(f"int4 group size must be one of {', '.join(map(str, GROUP_SIZES))}, got {group_size}")
    if in_features % group_size:
        fits = [g for g in GROUP_SIZES if in_features % g == 0]
        hint = f"use group size {' or '.join(map(str, fits))}" if fits else \
            "no int4 group size divides it: keep this layer in float or use int8"
        raise InputError(f"int4 quantization does not pad: in_features {in_features} is not a multiple of the "
                         f"group size {group_size}; {hint}")


def quantize_weight_int4(weight: torch.Tensor, group_size: int = 64, *, symmetric: bool = False
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Quantize a float weight (out, in) group-wise to 4 bits; return (codes, scale, zero).

    codes: uint8 (out, in) in 0..15, one code per byte (``pack_nibbles`` halves it);
    scale: float32 (out, in / group_size); zero: uint8 (out, in / group_size), all 8 when
    ``symmetric``. w ~ (codes - zero) * scale per group. A group of zeros gets scale 0.
    """
    if weight.dim() != 2 or not weight.is_floating_point():
        raise InputError(f"quantize_weight_int4 expects a float matrix (out, in), got {weight.dtype} "
                         f"{tuple(weight.shape)}")
    out, n_in = weight.shape
    check_group_size(n_in, group_size)
    w = weight.detach().float().reshape(out, n_in // group_size, group_size)  # (out, G, g)
    if symmetric:
        scale = w.abs().amax(dim=2) / 7  # (out, G)
        zero = torch.full_like(scale, _SYMMETRIC_ZERO)
    else:
        low, high = w.amin(dim=2).clamp(max=0), w.amax(dim=2).clamp(min=0)  # (out, G): the range holds 0
        scale = (high - low) / 15
        zero = torch.round(-low / torch.where(scale > 0, scale, torch.ones_like(scale))).clamp(0, 15)
    divisor = torch.where(scale > 0, scale, torch.ones_like(scale))[..., None]  # (out, G, 1)
    codes = (torch.round(w / divisor) + zero[..., None]).clamp(0, 15)  # (out, G, g)
    return codes.reshape(out, n_in).to(torch.uint8), scale, zero.to(torch.uint8)


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """uint8 codes (out, in) in 0..15 -> uint8 (out, in / 2): feature 2j in the low nibble, 2j+1 in the high."""
    return codes[:, 0::2] | (codes[:, 1::2] << 4)


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """uint8 (out, in / 2) of ``pack_nibbles`` -> uint8 codes (out, in)."""
    return torch.stack([packed & 15, packed >> 4], dim=-1).flatten(1)  # (out, in/2, 2) -> (out, in)


class Int4Linear(nn.Module):
    """A linear layer with group-wise int4 weights: y = x @ ((q - zero) * scale)^T + bias."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, group_size: int = 64,
                 symmetric: bool = False, device: torch.device | None = None) -> None:
        super().__init__()
        check_group_size(in_features, group_size)
        self.in_features, self.out_features = in_features, out_features
        self.group_size, self.symmetric = group_size, symmetric
        groups = in_features // group_size
        self.register_buffer("qweight", torch.zeros(out_features, in_features // 2, dtype=torch.uint8, device=device))
        self.register_buffer("scale", torch.zeros(out_features, groups, dtype=torch.float32, device=device))
        if not symmetric:
            self.register_buffer("zero", torch.zeros(out_features, groups, dtype=torch.uint8, device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, device=device)) if bias else None
        self._packed: tuple[tuple, torch.Tensor, torch.Tensor] | None = None  # (key, kernel weight, scales+zeros)

    @classmethod
    def from_linear(cls, linear: nn.Linear, group_size: int = 64, *, symmetric: bool = False) -> Int4Linear:
        """An Int4Linear holding the quantized weight of ``linear`` and sharing its bias.

        A layer on the meta device has no values to quantize: its int4 copy only takes the shapes.
        Raises InputError when ``group_size`` is not allowed or does not divide in_features.
        """
        layer = cls(linear.in_features, linear.out_features, bias=False, group_size=group_size,
                    symmetric=symmetric, device=linear.weight.device)
        if not linear.weight.is_meta:
            codes, layer.scale, zero = quantize_weight_int4(linear.weight, group_size, symmetric=symmetric)
            layer.qweight = pack_nibbles(codes)
            if not symmetric:
                layer.zero = zero
        layer.bias = linear.bias
        return layer

    def _zero(self) -> torch.Tensor:
        """The zero points (out, groups) as float32."""
        if self.symmetric:
            return torch.full_like(self.scale, _SYMMETRIC_ZERO, dtype=torch.float32)
        return self.zero.float()

    def _dequantize_rows(self, block: slice, dtype: torch.dtype) -> torch.Tensor:
        """Weight rows ``block`` (rows, in) in ``dtype``: (codes - zero) * scale per group."""
        codes = unpack_nibbles(self.qweight[block]).to(dtype)  # (rows, in)
        rows = codes.shape[0]
        groups = codes.view(rows, -1, self.group_size)  # (rows, G, g)
        scale = self.scale[block].to(dtype)[..., None]  # (rows, G, 1)
        zero = self._zero()[block].to(dtype)[..., None]  # (rows, G, 1)
        return ((groups - zero) * scale).view(rows, self.in_features)

    def dequantize(self) -> torch.Tensor:
        """The float32 weight (out, in) this layer computes with: (codes - zero) * scale per group."""
        return self._dequantize_rows(slice(None), torch.float32)

    def _use_kernel(self, rows: torch.Tensor) -> bool:
        """Whether rows (N, in) go through the int4 CPU kernel: few bf16 CPU rows, no grad, out % 16 == 0."""
        return (_HAS_KERNEL and rows.device.type == "cpu" and rows.dtype == torch.bfloat16
                and rows.shape[0] <= PACK_MAX_ROWS and not rows.requires_grad
                and self.out_features % _PACK_OUT_ALIGN == 0 and self.qweight.device.type == "cpu")

    def _kernel_weights(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """The kernel's packed weight and scales-and-zeros (G, out, 2) in ``dtype``, made once per weight."""
        key = (self.qweight.data_ptr(), self.qweight._version, self.scale.data_ptr(), self.scale._version, dtype)
        if self._packed is None or self._packed[0] != key:
            codes = unpack_nibbles(self.qweight).to(torch.int32)  # (out, in)
            packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 2)
            scale = self.scale.float()  # (out, G)
            offset = (_SYMMETRIC_ZERO - self._zero()) * scale  # (out, G): the kernel computes (q - 8) * s + z
            scale_zeros = torch.stack([scale, offset], dim=-1).transpose(0, 1).contiguous().to(dtype)  # (G, out, 2)
            self._packed = (key, packed, scale_zeros)
        return self._packed[1], self._packed[2]

    def _dequantized_matmul(self, rows: torch.Tensor) -> torch.Tensor:
        """rows (N, in) -> (N, out) with bias: dequantize blocks of weight rows and multiply.

        On CPU the product runs in float32 and is cast back; elsewhere in the input's dtype.
        """
        dtype = torch.float32 if rows.device.type == "cpu" else rows.dtype
        x = rows.to(dtype)
        step = max(1, CHUNK_ELEMENTS // self.in_features)
        parts = []
        for start in range(0, self.out_features, step):
            block = slice(start, start + step)
            bias = None if self.bias is None else self.bias[block].to(dtype)
            parts.append(F.linear(x, self._dequantize_rows(block, dtype), bias))  # (N, step)
        out = parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)
        return out.to(rows.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map x (..., in_features) of a float dtype to (..., out_features) in the same dtype."""
        rows = input_rows(x, self.in_features, "Int4Linear")  # (N, in)
        if self._use_kernel(rows):
            packed, scale_zeros = self._kernel_weights(rows.dtype)
            out = torch.ops.aten._weight_int4pack_mm_for_cpu(rows, packed, self.group_size, scale_zeros)  # (N, out)
            if self.bias is not None:
                out = out + self.bias.to(out.dtype)
        else:
            out = self._dequantized_matmul(rows)  # (N, out)
        return out.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        """Sizes and quantization settings shown in the module's repr."""
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"group_size={self.group_size}, symmetric={self.symmetric}")


def quantize_int4(model: nn.Module, group_size: int = 64, *, symmetric: bool = False,
                  quantize_tied_head: bool = True) -> nn.Module:
    """Replace every ``nn.Linear`` of ``model`` in place by an ``Int4Linear``; return the model.

    Groups of ``group_size`` input features (32, 64 or 128) share a scale (and a zero point
    unless ``symmetric``). Embedding tables stay float; a tied LM head gets its own int4 copy
    when ``quantize_tied_head`` (the default), else stays float and tied. Every layer is
    checked first: an in_features the group size does not divide raises InputError naming the
    layer, and the model is left unchanged.
    """
    if not isinstance(model, nn.Module):
        raise InputError(f"quantize_int4 takes a torch.nn.Module, got {type(model).__name__}")
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            try:
                check_group_size(module.in_features, group_size)
            except InputError as err:
                raise InputError(f"layer {name!r}: {err}") from None
    return swap_linears(model, lambda linear: Int4Linear.from_linear(linear, group_size, symmetric=symmetric),
                        quantize_tied_head=quantize_tied_head)
