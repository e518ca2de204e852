"""The registry of Hugging Face families formerkit reads and writes, and the choice of one for a config.

Every family-specific rule (config fields both ways, the fields a layout cannot hold, the
weight table, the base-model prefix, ignored tensors, default special ids) sits in the
family's ``Family`` entry; the code that reads and writes checkpoints asks this registry
instead of branching on names.
"""

from __future__ import annotations

from formerkit.checkpoints.hf_common import Family
from formerkit.checkpoints.hf_decoders import DECODER_FAMILIES
from formerkit.checkpoints.hf_encoders import ENCODER_FAMILIES
from formerkit.checkpoints.hf_moe import MOE_FAMILIES
from formerkit.checkpoints.hf_seq2seq import SEQ2SEQ_FAMILIES
from formerkit.config import ModelConfig
from formerkit.errors import ConfigError

# in the order family_of tries them: the first family a config fits is the one it is written as
FAMILIES: dict[str, Family] = {f.model_type: f for f in (*ENCODER_FAMILIES, *SEQ2SEQ_FAMILIES, *DECODER_FAMILIES,
                                                            *MOE_FAMILIES)}


def family_named(model_type: str | None) -> Family:
    """The family of a ``config.json``'s ``model_type``; ConfigError when it is absent or not supported."""
    if model_type is None:
        raise ConfigError("the Hugging Face config has no model_type; is this a transformers config.json?")
    if model_type not in FAMILIES:
        raise ConfigError(f'Hugging Face model_type "{model_type}" is not supported; formerkit reads '
                          f"{', '.join(FAMILIES)}")
    return FAMILIES[model_type]


def _matches(family: Family, cfg: ModelConfig) -> bool:
    return (family.kind == cfg.kind and family.images == (cfg.patch_size is not None)
            and family.position in (None, cfg.position) and family.experts == (cfg.n_experts > 0) and family.fits(cfg))


def family_of(cfg: ModelConfig) -> Family:
    """The family whose Hugging Face layout holds ``cfg``; ConfigError naming every field that does not fit."""
    if cfg.per_layer_sizes:
        listed = [f"{name}={getattr(cfg, name)}" for name in ("n_heads", "n_kv_heads", "d_ff")
                  if isinstance(getattr(cfg, name), list)]
        raise ConfigError(f"per-layer sizes ({', '.join(listed)}: a pruned model) have no Hugging Face layout in the "
                          "families formerkit writes; save with format='native' instead")
    variants = [f"{name}={getattr(cfg, name)!r}" for name, plain in (("attn_type", "softmax"), ("attn_gate", False),
                                                                      ("exit_layers", None))
                if getattr(cfg, name) != plain]
    if variants:
        raise ConfigError(f"{', '.join(variants)} has no Hugging Face layout; save with format='native' instead")
    family = next((f for f in FAMILIES.values() if _matches(f, cfg)), None)
    if family is None and cfg.n_experts > 0:
        raise ConfigError(f"a mixture of experts is written as a Hugging Face mixtral or qwen2_moe model (a decoder "
                          f"with position='rope'), but this config has kind={cfg.kind!r}, position={cfg.position!r}; "
                          "save with format='native' instead")
    if family is None:
        same_kind = [f for f in FAMILIES.values() if f.kind == cfg.kind and f.images == (cfg.patch_size is not None)]
        positions: dict[str, list[str]] = {}
        for f in same_kind:
            positions.setdefault(repr(f.position), []).append(f.model_type)
        known = " or ".join(f"{p} ({', '.join(names)})" for p, names in positions.items())
        hint = f" (a Hugging Face {cfg.kind} has position {known})" if known else ""
        raise ConfigError(f"no Hugging Face family matches kind={cfg.kind!r} with position={cfg.position!r}{hint}; "
                          "save with format='native' instead")
    problems = family.problems(cfg)
    if cfg.head == "classifier" and not family.classifier:
        classifiers = " and ".join(f.model_type for f in FAMILIES.values() if f.classifier)
        problems.append(f"head='classifier' (only {classifiers} classifiers are written in the Hugging Face layout)")
    if problems:
        raise ConfigError(f"this config cannot be written as a Hugging Face {family.model_type} model: "
                          f"{'; '.join(problems)}; save with format='native' instead")
    return family
