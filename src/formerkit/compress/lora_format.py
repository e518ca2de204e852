"""LoRA adapters on disk in peft's format: ``adapter_config.json`` + ``adapter_model.safetensors``.

Tensors are named ``base_model.model.<Hugging Face module path>.lora_A.weight`` (r, in) and
``.lora_B.weight`` (out, r). The module paths come from the family's weight table in
``checkpoints.hf_maps`` (the same table ``save_pretrained(..., format="hf")`` writes with), under
the family's base-model prefix when the model has a head (``transformer.h.0.attn.c_attn`` for
GPT2LMHeadModel, ``encoder.layer.0.attention.self.query`` for BertModel).

Every translation is exact. Where Hugging Face splits one of formerkit's fused layers (Llama's
q_proj/k_proj/v_proj of ``attn.qkv``), each HF module gets the rows of the adapters over its
part (an adapter on all of ``qkv`` gives each part the same A and its rows of B). Where HF
fuses too (GPT-2's ``c_attn``), the adapters of one HF module become one LoRA of their summed
rank: A stacked, B block-diagonal, B's blocks rescaled to the first adapter's ``alpha / r``;
its rank and alpha go in peft's ``rank_pattern`` / ``alpha_pattern``. Reading gives each HF
module one adapter on its rows, with the scale peft computes (``alpha / r``, or
``alpha / sqrt(r)`` with ``use_rslora``).
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from formerkit.checkpoints.files import write_safetensors
from formerkit.checkpoints.hf_families import family_of
from formerkit.checkpoints.hf_maps import expand
from formerkit.compress.lora import PART_NAMES, TARGETS, LoraLinear, lora_layers, part_rows, wrap
from formerkit.errors import CheckpointError, ConfigError, InputError
from formerkit.fileio import write_json

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
KEY_PREFIX = "base_model.model."
_LAYER_SUFFIXES = tuple("." + layer for layer, _ in TARGETS.values())


@dataclass(frozen=True)
class HFPart:
    """One Hugging Face module holding rows ``start:stop`` of a formerkit layer (``conv1d``: GPT-2's Conv1D)."""

    path: str
    layer: str
    start: int
    stop: int
    conv1d: bool
    name: str  # the adapter name on the formerkit layer: q, k, v, or all


def _family(model: nn.Module):
    config = getattr(model, "config", None)
    if config is None:
        raise InputError("LoRA adapters in peft's format need a formerkit Transformer (it has no .config)")
    try:
        return family_of(config)
    except ConfigError as e:
        raise InputError(f"this model has no Hugging Face layout, so its adapter has no peft module names: {e}") from e


def hf_parts(model: nn.Module) -> dict[str, HFPart]:
    """Every block linear layer of ``model`` as Hugging Face modules: HF module path -> HFPart."""
    family = _family(model)
    if family.images:
        raise InputError(f"LoRA adapters of {family.model_type} models are not written or read in peft's format: "
                         "transformers renames their modules on load, so the checkpoint's names are not the "
                         "module names peft uses")
    cfg = model.config
    prefix = family.base_prefix if cfg.head != "none" else ""
    out: dict[str, HFPart] = {}
    for ours, theirs, transform, _ in expand(family.weights(cfg), cfg.n_layers, cfg.decoder_layers):
        layer = ours.removesuffix(".weight")
        if not ours.endswith(".weight") or not layer.endswith(_LAYER_SUFFIXES):
            continue
        try:
            module = model.get_submodule(layer)
        except AttributeError:
            continue
        paths = [prefix + t.removesuffix(".weight") for t in theirs]
        attn = model.get_submodule(layer.rpartition(".")[0])
        for index, path in enumerate(paths):
            part = (index, len(paths)) if len(paths) > 1 else None
            start, stop = part_rows(attn, part, module.out_features)
            name = PART_NAMES[len(paths)][index] if part is not None else "all"
            out[path] = HFPart(path, layer, start, stop, transform == "t", name)
    return out


def _suffixes(chosen: set[str], every: set[str]) -> list[str]:
    """peft ``target_modules``: for each chosen path the shortest dotted suffix that matches no other path."""
    out = set()
    for path in chosen:
        parts = path.split(".")
        for k in range(1, len(parts) + 1):
            suffix = ".".join(parts[-k:])
            if all(p in chosen for p in every if p == suffix or p.endswith("." + suffix)):
                out.add(suffix)
                break
    return sorted(out)


def _whole(x: float) -> float | int:
    return int(x) if float(x).is_integer() else x


def adapter_tensors(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, tuple[int, float]], bool]:
    """The model's adapters as peft tensors: (key -> tensor, HF module path -> (rank, alpha), fan_in_fan_out)."""
    parts = hf_parts(model)
    by_layer: dict[str, list[HFPart]] = {}
    for part in parts.values():
        by_layer.setdefault(part.layer, []).append(part)
    tensors: dict[str, torch.Tensor] = {}
    ranks: dict[str, tuple[int, float]] = {}
    conv = set()
    for name, lora in lora_layers(model):
        if name not in by_layer:
            raise InputError(f"the LoRA layer {name} has no module in the Hugging Face layout of this model")
        for part in by_layer[name]:
            hits = [a for a in lora.adapters.values() if a.start < part.stop and part.start < a.stop]
            if not hits:
                continue
            rank, scale = sum(a.r for a in hits), hits[0].scale
            A = torch.cat([a.lora_A.weight.detach() for a in hits])  # (rank, in)
            B = A.new_zeros(part.stop - part.start, rank)  # (rows, rank)
            col = 0
            for a in hits:
                lo, hi = max(a.start, part.start), min(a.stop, part.stop)
                B[lo - part.start:hi - part.start, col:col + a.r] = a.lora_B.weight.detach()[lo - a.start:hi - a.start]
                B[:, col:col + a.r] *= a.scale / scale
                col += a.r
            tensors[f"{KEY_PREFIX}{part.path}.lora_A.weight"] = A.contiguous()
            tensors[f"{KEY_PREFIX}{part.path}.lora_B.weight"] = B.contiguous()
            ranks[part.path] = (rank, _whole(scale * rank))
            conv.add(part.conv1d)
    if not ranks:
        raise InputError("this model has no LoRA adapters to save: call add_lora(model, ...) first")
    if len(conv) > 1:
        raise InputError("peft's fan_in_fan_out is one flag, but these adapters sit on both Conv1D and Linear modules")
    return tensors, ranks, conv.pop()


