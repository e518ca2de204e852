"""Dense vs mixture of experts at equal active parameters: loss per step and per second on the embedded corpus.

Both runs are ``formerkit train`` (the product path: token cache, windows, AdamW, warmup + cosine,
evaluation, checkpoint) on the same data in the same order, from the same seed, with half the
demo's widths (examples/demo.yaml: Llama-style, 4 layers, here d_model 64, SwiGLU, a 1,024-token BPE),
so that both runs take about 5 minutes on a loaded 2-core machine. The dense model's feed-forward
is d_ff 176; the mixture of experts has ``--experts`` experts of width 176 / k, k = 2
per token, so each token runs as many feed-forward weights as in the dense model (equal active
parameters; the router adds d_model * experts per layer) while the model holds ``experts / k``
times the feed-forward weights. The MoE run adds the load-balancing loss (coefficient 0.01) and the
router z-loss (0.001) to its training loss; the validation loss is cross-entropy alone for both.

Reported: parameters (total, active per token), seconds per training step (evaluations left out),
and the validation loss at each evaluation with the seconds of training until then (steps x seconds
per step), so the loss per step and per second can be read side by side.

    python benchmarks/moe_train.py [--steps 200] [--experts 8] [--threads 2] [--source stdlib]
    python benchmarks/moe_train.py --timing-rounds 40   # step times only, the variants taking turns

The two runs follow each other, so on a shared machine their seconds per step differ by the load
of the moment as much as by the models; ``--timing-rounds`` measures the step times with the two
models taking turns, step by step, in one process.
"""

from __future__ import annotations

import argparse
import tempfile
from itertools import pairwise
from pathlib import Path

import torch

from formerkit.checkpoints import from_pretrained
from formerkit.hardware import describe_machine
from formerkit.layers.moe import MoE
from formerkit.train import TrainConfig, train
from formerkit.train.logging import METRICS_FILE, read_metrics

SHAPE = {"preset": "llama", "n_layers": 4, "d_model": 64, "n_heads": 2, "n_kv_heads": 2, "d_ff": 176,
         "max_seq_len": 128, "tie_embeddings": True}
QUICK = {"preset": "llama", "n_layers": 2, "d_model": 32, "n_heads": 2, "n_kv_heads": 2, "d_ff": 64,
         "max_seq_len": 64, "tie_embeddings": True}
TOP_K = 2
LOG_EVERY = 10


