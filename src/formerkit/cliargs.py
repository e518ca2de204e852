"""What the subcommands' arguments share: count types that refuse nonsense, help that shows defaults, warnings shown."""

from __future__ import annotations

import argparse
import contextlib
import sys
import warnings
from collections.abc import Iterator

from formerkit.errors import FormerkitWarning


def _integer(text: str, minimum: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {text!r}") from None
    if value < minimum:
        raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {value}")
    return value


def positive_int(text: str) -> int:
    """An argparse ``type``: an integer >= 1 (a count that must not be zero), else a usage error."""
    return _integer(text, 1)


def non_negative_int(text: str) -> int:
    """An argparse ``type``: an integer >= 0 (a count where 0 means none or off), else a usage error."""
    return _integer(text, 0)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Help that ends each option with "(default: X)"; None and False defaults are said in words in the help itself.

    Descriptions and epilogs are printed as written (the ``train`` epilog is a list of options).
    """

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or action.default is False or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def use_help_formatter(subparsers: argparse._SubParsersAction) -> None:
    """Give every subcommand registered on ``subparsers`` the ``HelpFormatter``."""
    for parser in subparsers.choices.values():
        parser.formatter_class = HelpFormatter


@contextlib.contextmanager
def console_warnings() -> Iterator[None]:
    """Within the block, each formerkit warning is printed once as one "formerkit: warning: ..." line on stderr.

    Other warnings are shown as Python shows them; everything is restored afterwards.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("once", FormerkitWarning)
        other = warnings.showwarning

        def show(message, category, filename, lineno, file=None, line=None) -> None:
            if issubclass(category, FormerkitWarning):
                print(f"formerkit: warning: {message}", file=file or sys.stderr, flush=True)
            else:
                other(message, category, filename, lineno, file, line)

        warnings.showwarning = show
        yield
