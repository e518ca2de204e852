"""Running one reproduction: seed, time, judge against the registered threshold, write ``result.json`` and print."""

from __future__ import annotations

import platform
import time
from pathlib import Path
from typing import Any

import torch

from formerkit.fileio import write_json
from formerkit.hardware import cpu_model
from formerkit.repro.common import format_table
from formerkit.repro.registry import get


def result_dir(out: str | Path, name: str, seed: int) -> Path:
    """Where a run of ``name`` with ``seed`` writes: ``OUT/NAME`` for seed 0, ``OUT/NAME/seed-S`` for another seed.

    So runs with other seeds (the report's spread) never overwrite the seed-0 run's result and pictures.
    """
    return Path(out) / name if seed == 0 else Path(out) / name / f"seed-{seed}"


def run_repro(name: str, *, seed: int = 0, quick: bool = False, out: str | Path = "runs/repro",
              verbose: bool = True) -> dict[str, Any]:
    """Run the reproduction ``name`` and write ``result.json`` under ``result_dir(out, name, seed)``; return it.

    The result holds claim, metric, value, threshold, held (a bool computed from the run),
    seed, seconds (wall clock) and cpu_seconds (this process's CPU time: on a shared machine the
    wall clock waits for other jobs), and the detail the experiment measured. ``quick`` runs a small version
    (under a minute) whose numbers are for testing the pipeline, not for judging the claim.
    """
    repro = get(name)
    out_dir = result_dir(out, name, seed)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # models this small run faster on one thread, above all on a shared machine
    start, cpu_start = time.perf_counter(), time.process_time()
    try:
        outcome = repro.run(seed, quick, out_dir)
    finally:
        torch.set_num_threads(threads)
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    result = {
        "name": name, "claim": repro.claim, "paper": repro.paper, "metric": repro.metric,
        "value": float(outcome.value), "threshold": repro.threshold, "direction": repro.direction,
        "rule": repro.rule(), "checks": {k: bool(v) for k, v in outcome.checks.items()},
        "held": repro.held(outcome), "seed": seed, "seconds": round(seconds, 1),
        "cpu_seconds": round(cpu_seconds, 1), "quick": quick,
        "not_built": repro.not_built, "detail": outcome.detail, "table": outcome.table,
        "pngs": sorted(p.name for p in out_dir.glob("*.png")),
        "machine": {"cpu": cpu_model(), "threads": 1, "torch": torch.__version__,
                    "python": platform.python_version()},
    }
    write_json(out_dir / "result.json", result, sort_keys=False)
    if verbose:
        print(f"== {name}{' (quick)' if quick else ''}: {repro.claim}")
        if outcome.table:
            print(format_table(outcome.table))
        for check, ok in result["checks"].items():
            print(f"check: {check}: {'yes' if ok else 'no'}")
        if repro.not_built:
            print(f"not built: {repro.not_built}")
        print(f"{repro.metric} = {outcome.value:.4g} (held if {repro.rule()} and every check): "
              f"{'HELD' if result['held'] else 'NOT HELD'}; seed {seed}, {seconds:.0f} s -> {out_dir / 'result.json'}")
    return result
