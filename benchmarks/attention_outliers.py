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
import contextlib
import io
import sysconfig
import tempfile
import time
from pathlib import Path

import torch

import formerkit as fk
from formerkit.compress.act_quant import activation_outliers, calibrate_activation_ranges, quantized_activations
from formerkit.data import eval_batches, load_corpus, resolve_source
from formerkit.hardware import describe_machine
from formerkit.tokenizers import ByteTokenizer
from formerkit.train import TrainConfig, train

VARIANTS = {"softmax": [], "clipped": ["--model.attn_type", "clipped"], "gated": ["--model.attn_gate", "true"]}
FULL = dict(layers=4, d_model=128, heads=4, seq_len=128, batch=16, package="email", eval_batches=8)
QUICK = dict(layers=1, d_model=32, heads=2, seq_len=32, batch=4, package="json", eval_batches=2)


def train_variant(name: str, shape: dict, steps: int, source: str, work: Path) -> fk.Transformer:
    """Train the model with attention variant ``name`` by ``formerkit.train`` (quietly); return it in eval mode."""
    args = ["--model.preset", "llama", "--model.n_layers", str(shape["layers"]), "--model.d_model",
            str(shape["d_model"]), "--model.n_heads", str(shape["heads"]), "--model.d_ff", str(shape["d_model"] * 3),
            "--model.max_seq_len", str(shape["seq_len"]), *VARIANTS[name],
            "--data.source", source, "--data.tokenizer", "byte", "--data.cache_dir", str(work / "cache"),
            "--train.steps", str(steps), "--train.batch_size", str(shape["batch"]), "--train.seq_len",
            str(shape["seq_len"]), "--train.precision", "fp32", "--train.seed", "0", "--optim.lr", "3e-3",
            "--optim.warmup_steps", str(max(1, steps // 20)), "--eval.every", str(steps), "--checkpoint.every",
            str(steps), "--checkpoint.run_dir", str(work / name), "--log.progress", "false", "--log.samples", "0"]
    with contextlib.redirect_stdout(io.StringIO()):
        train(TrainConfig.load(None, args))
    return fk.from_pretrained(work / name).eval()


@torch.no_grad()
def held_out_loss(model: fk.Transformer, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
    """Mean next-token loss (nats) over (x, y) windows."""
    total = count = 0.0
    for x, y in batches:
        logits = model(x).logits  # (B, T, V)
        total += float(torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="sum"))
        count += y.numel()
    return total / count


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
    source = str(Path(sysconfig.get_paths()["stdlib"]) / shape["package"])
    start = time.perf_counter()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        corpus = load_corpus(resolve_source(source), ByteTokenizer(), cache_dir=work / "cache", val_fraction=0.05)
        held_out = eval_batches(corpus.val, batch_size=shape["batch"], seq_len=shape["seq_len"],
                                max_batches=shape["eval_batches"])
        calibration = [x for x, _ in eval_batches(corpus.train, batch_size=shape["batch"], seq_len=shape["seq_len"],
                                                  max_batches=2)]
        for name in VARIANTS:
            results[name] = measure(train_variant(name, shape, args.steps, source, work), calibration, held_out)
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
