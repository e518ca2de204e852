"""What every Hugging Face family shares: the ``Family`` record and the helpers its translations use.

A ``Family`` is one entry of the registry in ``hf_families``: how one ``model_type`` of
transformers maps to formerkit, both for ``config.json`` and for the weights.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from formerkit.checkpoints.hf_maps import Table
from formerkit.config import ModelConfig
from formerkit.errors import ConfigError

HF_ACTIVATIONS = {
    "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu_fast": "gelu_tanh",
    "gelu": "gelu", "relu": "relu", "silu": "silu", "swish": "silu",
}
TO_HF_ACTIVATION = {"gelu_tanh": "gelu_new", "gelu": "gelu", "relu": "relu", "silu": "silu"}
_ARCH_SUFFIX = {"lm": "ForCausalLM", "mlm": "ForMaskedLM", "classifier": "ForSequenceClassification",
                "none": "Model"}


@dataclass(frozen=True)
class Family:
    """One Hugging Face model family (a ``model_type``) and how formerkit reads and writes it.

    ``kind``, ``position`` (None: any, the family's ``problems`` name the one it needs) and
    ``images`` are the config fields that pick the family a model is written as; where several
    families share them (the Llama family), ``fits`` picks one.
    ``config_in`` turns a ``config.json`` dict into ModelConfig fields (ConfigError for what
    formerkit cannot express); ``config_out`` gives the family's own ``config.json`` fields
    for a config; ``problems`` lists the fields of a config the family's layout cannot hold.
    ``weights`` gives the weight-name table (``hf_maps``) for a config; ``base_prefix`` is
    where the base model's weights sit in a checkpoint with a head; ``ignored`` holds regular
    expressions of checkpoint tensors that carry no weight of formerkit's (buffers, unused
    heads). ``special_ids`` are transformers' defaults for the family's special token ids.
    ``experts``: the family holds mixtures of experts, and only configs with ``n_experts`` > 0 are written as it.
    """

    model_type: str
    kind: str
    position: str | None
    config_in: Callable[[dict[str, Any]], dict[str, Any]]
    config_out: Callable[[ModelConfig], dict[str, Any]]
    problems: Callable[[ModelConfig], list[str]]
    architecture: Callable[[str], str]
    weights: Callable[[ModelConfig], Table]
    base_prefix: str
    images: bool = False
    fits: Callable[[ModelConfig], bool] = lambda cfg: True
    ignored: tuple[str, ...] = ()
    special_ids: dict[str, int | None] = field(default_factory=dict)
    classifier: bool = False  # sequence-classification checkpoints are read and written
    experts: bool = False  # the family's feed-forwards are mixtures of experts (written only for n_experts > 0)


def activation(hf: dict[str, Any], key: str, default: str) -> str:
    """formerkit's activation for the HF activation named by ``hf[key]``; ConfigError for an unknown one."""
    name = hf.get(key, default)
    if name not in HF_ACTIVATIONS:
        raise ConfigError(f'{key}="{name}" is not supported; formerkit knows {", ".join(HF_ACTIVATIONS)}')
    return HF_ACTIVATIONS[name]


def mismatches(cfg: ModelConfig, **required: Any) -> list[str]:
    """One ``field=value (needs required)`` line per field of ``cfg`` that differs from ``required``."""
    return [f"{k}={getattr(cfg, k)!r} (needs {v!r})" for k, v in required.items() if getattr(cfg, k) != v]


def head_from_architectures(hf: dict[str, Any], default: str) -> str:
    """The formerkit head named by the ``architectures`` class names of a HF config, else ``default``."""
    for arch in hf.get("architectures") or []:
        if arch.endswith(("ForCausalLM", "LMHeadModel", "ForConditionalGeneration")):
            return "lm"
        if arch.endswith(("ForMaskedLM", "ForPreTraining")):
            return "mlm"
        if arch.endswith("ForSequenceClassification"):
            return "classifier"
        if arch.endswith("Model"):
            return "none"
    return default


def architecture_by_suffix(prefix: str) -> Callable[[str], str]:
    """A function naming the transformers class of a head: ``prefix`` + ForCausalLM / ForMaskedLM / ... / Model."""
    return lambda head: prefix + _ARCH_SUFFIX[head]


def num_labels(hf: dict[str, Any]) -> int:
    """The number of classes of a HF config: its ``id2label`` size, else ``num_labels`` (default 2)."""
    return len(hf["id2label"]) if hf.get("id2label") else int(hf.get("num_labels", 2))


def label_names(hf: dict[str, Any]) -> list[str] | None:
    """The class names of ``id2label`` in id order, or None: without a map, for transformers' default names
    (LABEL_0, LABEL_1, ...), and for a map formerkit cannot hold (ids not 0..n-1, names not distinct strings)."""
    id2label = hf.get("id2label")
    if not isinstance(id2label, dict) or not id2label:
        return None
    by_id = {str(k): v for k, v in id2label.items()}
    names = [by_id.get(str(i)) for i in range(len(by_id))]
    if not all(isinstance(n, str) for n in names) or len(set(names)) != len(names):
        return None
    return None if names == [f"LABEL_{i}" for i in range(len(names))] else names


def label_maps(cfg: ModelConfig) -> dict[str, dict]:
    """HF's ``id2label`` and ``label2id`` of a classifier: its label_names, else transformers' LABEL_i names."""
    names = cfg.label_names or [f"LABEL_{i}" for i in range(cfg.num_labels)]
    return {"id2label": {str(i): n for i, n in enumerate(names)}, "label2id": {n: i for i, n in enumerate(names)}}


def inside_vocabulary(token_id: int | None, vocab_size: int) -> int | None:
    """``token_id`` when it is a token of a vocabulary of ``vocab_size``, else None."""
    return token_id if token_id is not None and 0 <= token_id < vocab_size else None
