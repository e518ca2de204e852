"""formerkit's exception types, in one place.

Every error a user can cause (a config field, an input tensor, a file) is raised as one of
these, with a message that names what is wrong and what to do about it.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class FormerkitError(Exception):
    """Base class of every error formerkit raises on purpose."""


class ConfigError(FormerkitError, ValueError):
    """A model configuration is invalid or cannot be expressed."""


class CheckpointError(FormerkitError, ValueError):
    """A checkpoint directory or file cannot be read, written, or matched to a model."""


class InputError(FormerkitError, ValueError):
    """A tensor or value passed to a model or helper has the wrong shape, type or range."""


class DataError(FormerkitError, ValueError):
    """A data source is missing, empty, unreadable, binary, or malformed."""


class TrainingError(FormerkitError, RuntimeError):
    """Training cannot go on: a non-finite loss, or a run directory that does not match."""


class FormerkitWarning(UserWarning):
    """A setting or input that works but is probably not what was meant; the message says what happens instead."""


def did_you_mean(name: str, choices: Iterable[str]) -> str:
    """Return ' (did you mean "x"?)' for the closest choice to ``name``, or '' if none is close."""
    close = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.6)
    return f' (did you mean "{close[0]}"?)' if close else ""
