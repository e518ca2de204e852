"""Quality vs kept fraction of structured pruning: held-out loss of a small trained model pruned to each fraction.

A Llama-style model (the demo's shape with heads of 32: 4 layers, d_model 128, 4 heads, d_ff 352)
is trained for a few minutes on part of the standard library's code (the embedded corpus) with a
byte-level BPE tokenizer learned from it. Copies of it are then pruned, with no fine-tuning after,
to each kept fraction by ``formerkit.compress.prune.prune`` (Michel et al.'s gate-gradient
importance, scored again before each of ``--steps`` steps on training windows): heads only, neurons
only, and both; and, as the baseline, both removed at random (the same count in every layer).
Each is evaluated on the held-out split. The PNG plots held-out loss against kept fraction.

    python benchmarks/prune_curve.py [--steps-train 300] [--out docs/images/prune_curve.png] [--quick]
"""

from __future__ import annotations

import argparse
import copy
import io
import json
import math
import shutil
import sysconfig
import tempfile
import time
from pathlib import Path

import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

import formerkit as fk
from formerkit.compress.prune import prune, prune_heads, prune_neurons
from formerkit.data import WindowBatches, eval_batches, load_corpus, resolve_source
from formerkit.hardware import describe_machine
from formerkit.repro.trained import held_out_loss
from formerkit.tokenizers import ByteTokenizer, train_bpe

FULL = dict(model=dict(n_layers=4, d_model=128, n_heads=4, n_kv_heads=None, d_ff=352), seq_len=128, batch=8,
            vocab=2048, packages=("json", "email", "http"), lr=3e-3, fractions=(1.0, 0.75, 0.5, 0.25),
            score_batches=2, eval_batches=8)
QUICK = dict(model=dict(n_layers=2, d_model=32, n_heads=4, n_kv_heads=None, d_ff=32), seq_len=32, batch=4,
             vocab=None, packages=("tomllib",), lr=3e-3, fractions=(1.0, 0.5), score_batches=1, eval_batches=2)
MODES = ("heads", "neurons", "both", "both, random")


def corpus(work: Path, packages: tuple[str, ...], vocab: int | None):
    """Tokenizer and token corpus of the given standard-library packages (byte tokenizer when vocab is None)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    for package in packages:
        shutil.copytree(root / package, work / "src" / package, ignore=shutil.ignore_patterns("__pycache__"))
    source = resolve_source(str(work / "src"))
    tokenizer = ByteTokenizer() if vocab is None else train_bpe(source.documents(), vocab)
    return tokenizer, load_corpus(source, tokenizer, cache_dir=work / "cache", val_fraction=0.1)


def train_model(cfg: fk.ModelConfig, data: WindowBatches, steps: int, lr: float) -> fk.Transformer:
    """AdamW with warmup and cosine decay, gradient clipping at 1; returns the model in eval mode (0 steps: random)."""
    torch.manual_seed(0)
    model = fk.Transformer(cfg).train()
    if not steps:
        return model.eval()  # no optimizer: constructing one first imports torch._dynamo (seconds)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1)
    warmup = max(1, steps // 20)
    for step in range(steps):
        scale = (step + 1) / warmup if step < warmup else 0.5 * (1 + math.cos(math.pi * (step - warmup) / steps))
        for group in optimizer.param_groups:
            group["lr"] = lr * scale
        x, y = data.batch(step)
        loss = torch.nn.functional.cross_entropy(model(x).logits.flatten(0, 1), y.flatten())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
    return model.eval()


def prune_randomly(model: fk.Transformer, fraction: float, seed: int) -> fk.Transformer:
    """The baseline: keep ``fraction`` of the heads and of the neurons of every layer, chosen at random."""
    g = torch.Generator().manual_seed(seed)
    heads, neurons = {}, {}
    for i, block in enumerate(model.blocks):
        for chosen, n in ((heads, block.attn.n_heads), (neurons, block.mlp.fc_out.in_features)):
            remove = min(n - 1, round(n * (1 - fraction)))
            chosen[i] = torch.randperm(n, generator=g)[:remove].tolist()
    return prune_neurons(prune_heads(model, heads), neurons)


def plot(results: dict[str, list[dict]], full_loss: float, path: Path, title: str) -> None:
    """Held-out loss against kept fraction, one line per mode, into a PNG at ``path``."""
    fig = Figure(figsize=(7, 4.5), dpi=90)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    styles = {"heads": "o-", "neurons": "s-", "both": "^-", "both, random": "x--"}
    for mode, rows in results.items():
        ax.plot([r["kept"] for r in rows], [r["loss"] for r in rows], styles[mode], label=mode)
    ax.axhline(full_loss, color="gray", linewidth=0.8, linestyle=":", label="unpruned")
    ax.invert_xaxis()
    ax.set_xlabel("kept fraction (of heads / neurons)")
    ax.set_ylabel("held-out loss (nats/token)")
    ax.set_title(title, fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(buffer.getvalue())


def main(argv: list[str] | None = None) -> dict:
    """Train, prune to each kept fraction in each mode, evaluate, plot; print a table; return the results."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps-train", type=int, default=300, help="training steps of the model (default: 300)")
    parser.add_argument("--steps", type=int, default=2, help="pruning steps per run (default: 2)")
    parser.add_argument("--out", default="docs/images/prune_curve.png", help="PNG path (default: %(default)s)")
    parser.add_argument("--quick", action="store_true", help="a tiny model and corpus, seconds (for tests)")
    args = parser.parse_args(argv)
    shape = QUICK if args.quick else FULL
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:  # the token arrays are memory-mapped from here
        tokenizer, tokens = corpus(Path(tmp), shape["packages"], shape["vocab"])
        out = curve(args, shape, tokenizer, tokens, start)
    print(f"machine: {out['machine']}")
    print(f"trained {args.steps_train} steps in {out['train_seconds']:.0f} s; held-out loss {out['full_loss']:.4f}; "
          f"{out['params']:,} parameters")
    results = out["results"]
    print("| kept | " + " | ".join(MODES) + " | params (both) |")
    print("|---" * (len(MODES) + 2) + "|")
    for i, fraction in enumerate(shape["fractions"]):
        losses = " | ".join(f"{results[mode][i]['loss']:.4f}" for mode in MODES)
        print(f"| {fraction:.3f} | {losses} | {results['both'][i]['params']:,} |")
    print(f"total {out['seconds']:.0f} s; plot: {args.out}")
    print(json.dumps({mode: [(r["kept"], r["n_heads"], r["d_ff"]) for r in rows] for mode, rows in results.items()}))
    return out


