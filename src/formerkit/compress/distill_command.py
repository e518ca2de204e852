"""``formerkit distill``: train a smaller student from a teacher checkpoint (see ``formerkit.compress.distill``).

The data pipeline is the trainer's (``formerkit.train.setup.build_objective``) with the teacher's
own tokenizer: windows of a text corpus for causal and masked LM, labeled texts for classification.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Any

import torch
import yaml

from formerkit.checkpoints import from_pretrained, save_pretrained
from formerkit.cliargs import positive_int
from formerkit.compress.distill import Distiller, DistillSettings, check_pair, distill, objective_of
from formerkit.compress.distill_init import init_from_teacher
from formerkit.config import ModelConfig
from formerkit.data import resolve_source
from formerkit.errors import ConfigError
from formerkit.fileio import write_json
from formerkit.model import Transformer
from formerkit.tokenizers import load_tokenizer
from formerkit.train.config import OptimSection, TrainConfig
from formerkit.train.distributed import DistInfo
from formerkit.train.setup import build_objective

_INHERITED = ("kind", "head", "vocab_size", "num_labels", "label_names", "pooling", "pad_token_id",
              "eos_token_id")


def build_student(spec: str | Path, teacher: Transformer, seed: int = 0) -> Transformer:
    """The student ``spec`` names: a checkpoint directory (loaded), or a YAML/JSON file of ModelConfig fields.

    A config file may name a ``preset``; fields it leaves out that fix the task (kind, head, vocab_size,
    num_labels, pooling, special ids) come from the teacher. A new student is initialized from ``seed``.
    """
    path = Path(spec)
    if path.is_dir():
        return from_pretrained(path)
    if not path.is_file():
        raise ConfigError(f"--student {spec} is neither a checkpoint directory nor a config file; give a directory "
                          "saved by formerkit (or Hugging Face) or a YAML/JSON file of model fields (e.g. "
                          "'preset: gpt2' plus n_layers, d_model, ...)")
    try:
        values = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path} is not valid YAML or JSON: {err}") from err
    if not isinstance(values, dict):
        raise ConfigError(f"{path} must hold a mapping of model fields, got {type(values).__name__}")
    preset = values.pop("preset", None)
    inherited = {k: getattr(teacher.config, k) for k in _INHERITED if k not in values}
    base = ModelConfig.from_preset(preset).to_dict() if preset else {}
    cfg = ModelConfig.from_dict({**base, **inherited, **values})
    torch.manual_seed(seed)
    return Transformer(cfg)


def _train_config(args: argparse.Namespace, task: str, teacher: Transformer) -> TrainConfig:
    """The trainer's config for the data side of the run (source, tokenizer, batch shape, seed)."""
    model: dict[str, Any] = {"max_seq_len": max(args.seq_len, teacher.config.max_seq_len)}
    if task == "classify":
        model["num_labels"] = teacher.config.num_labels
    return TrainConfig.from_dict({
        "model": {"preset": "gpt2", "n_layers": 1, "d_model": 8, "n_heads": 1, "d_ff": 8, **model},
        "data": {"source": args.data, "tokenizer": str(args.teacher), "val_fraction": args.val_fraction},
        "train": {"objective": task, "steps": args.steps, "batch_size": args.batch_size, "seq_len": args.seq_len,
                  "seed": args.seed},
        "eval": {"batches": args.eval_batches},
    })


