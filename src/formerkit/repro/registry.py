"""The registry of reproductions: each names its claim, paper, metric and the threshold fixed before any run."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from formerkit.errors import InputError, did_you_mean


@dataclass
class Outcome:
    """What one experiment measured.

    ``value`` is the headline metric compared with the threshold; ``checks`` are further
    conditions of the claim (fixed in the experiment's code), each computed from the run;
    ``detail`` holds the numbers behind them; ``table`` is printed (first row: the header).
    """

    value: float
    checks: dict[str, bool] = field(default_factory=dict)
    detail: dict[str, Any] = field(default_factory=dict)
    table: list[list[Any]] = field(default_factory=list)


RunFn = Callable[[int, bool, Path], Outcome]


@dataclass(frozen=True)
class Repro:
    """One reproduced claim: the claim and how it is judged, and the function that runs the experiment.

    ``run(seed, quick, out_dir)`` trains and measures; ``held`` is ``value >= threshold``
    (``direction="min"``) or ``value <= threshold`` (``"max"``), and every check true.
    """

    name: str
    claim: str
    paper: str
    metric: str
    threshold: float
    direction: Literal["min", "max"]
    run: RunFn
    item: int = 0  # its number in the list of issue 18, the order of `--list` and of the report
    not_built: str = ""  # parts of the paper's claim this reproduction does not test, and why

    def held(self, outcome: Outcome) -> bool:
        """Whether the claim held: the metric on the right side of the threshold and every check true."""
        ok = outcome.value >= self.threshold if self.direction == "min" else outcome.value <= self.threshold
        return bool(ok and all(outcome.checks.values()))

    def rule(self) -> str:
        """The pass rule in words, e.g. ``exact match >= 0.99``."""
        return f"{self.metric} {'>=' if self.direction == 'min' else '<='} {self.threshold:g}"


REGISTRY: dict[str, Repro] = {}


def register(repro: Repro) -> Repro:
    """Add ``repro`` to the registry (names are unique) and return it."""
    if repro.name in REGISTRY:
        raise ValueError(f"reproduction {repro.name!r} is registered twice")
    REGISTRY[repro.name] = repro
    return repro


def get(name: str) -> Repro:
    """The registered reproduction called ``name``; an InputError listing the names otherwise."""
    if name not in REGISTRY:
        raise InputError(f"no reproduction named {name!r}{did_you_mean(name, list(REGISTRY))}; "
                         f"`formerkit repro --list` lists them: {', '.join(sorted(REGISTRY))}")
    return REGISTRY[name]
