"""LoRA adapters on formerkit's linear layers: ``y = W x + b + (alpha / r) * B(A(dropout(x)))``.

A ``LoraLinear`` wraps one linear layer (``Linear`` or a frozen ``Int8Linear``) and carries any
number of ``LoraAdapter``s, each acting on one contiguous range of the layer's output rows. So
LoRA on q and v of formerkit's fused ``attn.qkv`` projection is two adapters on the q and the
v rows of one layer, and LoRA on the whole fused projection is one adapter on every row.

Targets are named per block, the same in every family:

==========  ==============================  =====================================
target      layer                           rows
==========  ==============================  =====================================
q, k, v     ``attn.qkv``                    the q, k or v part (GQA: k, v narrower)
qkv         ``attn.qkv``                    all
out         ``attn.out``                    all
fc_in       ``mlp.fc_in``                   all
fc_gate     ``mlp.fc_gate`` (gated MLPs)    all
fc_out      ``mlp.fc_out``                  all
cross_q     ``cross_attn.q`` (decoders of   all
            encoder-decoders)
cross_k/v   ``cross_attn.kv``               the k or v part
cross_kv    ``cross_attn.kv``               all
cross_out   ``cross_attn.out``              all
==========  ==============================  =====================================

``"all-linear"`` targets every linear layer of every block (not the heads), one adapter per
layer of the family's Hugging Face layout (q, k and v apart, except GPT-2's fused ``c_attn``).
Writing and reading peft's files is ``formerkit.compress.lora_format``'s job.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import torch
from torch import nn

from formerkit.checkpoints.hf_families import family_of
from formerkit.checkpoints.hf_maps import expand
from formerkit.errors import ConfigError, InputError
from formerkit.layers.attention import Attention
from formerkit.layers.block import Block
from formerkit.layers.quantized import Int8Linear

ALL_LINEAR = "all-linear"
# target -> (layer within a block, part of its rows: None for all, else (part, parts) of the fused q|k|v or k|v)
TARGETS: dict[str, tuple[str, tuple[int, int] | None]] = {
    "q": ("attn.qkv", (0, 3)), "k": ("attn.qkv", (1, 3)), "v": ("attn.qkv", (2, 3)), "qkv": ("attn.qkv", None),
    "out": ("attn.out", None), "fc_in": ("mlp.fc_in", None), "fc_gate": ("mlp.fc_gate", None),
    "fc_out": ("mlp.fc_out", None),
    "cross_q": ("cross_attn.q", None), "cross_k": ("cross_attn.kv", (0, 2)), "cross_v": ("cross_attn.kv", (1, 2)),
    "cross_kv": ("cross_attn.kv", None), "cross_out": ("cross_attn.out", None),
}
PART_NAMES = {3: ("q", "k", "v"), 2: ("k", "v")}


class LoraFactor(nn.Module):
    """One low-rank factor: a bare ``weight`` Parameter (not an ``nn.Linear``, so quantizers leave it alone)."""

    def __init__(self, out_features: int, in_features: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(out_features, in_features))


class LoraAdapter(nn.Module):
    """``scale * B A`` on rows ``start:stop`` of a layer's output: A (r, in), B (stop - start, r).

    A starts as peft's (kaiming-uniform with a = sqrt(5), nn.Linear's default), B as zeros, so a
    new adapter changes nothing. ``scale`` is ``alpha / r``.
    """

    def __init__(self, in_features: int, start: int, stop: int, r: int, alpha: float) -> None:
        super().__init__()
        if r < 1:
            raise InputError(f"LoRA rank r must be at least 1, got {r}")
        self.start, self.stop, self.r, self.alpha = start, stop, r, float(alpha)
        self.lora_A = LoraFactor(r, in_features)
        self.lora_B = LoraFactor(stop - start, r)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))

    @property
    def scale(self) -> float:
        """The factor ``alpha / r`` the product B A is multiplied by."""
        return self.alpha / self.r

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        """The adapter's output for x (..., in): (..., stop - start), in the adapter's dtype."""
        x = x.to(self.lora_A.weight.dtype)
        return (x @ self.lora_A.weight.t() @ self.lora_B.weight.t()) * self.scale

    def delta_weight(self) -> torch.Tensor:
        """The change it makes to the layer's weight rows: scale * B @ A, (stop - start, in), float32."""
        return (self.lora_B.weight.float() @ self.lora_A.weight.float()) * self.scale


