"""Where the time of one batch-1 decode step goes, per precision: weight products, attention, other ops, and
the time outside any operator (Python, module calls, dispatch).

The model is generate_throughput.py's 88.1M-parameter Llama shape (12 layers, d_model 768, 4 KV
heads, d_ff 2048, vocabulary 8,192, untied head), built by transformers and loaded by formerkit;
fp32, bf16, int8 (weight-only, bf16 activations) and int4 (group 64, bf16 activations) as
``generate_throughput.py --precisions`` makes them. For each precision:

- the step's wall time: ``fk.generate`` of N and of 1 new tokens after a 16-token prompt, timed
  without the profiler, (t_N - t_1) / (N - 1), best of ``--repeats``;
- the profile: ``torch.profiler`` over one generation of N tokens, every operator's self CPU time
  summed per category and divided by the tokens. Weight products are the linear layers' kernels
  (``mm``/``addmm``, the ``bmm`` of formerkit's split few-row product, the packed int8/int4
  kernels), attention is ``scaled_dot_product_attention``'s kernels, "other ops" every other
  operator (norms, rotations, activations, copies into the cache, argmax). The profiler slows
  every operator call a little, so these shares are read as proportions of the profiled step,
  then scaled to the unprofiled wall time;
- the bound: the bytes of weights one step reads over the machine's read bandwidth (a sum over
  512 MB), i.e. how long the products would take at the memory's speed.

    PYTHONPATH=src python benchmarks/decode_profile.py [--model llama] [--precisions fp32,bf16,int8,int4]
        [--new-tokens 64] [--threads N] [--repeats 3]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))

import formerkit as fk  # noqa: E402
from formerkit.hardware import describe_machine  # noqa: E402
from generate_throughput import build_pair, read_bandwidth, variants, weight_bytes_per_token  # noqa: E402

PRODUCTS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::_weight_int8pack_mm", "aten::_weight_int4pack_mm",
            "aten::_weight_int4pack_mm_for_cpu", "aten::_weight_int4pack_mm_with_scales_and_zeros")
ATTENTION = ("aten::_scaled_dot_product_flash_attention_for_cpu", "aten::_scaled_dot_product_attention_math",
             "aten::_scaled_dot_product_efficient_attention")
CATEGORIES = ("weight products", "attention", "other ops", "outside operators")


def category(op: str) -> str:
    """The category of an operator name: weight products, attention or other ops."""
    if op in PRODUCTS:
        return "weight products"
    if op in ATTENTION:
        return "attention"
    return "other ops"


def step_seconds(model: torch.nn.Module, prompt: torch.Tensor, new_tokens: int, repeats: int) -> float:
    """Seconds per decode step: (time of N new tokens - time of 1) / (N - 1), best of ``repeats`` each."""
    def best(n: int) -> float:
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fk.generate(model, prompt, max_new_tokens=n)
            times.append(time.perf_counter() - start)
        return min(times)

    fk.generate(model, prompt, max_new_tokens=4)  # warm-up (and the few-row kernel probe)
    return (best(new_tokens) - best(1)) / (new_tokens - 1)


def profiled_shares(model: torch.nn.Module, prompt: torch.Tensor, new_tokens: int) -> dict[str, float]:
    """Shares (summing to 1) of one profiled generation's wall time per category, and the top operators."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        fk.generate(model, prompt, max_new_tokens=new_tokens)
        wall = time.perf_counter() - start
    per_category = dict.fromkeys(CATEGORIES, 0.0)
    per_op: dict[str, float] = {}
    for event in prof.key_averages():
        seconds = event.self_cpu_time_total / 1e6
        per_category[category(event.key)] += seconds
        per_op[event.key] = per_op.get(event.key, 0.0) + seconds
    per_category["outside operators"] = max(wall - sum(per_category.values()), 0.0)
    shares = {k: v / wall for k, v in per_category.items()}
    calls = sum(e.count for e in prof.key_averages()) / new_tokens
    top = sorted(per_op.items(), key=lambda kv: -kv[1])[:6]
    return {**shares, "op calls per token": calls, "top": [(name, s / wall) for name, s in top]}


def main(argv: list[str] | None = None) -> dict:
    """Profile the decode step per precision; print a table and return it."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="llama", help="a Llama shape of generate_throughput.py (llama-tiny: smoke)")
    parser.add_argument("--precisions", default="fp32,bf16,int8,int4")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    precisions = args.precisions.split(",")
    bandwidth = read_bandwidth()
    print(f"machine: {describe_machine()}; {args.threads} threads; read bandwidth {bandwidth / 1e9:.1f} GB/s")
    results = {}
    with tempfile.TemporaryDirectory() as tmp, torch.no_grad():
        ours, theirs = build_pair(args.model, Path(tmp) / args.model)
        models = variants(ours, theirs, precisions)
        prompt = torch.randint(10, ours.config.vocab_size, (1, 16), generator=torch.Generator().manual_seed(0))
        for precision in precisions:
            model = models[precision, "formerkit"]
            step = step_seconds(model, prompt, args.new_tokens, args.repeats)
            shares = profiled_shares(model, prompt, args.new_tokens)
            bound = weight_bytes_per_token(model) / bandwidth
            results[precision] = {"step_ms": step * 1e3, "bound_ms": bound * 1e3, **shares}
    print("| precision | ms per token (tokens/s) | weight products | attention | other ops | outside operators "
          "| operator calls per token | products at read bandwidth |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for precision, r in results.items():
        ms = r["step_ms"]
        parts = " | ".join(f"{r[c] * ms:.1f} ms ({r[c]:.0%})" for c in CATEGORIES)
        print(f"| {precision} | {ms:.1f} ({1e3 / ms:.1f}) | {parts} | {r['op calls per token']:.0f} | "
              f"{r['bound_ms']:.1f} ms |")
    for precision, r in results.items():
        print(f"{precision} top operators: " + ", ".join(f"{name} {share:.0%}" for name, share in r["top"]))
    return results


if __name__ == "__main__":
    main()
