"""``formerkit inspect``: the command; the report itself (and matplotlib) is imported only when it runs."""

from __future__ import annotations

import argparse
from pathlib import Path

from formerkit.cliargs import positive_int


def cmd_inspect(args: argparse.Namespace) -> None:
    """``formerkit inspect``: write the report of a checkpoint on a prompt to ``--out``."""
    from formerkit.checkpoints import from_pretrained
    from formerkit.interp.report import inspect_report
    from formerkit.interp.views import save_html
    from formerkit.tokenizers import load_tokenizer

    model = from_pretrained(args.checkpoint)
    tokenizer = load_tokenizer(args.checkpoint)
    page = inspect_report(model, tokenizer, args.prompt, corrupted=args.corrupted, top_heads=args.top_heads,
                          title=f"formerkit inspect: {Path(args.checkpoint).name}")
    print(f"wrote {save_html(page, args.out)}")


def add_inspect_command(subparsers: argparse._SubParsersAction) -> None:
    """Register the ``inspect`` subcommand on the ``formerkit`` parser's subparsers."""
    p = subparsers.add_parser("inspect", help="write an HTML report of what a model does with a prompt "
                                              "(logit lens, top heads, attention views, patching)")
    p.add_argument("--checkpoint", required=True, help="checkpoint directory (native or HF) or training run directory")
    p.add_argument("--prompt", required=True, help="the text to inspect")
    p.add_argument("--corrupted", default=None,
                   help="a prompt of the same token count whose prediction differs: adds the patching map "
                        "(default: none, no patching)")
    p.add_argument("--out", default="report.html", help="HTML file to write (default: report.html)")
    p.add_argument("--top-heads", type=positive_int, default=5,
                   help="heads shown by direct logit attribution (default: 5)")
    p.set_defaults(func=cmd_inspect)