class LoraLinear(nn.Module):
    """A frozen linear layer (``base``) plus LoRA adapters on ranges of its output rows, sharing one dropout."""

    def __init__(self, base: nn.Module, dropout: float = 0.0) -> None:
        super().__init__()
        self.base = base
        self.adapters = nn.ModuleDict()
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False

    @property
    def in_features(self) -> int:
        """Input features of the base layer."""
        return self.base.in_features

    @property
    def out_features(self) -> int:
        """Output features of the base layer."""
        return self.base.out_features

    def add(self, name: str, start: int, stop: int, r: int, alpha: float) -> LoraAdapter:
        """Add an adapter called ``name`` on output rows ``start:stop``; InputError if it overlaps one already here."""
        if self.merged:
            raise InputError("cannot add a LoRA adapter to a merged layer: call unmerge_lora(model) first")
        for other_name, other in self.adapters.items():
            if start < other.stop and other.start < stop:
                raise InputError(f"LoRA adapter {name!r} (rows {start}:{stop}) overlaps {other_name!r} "
                                 f"(rows {other.start}:{other.stop}) on the same layer; target q/k/v or qkv, not both")
        adapter = LoraAdapter(self.in_features, start, stop, r, alpha).to(self._device())
        self.adapters[name] = adapter
        return adapter

    def _device(self) -> torch.device:
        tensor = next(iter(self.base.parameters()), None)
        if tensor is None:
            tensor = next(iter(self.base.buffers()))
        return tensor.device

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """base(x) (..., out) plus each adapter's delta on its rows, unless the adapters are merged."""
        y = self.base(x)  # (..., out)
        if self.merged or not self.adapters:
            return y
        h = self.lora_dropout(x)  # (..., in)
        cuts = sorted({0, self.out_features} | {a.start for a in self.adapters.values()}
                      | {a.stop for a in self.adapters.values()})
        sizes = [b - a for a, b in zip(cuts[:-1], cuts[1:], strict=True)]
        pieces = dict(zip(cuts[:-1], y.split(sizes, dim=-1), strict=True))  # start -> (..., rows)
        for adapter in self.adapters.values():
            pieces[adapter.start] = pieces[adapter.start] + adapter.delta(h).to(y.dtype)
        return torch.cat([pieces[c] for c in cuts[:-1]], dim=-1) if len(cuts) > 2 else pieces[0]

    def _fold(self, sign: int) -> None:
        if isinstance(self.base, Int8Linear) or not isinstance(getattr(self.base, "weight", None), nn.Parameter):
            raise InputError("cannot merge LoRA into an int8 (quantized) layer: its weight is rounded to int8; "
                             "keep the adapter unmerged, or add LoRA to the float model and merge before quantizing")
        weight = self.base.weight  # (out, in)
        with torch.no_grad():
            for adapter in self.adapters.values():
                rows = weight[adapter.start:adapter.stop]
                rows.copy_((rows.float() + sign * adapter.delta_weight()).to(weight.dtype))

    def merge(self) -> None:
        """Fold every adapter into the base weight (W[rows] += scale B A); the forward then skips them."""
        if not self.merged:
            self._fold(+1)
            self.merged = True

    def unmerge(self) -> None:
        """Take the adapters back out of the base weight (W[rows] -= scale B A)."""
        if self.merged:
            self._fold(-1)
            self.merged = False


def lora_layers(model: nn.Module) -> Iterator[tuple[str, LoraLinear]]:
    """Every (module name, LoraLinear) of ``model``."""
    return ((name, m) for name, m in model.named_modules() if isinstance(m, LoraLinear))


