"""ModelConfig: one typed, validated description of every model formerkit builds.

A handful of enumerated fields (``kind``, ``position``, ``norm``, ``activation``, ``head``)
select the architecture; the rest are sizes and switches. Presets name well-known shapes.
Hugging Face ``config.json`` dictionaries are translated by ``formerkit.checkpoints.hf_config``
(``config_from_hf``/``config_to_hf``), which builds on this module and never the other way round.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Literal, get_args

from formerkit.errors import ConfigError, did_you_mean
from formerkit.fieldtypes import check_fields
from formerkit.fileio import atomic_write, json_text

Kind = Literal["decoder", "encoder", "encoder-decoder"]
Position = Literal["learned", "sinusoidal", "rope", "alibi", "relative", "none"]
Norm = Literal["layernorm", "rmsnorm"]
NormPlacement = Literal["pre", "post"]
Activation = Literal["relu", "gelu", "gelu_tanh", "silu"]
Head = Literal["lm", "mlm", "classifier", "none"]
Pooling = Literal["mean", "cls", "last", "max"]
AttnBackend = Literal["sdpa", "eager"]
AttnType = Literal["softmax", "clipped", "linear", "lowrank"]
LinearFeature = Literal["elu", "identity"]
ExitHead = Literal["shared", "separate"]


LAYER_SIZES = ("n_heads", "n_kv_heads", "d_ff")  # the sizes that may be per-layer lists


def _at(value: Any, i: int) -> Any:
    """Layer i's entry of a per-layer list, or the value itself when it is shared by every layer."""
    return value[i] if isinstance(value, list) else value


def scaled_d_ff(d_ff: int, d_model: int, new_d_model: int) -> int:
    """The feed-forward width at ``new_d_model`` that keeps the ratio ``d_ff / d_model`` (at least 1)."""
    return max(1, round(d_ff * new_d_model / d_model))


