"""``formerkit quantize``: write an int8 copy of a checkpoint (the layer is ``layers/quantized.py``,
the checkpoint format ``checkpoints/quantized.py``)."""

from __future__ import annotations

import argparse

from torch import nn

from formerkit.checkpoints import from_pretrained
from formerkit.checkpoints.loading import tied_names
from formerkit.checkpoints.quantized import save_quantized
from formerkit.layers.quantized import quantize_int8
from formerkit.rundir import resolve_checkpoint_dir
from formerkit.tokenizers import FORMERKIT_FILE, load_tokenizer


def weight_bytes(model: nn.Module) -> int:
    """Bytes of the distinct tensors in ``model.state_dict()`` (tied weights counted once)."""
    tied = tied_names(model)
    return sum(t.numel() * t.element_size() for name, t in model.state_dict().items() if name not in tied)


def cmd_quantize(args: argparse.Namespace) -> None:
    """``formerkit quantize``: write an int8 copy of a checkpoint (and its tokenizer) to ``--out``."""
    model = from_pretrained(args.checkpoint)
    before = weight_bytes(model)
    quantize_int8(model, quantize_tied_head=not args.float_tied_head)
    out = save_quantized(model, args.out)
    source = resolve_checkpoint_dir(args.checkpoint)
    if (source / "tokenizer.json").is_file() or (source / FORMERKIT_FILE).is_file():
        load_tokenizer(source).save(out)
    print(f"wrote int8 checkpoint to {out}: weights {before / 1e6:.1f} MB -> {weight_bytes(model) / 1e6:.1f} MB")


def add_quantize_command(subparsers: argparse._SubParsersAction) -> None:
    """Register the ``quantize`` subcommand on the ``formerkit`` parser's subparsers."""
    p = subparsers.add_parser("quantize", help="quantize a checkpoint's linear weights to int8 (weight-only)")
    p.add_argument("--checkpoint", required=True, help="checkpoint directory (native or HF) or training run directory")
    p.add_argument("--out", required=True, help="directory to write the quantized checkpoint to")
    p.add_argument("--float-tied-head", action="store_true",
                   help="keep an LM head tied to the embeddings in float (default: give it an int8 copy)")
    p.set_defaults(func=cmd_quantize)
