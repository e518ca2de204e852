"""One compression report: size on disk, load time, batch-1 decode speed and held-out perplexity, side by side.

Two models, each written to disk in seven forms by the library's own tools, then loaded back with
``fk.from_pretrained`` and measured the same way:

- "demo": the model of ``examples/demo.yaml`` (Llama-style, 4 layers, d_model 128, BPE of 4,096 tokens,
  1.33M parameters), trained here by ``formerkit train``'s loop for ``--train-steps`` steps on the
  embedded standard-library corpus (or taken from ``--run-dir``, a run of that config);
- "gpt2-base": GPT-2 base's shape (12 layers, d_model 768, 12 heads, vocabulary 50,257; 124M
  parameters), random init: its size, load and speed columns are real, its perplexity only shows
  that a form did not break the model (an untrained model's perplexity is near its vocabulary size).

The forms: fp32 and bf16 (``fk.save_pretrained``), int8 and int4 (``formerkit quantize --bits 8|4``,
int4 with the largest group size dividing every layer's input width), pruned to 75% and 50% of the
attention heads and feed-forward neurons (``formerkit.compress.prune.prune``, importance scored on
training windows, no fine-tuning after), and a student at under half the parameters distilled from
the fp32 model (``formerkit.compress.distill``: logit KD, plus MiniLM's attention loss for the demo).

Columns: bytes of the saved directory (tokenizer included), ``fk.from_pretrained`` seconds (best
of ``--load-repeats``, page cache warm), greedy decode tokens/s at batch 1 (64 new tokens after a
16-token held-out prompt, 32 for the GPT-2 shape; no EOS; the variants' calls alternate, best of
``--repeats`` rounds), held-out perplexity (the demo run's validation windows). Floats run in their
stored precision; int8 and int4 run with bf16 activations (their fast CPU path).

    python benchmarks/compression.py [--train-steps 300] [--distill-steps 300] [--run-dir RUN] [--threads 1]
        [--repeats 3] [--load-repeats 3] [--skip-base] [--quick]
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import math
import shutil
import sysconfig
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch

import formerkit as fk
from formerkit.cli import main as formerkit_cli
from formerkit.compress.distill import Distiller, DistillSettings, distill
from formerkit.compress.prune import prune
from formerkit.data import WindowBatches, resolve_source
from formerkit.hardware import cpu_model, describe_machine
from formerkit.layers.int4 import GROUP_SIZES
from formerkit.train import TrainConfig, train
from formerkit.train.config import OptimSection
from formerkit.train.distributed import DistInfo
from formerkit.train.objectives import CausalLM
from formerkit.train.setup import build_objective

ROOT = Path(__file__).resolve().parents[1]
DEMO_YAML = ROOT / "examples" / "demo.yaml"
VARIANTS = ("fp32", "bf16", "int8", "int4", "pruned 25%", "pruned 50%", "distilled")
PROMPT = 16


@dataclass(frozen=True)
class Shape:
    """Sizes of one run: the demo's training overrides, the GPT-2-shaped model and both students."""

    demo_overrides: tuple[str, ...]
    demo_student: dict
    base: dict
    base_student: dict
    base_batch: int
    base_seq_len: int
    base_eval_batches: int
    base_distill_steps: int
    score_batches: int
    new_tokens: int
    base_new_tokens: int


FULL = Shape(demo_overrides=(), demo_student=dict(d_model=80, n_heads=2, n_kv_heads=2, d_ff=224),
             base=dict(n_layers=12, d_model=768, n_heads=12, d_ff=3072, vocab_size=50257),
             base_student=dict(n_layers=6, d_model=512, n_heads=8, d_ff=2048),
             base_batch=2, base_seq_len=128, base_eval_batches=2, base_distill_steps=8, score_batches=2,
             new_tokens=64, base_new_tokens=32)
