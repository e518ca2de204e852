"""Reproductions of claims from the Transformer literature at small scale: ``formerkit repro NAME``.

Each module registers one ``Repro`` (claim, paper, metric, threshold fixed before running)
whose experiment trains formerkit's own ``Transformer`` with formerkit's AdamW and schedule (or its
trainer) on synthetic data generated here or on the standard library's own source. See
docs/reproductions.md.
"""

from formerkit.repro import (  # noqa: F401  (each module registers its reproduction)
    addition,
    bursty_icl,
    early_exit,
    icl_algorithm,
    icl_gd,
    jacobi,
    length_gen,
    lr_sensitivity,
    minilm,
    moe,
    quantizable,
    tova,
)
from formerkit.repro.registry import REGISTRY, Outcome, Repro, get, register
from formerkit.repro.report import build_report, write_report
from formerkit.repro.runner import result_dir, run_repro

__all__ = ["REGISTRY", "Outcome", "Repro", "build_report", "get", "register", "result_dir", "run_repro", "write_report"]
