"""Token corpora: a text source tokenized once into flat token files, cached on disk.

``load_corpus`` tokenizes every document (followed by the tokenizer's eos id, if it has
one), splits train from validation by document, and writes ``train.bin`` / ``val.bin``
(raw uint16 or uint32) and ``meta.json`` under ``<cache_dir>/<key>/``. The key hashes the
source's and the tokenizer's fingerprints and the split, so a later call with the same
inputs maps the files without tokenizing again.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np

from formerkit.data.sources import TextSource
from formerkit.errors import CheckpointError, ConfigError, DataError
from formerkit.fileio import read_json, write_json
from formerkit.tokenizers import Tokenizer

CACHE_VERSION = 1  # bump when the file layout or the split rule changes
_CHUNK_CHARS = 1 << 20  # characters handed to encode_many at a time
_PIECE_CHARS = 1 << 20  # longer documents are tokenized in pieces cut at line ends


@dataclass(frozen=True)
class TokenCorpus:
    """A tokenized corpus: 1-D read-only token arrays (memory-mapped) for training and validation."""

    train: np.ndarray  # (N_train,) uint16 or uint32
    val: np.ndarray  # (N_val,)
    vocab_size: int
    directory: Path  # the cache entry holding train.bin, val.bin, meta.json
    documents: int = 0  # documents of the source (train and validation)
    val_documents: int = 0

    @property
    def num_tokens(self) -> int:
        """Tokens in both splits together."""
        return len(self.train) + len(self.val)


def token_dtype(vocab_size: int) -> np.dtype:
    """The smallest unsigned dtype holding every id of a vocabulary: uint16 up to 65,536 ids, else uint32."""
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)


def _unit_hash(name: str) -> float:
    """A deterministic number in [0, 1) from a document's name."""
    return int.from_bytes(hashlib.sha256(name.encode("utf-8", "surrogateescape")).digest()[:8], "big") / 2**64


def validation_documents(names: list[str], val_fraction: float) -> np.ndarray:
    """Which documents go to validation: (N,) bool, True where the hash of the name is under ``val_fraction``.

    With two or more documents both splits get at least one (the lowest / highest hash moves).
    """
    unit = np.array([_unit_hash(n) for n in names])  # (N,)
    val = unit < val_fraction  # (N,)
    if len(names) >= 2:
        if not val.any():
            val[unit.argmin()] = True
        if val.all():
            val[unit.argmax()] = False
    return val


def _pieces(text: str) -> list[str]:
    """Cut a long text into pieces of at most ``_PIECE_CHARS`` characters, at line ends where possible."""
    pieces, start = [], 0
    while len(text) - start > _PIECE_CHARS:
        cut = text.rfind("\n", start, start + _PIECE_CHARS) + 1
        cut = cut if cut > start else start + _PIECE_CHARS
        pieces.append(text[start:cut])
        start = cut
    pieces.append(text[start:])
    return pieces


def _write_chunk(tokenizer: Tokenizer, pieces: list[str], owners: list[tuple[bool, bool]],
                 outs: tuple[BinaryIO, BinaryIO], dtype: np.dtype) -> None:
    """Tokenize ``pieces`` and append the ids to the train or val file; owners = (to_val, ends_document)."""
    eos = tokenizer.eos_id
    buffers: tuple[list[int], list[int]] = ([], [])
    for ids, (to_val, last) in zip(tokenizer.encode_many(pieces), owners, strict=True):
        buffers[to_val].extend(ids)
        if last and eos is not None:
            buffers[to_val].append(eos)
    for out, buffer in zip(outs, buffers, strict=True):
        np.asarray(buffer, dtype=dtype).tofile(out)


def _tokenize(source: TextSource, tokenizer: Tokenizer, val_fraction: float, directory: Path,
              dtype: np.dtype) -> dict:
    """Write train.bin and val.bin into ``directory``; return the counts for meta.json."""
    names = source.names
    to_val = validation_documents(names, val_fraction)  # (N,) bool
    with open(directory / "train.bin", "wb") as train, open(directory / "val.bin", "wb") as val:
        pieces: list[str] = []
        owners: list[tuple[bool, bool]] = []
        chars, count = 0, 0
        for index, text in enumerate(source.documents()):
            count = index + 1
            if count > len(names):
                break
            parts = _pieces(text)
            pieces += parts
            owners += [(bool(to_val[index]), j == len(parts) - 1) for j in range(len(parts))]
            chars += len(text)
            if chars >= _CHUNK_CHARS:
                _write_chunk(tokenizer, pieces, owners, (train, val), dtype)
                pieces, owners, chars = [], [], 0
        _write_chunk(tokenizer, pieces, owners, (train, val), dtype)
        for out in (train, val):
            out.flush()
            os.fsync(out.fileno())
    if count != len(names):
        raise DataError(f"{source.describe()} changed while it was read ({count} documents, expected "
                        f"{len(names)}); resolve the source again")
    if len(names) == 1:
        _move_tail(directory, val_fraction, dtype)
    return {"documents": len(names), "val_documents": int(to_val.sum()),
            "split": "by tokens (one document)" if len(names) == 1 else "by document"}


