"""``formerkit convert``: a checkpoint rewritten in formerkit's native format or as a Hugging Face directory.

The source is a native or Hugging Face checkpoint directory, a training run directory (its
latest checkpoint) or an int8 checkpoint of ``formerkit quantize`` (written native only). The
tokenizer goes along whatever its kind, so the result loads and generates as the source did.
The new checkpoint is first written to a hidden directory beside the target; only once it is
complete are the files of the checkpoint the target held removed (``overwrite``) and the new
files moved in, so a failed conversion leaves the target as it was.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Literal

from formerkit.checkpoints import NATIVE_CONFIG, from_pretrained, resolve_checkpoint_dir, save_pretrained
from formerkit.checkpoints.files import WEIGHT_FILES
from formerkit.checkpoints.quantized import QUANTIZATION_FILE, save_quantized
from formerkit.errors import CheckpointError, InputError
from formerkit.rundir import latest_pointer
from formerkit.tokenizers import FORMERKIT_FILE, load_tokenizer

FORMATS = ("native", "hf")
TOKENIZER_FILES = (FORMERKIT_FILE, "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json", "vocab.txt", "vocab.json", "merges.txt", "tokenizer.model", "spiece.model",
                   "sentencepiece.bpe.model")
# every file of a checkpoint that a loader reads: weights, configs, tokenizer, sentence-transformers extras
CHECKPOINT_FILES = (*WEIGHT_FILES, NATIVE_CONFIG, "config.json", "generation_config.json", QUANTIZATION_FILE,
                    *TOKENIZER_FILES, "sentence_bert_config.json", "modules.json", "config_sentence_transformers.json",
                    "1_Pooling/config.json")
SHARD_PATTERNS = ("model-*-of-*.safetensors", "pytorch_model-*-of-*.bin")


def checkpoint_files(directory: Path) -> list[str]:
    """Names of the checkpoint files in ``directory``: weights (and shards), configs, tokenizer, quantization."""
    if not directory.is_dir():
        return []
    found = [name for name in CHECKPOINT_FILES if (directory / name).is_file()]
    for pattern in SHARD_PATTERNS:
        found.extend(sorted(p.name for p in directory.glob(pattern) if p.is_file()))
    return found


def _notice(message: str) -> None:
    print(f"formerkit convert: {message}", file=sys.stderr)


def _check_target(source: Path, checkpoint: Path, target: Path) -> None:
    """Raise CheckpointError when ``target`` is the source, a file, or a training run directory."""
    if target.resolve() in (source.resolve(), checkpoint.resolve()):
        raise CheckpointError(f"--out {target} is the source checkpoint: converting in place would overwrite what "
                              "it reads; choose another --out directory")
    if target.exists() and not target.is_dir():
        raise CheckpointError(f"--out {target} is a file; choose a directory")
    if latest_pointer(target).is_file():
        raise CheckpointError(f"--out {target} is a training run directory (from_pretrained would load its "
                              "checkpoints/latest, not the converted files); choose another --out directory")


def _has_tokenizer(directory: Path) -> bool:
    return (directory / FORMERKIT_FILE).is_file() or (directory / "tokenizer.json").is_file()


def _replace_files(staging: Path, target: Path, stale: list[str]) -> None:
    """Remove the stale files the new checkpoint does not overwrite, then move the staged files into ``target``."""
    new = {p.name for p in staging.iterdir()}
    for name in stale:
        if name not in new:
            path = target / name
            path.unlink(missing_ok=True)
            if path.parent != target and not any(path.parent.iterdir()):
                path.parent.rmdir()
    target.mkdir(parents=True, exist_ok=True)
    for path in sorted(staging.iterdir()):
        os.replace(path, target / path.name)
    removed, overwritten = [n for n in stale if n not in new], [n for n in stale if n in new]
    parts = ([f"removed {', '.join(removed)}"] if removed else []) + (
        [f"overwrote {', '.join(overwritten)}"] if overwritten else [])
    if parts:
        _notice(f"--overwrite: replaced the checkpoint in {target}: {'; '.join(parts)}")


def convert(source: str | Path, out: str | Path, format: Literal["native", "hf"] = "native", *,
            overwrite: bool = False) -> Path:
    """Write the checkpoint at ``source`` and its tokenizer to ``out`` in ``format``; return the ``out`` path.

    ``source``: a native or Hugging Face checkpoint directory, a training run directory (its
    latest checkpoint) or an int8 checkpoint (native output only). A source without a tokenizer
    converts with a warning that the result has none. ``out`` must be empty, missing, or (with
    ``overwrite``) hold a checkpoint, whose files are replaced; anything else in it is kept.
    The warning and the list of replaced files are printed to standard error, one line each.
    Raises InputError for an unknown format, CheckpointError for an unusable source or target,
    ConfigError for a model that has no Hugging Face form (``format="hf"``).
    """
    if format not in FORMATS:
        raise InputError(f'--format must be "native" or "hf", got {format!r}')
    checkpoint = resolve_checkpoint_dir(source)
    target = Path(out)
    _check_target(Path(source), checkpoint, target)
    stale = checkpoint_files(target)
    if stale and not overwrite:
        raise CheckpointError(f"--out {target} already holds a checkpoint ({', '.join(stale)}); pass --overwrite "
                              "to replace these files, or choose an empty --out directory")
    quantized = (checkpoint / QUANTIZATION_FILE).is_file()
    if quantized and format == "hf":
        raise CheckpointError(f"{checkpoint} holds int8 weights ({QUANTIZATION_FILE}), which have no Hugging Face "
                              "form: convert the float checkpoint it was quantized from, or pass --format native")
    model = from_pretrained(checkpoint)
    tokenizer = load_tokenizer(checkpoint) if _has_tokenizer(checkpoint) else None
    if tokenizer is None and model.config.patch_size is None:
        _notice(f"warning: {checkpoint} has no tokenizer (tokenizer.json or {FORMERKIT_FILE}), so the converted "
                "checkpoint has none either")
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.convert-", dir=target.parent))
    try:
        if quantized:
            save_quantized(model, staging)
            if tokenizer is not None:
                tokenizer.save(staging)
        else:
            save_pretrained(model, staging, format=format, tokenizer=tokenizer)
        _replace_files(staging, target, stale)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def cmd_convert(args: argparse.Namespace) -> None:
    """``formerkit convert``: write ``--checkpoint`` (and its tokenizer) to ``--out`` in ``--format``."""
    out = convert(args.checkpoint, args.out, format=args.format, overwrite=args.overwrite)
    print(f"wrote {args.format} checkpoint to {out}")


def add_convert_command(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``convert`` on the ``formerkit`` subparsers; return its parser (which runs ``cmd_convert``)."""
    p = subparsers.add_parser("convert", help="convert a checkpoint (and its tokenizer) between native and Hugging "
                                              "Face formats")
    p.add_argument("--checkpoint", required=True,
                   help="source: checkpoint directory (native, HF or int8) or training run directory")
    p.add_argument("--out", required=True, help="directory to write (empty or new, unless --overwrite)")
    p.add_argument("--format", choices=FORMATS, default="native", help="format to write")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the checkpoint files --out already holds (weights, configs, tokenizer files)")
    p.set_defaults(func=cmd_convert)
    return p
