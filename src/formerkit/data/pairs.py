"""Parallel text for sequence-to-sequence training: (source, target) pairs from TSV or JSONL files.

A ``.jsonl`` file holds one ``{"source": ..., "target": ...}`` object per line (the key names
are arguments); any other file is TSV, one ``source<TAB>target`` pair per line. Blank lines are
skipped. A line without a tab, with an empty side, a record missing a key and a file without
pairs are ``DataError``s naming the file and line.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from formerkit.data.sources import read_jsonl
from formerkit.errors import ConfigError, DataError


@dataclass(frozen=True)
class ParallelData:
    """Aligned lists of source and target texts: ``targets[i]`` translates ``sources[i]``."""

    sources: list[str]
    targets: list[str]

    def __len__(self) -> int:
        """Number of pairs."""
        return len(self.sources)

    def texts(self) -> list[str]:
        """Every source and then every target text (what a shared tokenizer is trained on)."""
        return [*self.sources, *self.targets]

    def split(self, val_fraction: float, seed: int) -> tuple[ParallelData, ParallelData]:
        """A deterministic random split into (train, held-out); both non-empty when there are >= 2 pairs."""
        if not isinstance(val_fraction, (int, float)) or not 0 < val_fraction < 1:
            raise ConfigError(f"val_fraction must be a number strictly between 0 and 1, got {val_fraction!r}")
        order = torch.randperm(len(self), generator=torch.Generator().manual_seed(seed))  # (N,)
        n_val = min(max(1, round(len(self) * val_fraction)), len(self) - 1) if len(self) >= 2 else 0
        return self.take(sorted(order[n_val:].tolist())), self.take(sorted(order[:n_val].tolist()))

    def take(self, index: list[int]) -> ParallelData:
        """The pairs at ``index``, in that order."""
        return ParallelData([self.sources[i] for i in index], [self.targets[i] for i in index])


def _read_tsv(path: Path) -> ParallelData:
    """Pairs of a ``source<TAB>target`` file; raises DataError naming the line of a malformed pair."""
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise DataError(f"cannot read {path}: {err.strerror}; check the path and its permissions") from err
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise DataError(f"{path} is not valid UTF-8 ({err.reason}); re-save it as UTF-8") from err
    sources, targets = [], []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split("\t")
        where = f"{path}, line {number}"
        if len(parts) != 2:
            found = "no tab" if len(parts) == 1 else f"{len(parts) - 1} tabs"
            raise DataError(f"{where}: expected one source<TAB>target pair, found {found}; put exactly one tab "
                            "between the source and the target (or use a .jsonl file for text containing tabs)")
        for side, value in zip(("source", "target"), parts, strict=True):
            if not value.strip():
                raise DataError(f"{where}: the {side} side is empty; give both a source and a target, "
                                "or delete the line")
        sources.append(parts[0])
        targets.append(parts[1])
    return ParallelData(sources, targets)


def _read_jsonl_pairs(path: Path, source_field: str, target_field: str) -> ParallelData:
    """Pairs of a JSONL file of ``{source_field: str, target_field: str}`` records."""
    sources, targets = [], []
    for number, record in read_jsonl(path):
        where = f"{path}, line {number}"
        for side, key in (("source", source_field), ("target", target_field)):
            if key not in record:
                raise DataError(f'{where}: no "{key}" key (keys here: {", ".join(sorted(record)) or "none"}); '
                                f"add it, or name the {side} key with --data.{side}_field ({side}_field= in Python)")
            value = record[key]
            if not isinstance(value, str):
                raise DataError(f'{where}: "{key}" must be a string, got {type(value).__name__}')
            if not value.strip():
                raise DataError(f'{where}: "{key}" (the {side}) is empty; give both a source and a target, '
                                "or delete the line")
        sources.append(record[source_field])
        targets.append(record[target_field])
    return ParallelData(sources, targets)


def load_pairs(path: str | Path, *, source_field: str = "source", target_field: str = "target") -> ParallelData:
    """Read parallel text from ``path``: JSONL when it ends in ``.jsonl``, else TSV. Returns ParallelData.

    Raises DataError for a missing file, a malformed line (naming the file and line) or a file
    without any pair.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"parallel data file {path} does not exist; give a TSV file (source<TAB>target per line) "
                        'or a .jsonl file ({"source": ..., "target": ...} per line)')
    if path.suffix == ".jsonl":
        data = _read_jsonl_pairs(path, source_field, target_field)
    else:
        data = _read_tsv(path)
    if not len(data):
        raise DataError(f"{path} holds no pairs; add one source<TAB>target line (or one JSON object per line for "
                        ".jsonl)")
    return data