@dataclass
class ModelConfig:
    """The architecture and sizes of one Transformer.

    ``kind`` picks decoder-only (GPT, Llama), encoder-only (BERT) or encoder-decoder
    (the original Transformer, T5, BART). For encoder-decoder models ``n_layers``, ``n_heads``,
    ``n_kv_heads`` and ``d_ff`` size the encoder, and ``n_decoder_layers``, ``decoder_n_heads``,
    ``decoder_n_kv_heads`` and ``decoder_d_ff`` the decoder (each ``None``: the encoder's value).

    ``n_heads``, ``n_kv_heads`` and ``d_ff`` of a decoder or encoder model may also be per-layer
    lists of ``n_layers`` integers (a pruned model: fewer heads or neurons in some layers); per-layer
    head counts need an explicit ``d_head``. ``layer_config(i)`` gives layer i's config with plain sizes.
    """

    kind: Kind = "decoder"
    vocab_size: int = 50257
    d_model: int = 768
    n_layers: int = 12
    n_decoder_layers: int | None = None
    n_heads: int | list[int] = 12  # a list: the heads of each layer
    n_kv_heads: int | list[int] | None = None  # None: same as n_heads (MHA); 1: MQA; between: GQA
    d_head: int | None = None  # None: d_model // n_heads
    d_ff: int | list[int] = 3072  # a list: the feed-forward width of each layer
    decoder_n_heads: int | None = None  # encoder-decoder: the decoder's heads; None: n_heads
    decoder_n_kv_heads: int | None = None  # encoder-decoder: the decoder's k/v heads; None: n_kv_heads (null: MHA)
    decoder_d_ff: int | None = None  # encoder-decoder: the decoder's feed-forward width; None: d_ff
    max_seq_len: int = 1024

    position: Position = "learned"
    rope_theta: float = 10000.0
    rotary_fraction: float = 1.0  # share of each head's dims that RoPE rotates
    position_offset: int = 0  # learned positions read row position + offset of a (max_seq_len + offset)-row table
    relative_buckets: int = 32  # position="relative": T5's buckets of a learned per-head attention bias
    relative_max_distance: int = 128  # position="relative": distances from here on share the last bucket

    norm: Norm = "layernorm"
    norm_bias: bool = True
    norm_eps: float = 1e-5
    norm_placement: NormPlacement = "pre"
    final_norm: bool = True

    activation: Activation = "gelu_tanh"
    gated: bool = False  # SwiGLU with activation="silu", GeGLU with "gelu"/"gelu_tanh"

    qkv_bias: bool = True
    out_bias: bool = True
    mlp_bias: bool = True
    tie_embeddings: bool = True
    parallel_block: bool = False  # x + attn(norm(x)) + mlp(norm(x)), GPT-J / PaLM style
    qk_norm: bool = False  # normalize each head's queries and keys before attention
    sliding_window: int | None = None  # a token sees at most this many positions back
    attn_scale: float | None = None  # None: 1 / sqrt(d_head)

    attn_dropout: float = 0.0
    resid_dropout: float = 0.0
    embed_dropout: float = 0.0

    embed_scale: bool = False  # multiply token embeddings by sqrt(d_model) (Vaswani et al.)
    embed_norm: bool = False  # normalize the summed embeddings (BERT)
    type_vocab_size: int = 0  # segment (token type) embeddings; 0: none

    head: Head = "lm"
    num_labels: int = 2
    label_names: list[str] | None = None  # label_names[i] names class i (HF id2label); None: unnamed
    pooler: bool = False  # BERT's dense + tanh over the first token
    pooling: Pooling = "mean"  # how embed() and the classifier reduce a sequence
    pad_token_id: int | None = None
    eos_token_id: int | list[int] | None = None  # the id(s) that end generated text; None: none known
    decoder_start_token_id: int | None = None  # encoder-decoder: the token decoding starts from
    lm_head_bias: bool = False  # a bias on the LM head's logits (BART's final_logits_bias)
    lm_head_scale: bool = False  # multiply final hidden states by d_model ** -0.5 before the LM head (T5)
    attn_backend: AttnBackend = "sdpa"
    # attention variants (docs/efficiency.md): clipped softmax, linear (kernelised) and low-rank (Linformer)
    attn_type: AttnType = "softmax"
    clip_gamma: float = -0.03  # attn_type="clipped": probabilities clip((zeta - gamma) * softmax + gamma, 0, 1)
    clip_zeta: float = 1.0
    attn_gate: bool = False  # a sigmoid gate per head and token on each head's output (gated attention)
    linear_feature: LinearFeature = "elu"  # attn_type="linear": elu(x) + 1, normalised; identity: unnormalised
    lowrank_k: int = 64  # attn_type="lowrank": keys and values projected along the sequence to this many rows
    exit_layers: list[int] | None = None  # early exit (decoders): blocks (0-based) after which an exit head reads
    exit_head: ExitHead = "shared"  # shared: the LM head behind a norm per exit; separate: a projection per exit too
    init_std: float = 0.02

    # mixture of experts (layers/moe.py): a sparse feed-forward of n_experts, each token routed to the top k
    n_experts: int = 0  # 0: every feed-forward is dense; > 0: sparse layers hold this many experts
    experts_per_token: int = 2  # k: experts each token is routed to (softmax over all, then top-k)
    moe_d_ff: int | None = None  # each expert's hidden width; None: d_ff
    moe_renormalize: bool = True  # rescale the k routing weights to sum to 1 (Mixtral); False: raw softmax values
    shared_expert_d_ff: int = 0  # an always-on shared expert behind a sigmoid gate (Qwen2-MoE); 0: none
    moe_layer_step: int = 1  # layer i is sparse when (i + 1) % moe_layer_step == 0 (Qwen2-MoE decoder_sparse_step)
    moe_dense_layers: list[int] | None = None  # layers kept dense whatever the step (Qwen2-MoE mlp_only_layers)
    capacity_factor: float | None = None  # training: an expert takes at most ceil(factor * tokens * k / n_experts)
    # tokens, the rest pass through unchanged by the residual (Switch); None: no token is dropped

    # images (Vision Transformer): a model with a patch_size reads pixel_values (B, C, H, W), not token ids
    image_size: int | None = None  # square images of image_size x image_size pixels
    patch_size: int | None = None  # square patches; None: a text model
    num_channels: int = 3

    def __post_init__(self) -> None:
        for name in LAYER_SIZES:  # stored as lists, so a JSON round trip compares equal
            if isinstance(getattr(self, name), tuple):
                setattr(self, name, list(getattr(self, name)))
        if isinstance(self.label_names, tuple):  # stored as a list, so a JSON round trip compares equal
            self.label_names = list(self.label_names)
        if isinstance(self.eos_token_id, tuple):
            self.eos_token_id = list(self.eos_token_id)
        if isinstance(self.exit_layers, tuple):
            self.exit_layers = list(self.exit_layers)
        if isinstance(self.moe_dense_layers, tuple):
            self.moe_dense_layers = list(self.moe_dense_layers)
        _validate(self)

    # ---- derived sizes -------------------------------------------------------------
    @property
    def head_dim(self) -> int:
        """Size of one attention head."""
        return self.d_head if self.d_head is not None else self.d_model // self.n_heads

    @property
    def kv_heads(self) -> int | list[int]:
        """Number of key/value heads (equal to n_heads for plain multi-head attention); per layer, a list."""
        return self.n_kv_heads if self.n_kv_heads is not None else self.n_heads

    @property
    def per_layer_sizes(self) -> bool:
        """Whether any of n_heads, n_kv_heads, d_ff is a per-layer list (the layers differ in size)."""
        return any(isinstance(getattr(self, name), list) for name in LAYER_SIZES)

    def sparse_layer(self, i: int) -> bool:
        """Whether layer ``i``'s feed-forward is a mixture of experts (n_experts > 0, the step, not listed dense)."""
        return (self.n_experts > 0 and (i + 1) % self.moe_layer_step == 0
                and i not in (self.moe_dense_layers or []))

    def layer_config(self, i: int) -> ModelConfig:
        """The config layer ``i`` is built from: this one with layer i's n_heads, n_kv_heads and d_ff as integers,
        and ``n_experts=0`` when the layer's feed-forward is dense in a mixture-of-experts model.

        Without per-layer lists or dense layers among sparse ones it is this config.
        """
        changes = {name: _at(getattr(self, name), i) for name in LAYER_SIZES} if self.per_layer_sizes else {}
        if self.n_experts > 0 and not self.sparse_layer(i):
            changes["n_experts"] = 0
        return dataclasses.replace(self, **changes) if changes else self

    @property
    def expert_d_ff(self) -> int | list[int]:
        """The hidden width of each expert: moe_d_ff, else d_ff."""
        return self.moe_d_ff if self.moe_d_ff is not None else self.d_ff

    @property
    def decoder_layers(self) -> int:
        """Decoder depth of an encoder-decoder model."""
        return self.n_decoder_layers if self.n_decoder_layers is not None else self.n_layers

    @property
    def decoder_heads(self) -> int:
        """Query heads of the decoder of an encoder-decoder model (self- and cross-attention)."""
        return self.decoder_n_heads if self.decoder_n_heads is not None else self.n_heads

    @property
    def decoder_kv_heads(self) -> int:
        """Key/value heads of the decoder: decoder_n_kv_heads, else n_kv_heads, else (plain MHA) decoder_heads."""
        if self.decoder_n_kv_heads is not None:
            return self.decoder_n_kv_heads
        return self.n_kv_heads if self.n_kv_heads is not None else self.decoder_heads

    @property
    def decoder_head_dim(self) -> int:
        """Size of one attention head of the decoder (d_head when given, else d_model // decoder_heads)."""
        return self.d_head if self.d_head is not None else self.d_model // self.decoder_heads

    @property
    def decoder_ff(self) -> int:
        """Feed-forward width of the decoder of an encoder-decoder model."""
        return self.decoder_d_ff if self.decoder_d_ff is not None else self.d_ff

    def decoder_config(self) -> ModelConfig:
        """The config the decoder stack's layers are built from: this one with the decoder's sizes.

        Its ``n_heads``, ``n_kv_heads`` and ``d_ff`` are the decoder's and its ``decoder_*`` size
        fields are null, so the blocks, the KV cache and the per-head position tables read one
        config for either stack. Without decoder sizes (every decoder-only model) it is this config.
        """
        if self.decoder_n_heads is None and self.decoder_n_kv_heads is None and self.decoder_d_ff is None:
            return self
        return dataclasses.replace(
            self, n_heads=self.decoder_heads, d_ff=self.decoder_ff,
            n_kv_heads=self.decoder_n_kv_heads if self.decoder_n_kv_heads is not None else self.n_kv_heads,
            decoder_n_heads=None, decoder_n_kv_heads=None, decoder_d_ff=None,
        )

    @property
    def rotary_dim(self) -> int:
        """Number of dims per head that RoPE rotates."""
        return int(self.head_dim * self.rotary_fraction)

    @property
    def num_patches(self) -> int:
        """Patches per image of an image model ((image_size / patch_size) ** 2); 0 for a text model."""
        if self.patch_size is None or self.image_size is None:
            return 0
        return (self.image_size // self.patch_size) ** 2

    @property
    def num_image_tokens(self) -> int:
        """Sequence length of an image model: its patches, plus the CLS token when pooling='cls'."""
        return self.num_patches + (1 if self.pooling == "cls" and self.patch_size is not None else 0)

    # ---- construction --------------------------------------------------------------
    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> ModelConfig:
        """Build a config from a plain dict, rejecting unknown keys with a suggestion."""
        known = {f.name for f in fields(cls)}
        for key in values:
            if key not in known:
                raise ConfigError(
                    f'unknown config field "{key}"{did_you_mean(key, known)}; '
                    f"valid fields: {', '.join(sorted(known))}"
                )
        return cls(**values)

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> ModelConfig:
        """Build a named preset (see ``formerkit.presets.PRESETS``), with fields overridden.

        When ``d_model`` is overridden and ``d_ff`` is not, ``d_ff`` keeps the preset's ratio to
        ``d_model`` (``gpt2`` at ``d_model=384`` gets ``d_ff=1536``, as transformers' GPT-2 config does);
        so does a preset's ``decoder_d_ff`` that the overrides leave alone.
        """
        from formerkit.presets import PRESETS

        if name not in PRESETS:
            raise ConfigError(
                f'unknown preset "{name}"{did_you_mean(name, PRESETS)}; '
                f"available presets: {', '.join(sorted(PRESETS))}"
            )
        preset = PRESETS[name]
        d_model = overrides.get("d_model")
        if isinstance(d_model, int) and not isinstance(d_model, bool) and d_model > 0:
            scaled = {key: scaled_d_ff(preset[key], preset["d_model"], d_model) for key in ("d_ff", "decoder_d_ff")
                      if key not in overrides and preset.get(key) is not None}
            overrides = {**overrides, **scaled}
        return cls.from_dict({**preset, **overrides})

    @classmethod
    def from_json(cls, path_or_text: str | Path) -> ModelConfig:
        """Read a config from a JSON file path or a JSON string."""
        text = str(path_or_text)
        if not text.lstrip().startswith("{"):
            path = Path(text)
            if not path.is_file():
                raise ConfigError(f"config file {path} does not exist")
            text = path.read_text()
        try:
            values = json.loads(text)
        except json.JSONDecodeError as err:
            raise ConfigError(f"config is not valid JSON: {err}") from err
        return cls.from_dict(values)

    def to_dict(self) -> dict[str, Any]:
        """Return the config as a JSON-serializable dict."""
        return dataclasses.asdict(self)

    def to_json(self, path: str | Path | None = None) -> str:
        """Serialize to JSON; also write it to ``path`` when one is given."""
        text = json_text(self.to_dict())
        if path is not None:
            atomic_write(Path(path), lambda tmp: tmp.write_text(text, encoding="utf-8"))
        return text

    def replace(self, **changes: Any) -> ModelConfig:
        """Return a copy with some fields changed (validated, unknown keys rejected)."""
        return ModelConfig.from_dict({**self.to_dict(), **changes})


def _choice(cfg: ModelConfig, name: str, literal: Any) -> None:
    allowed = get_args(literal)
    value = getattr(cfg, name)
    if value not in allowed:
        raise ConfigError(
            f"{name}={value!r} is not supported{did_you_mean(str(value), allowed)}; "
            f"choose one of {', '.join(map(repr, allowed))}"
        )


def _validate(cfg: ModelConfig) -> None:
    check_fields(cfg, only=(bool,))  # the sizes and numbers get their own checks, with their ranges, below
    for name, literal in [
        ("kind", Kind), ("position", Position), ("norm", Norm),
        ("norm_placement", NormPlacement), ("activation", Activation), ("head", Head),
        ("pooling", Pooling), ("attn_backend", AttnBackend), ("attn_type", AttnType),
        ("linear_feature", LinearFeature), ("exit_head", ExitHead),
    ]:
        _choice(cfg, name, literal)
    for name in ["vocab_size", "d_model", "n_layers", "n_heads", "d_ff", "max_seq_len", "num_labels"]:
        value = getattr(cfg, name)
        if name in LAYER_SIZES and isinstance(value, list):
            continue  # checked entry by entry in _validate_layer_sizes
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ConfigError(f"{name} must be a positive integer, got {value!r}")
    for name in ["n_decoder_layers", "n_kv_heads", "d_head", "sliding_window", "decoder_n_heads",
                 "decoder_n_kv_heads", "decoder_d_ff"]:
        value = getattr(cfg, name)
        if name in LAYER_SIZES and isinstance(value, list):
            continue
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value <= 0):
            raise ConfigError(f"{name} must be a positive integer or null, got {value!r}")
    _validate_layer_sizes(cfg)
    _validate_attention_variant(cfg)
    _validate_exits(cfg)
    if not isinstance(cfg.type_vocab_size, int) or isinstance(cfg.type_vocab_size, bool) or cfg.type_vocab_size < 0:
        raise ConfigError(f"type_vocab_size must be an integer >= 0, got {cfg.type_vocab_size!r}")
    for name in ["rope_theta", "rotary_fraction", "norm_eps", "attn_dropout", "resid_dropout", "embed_dropout",
                 "init_std"]:
        value = getattr(cfg, name)
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise ConfigError(f"{name} must be a number, got {value!r}")
        if not math.isfinite(value):
            raise ConfigError(f"{name} must be finite, got {value!r}")
    scale = cfg.attn_scale
    if scale is not None and (not isinstance(scale, (int, float)) or isinstance(scale, bool)):
        raise ConfigError(f"attn_scale must be a number or null, got {cfg.attn_scale!r}")
    if scale is not None and not math.isfinite(scale):
        raise ConfigError(f"attn_scale must be finite, got {scale!r}")
    for name in ["attn_dropout", "resid_dropout", "embed_dropout"]:
        value = getattr(cfg, name)
        if not 0.0 <= value < 1.0:
            raise ConfigError(f"{name} must be in [0, 1), got {value}")
    if cfg.norm_eps <= 0:
        raise ConfigError(f"norm_eps must be positive, got {cfg.norm_eps}")
    if cfg.d_head is None and cfg.d_model % cfg.n_heads != 0:
        raise ConfigError(
            f"d_model={cfg.d_model} is not divisible by n_heads={cfg.n_heads}; "
            "change one of them or set d_head explicitly"
        )
    for i in range(cfg.n_layers if cfg.per_layer_sizes else 1):
        heads, kv_heads = _at(cfg.n_heads, i), _at(cfg.kv_heads, i)
        if heads % kv_heads != 0:
            where = f"layer {i}: " if cfg.per_layer_sizes else ""
            raise ConfigError(
                f"{where}n_heads={heads} is not a multiple of n_kv_heads={kv_heads}; "
                "pick n_kv_heads that divides n_heads (1 for MQA, n_heads for MHA)"
            )
    if cfg.position == "rope":
        if not 0.0 < cfg.rotary_fraction <= 1.0:
            raise ConfigError(f"rotary_fraction must be in (0, 1], got {cfg.rotary_fraction}")
        if cfg.head_dim % 2 != 0:
            raise ConfigError(f"RoPE needs an even head size, but d_head={cfg.head_dim}; use an even d_head")
        if cfg.rotary_dim < 2 or cfg.rotary_dim % 2 != 0:
            raise ConfigError(
                f"rotary_fraction={cfg.rotary_fraction} of d_head={cfg.head_dim} rotates "
                f"{cfg.rotary_dim} dims; RoPE needs an even number >= 2"
            )
        if cfg.rope_theta <= 0:
            raise ConfigError(f"rope_theta must be positive, got {cfg.rope_theta}")
    if cfg.position == "sinusoidal" and cfg.d_model % 2 != 0:
        raise ConfigError(f"sinusoidal positions need an even d_model, got {cfg.d_model}")
    if cfg.parallel_block and cfg.norm_placement == "post":
        raise ConfigError("parallel_block=True needs norm_placement='pre'")
    if cfg.head == "lm" and cfg.kind == "encoder":
        raise ConfigError("an encoder-only model cannot have a causal 'lm' head; use head='mlm'")
    if cfg.head == "mlm" and cfg.kind != "encoder":
        raise ConfigError(f"head='mlm' needs kind='encoder', got kind={cfg.kind!r}; use head='lm'")
    if cfg.type_vocab_size and cfg.kind == "encoder-decoder":
        raise ConfigError("type_vocab_size applies to single-stack models; set it to 0 for an encoder-decoder")
    if cfg.init_std <= 0:
        raise ConfigError(f"init_std must be positive, got {cfg.init_std}")
    if cfg.pad_token_id is not None and (not isinstance(cfg.pad_token_id, int) or isinstance(cfg.pad_token_id, bool)):
        raise ConfigError(f"pad_token_id must be an integer or null, got {cfg.pad_token_id!r}")
    if cfg.pad_token_id is not None and not 0 <= cfg.pad_token_id < cfg.vocab_size:
        raise ConfigError(f"pad_token_id={cfg.pad_token_id} is outside the vocabulary [0, {cfg.vocab_size})")
    _validate_eos(cfg)
    if cfg.attn_scale is not None and cfg.attn_scale <= 0:
        raise ConfigError(f"attn_scale must be positive, got {cfg.attn_scale}")
    _validate_images(cfg)
    _validate_positions_and_decoding(cfg)
    _validate_decoder_sizes(cfg)
    _validate_label_names(cfg)
    _validate_experts(cfg)


