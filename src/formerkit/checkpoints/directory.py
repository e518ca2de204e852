"""What a checkpoint directory says about its model: the ModelConfig, native or Hugging Face."""

from __future__ import annotations

from pathlib import Path

from formerkit.checkpoints.hf_config import config_from_hf
from formerkit.config import ModelConfig
from formerkit.errors import CheckpointError, ConfigError
from formerkit.fileio import read_json
from formerkit.rundir import NATIVE_CONFIG, resolve_checkpoint_dir

_ST_POOLING = {"pooling_mode_mean_tokens": "mean", "pooling_mode_cls_token": "cls",
               "pooling_mode_max_tokens": "max", "pooling_mode_lasttoken": "last"}


def _sentence_transformers_pooling(directory: Path) -> str | None:
    path = directory / "1_Pooling" / "config.json"
    if not path.is_file():
        return None
    modes = [mode for key, mode in _ST_POOLING.items() if read_json(path).get(key)]
    return modes[0] if len(modes) == 1 else None


def load_config(path: str | Path) -> ModelConfig:
    """The ModelConfig of a checkpoint directory (native or Hugging Face; a run directory: its latest checkpoint).

    A sentence-transformers pooling config beside a Hugging Face checkpoint sets ``pooling``.
    Raises CheckpointError when the directory holds no config this library reads.
    """
    directory = resolve_checkpoint_dir(path)
    if (directory / NATIVE_CONFIG).is_file():
        return ModelConfig.from_dict(read_json(directory / NATIVE_CONFIG))
    if not (directory / "config.json").is_file():
        raise CheckpointError(f"{directory} has neither {NATIVE_CONFIG} (formerkit) nor config.json "
                              "(Hugging Face); point at the directory a checkpoint was saved to")
    try:
        cfg = config_from_hf(read_json(directory / "config.json"))
    except ConfigError as err:
        raise CheckpointError(f"{directory / 'config.json'}: {err}") from err
    pooling = _sentence_transformers_pooling(directory)
    return cfg.replace(pooling=pooling) if pooling is not None else cfg
