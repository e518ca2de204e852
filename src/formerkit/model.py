"""Transformer: embeddings -> stack(s) of blocks -> head, for all three kinds of model.

A decoder-only or encoder-only model keeps its one stack's modules at the top level, so
hook names read ``blocks.0.attn.hook_pattern`` as interpretability tooling expects. An
encoder-decoder model has an ``encoder`` and a ``decoder`` stack with the same layout
(``encoder.blocks.0...``, ``decoder.blocks.0.cross_attn...``) and one shared token table.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from formerkit.cache import KVCache
from formerkit.config import ModelConfig
from formerkit.errors import InputError
from formerkit.heads import (
    ClassifierHead,
    ExitHeads,
    LMHead,
    Pooler,
    causal_lm_loss,
    classification_loss,
    pool,
    token_loss,
)
from formerkit.inputs import (
    check_ids,
    check_labels,
    check_mask,
    check_pixel_values,
    check_positions,
    check_targets,
    check_token_types,
)
from formerkit.layers.block import Block
from formerkit.layers.hooks import HookPoint
from formerkit.layers.masks import attention_bias
from formerkit.layers.norm import build_norm
from formerkit.layers.patch import PatchEmbed
from formerkit.layers.position import RelativePositionBias, Rotary, alibi_slopes, sinusoidal


@dataclass
class ModelOutput:
    """What a forward pass returns.

    logits: (B, T, vocab) for LM heads, (B, num_labels) for classifiers, None without a head.
    loss: scalar when labels were given. hidden_states: the last stack's output (B, T, d_model).
    pooled: (B, d_model) from the pooler or classifier pooling, when there is one.
    encoder_hidden_states: the encoder output of an encoder-decoder model.
    exit_logits: a decoder with early exits, while training or given labels: each exit's logits (B, T, vocab).
    """

    logits: torch.Tensor | None
    hidden_states: torch.Tensor
    loss: torch.Tensor | None = None
    pooled: torch.Tensor | None = None
    encoder_hidden_states: torch.Tensor | None = None
    exit_logits: list[torch.Tensor] | None = None


@dataclass
class ExitRun:
    """The early exits of one pass through a stack: ``layers`` are the blocks with an exit; the stream after
    each is appended to ``states``. With ``leave`` (decoding), after an exit block ``leave(index, x)`` says
    whether to stop there: the later blocks then only take keys and values of that stream into their cache,
    and ``exited`` holds the exit's index."""

    layers: tuple[int, ...]
    states: list[torch.Tensor] = field(default_factory=list)
    leave: Callable[[int, torch.Tensor], bool] | None = None
    exited: int | None = None


def _add_stack_modules(owner: nn.Module, cfg: ModelConfig, n_layers: int, *, cross: bool, types: bool) -> None:
    """Give ``owner`` the modules of one stack: positions, embedding norm, blocks, final norm."""
    learned = cfg.position == "learned"
    owner.pos_embed = nn.Embedding(cfg.max_seq_len + cfg.position_offset, cfg.d_model) if learned else None
    causal = cross or cfg.kind == "decoder"  # a decoder stack: T5 buckets only the keys up to the query
    owner.pos_bias = RelativePositionBias(cfg.relative_buckets, cfg.relative_max_distance, cfg.n_heads,
                                          bidirectional=not causal) if cfg.position == "relative" else None
    owner.type_embed = nn.Embedding(cfg.type_vocab_size, cfg.d_model) if types else None
    owner.embed_norm = build_norm(cfg.norm, cfg.d_model, cfg.norm_eps, cfg.norm_bias) if cfg.embed_norm else None
    owner.embed_dropout = nn.Dropout(cfg.embed_dropout)
    owner.rotary = Rotary(cfg.rotary_dim, cfg.rope_theta) if cfg.position == "rope" else None
    if cfg.position == "alibi":
        owner.register_buffer("alibi_slopes", alibi_slopes(cfg.n_heads), persistent=False)
    else:
        owner.alibi_slopes = None
    owner.hook_embed, owner.hook_pos_embed = HookPoint(), HookPoint()
    owner.blocks = nn.ModuleList(Block(cfg.layer_config(i), cross=cross) for i in range(n_layers))
    owner.ln_final = build_norm(cfg.norm, cfg.d_model, cfg.norm_eps, cfg.norm_bias) if cfg.final_norm else None


