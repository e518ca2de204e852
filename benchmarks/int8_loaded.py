"""Batch-1 decoding of an int8 model quantized in memory against the same model saved and loaded back.

A GPT-2-shaped model (6 layers, d_model 768, vocabulary 8,192, random weights) is quantized with
``quantize_int8`` and cast to ``--dtype``, saved with ``save_quantized`` and read back with
``from_pretrained``; the two decode 48 greedy tokens after a 16-token prompt, alternating, best of 3
each round, on ``--threads`` threads. In bf16 the fused int8 kernel needs 64-byte-aligned weights,
which a loaded model has only because ``load_quantized`` copies them out of the file's memory map.

    python benchmarks/int8_loaded.py [--dtype bf16] [--threads 1] [--rounds 2]
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch

import formerkit as fk
from formerkit.hardware import describe_machine


def tokens_per_second(model: fk.Transformer, ids: torch.Tensor, new: int = 48) -> float:
    """Best of three greedy runs of ``new`` tokens, after a warm-up."""
    fk.generate(model, ids, max_new_tokens=8)
    best = 0.0
    for _ in range(3):
        start = time.perf_counter()
        fk.generate(model, ids, max_new_tokens=new)
        best = max(best, new / (time.perf_counter() - start))
    return best


def main(argv: list[str] | None = None) -> dict[str, list[float]]:
    """Print and return tokens/s per round for the in-memory and the loaded model."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--layers", type=int, default=6)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    torch.manual_seed(0)
    cfg = fk.ModelConfig.from_preset("gpt2", n_layers=args.layers, vocab_size=8192, max_seq_len=256)
    in_memory = fk.quantize_int8(fk.Transformer(cfg).eval()).to(dtype)
    ids = torch.randint(0, 8192, (1, 16))
    results: dict[str, list[float]] = {"in memory": [], "loaded": []}
    with tempfile.TemporaryDirectory() as tmp:
        fk.save_quantized(in_memory, tmp)
        loaded = fk.from_pretrained(tmp, dtype=dtype)
        for _ in range(args.rounds):
            for name, model in (("in memory", in_memory), ("loaded", loaded)):
                results[name].append(tokens_per_second(model, ids))
    print(describe_machine())
    for name, rates in results.items():
        print(f"{name:>9s}: " + ", ".join(f"{r:.1f}" for r in rates) + " tokens/s")
    return results


if __name__ == "__main__":
    main()
