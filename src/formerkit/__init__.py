"""formerkit: the Transformer and its families as one small, tested PyTorch library."""

from formerkit.checkpoints import from_pretrained, save_pretrained
from formerkit.checkpoints.hf_config import config_from_hf, config_to_hf
from formerkit.checkpoints.quantized import load_quantized, save_quantized
from formerkit.config import ModelConfig
from formerkit.embed import embed
from formerkit.errors import (
    CheckpointError,
    ConfigError,
    DataError,
    FormerkitError,
    FormerkitWarning,
    InputError,
    TrainingError,
)
from formerkit.generate import (
    BeamOutput,
    GenerationConfig,
    SpeculativeOutput,
    beam_search,
    generate,
    generate_text,
    speculative_generate,
)
from formerkit.interp import ActivationCache, run_with_cache, run_with_hooks
from formerkit.layers.int4 import Int4Linear, quantize_int4
from formerkit.layers.quantized import Int8Linear, quantize_int8
from formerkit.model import ModelOutput, Transformer
from formerkit.predict import classify, fill_mask
from formerkit.tokenizers import (
    ByteTokenizer,
    CharTokenizer,
    HFTokenizer,
    Tokenizer,
    build_tokenizer,
    load_tokenizer,
    train_bpe,
)
from formerkit.version import __version__ as __version__

__all__ = [
    "ActivationCache",
    "BeamOutput",
    "ByteTokenizer",
    "CharTokenizer",
    "CheckpointError",
    "ConfigError",
    "DataError",
    "FormerkitError",
    "FormerkitWarning",
    "GenerationConfig",
    "HFTokenizer",
    "InputError",
    "Int4Linear",
    "Int8Linear",
    "ModelConfig",
    "ModelOutput",
    "SpeculativeOutput",
    "Tokenizer",
    "TrainingError",
    "Transformer",
    "beam_search",
    "build_tokenizer",
    "classify",
    "config_from_hf",
    "config_to_hf",
    "embed",
    "fill_mask",
    "from_pretrained",
    "generate",
    "generate_text",
    "load_quantized",
    "load_tokenizer",
    "quantize_int4",
    "quantize_int8",
    "run_with_cache",
    "run_with_hooks",
    "save_pretrained",
    "save_quantized",
    "speculative_generate",
    "train_bpe",
]
