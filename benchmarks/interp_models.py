"""The models and the measuring tools of benchmarks/interp.py: one checkpoint, three libraries, peak memory.

transformers builds a Llama-shaped model (random init) and saves it with a word-level tokenizer;
formerkit loads that directory with ``fk.from_pretrained``, transformers with ``from_pretrained``
and TransformerLens boots its ``TransformerBridge`` from it offline (on its own transformers copy,
since the bridge wraps the modules of the model it is given).
"""

from __future__ import annotations

import ctypes
import gc
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

import formerkit as fk
from formerkit.layers.hooks import HookPoint

SHAPES = {  # n_layers, d_model, n_heads, n_kv_heads, d_ff, vocab; patched positions; cache input (batch, tokens)
    "tiny": dict(layers=(2, 32, 4, 2, 64, 64), positions=4, cache_input=(2, 16)),
    "small": dict(layers=(4, 256, 8, 4, 688, 4096), positions=12, cache_input=(2, 128)),
    "88m": dict(layers=(12, 768, 12, 4, 2048, 8192), positions=12, cache_input=(4, 256)),
}


def save_checkpoint(shape: str, directory: Path) -> int:
    """Save a random transformers Llama of ``shape`` and its tokenizer under ``directory``; return the vocab size."""
    import transformers
    from tokenizers import Tokenizer, models

    n_layers, d_model, n_heads, kv, d_ff, vocab = SHAPES[shape]["layers"]
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(num_hidden_layers=n_layers, hidden_size=d_model, num_attention_heads=n_heads,
                                   num_key_value_heads=kv, intermediate_size=d_ff, vocab_size=vocab,
                                   max_position_embeddings=512, bos_token_id=0, eos_token_id=0,
                                   tie_word_embeddings=False)
    transformers.LlamaForCausalLM(cfg).save_pretrained(directory)
    words = Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab)}, unk_token="t0"))
    transformers.PreTrainedTokenizerFast(tokenizer_object=words, unk_token="t0", bos_token="t0", eos_token="t0",
                                         pad_token="t0").save_pretrained(directory)
    return vocab


def load_all(directory: Path) -> tuple[fk.Transformer, torch.nn.Module, Any]:
    """formerkit's model, transformers' model and TransformerLens' bridge (on a second copy), in eval mode."""
    import transformers
    from transformer_lens.model_bridge import TransformerBridge

    transformers.logging.set_verbosity_error()
    hf = transformers.LlamaForCausalLM.from_pretrained(directory).eval()
    os.environ["HF_HUB_OFFLINE"] = "1"
    bridge = TransformerBridge.boot_transformers(
        str(directory), hf_model=transformers.LlamaForCausalLM.from_pretrained(directory).eval(), device="cpu")
    return fk.from_pretrained(directory).eval(), hf, bridge


def without_hook_points(model: fk.Transformer, ids: torch.Tensor) -> torch.Tensor:
    """``model(ids)`` with every HookPoint a bare identity (not even the check for registered hooks)."""
    original = HookPoint.__call__
    HookPoint.__call__ = lambda self, x, *args, **kwargs: x
    try:
        return model(ids)
    finally:
        HookPoint.__call__ = original


def best_times(fns: dict[str, Callable[[], Any]], repeats: int) -> dict[str, float]:
    """The fastest of ``repeats`` calls of each function in seconds; each round calls every function once, in turn."""
    best = dict.fromkeys(fns, float("inf"))
    for _ in range(repeats):
        for key, fn in fns.items():
            start = time.perf_counter()
            fn()
            best[key] = min(best[key], time.perf_counter() - start)
    return best


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status (peak memory is read from Linux's process status)")


def peak_bytes(fn: Callable[[], Any]) -> int:
    """The rise of this process's resident memory at its peak during ``fn()``, its result kept until the end.

    glibc is told to map every allocation of 64 KiB or more on its own and to hand back what is free,
    so memory freed earlier and kept by the allocator does not hide the rise; the kernel's peak
    (VmHWM) is reset before the call (``/proc/self/clear_refs``).
    """
    libc = ctypes.CDLL("libc.so.6")
    libc.mallopt(-3, 1 << 16)  # M_MMAP_THRESHOLD
    gc.collect()
    libc.malloc_trim(0)
    Path("/proc/self/clear_refs").write_text("5")
    before = _status_kb("VmRSS")
    result = fn()  # noqa: F841  (held: the cache is part of what the call leaves in memory)
    return _status_kb("VmHWM") - before


def cache_bytes(cache: Any) -> tuple[int, int]:
    """The bytes of every tensor a cache stores, summed, and the bytes of their distinct storages (what it holds).

    The two differ where entries share memory: views of one tensor under several names.
    """
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in cache.values()}
    return sum(t.nbytes for t in cache.values()), sum(storages.values())
