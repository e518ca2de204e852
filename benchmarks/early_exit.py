"""Quality against average layers used for early exit (Depth-Adaptive Transformer), one trained model.

A small Llama-style decoder with exits after blocks 0, 1 and 2 of 4 (``exit_layers: [0, 1, 2]``, the
LM head shared behind a norm per exit) is trained by formerkit's trainer, all exits jointly, on the
standard library's email package (byte tokens). Then held-out text is read token by token through
the KV cache with ``Transformer.decode_with_exits`` at each confidence threshold: each token's loss
comes from the exit the step took, and the skipped layers cache the exit state, as in generation.
The table gives held-out loss and mean layers per token; ``--png`` draws the curve.

    python benchmarks/early_exit.py [--steps 600] [--png docs/images/early_exit.png] [--quick]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import formerkit as fk  # noqa: E402
from formerkit.cache import KVCache  # noqa: E402
from formerkit.hardware import describe_machine  # noqa: E402
from small_runs import train_small, windows  # noqa: E402

THRESHOLDS = (2.0, 0.95, 0.9, 0.8, 0.6, 0.4, 0.0)  # 2.0: never exits early
FULL = dict(layers=4, d_model=128, heads=4, seq_len=128, batch=16, package="email", rows=4)
QUICK = dict(layers=3, d_model=32, heads=2, seq_len=32, batch=4, package="json", rows=1)


@torch.no_grad()
def read_with_exits(model: fk.Transformer, rows: torch.Tensor, threshold: float) -> tuple[float, float]:
    """Feed each row (T tokens) one token at a time with early exits; return (mean next-token loss, mean layers)."""
    total = layers = count = 0.0
    for row in rows:
        cache = KVCache.for_model(model, 1, len(row))
        for t in range(len(row) - 1):
            logits, used = model.decode_with_exits(row[None, t:t + 1], torch.tensor([[t]]), cache, threshold)
            total += float(torch.nn.functional.cross_entropy(logits[0], row[t + 1:t + 2]))
            layers += used
            count += 1
    return total / count, layers / count


def main(argv: list[str] | None = None) -> dict[float, tuple[float, float]]:
    """Train, read the held-out rows at every threshold, print the table; return {threshold: (loss, layers)}."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--png", default=None)
    parser.add_argument("--quick", action="store_true", help="a tiny model and corpus (seconds; for tests)")
    args = parser.parse_args(argv)
    shape = QUICK if args.quick else FULL
    start = time.perf_counter()
    exits = list(range(shape["layers"] - 1))
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        size = dict(batch=shape["batch"], seq_len=shape["seq_len"])
        model = train_small(work / "run", shape["package"], layers=shape["layers"], d_model=shape["d_model"],
                            heads=shape["heads"], steps=args.steps,
                            extra=["--model.exit_layers", str(exits)], **size)
        x, _ = windows(shape["package"], work, max_batches=1, **size)[0]
    rows = x[:shape["rows"]]
    results = {t: read_with_exits(model, rows, t) for t in THRESHOLDS}
    print(describe_machine())
    print(f"{args.steps} steps, {shape['layers']} layers, exits after blocks {exits}; {rows.numel()} held-out tokens; "
          f"{time.perf_counter() - start:.0f} s in all")
    print("| threshold | held-out loss | mean layers per token |")
    print("|---|---|---|")
    for t, (loss, layers) in results.items():
        label = "never exit" if t > 1 else f"{t:.2f}"
        print(f"| {label} | {loss:.4f} | {layers:.2f} |")
    if args.png:
        _plot(results, shape["layers"], args.png)
    return results


def _plot(results: dict[float, tuple[float, float]], depth: int, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    points = sorted(results.values(), key=lambda r: r[1])
    ax.plot([p[1] for p in points], [p[0] for p in points], "o-")
    for t, (loss, layers) in results.items():
        ax.annotate("never" if t > 1 else f"{t:g}", (layers, loss), textcoords="offset points", xytext=(4, 4),
                    fontsize=8)
    ax.set(xlabel=f"mean layers per token (of {depth})", ylabel="held-out loss (nats/token)",
           title="early exit: quality vs depth used")
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