def _run_stack(
    owner: nn.Module,
    cfg: ModelConfig,
    tok_embeds: torch.Tensor,
    *,
    causal: bool,
    mask: torch.Tensor | None,
    positions: torch.Tensor,
    position_bound: int | None = None,
    token_type_ids: torch.Tensor | None = None,
    context: torch.Tensor | None = None,
    context_mask: torch.Tensor | None = None,
    cache: KVCache | None = None,
    exits: ExitRun | None = None,
) -> torch.Tensor:
    """Run one stack on token embeddings (B, T, d_model); return its output (B, T, d_model).

    ``exits``: record the stream after the exit layers and, when decoding, leave early (see ExitRun).

    ``position_bound``: a number every position is known to be below (RoPE then reads its
    table), or None. With a ``cache`` the tokens extend the cached sequence: ``mask`` then
    covers all keys (B, cached + T), of which its last T columns (the new tokens) are stored;
    the first call into an empty cache attends over its own tokens, later ones over a window of
    the static buffer (``KVCache.width`` slots: all of it on accelerators). The cache advances by T.
    """
    x = owner.hook_embed(tok_embeds)
    if owner.pos_embed is not None:
        x = x + owner.hook_pos_embed(owner.pos_embed(positions + cfg.position_offset))
    elif cfg.position == "sinusoidal":
        x = x + owner.hook_pos_embed(sinusoidal(positions, cfg.d_model).to(x.dtype))
    if owner.type_embed is not None:
        types = token_type_ids if token_type_ids is not None else torch.zeros_like(positions)
        x = x + owner.type_embed(types)
    if owner.embed_norm is not None:
        x = owner.embed_norm(x)
    x = owner.embed_dropout(x)

    B, T = x.shape[:2]
    whole = cache is not None and cache.length > 0  # attend over a window of the static buffer, masked
    k_len, query_index, key_positions, key_mask = T, None, positions, mask
    if cache is not None:
        slots = cache.claim(B, T)  # (T,)
        cache.record(slots, positions, mask[:, -T:] if mask is not None else None)
        if position_bound is not None:
            position_bound = max(position_bound, cache.max_len)  # one RoPE table for the whole cache
        if whole:
            k_len, query_index = cache.width, slots
            key_positions = cache.positions[:, :k_len]  # (B, k_len)
            key_mask = cache.key_mask[:, :k_len] if cache.padded else None  # without padding, the slots suffice
    rope = owner.rotary(positions, position_bound) if owner.rotary is not None else None
    alibi = (owner.alibi_slopes, positions, key_positions) if owner.alibi_slopes is not None else None
    relative = owner.pos_bias(positions, key_positions) if owner.pos_bias is not None else None  # (B, H, T, k_len)
    bias = attention_bias(dtype=x.dtype, q_len=T, k_len=k_len, causal=causal or whole, key_mask=key_mask,
                          sliding_window=cfg.sliding_window, alibi=alibi, position_bias=relative, device=x.device,
                          query_index=query_index)
    context_bias = None
    if context is not None and context_mask is not None:
        context_bias = attention_bias(dtype=x.dtype, q_len=T, k_len=context.shape[1], causal=False,
                                      key_mask=context_mask, device=x.device)
    for i, block in enumerate(owner.blocks):
        x = block(x, rope=rope, bias=bias, is_causal=causal and not whole, context=context,
                  context_bias=context_bias, cache=cache.layers[i] if cache is not None else None,
                  cross_cache=cache.cross[i] if cache is not None and cache.cross is not None else None)
        if exits is not None and i in exits.layers:
            exits.states.append(x)
            if exits.leave is not None and exits.leave(len(exits.states) - 1, x):
                exits.exited = len(exits.states) - 1
                for j in range(i + 1, len(owner.blocks)):  # the skipped layers cache keys and values of the exit state
                    owner.blocks[j].fill_cache(x, rope=rope, bias=bias, is_causal=causal and not whole,
                                               cache=cache.layers[j] if cache is not None else None)
                break
    if cache is not None:
        cache.advance(T)
    return owner.ln_final(x) if owner.ln_final is not None else x


class Stack(nn.Module):
    """The encoder or the decoder of an encoder-decoder model.

    ``cfg`` gives the sizes of its layers: the model's config for the encoder, its
    ``decoder_config()`` (the decoder's heads and feed-forward width) for the decoder.
    """

    def __init__(self, cfg: ModelConfig, n_layers: int, *, cross: bool) -> None:
        super().__init__()
        self.cfg = cfg
        _add_stack_modules(self, cfg, n_layers, cross=cross, types=False)

    def forward(self, tok_embeds: torch.Tensor, **kwargs) -> torch.Tensor:
        """Run the stack on token embeddings (B, T, d_model); see ``_run_stack`` for arguments."""
        return _run_stack(self, self.cfg, tok_embeds, **kwargs)