def _validate_attention_variant(cfg: ModelConfig) -> None:
    """attn_type and its parameters: the clipped softmax's range; the positions and kinds linear and low-rank take."""
    for name in ["clip_gamma", "clip_zeta"]:
        value = getattr(cfg, name)
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
            raise ConfigError(f"{name} must be a finite number, got {value!r}")
    if cfg.attn_type == "clipped" and not (cfg.clip_gamma <= 0 and cfg.clip_zeta >= 1):
        raise ConfigError(f"clipped softmax needs clip_gamma <= 0 and clip_zeta >= 1, got clip_gamma={cfg.clip_gamma}, "
                          f"clip_zeta={cfg.clip_zeta} (gamma=0, zeta=1 is the plain softmax)")
    if cfg.attn_type in ("linear", "lowrank") and cfg.position in ("alibi", "relative"):
        raise ConfigError(f"attn_type={cfg.attn_type!r} has no score matrix to add a position={cfg.position!r} bias "
                          "to; use position rope, learned, sinusoidal or none")
    if cfg.attn_type == "linear" and cfg.sliding_window is not None:
        raise ConfigError("attn_type='linear' keeps one running state, not a window; set sliding_window to null")
    if cfg.attn_type == "lowrank":
        if cfg.kind != "encoder":
            raise ConfigError(f"attn_type='lowrank' (Linformer) projects the whole sequence, so it serves encoders "
                              f"only, got kind={cfg.kind!r}; use attn_type='linear' for a causal model")
        if not isinstance(cfg.lowrank_k, int) or isinstance(cfg.lowrank_k, bool) or cfg.lowrank_k <= 0:
            raise ConfigError(f"lowrank_k must be a positive integer, got {cfg.lowrank_k!r}")


