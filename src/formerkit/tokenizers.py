"""Tokenizers behind one interface, the ``Tokenizer`` protocol.

Three kinds: ``ByteTokenizer`` (UTF-8 bytes), ``CharTokenizer`` (the characters of a
corpus) and ``HFTokenizer`` (any Hugging Face ``tokenizer.json``, including the byte-level
BPE that ``train_bpe`` trains). ``load_tokenizer`` reads whichever kind was saved beside a
checkpoint; ``build_tokenizer`` makes one from a kind name.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import operator
import warnings
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np
import torch
from tokenizers import Tokenizer as _RustTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from formerkit.errors import CheckpointError, ConfigError, DataError, FormerkitWarning, InputError, did_you_mean
from formerkit.fileio import atomic_write, read_json, write_json
from formerkit.rundir import resolve_checkpoint_dir

_SPECIAL_KEYS = ("pad_token", "bos_token", "eos_token", "unk_token", "cls_token", "sep_token", "mask_token")
FORMERKIT_FILE = "formerkit_tokenizer.json"  # byte and char tokenizers save this; HF ones save tokenizer.json
KINDS = ("byte", "char", "bpe")
_SHORT_VOCAB = 0.9  # a learned BPE vocabulary below this share of the size asked is worth a warning


@runtime_checkable
class Tokenizer(Protocol):
    """What every formerkit tokenizer offers: text <-> ids, padded batches, saving, a cache key."""

    max_length: int | None  # default truncation length of ``batch`` (None: no limit)
    special_tokens: dict[str, str]  # role key ('pad_token', 'eos_token', ...) -> token string

    @property
    def vocab_size(self) -> int: ...

    @property
    def pad_id(self) -> int: ...

    @property
    def eos_id(self) -> int | None: ...

    @property
    def mask_id(self) -> int | None: ...

    def encode(self, text: str, *, add_special_tokens: bool = True, max_length: int | None = None) -> list[int]: ...

    def decode(self, ids: list[int] | torch.Tensor, *, skip_special_tokens: bool = True) -> str: ...

    def batch(self, texts: list[str], *, max_length: int | None = None,
              add_special_tokens: bool = True) -> tuple[torch.Tensor, torch.Tensor]: ...

    def save(self, directory: str | Path) -> None: ...

    def encode_many(self, texts: list[str]) -> list[list[int]]: ...

    def fingerprint(self) -> str: ...


def _check_text(text: object) -> None:
    if not isinstance(text, str):
        raise InputError(f"encode expects a str, got {type(text).__name__}")


def _check_texts(texts: object) -> None:
    if not isinstance(texts, (list, tuple)) or not all(isinstance(t, str) for t in texts):
        raise InputError("batch expects a list of str")


def _check_max_length(max_length: object, needed: int = 1) -> None:
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < needed:
        raise InputError(f"max_length must be an integer >= {needed}, got {max_length!r}")


def _pad(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad rows of ids into ids (B, T) filled with ``pad_id`` and a mask (B, T) of 1/0."""
    width = max((len(r) for r in rows), default=0)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)  # (B, T)
    mask = torch.zeros((len(rows), width), dtype=torch.long)  # (B, T)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        mask[i, : len(row)] = 1
    return ids, mask


def _as_list(ids: list[int] | torch.Tensor) -> list[int]:
    return ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)


def _integer_ids(ids: list[int] | torch.Tensor) -> list[int]:
    """``ids`` as a list of Python ints, or an InputError for anything else (floats, strings, nested lists)."""
    try:
        return [operator.index(i) for i in _as_list(ids)]
    except TypeError as err:
        raise InputError(f"decode expects integer ids: {err}") from err


@contextlib.contextmanager
def _unicode_checked(texts: list[str]) -> Iterator[None]:
    """Turn the Rust library's TypeError for a text that is not valid Unicode (a lone surrogate) into an InputError."""
    try:
        yield
    except TypeError:
        for i, text in enumerate(texts):
            try:
                text.encode("utf-8")
            except UnicodeEncodeError as err:
                raise InputError(f"text {i} is not valid Unicode ({err.reason} at character {err.start}); "
                                 "a tokenizer.json tokenizer reads UTF-8 text only") from None
        raise


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


