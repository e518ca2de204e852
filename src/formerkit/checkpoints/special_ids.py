"""The special token ids (bos, eos, pad, ...) a Hugging Face ``config.json`` records, all inside the vocabulary.

transformers fills an id that config.json leaves out with its family's default (GPT-2's eos and
bos: 50256), which lies outside a small vocabulary. ``default_ids`` therefore writes each such
key explicitly: the default where it is a token of the vocabulary, else null.
``with_tokenizer_ids`` replaces them by the ids of the tokenizer saved beside the model.
"""

from __future__ import annotations

from typing import Any

from formerkit.config import ModelConfig
from formerkit.tokenizers import HFTokenizer, Tokenizer

# transformers' defaults for the special ids of each family's config class (transformers 5)
FAMILY_DEFAULTS: dict[str, dict[str, int | None]] = {
    "gpt2": {"bos_token_id": 50256, "eos_token_id": 50256},
    "llama": {"bos_token_id": 1, "eos_token_id": 2},
    "mistral": {"bos_token_id": 1, "eos_token_id": 2},
    "qwen2": {"bos_token_id": None, "eos_token_id": None},
    "qwen3": {"bos_token_id": None, "eos_token_id": None},
    "bert": {"pad_token_id": 0},
    "bart": {"bos_token_id": 0, "eos_token_id": 2, "forced_eos_token_id": 2, "pad_token_id": 1},
    "t5": {"eos_token_id": 1, "pad_token_id": 0},
}


def _inside(token_id: int | None, vocab_size: int) -> int | None:
    return token_id if token_id is not None and 0 <= token_id < vocab_size else None


def default_ids(family: str, vocab_size: int) -> dict[str, int | None]:
    """transformers' default special ids of ``family``, each replaced by None where it is outside the vocabulary."""
    return {key: _inside(value, vocab_size) for key, value in FAMILY_DEFAULTS.get(family, {}).items()}


def eos_from_hf(hf: dict[str, Any], vocab_size: int) -> int | list[int] | None:
    """The eos id(s) of a HF config dict as transformers reads them (its own, else the family default), in vocabulary.

    Ids outside [0, vocab_size) are dropped; one id is returned as an int, several as a list, none as None.
    """
    value = hf["eos_token_id"] if "eos_token_id" in hf else FAMILY_DEFAULTS.get(hf.get("model_type"), {}).get(
        "eos_token_id")
    ids = value if isinstance(value, list) else [value]
    inside = [i for i in ids if isinstance(i, int) and not isinstance(i, bool) and _inside(i, vocab_size) is not None]
    return None if not inside else inside[0] if len(inside) == 1 else inside


def tokenizer_ids(tokenizer: Tokenizer) -> dict[str, int | None]:
    """The ids of a tokenizer's roles: {"bos": ..., "eos": ..., "pad": ...} (None where it has no such token).

    A tokenizer without a bos token gives its eos id as bos: formerkit's training separates
    documents with eos, so eos is what a text follows.
    """
    eos = tokenizer.eos_id
    if isinstance(tokenizer, HFTokenizer):
        bos, pad = tokenizer.token_id("bos"), tokenizer.token_id("pad")
    else:
        bos, pad = None, tokenizer.pad_id
    return {"bos": eos if bos is None else bos, "eos": eos, "pad": pad}


def with_tokenizer_ids(hf_config: dict[str, Any], cfg: ModelConfig, tokenizer: Tokenizer) -> dict[str, Any]:
    """A copy of ``hf_config`` whose special ids come from ``tokenizer``; ids outside the vocabulary become None.

    The family's bos/eos keys (BART's forced eos too) take the tokenizer's ids; pad_token_id is
    the tokenizer's pad token, else the model config's own. A config without a vocabulary (ViT)
    is returned unchanged.
    """
    out = dict(hf_config)
    family = hf_config.get("model_type")
    if family not in FAMILY_DEFAULTS or "vocab_size" not in hf_config:
        return out
    ids = tokenizer_ids(tokenizer)
    roles = {"bos_token_id": ids["bos"], "eos_token_id": ids["eos"], "forced_eos_token_id": ids["eos"]}
    for key in FAMILY_DEFAULTS[family]:
        if key in roles:
            out[key] = _inside(roles[key], cfg.vocab_size)
    out["pad_token_id"] = _inside(cfg.pad_token_id if ids["pad"] is None else ids["pad"], cfg.vocab_size)
    return out
