"""Reproductions of claims from the Transformer literature at small scale: ``formerkit repro NAME``.

Each module registers one ``Repro`` (claim, paper, metric, threshold fixed before running)
whose experiment trains formerkit's own ``Transformer`` with formerkit's AdamW and schedule on
synthetic data generated here. See docs/reproductions.md.
"""

from formerkit.repro import addition, icl_algorithm, icl_gd, length_gen, lr_sensitivity  # noqa: F401  (each module registers its reproduction)
from formerkit.repro.registry import REGISTRY, Outcome, Repro, get, register
from formerkit.repro.report import build_report, write_report
from formerkit.repro.runner import run_repro

__all__ = ["REGISTRY", "Outcome", "Repro", "build_report", "get", "register", "run_repro", "write_report"]