def _task_type(model: nn.Module) -> str | None:
    cfg = model.config
    if cfg.head != "lm":
        return None
    return "SEQ_2_SEQ_LM" if cfg.kind == "encoder-decoder" else "CAUSAL_LM"


def save_adapter(model: nn.Module, path: str | Path, *, base_model_name_or_path: str | None = None) -> Path:
    """Write the model's LoRA adapters to directory ``path`` in peft's format; return the directory.

    ``adapter_config.json`` names the Hugging Face modules (``target_modules``, the shortest
    suffixes that match exactly those modules), r and lora_alpha (the most common pair, lowest rank first; other
    modules' in ``rank_pattern`` / ``alpha_pattern``), the model's dropout and task type.
    InputError for a model without adapters or without a Hugging Face layout.
    """
    tensors, ranks, conv1d = adapter_tensors(model)
    counts = Counter(ranks.values())
    r, alpha = max(counts, key=lambda ra: (counts[ra], -ra[0]))  # the most common; of equals, the lowest rank
    odd = {p: ra for p, ra in ranks.items() if ra != (r, alpha)}
    dropouts = {lora.lora_dropout.p for _, lora in lora_layers(model) if isinstance(lora.lora_dropout, nn.Dropout)}
    config = {
        "peft_type": "LORA", "task_type": _task_type(model), "base_model_name_or_path": base_model_name_or_path,
        "r": r, "lora_alpha": alpha, "lora_dropout": max(dropouts, default=0.0),
        "target_modules": _suffixes(set(ranks), set(hf_parts(model))),
        "rank_pattern": {re.escape(p): ra[0] for p, ra in odd.items()},
        "alpha_pattern": {re.escape(p): ra[1] for p, ra in odd.items()},
        "fan_in_fan_out": conv1d, "bias": "none", "lora_bias": False, "use_rslora": False, "use_dora": False,
        "modules_to_save": None, "layers_to_transform": None, "layers_pattern": None, "exclude_modules": None,
        "init_lora_weights": True, "inference_mode": True, "revision": None,
    }
    directory = Path(path)
    write_safetensors(directory / WEIGHTS_FILE, tensors, {"format": "pt"})
    write_json(directory / CONFIG_FILE, config)
    return directory


