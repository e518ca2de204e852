"""Length extrapolation: train at one length, evaluate at longer ones, for several position schemes.

Trains one small byte-level GPT per position scheme (ALiBi, RoPE, learned, sinusoidal by
default) with ``formerkit.train`` on the embedded corpus (the Python standard library's
source) at ``--train-len`` tokens, everything else equal (sizes, seed, data order, steps),
then evaluates each on the held-out split at every ``--eval-lens`` length: the mean
next-token loss over all positions, and over the positions the model never saw in training
(``>= train-len``). The same number of tokens is evaluated at every length.

Learned positions get ``max_seq_len`` = the longest evaluation length, so the rows past
the training length exist but were never trained: that is the failure extrapolation avoids.

    python examples/length_extrapolation.py [--steps 600] [--train-len 64] [--eval-lens 64,128,256]
        [--positions alibi,rope,learned,sinusoidal] [--source PATH] [--out runs/extrapolation]
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch
import torch.nn.functional as F

import formerkit as fk
from formerkit.data import eval_batches, load_corpus
from formerkit.data.sources import resolve_source
from formerkit.train import TrainConfig, train
from formerkit.train.setup import DEFAULT_CACHE


def run_config(position: str, args: argparse.Namespace) -> TrainConfig:
    """The training run of one position scheme: identical except for ``position``."""
    longest = max(args.eval_lens)
    return TrainConfig.from_dict({
        "model": {"preset": "gpt2", "n_layers": args.layers, "d_model": args.d_model, "n_heads": args.d_model // 32,
                  "d_ff": 4 * args.d_model, "max_seq_len": longest, "position": position,
                  "attn_dropout": 0.0, "resid_dropout": 0.0, "embed_dropout": 0.0},
        "data": {"tokenizer": "byte", "source": args.source, "cache_dir": args.cache_dir},
        "train": {"steps": args.steps, "seq_len": args.train_len, "batch_size": args.batch_size, "seed": 0,
                  "precision": args.precision},
        "optim": {"lr": 2e-3, "warmup_steps": min(100, args.steps // 10)},
        "eval": {"every": args.steps, "batches": 4},
        "checkpoint": {"run_dir": str(Path(args.out) / position), "every": args.steps, "resume": False},
        "log": {"progress": False, "tensorboard": False, "samples": 0},
    })


@torch.no_grad()
def loss_by_length(model: torch.nn.Module, tokens, lengths: list[int], train_len: int,
                   eval_tokens: int) -> dict[int, tuple[float, float | None]]:
    """Per length L: (mean loss over all positions, mean loss over positions >= train_len or None)."""
    model.eval()
    out = {}
    for length in lengths:
        total = beyond = 0.0
        count = beyond_count = 0
        for x, y in eval_batches(tokens, batch_size=8, seq_len=length, max_batches=max(1, eval_tokens // (8 * length))):
            logits = model(x.long()).logits.float()  # (B, L, V)
            loss = F.cross_entropy(logits.transpose(1, 2), y.long(), reduction="none")  # (B, L)
            total, count = total + loss.sum().item(), count + loss.numel()
            unseen = loss[:, train_len:]  # (B, L - train_len): positions never trained on
            beyond, beyond_count = beyond + unseen.sum().item(), beyond_count + unseen.numel()
        out[length] = (total / count, beyond / beyond_count if beyond_count else None)
    return out


def main(argv: list[str] | None = None) -> dict[str, dict[int, tuple[float, float | None]]]:
    """Train and evaluate every scheme; print the table and return {position: {length: (all, beyond)}}."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--positions", default="alibi,rope,learned,sinusoidal")
    parser.add_argument("--train-len", type=int, default=64)
    parser.add_argument("--eval-lens", default="64,128,256")
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--d-model", type=int, default=128)
    parser.add_argument("--precision", default="bf16")
    parser.add_argument("--eval-tokens", type=int, default=32768, help="tokens evaluated at each length")
    parser.add_argument("--source", default=None, help="training text (default: the Python standard library)")
    parser.add_argument("--cache-dir", default=None, help="token cache (default: ~/.cache/formerkit/tokens)")
    parser.add_argument("--out", default="runs/extrapolation")
    args = parser.parse_args(argv)
    args.eval_lens = sorted(int(n) for n in args.eval_lens.split(","))
    results = {}
    for position in args.positions.split(","):
        result = train(run_config(position, args))
        model = fk.from_pretrained(result.run_dir)
        cache = args.cache_dir or DEFAULT_CACHE
        tokens = load_corpus(resolve_source(args.source), fk.load_tokenizer(result.run_dir), cache_dir=cache).val
        results[position] = loss_by_length(model, tokens, args.eval_lens, args.train_len, args.eval_tokens)
    print(f"\nheld-out loss (nats/token) of models trained at length {args.train_len}, {args.steps} steps;"
          f" in brackets: positions >= {args.train_len} only")
    print(f"{'position':>10} " + " ".join(f"{'L=' + str(n):>18}" for n in args.eval_lens))
    for position, by_length in results.items():
        cells = []
        for n in args.eval_lens:
            every, beyond = by_length[n]
            cells.append(f"{every:7.3f} ({beyond:7.3f})" if beyond is not None else f"{every:7.3f}          ")
        print(f"{position:>10} " + " ".join(f"{c:>18}" for c in cells))
    worst = {p: max(v[0] for v in r.values()) for p, r in results.items()}
    finite = all(math.isfinite(v) for v in worst.values())
    print(f"\nall losses finite: {finite}")
    return results


if __name__ == "__main__":
    main()
