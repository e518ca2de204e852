"""Int8 checkpoints: a native formerkit directory of a model quantized by ``quantize_int8``, plus ``quantization.json``.

The directory holds ``formerkit_config.json`` (the unchanged ModelConfig), ``model.safetensors``
(int8 weights, float32 scales, float everything else) and ``quantization.json`` (the method,
and whether a tied LM head was given its own int8 copy).
"""

from __future__ import annotations

from pathlib import Path

import torch

from formerkit.checkpoints.files import CheckpointTensors, write_safetensors
from formerkit.checkpoints.loading import assign_weights, build_on_meta, load_target, native_sources, tied_names
from formerkit.config import ModelConfig
from formerkit.errors import CheckpointError, InputError
from formerkit.fileio import read_json, write_json
from formerkit.layers.quantized import Int8Linear, quantize_int8
from formerkit.model import Transformer
from formerkit.rundir import NATIVE_CONFIG, resolve_checkpoint_dir

QUANTIZATION_FILE = "quantization.json"
METHOD = "int8-weight-only"


def _head_quantized(model: Transformer) -> bool:
    return isinstance(getattr(model.lm_head, "proj", None), Int8Linear)


def save_quantized(model: Transformer, path: str | Path) -> Path:
    """Write a model quantized by ``quantize_int8`` to a directory that ``load_quantized`` reads; return the directory.

    Raises InputError for a model that is not a quantized formerkit Transformer.
    """
    if not isinstance(model, Transformer) or not any(isinstance(m, Int8Linear) for m in model.modules()):
        raise InputError("save_quantized needs a formerkit Transformer quantized with quantize_int8; "
                         "use save_pretrained for float models")
    directory = Path(path)
    meta = {"method": METHOD, "quantize_tied_head": _head_quantized(model) and model.config.tie_embeddings}
    write_json(directory / QUANTIZATION_FILE, meta)  # first: a half-written directory never looks like a float one
    tied = tied_names(model)
    state = {k: v for k, v in model.state_dict().items() if k not in tied}
    write_safetensors(directory / "model.safetensors", state, {"format": "formerkit", "quantization": METHOD})
    write_json(directory / NATIVE_CONFIG, model.config.to_dict())
    return directory


def load_quantized(path: str | Path, *, dtype: torch.dtype | None = None,
                   device: str | torch.device | None = None) -> Transformer:
    """Load a checkpoint written by ``save_quantized`` (or a run directory's latest); return it in eval mode.

    dtype converts the float tensors (embeddings, norms, biases, scales); int8 weights stay int8.
    The quantized model is built on the meta device and each tensor read straight into it, so
    the float model never exists. Raises CheckpointError for a directory that is not an int8
    checkpoint, InputError for a bad dtype or device.
    """
    dtype, place = load_target(dtype, device)
    directory = resolve_checkpoint_dir(path)
    if not (directory / QUANTIZATION_FILE).is_file():
        raise CheckpointError(f"{directory} is not a quantized checkpoint (no {QUANTIZATION_FILE}); load it with "
                              "from_pretrained, then quantize_int8")
    meta = read_json(directory / QUANTIZATION_FILE)
    if meta.get("method") != METHOD:
        raise CheckpointError(f"{directory / QUANTIZATION_FILE}: unknown quantization method {meta.get('method')!r}")
    model = build_on_meta(ModelConfig.from_dict(read_json(directory / NATIVE_CONFIG)))
    quantize_int8(model, quantize_tied_head=bool(meta.get("quantize_tied_head", True)))
    tensors = CheckpointTensors(directory)
    return assign_weights(model, native_sources(tensors), tensors, directory, dtype=dtype, device=place).eval()