def _validate_exits(cfg: ModelConfig) -> None:
    """exit_layers: a decoder with an LM head, distinct block indices below the last block, in increasing order."""
    layers = cfg.exit_layers
    if layers is None:
        return
    if cfg.kind != "decoder" or cfg.head != "lm" or cfg.patch_size is not None:
        raise ConfigError(f"early exit (exit_layers) predicts the next token before the last layer, so it needs a "
                          f"decoder with head='lm', got kind={cfg.kind!r}, head={cfg.head!r}; set exit_layers to null")
    if not isinstance(layers, list) or not layers or any(not isinstance(i, int) or isinstance(i, bool) for i in layers):
        raise ConfigError(f"exit_layers must be a non-empty list of block indices, got {layers!r}")
    if layers != sorted(set(layers)) or layers[0] < 0 or layers[-1] >= cfg.n_layers - 1:
        raise ConfigError(f"exit_layers={layers} must be distinct increasing block indices from 0 to n_layers - 2 = "
                          f"{cfg.n_layers - 2} (the last block always exits, through the LM head)")


def _validate_layer_sizes(cfg: ModelConfig) -> None:
    """Per-layer lists of n_heads, n_kv_heads, d_ff: n_layers positive integers each, in a single-stack model.

    Per-layer head counts also need an explicit d_head (heads keep their size when others are removed)
    and a position scheme without per-head tables shared by the stack (ALiBi slopes, T5's bias).
    """
    listed = [name for name in LAYER_SIZES if isinstance(getattr(cfg, name), list)]
    for name in listed:
        value = getattr(cfg, name)
        if len(value) != cfg.n_layers:
            raise ConfigError(f"{name} lists {len(value)} sizes but n_layers={cfg.n_layers}; give one per layer, "
                              "or one integer for all")
        bad = [v for v in value if not isinstance(v, int) or isinstance(v, bool) or v <= 0]
        if bad:
            raise ConfigError(f"{name} must be a positive integer or a list of them (one per layer), got {bad[0]!r} "
                              f"in {value}")
    if not listed:
        return
    if cfg.kind == "encoder-decoder":
        raise ConfigError(f"per-layer lists ({', '.join(listed)}) size the layers of a decoder or encoder model, not "
                          "an encoder-decoder; give one integer per stack (n_heads/decoder_n_heads, ...)")
    if isinstance(cfg.n_heads, list):
        if cfg.d_head is None:
            raise ConfigError(f"per-layer n_heads={cfg.n_heads} needs an explicit d_head (the size of every head, "
                              "d_model // n_heads before heads were removed)")
        if cfg.position in ("alibi", "relative"):
            raise ConfigError(f"per-layer n_heads cannot be used with position={cfg.position!r}: its per-head "
                              "slopes/bias are shared by every layer; give one n_heads")


