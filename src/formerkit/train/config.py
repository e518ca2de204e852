"""TrainConfig: every option of a training run, in sections, from YAML plus command-line overrides.

Each section is a dataclass whose fields carry a help text; ``formerkit train --help`` lists
them all as ``--section.key``. The model section is open: any ModelConfig field may be set
there next to ``preset``.
"""

from __future__ import annotations

import dataclasses
import json
import warnings
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from formerkit.config import ModelConfig
from formerkit.errors import ConfigError, FormerkitWarning, did_you_mean
from formerkit.fieldtypes import check_fields, describe, field_types, is_valid
from formerkit.precision import PRECISIONS


def _opt(default: Any, help: str) -> Any:
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: json.loads(json.dumps(default)), metadata={"help": help})
    return field(default=default, metadata={"help": help})


@dataclass
class DataSection:
    """Where the text comes from and how it becomes tokens."""

    source: str | None = _opt(None, "text file, directory, glob or .jsonl; empty: the Python standard library's source"
                                    "; seq2seq: a TSV/.jsonl file of pairs or synthetic:digits-to-words | "
                                    "synthetic:words-to-digits; image-classify: digits (sklearn's 8x8 digits; also "
                                    "when empty), an .npz with images + labels, or a folder of class folders of images")
    text_field: str = _opt("text", "JSONL field holding the text")
    label_field: str = _opt("label", "JSONL field holding the class label (objective=classify)")
    tokenizer: str | None = _opt(None, "byte | char | bpe | path to a tokenizer.json or saved tokenizer dir "
                                       "(default: bpe, or with model.init_from the checkpoint's own tokenizer)")
    vocab_size: int = _opt(8192, "BPE vocabulary size when training a BPE tokenizer")
    val_fraction: float = _opt(0.05, "share of documents held out for validation")
    cache_dir: str | None = _opt(None, "token cache directory (default: ~/.cache/formerkit/tokens)")
    source_field: str = _opt("source", "JSONL key of the source text (objective=seq2seq)")
    target_field: str = _opt("target", "JSONL key of the target text (objective=seq2seq)")
    synthetic_size: int = _opt(50000, "pairs generated for a synthetic:NAME source, train + held-out (seq2seq)")
    test_fraction: float = _opt(0.2, "share of each class held out as the test set, fixed seed (image-classify)")
    augment_shift: int = _opt(0, "shift training images by up to N pixels at random (image-classify; 0: off)")


@dataclass
class TrainSection:
    """The loop itself."""

    objective: str = _opt("causal", "causal | mlm | classify | seq2seq | image-classify")
    steps: int = _opt(1000, "optimizer steps to train for")
    max_minutes: float | None = _opt(None, "stop (with a checkpoint) after this many minutes")
    batch_size: int = _opt(16, "sequences per optimizer step, across all processes and micro-steps")
    grad_accum: int = _opt(1, "micro-steps per optimizer step (no gradient all-reduce between them)")
    seq_len: int = _opt(256, "tokens per training window (max length for classify)")
    precision: str = _opt("auto", "auto (measure fp32 vs bf16, and fp16 on CUDA, on this device at start-up; take the "
                                  "fastest) | fp32 | bf16 (autocast, fp32 master weights) | fp16 (autocast + loss "
                                  "scaling)")
    compile: bool = _opt(False, "torch.compile the model")
    attention: str = _opt("auto", "auto (time the fused sdpa kernel against explicit attention at start-up, take the "
                                  "faster; the same numbers to rounding) | sdpa | eager")
    device: str = _opt("auto", "auto | cpu | cuda | cuda:N")
    seed: int = _opt(0, "seed for initialization, data order, dropout and masking")
    mlm_probability: float = _opt(0.15, "share of tokens masked for objective=mlm (80% mask, 10% random, 10% kept)")
    fsdp: bool = _opt(False, "shard parameters and optimizer state with FSDP (under torchrun)")
    threads: int = _opt(0, "CPU threads torch may use (0: torch's default); 1 suits tiny models on a busy machine")
    label_smoothing: float = _opt(0.1, "label smoothing of the seq2seq loss (0: plain cross-entropy)")
    router_aux_loss_coef: float = _opt(0.01, "a mixture of experts (model.n_experts > 0): weight of the "
                                             "load-balancing loss added to the causal/mlm loss (0: off)")
    router_z_loss_coef: float = _opt(0.001, "a mixture of experts: weight of the router z-loss (mean squared "
                                            "logsumexp of the router logits) added to the loss (0: off)")
    z_loss_coef: float = _opt(0.0, "objective=causal|mlm: weight of the output z-loss, the mean squared log of the "
                                   "softmax normalizer over the vocabulary (PaLM uses 1e-4; 0: off)")


