"""Weight-name tables between formerkit and Hugging Face checkpoints (data, read both ways).

Each rule is ``(ours, theirs, transform)``; ``{i}`` stands for a layer index and ``{p}`` for
``weight``/``bias``. ``theirs`` is a tuple when several Hugging Face tensors make one of ours
(q, k, v concatenated into the fused ``qkv`` projection). Transforms:
``copy``; ``t`` (GPT-2's Conv1D stores weights transposed); ``cat`` (concatenate along dim 0; also
the per-expert tensors of a mixture of experts, stacked into formerkit's ``w_in`` and ``w_out``);
``unbatch`` (ViT stores its position table as a (1, N, D) parameter; ours is the (N, D) weight);
``tied`` (one tensor kept under several names, BART's and T5's ``shared`` table and its
encoder/decoder copies: the first name is required, the others must equal it where present,
and all are written).
A ``Table`` is (base rules, head rules). Base names live under the family's base-model prefix
(``transformer.``, ``model.``, ``bert.``: ``Family.base_prefix``) in checkpoints that carry a
head; head names never do. Which family uses which table is said by the registry in ``hf_families``.
"""

from __future__ import annotations

Rule = tuple[str, tuple[str, ...], str]
Table = tuple[list[Rule], list[Rule]]

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

# ViT as transformers writes it (the hub layout; transformers renames it on load).
_VIT_BASE: list[Rule] = [
    ("patch_embed.cls_token", ("embeddings.cls_token",), "copy"),
    ("patch_embed.proj.{p}", ("embeddings.patch_embeddings.projection.{p}",), "copy"),
    ("pos_embed.weight", ("embeddings.position_embeddings",), "unbatch"),
    ("blocks.{i}.ln1.{p}", ("encoder.layer.{i}.layernorm_before.{p}",), "copy"),
    ("blocks.{i}.attn.qkv.{p}", ("encoder.layer.{i}.attention.attention.query.{p}",
                                 "encoder.layer.{i}.attention.attention.key.{p}",
                                 "encoder.layer.{i}.attention.attention.value.{p}"), "cat"),
    ("blocks.{i}.attn.out.{p}", ("encoder.layer.{i}.attention.output.dense.{p}",), "copy"),
    ("blocks.{i}.ln2.{p}", ("encoder.layer.{i}.layernorm_after.{p}",), "copy"),
    ("blocks.{i}.mlp.fc_in.{p}", ("encoder.layer.{i}.intermediate.dense.{p}",), "copy"),
    ("blocks.{i}.mlp.fc_out.{p}", ("encoder.layer.{i}.output.dense.{p}",), "copy"),
    ("ln_final.{p}", ("layernorm.{p}",), "copy"),
    ("pooler.dense.{p}", ("pooler.dense.{p}",), "copy"),
]

_VIT_HEAD: list[Rule] = [("classifier.out.{p}", ("classifier.{p}",), "copy")]


def _both_stacks(rules: list[Rule]) -> list[Rule]:
    """Write rules templated by ``{s}`` (stack) and ``{ff}`` (T5's feed-forward sublayer) for encoder and decoder."""
    out = []
    for stack, ff in (("encoder", "1"), ("decoder", "2")):
        out += [(_fill(ours, stack, ff), tuple(_fill(t, stack, ff) for t in theirs), transform)
                for ours, theirs, transform in rules]
    return out


def _fill(name: str, stack: str, ff: str) -> str:
    return name.replace("{s}", stack).replace("{ff}", ff)


# One token table for encoder, decoder and (tied) output; checkpoints may also hold the stacks' copies.
_SHARED_EMBED: list[Rule] = [
    ("tok_embed.weight", ("shared.weight", "encoder.embed_tokens.weight", "decoder.embed_tokens.weight"), "tied"),
]