def _validate_decoder_sizes(cfg: ModelConfig) -> None:
    """decoder_n_heads, decoder_n_kv_heads, decoder_d_ff: encoder-decoder only, held to the encoder's rules."""
    for name, shared in [("decoder_n_heads", "n_heads"), ("decoder_n_kv_heads", "n_kv_heads"),
                         ("decoder_d_ff", "d_ff")]:
        if getattr(cfg, name) is not None and cfg.kind != "encoder-decoder":
            raise ConfigError(f"{name} sizes the decoder of an encoder-decoder model, got kind={cfg.kind!r}; "
                              f"set it to null ({shared} sizes the one stack)")
    if cfg.kind != "encoder-decoder":
        return  # the decoder's sizes are the stack's own, checked in _validate
    heads, kv_heads = cfg.decoder_heads, cfg.decoder_kv_heads
    if cfg.d_head is None and cfg.d_model % heads != 0:
        raise ConfigError(f"d_model={cfg.d_model} is not divisible by decoder_n_heads={heads}; "
                          "change one of them or set d_head explicitly")
    if heads % kv_heads != 0:
        raise ConfigError(f"the decoder's {heads} heads (decoder_n_heads, else n_heads) are not a multiple of its "
                          f"{kv_heads} key/value heads (decoder_n_kv_heads, else n_kv_heads); set "
                          f"decoder_n_kv_heads to a divisor of {heads}")
    rotated = int(cfg.decoder_head_dim * cfg.rotary_fraction)
    if cfg.position == "rope" and (cfg.decoder_head_dim % 2 or rotated < 2 or rotated % 2):
        raise ConfigError(f"RoPE rotates {rotated} of the decoder's {cfg.decoder_head_dim} dims per head "
                          f"(d_model / decoder_n_heads={heads}); it needs an even head size and an even number "
                          ">= 2 of rotated dims: change decoder_n_heads or set an even d_head")