def variants(shape: dict, experts: int) -> dict[str, dict]:
    """The two model sections: dense, and ``experts`` experts of width d_ff / k with k = 2 (equal active size)."""
    return {"dense": dict(shape),
            f"moe {experts}x top-{TOP_K}": {**shape, "n_experts": experts, "experts_per_token": TOP_K,
                                            "moe_d_ff": shape["d_ff"] // TOP_K}}


def parameter_counts(model: torch.nn.Module) -> tuple[int, int]:
    """(total, active per token) parameters: active counts k of each sparse layer's experts."""
    total = model.num_parameters()
    active = total
    for module in model.modules():
        if isinstance(module, MoE):
            stacked = module.w_in.numel() + module.w_out.numel()
            active -= stacked - stacked * module.top_k // module.n_experts
    return total, active


def run(name: str, model_cfg: dict, args: argparse.Namespace, work: Path) -> dict:
    """Train one variant; return its parameters, seconds per step and validation losses (with seconds trained)."""
    cfg = TrainConfig.from_dict({
        "model": model_cfg,
        "data": {"source": args.source, "tokenizer": args.tokenizer, "vocab_size": args.vocab},
        "train": {"steps": args.steps, "batch_size": args.batch, "seq_len": args.seq_len, "precision": "fp32",
                  "attention": "sdpa", "threads": args.threads, "seed": 0},
        "optim": {"lr": 4e-3, "warmup_steps": max(1, args.steps // 20), "kernel": "foreach"},
        "eval": {"every": max(1, args.steps // args.evals), "batches": 4},
        "checkpoint": {"run_dir": str(work / name.replace(" ", "_")), "every": args.steps, "resume": False},
        "log": {"every": LOG_EVERY, "progress": False, "tensorboard": False, "samples": 0},
    })
    result = train(cfg)
    records = read_metrics(result.run_dir / METRICS_FILE)
    logged = [r for r in records if r["split"] == "train"]
    evals = [r for r in records if r["split"] == "val"]
    spans = [(b["step"] - a["step"], b["time"] - a["time"]) for a, b in pairwise(logged)
             if not any(a["time"] <= e["time"] <= b["time"] for e in evals)]  # evaluation left out
    per_step = sum(t for _, t in spans) / sum(n for n, _ in spans)
    losses = [(r["step"], r["step"] * per_step, r["loss"]) for r in evals]
    total, active = parameter_counts(from_pretrained(result.run_dir))
    return {"name": name, "total": total, "active": active, "per_step": per_step, "evals": losses}


def interleaved_step_times(shape: dict, experts: int, args: argparse.Namespace, rounds: int) -> dict[str, float]:
    """Median seconds of one training step (forward, backward, AdamW) of each variant, the variants taking
    turns step by step on the same random batch, so a shared machine's changing load falls on both alike."""
    import statistics
    import time

    from formerkit.config import ModelConfig
    from formerkit.model import Transformer
    from formerkit.train.objectives import with_router_losses

    torch.set_num_threads(args.threads)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq_len), generator=torch.Generator().manual_seed(0))
    models, times = {}, {}
    for name, model_cfg in variants(shape, experts).items():
        fields = {k: v for k, v in model_cfg.items() if k != "preset"}
        model = Transformer(ModelConfig.from_preset(model_cfg["preset"], vocab_size=args.vocab, **fields))
        models[name] = (model, torch.optim.AdamW(model.parameters(), lr=1e-3, foreach=True))
        times[name] = []
    for _ in range(rounds):
        for name, (model, optimizer) in models.items():
            start = time.perf_counter()
            loss = with_router_losses(model(ids, labels=ids).loss, model, (0.01, 0.001))
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t[1:]) for name, t in times.items()}


def report(rows: list[dict]) -> str:
    """The markdown tables: sizes and speed, then validation loss per step and per second."""
    dense = rows[0]
    lines = ["| model | parameters | active per token | s/step | vs dense | final val loss |",
             "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        lines.append(f"| {r['name']} | {r['total']:,} | {r['active']:,} | {r['per_step']:.3f} | "
                     f"{r['per_step'] / dense['per_step']:.2f}x | {r['evals'][-1][2]:.3f} |")
    lines += ["", "| step | " + " | ".join(f"{r['name']}: val loss (s)" for r in rows) + " |",
              "| ---: | " + " | ".join("---:" for _ in rows) + " |"]
    for i, (step, _, _) in enumerate(dense["evals"]):
        cells = [f"{r['evals'][i][2]:.3f} ({r['evals'][i][1]:.0f} s)" for r in rows if i < len(r["evals"])]
        lines.append(f"| {step} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    """Run both variants, print the report and return each variant's numbers (see ``run``)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--evals", type=int, default=4, help="evaluations per run (the last at the end)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--source", default=None, help="text source (default: the embedded corpus)")
    parser.add_argument("--tokenizer", default="bpe")
    parser.add_argument("--vocab", type=int, default=1024)
    parser.add_argument("--quick", action="store_true", help="a tiny model (for tests)")
    parser.add_argument("--timing-rounds", type=int, default=0,
                        help="only time training steps: this many steps of each variant, taking turns")
    args = parser.parse_args(argv)
    shape = QUICK if args.quick else SHAPE
    if args.timing_rounds:
        times = interleaved_step_times(shape, args.experts, args, args.timing_rounds)
        dense = next(iter(times.values()))
        text = f"{describe_machine()}; median s/step of {args.timing_rounds} interleaved steps of " \
               f"{args.batch} x {args.seq_len} tokens\n" + "\n".join(
                   f"{name}: {t:.4f} s ({t / dense:.2f}x dense)" for name, t in times.items())
        print(text)
        return [{"name": name, "per_step": t} for name, t in times.items()]
    with tempfile.TemporaryDirectory() as tmp:
        rows = [run(name, model_cfg, args, Path(tmp)) for name, model_cfg in variants(shape, args.experts).items()]
    torch.set_num_threads(args.threads)
    text = f"{describe_machine()}; {args.steps} steps of {args.batch} x {args.seq_len} tokens\n\n{report(rows)}"
    print(text)
    return rows


if __name__ == "__main__":
    main()
