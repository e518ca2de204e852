"""Generation throughput: formerkit's ``generate`` vs transformers' ``generate`` on the same weights, in one run.

Models: GPT-2-shaped decoders with a vocabulary of 8192 — "small" (6 layers, d_model 384,
6 heads) and "base" (12 layers, d_model 768, 12 heads). transformers builds each one
(random init, sdpa attention) and saves it; formerkit loads that directory, so both run
identical weights, and the fp32 greedy tokens are checked to be equal before any timing.

Each measurement generates ``--new-tokens`` tokens greedily after a ``--prompt-len``-token
prompt, at batch 1 and batch 8, with no EOS (every row produces every token); tokens/s
counts new tokens of all rows over the whole call (prefill included, as a user sees it).
Precisions: fp32 and bf16 weights for both libraries, and formerkit's weight-only int8
(bf16 activations, ``quantize_int8``). The runs of all variants alternate, ``--repeats``
rounds, and the best round of each is reported (the least disturbed by other work).

The bound: at batch 1 decoding is memory-bound, since every new token reads every weight
matrix once (the embedding lookup reads one row). The machine's read bandwidth is measured
(summing a 512 MB tensor, best of a few) and

    bound tokens/s = bandwidth / bytes of linear weights and LM head per token

(times the batch size at batch 8, where one weight read serves every row; compute may bind
first there). Weights that fit in the L3 cache can beat this DRAM bound.

    python benchmarks/generate_throughput.py [--models small,base] [--batches 1,8]
        [--precisions fp32,bf16,int8] [--new-tokens 200] [--repeats 3] [--threads N]
"""

from __future__ import annotations

import argparse
import copy
import os
import tempfile
import time
from dataclasses import dataclass

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import transformers  # noqa: E402

import formerkit as fk  # noqa: E402
from formerkit.layers.quantized import quantize_int8  # noqa: E402

transformers.logging.set_verbosity_error()

VOCAB = 8192
SHAPES = {"small": (6, 384, 6), "base": (12, 768, 12), "tiny": (2, 64, 2)}  # n_layers, d_model, n_heads
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "int8": torch.bfloat16}
TARGETS = {"small": 4.0, "base": 1.5}  # formerkit / transformers tokens/s at batch 1
INT8_TARGET = 1.6  # formerkit int8 / formerkit fp32 on the base model


@dataclass(frozen=True)
class Run:
    """One timed variant: a model size, batch size, precision and library."""

    model: str
    batch: int
    precision: str
    library: str


