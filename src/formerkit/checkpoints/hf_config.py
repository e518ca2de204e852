"""Translate between Hugging Face ``config.json`` dicts and ModelConfig, through the family registry.

The translations read the fields of each family (``hf_decoders``, ``hf_encoders``,
``hf_seq2seq``) rather than a list of model names: any checkpoint of a supported
``model_type`` works whatever its sizes.
"""

from __future__ import annotations

from typing import Any

from formerkit.checkpoints.hf_common import Family, inside_vocabulary, label_maps, label_names
from formerkit.checkpoints.hf_families import family_named, family_of
from formerkit.config import ModelConfig
from formerkit.errors import ConfigError


def eos_from_hf(hf: dict[str, Any], family: Family, vocab_size: int) -> int | list[int] | None:
    """The eos id(s) of a HF config dict as transformers reads them (its own, else the family default), in vocabulary.

    Ids outside [0, vocab_size) are dropped; one id is returned as an int, several as a list, none as None.
    """
    value = hf["eos_token_id"] if "eos_token_id" in hf else family.special_ids.get("eos_token_id")
    ids = value if isinstance(value, list) else [value]
    inside = [i for i in ids if isinstance(i, int) and not isinstance(i, bool) and
              inside_vocabulary(i, vocab_size) is not None]
    return None if not inside else inside[0] if len(inside) == 1 else inside


def config_from_hf(hf: dict[str, Any]) -> ModelConfig:
    """The ModelConfig of a Hugging Face ``config.json`` dict; ConfigError for what formerkit cannot express."""
    family = family_named(hf.get("model_type"))
    values = family.config_in(hf)
    if values["head"] == "classifier":
        if not family.classifier:
            raise ConfigError(f"sequence-classification checkpoints are read for BERT and ViT only, "
                              f"not {family.model_type}")
        values["label_names"] = label_names(hf)
    if "vocab_size" in values and not values.get("patch_size"):
        values["eos_token_id"] = eos_from_hf(hf, family, values["vocab_size"])
    return ModelConfig.from_dict(values)


def config_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    """The Hugging Face ``config.json`` dict of ``cfg``; ConfigError when no family's layout holds it.

    A text model's dict records its vocabulary and writes every special id of the family
    explicitly, each inside the vocabulary or null (transformers' defaults may lie outside it).
    """
    family = family_of(cfg)
    out: dict[str, Any] = {"model_type": family.model_type, "architectures": [family.architecture(cfg.head)],
                           "torch_dtype": "float32"}
    if cfg.patch_size is None:
        out.update(vocab_size=cfg.vocab_size, tie_word_embeddings=cfg.tie_embeddings,
                   **{k: inside_vocabulary(v, cfg.vocab_size) for k, v in family.special_ids.items()})
        if cfg.pad_token_id is not None:
            out["pad_token_id"] = cfg.pad_token_id
        if cfg.eos_token_id is not None:
            out["eos_token_id"] = cfg.eos_token_id
    if cfg.head == "classifier":
        out.update(label_maps(cfg))
    out.update(family.config_out(cfg))
    return out
