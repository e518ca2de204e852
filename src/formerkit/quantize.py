"""``formerkit quantize``: write an int8 or int4 copy of a checkpoint (the layers are ``layers/quantized.py``
and ``layers/int4.py``, the checkpoint format ``checkpoints/quantized.py``)."""

from __future__ import annotations

import argparse

from torch import nn

from formerkit.checkpoints import from_pretrained
from formerkit.checkpoints.loading import tied_names
from formerkit.checkpoints.quantized import save_quantized
from formerkit.errors import InputError
from formerkit.layers.int4 import GROUP_SIZES, quantize_int4
from formerkit.layers.quantized import quantize_int8
from formerkit.rundir import resolve_checkpoint_dir
from formerkit.tokenizers import FORMERKIT_FILE, load_tokenizer


def weight_bytes(model: nn.Module) -> int:
    """Bytes of the distinct tensors in ``model.state_dict()`` (tied weights counted once)."""
    tied = tied_names(model)
    return sum(t.numel() * t.element_size() for name, t in model.state_dict().items() if name not in tied)


def cmd_quantize(args: argparse.Namespace) -> None:
    """``formerkit quantize``: write an int8 or int4 (``--bits``) copy of a checkpoint and tokenizer to ``--out``."""
    if args.bits == 8 and (args.group_size is not None or args.symmetric):
        raise InputError("--group-size and --symmetric apply to --bits 4 only (int8 has one scale per row)")
    model = from_pretrained(args.checkpoint)
    before = weight_bytes(model)
    if args.bits == 4:
        quantize_int4(model, args.group_size or 64, symmetric=args.symmetric,
                      quantize_tied_head=not args.float_tied_head)
    else:
        quantize_int8(model, quantize_tied_head=not args.float_tied_head)
    out = save_quantized(model, args.out)
    source = resolve_checkpoint_dir(args.checkpoint)
    if (source / "tokenizer.json").is_file() or (source / FORMERKIT_FILE).is_file():
        load_tokenizer(source).save(out)
    print(f"wrote int{args.bits} checkpoint to {out}: "
          f"weights {before / 1e6:.1f} MB -> {weight_bytes(model) / 1e6:.1f} MB")


def add_quantize_command(subparsers: argparse._SubParsersAction) -> None:
    """Register the ``quantize`` subcommand on the ``formerkit`` parser's subparsers."""
    p = subparsers.add_parser("quantize", help="quantize a checkpoint's linear weights to int8 or int4 (weight-only)")
    p.add_argument("--checkpoint", required=True, help="checkpoint directory (native or HF) or training run directory")
    p.add_argument("--out", required=True, help="directory to write the quantized checkpoint to")
    p.add_argument("--bits", type=int, choices=(8, 4), default=8,
                   help="8: int8 per output row (default); 4: int4 in groups of --group-size input features")
    p.add_argument("--group-size", type=int, choices=GROUP_SIZES, default=None,
                   help="int4 only: input features sharing one scale and zero point (default 64)")
    p.add_argument("--symmetric", action="store_true", help="int4 only: no zero points (scale = max|w| / 7)")
    p.add_argument("--float-tied-head", action="store_true",
                   help="keep an LM head tied to the embeddings in float (default: give it a quantized copy)")
    p.set_defaults(func=cmd_quantize)
