"""Tokenizers behind one interface. This module reads Hugging Face ``tokenizer.json`` files
through the ``tokenizers`` library; ``load_tokenizer`` finds one beside a checkpoint.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from tokenizers import Tokenizer as _RustTokenizer

from formerkit.errors import CheckpointError, InputError

_SPECIAL_KEYS = ("pad_token", "bos_token", "eos_token", "unk_token", "cls_token", "sep_token", "mask_token")


class HFTokenizer:
    """A ``tokenizer.json`` tokenizer with special tokens and a default maximum length.

    The file's own padding and truncation settings are switched off: ``batch`` pads and
    truncates explicitly, so results never depend on what the file happened to store.
    """

    def __init__(self, tokenizer: _RustTokenizer, *, special_tokens: dict[str, str] | None = None,
                 max_length: int | None = None) -> None:
        self._tok = tokenizer
        self._tok.no_padding()
        self._tok.no_truncation()
        self.special_tokens = dict(special_tokens or {})
        self.max_length = max_length

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

    def encode(self, text: str, *, add_special_tokens: bool = True, max_length: int | None = None) -> list[int]:
        """Token ids of one text, truncated to ``max_length`` (special tokens kept) when given."""
        if not isinstance(text, str):
            raise InputError(f"encode expects a str, got {type(text).__name__}")
        return self._encode([text], add_special_tokens, max_length)[0]

    def decode(self, ids: list[int] | torch.Tensor, *, skip_special_tokens: bool = True) -> str:
        """Text of a sequence of ids."""
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def batch(self, texts: list[str], *, max_length: int | None = None,
              add_special_tokens: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """Encode texts into right-padded ids (B, T) and an attention mask (B, T) of 1/0.

        Each text is truncated to ``max_length`` tokens (default: the tokenizer's own).
        """
        if not isinstance(texts, (list, tuple)) or not all(isinstance(t, str) for t in texts):
            raise InputError("batch expects a list of str")
        rows = self._encode(list(texts), add_special_tokens, self.max_length if max_length is None else max_length)
        width = max((len(r) for r in rows), default=0)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
            mask[i, : len(row)] = 1
        return ids, mask

    def _encode(self, texts: list[str], add_special_tokens: bool, max_length: int | None) -> list[list[int]]:
        if max_length is not None:
            # the Rust library ignores a limit too small for the special tokens and returns the text untruncated
            needed = max(1, self._tok.num_special_tokens_to_add(False) if add_special_tokens else 0)
            if not isinstance(max_length, int) or max_length < needed:
                raise InputError(f"max_length must be an integer >= {needed}, got {max_length!r}")
            self._tok.enable_truncation(max_length)
        try:
            return [e.ids for e in self._tok.encode_batch(texts, add_special_tokens=add_special_tokens)]
        finally:
            self._tok.no_truncation()

    def save(self, directory: str | Path) -> None:
        """Write tokenizer.json and tokenizer_config.json into ``directory``."""
        from formerkit.checkpoints.files import atomic_write, write_json

        path = Path(directory)
        atomic_write(path / "tokenizer.json", lambda tmp: self._tok.save(str(tmp)))
        config = {**self.special_tokens, "model_max_length": self.max_length}
        write_json(path / "tokenizer_config.json", {k: v for k, v in config.items() if v is not None})


def _special_tokens(config: dict) -> dict[str, str]:
    out = {}
    for key in _SPECIAL_KEYS:
        value = config.get(key)
        if isinstance(value, dict):  # {"content": "[PAD]", ...} form
            value = value.get("content")
        if isinstance(value, str):
            out[key] = value
    return out


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path} is not valid JSON: {err}") from err
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} must hold a JSON object, got {type(data).__name__}")
    return data


def load_tokenizer(path: str | Path) -> HFTokenizer:
    """Load the tokenizer saved in a checkpoint directory, or a ``tokenizer.json`` file.

    Special tokens come from tokenizer_config.json / special_tokens_map.json; the default
    maximum length from sentence_bert_config.json (sentence-transformers) or
    tokenizer_config.json's model_max_length.
    """
    path = Path(path)
    file = path if path.is_file() else path / "tokenizer.json"
    directory = file.parent
    if not file.is_file():
        raise CheckpointError(f"no tokenizer at {path}: expected a tokenizer.json file or a directory holding one")
    try:
        tokenizer = _RustTokenizer.from_file(str(file))
    except Exception as err:  # the Rust library raises a bare Exception on malformed files
        raise CheckpointError(f"cannot read tokenizer {file}: {err}") from err
    config = {**_read_json(directory / "special_tokens_map.json"), **_read_json(directory / "tokenizer_config.json")}
    max_length = _read_json(directory / "sentence_bert_config.json").get("max_seq_length")
    if max_length is None:
        model_max = config.get("model_max_length")
        max_length = model_max if isinstance(model_max, int) and model_max < 1_000_000 else None
    return HFTokenizer(tokenizer, special_tokens=_special_tokens(config), max_length=max_length)
