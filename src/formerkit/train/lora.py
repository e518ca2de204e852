"""LoRA fine-tuning runs (``--lora.r R`` on top of ``--model.init_from``): adapters train, the model stays frozen.

The frozen weights always come from ``model.init_from``; the adapters' weights (formerkit names)
travel in each checkpoint's trainer state, so a resumed run rebuilds the same adapters. Each
checkpoint's model is the merged one (``from_pretrained`` of a step directory gives the
fine-tuned model), and ``RUN_DIR/adapter`` holds the latest adapter in peft's format.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch

from formerkit.compress import add_lora, save_adapter, unload_lora
from formerkit.compress.lora import lora_layers
from formerkit.errors import ConfigError
from formerkit.model import Transformer
from formerkit.train.config import TrainConfig
from formerkit.train.init_from import InitReport

ADAPTER_DIR = "adapter"
STATE_KEY = "lora"


def attach_lora(model: Transformer, cfg: TrainConfig, report: InitReport, saved: dict | None) -> str:
    """Add the run's adapters to ``model`` (initialised from ``model.init_from``); return a line for the log.

    ``saved`` is the adapters' weights of the checkpoint being resumed (None: a new run). ConfigError
    when the run's model has weights the checkpoint did not provide (a new classifier head): frozen,
    they would stay random.
    """
    if report.initialised:
        raise ConfigError(f"lora.r > 0 trains adapters only, but these weights are new and would stay random: "
                          f"{', '.join(report.initialised)}; train without --lora.r, or choose an objective whose "
                          "head the checkpoint has")
    targets = [t.strip() for t in cfg.lora.target.split(",") if t.strip()]
    add_lora(model, r=cfg.lora.r, alpha=cfg.lora.alpha, dropout=cfg.lora.dropout,
             target_modules=targets[0] if targets == ["all-linear"] else targets)
    if saved is not None:
        own = model.state_dict()
        differ = sorted(set(saved) ^ set(lora_state(model)))
        if differ:
            raise ConfigError(f"the checkpoint's LoRA weights do not fit the run's adapters: {', '.join(differ)}")
        with torch.no_grad():
            for name, tensor in saved.items():
                own[name].copy_(tensor)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return (f"LoRA: r={cfg.lora.r}, alpha={cfg.lora.alpha:g} on {', '.join(targets)}: {trainable:,} trainable "
            f"parameters of {total:,}; the adapter is saved in peft's format to {cfg.checkpoint.run_dir}/{ADAPTER_DIR}")


def lora_state(model: Transformer) -> dict[str, torch.Tensor]:
    """The adapters' weights by formerkit name (``blocks.0.attn.qkv.adapters.q.lora_A.weight``, ...), cloned."""
    return {f"{name}.adapters.{key}": t.detach().clone()
            for name, layer in lora_layers(model) for key, t in layer.adapters.state_dict().items()}


def merged_copy(model: Transformer) -> Transformer:
    """A plain copy of ``model`` with its adapters merged in (what a checkpoint's model directory holds)."""
    return unload_lora(copy.deepcopy(model), merge=True)


def save_run_adapter(model: Transformer, cfg: TrainConfig) -> Path:
    """Write the adapters to ``RUN_DIR/adapter`` in peft's format; return the directory."""
    return save_adapter(model, Path(cfg.checkpoint.run_dir) / ADAPTER_DIR,
                        base_model_name_or_path=str(cfg.model["init_from"]))
