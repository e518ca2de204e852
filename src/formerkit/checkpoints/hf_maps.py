"""Weight-name tables between formerkit and Hugging Face checkpoints (data, read both ways).

Each rule is ``(ours, theirs, transform)``; ``{i}`` stands for a layer index and ``{p}`` for
``weight``/``bias``. ``theirs`` is a tuple when several Hugging Face tensors make one of ours
(q, k, v concatenated into the fused ``qkv`` projection). Transforms:
``copy``; ``t`` (GPT-2's Conv1D stores weights transposed); ``cat`` (concatenate along dim 0).
Names in ``BASE`` tables live under the family's base-model prefix (``transformer.``,
``model.``, ``bert.``) in checkpoints that carry a head; ``HEAD`` names never do.
"""

from __future__ import annotations

Rule = tuple[str, tuple[str, ...], str]

BASE_PREFIX = {"gpt2": "transformer.", "bert": "bert.", "llama": "model.", "mistral": "model.",
               "qwen2": "model.", "qwen3": "model."}

_GPT2_BASE: list[Rule] = [
    ("tok_embed.weight", ("wte.weight",), "copy"),
    ("pos_embed.weight", ("wpe.weight",), "copy"),
    ("blocks.{i}.ln1.{p}", ("h.{i}.ln_1.{p}",), "copy"),
    ("blocks.{i}.attn.qkv.weight", ("h.{i}.attn.c_attn.weight",), "t"),
    ("blocks.{i}.attn.qkv.bias", ("h.{i}.attn.c_attn.bias",), "copy"),
    ("blocks.{i}.attn.out.weight", ("h.{i}.attn.c_proj.weight",), "t"),
    ("blocks.{i}.attn.out.bias", ("h.{i}.attn.c_proj.bias",), "copy"),
    ("blocks.{i}.ln2.{p}", ("h.{i}.ln_2.{p}",), "copy"),
    ("blocks.{i}.mlp.fc_in.weight", ("h.{i}.mlp.c_fc.weight",), "t"),
    ("blocks.{i}.mlp.fc_in.bias", ("h.{i}.mlp.c_fc.bias",), "copy"),
    ("blocks.{i}.mlp.fc_out.weight", ("h.{i}.mlp.c_proj.weight",), "t"),
    ("blocks.{i}.mlp.fc_out.bias", ("h.{i}.mlp.c_proj.bias",), "copy"),
    ("ln_final.{p}", ("ln_f.{p}",), "copy"),
]

_LLAMA_BASE: list[Rule] = [
    ("tok_embed.weight", ("embed_tokens.weight",), "copy"),
    ("blocks.{i}.ln1.weight", ("layers.{i}.input_layernorm.weight",), "copy"),
    ("blocks.{i}.attn.qkv.{p}", ("layers.{i}.self_attn.q_proj.{p}", "layers.{i}.self_attn.k_proj.{p}",
                                 "layers.{i}.self_attn.v_proj.{p}"), "cat"),
    ("blocks.{i}.attn.out.{p}", ("layers.{i}.self_attn.o_proj.{p}",), "copy"),
    ("blocks.{i}.attn.q_norm.weight", ("layers.{i}.self_attn.q_norm.weight",), "copy"),
    ("blocks.{i}.attn.k_norm.weight", ("layers.{i}.self_attn.k_norm.weight",), "copy"),
    ("blocks.{i}.ln2.weight", ("layers.{i}.post_attention_layernorm.weight",), "copy"),
    ("blocks.{i}.mlp.fc_gate.{p}", ("layers.{i}.mlp.gate_proj.{p}",), "copy"),
    ("blocks.{i}.mlp.fc_in.{p}", ("layers.{i}.mlp.up_proj.{p}",), "copy"),
    ("blocks.{i}.mlp.fc_out.{p}", ("layers.{i}.mlp.down_proj.{p}",), "copy"),
    ("ln_final.weight", ("norm.weight",), "copy"),
]

_BERT_BASE: list[Rule] = [
    ("tok_embed.weight", ("embeddings.word_embeddings.weight",), "copy"),
    ("pos_embed.weight", ("embeddings.position_embeddings.weight",), "copy"),
    ("type_embed.weight", ("embeddings.token_type_embeddings.weight",), "copy"),
    ("embed_norm.{p}", ("embeddings.LayerNorm.{p}",), "copy"),
    ("blocks.{i}.attn.qkv.{p}", ("encoder.layer.{i}.attention.self.query.{p}",
                                 "encoder.layer.{i}.attention.self.key.{p}",
                                 "encoder.layer.{i}.attention.self.value.{p}"), "cat"),
    ("blocks.{i}.attn.out.{p}", ("encoder.layer.{i}.attention.output.dense.{p}",), "copy"),
    ("blocks.{i}.ln1.{p}", ("encoder.layer.{i}.attention.output.LayerNorm.{p}",), "copy"),
    ("blocks.{i}.mlp.fc_in.{p}", ("encoder.layer.{i}.intermediate.dense.{p}",), "copy"),
    ("blocks.{i}.mlp.fc_out.{p}", ("encoder.layer.{i}.output.dense.{p}",), "copy"),
    ("blocks.{i}.ln2.{p}", ("encoder.layer.{i}.output.LayerNorm.{p}",), "copy"),
    ("pooler.dense.{p}", ("pooler.dense.{p}",), "copy"),
]

_CAUSAL_HEAD: list[Rule] = [("lm_head.proj.weight", ("lm_head.weight",), "copy")]

_BERT_HEAD: list[Rule] = [
    ("lm_head.dense.{p}", ("cls.predictions.transform.dense.{p}",), "copy"),
    ("lm_head.norm.{p}", ("cls.predictions.transform.LayerNorm.{p}",), "copy"),
    ("lm_head.proj.weight", ("cls.predictions.decoder.weight",), "copy"),
    ("lm_head.proj.bias", ("cls.predictions.bias",), "copy"),
    ("classifier.out.{p}", ("classifier.{p}",), "copy"),
]

TABLES: dict[str, tuple[list[Rule], list[Rule]]] = {
    "gpt2": (_GPT2_BASE, _CAUSAL_HEAD),
    "bert": (_BERT_BASE, _BERT_HEAD),
    **{name: (_LLAMA_BASE, _CAUSAL_HEAD) for name in ("llama", "mistral", "qwen2", "qwen3")},
}

# Tensors some checkpoints carry that hold no weights of their own (buffers, tied copies,
# heads formerkit does not model): regular expressions over names without the base prefix.
IGNORED = {
    "gpt2": [r"h\.\d+\.attn\.(masked_)?bias"],
    "bert": [r"embeddings\.position_ids", r"cls\.predictions\.decoder\.bias", r"cls\.seq_relationship\..*"],
    **{name: [r"layers\.\d+\.self_attn\.rotary_emb\.inv_freq"] for name in ("llama", "mistral", "qwen2", "qwen3")},
}


def expand(family: str, n_layers: int) -> list[tuple[str, tuple[str, ...], str, bool]]:
    """List concrete ``(ours, theirs, transform, is_head)`` names for a model of ``n_layers``."""
    base, head = TABLES[family]
    out = []
    for rules, is_head in ((base, False), (head, True)):
        for ours, theirs, transform in rules:
            for p in ("weight", "bias") if "{p}" in ours else ("",):
                for i in range(n_layers) if "{i}" in ours else (0,):
                    fill = {"i": i, "p": p}
                    out.append((ours.format(**fill), tuple(t.format(**fill) for t in theirs), transform, is_head))
    return out
