"""``formerkit prune``: remove the least important heads and neurons of a causal LM checkpoint (see ``prune``).

Importance is measured on windows of text (the embedded corpus unless ``--data`` names other text),
tokenized with the checkpoint's tokenizer; the held-out loss before and after is measured on other
documents of the same source.
"""

from __future__ import annotations

import argparse
import math

import torch

from formerkit.checkpoints import from_pretrained, save_pretrained
from formerkit.cliargs import positive_int
from formerkit.compress.prune import Batch, prune
from formerkit.data.sources import TextSource, resolve_source
from formerkit.errors import DataError, InputError
from formerkit.model import Transformer
from formerkit.rundir import resolve_checkpoint_dir
from formerkit.tokenizers import Tokenizer, load_tokenizer


def text_batches(source: TextSource, tokenizer: Tokenizer, *, n_batches: int, batch_size: int, seq_len: int,
                 part: int = 0, parts: int = 2, spread: int = 200) -> list[Batch]:
    """``n_batches`` causal-LM batches {input_ids, labels} (B, seq_len) of consecutive tokens from ``source``.

    About ``spread`` documents are taken evenly across the source, and of those every ``parts``-th
    from the ``part``-th on, so different ``part`` values read different documents (scoring vs
    held-out). Each document is followed by the tokenizer's eos id when it has one.
    """
    step = max(1, len(source) // spread)
    need = n_batches * batch_size * seq_len
    tokens: list[int] = []
    eos = [tokenizer.eos_id] if tokenizer.eos_id is not None else []
    for index, text in enumerate(source.documents()):
        if index % step or (index // step) % parts != part:
            continue
        tokens += tokenizer.encode(text, add_special_tokens=False) + eos
        if len(tokens) >= need:
            break
    if len(tokens) < need:
        raise DataError(f"the source has {len(tokens):,} tokens for this part, fewer than the {need:,} needed; "
                        "lower --batches, --batch-size or --seq-len, or give more text")
    rows = torch.tensor(tokens[:need], dtype=torch.long).view(n_batches, batch_size, seq_len)  # (N, B, T)
    return [{"input_ids": ids, "labels": ids} for ids in rows]


@torch.no_grad()
def mean_loss(model: Transformer, batches: list[Batch]) -> float:
    """The mean of the model's loss over ``batches`` (eval mode)."""
    was_training = model.training
    model.eval()
    losses = [float(model(**batch).loss) for batch in batches]
    model.train(was_training)
    return sum(losses) / len(losses)


def parameter_count(model: Transformer) -> int:
    """Distinct parameters of ``model`` (tied ones counted once)."""
    return sum(p.numel() for p in model.parameters())


def kept_fraction(text: str) -> float:
    """argparse type: a fraction in (0, 1] of heads or neurons to keep."""
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"expected a kept fraction in (0, 1], got {text}")
    return value


def cmd_prune(args: argparse.Namespace) -> None:
    """``formerkit prune``: prune a causal LM checkpoint to kept fractions of heads and neurons, write it to --out."""
    source_dir = resolve_checkpoint_dir(args.checkpoint)
    model = from_pretrained(source_dir)
    if model.config.head != "lm" or model.config.kind != "decoder":
        raise InputError("formerkit prune scores causal language models (kind='decoder', head='lm'); prune other "
                         "models from Python with formerkit.compress.prune.prune and batches with their labels")
    tokenizer = load_tokenizer(source_dir)
    source = resolve_source(args.data)
    sizes = dict(n_batches=args.batches, batch_size=args.batch_size, seq_len=args.seq_len)
    scoring = text_batches(source, tokenizer, part=0, **sizes)
    held_out = text_batches(source, tokenizer, part=1, **sizes)
    before, params = mean_loss(model, held_out), parameter_count(model)
    prune(model, scoring, heads=args.heads, neurons=args.neurons, steps=args.steps)
    after = mean_loss(model, held_out)
    save_pretrained(model, args.out, tokenizer=tokenizer)
    cfg = model.config
    print(f"wrote pruned checkpoint to {args.out}: n_heads={cfg.n_heads} d_ff={cfg.d_ff}; parameters "
          f"{params / 1e6:.2f}M -> {parameter_count(model) / 1e6:.2f}M; held-out loss {before:.4f} -> {after:.4f} "
          f"(perplexity {math.exp(before):.2f} -> {math.exp(after):.2f})")


def add_prune_command(subparsers: argparse._SubParsersAction) -> None:
    """Register the ``prune`` subcommand on the ``formerkit`` parser's subparsers."""
    p = subparsers.add_parser("prune", help="remove the least important attention heads and feed-forward neurons")
    p.add_argument("--checkpoint", required=True, help="checkpoint directory (native or HF) or training run directory")
    p.add_argument("--out", required=True, help="directory to write the pruned (native) checkpoint to")
    p.add_argument("--heads", type=kept_fraction, default=1.0, help="fraction of query heads to keep")
    p.add_argument("--neurons", type=kept_fraction, default=1.0, help="fraction of feed-forward neurons to keep")
    p.add_argument("--steps", type=positive_int, default=4, help="pruning steps, importance measured again before each")
    p.add_argument("--data", default=None, help='text to score on: a file, directory, glob or .jsonl (default: '
                                                'the embedded "stdlib" corpus)')
    p.add_argument("--batches", type=positive_int, default=8, help="batches to score importance on (and to evaluate)")
    p.add_argument("--batch-size", type=positive_int, default=8, help="sequences per batch")
    p.add_argument("--seq-len", type=positive_int, default=128, help="tokens per sequence")
    p.set_defaults(func=cmd_prune)