def read_bandwidth(megabytes: int = 512, repeats: int = 5) -> float:
    """The machine's memory read bandwidth in bytes/s: the best of ``repeats`` sums of a large fp32 tensor."""
    x = torch.ones(megabytes * 2**20 // 4)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - start)
    return x.numel() * 4 / best


def weight_bytes_per_token(model: torch.nn.Module) -> int:
    """Bytes one decode step reads from weights: every linear layer's weight (and scale) tensors, once."""
    total = 0
    for module in model.modules():
        if isinstance(module, torch.nn.Linear) or type(module).__name__ == "Int8Linear":
            total += sum(t.numel() * t.element_size() for t in (module.weight, getattr(module, "scale", None))
                         if t is not None)
    return total


def build_pair(name: str, seed: int = 0) -> tuple[torch.nn.Module, torch.nn.Module]:
    """A random-init transformers GPT2LMHeadModel of the named shape and the same weights loaded by formerkit."""
    n_layers, d_model, n_heads = SHAPES[name]
    torch.manual_seed(seed)
    config = transformers.GPT2Config(vocab_size=VOCAB, n_positions=1024, n_embd=d_model, n_layer=n_layers,
                                     n_head=n_heads, attn_implementation="sdpa")
    theirs = transformers.GPT2LMHeadModel(config).eval()
    with tempfile.TemporaryDirectory() as tmp:
        theirs.save_pretrained(tmp)
        ours = fk.from_pretrained(tmp).eval()
    return ours, theirs


def variants(ours: torch.nn.Module, theirs: torch.nn.Module, precisions: list[str]) -> dict:
    """Models per (precision, library): fp32 and bf16 copies of both, and formerkit's int8 (bf16 activations)."""
    out = {}
    for precision in precisions:
        if precision == "int8":
            out[precision, "formerkit"] = quantize_int8(copy.deepcopy(ours).to(torch.bfloat16))
            continue
        dtype = DTYPES[precision]
        out[precision, "formerkit"] = copy.deepcopy(ours).to(dtype)
        out[precision, "transformers"] = copy.deepcopy(theirs).to(dtype)
    return out


def generator(library: str, model: torch.nn.Module, prompt: torch.Tensor, new_tokens: int):
    """A no-argument callable that generates ``new_tokens`` greedy tokens after ``prompt`` (B, T)."""
    if library == "formerkit":
        return lambda: fk.generate(model, prompt, max_new_tokens=new_tokens)
    mask = torch.ones_like(prompt)
    return lambda: model.generate(prompt, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                  do_sample=False, pad_token_id=0)


def check_same_tokens(ours: torch.nn.Module, theirs: torch.nn.Module, prompt: torch.Tensor, new_tokens: int) -> bool:
    """Whether both libraries' fp32 greedy continuations of ``prompt`` are identical."""
    with torch.no_grad():
        a = generator("formerkit", ours, prompt, new_tokens)()
        b = generator("transformers", theirs, prompt, new_tokens)()
    return torch.equal(a, b)


def measure(models: dict, prompts: dict[int, torch.Tensor], name: str, new_tokens: int,
            repeats: int) -> dict[Run, float]:
    """Best tokens/s of every (batch, precision, library) variant over ``repeats`` alternating rounds."""
    calls = {}
    for (precision, library), model in models.items():
        for batch, prompt in prompts.items():
            calls[Run(name, batch, precision, library)] = generator(library, model, prompt, new_tokens)
    best = dict.fromkeys(calls, 0.0)
    with torch.no_grad():
        for call in calls.values():
            call()  # warm up: allocator, kernels, lazy initialisation
        for _ in range(repeats):
            for run, call in calls.items():
                start = time.perf_counter()
                call()
                best[run] = max(best[run], run.batch * new_tokens / (time.perf_counter() - start))
    return best


def report(name: str, best: dict[Run, float], bandwidth: float, weight_bytes: dict[str, int]) -> dict:
    """Print one model's table (tokens/s, ratio to transformers at the same precision, bound) and return ratios."""
    print(f"\n{name}: {SHAPES[name][0]} layers, d_model {SHAPES[name][1]}, vocab {VOCAB}")
    print(f"{'batch':>5} {'precision':>9} {'formerkit tok/s':>16} {'transformers tok/s':>19} {'ratio':>6} "
          f"{'bound tok/s':>12} {'formerkit % of bound':>21}")
    ratios = {}
    for run in sorted((r for r in best if r.library == "formerkit"), key=lambda r: (r.batch, r.precision)):
        theirs = best.get(Run(run.model, run.batch, run.precision, "transformers"))
        bound = run.batch * bandwidth / weight_bytes[run.precision]
        ratio = best[run] / theirs if theirs else None
        ratios[run.batch, run.precision] = ratio
        shown = f"{theirs:19.1f} {ratio:5.2f}x" if theirs else f"{'-':>19} {'-':>6}"
        print(f"{run.batch:5d} {run.precision:>9} {best[run]:16.1f} {shown} {bound:12.1f} "
              f"{best[run] / bound:20.0%}")
    return ratios


def main(argv: list[str] | None = None) -> dict:
    """Run the benchmark; return the measurements (used by the smoke test)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="small,base", help=f"comma-separated subset of {','.join(SHAPES)}")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--precisions", default="fp32,bf16,int8")
    parser.add_argument("--prompt-len", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    names, precisions = args.models.split(","), args.precisions.split(",")
    batches = [int(b) for b in args.batches.split(",")]
    bandwidth = read_bandwidth()
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, {torch.get_num_threads()} threads; "
          f"measured read bandwidth {bandwidth / 1e9:.1f} GB/s")
    results: dict = {"bandwidth": bandwidth, "best": {}, "ratios": {}, "same_tokens": {}}
    generator_seed = torch.Generator().manual_seed(0)
    for name in names:
        ours, theirs = build_pair(name)
        prompts = {b: torch.randint(0, VOCAB, (b, args.prompt_len), generator=generator_seed) for b in batches}
        results["same_tokens"][name] = same = check_same_tokens(ours, theirs, prompts[batches[0]], args.new_tokens)
        print(f"\n{name}: fp32 greedy tokens identical to transformers': {same}")
        models = variants(ours, theirs, precisions)
        weight_bytes = {p: weight_bytes_per_token(models[p, "formerkit"]) for p in precisions}
        best = measure(models, prompts, name, args.new_tokens, args.repeats)
        results["best"].update(best)
        results["ratios"][name] = report(name, best, bandwidth, weight_bytes)
    print("\ntargets (batch 1, formerkit / transformers at the same precision):")
    for name in names:
        for precision in precisions:
            ratio = results["ratios"][name].get((1, precision))
            if name in TARGETS and ratio is not None:
                verdict = "met" if ratio >= TARGETS[name] else f"missed ({ratio / TARGETS[name]:.0%} of it)"
                print(f"  {name} {precision}: {ratio:.2f}x, target {TARGETS[name]}x: {verdict}")
        fp32, int8 = (results["best"].get(Run(name, 1, p, "formerkit")) for p in ("fp32", "int8"))
        if fp32 and int8:
            gain = int8 / fp32
            results.setdefault("int8_gain", {})[name] = gain
            target = f", target {INT8_TARGET}x: {'met' if gain >= INT8_TARGET else 'missed'}" if name == "base" else ""
            print(f"  {name} int8 / own fp32 at batch 1: {gain:.2f}x{target}")
        best_theirs = max((v for r, v in results["best"].items()
                           if r.model == name and r.batch == 1 and r.library == "transformers"), default=None)
        best_ours = max((v for r, v in results["best"].items()
                         if r.model == name and r.batch == 1 and r.library == "formerkit"), default=None)
        if best_theirs and best_ours:
            print(f"  {name} fastest formerkit / fastest transformers at batch 1: {best_ours / best_theirs:.2f}x")
    return results


if __name__ == "__main__":
    main()
