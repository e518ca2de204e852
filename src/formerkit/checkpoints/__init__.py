"""Checkpoints: formerkit's native format and Hugging Face directories, both ways.

Native: ``formerkit_config.json`` (ModelConfig) + ``model.safetensors`` (formerkit names).
Hugging Face: ``config.json`` + weights, translated through the family registry (``hf_families``)
and its weight tables (``hf_maps``). Int8: a native directory + ``quantization.json`` (``quantized``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch

from formerkit.checkpoints.directory import load_config
from formerkit.checkpoints.files import CheckpointTensors, write_safetensors
from formerkit.checkpoints.hf import sources_from_hf, state_to_hf, write_hf_dir
from formerkit.checkpoints.hf_families import family_of
from formerkit.checkpoints.loading import (
    assign_weights,
    build_on_meta,
    load_target,
    load_weights_into,
    native_sources,
    tied_names,
    tied_to,
)
from formerkit.checkpoints.quantized import QUANTIZATION_FILE, load_quantized
from formerkit.checkpoints.special_ids import with_tokenizer_ids
from formerkit.errors import InputError
from formerkit.fileio import write_json
from formerkit.layers.int4 import Int4Linear
from formerkit.layers.quantized import Int8Linear
from formerkit.model import Transformer
from formerkit.rundir import NATIVE_CONFIG, resolve_checkpoint_dir
from formerkit.tokenizers import Tokenizer

__all__ = ["NATIVE_CONFIG", "from_pretrained", "load_config", "load_weights_into", "resolve_checkpoint_dir",
           "save_pretrained", "tied_names"]


def from_pretrained(
    path: str | Path,
    *,
    dtype: torch.dtype | None = None,
    device: str | torch.device | None = None,
) -> Transformer:
    """Load a model from a native formerkit directory, a Hugging Face directory, a run directory or an int8 one.

    Hugging Face directories hold ``config.json`` plus ``model.safetensors``, sharded
    safetensors with an index, or ``pytorch_model.bin`` (read with ``weights_only=True``).
    GPT-2, the Llama family (Llama, Mistral, Qwen2, Qwen3), BERT, ViT, BART and T5 are understood; a
    sentence-transformers pooling config beside the weights sets ``config.pooling``.
    A training run directory loads its latest checkpoint; a directory of ``save_quantized``
    loads as ``load_quantized`` does.

    The model is built with its parameters on the meta device, and each tensor is read from
    its memory-mapped file straight into place, converted to ``dtype`` (floating tensors;
    default: the model's own, float32) on ``device`` (default: torch's default device):
    nothing is initialized randomly and the checkpoint is never in memory beside the model.
    A tensor needing no change (same dtype, CPU, not concatenated) stays the file's private
    copy-on-write map, read when first used: do not rewrite the file in place while the model
    lives (formerkit's own saves replace files atomically, which is safe). Returns the model in eval
    mode. Raises CheckpointError naming every missing, unexpected or mis-shaped tensor,
    InputError for a bad dtype or device.
    """
    dtype, place = load_target(dtype, device)
    directory = resolve_checkpoint_dir(path)
    if (directory / QUANTIZATION_FILE).is_file():
        return load_quantized(directory, dtype=dtype, device=place)
    cfg = load_config(directory)
    model = build_on_meta(cfg)
    tensors = CheckpointTensors(directory)
    if (directory / NATIVE_CONFIG).is_file():
        sources = native_sources(tensors)
    else:
        sources = sources_from_hf(cfg, family_of(cfg), tensors, model.state_dict(), set(tied_to(model)))
    return assign_weights(model, sources, tensors, directory, dtype=dtype, device=place).eval()


def save_pretrained(model: Transformer, path: str | Path, format: Literal["native", "hf"] = "native", *,
                    tokenizer: Tokenizer | None = None) -> Path:
    """Write ``model`` (and ``tokenizer``, if given) to a directory: native formerkit format or Hugging Face layout.

    Each file is written to a temporary name and renamed into place, so an interrupted save
    never leaves a half-written file. ``format="hf"`` raises ConfigError for configs that
    have no Hugging Face equivalent; its config.json records special token ids inside the
    vocabulary only: the tokenizer's bos/eos/pad when one is given, else the family's defaults
    where the vocabulary holds them. Returns the directory path.
    """
    directory = Path(path)
    if any(isinstance(m, (Int8Linear, Int4Linear)) for m in model.modules()):
        raise InputError("this model holds quantized (int8 or int4) weights: write it with formerkit.save_quantized")
    tied = tied_names(model)
    state = {k: v for k, v in model.state_dict().items() if k not in tied}
    if any(".adapters." in k for k in state):  # formerkit.compress's LoRA layers (core code does not import it)
        raise InputError("this model carries LoRA adapters: write them with formerkit.compress.save_adapter, or merge "
                         "them into the weights with formerkit.compress.unload_lora(model) and save that")
    if format == "native":
        write_safetensors(directory / "model.safetensors", state, {"format": "formerkit"})
        write_json(directory / NATIVE_CONFIG, model.config.to_dict())
    elif format == "hf":
        hf_config, hf_state = state_to_hf(model.config, state, tied)
        if tokenizer is not None:
            hf_config = with_tokenizer_ids(hf_config, model.config, tokenizer)
        write_hf_dir(directory, hf_config, hf_state)
    else:
        raise InputError(f'format must be "native" or "hf", got {format!r}')
    if tokenizer is not None:
        tokenizer.save(directory)
    return directory
