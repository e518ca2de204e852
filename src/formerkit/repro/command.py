"""``formerkit repro``: list the reproductions, run one, or write the report page."""

from __future__ import annotations

import argparse


def cmd_repro(args: argparse.Namespace) -> None:
    """List (``--list``), write the report (``--report``), or run the reproduction ``NAME``."""
    from formerkit.errors import InputError
    from formerkit.repro import REGISTRY, run_repro, write_report

    if args.list:
        for name, repro in sorted(REGISTRY.items(), key=lambda kv: kv[1].item):
            print(f"{name:22s} {repro.rule():45s} {repro.paper}")
        return
    if args.report:
        print(f"wrote {write_report(args.out, args.report_path)}")
        return
    if args.name is None:
        raise InputError("name a reproduction (`formerkit repro --list` lists them), or give --list or --report")
    run_repro(args.name, seed=args.seed, quick=args.quick, out=args.out)


def add_repro_command(subparsers: argparse._SubParsersAction) -> None:
    """Register the ``repro`` subcommand on the ``formerkit`` parser's subparsers."""
    p = subparsers.add_parser("repro", help="reproduce a claim of the Transformer literature at small scale "
                                            "(`--list` lists them)")
    p.add_argument("name", nargs="?", default=None, help="the reproduction to run (default: none; see --list)")
    p.add_argument("--list", action="store_true", help="list the reproductions with their pass rules")
    p.add_argument("--seed", type=int, default=0, help="random seed of data, initialization and batches")
    p.add_argument("--quick", action="store_true", help="a small version, under a minute (tests the pipeline; "
                                                        "its numbers do not judge the claim)")
    p.add_argument("--out", default="runs/repro", help="directory of the NAME/result.json files")
    p.add_argument("--report", action="store_true",
                   help="write the Markdown report of the full runs under --out to --report-path")
    p.add_argument("--report-path", default="docs/reproductions.md", help="where --report writes")
    p.set_defaults(func=cmd_repro)
