"""Hugging Face checkpoint weights both ways, through the family's table in ``hf_maps``.

Reading plans each model tensor as a ``Source`` (checkpoint names + transform) and checks the
plan against the model before a single tensor is read; writing translates a whole state dict.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path

import torch

from formerkit.checkpoints.files import write_safetensors
from formerkit.checkpoints.hf_common import Family
from formerkit.checkpoints.hf_config import config_to_hf
from formerkit.checkpoints.hf_families import family_of
from formerkit.checkpoints.hf_maps import expand
from formerkit.checkpoints.loading import Source, source_shape
from formerkit.config import ModelConfig
from formerkit.errors import CheckpointError
from formerkit.fileio import write_json


def _split_sizes(cfg: ModelConfig, name: str, n_parts: int) -> list[int]:
    """Rows of the q, k, v (or k, v) parts of the fused projection ``name``, with its stack's head sizes;
    of each expert's slices of the stacked expert weights (gate, up: the expert width; down: d_model)."""
    if name.endswith(".mlp.w_in"):
        return [cfg.expert_d_ff] * n_parts
    if name.endswith(".mlp.w_out"):
        return [cfg.d_model] * n_parts
    sizes = cfg.decoder_config() if name.startswith("decoder.") else cfg
    q, kv = sizes.n_heads * sizes.head_dim, sizes.kv_heads * sizes.head_dim
    return [q, kv, kv] if n_parts == 3 else [kv, kv]


def sources_from_hf(cfg: ModelConfig, family: Family, hf_state: Mapping[str, torch.Tensor],
                    model_state: Mapping[str, torch.Tensor], tied: set[str]) -> dict[str, Source]:
    """Plan each tensor of the model (formerkit names) from a HF checkpoint's tensors; return name -> Source.

    Only shapes are looked at (BART's and T5's copies of the shared table are compared), so a
    memory-mapped ``hf_state`` is not read. ``model_state`` gives the model's names and shapes
    (a model on the meta device will do); ``tied`` names tensors that alias another (the tied
    output projection): they are neither planned nor reported missing. Raises CheckpointError
    listing every missing, unexpected and mis-shaped tensor.
    """
    prefix = family.base_prefix
    theirs = {(k[len(prefix):] if k.startswith(prefix) else k): k for k in hf_state}  # without prefix -> stored
    used: set[str] = set()
    out: dict[str, Source] = {}
    missing, shapes, differ = [], [], []
    for ours, names, transform, _ in expand(family.weights(cfg), cfg.n_layers, cfg.decoder_layers):
        if ours not in model_state or ours in tied:
            used.update(n for n in names if ours in tied)
            continue
        absent = [n for n in (names[:1] if transform == "tied" else names) if n not in theirs]
        if absent:
            missing.extend(absent)
            continue
        if transform == "tied":  # copies of one tensor: read the first, check the others where present
            names = tuple(n for n in names if n in theirs)
            differ.extend(f"{n} differs from {names[0]}" for n in names[1:]
                          if not torch.equal(hf_state[theirs[n]], hf_state[theirs[names[0]]]))
        used.update(names)
        source = Source(tuple(theirs[n] for n in names), transform)
        shape = source_shape(source, hf_state)
        if shape != tuple(model_state[ours].shape):
            shapes.append(f"{' + '.join(names)}: checkpoint {shape}, model {tuple(model_state[ours].shape)}")
            continue
        out[ours] = source
    uncovered = [k for k in model_state if k not in out and k not in tied]
    ignored = [re.compile(p) for p in family.ignored]
    unexpected = [k for k in theirs if k not in used and not any(p.fullmatch(k) for p in ignored)]
    problems = []
    if missing:
        problems.append(f"missing from the checkpoint: {', '.join(missing)}")
    if unexpected:
        problems.append(f"unexpected in the checkpoint: {', '.join(unexpected)}")
    if shapes:
        problems.append(f"wrong shapes: {'; '.join(shapes)}")
    if differ:
        problems.append(f"formerkit shares one token table, but {'; '.join(differ)}")
    if not missing and not shapes and uncovered:
        problems.append(f"not provided by the checkpoint: {', '.join(uncovered)}")
    if problems:
        raise CheckpointError(f"the {family.model_type} checkpoint does not match the model from its config.json — "
                              + " | ".join(problems))
    return out


def state_to_hf(cfg: ModelConfig, state: dict[str, torch.Tensor], tied: set[str]) -> tuple[dict, dict]:
    """Translate a formerkit state dict to (HF config dict, HF state dict); ConfigError when no family fits."""
    hf_config = config_to_hf(cfg)
    family = family_of(cfg)
    prefix = family.base_prefix if cfg.head != "none" else ""
    out: dict[str, torch.Tensor] = {}
    for ours, names, transform, is_head in expand(family.weights(cfg), cfg.n_layers, cfg.decoder_layers):
        if ours not in state or ours in tied:
            continue
        tensor = state[ours]
        if transform == "t":
            parts = [tensor.t()]
        elif transform == "tied":
            parts = [tensor] * len(names)
        elif transform == "cat":
            parts = list(tensor.split(_split_sizes(cfg, ours, len(names))))
        elif transform == "unbatch":
            parts = [tensor[None]]  # (N, D) -> (1, N, D)
        else:
            parts = [tensor]
        for name, part in zip(names, parts, strict=True):
            out[name if is_head else prefix + name] = part
    return hf_config, out


def write_hf_dir(directory: Path, hf_config: dict, hf_state: dict[str, torch.Tensor]) -> None:
    """Write config.json and model.safetensors in the layout transformers reads."""
    write_safetensors(directory / "model.safetensors", hf_state, {"format": "pt"})
    write_json(directory / "config.json", hf_config)
