"""Latency against sequence length for full (softmax), linear and low-rank (Linformer) attention.

Two measurements, each at 1 and 2 threads, every length in ``--lengths``:

- an encoder forward pass over one sequence of that length (full, linear, low-rank with
  ``--rank`` rows): the quadratic score matrix against linear-time forms;
- one decoding step of a causal decoder after that many cached tokens (full KV cache, linear
  attention's fixed-size state): the per-token cost as the context grows.

The models are random-weight, ``--layers`` layers of ``--d-model`` (latency does not depend on the
weights' values). Each time is the median of ``--repeats`` runs after a warm-up. Writes the table
to stdout and, with ``--png``, the curves.

    python benchmarks/attention_latency.py [--lengths 64,256,1024,4096] [--png docs/images/attention_latency.png]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import formerkit as fk
from formerkit.cache import KVCache
from formerkit.hardware import describe_machine

KINDS = {"full": {}, "linear": {"attn_type": "linear"}, "lowrank": {"attn_type": "lowrank"}}


def _model(kind: str, attn: str, length: int, args: argparse.Namespace) -> fk.Transformer:
    """A random model of the benchmark's shape: an encoder ("encoder") or a causal decoder ("decoder")."""
    torch.manual_seed(0)
    extra = dict(KINDS[attn])
    if attn == "lowrank":
        extra["lowrank_k"] = args.rank
    preset = "bert-base" if kind == "encoder" else "llama"
    cfg = fk.ModelConfig.from_preset(preset, n_layers=args.layers, d_model=args.d_model, n_heads=args.heads,
                                     n_kv_heads=None, d_ff=4 * args.d_model, vocab_size=1000,
                                     max_seq_len=length, position="none", **extra)
    return fk.Transformer(cfg).eval()


def _median_seconds(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def encoder_forward(attn: str, length: int, args: argparse.Namespace) -> float:
    """Seconds for one encoder forward pass over a sequence of ``length`` tokens."""
    model = _model("encoder", attn, length, args)
    ids = torch.randint(0, 1000, (1, length))
    with torch.inference_mode():
        return _median_seconds(lambda: model(ids), args.repeats)


def decode_step(attn: str, length: int, args: argparse.Namespace) -> float:
    """Seconds for one decoding step of a causal decoder after ``length`` cached tokens (the few timed steps
    extend the cache by one token each, which changes nothing measurable)."""
    model = _model("decoder", attn, length + args.repeats + 2, args)
    cache = KVCache.for_model(model, 1)
    token = torch.zeros(1, 1, dtype=torch.long)
    with torch.inference_mode():
        model(torch.randint(0, 1000, (1, length)), cache=cache)
        return _median_seconds(lambda: model(token, cache=cache), args.repeats)


def main(argv: list[str] | None = None) -> dict:
    """Measure, print the tables and return {(measure, attention, threads, length): seconds}."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", default="64,256,1024,4096")
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--rank", type=int, default=128, help="low-rank attention's projected length")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--png", default=None)
    args = parser.parse_args(argv)
    lengths = [int(n) for n in args.lengths.split(",")]
    threads = [int(n) for n in args.threads.split(",")]
    print(describe_machine())
    results: dict = {}
    for measure, fn, kinds in [("encoder forward", encoder_forward, ["full", "linear", "lowrank"]),
                               ("decode step", decode_step, ["full", "linear"])]:
        print(f"\n{measure} (ms), {args.layers} layers, d_model {args.d_model}")
        print(f"{'attention':>9s} {'threads':>7s} " + " ".join(f"{n:>8d}" for n in lengths))
        for attn in kinds:
            for n_threads in threads:
                torch.set_num_threads(n_threads)
                row = [fn(attn, n, args) for n in lengths]
                results.update({(measure, attn, n_threads, n): s for n, s in zip(lengths, row, strict=True)})
                print(f"{attn:>9s} {n_threads:>7d} " + " ".join(f"{1e3 * s:8.2f}" for s in row))
    if args.png:
        _plot(results, lengths, threads, args.png)
    return results


def _plot(results: dict, lengths: list[int], threads: list[int], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    measures = sorted({key[0] for key in results}, reverse=True)
    fig, axes = plt.subplots(1, len(measures), figsize=(6 * len(measures), 4))
    for ax, measure in zip(axes, measures, strict=True):
        for attn in sorted({key[1] for key in results if key[0] == measure}):
            for n_threads in threads:
                ax.plot(lengths, [1e3 * results[(measure, attn, n_threads, n)] for n in lengths], marker="o",
                        linestyle="-" if n_threads == threads[-1] else "--", label=f"{attn}, {n_threads} thr")
        ax.set(xscale="log", yscale="log", xlabel="sequence length (tokens)", ylabel="ms", title=measure)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
