"""Files written whole or not at all, and JSON objects read with errors that name the file.

Every module that writes a file someone may read back (checkpoints, tokenizers, run records,
token caches) writes it through ``atomic_write``, so a crash leaves the old file or the new
one, never half of one.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from formerkit.errors import CheckpointError

_UMASK = os.umask(0o022)  # read the process's umask (only settable), then put it back
os.umask(_UMASK)


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Call ``write(tmp)`` on a temporary file beside ``path``, then rename it over ``path``; return nothing.

    The file is flushed to disk before the rename. A crash at any moment leaves either the
    old file or the new one, never a partial file. The file gets the permissions a plain
    ``open`` would give it under the process's umask.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    os.chmod(tmp, 0o666 & ~_UMASK)  # the permissions open() would give, not mkstemp's private 0600
    try:
        write(tmp)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def json_text(data: Any, *, sort_keys: bool = True) -> str:
    """``data`` as the JSON text formerkit writes: two-space indents and a final newline."""
    return json.dumps(data, indent=2, sort_keys=sort_keys) + "\n"


def write_json(path: Path, data: dict[str, Any], *, sort_keys: bool = True) -> None:
    """Write ``data`` as indented JSON (keys sorted unless ``sort_keys=False``) to ``path`` atomically."""
    text = json_text(data, sort_keys=sort_keys)
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def read_json(path: Path, *, optional: bool = False) -> dict[str, Any]:
    """Read the JSON object in ``path`` and return it; ``{}`` for a missing file when ``optional``.

    Raises CheckpointError naming the file when it is missing (and not optional), is not
    valid JSON, or holds something other than an object.
    """
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as err:
        if optional:
            return {}
        raise CheckpointError(f"{path} does not exist") from err
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path} is not valid JSON: {err}") from err
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} must hold a JSON object, got {type(data).__name__}")
    return data
