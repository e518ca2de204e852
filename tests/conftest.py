"""Fixtures and helpers shared by several test files."""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch
from hypothesis import settings
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
PARITY_STD = 0.3  # at transformers' default 0.02, a GELU <-> tanh-GELU swap stays under a 1e-4 tolerance
PARITY_TOL = 1e-5  # float32 parity: the largest difference, relative to the reference's magnitude (parity_error)


def in_ci() -> bool:
    """True when the environment variable CI is set to anything but '', '0' or 'false' (CI services set CI=true)."""
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false")


# Fuzz tests: reproducible in CI (the same examples every run), random elsewhere. Each test sets its own
# max_examples; the profile only decides how examples are drawn.
settings.register_profile("ci", derandomize=True, print_blob=True)
settings.register_profile("dev")
settings.load_profile("ci" if in_ci() else "dev")


def require(name: str) -> ModuleType:
    """Import a reference library the tests compare against (transformers, sentence-transformers, ...).

    When it is missing, the test (or, called at module level, the module) is skipped, except in CI
    (see ``in_ci``): there the references are part of the test extra, so a missing one fails loudly
    instead of quietly skipping the comparisons.
    """
    try:
        return importlib.import_module(name)
    except ImportError as err:
        if in_ci():
            pytest.fail(f"{name} is required in CI but cannot be imported ({err}); install the test extra: "
                        'pip install -e ".[test]"', pytrace=False)
        pytest.skip(f"{name} is not installed ({err})", allow_module_level=True)


def parity_error(ours: torch.Tensor, reference: torch.Tensor, valid: torch.Tensor | None = None) -> float:
    """Largest |ours - reference| over the ``valid`` positions, relative to the reference's largest |value|.

    ``valid`` is a bool mask over the leading dimensions (e.g. (B, T) of real tokens; None: all).
    The scale is the reference's largest magnitude there, but at least 1, so values near zero are
    compared absolutely. Parity tests require it below ``PARITY_TOL``; their mutant checks show that a
    swapped activation pushes it far above.
    """
    diff, scale = (ours - reference).abs(), reference.abs()
    if valid is not None:
        diff, scale = diff[valid], scale[valid]
    return float(diff.max() / scale.max().clamp(min=1.0))


def reinit_for_parity(model: nn.Module, std: float = PARITY_STD, seed: int = 0) -> nn.Module:
    """Re-initialise every floating parameter of ``model`` so that a parity test can fail; return the model.

    Weights and biases get normal(0, std); the weights of normalization layers (any module whose
    class name contains "Norm": LayerNorm, RMSNorm, T5LayerNorm, ...) get 1 + normal(0, std).
    Library defaults (std 0.02, zero biases, unit norms) make every layer nearly linear and
    near-identity, so swapped activations, dropped biases or misplaced norms hide under 1e-4.
    Tied parameters stay tied (the same tensor is written twice). Buffers are left alone.
    """
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            norm = "norm" in type(module).__name__.lower()
            for name, param in module.named_parameters(recurse=False):
                if not param.is_floating_point():
                    continue
                noise = torch.randn(param.shape, generator=generator, dtype=param.dtype) * std
                param.copy_(1 + noise if norm and name == "weight" else noise)
    return model


def load_script(relative: str) -> ModuleType:
    """Import a script of the repository (e.g. ``benchmarks/train_throughput.py``) as a module."""
    path = ROOT / relative
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def one_thread():
    """Run on one thread: tiny models are fastest so, and threads on a busy shared CPU wait on each other."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class ScriptedTokens:
    """Force the model's next token: a hook on the LM head puts one id far ahead at each call."""

    def __init__(self, model: torch.nn.Module, tokens: list[int]) -> None:
        self.tokens, self.calls = tokens, 0
        model.lm_head.register_forward_hook(self._hook)

    def _hook(self, module, inputs, logits):
        forced = torch.full_like(logits[:, -1], -10.0)  # (B, V)
        forced[:, self.tokens[min(self.calls, len(self.tokens) - 1)]] = 10.0
        self.calls += 1
        return torch.cat([logits[:, :-1], forced[:, None]], dim=1)


@contextlib.contextmanager
def recording(model: nn.Module, names: list[str]):
    """The brute-force reference for hook points: a plain forward hook on each named module, storing a copy of
    its output in the yielded dict; the hooks are removed when the block ends."""
    modules = dict(model.named_modules())
    seen: dict[str, torch.Tensor] = {}
    handles = [modules[n].register_forward_hook(lambda m, i, o, n=n: seen.__setitem__(n, o.detach().clone()))
               for n in names]
    try:
        yield seen
    finally:
        for h in handles:
            h.remove()
