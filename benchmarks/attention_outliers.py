"""Activation outliers and the int8 activation-quantisation gap of softmax, clipped-softmax and gated attention.

"Quantizable Transformers" (Bondarenko et al., 2023) traces the outliers that make Transformers hard
to quantise to attention heads learning to "do nothing", and proposes the clipped softmax and gated
attention to remove them. This trains the same small Llama-style model three ways with formerkit's
trainer, on the standard library's email package (byte tokens), same data, seed and steps:
``attn_type: softmax``, ``attn_type: clipped`` and ``attn_gate: true``. For each it reports the
outlier statistics of the block outputs (largest magnitude, kurtosis; ``formerkit.compress.act_quant``)
and the held-out loss in fp32, with int8 activations (per-tensor, calibrated on training windows),
and with int8 weights and activations (W8A8), i.e. the quantisation gap.

    python benchmarks/attention_outliers.py [--steps 600] [--quick]
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
from formerkit.compress.act_quant import (  # noqa: E402
    activation_outliers,
    calibrate_activation_ranges,
    quantized_activations,
)
from formerkit.hardware import describe_machine  # noqa: E402
from small_runs import held_out_loss, train_small, windows  # noqa: E402

VARIANTS = {"softmax": [], "clipped": ["--model.attn_type", "clipped"], "gated": ["--model.attn_gate", "true"]}
FULL = dict(layers=4, d_model=128, heads=4, seq_len=128, batch=16, package="email", eval_batches=8)
QUICK = dict(layers=1, d_model=32, heads=2, seq_len=32, batch=4, package="json", eval_batches=2)


def measure(model: fk.Transformer, calibration: list[torch.Tensor], held_out: list) -> dict[str, float]:
    """Outlier statistics and the held-out loss in fp32, with int8 activations, and with int8 weights too."""
    row = activation_outliers(model, calibration)
    row["fp32"] = held_out_loss(model, held_out)
    with quantized_activations(model, calibrate_activation_ranges(model, calibration)):
        row["a8"] = held_out_loss(model, held_out)
    fk.quantize_int8(model)
    with quantized_activations(model, calibrate_activation_ranges(model, calibration)):
        row["w8a8"] = held_out_loss(model, held_out)
    return row


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    """Train the three variants, measure each, print the table; return {variant: measurements}."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--quick", action="store_true", help="a tiny model and corpus (seconds; for tests)")
    args = parser.parse_args(argv)
    shape = QUICK if args.quick else FULL
    start = time.perf_counter()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        size = dict(batch=shape["batch"], seq_len=shape["seq_len"])
        held_out = windows(shape["package"], work, max_batches=shape["eval_batches"], **size)
        calibration = [x for x, _ in windows(shape["package"], work, max_batches=2, split="train", **size)]
        for name in VARIANTS:
            model = train_small(work / name, shape["package"], layers=shape["layers"], d_model=shape["d_model"],
                                heads=shape["heads"], steps=args.steps, extra=VARIANTS[name], **size)
            results[name] = measure(model, calibration, held_out)
    print(describe_machine())
    print(f"{args.steps} steps each, {shape['layers']} layers, d_model {shape['d_model']}; "
          f"{time.perf_counter() - start:.0f} s in all")
    print("| attention | max abs block output | mean kurtosis | max layer kurtosis | held-out loss fp32 | "
          "int8 activations | W8A8 | W8A8 gap |")
    print("|---|---|---|---|---|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {r['max_inf_norm']:.1f} | {r['mean_kurtosis']:.1f} | {r['max_layer_kurtosis']:.1f} | "
              f"{r['fp32']:.4f} | {r['a8']:.4f} | {r['w8a8']:.4f} | {r['w8a8'] - r['fp32']:+.4f} |")
    return results


if __name__ == "__main__":
    main()