_BART_BASE: list[Rule] = _SHARED_EMBED + _both_stacks([
    ("{s}.pos_embed.weight", ("{s}.embed_positions.weight",), "copy"),
    ("{s}.embed_norm.{p}", ("{s}.layernorm_embedding.{p}",), "copy"),
    ("{s}.blocks.{i}.attn.qkv.{p}", ("{s}.layers.{i}.self_attn.q_proj.{p}", "{s}.layers.{i}.self_attn.k_proj.{p}",
                                     "{s}.layers.{i}.self_attn.v_proj.{p}"), "cat"),
    ("{s}.blocks.{i}.attn.out.{p}", ("{s}.layers.{i}.self_attn.out_proj.{p}",), "copy"),
    ("{s}.blocks.{i}.ln1.{p}", ("{s}.layers.{i}.self_attn_layer_norm.{p}",), "copy"),
    ("{s}.blocks.{i}.mlp.fc_in.{p}", ("{s}.layers.{i}.fc1.{p}",), "copy"),
    ("{s}.blocks.{i}.mlp.fc_out.{p}", ("{s}.layers.{i}.fc2.{p}",), "copy"),
    ("{s}.blocks.{i}.ln2.{p}", ("{s}.layers.{i}.final_layer_norm.{p}",), "copy"),
]) + [
    ("decoder.blocks.{i}.cross_attn.q.{p}", ("decoder.layers.{i}.encoder_attn.q_proj.{p}",), "copy"),
    ("decoder.blocks.{i}.cross_attn.kv.{p}", ("decoder.layers.{i}.encoder_attn.k_proj.{p}",
                                              "decoder.layers.{i}.encoder_attn.v_proj.{p}"), "cat"),
    ("decoder.blocks.{i}.cross_attn.out.{p}", ("decoder.layers.{i}.encoder_attn.out_proj.{p}",), "copy"),
    ("decoder.blocks.{i}.ln_cross.{p}", ("decoder.layers.{i}.encoder_attn_layer_norm.{p}",), "copy"),
]

_BART_HEAD: list[Rule] = [
    ("lm_head.proj.weight", ("lm_head.weight",), "copy"),
    ("lm_head.proj.bias", ("final_logits_bias",), "unbatch"),  # a (1, vocab) buffer in the checkpoint
]

# T5: the first layer of each stack holds the stack's relative position bias; sublayer 0 is
# self-attention, then (decoder) 1 cross-attention, then the feed-forward sublayer {ff}.
_T5_STACK: list[Rule] = [
    ("{s}.pos_bias.weight", ("{s}.block.0.layer.0.SelfAttention.relative_attention_bias.weight",), "copy"),
    ("{s}.blocks.{i}.ln1.weight", ("{s}.block.{i}.layer.0.layer_norm.weight",), "copy"),
    ("{s}.blocks.{i}.attn.qkv.weight", ("{s}.block.{i}.layer.0.SelfAttention.q.weight",
                                        "{s}.block.{i}.layer.0.SelfAttention.k.weight",
                                        "{s}.block.{i}.layer.0.SelfAttention.v.weight"), "cat"),
    ("{s}.blocks.{i}.attn.out.weight", ("{s}.block.{i}.layer.0.SelfAttention.o.weight",), "copy"),
    ("{s}.blocks.{i}.ln2.weight", ("{s}.block.{i}.layer.{ff}.layer_norm.weight",), "copy"),
    ("{s}.blocks.{i}.mlp.fc_out.weight", ("{s}.block.{i}.layer.{ff}.DenseReluDense.wo.weight",), "copy"),
    ("{s}.ln_final.weight", ("{s}.final_layer_norm.weight",), "copy"),
]

_T5_CROSS: list[Rule] = [
    ("decoder.blocks.{i}.ln_cross.weight", ("decoder.block.{i}.layer.1.layer_norm.weight",), "copy"),
    ("decoder.blocks.{i}.cross_attn.q.weight", ("decoder.block.{i}.layer.1.EncDecAttention.q.weight",), "copy"),
    ("decoder.blocks.{i}.cross_attn.kv.weight", ("decoder.block.{i}.layer.1.EncDecAttention.k.weight",
                                                 "decoder.block.{i}.layer.1.EncDecAttention.v.weight"), "cat"),
    ("decoder.blocks.{i}.cross_attn.out.weight", ("decoder.block.{i}.layer.1.EncDecAttention.o.weight",), "copy"),
]

_T5_MLP: list[Rule] = [("{s}.blocks.{i}.mlp.fc_in.weight", ("{s}.block.{i}.layer.{ff}.DenseReluDense.wi.weight",),
                        "copy")]
