"""Jacobi decoding against greedy decoding: forward passes per token and wall-clock, same outputs.

Runs ``generate`` (greedy) and ``jacobi_generate`` at each ``--block-sizes`` on prompts cut from
the Python standard library's own source (the embedded corpus), checks that every output is
identical, and reports new tokens per forward pass and the wall-clock ratio. The model is a
checkpoint (``--checkpoint``, e.g. ``runs/demo`` after ``make demo``) or, without one, a random
Llama-shaped model — on which few guesses are ever right, the floor of what Jacobi decoding gains.
Runs alternate, ``--repeats`` rounds; the best time of each is kept.

    python benchmarks/jacobi.py [--checkpoint DIR] [--block-sizes 4,8,16] [--prompts 8]
        [--new-tokens 64] [--repeats 2]
"""

from __future__ import annotations

import argparse
import time

import torch

import formerkit as fk
from formerkit.data import stdlib_source
from formerkit.generate import generate, jacobi_generate
from formerkit.hardware import describe_machine
from formerkit.tokenizers import ByteTokenizer, load_tokenizer


def load(checkpoint: str | None):
    """The model and tokenizer to measure: a checkpoint's, or a random Llama shape with bytes as tokens."""
    if checkpoint:
        return fk.from_pretrained(checkpoint).eval(), load_tokenizer(checkpoint)
    torch.manual_seed(0)
    cfg = fk.ModelConfig.from_preset("llama", n_layers=4, d_model=256, n_heads=4, n_kv_heads=4, d_ff=688,
                                     vocab_size=259, max_seq_len=512)
    return fk.Transformer(cfg).eval(), ByteTokenizer()


def prompts(tokenizer, count: int, length: int) -> list[list[int]]:
    """``count`` prompts of ``length`` tokens, each the start of a line of the standard library's source."""
    out = []
    for text in stdlib_source().documents():
        for start in range(0, len(text) - 4 * length, 997):
            ids = tokenizer.encode(text[start:start + 4 * length])[:length]
            if len(ids) == length:
                out.append(ids)
            if len(out) == count:
                return out
    return out


def timed(fn) -> tuple[float, object]:
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def main(argv: list[str] | None = None) -> dict:
    """Measure and print the table; return {block size: (tokens per pass, time ratio to greedy)}."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", default=None)
    parser.add_argument("--block-sizes", default="4,8,16")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args(argv)
    model, tokenizer = load(args.checkpoint)
    sizes = [int(s) for s in args.block_sizes.split(",")]
    rows = prompts(tokenizer, args.prompts, args.prompt_len)
    print(describe_machine())
    print(f"model: {args.checkpoint or 'random llama shape'}, {model.num_parameters() / 1e6:.1f}M parameters; "
          f"{len(rows)} prompts of {args.prompt_len} tokens, {args.new_tokens} new tokens each, batch 1")
    best = {key: float("inf") for key in ["greedy", *sizes]}
    passes = dict.fromkeys(sizes, 0)
    tokens = 0
    generate(model, [rows[0]], max_new_tokens=2)  # warm-up (kernel choices)
    for round_ in range(args.repeats):
        totals = dict.fromkeys(best, 0.0)
        for ids in rows:
            seconds, expected = timed(lambda ids=ids: generate(model, [ids], max_new_tokens=args.new_tokens,
                                                               eos_token_id=None))
            totals["greedy"] += seconds
            for m in sizes:
                seconds, out = timed(lambda ids=ids, m=m: jacobi_generate(
                    model, [ids], max_new_tokens=args.new_tokens, eos_token_id=None, block_size=m))
                if not torch.equal(out.sequences, expected):
                    raise SystemExit(f"block size {m}: the output differs from greedy decoding")
                totals[m] += seconds
                if round_ == 0:
                    passes[m] += out.forward_passes
            tokens += args.new_tokens if round_ == 0 else 0
        best = {key: min(best[key], totals[key]) for key in best}
    print(f"{'decoding':>10} {'tokens/pass':>12} {'tokens/s':>10} {'time vs greedy':>15}")
    print(f"{'greedy':>10} {1.0:12.2f} {tokens / best['greedy']:10.1f} {1.0:15.2f}")
    result = {}
    for m in sizes:
        per_pass, ratio = tokens / passes[m], best[m] / best["greedy"]
        result[m] = (per_pass, ratio)
        print(f"{'jacobi ' + str(m):>10} {per_pass:12.2f} {tokens / best[m]:10.1f} {ratio:15.2f}")
    print("every Jacobi output equals greedy decoding's")
    return result


if __name__ == "__main__":
    main()
