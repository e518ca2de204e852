"""Activation patching sweep: formerkit's batched ``get_act_patch_resid_pre`` vs one forward per index.

A Llama-shaped formerkit model (random init); the clean and corrupted prompts differ in one token.
The naive loop is what TransformerLens does: one forward per (layer, position), one hook each.
Both give the same (n_layers, pos) table (the largest difference is printed); the best of
``--repeats`` runs of each is reported with the speedup.

    python benchmarks/interp.py [--shape small|88m] [--batch-size 64] [--repeats 3] [--threads N]
"""

from __future__ import annotations

import argparse
import itertools
import time

import torch

import formerkit as fk
from formerkit.hardware import describe_machine
from formerkit.interp import get_act_name, run_with_cache, run_with_hooks
from formerkit.interp.patching import get_act_patch_resid_pre

SHAPES = {  # (n_layers, d_model, n_heads, n_kv_heads, d_ff, vocab, positions)
    "tiny": (2, 32, 4, 2, 64, 64, 4),
    "small": (4, 256, 8, 4, 688, 4096, 12),
    "88m": (12, 768, 12, 4, 2048, 8192, 12),
}


def build(shape: str) -> tuple[fk.Transformer, int, int]:
    """The model (eval mode), its vocabulary size and the number of positions to patch."""
    n_layers, d_model, n_heads, kv, d_ff, vocab, positions = SHAPES[shape]
    torch.manual_seed(0)
    cfg = fk.ModelConfig.from_preset("llama", n_layers=n_layers, d_model=d_model, n_heads=n_heads, n_kv_heads=kv,
                                     d_ff=d_ff, vocab_size=vocab, max_seq_len=64)
    return fk.Transformer(cfg).eval(), vocab, positions


@torch.no_grad()
def naive_resid_pre(model: fk.Transformer, corrupted: torch.Tensor, cache, metric) -> torch.Tensor:
    """One forward per (layer, position), as TransformerLens runs it. Returns (n_layers, pos)."""
    out = torch.zeros(model.config.n_layers, corrupted.shape[1])
    for layer, pos in itertools.product(*map(range, out.shape)):
        name = get_act_name("resid_pre", layer)

        def patch(act, hook, pos=pos, name=name):
            act = act.clone()
            act[:, pos] = cache[name][:, pos]
            return act

        out[layer, pos] = metric(run_with_hooks(model, corrupted, fwd_hooks=[(name, patch)]))
    return out


def best_time(fn, repeats: int) -> tuple[float, torch.Tensor]:
    """The fastest of ``repeats`` calls in seconds, and the last result."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return min(times), result


def main(argv: list[str] | None = None) -> dict:
    """Run the sweep both ways; print and return the times, the speedup and the largest difference."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=list(SHAPES), default="small")
    parser.add_argument("--batch-size", type=int, default=64, help="rows per patched forward")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    model, vocab, positions = build(args.shape)
    clean = torch.randint(0, vocab, (1, positions), generator=torch.Generator().manual_seed(1))
    corrupted = clean.clone()
    corrupted[0, positions // 2] = (clean[0, positions // 2] + 1) % vocab
    answer, wrong = int(clean[0, -1]), int(corrupted[0, -1]) + 1

    def metric(logits: torch.Tensor) -> torch.Tensor:
        return (logits[:, -1, answer] - logits[:, -1, wrong % vocab]).mean()

    _, cache = run_with_cache(model, clean, names_filter=lambda n: n.endswith("hook_resid_pre"))
    batched_s, batched = best_time(
        lambda: get_act_patch_resid_pre(model, corrupted, cache, metric, batch_size=args.batch_size), args.repeats)
    naive_s, naive = best_time(lambda: naive_resid_pre(model, corrupted, cache, metric), args.repeats)
    n_params = sum(p.numel() for p in model.parameters())
    result = {"shape": args.shape, "params": n_params, "cells": naive.numel(), "batched_s": batched_s,
              "naive_s": naive_s, "speedup": naive_s / batched_s, "max_diff": (batched - naive).abs().max().item()}
    print(describe_machine())
    print(f"llama-shaped {args.shape}: {n_params / 1e6:.1f}M parameters, resid_pre sweep of "
          f"{model.config.n_layers} layers x {positions} positions = {result['cells']} patches, batch 1")
    print(f"  formerkit batched (batch_size {args.batch_size}): {batched_s:.3f} s")
    print(f"  one forward per patch:                {naive_s:.3f} s")
    print(f"  speedup {result['speedup']:.2f}x, largest difference {result['max_diff']:.2e}")
    return result


if __name__ == "__main__":
    main()