def cmd_distill(args: argparse.Namespace) -> None:
    """``formerkit distill``: distill ``--teacher`` into ``--student``; write the student and its scores to --out."""
    settings = DistillSettings(args.temperature, args.alpha, args.attention_weight, args.relation_heads)
    teacher = from_pretrained(args.teacher)
    student = build_student(args.student, teacher, args.seed)
    task = check_pair(teacher, student)
    if args.init_from_teacher:
        layers = init_from_teacher(student, teacher)
        print(f"student starts from the teacher's layers {', '.join(str(i) for i in layers)}")
    tokenizer = load_tokenizer(args.teacher)
    cfg = _train_config(args, task, teacher)
    info = DistInfo(0, 1, 0, torch.device("cpu"))
    source = None if task == "classify" else resolve_source(cfg.data.source)
    objective, _, line = build_objective(cfg, tokenizer, source, info)
    print(line)
    print(f"teacher {teacher.num_parameters():,} parameters, student {student.num_parameters():,} "
          f"({student.num_parameters() / teacher.num_parameters():.0%}); task {objective_of(teacher)}")
    optim = OptimSection(lr=args.lr, warmup_steps=max(1, min(100, args.steps // 10)))
    result = distill(Distiller(teacher, student, settings), objective, steps=args.steps, optim=optim,
                     log_every=args.log_every)
    out = save_pretrained(student, args.out, tokenizer=tokenizer)
    summary = {"settings": dataclasses.asdict(settings), "steps": result.steps, "seconds": round(result.seconds, 2),
               "train": result.train, "student": result.student, "teacher": result.teacher,
               "student_parameters": student.num_parameters(), "teacher_parameters": teacher.num_parameters()}
    write_json(out / "distill.json", summary)
    print("student " + ", ".join(f"{k} {v:.4f}" for k, v in result.student.items()))
    print("teacher " + ", ".join(f"{k} {v:.4f}" for k, v in result.teacher.items()))
    print(f"wrote the student to {out} ({result.steps} steps in {result.seconds:.0f} s; scores in distill.json)")


def add_distill_command(subparsers: argparse._SubParsersAction) -> None:
    """Register the ``distill`` subcommand on the ``formerkit`` parser's subparsers."""
    p = subparsers.add_parser("distill", help="train a smaller student model from a teacher checkpoint "
                                              "(logit KD and MiniLM attention distillation)")
    p.add_argument("--teacher", required=True, help="teacher checkpoint or run directory (with its tokenizer)")
    p.add_argument("--student", required=True,
                   help="student: a checkpoint directory, or a YAML/JSON file of model fields (preset, n_layers, "
                        "d_model, ...; task fields default to the teacher's)")
    p.add_argument("--out", required=True, help="directory to write the distilled student (and distill.json) to")
    p.add_argument("--data", default=None, help="data source as `formerkit train --data.source` takes it (default: "
                                                "the Python standard library; classify: a JSONL file or "
                                                "synthetic:topics)")
    p.add_argument("--steps", type=positive_int, default=1000, help="optimizer steps")
    p.add_argument("--batch-size", type=positive_int, default=16, help="sequences per step")
    p.add_argument("--seq-len", type=positive_int, default=128, help="tokens per sequence (most tokens, classify)")
    p.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (warmup, then cosine decay)")
    p.add_argument("--temperature", type=float, default=2.0, help="softmax temperature of the logit KD")
    p.add_argument("--alpha", type=float, default=0.5,
                   help="weight of the KD loss; 1 - alpha weighs the task loss (0..1)")
    p.add_argument("--attention-weight", type=float, default=0.0,
                   help="weight of MiniLM's last-layer self-attention loss (0: off)")
    p.add_argument("--relation-heads", type=positive_int, default=None,
                   help="MiniLMv2 relation heads for the attention loss (default: MiniLM's per-head losses when the "
                        "head counts match, else the gcd of the two head counts)")
    p.add_argument("--init-from-teacher", action="store_true",
                   help="start the student from evenly spaced teacher layers, its embeddings and head, keeping the "
                        "most important feed-forward neurons (the student may differ in n_layers and d_ff only)")
    p.add_argument("--val-fraction", type=float, default=0.05, help="share of the data held out for evaluation")
    p.add_argument("--eval-batches", type=positive_int, default=20, help="validation batches (causal, mlm)")
    p.add_argument("--seed", type=int, default=0, help="seed of the student's initialization and the data order")
    p.add_argument("--log-every", type=int, default=50, help="print the losses every N steps (0: never)")
    p.set_defaults(func=cmd_distill)
