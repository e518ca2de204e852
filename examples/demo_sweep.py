"""The sweep behind `make demo`'s recipe: which model, context, vocabulary and learning rate learn most in equal time.

Each candidate trains on the default corpus (the standard library's code) for the same wall-clock
budget: a few timed steps first measure its speed on this machine, the step count is set so the
whole cosine schedule fits the budget, then it trains through the real ``formerkit train`` loop and
reports validation bits per byte and how Python-like its samples are. Equal time, not equal steps,
is the comparison a time-bounded demo needs: a smaller model takes more steps in the same minutes.

    python examples/demo_sweep.py [--minutes 3] [--only NAME,...] [--runs-dir runs/demo-sweep]

Results and the reasoning are in docs/training.md ("The demo recipe").
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import yaml

from formerkit.hardware import describe_machine
from formerkit.train import TrainConfig, train

CONFIG = Path(__file__).with_name("demo.yaml")
# what the candidates vary: the earlier demo recipe (a ~10M GPT-2, batch 16, lr 2e-3, 8192 BPE tokens)
BASE = {"model": {"preset": "gpt2", "n_layers": 6, "d_model": 320, "n_heads": 5, "d_ff": 1280, "max_seq_len": 256,
                  "attn_dropout": 0.0, "resid_dropout": 0.0, "embed_dropout": 0.0},
        "data": {"tokenizer": "bpe", "vocab_size": 8192},
        "train": {"batch_size": 16, "seq_len": 256},
        "optim": {"lr": 2.0e-3},
        "eval": {"batches": 8},
        "log": {"every": 5, "samples": 8, "sample_tokens": 160}}

D192 = ["--model.n_layers", "4", "--model.d_model", "192", "--model.n_heads", "3", "--model.d_ff", "768",
        "--data.vocab_size", "4096"]
LLAMA_D192 = ["--model.preset", "llama", "--model.n_layers", "4", "--model.d_model", "192", "--model.n_heads", "3",
              "--model.n_kv_heads", "3", "--model.d_ff", "512", "--model.max_seq_len", "256",
              "--model.tie_embeddings", "true", "--data.vocab_size", "4096"]
LLAMA_D128 = [*LLAMA_D192, "--model.d_model", "128", "--model.n_heads", "2", "--model.n_kv_heads", "2",
              "--model.d_ff", "352"]
CANDIDATES = {  # name: overrides of examples/demo.yaml
    "d256-L4-v4096": ["--model.n_layers", "4", "--model.d_model", "256", "--model.n_heads", "4",
                      "--model.d_ff", "1024", "--data.vocab_size", "4096"],
    "d192-L4-v4096": ["--model.n_layers", "4", "--model.d_model", "192", "--model.n_heads", "3",
                      "--model.d_ff", "768", "--data.vocab_size", "4096"],
    "d256-L6-v4096": ["--model.n_layers", "6", "--model.d_model", "256", "--model.n_heads", "4",
                      "--model.d_ff", "1024", "--data.vocab_size", "4096"],
    "d320-L6-v8192": ["--model.n_layers", "6", "--model.d_model", "320", "--model.n_heads", "5",
                      "--model.d_ff", "1280", "--data.vocab_size", "8192"],
    "d256-L4-v2048": ["--model.n_layers", "4", "--model.d_model", "256", "--model.n_heads", "4",
                      "--model.d_ff", "1024", "--data.vocab_size", "2048"],
    "d256-L4-v4096-T128": ["--model.n_layers", "4", "--model.d_model", "256", "--model.n_heads", "4",
                           "--model.d_ff", "1024", "--data.vocab_size", "4096", "--train.seq_len", "128",
                           "--train.batch_size", "32"],
    "d256-L4-v4096-lr3e-3": ["--model.n_layers", "4", "--model.d_model", "256", "--model.n_heads", "4",
                             "--model.d_ff", "1024", "--data.vocab_size", "4096", "--optim.lr", "3e-3"],
    "d192-L4-v4096-lr4e-3": [*D192, "--optim.lr", "4e-3"],
    "d192-L4-v4096-B8": [*D192, "--train.batch_size", "8"],
    "d128-L4-v4096": ["--model.n_layers", "4", "--model.d_model", "128", "--model.n_heads", "2",
                      "--model.d_ff", "512", "--data.vocab_size", "4096"],
    "llama-d192-L4-v4096": [*LLAMA_D192],
    "llama-d192-L4-v4096-lr4e-3": [*LLAMA_D192, "--optim.lr", "4e-3"],
    "llama-d192-L4-v4096-lr6e-3": [*LLAMA_D192, "--optim.lr", "6e-3"],
    "llama-d192-L4-v4096-lr4e-3-B8": [*LLAMA_D192, "--optim.lr", "4e-3", "--train.batch_size", "8"],
    "llama-d128-L4-v4096-lr4e-3": [*LLAMA_D128, "--optim.lr", "4e-3"],
    "llama-d192-L4-v4096-lr4e-3-B4": [*LLAMA_D192, "--optim.lr", "4e-3", "--train.batch_size", "4"],
    "llama-d192-L4-v4096-lr3e-3-B8": [*LLAMA_D192, "--optim.lr", "3e-3", "--train.batch_size", "8"],
    "llama-d128-L4-v4096-lr4e-3-B8": [*LLAMA_D128, "--optim.lr", "4e-3", "--train.batch_size", "8"],
    "demo.yaml": [],  # the chosen recipe itself (examples/demo.yaml, not the base above)
    "llama-d256-L4-v4096-lr4e-3-B8": [*LLAMA_D192, "--model.d_model", "256", "--model.n_heads", "4",
                                      "--model.n_kv_heads", "4", "--model.d_ff", "688", "--optim.lr", "4e-3",
                                      "--train.batch_size", "8"],
    "llama-d128-L6-v4096-lr4e-3": [*LLAMA_D128, "--model.n_layers", "6", "--optim.lr", "4e-3"],
}


def step_seconds(cfg: TrainConfig, vocab_size: int, steps: int = 5) -> float:
    """Median seconds of a forward + backward + AdamW step of the candidate's model on random ids (after two)."""
    from formerkit.model import Transformer
    from formerkit.train.optim import build_optimizer

    model = Transformer(cfg.model_config(vocab_size))
    optimizer = build_optimizer(model, cfg.optim)
    x = torch.randint(0, vocab_size, (cfg.train.batch_size, cfg.train.seq_len))
    times = []
    for _ in range(steps + 2):
        start = time.perf_counter()
        loss = F.cross_entropy(model(x).logits.flatten(0, 1), x.flatten())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    return sorted(times[2:])[len(times[2:]) // 2]


def run(name: str, overrides: list[str], minutes: float, runs_dir: Path) -> dict:
    """Train one candidate for ``minutes`` of steps; return its summary and speed."""
    config = CONFIG
    if name != "demo.yaml":
        config = runs_dir / "base.yaml"
        runs_dir.mkdir(parents=True, exist_ok=True)
        config.write_text(yaml.safe_dump(BASE))
    base = [*overrides, "--checkpoint.run_dir", str(runs_dir / name), "--checkpoint.resume", "false",
            "--log.progress", "false"]
    probe = TrainConfig.load(config, base)
    seconds = step_seconds(probe, probe.data.vocab_size)
    steps = max(20, int(minutes * 60 / seconds))
    warmup = max(5, steps // 10)
    cfg = TrainConfig.load(config, [*base, "--train.steps", str(steps), "--optim.warmup_steps", str(warmup),
                                    "--eval.every", str(steps), "--checkpoint.every", str(steps),
                                    "--train.max_minutes", str(minutes * 2)])
    start = time.perf_counter()
    result = train(cfg)
    summary = json.loads((runs_dir / name / "summary.json").read_text())
    return {"name": name, "steps": result.step, "tokens": result.step * cfg.train.batch_size * cfg.train.seq_len,
            "seconds": time.perf_counter() - start, **summary}


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=3.0, help="training budget per candidate")
    parser.add_argument("--only", default="", help="comma-separated candidate names (default: all)")
    parser.add_argument("--runs-dir", default="runs/demo-sweep")
    args = parser.parse_args(argv)
    names = [n for n in args.only.split(",") if n] or list(CANDIDATES)
    print(f"machine: {describe_machine()}")
    rows = [run(name, CANDIDATES[name], args.minutes, Path(args.runs_dir)) for name in names]
    print("\n| candidate | steps | tokens | tok/s | val loss | val bits/byte | lines tokenizable | token-kind TV |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['name']} | {r['steps']} | {r['tokens']:,} | {r['tokens_per_s']:,.0f} | {r['val_loss']:.3f} | "
              f"{r['val_bpb']:.3f} | {r.get('sample_python_line_share', 0):.0%} | "
              f"{r.get('sample_token_kind_tv', 1):.3f} |")
    return rows


if __name__ == "__main__":
    main()