def _validate_eos(cfg: ModelConfig) -> None:
    """eos_token_id: null, one token id, or a non-empty list of token ids, each inside the vocabulary."""
    eos = cfg.eos_token_id
    ids = eos if isinstance(eos, list) else [eos] if eos is not None else []
    if (isinstance(eos, list) and not eos) or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
        raise ConfigError(f"eos_token_id must be a token id, a non-empty list of token ids, or null, got {eos!r}")
    outside = [i for i in ids if not 0 <= i < cfg.vocab_size]
    if outside:
        raise ConfigError(f"eos_token_id={outside[0]} is outside the vocabulary [0, {cfg.vocab_size}); set an id of "
                          "the vocabulary, or null")


def _validate_label_names(cfg: ModelConfig) -> None:
    """label_names: null, or one distinct string per class (``num_labels`` of them)."""
    names = cfg.label_names
    if names is None:
        return
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise ConfigError(f"label_names must be a list of strings (label_names[i] names class i) or null, "
                          f"got {names!r}")
    if len(names) != cfg.num_labels:
        raise ConfigError(f"label_names has {len(names)} names but num_labels={cfg.num_labels}; give one name per "
                          f"class or set num_labels={len(names)}")
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ConfigError(f"label_names must be distinct, but {', '.join(map(repr, repeated))} appears more than "
                          "once; give each class its own name")