def blocks_of(model: nn.Module) -> list[tuple[str, Block]]:
    """Every (module name, Block) of ``model``: ``blocks.{i}``, or ``encoder.blocks.{i}`` / ``decoder.blocks.{i}``."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, Block)]


def part_rows(attn: Attention, part: tuple[int, int] | None, out_features: int) -> tuple[int, int]:
    """The output rows (start, stop) of a part of a fused projection: q|k|v of ``qkv``, k|v of ``kv``."""
    if part is None:
        return 0, out_features
    index, parts = part
    q, kv = attn.n_heads * attn.d_head, attn.n_kv_heads * attn.d_head
    sizes = [q, kv, kv] if parts == 3 else [kv, kv]
    start = sum(sizes[:index])
    return start, start + sizes[index]


def wrap(root: nn.Module, path: str, dropout: float) -> LoraLinear:
    """The ``LoraLinear`` at dotted ``path`` of ``root``, wrapping (and freezing) the plain layer there first."""
    parent_path, _, attr = path.rpartition(".")
    parent = root.get_submodule(parent_path)
    child = getattr(parent, attr)
    if not isinstance(child, LoraLinear):
        for p in child.parameters():
            p.requires_grad_(False)
        child = LoraLinear(child, dropout)
        setattr(parent, attr, child)
    return child


def fuses_qkv(model: nn.Module) -> bool:
    """Whether the model's Hugging Face layout keeps q, k, v in one module (GPT-2's c_attn); False without one."""
    cfg = getattr(model, "config", None)
    try:
        family = family_of(cfg) if cfg is not None else None
    except ConfigError:
        family = None
    if family is None:
        return False
    rules = expand(family.weights(cfg), cfg.n_layers, cfg.decoder_layers)
    return any(ours.endswith(".attn.qkv.weight") and len(theirs) == 1 for ours, theirs, _, _ in rules)


def default_targets(model: nn.Module) -> list[str]:
    """The targets ``"all-linear"`` stands for: each linear layer of the family's HF layout (q, k, v apart,
    except where that layout fuses them, GPT-2), the feed-forward layers and the cross-attention if any."""
    attn = ["qkv"] if fuses_qkv(model) else ["q", "k", "v"]
    out = [*attn, "out", "fc_in", "fc_gate", "fc_out"]
    if any(block.cross_attn is not None for _, block in blocks_of(model)):
        out += ["cross_q", "cross_k", "cross_v", "cross_out"]
    return out


def add_lora(
    model: nn.Module,
    r: int = 8,
    alpha: float = 16,
    dropout: float = 0.0,
    target_modules: Sequence[str] | str = ("q", "v"),
) -> nn.Module:
    """Add LoRA adapters (rank ``r``, scale ``alpha / r``) to the ``target_modules`` of every block; return the model.

    Every parameter of the model that is not an adapter's is frozen (requires_grad False).
    ``target_modules`` names targets of ``TARGETS`` (q, k, v, qkv, out, fc_in, fc_gate, fc_out,
    cross_*) or is ``"all-linear"``. InputError for an unknown target, one the model has no layer
    for (fc_gate without a gated MLP), or targets overlapping on one layer (qkv with q).
    """
    every = target_modules == ALL_LINEAR
    if isinstance(target_modules, str):
        target_modules = default_targets(model) if every else [target_modules]
    unknown = [t for t in target_modules if t not in TARGETS]
    if unknown:
        raise InputError(f"unknown LoRA target(s) {', '.join(map(repr, unknown))}; choose from "
                         f"{', '.join(TARGETS)} or {ALL_LINEAR!r}")
    if not 0.0 <= dropout < 1.0 or r < 1:
        raise InputError(f"LoRA needs a rank r >= 1 and a dropout in [0, 1), got r={r}, dropout={dropout}")
    blocks = [block for _, block in blocks_of(model)]
    if not blocks:
        raise InputError("add_lora found no Transformer blocks in this model")
    _check_overlaps(list(target_modules))
    present = {t: [b for b in blocks if not _absent(b, TARGETS[t][0])] for t in target_modules}
    lacking = [t for t, found in present.items() if not found]
    if lacking and not every:
        raise InputError(f"LoRA target(s) {', '.join(map(repr, lacking))} match no layer of this model (it has no "
                         f"{', '.join(TARGETS[t][0] for t in lacking)})")
    for p in model.parameters():
        p.requires_grad_(False)
    for target, found in present.items():
        layer, part = TARGETS[target]
        for block in found:
            lora = wrap(block, layer, dropout)
            attn = block.get_submodule(layer.rpartition(".")[0]) if part is not None else None
            start, stop = part_rows(attn, part, lora.out_features)
            lora.add(target.removeprefix("cross_") if part is not None else "all", start, stop, r, alpha)
    return model


def _check_overlaps(targets: list[str]) -> None:
    """InputError when two targets act on the same rows of one layer (qkv and q, cross_kv and cross_k, twice)."""
    seen: dict[str, list[str]] = {}
    for t in targets:
        layer, part = TARGETS[t]
        for other in seen.get(layer, []):
            other_part = TARGETS[other][1]
            if part is None or other_part is None or part == other_part:
                raise InputError(f"LoRA targets {other!r} and {t!r} both act on the rows of {layer}; choose one")
        seen.setdefault(layer, []).append(t)


def _absent(block: nn.Module, layer: str) -> bool:
    """Whether ``block`` lacks the layer at dotted path ``layer`` (no cross-attention, no gate)."""
    module: nn.Module | None = block
    for attr in layer.split("."):
        module = getattr(module, attr, None)
        if module is None:
            return True
    return False


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The adapters' parameters (each A and B), for the optimizer."""
    return [p for _, layer in lora_layers(model) for p in layer.adapters.parameters()]


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight; return the model. InputError for int8 base layers."""
    for _, layer in lora_layers(model):
        layer.merge()
    return model


def unmerge_lora(model: nn.Module) -> nn.Module:
    """Take every merged adapter back out of its base weight; return the model."""
    for _, layer in lora_layers(model):
        layer.unmerge()
    return model


def unload_lora(model: nn.Module, *, merge: bool = True) -> nn.Module:
    """Replace every ``LoraLinear`` by its base layer (merged first when ``merge``); return the plain model.

    The result saves with ``save_pretrained`` like any model. Its parameters stay frozen.
    """
    for name, layer in list(lora_layers(model)):
        if merge:
            layer.merge()
        elif layer.merged:
            layer.unmerge()
        parent_path, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent_path), attr, layer.base)
    return model