def curve(args: argparse.Namespace, shape: dict, tokenizer, tokens, start: float) -> dict:
    """Train the model, prune copies to each fraction in each mode, evaluate and plot; return the results."""
    cfg = fk.ModelConfig.from_preset("llama", **shape["model"], vocab_size=tokenizer.vocab_size,
                                     max_seq_len=shape["seq_len"], tie_embeddings=True)
    train = WindowBatches(tokens.train, batch_size=shape["batch"], seq_len=shape["seq_len"], seed=0)
    print(f"corpus ready ({len(tokens.train):,} training tokens) at {time.perf_counter() - start:.0f} s", flush=True)
    model = train_model(cfg, train, args.steps_train, shape["lr"])
    trained = time.perf_counter()
    print(f"trained at {trained - start:.0f} s", flush=True)
    evaluation = eval_batches(tokens.val, batch_size=shape["batch"], seq_len=shape["seq_len"],
                              max_batches=shape["eval_batches"])
    scoring = [{"input_ids": x, "labels": x}  # training windows the model has not seen; the model shifts labels
               for x, _ in (train.batch(10**6 + i) for i in range(shape["score_batches"]))]
    full_loss = held_out_loss(model, evaluation)
    params = sum(p.numel() for p in model.parameters())
    results: dict[str, list[dict]] = {mode: [] for mode in MODES}
    for fraction in shape["fractions"]:
        for mode in MODES:
            pruned = copy.deepcopy(model)
            if mode == "both, random":
                prune_randomly(pruned, fraction, seed=0)
            else:
                prune(pruned, scoring, heads=fraction if mode != "neurons" else 1.0,
                      neurons=fraction if mode != "heads" else 1.0, steps=args.steps)
            results[mode].append({"kept": fraction, "loss": held_out_loss(pruned, evaluation),
                                  "params": sum(p.numel() for p in pruned.parameters()),
                                  "n_heads": pruned.config.n_heads, "d_ff": pruned.config.d_ff})
            print(f"{mode} {fraction}: {results[mode][-1]}", flush=True)
    machine = describe_machine()
    out = {"machine": machine, "config": dict(shape["model"]), "vocab": tokenizer.vocab_size,
           "train_steps": args.steps_train, "train_seconds": trained - start, "full_loss": full_loss,
           "params": params, "results": results, "seconds": time.perf_counter() - start}
    plot(results, full_loss, Path(args.out), f"pruning without fine-tuning: {cfg.n_layers} layers, d_model "
                                             f"{cfg.d_model}, {params / 1e6:.2f}M params, {args.steps_train} steps")
    return out


if __name__ == "__main__":
    main()