class Transformer(nn.Module):
    """Any formerkit model: decoder-only, encoder-only or encoder-decoder, chosen by ``cfg.kind``.

    Call it as ``model(input_ids, attention_mask=..., labels=...)``; encoder-decoder models
    also take ``decoder_input_ids`` (and ``decoder_attention_mask``) like the reference library.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        cfg = self.config = config
        images = cfg.patch_size is not None  # a Vision Transformer: patches replace the token table
        self.tok_embed = None if images else nn.Embedding(cfg.vocab_size, cfg.d_model, padding_idx=None)
        self.patch_embed = PatchEmbed(cfg.num_channels, cfg.d_model, cfg.patch_size, cls_token=cfg.pooling == "cls",
                                      init_std=cfg.init_std) if images else None
        if cfg.kind == "encoder-decoder":
            self.encoder = Stack(cfg, cfg.n_layers, cross=False)
            self.decoder = Stack(cfg.decoder_config(), cfg.decoder_layers, cross=True)
        else:
            _add_stack_modules(self, cfg, cfg.n_layers, cross=False, types=cfg.type_vocab_size > 0)
        self.pooler = Pooler(cfg.d_model) if cfg.pooler else None
        self.lm_head = self.classifier = None
        if cfg.head in ("lm", "mlm"):
            transform = (cfg.activation, cfg.norm, cfg.norm_eps, cfg.norm_bias) if cfg.head == "mlm" else None
            self.lm_head = LMHead(cfg.d_model, cfg.vocab_size, bias=cfg.head == "mlm" or cfg.lm_head_bias,
                                  transform=transform, scale=cfg.d_model**-0.5 if cfg.lm_head_scale else None)
        elif cfg.head == "classifier":
            self.classifier = ClassifierHead(cfg.d_model, cfg.num_labels, cfg.resid_dropout)
        self.exits = None
        if cfg.exit_layers:
            self.exits = ExitHeads(cfg.d_model, cfg.vocab_size, len(cfg.exit_layers),
                                   separate=cfg.exit_head == "separate", norm=(cfg.norm, cfg.norm_eps, cfg.norm_bias))
        self.apply(self._init_weights)
        for name, param in self.named_parameters():
            if name.endswith(("attn.out.weight", "mlp.fc_out.weight")):
                n_total = cfg.n_layers + (cfg.decoder_layers if cfg.kind == "encoder-decoder" else 0)
                nn.init.normal_(param, std=cfg.init_std / math.sqrt(2 * n_total))
        if self.lm_head is not None and cfg.tie_embeddings:
            self.lm_head.proj.weight = self.tok_embed.weight

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding, RelativePositionBias)):
            nn.init.normal_(module.weight, std=self.config.init_std)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def num_parameters(self) -> int:
        """Number of distinct parameters (tied weights counted once)."""
        return sum(p.numel() for p in self.parameters())

    def _embed_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.tok_embed(ids)  # (B, T, d_model)
        return x * math.sqrt(self.config.d_model) if self.config.embed_scale else x

    def _positions(self, ids: torch.Tensor, position_ids: torch.Tensor | None,
                   start: int = 0) -> tuple[torch.Tensor, int | None]:
        """The positions (B, T) of ``ids`` (default: consecutive from ``start``), checked, and a bound on them.

        The bound (every position is below it) lets RoPE read its table; it is read from given
        position_ids only for RoPE models (one device read per call), else None.
        """
        if position_ids is None:
            positions = torch.arange(start, start + ids.shape[1], device=ids.device).expand(ids.shape[0], -1)
            check_positions(positions, self.config)
            return positions, start + ids.shape[1]
        if tuple(position_ids.shape) != tuple(ids.shape):
            raise InputError(f"position_ids must have shape {tuple(ids.shape)}, got {tuple(position_ids.shape)}")
        check_positions(position_ids, self.config)
        if self.config.position != "rope" or torch.compiler.is_compiling():
            return position_ids, None
        return position_ids, int(position_ids.max()) + 1

    def decode(self, tokens: torch.Tensor, positions: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """Extend ``cache`` by tokens (B, T) at positions (B, T), all real tokens; return the logits (B, T, vocab).

        The per-token step of generation: it checks nothing (the caller checked the call's
        inputs once; ``formerkit.generate`` does), reads nothing back from the device, and keeps
        every tensor shape the same from one step to the next. Positions must be below the
        cache's ``position_bound`` (its ``max_len`` unless an eviction policy raised it; left-padded
        prompts count real tokens only, so they are). Encoder-decoder models read the encoder output
        from the cache, which a checked forward pass filled.
        """
        cfg = self.config
        x = self._embed_tokens(tokens)  # (B, T, d_model)
        if cfg.kind == "encoder-decoder":
            hidden = self.decoder(x, causal=True, mask=None, positions=positions,
                                  position_bound=cache.position_bound, context=cache.memory,
                                  context_mask=cache.memory_mask, cache=cache)
        else:
            hidden = _run_stack(self, cfg, x, causal=True, mask=None, positions=positions,
                                position_bound=cache.position_bound, cache=cache)
        return self.lm_head(hidden)

    def decode_with_exits(self, tokens: torch.Tensor, positions: torch.Tensor, cache: KVCache,
                          threshold: float) -> tuple[torch.Tensor, int]:
        """``decode`` for a decoder with early exits: leave at the first exit whose most likely next token has
        probability >= ``threshold`` in every row (the skipped layers cache keys and values of the exit's
        stream, so later tokens see a consistent cache), else run every layer.

        Returns the logits (B, T, vocab) of the exit taken (or the LM head's) and the layers run.
        """
        cfg = self.config
        if self.exits is None:
            raise InputError("this model has no early exits (exit_layers is null); decode with every layer")

        def leave(index: int, x: torch.Tensor) -> bool:
            confidence = self.exits(index, x[:, -1:], self.lm_head).float().softmax(-1).amax(-1)  # (B, 1)
            return bool((confidence >= threshold).all())

        run = ExitRun(tuple(cfg.exit_layers), leave=leave)
        hidden = _run_stack(self, cfg, self._embed_tokens(tokens), causal=True, mask=None, positions=positions,
                            position_bound=cache.max_len, cache=cache, exits=run)
        if run.exited is None:
            return self.lm_head(hidden), cfg.n_layers
        return self.exits(run.exited, run.states[-1], self.lm_head), cfg.exit_layers[run.exited] + 1

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        *,
        labels: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        decoder_input_ids: torch.Tensor | None = None,
        decoder_attention_mask: torch.Tensor | None = None,
        cache: KVCache | None = None,
        pixel_values: torch.Tensor | None = None,
    ) -> ModelOutput:
        """Run the model and its head.

        input_ids: (B, T) token ids (the source, for encoder-decoder models; may be None once
        a cache holds the encoder output).
        attention_mask: (B, T) 1 for real tokens, 0 for padding; with a cache, (B, cached + T).
        position_ids: (B, T) positions; default: consecutive, after the cached tokens.
        cache: a ``KVCache`` to extend (prefill, then one call per generated token).
        labels: next-token targets (B, T) for causal LM (shifted inside, as in the reference
        library); per-position targets for masked LM and for encoder-decoder models
        (aligned with decoder_input_ids); class ids (B,) for classifiers. -100 is ignored.
        pixel_values: (B, C, H, W) images, the only input of an image model (``patch_size`` set).
        Returns a ModelOutput.
        """
        cfg = self.config
        if cfg.patch_size is not None:
            others = {"input_ids": input_ids, "attention_mask": attention_mask, "token_type_ids": token_type_ids,
                      "position_ids": position_ids, "decoder_input_ids": decoder_input_ids,
                      "decoder_attention_mask": decoder_attention_mask, "cache": cache}
            return self._forward_images(pixel_values, labels, [name for name, v in others.items() if v is not None])
        if pixel_values is not None:
            raise InputError("pixel_values given, but this is a text model (patch_size=None); pass input_ids")
        if cache is not None and cfg.kind == "encoder":
            raise InputError("an encoder-only model has no KV cache")
        if cfg.kind == "encoder-decoder":
            if input_ids is not None:
                check_ids("input_ids", input_ids, cfg)
                check_mask("attention_mask", attention_mask, input_ids)
            elif cache is None or cache.memory is None:
                raise InputError("input_ids (the source) is required unless the cache already holds the encoder output")
            return self._forward_seq2seq(input_ids, attention_mask, position_ids, labels,
                                         decoder_input_ids, decoder_attention_mask, cache)
        check_ids("input_ids", input_ids, cfg)
        past = cache.length if cache is not None else 0
        check_mask("attention_mask", attention_mask, input_ids, past)
        positions, bound = self._positions(input_ids, position_ids, past)
        if labels is not None and cfg.head == "none":
            raise InputError("labels given, but this model has no head to compute a loss (head='none')")
        if cfg.kind != "encoder-decoder" and (decoder_input_ids is not None or decoder_attention_mask is not None):
            raise InputError(f"decoder_input_ids/decoder_attention_mask are for encoder-decoder models; "
                             f"this is a {cfg.kind}-only model")
        if token_type_ids is not None:
            check_token_types(token_type_ids, input_ids, cfg)
        with_exits = self.exits is not None and (self.training or labels is not None)
        exits = ExitRun(tuple(cfg.exit_layers)) if with_exits else None
        hidden = _run_stack(self, cfg, self._embed_tokens(input_ids), causal=cfg.kind == "decoder",
                            mask=attention_mask, positions=positions, position_bound=bound,
                            token_type_ids=token_type_ids, cache=cache, exits=exits)
        head_mask = attention_mask[:, past:] if attention_mask is not None else None
        out = self._head(hidden, head_mask, labels)
        if exits is not None:
            out.exit_logits = [self.exits(i, state, self.lm_head) for i, state in enumerate(exits.states)]
        return out

    def _forward_images(self, pixel_values: torch.Tensor | None, labels: torch.Tensor | None,
                        given: list[str]) -> ModelOutput:
        """Vision Transformer: patches (+ CLS) -> learned positions -> encoder -> pooled classifier."""
        cfg = self.config
        if given:
            hint = "; pass the images as pixel_values=" if "input_ids" in given else ""
            raise InputError(f"this is an image model (patch_size={cfg.patch_size}): it reads pixel_values and "
                             f"labels only, not {', '.join(given)}{hint}")
        if pixel_values is None:
            raise InputError(f"an image model needs pixel_values of shape "
                             f"(batch, {cfg.num_channels}, {cfg.image_size}, {cfg.image_size})")
        check_pixel_values(pixel_values, cfg)
        if labels is not None and cfg.head == "none":
            raise InputError("labels given, but this model has no head to compute a loss (head='none')")
        x = self.patch_embed(pixel_values)  # (B, T, d_model), T = (1 CLS +) num_patches
        B, T = x.shape[:2]
        positions = torch.arange(T, device=x.device).expand(B, T)  # (B, T)
        hidden = _run_stack(self, cfg, x, causal=False, mask=None, positions=positions)
        return self._head(hidden, None, labels)

    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Run the encoder of an encoder-decoder model: (B, S) ids -> (B, S, d_model)."""
        positions, bound = self._positions(input_ids, None)
        return self.encoder(self._embed_tokens(input_ids), causal=False, mask=attention_mask, positions=positions,
                            position_bound=bound)

    def _forward_seq2seq(self, src, src_mask, position_ids, labels, tgt, tgt_mask, cache) -> ModelOutput:
        if tgt is None:
            raise InputError("an encoder-decoder model needs decoder_input_ids (the target prefix)")
        check_ids("decoder_input_ids", tgt, self.config)
        past = cache.length if cache is not None else 0
        check_mask("decoder_attention_mask", tgt_mask, tgt, past)
        if cache is not None and cache.memory is not None:
            memory, src_mask = cache.memory, cache.memory_mask
        else:
            memory = self.encode(src, src_mask)
            if cache is not None:
                cache.memory, cache.memory_mask = memory, src_mask
        positions, bound = self._positions(tgt, position_ids, past)
        hidden = self.decoder(self._embed_tokens(tgt), causal=True, mask=tgt_mask, positions=positions,
                              position_bound=bound, context=memory, context_mask=src_mask, cache=cache)
        out = self._head(hidden, tgt_mask[:, past:] if tgt_mask is not None else None, labels)
        out.encoder_hidden_states = memory
        return out

    def _head(self, hidden: torch.Tensor, mask: torch.Tensor | None, labels: torch.Tensor | None) -> ModelOutput:
        cfg = self.config
        pooled = self.pooler(hidden) if self.pooler is not None else None
        logits = loss = None
        if self.lm_head is not None:
            logits = self.lm_head(hidden)  # (B, T, vocab)
            if labels is not None:
                check_labels(labels, tuple(logits.shape[:2]), "a language-model head",
                             num_classes=cfg.vocab_size, integer=True)
                causal = cfg.kind == "decoder"
                check_targets(labels[:, 1:] if causal else labels, causal)
                loss = causal_lm_loss(logits, labels) if causal else token_loss(logits, labels)
        elif self.classifier is not None:
            if pooled is None:
                pooled = pool(hidden, mask, cfg.pooling)
            logits = self.classifier(pooled)  # (B, num_labels)
            if labels is not None:
                check_labels(labels, (hidden.shape[0],), "a classifier head",
                             num_classes=cfg.num_labels if cfg.num_labels > 1 else None)
                loss = classification_loss(logits, labels)
        return ModelOutput(logits=logits, hidden_states=hidden, loss=loss, pooled=pooled)
