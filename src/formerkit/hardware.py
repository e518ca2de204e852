"""What machine this is, for logs and benchmark records: the CPU model, its vector features, the GPU."""

from __future__ import annotations

import platform
from functools import cache
from pathlib import Path

import torch

# CPU flags (as /proc/cpuinfo names them) that decide how fast fp32 and bf16 matrix products run
MATMUL_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_fp16", "amx_bf16", "amx_tile")


@cache
def _cpuinfo() -> dict[str, str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return {}
    fields = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() not in fields:
            fields[key.strip()] = value.strip()
    return fields


def cpu_model() -> str:
    """The CPU's model name (from /proc/cpuinfo on Linux; ``platform.processor()`` elsewhere)."""
    return _cpuinfo().get("model name") or platform.processor() or platform.machine() or "unknown CPU"


def cpu_matmul_flags() -> list[str]:
    """Which of ``MATMUL_FLAGS`` this CPU has (empty where /proc/cpuinfo is missing)."""
    flags = set(_cpuinfo().get("flags", "").split())
    return [f for f in MATMUL_FLAGS if f in flags]


def describe_machine() -> str:
    """One line: CPU model, cores torch uses, matmul-relevant flags, torch's CPU capability, and the GPU if any."""
    flags = ",".join(cpu_matmul_flags()) or "none known"
    line = (f"{cpu_model()}, {torch.get_num_threads()} threads, flags {flags}, torch {torch.__version__} "
            f"(CPU capability {torch.backends.cpu.get_cpu_capability()})")
    if torch.cuda.is_available():
        line += f"; GPU {torch.cuda.get_device_name()}"
    return line
