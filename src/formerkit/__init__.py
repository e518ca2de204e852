"""formerkit: the Transformer and its families as one small, tested PyTorch library."""

from formerkit.config import ModelConfig
from formerkit.errors import CheckpointError, ConfigError, FormerkitError, InputError
from formerkit.model import ModelOutput, Transformer

__version__ = "0.1.0"

__all__ = [
    "CheckpointError",
    "ConfigError",
    "FormerkitError",
    "InputError",
    "ModelConfig",
    "ModelOutput",
    "Transformer",
]