def _validate_positions_and_decoding(cfg: ModelConfig) -> None:
    """Checks of the BART/T5 fields: position offset, relative buckets, LM-head extras, decoder start."""
    for name in ["relative_buckets", "relative_max_distance", "position_offset"]:
        value = getattr(cfg, name)
        if not isinstance(value, int) or isinstance(value, bool) or value < (0 if name == "position_offset" else 1):
            bound = ">= 0" if name == "position_offset" else "> 0"
            raise ConfigError(f"{name} must be an integer {bound}, got {value!r}")
    if cfg.position_offset and cfg.position != "learned":
        raise ConfigError(f"position_offset={cfg.position_offset} applies to position='learned' only, got "
                          f"position={cfg.position!r}; set position_offset=0")
    if cfg.position == "relative":
        if cfg.relative_buckets < 4:
            raise ConfigError(f"relative_buckets must be >= 4 (half exact, half logarithmic, for each direction), "
                              f"got {cfg.relative_buckets}")
        if cfg.relative_max_distance <= cfg.relative_buckets // 2:
            raise ConfigError(f"relative_max_distance={cfg.relative_max_distance} must exceed relative_buckets // 2 = "
                              f"{cfg.relative_buckets // 2} (the exactly bucketed distances); T5 uses 128 with 32")
    for name in ["lm_head_bias", "lm_head_scale"]:
        if getattr(cfg, name) and cfg.head != "lm":
            raise ConfigError(f"{name}=True needs head='lm', got head={cfg.head!r}")
    start = cfg.decoder_start_token_id
    if start is not None:
        if not isinstance(start, int) or isinstance(start, bool) or not 0 <= start < cfg.vocab_size:
            raise ConfigError(f"decoder_start_token_id must be a token id in [0, {cfg.vocab_size}) or null, "
                              f"got {start!r}")
        if cfg.kind != "encoder-decoder":
            raise ConfigError(f"decoder_start_token_id applies to encoder-decoder models, got kind={cfg.kind!r}; "
                              "set it to null")


