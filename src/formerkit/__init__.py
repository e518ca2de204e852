"""formerkit: the Transformer and its families as one small, tested PyTorch library."""

from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as _version

from formerkit.checkpoints import from_pretrained, save_pretrained
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
from formerkit.model import ModelOutput, Transformer
from formerkit.predict import classify, fill_mask
from formerkit.quantize import Int8Linear, load_quantized, quantize_int8, save_quantized
from formerkit.tokenizers import (
    ByteTokenizer,
    CharTokenizer,
    HFTokenizer,
    Tokenizer,
    build_tokenizer,
    load_tokenizer,
    train_bpe,
)

try:
    __version__ = _version("formerkit")  # the installed distribution's, so it cannot drift from pyproject.toml
except PackageNotFoundError:  # a source tree on sys.path that was never installed
    __version__ = "0+unknown"

__all__ = [
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
    "embed",
    "fill_mask",
    "from_pretrained",
    "generate",
    "generate_text",
    "load_quantized",
    "load_tokenizer",
    "quantize_int8",
    "save_pretrained",
    "save_quantized",
    "speculative_generate",
    "train_bpe",
]