_T5_GATED_MLP: list[Rule] = [  # T5 v1.1: act(wi_0 x) * wi_1 x
    ("{s}.blocks.{i}.mlp.fc_gate.weight", ("{s}.block.{i}.layer.{ff}.DenseReluDense.wi_0.weight",), "copy"),
    ("{s}.blocks.{i}.mlp.fc_in.weight", ("{s}.block.{i}.layer.{ff}.DenseReluDense.wi_1.weight",), "copy"),
]

def _experts_rules(moe: str, gate: str, up: str, down: str, n_experts: int) -> list[Rule]:
    """Rules of one sparse layer's stacked experts: each expert's gate then up rows into ``w_in``, downs into ``w_out``.

    ``moe`` is the layer's mixture module under ``layers.{i}``; the rest name an expert's projections.
    """
    expert = "layers.{i}." + moe + ".experts.{e}.{w}.weight"
    ins = tuple(expert.replace("{e}", str(e)).replace("{w}", w) for e in range(n_experts) for w in (gate, up))
    outs = tuple(expert.replace("{e}", str(e)).replace("{w}", down) for e in range(n_experts))
    return [("blocks.{i}.mlp.w_in", ins, "cat"), ("blocks.{i}.mlp.w_out", outs, "cat"),
            ("blocks.{i}.mlp.router.weight", (f"layers.{{i}}.{moe}.gate.weight",), "copy")]


def mixtral_table(n_experts: int) -> Table:
    """Mixtral: the Llama layout with every feed-forward a ``block_sparse_moe`` of w1 (gate), w3 (up), w2 (down)."""
    return (_LLAMA_BASE + _experts_rules("block_sparse_moe", "w1", "w3", "w2", n_experts), _CAUSAL_HEAD)


def qwen2_moe_table(n_experts: int) -> Table:
    """Qwen2-MoE: the Llama layout (dense layers as Llama's) with sparse ``mlp`` layers and a gated shared expert."""
    shared = [
        ("blocks.{i}.mlp.shared.fc_gate.weight", ("layers.{i}.mlp.shared_expert.gate_proj.weight",), "copy"),
        ("blocks.{i}.mlp.shared.fc_in.weight", ("layers.{i}.mlp.shared_expert.up_proj.weight",), "copy"),
        ("blocks.{i}.mlp.shared.fc_out.weight", ("layers.{i}.mlp.shared_expert.down_proj.weight",), "copy"),
        ("blocks.{i}.mlp.shared_gate.weight", ("layers.{i}.mlp.shared_expert_gate.weight",), "copy"),
    ]
    return (_LLAMA_BASE + _experts_rules("mlp", "gate_proj", "up_proj", "down_proj", n_experts) + shared,
            _CAUSAL_HEAD)


GPT2: Table = (_GPT2_BASE, _CAUSAL_HEAD)
LLAMA: Table = (_LLAMA_BASE, _CAUSAL_HEAD)
BERT: Table = (_BERT_BASE, _BERT_HEAD)
VIT: Table = (_VIT_BASE, _VIT_HEAD)
BART: Table = (_BART_BASE, _BART_HEAD)
T5: Table = (_SHARED_EMBED + _both_stacks(_T5_STACK + _T5_MLP) + _T5_CROSS, _CAUSAL_HEAD)
T5_GATED: Table = (_SHARED_EMBED + _both_stacks(_T5_STACK + _T5_GATED_MLP) + _T5_CROSS, _CAUSAL_HEAD)


def expand(
    table: Table, n_layers: int, n_decoder_layers: int | None = None
) -> list[tuple[str, tuple[str, ...], str, bool]]:
    """List concrete ``(ours, theirs, transform, is_head)`` names of ``table`` for a model of ``n_layers``.

    Rules for ``decoder.`` names of an encoder-decoder count ``n_decoder_layers`` layers
    (default: ``n_layers``).
    """
    base, head = table
    out = []
    for rules, is_head in ((base, False), (head, True)):
        for ours, theirs, transform in rules:
            depth = n_decoder_layers if ours.startswith("decoder.") and n_decoder_layers is not None else n_layers
            for p in ("weight", "bias") if "{p}" in ours else ("",):
                for i in range(depth) if "{i}" in ours else (0,):
                    fill = {"i": i, "p": p}
                    out.append((ours.format(**fill), tuple(t.format(**fill) for t in theirs), transform, is_head))
    return out