@dataclass
class OptimSection:
    """AdamW and its schedule."""

    lr: float = _opt(1e-3, "peak learning rate")
    schedule: str = _opt("cosine", "cosine (warmup, then cosine decay) | inverse_sqrt (warmup, then lr * "
                                   "sqrt(warmup / step), the original Transformer's)")
    min_lr_ratio: float = _opt(0.1, "final learning rate as a share of the peak (cosine decay)")
    warmup_steps: int = _opt(100, "linear warmup steps")
    weight_decay: float = _opt(0.1, "AdamW weight decay (not applied to norms, biases, embeddings)")
    beta1: float = _opt(0.9, "AdamW beta1")
    beta2: float = _opt(0.95, "AdamW beta2")
    eps: float = _opt(1e-8, "AdamW epsilon")
    grad_clip: float = _opt(1.0, "clip the global gradient norm to this (0: off)")
    schedule_restart: bool = _opt(False, "resuming with another train.steps: start a new warmup + decay at the "
                                         "resume step (without it, changing the steps of a cosine run is an error)")
    kernel: str = _opt("auto", "auto (time fused against foreach AdamW at start-up, take the faster; the same "
                               "update to rounding) | fused | foreach")


@dataclass
class EvalSection:
    """Periodic validation."""

    every: int = _opt(200, "evaluate every N steps (and at the end)")
    batches: int = _opt(20, "validation batches per evaluation")
    translate_pairs: int = _opt(500, "held-out pairs translated with beam search per evaluation (seq2seq)")
    num_beams: int = _opt(4, "beam width of evaluation translations (seq2seq; 1: greedy)")
    max_new_tokens: int = _opt(128, "most tokens generated per evaluation translation (seq2seq)")


@dataclass
class CheckpointSection:
    """Where the run lives and how often it is saved."""

    run_dir: str = _opt("runs/default", "run directory: checkpoints, metrics, loss curve, resolved config")
    every: int = _opt(500, "save a checkpoint every N steps (and at the end)")
    keep: int = _opt(2, "checkpoints to keep")
    resume: bool | str = _opt(True, "true: resume from the newest readable checkpoint when there is one (an "
                                    "unreadable newest one falls back to the previous); false: refuse a run directory "
                                    "that holds checkpoints; a step directory (step-0000100): resume from that one")


@dataclass
class LogSection:
    """What is reported while training."""

    every: int = _opt(10, "log train metrics every N steps")
    progress: bool = _opt(True, "show a progress bar")
    tensorboard: bool = _opt(True, "write TensorBoard event files")
    samples: int = _opt(8, "text samples drawn at the end, also written to RUN_DIR/samples.txt (causal LM; "
                           "seq2seq: held-out example translations)")
    sample_tokens: int = _opt(160, "new tokens per sample")


@dataclass
class LoraSection:
    """LoRA fine-tuning: low-rank adapters trained on a frozen model.init_from"""

    r: int = _opt(0, "adapter rank; 0: no LoRA, every weight trains")
    alpha: float = _opt(16.0, "adapter scale: each layer adds alpha / r * B A x")
    dropout: float = _opt(0.0, "dropout on the adapters' input while training")
    target: str = _opt("q,v", "layers of each block, comma-separated: q, k, v, qkv, out, fc_in, fc_gate, fc_out, "
                              "cross_q, cross_k, cross_v, cross_kv, cross_out; or all-linear")


_DEFAULT_MODEL = {"preset": "gpt2", "n_layers": 6, "d_model": 320, "n_heads": 5, "d_ff": 1280,
                  "max_seq_len": 256, "attn_dropout": 0.0, "resid_dropout": 0.0, "embed_dropout": 0.0}

SECTIONS = {"data": DataSection, "train": TrainSection, "optim": OptimSection, "eval": EvalSection,
            "checkpoint": CheckpointSection, "log": LogSection, "lora": LoraSection}


