"""formerkit's version: the installed distribution's, so it cannot drift from pyproject.toml."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("formerkit")
except PackageNotFoundError:  # a source tree on sys.path that was never installed
    __version__ = "0+unknown"
