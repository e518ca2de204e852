"""The special token ids (bos, eos, pad, ...) a Hugging Face ``config.json`` records, all inside the vocabulary.

transformers fills an id that config.json leaves out with its family's default (GPT-2's eos and
bos: 50256), which lies outside a small vocabulary. ``config_to_hf`` therefore writes each such
key explicitly (``Family.special_ids``): the default where it is a token of the vocabulary,
else null. ``with_tokenizer_ids`` replaces them by the ids of the tokenizer saved beside the model.
"""

from __future__ import annotations

from typing import Any

from formerkit.checkpoints.hf_common import inside_vocabulary
from formerkit.checkpoints.hf_families import FAMILIES
from formerkit.config import ModelConfig
from formerkit.tokenizers import HFTokenizer, Tokenizer


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
    family = FAMILIES.get(hf_config.get("model_type"))
    if family is None or "vocab_size" not in hf_config:
        return out
    ids = tokenizer_ids(tokenizer)
    roles = {"bos_token_id": ids["bos"], "eos_token_id": ids["eos"], "forced_eos_token_id": ids["eos"]}
    for key in family.special_ids:
        if key in roles:
            out[key] = inside_vocabulary(roles[key], cfg.vocab_size)
    out["pad_token_id"] = inside_vocabulary(cfg.pad_token_id if ids["pad"] is None else ids["pad"], cfg.vocab_size)
    return out
