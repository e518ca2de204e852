"""Held-out perplexity vs KV-cache budget for each eviction policy (sliding, sinks, H2O, TOVA).

A Llama-style model (RoPE; 4 layers, d_model 128, 4 heads, d_ff 352, context 256) is trained for a
few minutes on part of the standard library's code (the embedded corpus) with a byte-level BPE
tokenizer learned from it, or loaded from ``--model-dir`` when a previous run saved it there.
Held-out windows of the full context are then scored token by token as generation sees them
(``policy_logits``: one decode step per token, eviction after each) under every policy at budgets of
1/2, 1/4, 1/8 and 1/16 of the context, next to the full cache. Two perplexities per run: over every
predicted token of the window, and over its last quarter, where every budget binds.

    python benchmarks/cache_policy.py [--steps-train 500] [--windows 32] [--model-dir DIR]
                                      [--out docs/images/cache_policy.png]
"""

from __future__ import annotations

import argparse
import io
import json
import math
import shutil
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

sys.path.insert(0, str(Path(__file__).resolve().parent))
import formerkit as fk  # noqa: E402
from formerkit.data import WindowBatches, eval_batches, load_corpus, resolve_source  # noqa: E402
from formerkit.generate.cache_policy import CachePolicy  # noqa: E402
from formerkit.generate.eviction import policy_logits  # noqa: E402
from formerkit.hardware import describe_machine  # noqa: E402
from formerkit.tokenizers import ByteTokenizer, train_bpe  # noqa: E402
from prune_curve import train_model  # noqa: E402  (the same short training loop)

FULL = dict(model=dict(n_layers=4, d_model=128, n_heads=4, n_kv_heads=None, d_ff=352), seq_len=256, batch=8,
            vocab=2048, packages=("json", "email", "http"), lr=3e-3, windows=32, fractions=(2, 4, 8, 16))
QUICK = dict(model=dict(n_layers=2, d_model=32, n_heads=4, n_kv_heads=None, d_ff=32), seq_len=32, batch=4,
             vocab=None, packages=("tomllib",), lr=3e-3, windows=4, fractions=(2, 4))
POLICIES = ("sliding", "sinks", "h2o", "tova")


def corpus(work: Path, packages: tuple[str, ...], tokenizer):
    """The token corpus of the given standard-library packages; the tokenizer is learned from them when None."""
    root = Path(sysconfig.get_paths()["stdlib"])
    for package in packages:
        shutil.copytree(root / package, work / "src" / package, ignore=shutil.ignore_patterns("__pycache__"))
    source = resolve_source(str(work / "src"))
    if tokenizer is None:
        tokenizer = train_bpe(source.documents(), 2048)
    return tokenizer, load_corpus(source, tokenizer, cache_dir=work / "cache", val_fraction=0.1)


