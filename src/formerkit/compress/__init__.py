"""Compression: LoRA adapters (in peft's on-disk format)."""

from formerkit.compress.lora import (
    ALL_LINEAR,
    TARGETS,
    LoraAdapter,
    LoraLinear,
    add_lora,
    lora_parameters,
    merge_lora,
    unload_lora,
    unmerge_lora,
)
from formerkit.compress.lora_format import load_adapter, save_adapter

__all__ = ["ALL_LINEAR", "TARGETS", "LoraAdapter", "LoraLinear", "add_lora", "load_adapter", "lora_parameters",
           "merge_lora", "save_adapter", "unload_lora", "unmerge_lora"]
