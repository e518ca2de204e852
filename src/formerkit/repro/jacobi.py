"""Jacobi decoding (Santilli et al., "Accelerating Transformer Inference for Translation via Parallel Decoding",
ACL 2023): the greedy output with fewer sequential forward passes than tokens.

A small Llama-style decoder is trained by formerkit's trainer on the standard library's email package
(byte tokens). Prompts cut from its held-out files are continued greedily by ``generate`` and by
``jacobi_generate`` (blocks of 8 guesses refined per pass); every output must be identical, and the
number of new tokens per forward pass is the measure. Wall-clock time is reported, not judged (on a
CPU a pass over 8 positions is not free).
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from formerkit.generate import generate, jacobi_generate
from formerkit.repro.common import line_png
from formerkit.repro.registry import Outcome, Repro, register
from formerkit.repro.trained import trained_and_held_out

BLOCKS = (2, 4, 8, 16)
FULL = dict(layers=4, d_model=128, heads=4, seq_len=128, batch=16, package="email", steps=600, prompts=8,
            prompt_len=32, new_tokens=64)
QUICK = dict(layers=1, d_model=32, heads=2, seq_len=32, batch=4, package="json", steps=3, prompts=2,
             prompt_len=8, new_tokens=8)


def run(seed: int, quick: bool, out_dir: Path) -> Outcome:
    """Train, decode every prompt greedily and with Jacobi blocks; the value is block 8's tokens per pass."""
    shape = QUICK if quick else FULL
    model, x = trained_and_held_out(shape, seed)
    prompts = x[:shape["prompts"], :shape["prompt_len"]]
    start = time.perf_counter()
    greedy = [generate(model, p[None], max_new_tokens=shape["new_tokens"]) for p in prompts]
    greedy_seconds = time.perf_counter() - start
    rows, identical = {}, True
    for block in BLOCKS:
        start = time.perf_counter()
        outs = [jacobi_generate(model, p[None], block_size=block, max_new_tokens=shape["new_tokens"]) for p in prompts]
        seconds = time.perf_counter() - start
        identical &= all(torch.equal(o.sequences, g) for o, g in zip(outs, greedy, strict=True))
        passes, tokens = sum(o.forward_passes for o in outs), sum(o.new_tokens for o in outs)
        rows[block] = {"tokens_per_pass": tokens / passes, "time_vs_greedy": seconds / greedy_seconds}
    line_png(out_dir / "jacobi.png", {"tokens per pass": (list(rows), [r["tokens_per_pass"] for r in rows.values()])},
             xlabel="block size", ylabel="new tokens per forward pass", title="Jacobi decoding on a trained model",
             hline=1.0)
    table = [["block size", "tokens per pass", "time vs greedy"]]
    table += [[block, r["tokens_per_pass"], r["time_vs_greedy"]] for block, r in rows.items()]
    return Outcome(
        value=rows[8]["tokens_per_pass"],
        checks={"every Jacobi output equals greedy decoding's": identical},
        detail={"steps": shape["steps"], "prompts": len(prompts), "new_tokens": shape["new_tokens"],
                "blocks": {str(b): r for b, r in rows.items()}},
        table=table,
    )


register(Repro(
    name="jacobi",
    claim="Jacobi decoding gives exactly the greedy output with fewer sequential forward passes than tokens",
    paper="Santilli et al., Accelerating Transformer Inference for Translation via Parallel Decoding (ACL 2023)",
    metric="new tokens per forward pass (block 8)",
    threshold=1.2,
    direction="min",
    run=run,
    item=8,
))