def _validate_images(cfg: ModelConfig) -> None:
    """Checks of the image fields: a Vision Transformer is an encoder over (1 +) num_patches positions."""
    for name in ["image_size", "patch_size"]:
        value = getattr(cfg, name)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value <= 0):
            raise ConfigError(f"{name} must be a positive integer or null, got {value!r}")
    if not isinstance(cfg.num_channels, int) or isinstance(cfg.num_channels, bool) or cfg.num_channels <= 0:
        raise ConfigError(f"num_channels must be a positive integer, got {cfg.num_channels!r}")
    if cfg.patch_size is None:
        if cfg.image_size is not None:
            raise ConfigError(f"image_size={cfg.image_size} is set but patch_size is not; set patch_size to make "
                              "an image model, or image_size to null for a text model")
        return
    if cfg.image_size is None:
        raise ConfigError(f"patch_size={cfg.patch_size} needs image_size (the side of the square input images)")
    if cfg.image_size % cfg.patch_size:
        raise ConfigError(f"image_size={cfg.image_size} is not divisible by patch_size={cfg.patch_size}; "
                          "pick a patch size that divides the image side")
    if cfg.kind != "encoder":
        raise ConfigError(f"an image model (patch_size set) must have kind='encoder', got kind={cfg.kind!r}")
    if cfg.head not in ("classifier", "none"):
        raise ConfigError(f"an image model has head='classifier' or 'none', got head={cfg.head!r}")
    if cfg.pooling not in ("cls", "mean", "max"):
        raise ConfigError(f"an image model pools with 'cls' (a learned CLS token), 'mean' or 'max' over patches, "
                          f"got pooling={cfg.pooling!r}")
    if cfg.type_vocab_size:
        raise ConfigError(f"an image model has no token types; set type_vocab_size=0, got {cfg.type_vocab_size}")
    if cfg.max_seq_len < cfg.num_image_tokens:
        cls = " + 1 CLS token" if cfg.pooling == "cls" else ""
        raise ConfigError(f"max_seq_len={cfg.max_seq_len} is smaller than the {cfg.num_patches} patches{cls} of a "
                          f"{cfg.image_size}x{cfg.image_size} image with patch_size={cfg.patch_size}; "
                          f"set max_seq_len={cfg.num_image_tokens}")


def _validate_experts(cfg: ModelConfig) -> None:
    """The mixture-of-experts fields: sizes, k <= n_experts, the sparse layers, the capacity factor."""
    for name, low in [("n_experts", 0), ("experts_per_token", 1), ("shared_expert_d_ff", 0), ("moe_layer_step", 1)]:
        value = getattr(cfg, name)
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise ConfigError(f"{name} must be an integer >= {low}, got {value!r}")
    if cfg.moe_d_ff is not None and (not isinstance(cfg.moe_d_ff, int) or isinstance(cfg.moe_d_ff, bool)
                                     or cfg.moe_d_ff <= 0):
        raise ConfigError(f"moe_d_ff must be a positive integer or null (null: d_ff), got {cfg.moe_d_ff!r}")
    dense = cfg.moe_dense_layers
    if dense is not None:
        if not isinstance(dense, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in dense):
            raise ConfigError(f"moe_dense_layers must be a list of layer indices or null, got {dense!r}")
        outside = [i for i in dense if not 0 <= i < cfg.n_layers]
        if outside:
            raise ConfigError(f"moe_dense_layers names layer {outside[0]}, but the layers are 0..{cfg.n_layers - 1}; "
                              "list indices of existing layers")
    factor = cfg.capacity_factor
    if factor is not None and (not isinstance(factor, (int, float)) or isinstance(factor, bool)
                               or not math.isfinite(factor) or factor <= 0):
        raise ConfigError(f"capacity_factor must be a positive number or null (null: no token dropped), "
                          f"got {factor!r}")
    if cfg.n_experts == 0:
        return
    if cfg.experts_per_token > cfg.n_experts:
        raise ConfigError(f"experts_per_token={cfg.experts_per_token} exceeds n_experts={cfg.n_experts}; a token "
                          f"is routed to at most every expert: set experts_per_token <= {cfg.n_experts}")
    if not any(cfg.sparse_layer(i) for i in range(cfg.n_layers)):
        raise ConfigError(f"n_experts={cfg.n_experts} but no layer is sparse (moe_layer_step={cfg.moe_layer_step}, "
                          f"moe_dense_layers={dense}, n_layers={cfg.n_layers}); lower moe_layer_step or list fewer "
                          "dense layers, or set n_experts=0 for a dense model")
