"""Text sources: where training text comes from, resolved once into a fixed list of documents.

``resolve_source`` turns a spec into a ``TextSource``: None or "stdlib" (the embedded default
corpus, this Python's standard library ``.py`` files), a text file, a directory, a glob
pattern, or a ``.jsonl`` file of records. Each document is one file or one JSONL record.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import sys
import sysconfig
from collections.abc import Callable, Iterator
from functools import cached_property
from pathlib import Path

from formerkit.data.python_code import is_data_table
from formerkit.errors import DataError

_CACHE_DIRS = frozenset({"__pycache__"})
_INSTALLED_DIRS = frozenset({"site-packages", "dist-packages"})  # third-party code, not part of the stdlib corpus
_SNIFF = 8192  # a NUL byte in this many leading bytes marks a file as binary


def _is_text(data: bytes) -> bool:
    """Whether ``data`` looks like text: no NUL byte near the start, and valid UTF-8."""
    if b"\0" in data[:_SNIFF]:
        return False
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def read_jsonl(path: Path) -> Iterator[tuple[int, dict]]:
    """Yield ``(line_number, record)`` for each non-blank line of a JSONL file (numbers from 1).

    Raises DataError naming the line for invalid UTF-8, invalid JSON or a record that is not an object.
    """
    try:
        handle = open(path, "rb")
    except OSError as err:
        raise DataError(f"cannot read {path}: {err.strerror}; check the path and its permissions") from err
    with handle:
        for number, raw in enumerate(handle, 1):
            if not raw.strip():
                continue
            try:
                record = json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError as err:
                raise DataError(f"{path}, line {number}: not valid UTF-8 ({err.reason}); re-save the file as UTF-8") \
                    from err
            except json.JSONDecodeError as err:
                raise DataError(f"{path}, line {number}: invalid JSON ({err.msg}); each line must be one JSON "
                                "object") from err
            if not isinstance(record, dict):
                raise DataError(f"{path}, line {number}: expected a JSON object, got {type(record).__name__}")
            yield number, record


class TextSource:
    """A resolved list of documents: files (one document each) or one JSONL file (one per record).

    ``names`` gives each document a stable name (its path relative to the source root, or its
    JSONL line number), used to split train from validation.
    """

    def __init__(self, kind: str, label: str, files: list[Path], *, root: Path, skipped: int = 0,
                 text_field: str = "text") -> None:
        self.kind = kind  # "stdlib", "file", "directory", "glob" or "jsonl"
        self.label = label  # what the user asked for, for messages
        self.files = files
        self.root = root
        self.skipped = skipped  # files left out because they looked binary or could not be read
        self.text_field = text_field

    @cached_property
    def names(self) -> list[str]:
        """One stable name per document, in ``documents()`` order."""
        if self.kind == "jsonl":
            with open(self.files[0], "rb") as handle:
                return [f"line {n}" for n, raw in enumerate(handle, 1) if raw.strip()]
        return [p.relative_to(self.root).as_posix() for p in self.files]

    @property
    def is_python(self) -> bool:
        """Whether every document is a Python file (the default corpus, or only ``.py`` files)."""
        return self.kind == "stdlib" or (self.kind != "jsonl" and all(p.suffix == ".py" for p in self.files))

    def __len__(self) -> int:
        """Number of documents."""
        return len(self.names)

    def documents(self) -> Iterator[str]:
        """Yield the text of each document in order (files read as UTF-8, newlines kept as stored)."""
        if self.kind == "jsonl":
            yield from self._records()
            return
        for path in self.files:
            try:
                yield path.read_bytes().decode("utf-8")
            except (OSError, UnicodeDecodeError) as err:
                raise DataError(f"cannot read {path} as UTF-8 text ({err}); it changed after the source was "
                                "resolved: resolve the source again") from err

    def _records(self) -> Iterator[str]:
        path, field, any_text = self.files[0], self.text_field, False
        for number, record in read_jsonl(path):
            if field not in record:
                raise DataError(f'{path}, line {number}: no "{field}" field; name the field holding the text with '
                                f"--data.text_field, or text_field= in Python (fields here: "
                                f"{', '.join(sorted(record)) or 'none'})")
            text = record[field]
            if not isinstance(text, str):
                raise DataError(f'{path}, line {number}: "{field}" must be a string, got {type(text).__name__}')
            any_text = any_text or bool(text)
            yield text
        if not any_text:
            raise DataError(f'{path}: every record\'s "{field}" is empty; there is no text to train on')

    def fingerprint(self) -> str:
        """sha256 over the kind, the resolved paths with their sizes and mtimes, and the text field."""
        digest = hashlib.sha256(f"{self.kind}\0{self.text_field}\0".encode())
        for path, stat in zip(self.files, self._stats(), strict=True):
            digest.update(f"{path.resolve()}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode("utf-8", "surrogateescape"))
        return digest.hexdigest()

    def num_bytes(self) -> int:
        """Total size in bytes of the source's files."""
        return sum(stat.st_size for stat in self._stats())

    def _stats(self) -> list[os.stat_result]:
        try:
            return [path.stat() for path in self.files]
        except OSError as err:
            raise DataError(f"{err.filename} of {self.label} can no longer be read ({err.strerror}); it changed "
                            "after the source was resolved: resolve the source again") from err

    def describe(self) -> str:
        """A one-line human summary: what the source is, how many documents and bytes, how many files skipped."""
        what = {"stdlib": f"Python {sys.version_info.major}.{sys.version_info.minor} standard library",
                "file": "text file", "directory": "directory", "glob": "glob", "jsonl": "JSONL file"}[self.kind]
        unit = f'records ("{self.text_field}")' if self.kind == "jsonl" else "files"
        why = "binary, not UTF-8, unreadable or data tables" if self.kind == "stdlib" else \
            "binary, not UTF-8 or unreadable"
        skipped = f", {self.skipped:,} skipped ({why})" if self.skipped else ""
        size = self.num_bytes()
        return f"{what} {self.label}: {len(self):,} {unit}, {size:,} bytes ({size / 1e6:.1f} MB){skipped}"