def perplexities(model: fk.Transformer, windows: torch.Tensor, policy: CachePolicy) -> tuple[float, float]:
    """Perplexity of windows (N, T) under ``policy``: over every predicted token, and over the last quarter."""
    logits = policy_logits(model, windows, policy)[:, :-1].float()  # (N, T - 1, V)
    nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), windows[:, 1:], reduction="none")  # (N, T - 1)
    last = nll[:, -(windows.shape[1] // 4):]
    return math.exp(float(nll.mean())), math.exp(float(last.mean()))


def plot(results: dict[str, list[dict]], full: float, context: int, path: Path, title: str) -> None:
    """Last-quarter perplexity against the budget's fraction of the context, one line per policy, as a PNG."""
    fig = Figure(figsize=(7, 4.5), dpi=90)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    styles = {"sliding": "o-", "sinks": "s-", "h2o": "^-", "tova": "D-"}
    for kind, rows in results.items():
        ax.plot([r["budget"] / context for r in rows], [r["ppl_last"] for r in rows], styles[kind], label=kind)
    ax.axhline(full, color="gray", linewidth=0.8, linestyle=":", label="full cache")
    ax.set_xscale("log", base=2)
    ax.invert_xaxis()
    ax.set_xlabel(f"cache budget (fraction of the {context}-token context)")
    ax.set_ylabel("held-out perplexity, last quarter of each window")
    ax.set_title(title, fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(buffer.getvalue())


def trained(args: argparse.Namespace, shape: dict, work: Path) -> tuple[fk.Transformer, object, float]:
    """The model, the corpus and the training seconds: loaded from --model-dir when it holds one, else trained."""
    saved = Path(args.model_dir) if args.model_dir else None
    if saved is not None and (saved / "tokenizer.json").exists():
        tokenizer = fk.load_tokenizer(saved)
        _, tokens = corpus(work, shape["packages"], tokenizer)
        return fk.from_pretrained(saved).eval(), tokens, 0.0
    tokenizer, tokens = corpus(work, shape["packages"], ByteTokenizer() if shape["vocab"] is None else None)
    cfg = fk.ModelConfig.from_preset("llama", **shape["model"], vocab_size=tokenizer.vocab_size,
                                     max_seq_len=shape["seq_len"], tie_embeddings=True)
    data = WindowBatches(tokens.train, batch_size=shape["batch"], seq_len=shape["seq_len"], seed=0)
    start = time.perf_counter()
    model = train_model(cfg, data, args.steps_train, shape["lr"])
    seconds = time.perf_counter() - start
    if saved is not None:
        fk.save_pretrained(model, saved)
        tokenizer.save(saved)
    return model, tokens, seconds


def main(argv: list[str] | None = None) -> dict:
    """Train (or load), score held-out windows under every policy and budget, plot; print tables; return results."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps-train", type=int, default=500, help="training steps of the model (default: 500)")
    parser.add_argument("--model-dir", default=None,
                        help="save the trained model and tokenizer here, or load them when it holds them")
    parser.add_argument("--out", default="docs/images/cache_policy.png", help="PNG path (default: %(default)s)")
    parser.add_argument("--windows", type=int, default=None, help="held-out windows scored (default: 32; quick: 4)")
    parser.add_argument("--quick", action="store_true", help="a tiny model and corpus, seconds (for tests)")
    args = parser.parse_args(argv)
    shape = QUICK if args.quick else FULL
    if args.windows is not None:
        shape = {**shape, "windows": args.windows}
    start = time.perf_counter()
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:  # the token arrays are memory-mapped from here
        model, tokens, train_seconds = trained(args, shape, Path(tmp))
        context = shape["seq_len"]
        batches = eval_batches(tokens.val, batch_size=shape["windows"], seq_len=context, max_batches=1)
        windows = batches[0][0]  # (N, T) held-out windows
        full, full_last = perplexities(model, windows, CachePolicy())
        results: dict[str, list[dict]] = {kind: [] for kind in POLICIES}
        for fraction in shape["fractions"]:
            budget = context // fraction
            for kind in POLICIES:
                policy = CachePolicy(kind, budget, sinks=min(4, budget - 1))
                began = time.perf_counter()
                ppl, last = perplexities(model, windows, policy)
                results[kind].append({"budget": budget, "policy": str(policy), "ppl": ppl, "ppl_last": last,
                                      "seconds": time.perf_counter() - began})
                print(f"{policy}: {results[kind][-1]}", flush=True)
    cfg = model.config
    params = sum(p.numel() for p in model.parameters())
    out = {"machine": describe_machine(), "context": context, "windows": int(windows.shape[0]),
           "train_steps": args.steps_train, "train_seconds": train_seconds, "params": params,
           "full": {"ppl": full, "ppl_last": full_last}, "results": results, "seconds": time.perf_counter() - start}
    plot(results, full_last, context, Path(args.out),
         f"KV-cache eviction: {cfg.n_layers} layers, d_model {cfg.d_model}, RoPE, {params / 1e6:.2f}M params, "
         f"{out['windows']} held-out windows of {context}")
    print(f"machine: {out['machine']}")
    print(f"{params:,} parameters; {out['windows']} held-out windows of {context} tokens; full cache: perplexity "
          f"{full:.3f} (all tokens), {full_last:.3f} (last quarter)")
    for key, what in (("ppl", "every predicted token"), ("ppl_last", "the last quarter of each window")):
        print(f"\nperplexity over {what} (full cache: {out['full'][key]:.3f})\n")
        print("| budget | " + " | ".join(POLICIES) + " |")
        print("|---" * (len(POLICIES) + 1) + "|")
        for i, fraction in enumerate(shape["fractions"]):
            cells = " | ".join(f"{results[kind][i][key]:.3f}" for kind in POLICIES)
            print(f"| {context // fraction} (1/{fraction}) | {cells} |")
    print(f"\ntotal {out['seconds']:.0f} s; plot: {args.out}")
    print(json.dumps({kind: [round(r["seconds"], 2) for r in rows] for kind, rows in results.items()}))
    return out


if __name__ == "__main__":
    main()
