"""Predictions of trained text classifiers and masked LMs: label probabilities and mask fills.

``classify`` and ``fill_mask`` are the Python API (``predict`` picks one by the model's head);
``add_predict_command`` registers ``formerkit predict``, which reads texts from its arguments,
a JSONL file or standard input and prints one result per text (human-readable or JSON lines).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch
from torch.nn.utils.rnn import pad_sequence

from formerkit.checkpoints import from_pretrained
from formerkit.config import ModelConfig
from formerkit.errors import CheckpointError, DataError, InputError
from formerkit.model import Transformer
from formerkit.tokenizers import HFTokenizer, Tokenizer, load_tokenizer

_OTHER_COMMANDS = {"lm": "`formerkit generate` (or `formerkit sample`) continues text with a causal LM",
                   "none": "`formerkit embed` turns text into vectors with a model without a head"}


def check_predictable(config: ModelConfig) -> None:
    """Raise InputError unless ``config`` is a text classifier or a masked LM, naming the command to use instead."""
    if config.patch_size is not None:
        raise InputError("this checkpoint is an image classifier (patch_size is set): it reads pixel values, not "
                         "text; call formerkit.from_pretrained(CHECKPOINT)(pixel_values=...) instead")
    if config.head not in ("classifier", "mlm"):
        raise InputError(f"predict is for classifiers (head='classifier') and masked LMs (head='mlm'), but this "
                         f"checkpoint has head={config.head!r}; {_OTHER_COMMANDS[config.head]}")


def class_names(config: ModelConfig) -> list[str]:
    """The name of each class of a classifier config: its ``label_names``, else the class ids as strings."""
    return list(config.label_names) if config.label_names else [str(i) for i in range(config.num_labels)]


def _texts(texts: str | list[str]) -> tuple[list[str], bool]:
    """(the texts as a list, whether a single str was given); InputError for no texts or an empty one."""
    single = isinstance(texts, str)
    items = [texts] if single else texts
    if not isinstance(items, (list, tuple)) or not all(isinstance(t, str) for t in items):
        raise InputError("predict expects a str or a list of str")
    if not items:
        raise InputError("there are no texts to predict; give at least one")
    empty = next((i for i, t in enumerate(items) if not t.strip()), None)
    if empty is not None:
        raise InputError(f"text {empty + 1} is empty; give each text some words")
    return list(items), single


def _require(model: Transformer, head: str, instead: str) -> None:
    check_predictable(model.config)
    if model.config.head != head:
        raise InputError(f"this model has head={model.config.head!r}, not {head!r}; use {instead} instead")


def _check_sizes(batch_size: int, top_k: int = 1) -> None:
    for name, value in (("batch_size", batch_size), ("top_k", top_k)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise InputError(f"{name} must be an integer >= 1, got {value!r}")


def _limit(model: Transformer, tokenizer: Tokenizer, max_length: int | None) -> int:
    """Tokens kept per text: ``max_length``, else the tokenizer's, else the model's; never above max_seq_len."""
    default = tokenizer.max_length or model.config.max_seq_len
    return min(default if max_length is None else max_length, model.config.max_seq_len)


def _device(model: Transformer) -> torch.device:
    return next(model.parameters()).device


def _label_result(text: str, logits: torch.Tensor, names: list[str]) -> dict[str, Any]:
    """One text's prediction from its logits (num_labels,): the best label and every label's probability."""
    if len(names) == 1:  # one output: a regression model, whose output is the prediction itself
        return {"text": text, "value": float(logits[0])}
    probs = logits.softmax(-1)  # (num_labels,)
    best = int(probs.argmax())
    return {"text": text, "label": names[best], "probability": float(probs[best]),
            "probabilities": dict(zip(names, probs.tolist(), strict=True))}


@torch.no_grad()
def classify(
    model: Transformer,
    tokenizer: Tokenizer,
    texts: str | list[str],
    *,
    batch_size: int = 32,
    max_length: int | None = None,
) -> list[dict[str, Any]] | dict[str, Any]:
    """Classify texts with a classifier (``head='classifier'``).

    Returns one dict per text: ``text``, ``label`` (the most probable class, by its name in the
    config's ``label_names``, else its id as a string), ``probability`` (of that label) and
    ``probabilities`` (label name -> softmax probability, in class order). A one-output
    (regression) model gives ``text`` and ``value`` instead. Texts longer than ``max_length``
    tokens (default: the tokenizer's, then the model's max_seq_len) are truncated. A single str
    gives a single dict.
    """
    _require(model, "classifier", "fill_mask")
    items, single = _texts(texts)
    _check_sizes(batch_size)
    names = class_names(model.config)
    limit = _limit(model, tokenizer, max_length)
    was_training = model.training
    model.eval()
    results = []
    try:
        for start in range(0, len(items), batch_size):
            chunk = items[start : start + batch_size]
            ids, mask = tokenizer.batch(chunk, max_length=limit)  # (B, T), (B, T)
            logits = model(ids.to(_device(model)), mask.to(_device(model))).logits.float().cpu()  # (B, num_labels)
            results.extend(_label_result(text, row, names) for text, row in zip(chunk, logits, strict=True))
    finally:
        model.train(was_training)
    return results[0] if single else results


def _mask_token(tokenizer: Tokenizer) -> tuple[str, int]:
    token, mask_id = tokenizer.special_tokens.get("mask_token"), tokenizer.mask_id
    if token is None or mask_id is None:
        raise CheckpointError("the checkpoint's tokenizer has no mask token, so no text can say where to fill in; "
                              "use the tokenizer the masked LM was trained with")
    return token, mask_id


def _encode_masked(tokenizer: Tokenizer, text: str, token: str, mask_id: int, limit: int) -> list[int]:
    """Token ids of ``text`` with each written mask token as ``mask_id``.

    A ``tokenizer.json`` tokenizer reads special tokens in text itself; the byte and char
    tokenizers spell them out as characters, so their text is encoded around the mask tokens.
    """
    ids = tokenizer.encode(text, max_length=limit)
    if mask_id in ids or isinstance(tokenizer, HFTokenizer):
        return ids
    first, *rest = text.split(token)
    ids = tokenizer.encode(first)
    for piece in rest:
        ids += [mask_id, *tokenizer.encode(piece)]
    return ids[:limit]


def _masked_rows(tokenizer: Tokenizer, texts: list[str], limit: int) -> list[list[int]]:
    """Token ids of each text; InputError naming the mask token for a text that has none."""
    token, mask_id = _mask_token(tokenizer)
    rows = [_encode_masked(tokenizer, text, token, mask_id, limit) for text in texts]
    for n, (text, row) in enumerate(zip(texts, rows, strict=True)):
        if mask_id in row:
            continue
        if token in text:
            raise InputError(f"text {n + 1} ({text[:50]!r}) has its {token} beyond the first {limit} tokens, which "
                             f"are all the model reads; put {token} earlier or shorten the text")
        raise InputError(f"text {n + 1} ({text[:50]!r}) has no {token} token; write {token} where the word to "
                         f"predict goes, e.g. 'the capital of France is {token}.'")
    return rows


@torch.no_grad()
def fill_mask(
    model: Transformer,
    tokenizer: Tokenizer,
    texts: str | list[str],
    *,
    top_k: int = 5,
    batch_size: int = 32,
    max_length: int | None = None,
) -> list[dict[str, Any]] | dict[str, Any]:
    """Predict the tokens behind each mask token of texts with a masked LM (``head='mlm'``).

    Every text must hold the tokenizer's mask token (``[MASK]`` for BERT tokenizers, ``<mask>``
    for formerkit's) at least once; each mask is predicted independently from one forward pass.
    Returns one dict per text: ``text`` and ``masks``, a list (one per mask, in order) of
    ``{"position": token index, "fills": [{"token", "id", "probability"}, ...]}`` holding the
    ``top_k`` most probable tokens (softmax over the vocabulary), most probable first. A single
    str gives a single dict.
    """
    _require(model, "mlm", "classify")
    items, single = _texts(texts)
    _check_sizes(batch_size, top_k)
    rows = _masked_rows(tokenizer, items, _limit(model, tokenizer, max_length))
    mask_id, k = tokenizer.mask_id, min(top_k, model.config.vocab_size)
    was_training = model.training
    model.eval()
    results = []
    try:
        for start in range(0, len(rows), batch_size):
            chunk = [torch.tensor(row, dtype=torch.long) for row in rows[start : start + batch_size]]
            ids = pad_sequence(chunk, batch_first=True, padding_value=tokenizer.pad_id)  # (B, T)
            mask = pad_sequence([torch.ones_like(row) for row in chunk], batch_first=True)  # (B, T)
            logits = model(ids.to(_device(model)), mask.to(_device(model))).logits.float().cpu()  # (B, T, V)
            for b, row in enumerate(chunk):
                positions = (row == mask_id).nonzero().flatten()  # (M,)
                top = logits[b, positions].softmax(-1).topk(k, dim=-1)  # values, indices (M, k)
                masks = [{"position": int(p), "fills": [
                    {"token": tokenizer.decode([i], skip_special_tokens=False), "id": i, "probability": prob}
                    for i, prob in zip(ids_k.tolist(), probs_k.tolist(), strict=True)]}
                    for p, ids_k, probs_k in zip(positions, top.indices, top.values, strict=True)]
                results.append({"text": items[start + b], "masks": masks})
    finally:
        model.train(was_training)
    return results[0] if single else results


def predict(model: Transformer, tokenizer: Tokenizer, texts: list[str], *, top_k: int = 5,
            batch_size: int = 32) -> list[dict[str, Any]]:
    """``classify`` for a classifier, ``fill_mask`` (with ``top_k``) for a masked LM; InputError for other models."""
    check_predictable(model.config)
    if model.config.head == "classifier":
        return classify(model, tokenizer, texts, batch_size=batch_size)
    return fill_mask(model, tokenizer, texts, top_k=top_k, batch_size=batch_size)


# ---- the command line ----------------------------------------------------------------------------------------------
def _jsonl_texts(path: Path, field: str) -> list[str]:
    """The ``field`` string of every record of a JSONL file; DataError naming the line otherwise."""
    from formerkit.data import read_jsonl  # the data package is needed only here

    texts = []
    for number, record in read_jsonl(path):
        if not isinstance(record.get(field), str):
            found = "missing" if field not in record else f"a {type(record[field]).__name__}"
            raise DataError(f'{path}, line {number}: the "{field}" field is {found}, not a string (fields here: '
                            f'{", ".join(sorted(record)) or "none"}); name the text field with --text-field')
        texts.append(record[field])
    return texts


def read_texts(args: argparse.Namespace) -> list[str]:
    """The texts of a ``predict`` command: its arguments, else ``--input``'s records, else standard input's lines."""
    if args.texts and args.input:
        raise InputError("give texts either as arguments or with --input FILE.jsonl, not both")
    if args.texts:
        texts = args.texts
    elif args.input:
        texts = _jsonl_texts(Path(args.input), args.text_field)
    else:
        texts = [line.rstrip("\n") for line in sys.stdin if line.strip()]
    if not texts:
        raise InputError("no texts to predict: give them as arguments, with --input FILE.jsonl (the field named "
                         "by --text-field), or one per line on standard input")
    return texts


def _shown(token: str) -> str:
    return token.strip() or repr(token)


def describe(result: dict[str, Any], top_k: int) -> str:
    """Two or more human-readable lines for one ``classify`` or ``fill_mask`` result."""
    lines = [result["text"]]
    if "value" in result:
        lines.append(f"  value {result['value']:.4f}")
    elif "probabilities" in result:
        ranked = sorted(result["probabilities"].items(), key=lambda item: -item[1])[:top_k]
        lines.append("  " + " | ".join(f"{name} {p:.3f}" for name, p in ranked))
    else:
        for n, mask in enumerate(result["masks"], 1):
            lines.append(f"  mask {n}: " + " | ".join(f"{_shown(f['token'])} {f['probability']:.3f}"
                                                     for f in mask["fills"]))
    return "\n".join(lines)


def cmd_predict(args: argparse.Namespace) -> None:
    """Print each text's predicted labels (classifier) or mask fills (masked LM), as text or JSON lines."""
    for flag, value in (("--top-k", args.top_k), ("--batch-size", args.batch_size)):
        if value < 1:
            raise InputError(f"{flag} must be >= 1, got {value}")
    model = from_pretrained(args.checkpoint)
    check_predictable(model.config)
    tokenizer = load_tokenizer(args.checkpoint)
    results = predict(model, tokenizer, read_texts(args), top_k=args.top_k, batch_size=args.batch_size)
    for result in results:
        print(json.dumps(result, ensure_ascii=False) if args.json else describe(result, args.top_k))


def add_predict_command(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``predict`` on the ``formerkit`` subparsers; return its parser (which runs ``cmd_predict``)."""
    p = subparsers.add_parser("predict", help="label texts with a classifier, or fill in [MASK] tokens with a "
                                              "masked LM")
    p.add_argument("--checkpoint", required=True, help="checkpoint directory or training run directory")
    p.add_argument("--json", action="store_true", help="print one JSON object per text")
    p.add_argument("--top-k", type=int, default=5,
                   help="fills shown per mask (masked LM); labels shown per text (classifier, without --json)")
    p.add_argument("--input", metavar="FILE.jsonl",
                   help="read the texts from a JSONL file, one record per line (default: the TEXT arguments, "
                        "else standard input)")
    p.add_argument("--text-field", default="text", help="the field of --input records holding the text")
    p.add_argument("--batch-size", type=int, default=32, help="texts per forward pass")
    p.add_argument("texts", nargs="*", metavar="TEXT",
                   help="texts to predict (default: --input, else one per line on standard input)")
    p.set_defaults(func=cmd_predict)
    return p
