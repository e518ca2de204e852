"""Early exit (Elbayad et al., "Depth-Adaptive Transformer", ICLR 2020): quality against the layers used.

A small Llama-style decoder with exits after every block but the last (``exit_layers``, the LM head
shared behind a norm per exit) is trained by formerkit's trainer, all exits jointly, on the standard
library's email package (byte tokens). Held-out text is then read token by token through the KV
cache with ``Transformer.decode_with_exits`` at each confidence threshold, as generation runs it:
each token's loss comes from the exit the step took, and the skipped layers cache the exit state.
The claim is judged at the cheapest threshold whose held-out loss stays within 1% of the full model's.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from formerkit.cache import KVCache
from formerkit.model import Transformer
from formerkit.repro.common import line_png
from formerkit.repro.registry import Outcome, Repro, register
from formerkit.repro.trained import trained_and_held_out

THRESHOLDS = (2.0, 0.99, 0.95, 0.9, 0.8, 0.6, 0.4, 0.0)  # 2.0: never exits early
FULL = dict(layers=6, d_model=128, heads=4, seq_len=128, batch=16, package="email", rows=4, steps=800)
QUICK = dict(layers=3, d_model=32, heads=2, seq_len=32, batch=4, package="json", rows=1, steps=3)
TOLERANCE = 0.01  # a threshold "keeps the full model's quality" when its loss is within 1% of it


@torch.no_grad()
def read_with_exits(model: Transformer, rows: torch.Tensor, threshold: float) -> tuple[float, float]:
    """Feed each row (T tokens) one token at a time with early exits; return (mean next-token loss, mean layers)."""
    total = layers = count = 0.0
    for row in rows:
        cache = KVCache.for_model(model, 1, len(row))
        for t in range(len(row) - 1):
            logits, used = model.decode_with_exits(row[None, t:t + 1], torch.tensor([[t]]), cache, threshold)
            total += float(F.cross_entropy(logits[0], row[t + 1:t + 2]))
            layers += used
            count += 1
    return total / count, layers / count


def run(seed: int, quick: bool, out_dir: Path) -> Outcome:
    """Train, read held-out rows at every threshold; the value is the share of the depth used at the cheapest
    threshold within 1% of the full model's loss."""
    shape = QUICK if quick else FULL
    depth = shape["layers"]
    model, x = trained_and_held_out(shape, seed, extra=["--model.exit_layers", str(list(range(depth - 1)))])
    curve = {t: read_with_exits(model, x[:shape["rows"]], t) for t in THRESHOLDS}
    full_loss = curve[2.0][0]
    keeping = [layers for loss, layers in curve.values() if loss <= full_loss * (1 + TOLERANCE)]
    points = sorted(curve.values(), key=lambda p: p[1])
    line_png(out_dir / "early_exit.png", {"held-out loss": ([p[1] for p in points], [p[0] for p in points])},
             xlabel=f"mean layers per token (of {depth})", ylabel="held-out loss (nats/token)",
             title="early exit: quality vs depth used", hline=full_loss * (1 + TOLERANCE))
    table = [["threshold", "held-out loss", "mean layers per token", "share of depth"]]
    table += [["never" if t > 1 else t, loss, layers, layers / depth] for t, (loss, layers) in curve.items()]
    return Outcome(
        value=min(keeping) / depth,
        checks={"the first exit alone (threshold 0) is worse than the full model": curve[0.0][0] > full_loss},
        detail={"steps": shape["steps"], "layers": depth, "tokens": int(x[:shape["rows"]].numel()),
                "full_loss": full_loss, "curve": {str(t): {"loss": lo, "layers": la} for t, (lo, la) in curve.items()}},
        table=table,
    )


register(Repro(
    name="early-exit",
    claim="with confidence-based early exit a decoder keeps its full quality (held-out loss within 1%) while "
          "running a fraction of its layers per token",
    paper="Elbayad et al., Depth-Adaptive Transformer (ICLR 2020)",
    metric="share of the layers used at full quality",
    threshold=0.8,
    direction="max",
    run=run,
    item=10,
))
