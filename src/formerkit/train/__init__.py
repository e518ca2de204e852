"""Training: configs, objectives, the loop, checkpoints with exact resume, distributed execution."""

from formerkit.train.config import TrainConfig
from formerkit.train.trainer import TrainResult, train

__all__ = ["TrainConfig", "TrainResult", "train"]
