"""How a small model copies repeated text, found with formerkit.interp (docs/interpretability.md).

A two-layer GPT learns to continue repeated random text: each sequence is a random string of
lowercase letters followed by the same string again, so every letter of the second half is the
letter ``half`` positions back. The copy can be done by an induction head (Olsson et al., 2022:
find the previous occurrence of the current letter, read the letter after it) or, since the
period never changes here, by position alone: a head that attends ``half - 1`` positions back
reads the right letter without looking at any content. After training, the script

- scores every head by that pattern (the attention from each second-half position to the
  position just after the same letter in the first half) and writes the best head's pattern as a PNG;
- writes `formerkit inspect`'s report on a fresh repeated string, with a corrupted prompt whose
  first half differs, so the patching map shows where the copied information flows.

    python examples/repeated_text.py --out runs/repeated   # 1500 steps: a few minutes on 2 quiet cores

Prints the loss on the second halves, each head's score, and the files written. (Making the
period vary from sequence to sequence rules the positional shortcut out and calls for real
induction heads, which take this model far more steps to form: 1500 steps left it at chance.)
"""

from __future__ import annotations

import argparse
import random
import string
from pathlib import Path

import torch

import formerkit as fk
from formerkit.interp import run_with_cache
from formerkit.interp.plots import attention_png
from formerkit.interp.report import inspect_report
from formerkit.interp.views import save_html
from formerkit.tokenizers import ByteTokenizer


def repeated(rng: random.Random, half: int) -> str:
    """A random string of ``half`` lowercase letters, twice."""
    text = "".join(rng.choice(string.ascii_lowercase) for _ in range(half))
    return text + text


def batch(tokenizer: ByteTokenizer, rng: random.Random, size: int, half: int) -> torch.Tensor:
    """(size, 2 * half) ids of repeated strings."""
    return torch.tensor([tokenizer.encode(repeated(rng, half)) for _ in range(size)])


def train(model: fk.Transformer, tokenizer: ByteTokenizer, steps: int, half: int, seed: int) -> float:
    """Train on the second halves' next-token loss; return the last 20 steps' mean loss."""
    rng = random.Random(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    losses = []
    model.train()
    for step in range(steps):
        ids = batch(tokenizer, rng, 32, half)
        labels = ids.clone()
        labels[:, :half] = -100  # only the second half can be predicted
        loss = model(ids, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        if (step + 1) % 250 == 0:
            print(f"step {step + 1}: second-half loss {sum(losses[-50:]) / 50:.3f}", flush=True)
    model.eval()
    return sum(losses[-20:]) / len(losses[-20:])


def induction_scores(model: fk.Transformer, ids: torch.Tensor, half: int) -> torch.Tensor:
    """(layers, heads): mean attention from second-half position i to position i - half + 1."""
    _, cache = run_with_cache(model, ids, names_filter=lambda n: n.endswith("hook_pattern"))
    queries = torch.arange(half, 2 * half - 1)
    return torch.stack([cache["pattern", layer][:, :, queries, queries - half + 1].mean((0, 2))
                        for layer in range(model.config.n_layers)])


def main(argv: list[str] | None = None) -> dict:
    """Train, score the heads, write the pictures and the report; return the numbers printed."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/repeated", help="directory for the PNG and the report")
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--half", type=int, default=16, help="letters in each half of a sequence")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.manual_seed(args.seed)
    tokenizer = ByteTokenizer()
    cfg = fk.ModelConfig.from_preset("gpt2", n_layers=2, d_model=64, n_heads=4, d_ff=256, vocab_size=259,
                                     max_seq_len=2 * args.half)
    model = fk.Transformer(cfg)
    loss = train(model, tokenizer, args.steps, args.half, args.seed)
    print(f"second-half loss after {args.steps} steps: {loss:.3f} nats (chance: ln 26 = 3.258)")
    rng = random.Random(args.seed + 1)
    scores = induction_scores(model, batch(tokenizer, rng, 64, args.half), args.half)
    for layer, row in enumerate(scores.tolist()):
        print(f"layer {layer} copy scores: " + "  ".join(f"H{h} {s:.2f}" for h, s in enumerate(row)))
    layer, head = divmod(int(scores.argmax()), cfg.n_heads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    prompt = repeated(rng, args.half)
    corrupted = repeated(rng, args.half)[: args.half] + prompt[args.half:]  # another first half, same second
    _, cache = run_with_cache(model, torch.tensor([tokenizer.encode(prompt)]))
    png = out / "copy_head.png"
    attention_png(cache["pattern", layer][0, head], list(prompt), title=f"layer {layer}, head {head}: copying",
                  path=png)
    report = save_html(inspect_report(model, tokenizer, prompt[:-1], corrupted=corrupted[:-1], top_heads=3,
                                      title="copying repeated text"), out / "report.html")
    print(f"best head: layer {layer}, head {head} (score {scores.max():.2f}); wrote {png} and {report}")
    return {"loss": loss, "scores": scores, "best": (layer, head)}


if __name__ == "__main__":
    main()