def _pattern_value(patterns: dict, key: str, default):
    """peft's lookup: the value of the first pattern matching the end of ``key`` at a dot, else ``default``."""
    for pattern, value in patterns.items():
        if re.match(rf"(.*\.)?({pattern})$", key):
            return value
    return default


def read_adapter_config(directory: Path) -> dict:
    """The ``adapter_config.json`` of ``directory``; CheckpointError if absent, unreadable or beyond plain LoRA."""
    file = directory / CONFIG_FILE
    if not file.is_file():
        raise CheckpointError(f"{file} not found: a peft adapter directory holds {CONFIG_FILE} and {WEIGHTS_FILE}")
    try:
        config = json.loads(file.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{file} is not valid JSON ({e})") from e
    unsupported = []
    if config.get("peft_type") != "LORA":
        unsupported.append(f"peft_type={config.get('peft_type')!r} (only LORA)")
    if config.get("bias", "none") != "none" or config.get("lora_bias"):
        unsupported.append("trained biases (bias must be 'none', lora_bias false)")
    for field in ("use_dora", "modules_to_save", "trainable_token_indices", "layer_replication", "target_parameters"):
        if config.get(field):
            unsupported.append(f"{field}={config[field]!r}")
    if unsupported:
        raise CheckpointError(f"{file} asks for what formerkit's LoRA does not do: {'; '.join(unsupported)}")
    return config


def _read_tensors(file: Path) -> dict[str, torch.Tensor]:
    if not file.is_file():
        raise CheckpointError(f"{file} not found: save the adapter with save_adapter or peft's save_pretrained")
    with safe_open(str(file), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def load_adapter(model: nn.Module, path: str | Path) -> nn.Module:
    """Add the LoRA adapters of peft directory ``path`` to ``model`` and load their weights; return the model.

    Each Hugging Face module named in the file gets one adapter on its rows of the formerkit
    layer, rank from the tensors, scale as peft computes it; every other parameter is frozen.
    CheckpointError, listing every mismatch, when the adapter names modules this model lacks or
    has tensors of the wrong shapes (an adapter for another base model).
    """
    directory = Path(path)
    config = read_adapter_config(directory)
    tensors = _read_tensors(directory / WEIGHTS_FILE)
    parts = hf_parts(model)
    found: dict[str, dict[str, torch.Tensor]] = {}
    unknown, shapes = [], []
    for key, tensor in tensors.items():
        match = re.fullmatch(rf"{re.escape(KEY_PREFIX)}(.+)\.(lora_A|lora_B)\.weight", key)
        if match is None or match[1] not in parts:
            unknown.append(key)
            continue
        found.setdefault(match[1], {})[match[2]] = tensor
    for hf_path, pair in found.items():
        part = parts[hf_path]
        in_features = model.get_submodule(part.layer).in_features
        A, B = pair.get("lora_A"), pair.get("lora_B")
        if A is None or B is None:
            shapes.append(f"{hf_path}: lora_A and lora_B must both be present")
        elif (A.dim() != 2 or B.dim() != 2 or A.shape[1] != in_features
              or B.shape != (part.stop - part.start, A.shape[0])):
            shapes.append(f"{hf_path}: lora_A {tuple(A.shape)}, lora_B {tuple(B.shape)}; this model needs "
                          f"lora_A (r, {in_features}), lora_B ({part.stop - part.start}, r)")
    if unknown or shapes or not found:
        problems = ([f"not modules of this model: {', '.join(unknown)}"] if unknown else []) + (
            [f"wrong shapes: {'; '.join(shapes)}"] if shapes else []) + ([] if found else ["no LoRA tensors"])
        raise CheckpointError(f"the adapter in {directory} does not fit this model (was it trained for another base "
                              f"model?) — {' | '.join(problems)}")
    for p in model.parameters():
        p.requires_grad_(False)
    dropout = float(config.get("lora_dropout") or 0.0)
    for hf_path, pair in found.items():
        part = parts[hf_path]
        rank = pair["lora_A"].shape[0]
        alpha = float(_pattern_value(config.get("alpha_pattern") or {}, hf_path, config.get("lora_alpha", 8)))
        scale = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
        lora: LoraLinear = wrap(model, part.layer, dropout)
        adapter = lora.add(part.name, part.start, part.stop, rank, scale * rank)
        with torch.no_grad():
            adapter.lora_A.weight.copy_(pair["lora_A"])
            adapter.lora_B.weight.copy_(pair["lora_B"])
    return model
