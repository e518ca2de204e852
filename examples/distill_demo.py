"""Distillation demo: a student at under half the teacher's parameters, trained with and without the teacher.

The task is next-byte prediction on the embedded corpus (the Python standard library's source, byte
tokenizer). The teacher (a 4-layer GPT, d_model 128) is trained first with ``formerkit train``'s loop
(or reused from OUT/teacher when that run is finished). Then two students of the same shape and the
same initialization (2 layers, d_ff 384: about 45% of the teacher's parameters) train for the same
steps on the same batches with the same optimizer and schedule: one on the task loss alone, one with
logit KD plus MiniLM's last-layer attention loss (``formerkit.compress.distill``). With
--from-teacher a third student is distilled the same way but starts from the teacher's layers 2
and 4, each keeping its 384 most important feed-forward neurons (``formerkit.compress.distill_init``).
All are scored on the same held-out windows: next-byte accuracy, loss, perplexity and bits per byte.

    python examples/distill_demo.py [--teacher-steps 500] [--steps 250] [--from-teacher] [--out runs/distill-demo]

Results are in docs/distillation.md.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

from formerkit.checkpoints import from_pretrained
from formerkit.compress.distill import Distiller, DistillSettings, distill
from formerkit.compress.distill_init import init_from_teacher
from formerkit.data import eval_batches, resolve_source
from formerkit.hardware import describe_machine
from formerkit.model import Transformer
from formerkit.tokenizers import load_tokenizer
from formerkit.train import TrainConfig, train
from formerkit.train.config import OptimSection
from formerkit.train.distributed import DistInfo
from formerkit.train.setup import build_objective

TEACHER = {"preset": "gpt2", "n_layers": 4, "d_model": 128, "n_heads": 4, "d_ff": 512, "max_seq_len": 64,
           "attn_dropout": 0.0, "resid_dropout": 0.0, "embed_dropout": 0.0}
STUDENT = {"n_layers": 2, "d_ff": 384}  # the teacher's config with these changed
SEQ_LEN, BATCH, LR, EVAL_BATCHES = 64, 16, 3e-3, 32


def data_config(args: argparse.Namespace, steps: int, run_dir: Path, tokenizer: str = "byte") -> TrainConfig:
    """One config for the teacher's run and the students' data: same corpus, windows and evaluation batches."""
    return TrainConfig.from_dict({
        "model": TEACHER,
        "data": {"tokenizer": tokenizer},
        "train": {"steps": steps, "batch_size": BATCH, "seq_len": SEQ_LEN, "precision": "fp32", "attention": "sdpa",
                  "seed": args.seed, "threads": args.threads},
        "optim": {"lr": LR, "warmup_steps": max(1, steps // 20)},
        "eval": {"every": steps, "batches": EVAL_BATCHES},
        "checkpoint": {"run_dir": str(run_dir), "every": steps},
        "log": {"every": 50, "progress": False, "tensorboard": False, "samples": 0},
    })


@torch.no_grad()
def next_token_accuracy(model: Transformer, val_tokens) -> float:
    """Share of held-out positions whose most likely next token is the true one (the evaluation windows)."""
    correct = count = 0
    for x, y in eval_batches(val_tokens, batch_size=BATCH, seq_len=SEQ_LEN, max_batches=EVAL_BATCHES):
        correct += int((model(x).logits.argmax(-1) == y).sum())  # (B, T) hits
        count += y.numel()
    return correct / count


def score(model: Transformer, objective) -> dict[str, float]:
    """Held-out accuracy, loss, perplexity and bits per byte of ``model``."""
    model.eval()
    return {"accuracy": next_token_accuracy(model, objective.val_tokens),
            **objective.evaluate(model, torch.device("cpu"), lambda: torch.autocast("cpu", enabled=False))}


def main() -> None:
    """Train the teacher, the plain student and the distilled student; print and save the comparison."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--teacher-steps", type=int, default=500)
    parser.add_argument("--steps", type=int, default=250, help="steps of each student")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--alpha", type=float, default=1.0, help="weight of KD against the task loss")
    parser.add_argument("--attention-weight", type=float, default=1.0)
    parser.add_argument("--from-teacher", action="store_true",
                        help="also distill a student started from the teacher's layers 2 and 4")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (1: steadiest on a busy machine)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("runs/distill-demo"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    result = train(data_config(args, args.teacher_steps, args.out / "teacher"))  # reuses a finished run
    teacher_seconds = time.perf_counter() - start if result.tokens_per_s else float("nan")
    teacher = from_pretrained(result.run_dir)
    tokenizer = load_tokenizer(result.run_dir)
    cfg = data_config(args, args.steps, args.out / "students", tokenizer=str(result.run_dir / "tokenizer"))
    objective, _, _ = build_objective(cfg, tokenizer, resolve_source(None), DistInfo(0, 1, 0, torch.device("cpu")))
    rows = {"teacher": {"parameters": teacher.num_parameters(), "steps": args.teacher_steps,
                        "seconds": teacher_seconds, **score(teacher, objective)}}
    distilled = DistillSettings(args.temperature, args.alpha, args.attention_weight)
    runs = {"student, no teacher": (DistillSettings(alpha=0.0), False),
            "student, distilled": (distilled, False)}
    if args.from_teacher:
        runs["student, distilled, from teacher layers"] = (distilled, True)
    for name, (settings, from_teacher) in runs.items():
        torch.manual_seed(args.seed)  # the same initialization for the students started at random
        student = Transformer(teacher.config.replace(**STUDENT))
        if from_teacher:
            init_from_teacher(student, teacher)
        optim = OptimSection(lr=LR, warmup_steps=max(1, args.steps // 20))
        run = distill(Distiller(teacher, student, settings), objective, steps=args.steps, optim=optim,
                      log_every=100, log=lambda line, name=name: print(f"[{name}] {line}", flush=True))
        rows[name] = {"parameters": student.num_parameters(), "steps": args.steps, "seconds": run.seconds,
                      **score(student, objective)}
    t = rows["teacher"]
    print(f"\nmachine: {describe_machine()}; total {time.perf_counter() - start:.0f} s")
    print("| model | parameters | steps | train s | next-byte accuracy | % of teacher's | val loss | perplexity "
          "| bits/byte |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, r in rows.items():
        seconds = "reused" if math.isnan(r["seconds"]) else round(r["seconds"])
        print(f"| {name} | {r['parameters']:,} ({r['parameters'] / t['parameters']:.0%}) | {r['steps']} | "
              f"{seconds} | {r['accuracy']:.4f} | {r['accuracy'] / t['accuracy']:.1%} | {r['loss']:.4f} | "
              f"{r['perplexity']:.3f} | {r['bits_per_byte']:.4f} |")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