@dataclass
class TrainConfig:
    """A whole run: model (preset + ModelConfig fields), data, train, optim, eval, checkpoint, log."""

    model: dict[str, Any] = field(default_factory=lambda: dict(_DEFAULT_MODEL))
    data: DataSection = field(default_factory=DataSection)
    train: TrainSection = field(default_factory=TrainSection)
    optim: OptimSection = field(default_factory=OptimSection)
    eval: EvalSection = field(default_factory=EvalSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    log: LogSection = field(default_factory=LogSection)
    lora: LoraSection = field(default_factory=LoraSection)

    def __post_init__(self) -> None:
        _validate(self)
        _warn(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        """Build from nested dicts, rejecting unknown sections and keys with a suggestion."""
        kwargs: dict[str, Any] = {}
        for name, content in values.items():
            if name == "model":
                if content is not None and not isinstance(content, dict):
                    raise ConfigError(f'section "model" must be a mapping of options (key: value), got {content!r}')
                kwargs["model"] = _coerce("model", _model_types(), dict(content or {}))
                continue
            if name not in SECTIONS:
                raise ConfigError(f'unknown config section "{name}"{did_you_mean(name, [*SECTIONS, "model"])}')
            if content is not None and not isinstance(content, dict):
                raise ConfigError(f'section "{name}" must be a mapping of options (key: value), got {content!r}')
            section = SECTIONS[name]
            known = {f.name for f in fields(section)}
            for key in content or {}:
                if key not in known:
                    raise ConfigError(f'unknown option "{name}.{key}"{did_you_mean(key, known)}')
            kwargs[name] = section(**_coerce(name, field_types(section), content or {}))
        return cls(**kwargs)

    @classmethod
    def load(cls, path: str | Path | None = None, overrides: list[str] | None = None) -> TrainConfig:
        """Read a YAML (or JSON) file, then apply ``--section.key value`` overrides.

        The model options of the file and the command line together start from the default model
        (``_DEFAULT_MODEL``: a small GPT without dropout) unless they name ``preset`` or ``init_from``,
        which bring all their own values.
        """
        values: dict[str, Any] = {}
        if path is not None:
            path = Path(path)
            if not path.is_file():
                raise ConfigError(f"config file {path} does not exist")
            try:
                values = yaml.safe_load(path.read_text()) or {}
            except yaml.YAMLError as err:
                raise ConfigError(f"{path} is not valid YAML: {err}") from err
            if not isinstance(values, dict):
                raise ConfigError(f"{path} must hold a mapping of sections")
        parsed = parse_overrides(overrides or [])
        merged = {k: v for k, v in values.items() if k != "model"}
        merged["model"] = values.get("model")
        for key, value in parsed.items():
            section, _, name = key.partition(".")
            if merged.get(section) is None:
                merged[section] = {}
            if not isinstance(merged[section], dict):
                raise ConfigError(f'section "{section}" must be a mapping of options (key: value), '
                                  f"got {merged[section]!r}")
            merged[section][name] = value
        model = merged["model"] or {}
        if not isinstance(model, dict):
            raise ConfigError(f'section "model" must be a mapping of options (key: value), got {model!r}')
        merged["model"] = model if _names_model(model) else {**_DEFAULT_MODEL, **model}
        return cls.from_dict(merged)

    def to_dict(self) -> dict[str, Any]:
        """The config as nested plain dicts (what is saved as the run's resolved config)."""
        return dataclasses.asdict(self)

    def model_config(self, vocab_size: int, num_labels: int | None = None) -> ModelConfig:
        """The ModelConfig of this run, with the tokenizer's vocabulary (and label count) filled in.

        With ``model.init_from`` the model section is expected to hold the checkpoint's config
        already (``train.init_from.init_model_options``); the path itself is not a config field.
        """
        values = dict(self.model)
        values.pop("init_from", None)
        preset = values.pop("preset", None)
        values["vocab_size"] = vocab_size
        if num_labels is not None:
            values["num_labels"] = num_labels
        if preset:
            return ModelConfig.from_preset(preset, **values)
        return ModelConfig.from_dict(values)


def _names_model(model: dict[str, Any]) -> bool:
    """Whether model options name where the model comes from: a preset or a checkpoint (``init_from``)."""
    return model.get("preset") is not None or model.get("init_from") is not None


def _warn(cfg: TrainConfig) -> None:
    """Warn about settings that are valid but almost certainly not what was meant."""
    o, steps = cfg.optim, cfg.train.steps
    if o.warmup_steps >= steps:
        peak = f"its peak optim.lr={o.lr}"
        what = f"never reaches {peak}" if o.warmup_steps > steps else f"reaches {peak} only at the last step"
        warnings.warn(f"optim.warmup_steps={o.warmup_steps} >= train.steps={steps}: the learning rate {what}; set "
                      f"--optim.warmup_steps below --train.steps, e.g. {max(steps // 10, 1)}", FormerkitWarning,
                      stacklevel=4)


def _coerce(name: str, types: dict[str, tuple[type, bool]], values: dict[str, Any]) -> dict[str, Any]:
    """Read numbers YAML left as strings (YAML 1.1 reads ``3e-4`` as text) for the float fields."""
    out = dict(values)
    for key, value in values.items():
        if isinstance(value, str) and types.get(key, (None,))[0] is float:
            try:
                out[key] = float(value)
            except ValueError as err:
                raise ConfigError(f"{name}.{key} must be {describe(*types[key])}, got {value!r}") from err
    return out


def _model_types() -> dict[str, tuple[type, bool]]:
    """The plain-typed options of the model section: ModelConfig's fields, plus ``preset`` and ``init_from``."""
    return {**field_types(ModelConfig), "preset": (str, True), "init_from": (str, True)}


def _option_type(key: str) -> tuple[type, bool] | None:
    """(type, optional) of option ``section.key`` when it is a bool, int, float or str option, else None."""
    section, _, name = key.partition(".")
    if section == "model":
        return _model_types().get(name)
    return field_types(SECTIONS[section]).get(name) if section in SECTIONS else None


def _scalar(text: str) -> Any:
    """A command-line value: int, float, or whatever YAML makes of it (true, null, lists, strings)."""
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    try:
        return yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError:
        return text


def parse_overrides(args: list[str]) -> dict[str, Any]:
    """Turn ``["--train.steps", "100", "--log.progress=false"]`` into {"train.steps": 100, ...}.

    A string option keeps its text as given (``--checkpoint.run_dir 2024`` is the directory "2024"; an
    empty value or ``null`` resets an optional one to None). Other values are numbers when they parse as
    numbers, else YAML scalars (true/false, null, lists) or strings; their types are checked later.
    """
    out: dict[str, Any] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or "." not in arg:
            raise ConfigError(f'expected an option like --train.steps 100, got "{arg}"')
        key, eq, value = arg[2:].partition("=")
        if not eq:
            if i + 1 >= len(args) or (args[i + 1].startswith("--") and "." in args[i + 1]):
                raise ConfigError(f"option --{key} needs a value")
            value = args[i + 1]
            i += 1
        i += 1
        kind = _option_type(key)
        scalar = _scalar(value)
        out[key] = value if kind is not None and kind[0] is str and not (kind[1] and scalar is None) else scalar
    return out


def _validate(cfg: TrainConfig) -> None:
    _check_types(cfg)
    t, o = cfg.train, cfg.optim
    choices = {"train.objective": (t.objective, ("causal", "mlm", "classify", "seq2seq", "image-classify")),
               "train.precision": (t.precision, PRECISIONS),
               "optim.schedule": (o.schedule, ("cosine", "inverse_sqrt")),
               "train.attention": (t.attention, ("auto", "sdpa", "eager")),
               "optim.kernel": (o.kernel, ("auto", "fused", "foreach"))}
    for name, (value, allowed) in choices.items():
        if value not in allowed:
            raise ConfigError(f"{name}={value!r} is not one of {', '.join(allowed)}{did_you_mean(str(value), allowed)}")
    for name, value in [("train.steps", t.steps), ("train.batch_size", t.batch_size),
                        ("train.grad_accum", t.grad_accum), ("train.seq_len", t.seq_len),
                        ("eval.every", cfg.eval.every), ("eval.batches", cfg.eval.batches),
                        ("checkpoint.every", cfg.checkpoint.every), ("checkpoint.keep", cfg.checkpoint.keep),
                        ("log.every", cfg.log.every), ("data.vocab_size", cfg.data.vocab_size),
                        ("data.synthetic_size", cfg.data.synthetic_size),
                        ("eval.translate_pairs", cfg.eval.translate_pairs), ("eval.num_beams", cfg.eval.num_beams),
                        ("eval.max_new_tokens", cfg.eval.max_new_tokens), ("log.sample_tokens", cfg.log.sample_tokens)]:
        if value <= 0:
            raise ConfigError(f"{name} must be a positive integer, got {value!r}")
    if t.batch_size % t.grad_accum:
        raise ConfigError(f"train.batch_size={t.batch_size} must be divisible by train.grad_accum={t.grad_accum}")
    if not 0 < o.lr < 1:
        raise ConfigError(f"optim.lr must be in (0, 1), got {o.lr}")
    if not 0 <= o.min_lr_ratio <= 1:
        raise ConfigError(f"optim.min_lr_ratio must be in [0, 1], got {o.min_lr_ratio}")
    if o.warmup_steps < 0 or o.grad_clip < 0 or o.weight_decay < 0:
        raise ConfigError("optim.warmup_steps, optim.grad_clip and optim.weight_decay must be >= 0")
    resume = cfg.checkpoint.resume
    if not isinstance(resume, bool) and not (isinstance(resume, str) and resume.strip()):
        raise ConfigError(f"checkpoint.resume must be true, false or a step directory (step-0000100), got {resume!r}")
    if not 0 < cfg.data.val_fraction < 1:
        raise ConfigError(f"data.val_fraction must be in (0, 1), got {cfg.data.val_fraction}")
    if not 0 < cfg.data.test_fraction < 1:
        raise ConfigError(f"data.test_fraction must be in (0, 1), got {cfg.data.test_fraction}")
    for name, value in [("data.augment_shift", cfg.data.augment_shift), ("train.threads", t.threads),
                        ("log.samples", cfg.log.samples)]:
        if value < 0:
            raise ConfigError(f"{name} must be an integer >= 0, got {value!r}")
    if not 0 < t.mlm_probability < 1:
        raise ConfigError(f"train.mlm_probability must be in (0, 1), got {t.mlm_probability}")
    if t.max_minutes is not None and t.max_minutes <= 0:
        raise ConfigError(f"train.max_minutes must be positive, got {t.max_minutes}")
    if not 0 <= t.label_smoothing < 1:
        raise ConfigError(f"train.label_smoothing must be in [0, 1), got {t.label_smoothing}")
    for name in ("router_aux_loss_coef", "router_z_loss_coef", "z_loss_coef"):
        if not 0 <= getattr(t, name) < float("inf"):
            raise ConfigError(f"train.{name} must be a finite number >= 0, got {getattr(t, name)}")
    if t.z_loss_coef and t.objective not in ("causal", "mlm"):
        raise ConfigError(f"train.z_loss_coef applies to objective=causal or mlm, not {t.objective}; set it to 0")
    if o.schedule == "inverse_sqrt" and o.warmup_steps < 1:
        raise ConfigError("optim.schedule=inverse_sqrt needs optim.warmup_steps >= 1 (the peak comes at its end)")
    _validate_lora(cfg)


def _validate_lora(cfg: TrainConfig) -> None:
    lora = cfg.lora
    if lora.r < 0 or not 0 <= lora.dropout < 1 or lora.alpha <= 0:
        raise ConfigError(f"lora.r must be >= 0, lora.alpha > 0 and lora.dropout in [0, 1); got r={lora.r}, "
                          f"alpha={lora.alpha}, dropout={lora.dropout}")
    if lora.r and not cfg.model.get("init_from"):
        raise ConfigError("lora.r > 0 trains adapters on pretrained weights: name them with --model.init_from PATH")
    if lora.r and cfg.train.fsdp:
        raise ConfigError("lora.r > 0 with train.fsdp is not supported: train the adapters without --train.fsdp")


def _check_types(cfg: TrainConfig) -> None:
    """Every option of a bool, int, float or str type holds such a value; model options are known ModelConfig fields."""
    for name in SECTIONS:
        check_fields(getattr(cfg, name), f"{name}.")
    if not isinstance(cfg.model, dict):
        raise ConfigError(f'section "model" must be a mapping of options (key: value), got {cfg.model!r}')
    known = {f.name for f in fields(ModelConfig)} | {"preset", "init_from"}
    types = _model_types()
    for key, value in cfg.model.items():
        if key not in known:
            raise ConfigError(f'unknown option "model.{key}"{did_you_mean(key, known)}')
        if key in types and not is_valid(value, *types[key]):
            raise ConfigError(f"model.{key} must be {describe(*types[key])}, got {value!r}")


def options_help() -> str:
    """One line per option, ``--section.key (default): help``, for ``formerkit train --help``."""
    lines = ["model options: --model.preset NAME and any ModelConfig field, e.g. --model.n_layers 4;",
             "  --model.init_from PATH starts from pretrained weights (a Hugging Face dir, a native dir or a run dir) "
             "with their architecture and tokenizer;",
             "  unless the config file or the command line names model.preset or model.init_from, the model options "
             f"start from the default model {json.dumps(_DEFAULT_MODEL)};",
             "  a named preset brings all its own values instead (gpt2's include dropout 0.1), which model options "
             "then override",
             "values: a boolean option takes true or false (YAML's spellings: also True/FALSE, yes/no, on/off; not "
             "1/0); an integer option an integer; a number option any number; a text option takes its text as given "
             "(in a YAML file, quote a text that looks like a number)"]
    for name, section in SECTIONS.items():
        lines.append(f"{name} options ({section.__doc__.strip()}):")
        for f in fields(section):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            lines.append(f"  --{name}.{f.name} (default {json.dumps(default)}): {f.metadata['help']}")
    return "\n".join(lines)
