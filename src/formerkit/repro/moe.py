"""Mixture of experts (Zhou et al., "Brainformers: Trading Simplicity for Efficiency", ICML 2023, and the sparse
mixtures it builds on): at equal active parameters a sparse mixture of experts reaches a lower loss per step.

Two small Llama-style decoders are trained by formerkit's trainer on the standard library's email
package (byte tokens), same data, seed and steps: a dense one (feed-forward width 3 x d_model) and
one whose every feed-forward is 8 experts of half that width with 2 routed per token, so each token
runs as many feed-forward weights as in the dense model (plus the router) while the model holds 4x
them; the load-balancing and router z-losses are added in training. The measure is held-out loss.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from formerkit.repro.common import bar_png
from formerkit.repro.registry import Outcome, Repro, register
from formerkit.repro.trained import held_out_loss, train_on_package, windows

FULL = dict(layers=4, d_model=128, heads=4, seq_len=128, batch=16, package="email", steps=600, eval_batches=8)
QUICK = dict(layers=1, d_model=32, heads=2, seq_len=32, batch=4, package="json", steps=3, eval_batches=1)
EXPERTS, PER_TOKEN = 8, 2


def run(seed: int, quick: bool, out_dir: Path) -> Outcome:
    """Train the dense and the sparse model; the value is the sparse model's held-out loss over the dense one's."""
    shape = QUICK if quick else FULL
    size = dict(batch=shape["batch"], seq_len=shape["seq_len"])
    sparse = ["--model.n_experts", str(EXPERTS), "--model.experts_per_token", str(PER_TOKEN),
              "--model.moe_d_ff", str(3 * shape["d_model"] // PER_TOKEN)]
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        held_out = windows(shape["package"], work / "cache", max_batches=shape["eval_batches"], **size)
        for name, extra in (("dense", []), (f"MoE {EXPERTS}x, top-{PER_TOKEN}", sparse)):
            model = train_on_package(work / name.split()[0], shape["package"], work / "cache", layers=shape["layers"],
                                     d_model=shape["d_model"], heads=shape["heads"], steps=shape["steps"], seed=seed,
                                     extra=extra, **size)
            rows[name] = (model.num_parameters(), held_out_loss(model, held_out))
    (dense_params, dense_loss), (moe_params, moe_loss) = rows.values()
    bar_png(out_dir / "moe.png", {"held-out loss (nats/token)": {n: r[1] for n, r in rows.items()}})
    return Outcome(
        value=moe_loss / dense_loss,
        checks={"the mixture holds more parameters than the dense model": moe_params > dense_params},
        detail={"steps": shape["steps"], "experts": EXPERTS, "per_token": PER_TOKEN,
                "models": {n: {"parameters": p, "loss": lo} for n, (p, lo) in rows.items()}},
        table=[["model", "parameters", "held-out loss"]] + [[n, p, lo] for n, (p, lo) in rows.items()],
    )


register(Repro(
    name="moe",
    claim="a sparse mixture of experts at equal active parameters reaches a lower held-out loss than the dense "
          "model after the same steps",
    paper="Zhou et al., Brainformers: Trading Simplicity for Efficiency (ICML 2023)",
    metric="held-out loss, MoE / dense",
    threshold=0.99,
    direction="max",
    run=run,
    item=12,
))