def _text_files(candidates: list[Path], keep: Callable[[str], bool] | None = None) -> tuple[list[Path], int]:
    """Keep the regular files that look like text (and pass ``keep``); return them and how many were left out."""
    kept = []
    for path in candidates:
        try:
            data = path.read_bytes()
        except OSError:
            continue
        if _is_text(data) and (keep is None or keep(data.decode("utf-8"))):
            kept.append(path)
    return kept, len(candidates) - len(kept)


def _walk(root: Path, suffix: str = "", skip: frozenset[str] = _CACHE_DIRS) -> list[Path]:
    """Regular files under ``root`` ending in ``suffix``, sorted by relative path; hidden and ``skip`` dirs pruned."""
    found = []
    for directory, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if not d.startswith(".") and d not in skip]
        found += [Path(directory, f) for f in files if f.endswith(suffix) and not f.startswith(".")]
    return sorted((p for p in found if p.is_file()), key=lambda p: p.relative_to(root).parts)


def _checked(kind: str, label: str, files: list[Path], root: Path, skipped: int) -> TextSource:
    if not files:
        raise DataError(f"{kind} {label} holds no text files ({skipped} skipped as binary or not UTF-8); "
                        "point the source at UTF-8 text")
    if all(p.stat().st_size == 0 for p in files):
        raise DataError(f"every file of {kind} {label} is empty; there is no text to train on")
    return TextSource(kind, label, files, root=root, skipped=skipped)


def stdlib_source() -> TextSource:
    """The embedded default corpus: the ``.py`` files of this Python's standard library that are code.

    Files under site-packages/dist-packages and ``__pycache__`` are left out, as are the few
    that are not UTF-8 and the machine-generated data tables (``python_code.is_data_table``:
    codec character maps, pydoc's topic texts, entity tables), all counted as skipped. Sorted
    by path relative to the stdlib root.
    """
    root = Path(sysconfig.get_paths()["stdlib"])
    files, skipped = _text_files(_walk(root, ".py", _CACHE_DIRS | _INSTALLED_DIRS),
                                 keep=lambda text: not is_data_table(text))
    return _checked("stdlib", str(root), files, root, skipped)


def resolve_source(spec: str | None, *, text_field: str = "text") -> TextSource:
    """Resolve a source spec into a ``TextSource``; raises DataError for missing, empty or binary input.

    spec: None or "stdlib" (the embedded default corpus), a ``.jsonl`` file (text in
    ``text_field``), a text file, a directory (all text files, recursively), or a glob pattern
    (a spec containing ``*``, ``?`` or ``[``).
    """
    if spec is None or spec == "stdlib":
        return stdlib_source()
    if not spec.strip():
        raise DataError('the data source is an empty string; give a path, a glob pattern, or "stdlib"')
    path = Path(spec).expanduser()
    if not path.exists() and glob.has_magic(spec):
        matches = [Path(p) for p in sorted(glob.glob(str(path), recursive=True)) if Path(p).is_file()]
        if not matches:
            raise DataError(f"glob {spec} matches no files; check the pattern (quote it so the shell leaves it)")
        root = Path(*path.parts[: next(i for i, part in enumerate(path.parts) if glob.has_magic(part))])
        files, skipped = _text_files(matches)
        return _checked("glob", spec, files, root, skipped)
    if path.is_dir():
        files, skipped = _text_files(_walk(path))
        return _checked("directory", spec, files, path, skipped)
    if not path.is_file():
        raise DataError(f"data source {spec} does not exist; give a text file, a directory, a glob pattern, a "
                        '.jsonl file, or "stdlib" for the default corpus')
    try:
        data = path.read_bytes()
    except OSError as err:
        raise DataError(f"cannot read {spec}: {err.strerror}; check its permissions") from err
    if not data.strip():
        raise DataError(f"{spec} is empty; there is no text to train on")
    if path.suffix == ".jsonl":
        return TextSource("jsonl", spec, [path], root=path.parent, text_field=text_field)
    if not _is_text(data):
        raise DataError(f"{spec} looks binary (a NUL byte, or not valid UTF-8); give a UTF-8 text file")
    return TextSource("file", spec, [path], root=path.parent)

