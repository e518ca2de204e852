"""Checkpoint loading: time and peak memory of formerkit.from_pretrained vs transformers, each in a fresh process.

transformers builds a gpt2-medium-shaped GPT2LMHeadModel (24 layers, d_model 1024, 16 heads,
vocabulary 50257: about 355M parameters; random weights, no download) and saves it as
safetensors. Then each library loads that directory in its own fresh Python process:
formerkit with ``formerkit.from_pretrained(dir)``, transformers with
``AutoModelForCausalLM.from_pretrained(dir)``. Before loading, each process imports torch and
its library (transformers also its GPT-2 module, which ``from_pretrained`` would import) and
records its resident memory: the baseline. It reports the load's wall time, the process's peak
resident memory (``ru_maxrss``) and the increase over the baseline, and checks that the model
is complete (its parameters sum to a finite number). That sum reads every weight once, which
shows what a load leaves for later: a library that maps the file and reads weights on first use
(transformers does) loads faster and pays when the weights are first read; the table gives
that first read's time and the peak after it too.

This process stays small (it imports neither torch nor a library): Linux hands a parent's peak
resident memory down to the processes it starts, so a large parent would hide the loads' own
peaks. The checkpoint is saved by a child process too.

The libraries alternate, ``--repeats`` rounds, and the best of each is reported. Targets:
formerkit's memory increase at most 1.2x the checkpoint's size on disk, and its load time at
most transformers'.

    python benchmarks/load.py [--repeats 3] [--small] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

LIBS = ("formerkit", "transformers")
SHAPES = {"medium": dict(n_layer=24, n_embd=1024, n_head=16), "small": dict(n_layer=4, n_embd=256, n_head=4)}
MEMORY_TARGET = 1.2  # peak increase / checkpoint bytes on disk
TIME_TARGET = 1.0  # formerkit load time / transformers'


def _rss_bytes() -> int:
    """This process's current resident memory (VmRSS)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status (this benchmark reads Linux's process status)")


def child_load(lib: str, directory: str) -> dict:
    """Load ``directory`` with ``lib`` in this (fresh) process; return the measurements."""
    import torch

    from formerkit.hardware import describe_machine

    if lib == "formerkit":
        import formerkit

        load = formerkit.from_pretrained
    else:
        import transformers
        import transformers.models.gpt2.modeling_gpt2  # noqa: F401  (imported before the baseline, not timed)

        transformers.logging.set_verbosity_error()
        load = transformers.AutoModelForCausalLM.from_pretrained
    baseline = _rss_bytes()
    start = time.perf_counter()
    model = load(directory)
    seconds = time.perf_counter() - start
    peak_after_load = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    start = time.perf_counter()
    with torch.no_grad():
        total = sum(float(p.sum()) for p in model.parameters())
    read_seconds = time.perf_counter() - start
    return {"lib": lib, "machine": describe_machine(), "seconds": seconds, "read_seconds": read_seconds,
            "baseline": baseline,
            "peak": peak_after_load,
            "peak_after_use": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "finite": total == total and abs(total) != float("inf"),
            "params": sum(p.numel() for p in model.parameters())}


def child_save(shape: str, directory: str) -> dict:
    """Save a random GPT-2 of ``shape`` with transformers into ``directory``; return the weight bytes on disk."""
    import torch
    import transformers

    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=50257, n_positions=1024, **SHAPES[shape])
    transformers.GPT2LMHeadModel(config).save_pretrained(directory)
    return {"disk": sum(p.stat().st_size for p in Path(directory).glob("*.safetensors"))}


def in_child(*args: str) -> dict:
    """Run this script's ``--child`` mode with ``args`` in a fresh interpreter; return what it printed (JSON)."""
    done = subprocess.run([sys.executable, __file__, "--child", *args], capture_output=True, text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"}, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _mb(n: float) -> str:
    return f"{n / 2**20:8.0f} MB"


def main(argv: list[str] | None = None) -> dict:
    """Run the comparison; print the machine, a table and the targets; return the numbers."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="rounds of both loads; the best of each is kept")
    parser.add_argument("--small", action="store_true", help="a 4-layer d_model 256 model (for tests)")
    parser.add_argument("--keep", default=None, help="save the checkpoint here (and keep it) instead of a temp dir")
    parser.add_argument("--child", nargs=3, metavar=("WHAT", "ARG", "DIR"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        what, arg, directory = args.child
        print(json.dumps(child_save(arg, directory) if what == "save" else child_load(arg, directory)))
        return {}

    shape = "small" if args.small else "medium"
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(args.keep or tmp)
        disk = in_child("save", shape, str(directory))["disk"]
        runs: dict[str, list[dict]] = {lib: [] for lib in LIBS}
        for _ in range(args.repeats):
            for lib in LIBS:
                runs[lib].append(in_child("load", lib, str(directory)))
    best = {lib: {"seconds": min(r["seconds"] for r in rs),
                  "with_read": min(r["seconds"] + r["read_seconds"] for r in rs), "peak": min(r["peak"] for r in rs),
                  "increase": min(r["peak"] - r["baseline"] for r in rs),
                  "peak_after_use": min(r["peak_after_use"] for r in rs),
                  "params": rs[0]["params"], "finite": all(r["finite"] for r in rs)} for lib, rs in runs.items()}
    print(f"machine: {runs['formerkit'][0]['machine']}")
    print(f"checkpoint: GPT-2 {shape} ({best['formerkit']['params'] / 1e6:.0f}M parameters), safetensors "
          f"{disk / 2**20:.0f} MB on disk; best of {args.repeats} fresh processes per library")
    print(f"{'library':14s} {'load':>8s} {'peak RSS':>11s} {'increase':>11s} {'increase/disk':>14s}"
          f"   {'load + first read of every weight':>34s} {'peak then':>11s}")
    for lib in LIBS:
        b = best[lib]
        print(f"{lib:14s} {b['seconds']:7.2f}s {_mb(b['peak'])}  {_mb(b['increase'])}  {b['increase'] / disk:13.2f}x"
              f"   {b['with_read']:33.2f}s {_mb(b['peak_after_use'])}")
    memory = best["formerkit"]["increase"] / disk
    speed = best["formerkit"]["seconds"] / best["transformers"]["seconds"]
    used = best["formerkit"]["with_read"] / best["transformers"]["with_read"]
    print(f"targets: memory increase {memory:.2f}x disk (target <= {MEMORY_TARGET}x: "
          f"{'met' if memory <= MEMORY_TARGET else 'NOT met'}); load time {speed:.2f}x transformers' "
          f"(target <= {TIME_TARGET}x: {'met' if speed <= TIME_TARGET else 'NOT met'}); "
          f"load + first read {used:.2f}x transformers'")
    return {"disk": disk, "best": best, "runs": runs, "memory_ratio": memory, "time_ratio": speed,
            "time_with_read_ratio": used}


if __name__ == "__main__":
    main()