QUICK = Shape(demo_overrides=("--model.n_layers", "2", "--model.d_model", "32", "--model.d_ff", "64",
                              "--model.max_seq_len", "32", "--data.tokenizer", "byte", "--train.seq_len", "32",
                              "--train.batch_size", "4", "--eval.batches", "2", "--optim.warmup_steps", "2",
                              "--train.precision", "fp32", "--train.attention", "sdpa", "--optim.kernel", "foreach"),
              demo_student=dict(d_model=16, n_heads=2, n_kv_heads=2, d_ff=32),
              base=dict(n_layers=2, d_model=64, n_heads=4, d_ff=128, vocab_size=512),
              base_student=dict(n_layers=1, d_model=32, n_heads=2, d_ff=64),
              base_batch=2, base_seq_len=32, base_eval_batches=1, base_distill_steps=2, score_batches=1,
              new_tokens=8, base_new_tokens=8)


def quick_source(work: Path) -> str:
    """A small text source for --quick: a copy of one standard-library package."""
    target = work / "quick-src"
    shutil.copytree(Path(sysconfig.get_paths()["stdlib"]) / "tomllib", target,
                    ignore=shutil.ignore_patterns("__pycache__"))
    return str(target)


def demo_config(args: argparse.Namespace, shape: Shape, work: Path) -> TrainConfig:
    """examples/demo.yaml with this run's steps, run directory and quiet logging (and --quick's tiny sizes)."""
    steps = str(args.train_steps)
    overrides = ["--train.steps", steps, "--eval.every", steps, "--checkpoint.every", steps,
                 "--checkpoint.run_dir", str(args.run_dir or work / "demo-run"), "--log.samples", "0",
                 "--log.progress", "false", "--log.tensorboard", "false", "--train.threads", str(args.threads),
                 *shape.demo_overrides]
    if args.quick:
        overrides += ["--data.source", quick_source(work), "--data.cache_dir", str(work / "cache")]
    return TrainConfig.load(DEMO_YAML, overrides)


def demo_model(args: argparse.Namespace, cfg: TrainConfig) -> tuple[fk.Transformer, object, CausalLM, float]:
    """Train the demo model (or read ``--run-dir``); return (model in eval mode, tokenizer, objective, seconds)."""
    start = time.perf_counter()
    if args.run_dir is None or not Path(args.run_dir).exists():
        train(cfg)
    run_dir = Path(cfg.checkpoint.run_dir)
    model, tokenizer = fk.from_pretrained(run_dir).eval(), fk.load_tokenizer(run_dir)
    objective, _, line = build_objective(cfg, tokenizer, resolve_source(cfg.data.source),
                                         DistInfo(0, 1, 0, torch.device("cpu")))
    print(line, flush=True)
    return model, tokenizer, objective, time.perf_counter() - start


def base_objective(demo: CausalLM, shape: Shape) -> CausalLM:
    """The demo's corpus in smaller windows and fewer evaluation batches (for the 124M-parameter model)."""
    windows = WindowBatches(demo.train.tokens, batch_size=shape.base_batch, seq_len=shape.base_seq_len, seed=0)
    return CausalLM(windows, demo.val_tokens, shape.base_seq_len, shape.base_batch, shape.base_eval_batches)


def int4_group(model: fk.Transformer) -> int:
    """The largest int4 group size that divides the input width of every linear layer of ``model``."""
    widths = {m.in_features for m in model.modules() if isinstance(m, torch.nn.Linear)}
    return max(g for g in GROUP_SIZES if all(w % g == 0 for w in widths))


def run_cli(argv: list[str]) -> None:
    """Run one ``formerkit`` command in this process; raise if it fails."""
    if formerkit_cli(argv):
        raise RuntimeError(f"formerkit {' '.join(argv)} failed")


