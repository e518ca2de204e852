"""Quantizable attention (Bondarenko et al., "Quantizable Transformers: Removing Outliers by Helping Attention Heads
Do Nothing", NeurIPS 2023).

The paper traces the activation outliers that make Transformers hard to quantise to attention heads
learning to "do nothing", and removes them with the clipped softmax or gated attention. Here the same
small Llama-style model is trained three ways by formerkit's trainer on the standard library's
email package (byte tokens; same data, seed and steps): ``attn_type: softmax``, ``attn_type: clipped``
(gamma -0.03, zeta 1) and ``attn_gate: true``. For each: the outlier statistics of the block outputs
(largest magnitude, kurtosis) and the held-out loss in fp32 and with int8 weights and per-tensor int8
activations (W8A8, ranges calibrated on training windows), whose difference is the quantisation gap.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from formerkit.compress.act_quant import activation_outliers, calibrate_activation_ranges, quantized_activations
from formerkit.layers.quantized import quantize_int8
from formerkit.model import Transformer
from formerkit.repro.common import bar_png
from formerkit.repro.registry import Outcome, Repro, register
from formerkit.repro.trained import held_out_loss, train_on_package, windows

VARIANTS = {"softmax": [], "clipped": ["--model.attn_type", "clipped"], "gated": ["--model.attn_gate", "true"]}
FULL = dict(layers=4, d_model=128, heads=4, seq_len=128, batch=16, package="email", eval_batches=8, steps=600)
QUICK = dict(layers=1, d_model=32, heads=2, seq_len=32, batch=4, package="json", eval_batches=2, steps=3)
MIN_GAP = 0.005  # nats: below this the softmax model shows no quantisation problem to remove


def measure(model: Transformer, calibration: list[torch.Tensor], held_out: list) -> dict[str, float]:
    """Outlier statistics of ``model`` and its held-out loss in fp32 and in W8A8 (the model is quantised after)."""
    row = activation_outliers(model, calibration)
    row["fp32"] = held_out_loss(model, held_out)
    quantize_int8(model)
    with quantized_activations(model, calibrate_activation_ranges(model, calibration)):
        row["w8a8"] = held_out_loss(model, held_out)
    row["gap"] = row["w8a8"] - row["fp32"]
    return row


def run(seed: int, quick: bool, out_dir: Path) -> Outcome:
    """Train the three variants, measure each; the value is the best variant's W8A8 gap over softmax's."""
    shape = QUICK if quick else FULL
    size = dict(batch=shape["batch"], seq_len=shape["seq_len"])
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:  # the training runs and the token cache
        work = Path(tmp)
        held_out = windows(shape["package"], work / "cache", max_batches=shape["eval_batches"], **size)
        calibration = [x for x, _ in windows(shape["package"], work / "cache", max_batches=2, split="train", **size)]
        for name, options in VARIANTS.items():
            model = train_on_package(work / name, shape["package"], work / "cache", layers=shape["layers"],
                                     d_model=shape["d_model"], heads=shape["heads"], steps=shape["steps"],
                                     seed=seed, extra=options, **size)
            rows[name] = measure(model, calibration, held_out)
    bar_png(out_dir / "quantizable_attention.png",
            {"largest |block output|": {n: r["max_inf_norm"] for n, r in rows.items()},
             "W8A8 gap (nats)": {n: r["gap"] for n, r in rows.items()}})
    soft = rows["softmax"]
    best = min(("clipped", "gated"), key=lambda n: rows[n]["gap"])
    table = [["attention", "max |block output|", "mean kurtosis", "held-out loss fp32", "W8A8", "W8A8 gap"]]
    table += [[n, r["max_inf_norm"], r["mean_kurtosis"], r["fp32"], r["w8a8"], r["gap"]] for n, r in rows.items()]
    return Outcome(
        value=rows[best]["gap"] / soft["gap"] if soft["gap"] > 0 else float("inf"),
        checks={f"the softmax model loses >= {MIN_GAP} nats to W8A8 (there is a gap to close)": soft["gap"] >= MIN_GAP,
                f"the {best} model's largest block output is below the softmax model's":
                    rows[best]["max_inf_norm"] < soft["max_inf_norm"]},
        detail={"steps": shape["steps"], "package": shape["package"], "best_variant": best, "variants": rows},
        table=table,
    )


register(Repro(
    name="quantizable-attention",
    claim="clipped softmax or gated attention reduce activation outliers and the int8 (W8A8) quantisation gap",
    paper="Bondarenko et al., Quantizable Transformers: Removing Outliers by Helping Attention Heads Do Nothing "
          "(NeurIPS 2023)",
    metric="W8A8 gap of the better variant / softmax's",
    threshold=0.5,
    direction="max",
    run=run,
    item=7,
))