def _move_tail(directory: Path, val_fraction: float, dtype: np.dtype) -> None:
    """With a single document: move the last ``val_fraction`` of its tokens from train.bin to val.bin."""
    size = (directory / "train.bin").stat().st_size // dtype.itemsize
    keep = size - (min(max(1, round(size * val_fraction)), size - 1) if size >= 2 else 0)
    with open(directory / "train.bin", "r+b") as train, open(directory / "val.bin", "wb") as val:
        train.seek(keep * dtype.itemsize)
        val.write(train.read())
        train.truncate(keep * dtype.itemsize)
        for out in (train, val):
            out.flush()
            os.fsync(out.fileno())


def _map(path: Path, dtype: np.dtype) -> np.ndarray:
    """A read-only 1-D view of a token file (an empty array for an empty file, which cannot be mapped)."""
    if path.stat().st_size == 0:
        empty = np.empty(0, dtype=dtype)
        empty.flags.writeable = False
        return empty
    return np.memmap(path, dtype=dtype, mode="r")


def _open(directory: Path, key: str) -> TokenCorpus | None:
    """The cached corpus in ``directory`` if it is complete and belongs to ``key``, else None."""
    try:
        meta = read_json(directory / "meta.json")
        dtype = np.dtype(meta["dtype"])
        sizes = [(directory / f"{split}.bin").stat().st_size for split in ("train", "val")]
        complete = meta["key"] == key and sizes == [meta["train_tokens"] * dtype.itemsize,
                                                    meta["val_tokens"] * dtype.itemsize]
    except (CheckpointError, OSError, KeyError, TypeError):
        return None
    if not complete:
        return None
    return TokenCorpus(_map(directory / "train.bin", dtype), _map(directory / "val.bin", dtype),
                       int(meta["vocab_size"]), directory, int(meta.get("documents", 0)),
                       int(meta.get("val_documents", 0)))


def cache_key(source: TextSource, tokenizer: Tokenizer, val_fraction: float) -> str:
    """sha256 of the source fingerprint, the tokenizer fingerprint, the split and the cache version."""
    parts = (f"v{CACHE_VERSION}", source.fingerprint(), tokenizer.fingerprint(), repr(float(val_fraction)))
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()


def load_corpus(source: TextSource, tokenizer: Tokenizer, *, cache_dir: Path | str,
                val_fraction: float = 0.05) -> TokenCorpus:
    """Tokenize ``source`` with ``tokenizer`` (or reuse the cache) and return the memory-mapped corpus.

    Each document is followed by ``tokenizer.eos_id`` when it has one. A document goes to
    validation when a hash of its name falls under ``val_fraction``; a single document is
    split by tokens instead (its last ``val_fraction`` is validation). The cache entry is
    built in a temporary directory and renamed into place, so a crash never leaves a partial
    entry that a later call would trust.
    """
    if not isinstance(val_fraction, (int, float)) or not 0 < val_fraction < 1:
        raise ConfigError(f"val_fraction must be a number strictly between 0 and 1, got {val_fraction!r}")
    key = cache_key(source, tokenizer, val_fraction)
    final = Path(cache_dir) / key
    cached = _open(final, key)
    if cached is not None:
        return cached
    shutil.rmtree(final, ignore_errors=True)  # an entry that is incomplete or not ours
    final.parent.mkdir(parents=True, exist_ok=True)
    dtype = token_dtype(tokenizer.vocab_size)
    work = Path(tempfile.mkdtemp(prefix=f".{key[:16]}.", suffix=".tmp", dir=final.parent))
    try:
        counts = _tokenize(source, tokenizer, val_fraction, work, dtype)
        sizes = {split: (work / f"{split}.bin").stat().st_size // dtype.itemsize for split in ("train", "val")}
        write_json(work / "meta.json", {
            "version": CACHE_VERSION, "key": key, "source": source.describe(),
            "source_fingerprint": source.fingerprint(), "tokenizer_fingerprint": tokenizer.fingerprint(),
            "vocab_size": tokenizer.vocab_size, "dtype": dtype.name, "val_fraction": val_fraction,
            "train_tokens": sizes["train"], "val_tokens": sizes["val"], **counts})
        try:
            os.rename(work, final)
        except OSError:  # another process finished the same entry first: use theirs
            if _open(final, key) is None:
                raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    corpus = _open(final, key)
    if corpus is None:
        raise DataError(f"the token cache {final} could not be read back after writing; check the disk")
    return corpus