class HFTokenizer:
    """A ``tokenizer.json`` tokenizer with special tokens and a default maximum length.

    The file's own padding and truncation settings are switched off: ``batch`` pads and
    truncates explicitly, so results never depend on what the file happened to store.
    ``config`` holds the other entries of the tokenizer_config.json it was loaded from
    (tokenizer class, chat template, ...): formerkit does not use them, ``save`` writes them back.
    """

    def __init__(self, tokenizer: _RustTokenizer, *, special_tokens: dict[str, str] | None = None,
                 max_length: int | None = None, config: dict | None = None) -> None:
        self._tok = tokenizer
        self._tok.no_padding()
        self._tok.no_truncation()
        self.special_tokens = dict(special_tokens or {})
        self.max_length = max_length
        self.config = dict(config or {})

    @property
    def vocab_size(self) -> int:
        """Number of token ids, added tokens included."""
        return self._tok.get_vocab_size(with_added_tokens=True)

    def token_id(self, role: str) -> int | None:
        """Id of a special token by role ('pad', 'eos', 'cls', ...), or None if it has none."""
        token = self.special_tokens.get(f"{role}_token")
        return None if token is None else self._tok.token_to_id(token)

    @property
    def pad_id(self) -> int:
        """Id used for padding (the pad token's, else 0)."""
        pad = self.token_id("pad")
        return 0 if pad is None else pad

    @property
    def eos_id(self) -> int | None:
        """Id that ends a text / separates documents: the eos token's, else the sep token's, else None."""
        eos = self.token_id("eos")
        return self.token_id("sep") if eos is None else eos

    @property
    def mask_id(self) -> int | None:
        """Id of the mask token (masked LM), or None if the tokenizer has none."""
        return self.token_id("mask")

    def encode(self, text: str, *, add_special_tokens: bool = True, max_length: int | None = None) -> list[int]:
        """Token ids of one text, truncated to ``max_length`` (special tokens kept) when given."""
        _check_text(text)
        return self._encode([text], add_special_tokens, max_length)[0]

    def encode_many(self, texts: list[str]) -> list[list[int]]:
        """Token ids of many texts without special tokens or truncation (the corpus fast path)."""
        fast = getattr(self._tok, "encode_batch_fast", self._tok.encode_batch)  # no offsets: tokenizers >= 0.20
        texts = list(texts)
        with _unicode_checked(texts):
            return [e.ids for e in fast(texts, add_special_tokens=False)]

    def decode(self, ids: list[int] | torch.Tensor, *, skip_special_tokens: bool = True) -> str:
        """Text of a sequence of ids; ids the vocabulary does not have (>= vocab_size) decode to nothing."""
        ids = _integer_ids(ids)
        if any(i < 0 for i in ids):
            raise InputError(f"token id {min(ids)} is negative; token ids count from 0")
        return self._tok.decode([i for i in ids if i < self.vocab_size], skip_special_tokens=skip_special_tokens)

    def batch(self, texts: list[str], *, max_length: int | None = None,
              add_special_tokens: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """Encode texts into right-padded ids (B, T) and an attention mask (B, T) of 1/0.

        Each text is truncated to ``max_length`` tokens (default: the tokenizer's own).
        """
        _check_texts(texts)
        rows = self._encode(list(texts), add_special_tokens, self.max_length if max_length is None else max_length)
        return _pad(rows, self.pad_id)

    def _encode(self, texts: list[str], add_special_tokens: bool, max_length: int | None) -> list[list[int]]:
        if max_length is not None:
            # the Rust library ignores a limit too small for the special tokens and returns the text untruncated
            _check_max_length(max_length, max(1, self._tok.num_special_tokens_to_add(False) if add_special_tokens
                                               else 0))
            self._tok.enable_truncation(max_length)
        try:
            with _unicode_checked(texts):
                return [e.ids for e in self._tok.encode_batch(texts, add_special_tokens=add_special_tokens)]
        finally:
            self._tok.no_truncation()

    def fingerprint(self) -> str:
        """sha256 of the tokenizer JSON and the special-token map (which picks ``eos_id``)."""
        return _sha256(self._tok.to_str() + json.dumps(self.special_tokens, sort_keys=True))

    def save(self, directory: str | Path) -> None:
        """Write tokenizer.json and tokenizer_config.json into ``directory``.

        tokenizer_config.json names the special tokens, the maximum length and a ``tokenizer_class``
        (``PreTrainedTokenizerFast`` unless the loaded config named one), so that
        ``transformers.AutoTokenizer.from_pretrained(directory)`` loads it too.
        """
        path = Path(directory)
        atomic_write(path / "tokenizer.json", lambda tmp: self._tok.save(str(tmp)))
        config = {"tokenizer_class": "PreTrainedTokenizerFast", **self.config, **self.special_tokens,
                  "model_max_length": self.max_length}
        write_json(path / "tokenizer_config.json", {k: v for k, v in config.items() if v is not None})
        (path / FORMERKIT_FILE).unlink(missing_ok=True)  # it would shadow tokenizer.json in load_tokenizer


class _TableTokenizer:
    """Shared mechanics of the byte and char tokenizers: a fixed table, no special tokens added.

    Subclasses set ``_PAD``, ``_EOS``, ``_MASK`` (ids), ``special_tokens``, ``_specials`` (id ->
    token string) and ``max_length``, and define ``vocab_size``, ``_ids`` (text -> ids), ``_text``
    (ids -> text) and ``_state`` (what ``save`` writes and ``fingerprint`` hashes).
    """

    _PAD: int
    _EOS: int
    _MASK: int
    special_tokens: dict[str, str]
    max_length: int | None
    _specials: dict[int, str]

    @property
    def vocab_size(self) -> int:
        raise NotImplementedError

    def _ids(self, text: str) -> list[int]:
        raise NotImplementedError

    def _text(self, ids: list[int]) -> str:
        raise NotImplementedError

    def _state(self) -> dict:
        raise NotImplementedError

    @property
    def pad_id(self) -> int:
        """Id of ``<pad>``."""
        return self._PAD

    @property
    def eos_id(self) -> int:
        """Id of ``<eos>``, the document separator."""
        return self._EOS

    @property
    def mask_id(self) -> int:
        """Id of ``<mask>``."""
        return self._MASK

    def encode(self, text: str, *, add_special_tokens: bool = True, max_length: int | None = None) -> list[int]:
        """Token ids of one text, cut to ``max_length`` when given. No special tokens are ever added."""
        _check_text(text)
        ids = self._ids(text)
        if max_length is not None:
            _check_max_length(max_length)
            ids = ids[:max_length]
        return ids

    def encode_many(self, texts: list[str]) -> list[list[int]]:
        """Token ids of many texts (no truncation)."""
        return [self._ids(t) for t in texts]

    def decode(self, ids: list[int] | torch.Tensor, *, skip_special_tokens: bool = True) -> str:
        """Text of a sequence of ids; special tokens are dropped, or written as ``<eos>`` etc. when kept."""
        ids = _integer_ids(ids)
        bad = next((i for i in ids if not 0 <= i < self.vocab_size), None)
        if bad is not None:
            raise InputError(f"token id {bad} is out of range for a vocabulary of {self.vocab_size}")
        pieces = []
        for special, group in itertools.groupby(ids, key=lambda i: i in self._specials):
            if not special:
                pieces.append(self._text(list(group)))
            elif not skip_special_tokens:
                pieces.extend(self._specials[i] for i in group)
        return "".join(pieces)

    def batch(self, texts: list[str], *, max_length: int | None = None,
              add_special_tokens: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """Encode texts into right-padded ids (B, T) and a mask (B, T) of 1/0, each cut to ``max_length``."""
        _check_texts(texts)
        limit = self.max_length if max_length is None else max_length
        if limit is not None:  # checked even when there is no text to cut
            _check_max_length(limit)
        return _pad([self.encode(t, max_length=limit) for t in texts], self.pad_id)

    def fingerprint(self) -> str:
        """sha256 of the table (kind, and the characters for a char tokenizer)."""
        return _sha256(json.dumps(self._state(), sort_keys=True))

    def save(self, directory: str | Path) -> None:
        """Write ``formerkit_tokenizer.json`` (kind, table, max length) into ``directory``."""
        write_json(Path(directory) / FORMERKIT_FILE, {**self._state(), "model_max_length": self.max_length})


class ByteTokenizer(_TableTokenizer):
    """UTF-8 bytes as ids 0..255, then ``<pad>`` 256, ``<eos>`` 257, ``<mask>`` 258 (vocab 259).

    ``encode`` never adds special tokens (no BOS/EOS), whatever ``add_special_tokens`` says;
    ``decode`` replaces invalid UTF-8 with U+FFFD instead of failing.
    """

    _PAD, _EOS, _MASK = 256, 257, 258

    def __init__(self, *, max_length: int | None = None) -> None:
        self.max_length = max_length
        self.special_tokens = {"pad_token": "<pad>", "eos_token": "<eos>", "mask_token": "<mask>"}
        self._specials = {256: "<pad>", 257: "<eos>", 258: "<mask>"}

    @property
    def vocab_size(self) -> int:
        """259: 256 bytes and three special tokens."""
        return 259

    def _ids(self, text: str) -> list[int]:
        return list(text.encode("utf-8", "surrogatepass"))

    def _text(self, ids: list[int]) -> str:
        return bytes(ids).decode("utf-8", errors="replace")

    def _state(self) -> dict:
        return {"kind": "byte"}


class CharTokenizer(_TableTokenizer):
    """One id per character: ``<pad>`` 0, ``<eos>`` 1, ``<mask>`` 2, ``<unk>`` 3, then the characters.

    Characters not in the table encode to ``<unk>``. ``encode`` never adds special tokens.
    """

    _PAD, _EOS, _MASK, _UNK = 0, 1, 2, 3

    def __init__(self, chars: Iterable[str], *, max_length: int | None = None) -> None:
        distinct = set(chars)
        if not distinct or any(not isinstance(c, str) or len(c) != 1 for c in distinct):
            raise InputError("CharTokenizer needs a non-empty collection of single characters")
        self.chars = sorted(distinct)
        self.max_length = max_length
        self.special_tokens = {"pad_token": "<pad>", "eos_token": "<eos>", "mask_token": "<mask>",
                               "unk_token": "<unk>"}
        self._specials = {0: "<pad>", 1: "<eos>", 2: "<mask>", 3: "<unk>"}
        self._codepoints = np.array([ord(c) for c in self.chars], dtype=np.int64)  # sorted, as the chars are
        self._known = frozenset(self.chars)

    @classmethod
    def from_texts(cls, texts: Iterable[str]) -> CharTokenizer:
        """Build the table from every distinct character in ``texts`` (sorted, so deterministic)."""
        seen: set[str] = set()
        for text in texts:
            seen.update(text)
        if not seen:
            raise DataError("cannot build a char tokenizer: the texts hold no characters")
        return cls(seen)

    @property
    def vocab_size(self) -> int:
        """Number of characters plus the four special tokens."""
        return len(self.chars) + 4

    def unknown_chars(self, text: str) -> list[str]:
        """The distinct characters of ``text`` that are not in the table (they encode to ``<unk>``), sorted."""
        return sorted(set(text) - self._known)

    def _ids(self, text: str) -> list[int]:
        points = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype=np.uint32).astype(np.int64)  # (N,)
        where = np.searchsorted(self._codepoints, points)  # (N,) index of each character in the table
        found = self._codepoints[np.minimum(where, len(self.chars) - 1)] == points  # (N,)
        return np.where(found, where + 4, self._UNK).tolist()

    def _text(self, ids: list[int]) -> str:
        return "".join(self.chars[i - 4] for i in ids)

    def _state(self) -> dict:
        return {"kind": "char", "chars": self.chars}


def _fed(texts: Iterable[str], max_chars: int | None) -> Iterator[str]:
    """The texts, stopping after ``max_chars`` characters in all (the last one cut to fit)."""
    left = max_chars
    for text in texts:
        if left is not None:
            text = text[:left]
            left -= len(text)
        if text:
            yield text
        if left == 0:
            return


def train_bpe(texts: Iterable[str], vocab_size: int, *, max_chars: int | None = 20_000_000) -> HFTokenizer:
    """Train a byte-level BPE tokenizer (GPT-2 style) on ``texts`` and return it.

    ``decode(encode(x)) == x`` for any text (unless it spells a special token). Special tokens:
    ``<|endoftext|>`` (eos), ``<pad>``, ``<mask>``. The trainer sees at most ``max_chars``
    characters. The same input gives the same tokenizer. A text too small to learn 90% of
    ``vocab_size`` tokens gives a smaller vocabulary, with a FormerkitWarning saying its size.
    """
    minimum = 256 + 3
    if not isinstance(vocab_size, int) or vocab_size < minimum:
        raise ConfigError(f"vocab_size must be an integer >= {minimum} (256 bytes + 3 special tokens), "
                          f"got {vocab_size!r}")
    specials = {"eos_token": "<|endoftext|>", "pad_token": "<pad>", "mask_token": "<mask>"}
    tok = _RustTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(specials.values()),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    fed = _fed(texts, max_chars)
    first = next(fed, None)
    if first is None:
        raise DataError("cannot train a BPE tokenizer: the texts are empty")
    tok.train_from_iterator(itertools.chain([first], fed), trainer=trainer)
    learned = tok.get_vocab_size(with_added_tokens=True)
    if learned < _SHORT_VOCAB * vocab_size:
        warnings.warn(f"the BPE tokenizer learned {learned} tokens, far fewer than the {vocab_size} asked "
                      f"(--data.vocab_size, or vocab_size= in Python): the training text is too small for more "
                      f"merges, so the vocabulary size is {learned}", FormerkitWarning, stacklevel=2)
    return HFTokenizer(tok, special_tokens=specials)


def _special_tokens(config: dict) -> dict[str, str]:
    out = {}
    for key in _SPECIAL_KEYS:
        value = config.get(key)
        if isinstance(value, dict):  # {"content": "[PAD]", ...} form
            value = value.get("content")
        if isinstance(value, str):
            out[key] = value
    return out


def _load_table(file: Path) -> ByteTokenizer | CharTokenizer:
    state = read_json(file)
    max_length = state.get("model_max_length")
    if max_length is not None and (not isinstance(max_length, int) or max_length < 1):
        raise CheckpointError(f"{file}: model_max_length must be a positive integer or absent, got {max_length!r}")
    if state.get("kind") == "byte":
        return ByteTokenizer(max_length=max_length)
    if state.get("kind") == "char":
        chars = state.get("chars")
        if not isinstance(chars, list) or len(set(map(str, chars))) != len(chars):
            raise CheckpointError(f"{file}: 'chars' must be a list of distinct single characters")
        try:
            return CharTokenizer(chars, max_length=max_length)
        except InputError as err:
            raise CheckpointError(f"{file}: {err}") from err
    raise CheckpointError(f"{file}: unknown tokenizer kind {state.get('kind')!r}; expected 'byte' or 'char'")


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Load the tokenizer saved in a checkpoint directory, or a ``tokenizer.json`` file.

    A directory with ``formerkit_tokenizer.json`` gives a byte or char tokenizer; otherwise
    ``tokenizer.json`` gives an ``HFTokenizer`` whose special tokens come from
    tokenizer_config.json / special_tokens_map.json and whose default maximum length comes from
    sentence_bert_config.json (sentence-transformers) or tokenizer_config.json's model_max_length.
    A training run directory gives the tokenizer of its latest checkpoint.
    """
    path = Path(path)
    if path.is_dir():
        path = resolve_checkpoint_dir(path)
    if path.name == FORMERKIT_FILE and path.is_file():
        return _load_table(path)
    if (path / FORMERKIT_FILE).is_file():
        return _load_table(path / FORMERKIT_FILE)
    file = path if path.is_file() else path / "tokenizer.json"
    directory = file.parent
    if not file.is_file():
        raise CheckpointError(f"no tokenizer at {path}: expected a tokenizer.json file or a directory holding one "
                              f"(or {FORMERKIT_FILE})")
    try:
        tokenizer = _RustTokenizer.from_file(str(file))
    except Exception as err:  # the Rust library raises a bare Exception on malformed files
        raise CheckpointError(f"cannot read tokenizer {file}: {err}") from err
    config = {**read_json(directory / "special_tokens_map.json", optional=True),
              **read_json(directory / "tokenizer_config.json", optional=True)}
    max_length = read_json(directory / "sentence_bert_config.json", optional=True).get("max_seq_length")
    if max_length is None:
        model_max = config.get("model_max_length")
        max_length = model_max if isinstance(model_max, int) and model_max < 1_000_000 else None
    extra = {k: v for k, v in config.items() if k not in _SPECIAL_KEYS and k != "model_max_length"}
    return HFTokenizer(tokenizer, special_tokens=_special_tokens(config), max_length=max_length, config=extra)


def build_tokenizer(kind: str, texts: Callable[[], Iterable[str]] | None = None, vocab_size: int = 8192) -> Tokenizer:
    """Make a tokenizer: "byte", "char" or "bpe" (the last two learned from ``texts()``), or load one from a path.

    ``texts`` is a function returning a fresh iterable of training texts; a path names a
    tokenizer.json file or a directory holding a saved tokenizer. Returns the tokenizer.
    """
    if kind == "byte":
        return ByteTokenizer()
    if kind in ("char", "bpe"):
        if texts is None:
            raise ConfigError(f'tokenizer "{kind}" is learned from text: pass texts (a function returning texts)')
        return CharTokenizer.from_texts(texts()) if kind == "char" else train_bpe(texts(), vocab_size)
    if Path(kind).exists():
        return load_tokenizer(kind)
    raise ConfigError(f'unknown tokenizer "{kind}"{did_you_mean(kind, KINDS)}: expected one of '
                      f'{", ".join(KINDS)}, or a path to a tokenizer.json file or a directory with a saved tokenizer')