def write_variants(model: fk.Transformer, tokenizer, objective: CausalLM, student_cfg: fk.ModelConfig,
                   settings: DistillSettings, distill_steps: int, score_batches: int, out: Path) -> dict[str, Path]:
    """Write the seven forms of ``model`` under ``out``; return {variant: directory}."""
    dirs = {name: out / name.replace(" ", "-").replace("%", "") for name in VARIANTS}
    fk.save_pretrained(model, dirs["fp32"], tokenizer=tokenizer)
    fk.save_pretrained(copy.deepcopy(model).to(torch.bfloat16), dirs["bf16"], tokenizer=tokenizer)
    run_cli(["quantize", "--checkpoint", str(dirs["fp32"]), "--out", str(dirs["int8"]), "--bits", "8"])
    run_cli(["quantize", "--checkpoint", str(dirs["fp32"]), "--out", str(dirs["int4"]), "--bits", "4",
             "--group-size", str(int4_group(model))])
    windows = (objective.train.batch(10**6 + i) for i in range(score_batches))  # steps training never reaches
    scoring = [{"input_ids": x, "labels": x} for x, _ in windows]
    for name, kept in (("pruned 25%", 0.75), ("pruned 50%", 0.5)):
        pruned = prune(copy.deepcopy(model), scoring, heads=kept, neurons=kept, steps=2)
        fk.save_pretrained(pruned, dirs[name], tokenizer=tokenizer)
    torch.manual_seed(0)
    student = fk.Transformer(student_cfg)
    optim = OptimSection(lr=3e-3, warmup_steps=max(1, distill_steps // 20))
    result = distill(Distiller(model, student, settings), objective, steps=distill_steps, optim=optim,
                     log_every=max(1, distill_steps // 4))
    print(f"distilled {distill_steps} steps in {result.seconds:.0f} s", flush=True)
    fk.save_pretrained(student, dirs["distilled"], tokenizer=tokenizer)
    return dirs


def directory_bytes(path: Path) -> int:
    """Bytes of every file under ``path``."""
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def load_dtype(variant: str) -> torch.dtype | None:
    """The dtype a variant is loaded in: bf16 for bf16, int8 and int4 (bf16 activations), else the stored fp32."""
    return torch.bfloat16 if variant in ("bf16", "int8", "int4") else None


def timed_load(directory: Path, dtype: torch.dtype | None, repeats: int) -> tuple[fk.Transformer, float]:
    """``fk.from_pretrained(directory, dtype=dtype)``; return the model and the best of ``repeats`` load times."""
    best, model = math.inf, None
    for _ in range(repeats):
        model = None  # let the previous copy go before the next load
        start = time.perf_counter()
        model = fk.from_pretrained(directory, dtype=dtype)
        best = min(best, time.perf_counter() - start)
    return model.eval(), best


def generator(model: fk.Transformer, prompt: torch.Tensor, new_tokens: int):
    """A no-argument callable: greedy decode of ``new_tokens`` after ``prompt`` (1, T), no EOS; returns tokens/s."""
    @torch.no_grad()
    def call() -> float:
        start = time.perf_counter()
        out = fk.generate(model, prompt, max_new_tokens=new_tokens, eos_token_id=[])  # (1, T + new_tokens)
        return (out.shape[1] - prompt.shape[1]) / (time.perf_counter() - start)
    return call


def measure(name: str, dirs: dict[str, Path], objective: CausalLM, new_tokens: int, args: argparse.Namespace
            ) -> list[dict]:
    """One row per variant: parameters, bytes on disk, load seconds, decode tokens/s and held-out perplexity.

    Every variant is loaded and scored first; then the decode calls of all variants alternate,
    ``args.repeats`` rounds after a warm-up call each, and each variant's best round counts (the one
    least disturbed by other work on the machine).
    """
    prompt = torch.tensor(objective.val_tokens[:PROMPT].tolist())[None]  # (1, PROMPT)
    rows: list[dict] = []
    calls = []
    for variant, directory in dirs.items():
        model, load_s = timed_load(directory, load_dtype(variant), args.load_repeats)
        scores = objective.evaluate(model, torch.device("cpu"), contextlib.nullcontext)
        quantized = variant in ("int8", "int4")  # integer weights are buffers: count the float model's parameters
        params = rows[0]["params"] if quantized else model.num_parameters()
        rows.append({"model": name, "variant": variant, "params": params, "bytes": directory_bytes(directory),
                     "load_s": load_s, "tokens_per_s": 0.0, "perplexity": scores["perplexity"],
                     "loss": scores["loss"]})
        calls.append(generator(model, prompt, new_tokens))
        calls[-1]()  # warm up: allocator, kernels, the int4 kernel's packed weights
    for _ in range(args.repeats):
        for row, call in zip(rows, calls, strict=True):
            row["tokens_per_s"] = max(row["tokens_per_s"], call())
    for row in rows:
        print(f"{name} {row['variant']}: {row}", flush=True)
    return rows


def print_table(rows: list[dict], groups: dict[str, int]) -> None:
    """The report: one markdown table, ratios against each model's fp32 row."""
    print("| model | variant | parameters | size on disk | vs fp32 | load s | decode tok/s | vs fp32 | perplexity |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    fp32 = {r["model"]: r for r in rows if r["variant"] == "fp32"}
    for r in rows:
        base = fp32[r["model"]]
        variant = f"int4 (g{groups[r['model']]})" if r["variant"] == "int4" else r["variant"]
        print(f"| {r['model']} | {variant} | {r['params']:,} | {r['bytes'] / 1e6:.2f} MB | "
              f"{r['bytes'] / base['bytes']:.2f}x | {r['load_s']:.3f} | {r['tokens_per_s']:.1f} | "
              f"{r['tokens_per_s'] / base['tokens_per_s']:.2f}x | {r['perplexity']:.2f} |")


def main(argv: list[str] | None = None) -> dict:
    """Build both models' variants, measure them, print the table; return {"rows", "machine", "cpu", ...}."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train-steps", type=int, default=300, help="steps of the demo model (default: 300)")
    parser.add_argument("--distill-steps", type=int, default=300, help="steps of the demo's student (default: 300)")
    parser.add_argument("--run-dir", default=None, help="a finished run of examples/demo.yaml to reuse (default: "
                                                        "train one in a temporary directory)")
    parser.add_argument("--repeats", type=int, default=3, help="timed decode calls per variant (best counts)")
    parser.add_argument("--load-repeats", type=int, default=3, help="timed loads per variant (best counts)")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (default 1: steadiest on a shared CPU)")
    parser.add_argument("--skip-base", action="store_true", help="leave out the GPT-2-shaped model")
    parser.add_argument("--quick", action="store_true", help="tiny models and corpus, seconds (for tests)")
    args = parser.parse_args(argv)
    shape = QUICK if args.quick else FULL
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    print(f"CPU: {cpu_model()}\nmachine: {describe_machine()}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        cfg = demo_config(args, shape, work)
        teacher, tokenizer, objective, train_s = demo_model(args, cfg)
        print(f"demo model: {teacher.num_parameters():,} parameters, ready in {train_s:.0f} s", flush=True)
        student_cfg = replace(teacher.config, **shape.demo_student)
        dirs = write_variants(teacher, tokenizer, objective, student_cfg,
                              DistillSettings(temperature=1.0, alpha=1.0, attention_weight=1.0),
                              args.distill_steps, shape.score_batches, work / "demo")
        groups = {"demo": int4_group(teacher)}
        rows = measure("demo", dirs, objective, shape.new_tokens, args)
        if not args.skip_base:
            base_cfg = fk.ModelConfig.from_preset("gpt2", **shape.base, attn_dropout=0.0, resid_dropout=0.0,
                                                  embed_dropout=0.0)
            torch.manual_seed(0)
            base = fk.Transformer(base_cfg).eval()
            small = base_objective(objective, shape)
            dirs = write_variants(base, tokenizer, small, replace(base_cfg, **shape.base_student),
                                  DistillSettings(temperature=1.0, alpha=1.0), shape.base_distill_steps,
                                  shape.score_batches, work / "gpt2-base")
            name = "gpt2-base (random init)"
            groups[name] = int4_group(base)
            rows += measure(name, dirs, small, shape.base_new_tokens, args)
    seconds = time.perf_counter() - start
    print(f"\nCPU: {cpu_model()}; torch {torch.__version__}, {torch.get_num_threads()} threads; {seconds:.0f} s in all")
    print_table(rows, groups)
    return {"rows": rows, "machine": describe_machine(), "cpu": cpu_model(), "seconds": seconds,
            "train_seconds": train_s, "groups": groups}


if __name__ == "__main__":
    main()
