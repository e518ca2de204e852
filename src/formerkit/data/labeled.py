"""Labeled text for classification, read from JSONL: one record per line with a text and a label."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from formerkit.data.sources import read_jsonl
from formerkit.errors import ConfigError, DataError


@dataclass(frozen=True)
class LabeledData:
    """Texts with integer labels; ``label_names[i]`` is the name of label ``i``."""

    texts: list[str]
    labels: list[int]
    label_names: list[str]

    def __len__(self) -> int:
        """Number of examples."""
        return len(self.texts)

    def split(self, val_fraction: float, seed: int) -> tuple[LabeledData, LabeledData]:
        """A deterministic random split into (train, val); both are non-empty when there are >= 2 examples."""
        if not isinstance(val_fraction, (int, float)) or not 0 < val_fraction < 1:
            raise ConfigError(f"val_fraction must be a number strictly between 0 and 1, got {val_fraction!r}")
        order = torch.randperm(len(self), generator=torch.Generator().manual_seed(seed))  # (N,)
        n_val = min(max(1, round(len(self) * val_fraction)), len(self) - 1) if len(self) >= 2 else 0
        return self._take(sorted(order[n_val:].tolist())), self._take(sorted(order[:n_val].tolist()))

    def _take(self, index: list[int]) -> LabeledData:
        return LabeledData([self.texts[i] for i in index], [self.labels[i] for i in index], self.label_names)


def load_labeled_jsonl(path: str | Path, *, text_field: str = "text", label_field: str = "label") -> LabeledData:
    """Read a JSONL file of ``{text_field: str, label_field: str | int}`` records into ``LabeledData``.

    String labels become ids in sorted order of their names; integer labels are kept as they
    are (they must be >= 0, and every id up to the largest gets a name, its number). All
    labels of a file must be of one kind. Errors name the file and line.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"labeled data file {path} does not exist; give a .jsonl file with one record per line")
    texts, raw_labels, kind = [], [], None
    for number, record in read_jsonl(path):
        where = f"{path}, line {number}"
        for field in (text_field, label_field):
            if field not in record:
                raise DataError(f'{where}: no "{field}" field (fields here: {", ".join(sorted(record)) or "none"}); '
                                "name the fields with --data.text_field / --data.label_field, or text_field= / "
                                "label_field= in Python")
        text, label = record[text_field], record[label_field]
        if not isinstance(text, str):
            raise DataError(f'{where}: "{text_field}" must be a string, got {type(text).__name__}')
        if isinstance(label, bool) or not isinstance(label, (str, int)):
            raise DataError(f'{where}: "{label_field}" must be a string or a non-negative integer, '
                            f"got {type(label).__name__}")
        if isinstance(label, int) and label < 0:
            raise DataError(f'{where}: "{label_field}" is {label}; integer labels must be >= 0')
        kind = kind or type(label)
        if type(label) is not kind:
            raise DataError(f'{where}: "{label_field}" is a {type(label).__name__}, but earlier labels are '
                            f"{kind.__name__}s; use one kind of label throughout the file")
        texts.append(text)
        raw_labels.append(label)
    if not texts:
        raise DataError(f"{path} holds no records; add one JSON object per line")
    if kind is str:
        names = sorted(set(raw_labels))
        ids = {name: i for i, name in enumerate(names)}
        return LabeledData(texts, [ids[label] for label in raw_labels], names)
    return LabeledData(texts, list(raw_labels), [str(i) for i in range(max(raw_labels) + 1)])
