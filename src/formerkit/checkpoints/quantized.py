"""Quantized checkpoints: a native formerkit directory of a model quantized by ``quantize_int8`` or ``quantize_int4``.

The directory holds ``formerkit_config.json`` (the unchanged ModelConfig), ``model.safetensors``
(int8 weights and float32 scales, or int4 codes two per uint8 byte with float32 scales and
uint8 zero points; float everything else) and ``quantization.json``: the method, ``bits``,
whether a tied LM head was given its own quantized copy and, for int4, ``group_size`` and
``symmetric``. Int8 directories written before ``bits`` existed load as int8.
"""

from __future__ import annotations

from pathlib import Path

import torch

from formerkit.checkpoints.files import CheckpointTensors, write_safetensors
from formerkit.checkpoints.loading import assign_weights, build_on_meta, load_target, native_sources, tied_names
from formerkit.config import ModelConfig
from formerkit.errors import CheckpointError, InputError
from formerkit.fileio import read_json, write_json
from formerkit.layers.int4 import Int4Linear, quantize_int4
from formerkit.layers.quantized import Int8Linear, quantize_int8
from formerkit.model import Transformer
from formerkit.rundir import NATIVE_CONFIG, resolve_checkpoint_dir

QUANTIZATION_FILE = "quantization.json"
METHOD = "int8-weight-only"
INT4_METHOD = "int4-weight-only"
QUANTIZED_LAYERS = (Int8Linear, Int4Linear)


def _head_quantized(model: Transformer) -> bool:
    return isinstance(getattr(model.lm_head, "proj", None), QUANTIZED_LAYERS)


def quantization_meta(model: Transformer) -> dict:
    """What ``quantization.json`` records for a quantized model; InputError for a float or mixed one."""
    kinds = {type(m) for m in model.modules() if isinstance(m, QUANTIZED_LAYERS)} \
        if isinstance(model, Transformer) else set()
    if not kinds:
        raise InputError("save_quantized needs a formerkit Transformer quantized with quantize_int8 or "
                         "quantize_int4; use save_pretrained for float models")
    int4 = {(m.group_size, m.symmetric) for m in model.modules() if isinstance(m, Int4Linear)}
    if len(kinds) > 1 or len(int4) > 1:
        raise InputError("save_quantized needs one quantization for the whole model; this one mixes int8 and int4 "
                         "layers or int4 group settings: quantize the float model once")
    head = _head_quantized(model) and model.config.tie_embeddings
    if kinds == {Int8Linear}:
        return {"method": METHOD, "bits": 8, "quantize_tied_head": head}
    (group_size, symmetric), = int4
    return {"method": INT4_METHOD, "bits": 4, "group_size": group_size, "symmetric": symmetric,
            "quantize_tied_head": head}


def save_quantized(model: Transformer, path: str | Path) -> Path:
    """Write a model quantized by ``quantize_int8`` or ``quantize_int4`` to a directory; return the directory.

    ``load_quantized`` and ``from_pretrained`` read it back. Raises InputError for a model that
    is not a quantized formerkit Transformer, or that mixes int8 and int4 (or int4 settings).
    """
    meta = quantization_meta(model)
    directory = Path(path)
    write_json(directory / QUANTIZATION_FILE, meta)  # first: a half-written directory never looks like a float one
    tied = tied_names(model)
    state = {k: v for k, v in model.state_dict().items() if k not in tied}
    write_safetensors(directory / "model.safetensors", state, {"format": "formerkit", "quantization": meta["method"]})
    write_json(directory / NATIVE_CONFIG, model.config.to_dict())
    return directory


def load_quantized(path: str | Path, *, dtype: torch.dtype | None = None,
                   device: str | torch.device | None = None) -> Transformer:
    """Load a checkpoint written by ``save_quantized`` (or a run directory's latest); return it in eval mode.

    dtype converts the float tensors (embeddings, norms, biases, scales); int8 weights and int4
    codes and zero points stay as stored. The quantized model is built on the meta device and
    each tensor read straight into it, so the float model never exists. Raises CheckpointError
    for a directory that is not a quantized checkpoint, InputError for a bad dtype or device.
    """
    dtype, place = load_target(dtype, device)
    directory = resolve_checkpoint_dir(path)
    if not (directory / QUANTIZATION_FILE).is_file():
        raise CheckpointError(f"{directory} is not a quantized checkpoint (no {QUANTIZATION_FILE}); load it with "
                              "from_pretrained, then quantize_int8")
    meta = read_json(directory / QUANTIZATION_FILE)
    method, head = meta.get("method"), bool(meta.get("quantize_tied_head", True))
    if method not in (METHOD, INT4_METHOD):
        raise CheckpointError(f"{directory / QUANTIZATION_FILE}: unknown quantization method {method!r}")
    model = build_on_meta(ModelConfig.from_dict(read_json(directory / NATIVE_CONFIG)))
    if method == METHOD:
        quantize_int8(model, quantize_tied_head=head)
    else:
        try:
            quantize_int4(model, int(meta["group_size"]), symmetric=bool(meta["symmetric"]), quantize_tied_head=head)
        except (KeyError, TypeError, ValueError, InputError) as err:
            raise CheckpointError(f"{directory / QUANTIZATION_FILE}: bad int4 settings ({err}); expected "
                                  "group_size and symmetric as save_quantized writes them") from None
    tensors = CheckpointTensors(directory)
    model = assign_weights(model, native_sources(tensors), tensors, directory, dtype=dtype, device=place)
    return _aligned_int8(model).eval()


def _aligned_int8(model: Transformer) -> Transformer:
    """Copy int8 weights read in place from the file's memory map to fresh (64-byte aligned) memory.

    A tensor inside a safetensors file starts wherever the header leaves it, and the fused int8
    kernel (``torch._weight_int8pack_mm``) needs aligned weights; without the copy a loaded model
    would decode on the slower path. Returns the model.
    """
    for module in model.modules():
        if isinstance(module, Int8Linear) and module.weight.device.type == "cpu" and module.weight.data_ptr() % 64:
            module.weight = module.weight.clone()
    return model
