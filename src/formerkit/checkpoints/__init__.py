"""Checkpoints: formerkit's native format and Hugging Face directories, both ways.

Native: ``formerkit_config.json`` (ModelConfig) + ``model.safetensors`` (formerkit names).
Hugging Face: ``config.json`` + weights, translated through the family registry (``hf_families``)
and its weight tables (``hf_maps``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch

from formerkit.checkpoints.files import read_weights, write_safetensors
from formerkit.checkpoints.hf import state_from_hf, state_to_hf, write_hf_dir
from formerkit.checkpoints.hf_config import config_from_hf
from formerkit.checkpoints.hf_families import family_of
from formerkit.checkpoints.special_ids import with_tokenizer_ids
from formerkit.config import ModelConfig
from formerkit.errors import CheckpointError, ConfigError, InputError
from formerkit.fileio import read_json, write_json
from formerkit.model import Transformer
from formerkit.rundir import NATIVE_CONFIG, resolve_checkpoint_dir
from formerkit.tokenizers import Tokenizer

_ST_POOLING = {"pooling_mode_mean_tokens": "mean", "pooling_mode_cls_token": "cls",
               "pooling_mode_max_tokens": "max", "pooling_mode_lasttoken": "last"}

__all__ = ["NATIVE_CONFIG", "from_pretrained", "load_config", "load_weights_into", "resolve_checkpoint_dir",
           "save_pretrained", "tied_names"]


def tied_names(model: torch.nn.Module) -> set[str]:
    """Names in ``model.state_dict()`` whose tensor aliases one listed earlier (tied weights)."""
    seen: set[tuple[int, tuple[int, ...]]] = set()
    tied = set()
    for name, tensor in model.state_dict(keep_vars=True).items():
        key = (tensor.data_ptr(), tuple(tensor.shape))
        if key in seen:
            tied.add(name)
        seen.add(key)
    return tied


def load_weights_into(model: Transformer, state: dict[str, torch.Tensor], source: Path) -> None:
    """Copy ``state`` (formerkit names) into ``model``, or raise CheckpointError listing every mismatch."""
    own = model.state_dict()
    tied = tied_names(model)
    missing = [k for k in own if k not in state and k not in tied]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k}: file {tuple(v.shape)}, model {tuple(own[k].shape)}"
              for k, v in state.items() if k in own and tuple(v.shape) != tuple(own[k].shape)]
    if missing or unexpected or shapes:
        parts = [f"{label}: {', '.join(items) if label != 'wrong shapes' else '; '.join(items)}"
                 for label, items in (("missing", missing), ("unexpected", unexpected), ("wrong shapes", shapes))
                 if items]
        raise CheckpointError(f"weights in {source} do not match its config — " + " | ".join(parts))
    with torch.no_grad():
        for name, tensor in state.items():
            own[name].copy_(tensor)


def _sentence_transformers_pooling(directory: Path) -> str | None:
    path = directory / "1_Pooling" / "config.json"
    if not path.is_file():
        return None
    modes = [mode for key, mode in _ST_POOLING.items() if read_json(path).get(key)]
    return modes[0] if len(modes) == 1 else None


def load_config(path: str | Path) -> ModelConfig:
    """The ModelConfig of a checkpoint directory (native or Hugging Face; a run directory: its latest checkpoint).

    A sentence-transformers pooling config beside a Hugging Face checkpoint sets ``pooling``.
    Raises CheckpointError when the directory holds no config this library reads.
    """
    directory = resolve_checkpoint_dir(path)
    if (directory / NATIVE_CONFIG).is_file():
        return ModelConfig.from_dict(read_json(directory / NATIVE_CONFIG))
    if not (directory / "config.json").is_file():
        raise CheckpointError(f"{directory} has neither {NATIVE_CONFIG} (formerkit) nor config.json "
                              "(Hugging Face); point at the directory a checkpoint was saved to")
    try:
        cfg = config_from_hf(read_json(directory / "config.json"))
    except ConfigError as err:
        raise CheckpointError(f"{directory / 'config.json'}: {err}") from err
    pooling = _sentence_transformers_pooling(directory)
    return cfg.replace(pooling=pooling) if pooling is not None else cfg


def from_pretrained(
    path: str | Path,
    *,
    dtype: torch.dtype | None = None,
    device: str | torch.device | None = None,
) -> Transformer:
    """Load a model from a native formerkit directory or a Hugging Face directory.

    Hugging Face directories hold ``config.json`` plus ``model.safetensors``, sharded
    safetensors with an index, or ``pytorch_model.bin`` (read with ``weights_only=True``).
    GPT-2, the Llama family (Llama, Mistral, Qwen2, Qwen3), BERT, BART and T5 are understood; a
    sentence-transformers pooling config beside the weights sets ``config.pooling``.
    A training run directory loads its latest checkpoint. Returns the model in eval mode.
    """
    directory = resolve_checkpoint_dir(path)
    if (directory / "quantization.json").is_file():
        from formerkit.quantize import load_quantized

        return load_quantized(directory, dtype=dtype, device=device)
    cfg = load_config(directory)
    model = Transformer(cfg)
    if (directory / NATIVE_CONFIG).is_file():
        load_weights_into(model, read_weights(directory), directory)
    else:
        tied = tied_names(model)
        state = state_from_hf(cfg, family_of(cfg), read_weights(directory), model.state_dict(), tied)
        load_weights_into(model, state, directory)
    if dtype is not None or device is not None:
        model = model.to(device=device, dtype=dtype)
    return model.eval()


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
    if any(type(m).__name__ == "Int8Linear" for m in model.modules()):
        raise InputError("this model holds int8 weights: write it with formerkit.save_quantized")
    tied = tied_names(model)
    state = {k: v for k, v in model.state_dict().items() if k not in tied}
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
