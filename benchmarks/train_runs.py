"""Whole training runs side by side: `formerkit train` vs transformers' Trainer vs a nanoGPT-style plain loop.

What a user would run instead of ``formerkit train``, on the same work: a GPT-2-shaped model (6
layers, d_model 384, 6 heads, context 256, batch 8) built by transformers and saved, a byte-level
BPE tokenizer trained on part of the standard library's code (``--source``), the same windows of
that corpus in the same order, the same AdamW settings, warmup + cosine schedule and clipping, and
the precision ``formerkit.precision`` measures fastest on this machine (the same for all three).

- formerkit: ``formerkit.train.train`` with ``--model.init_from`` the saved directory: the whole
  product path (data windows from the token cache, logging, TensorBoard, one evaluation and one
  checkpoint at the end).
- transformers: ``Trainer`` on ``GPT2LMHeadModel.from_pretrained`` of the same directory, fed the
  same windows in order (a sequential sampler), logging every 10 steps, evaluating and saving once
  at the end, its default fused AdamW.
- plain loop: nanoGPT's shape of loop on formerkit's model (windows, forward, loss, backward,
  clip, AdamW step): the bare forward + backward + optimizer step, with nothing around it.

Each runner's training throughput is tokens trained / seconds of its loop (evaluation and the
checkpoint included for the first two); wall time is the whole call (start-up included). MFU is
measured against this machine's matmul peak in the precision used.

    python benchmarks/train_runs.py [--steps 30] [--source email,json,http,asyncio] [--repeats 1]
"""

from __future__ import annotations

import argparse
import functools
import math
import os
import shutil
import statistics
import sysconfig
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import transformers  # noqa: E402

import formerkit as fk  # noqa: E402
from formerkit.data import WindowBatches, eval_batches, load_corpus, resolve_source  # noqa: E402
from formerkit.hardware import describe_machine  # noqa: E402
from formerkit.precision import DTYPES, resolve_precision  # noqa: E402
from formerkit.tokenizers import train_bpe  # noqa: E402
from formerkit.train import TrainConfig, train  # noqa: E402
from formerkit.train.allocator import keep_freed_memory  # noqa: E402
from formerkit.train.config import OptimSection  # noqa: E402
from formerkit.train.optim import build_optimizer, lr_at  # noqa: E402

transformers.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()

SHAPE = {"n_layers": 6, "d_model": 384, "n_heads": 6, "seq_len": 256, "batch": 8}
SMALL = {"n_layers": 2, "d_model": 64, "n_heads": 4, "seq_len": 64, "batch": 4}
EVAL_BATCHES = 4


class Setup:
    """The shared inputs: corpus, tokenizer, saved model, windows, schedule and precision."""

    def __init__(self, work: Path, packages: list[str], shape: dict, steps: int, vocab: int) -> None:
        root = Path(sysconfig.get_paths()["stdlib"])
        self.source_dir = work / "corpus"
        self.source_dir.mkdir()
        for package in packages:  # a copy of part of the standard library
            shutil.copytree(root / package, self.source_dir / package, ignore=shutil.ignore_patterns("__pycache__"))
        source = resolve_source(str(self.source_dir))
        self.tokenizer_dir = work / "tokenizer"
        tokenizer = train_bpe(source.documents(), vocab)
        tokenizer.save(self.tokenizer_dir)
        self.tokenizer = fk.load_tokenizer(self.tokenizer_dir)
        self.cache = work / "token-cache"
        self.corpus = load_corpus(source, self.tokenizer, cache_dir=self.cache, val_fraction=0.05)
        self.shape, self.steps = shape, steps
        self.optim = OptimSection(warmup_steps=max(1, steps // 10))
        torch.manual_seed(0)
        hf_cfg = transformers.GPT2Config(n_embd=shape["d_model"], n_layer=shape["n_layers"], n_head=shape["n_heads"],
                                         vocab_size=self.tokenizer.vocab_size, n_positions=shape["seq_len"],
                                         resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, use_cache=False,
                                         bos_token_id=self.tokenizer.eos_id, eos_token_id=self.tokenizer.eos_id)
        self.model_dir = work / "gpt2"
        transformers.GPT2LMHeadModel(hf_cfg).save_pretrained(self.model_dir)
        self.windows = WindowBatches(self.corpus.train, batch_size=shape["batch"], seq_len=shape["seq_len"], seed=0)
        self.precision = resolve_precision("auto", "cpu", d_model=shape["d_model"], d_ff=4 * shape["d_model"],
                                           rows=shape["batch"] * shape["seq_len"])
        self.tokens_per_step = shape["batch"] * shape["seq_len"]

    def autocast(self):
        """The chosen precision's autocast context (a no-op for fp32)."""
        return torch.autocast("cpu", dtype=DTYPES[self.precision.precision],
                              enabled=self.precision.precision != "fp32")


def run_formerkit(s: Setup, work: Path) -> dict:
    """The product: ``formerkit train`` from the saved directory, evaluating and saving once at the end."""
    args = ["--model.init_from", str(s.model_dir), "--data.source", str(s.source_dir),
            "--data.tokenizer", str(s.tokenizer_dir), "--data.cache_dir", str(s.cache), "--data.val_fraction", "0.05",
            "--train.steps", str(s.steps), "--train.batch_size", str(s.shape["batch"]),
            "--train.seq_len", str(s.shape["seq_len"]), "--train.precision", s.precision.precision,
            "--optim.warmup_steps", str(s.optim.warmup_steps), "--eval.every", str(s.steps),
            "--eval.batches", str(EVAL_BATCHES), "--checkpoint.every", str(s.steps),
            "--checkpoint.run_dir", str(work / "formerkit-run"), "--checkpoint.resume", "false",
            "--log.every", "10", "--log.progress", "false", "--log.samples", "0"]
    start = time.perf_counter()
    result = train(TrainConfig.load(None, args))
    wall = time.perf_counter() - start
    return {"tokens_per_s": result.tokens_per_s, "wall_s": wall, "final_loss": result.train_loss,
            "val_loss": result.val["loss"]}


class _WindowDataset(torch.utils.data.Dataset):
    """The windows formerkit's run trains on, step by step and row by row, as transformers examples."""

    def __init__(self, s: Setup) -> None:
        self.rows = [x for step in range(s.steps) for x in s.windows.batch(step)[0]]

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.rows[i], "labels": self.rows[i]}


def run_transformers(s: Setup, work: Path) -> dict:
    """transformers' Trainer on the same weights and windows, evaluating and saving once at the end."""

    class InOrder(transformers.Trainer):
        def _get_train_sampler(self, train_dataset=None):
            return torch.utils.data.SequentialSampler(train_dataset or self.train_dataset)

    evaluation = [{"input_ids": x_row, "labels": x_row} for x, _ in
                  eval_batches(s.corpus.val, batch_size=s.shape["batch"], seq_len=s.shape["seq_len"],
                               max_batches=EVAL_BATCHES) for x_row in x]
    o = s.optim
    args = transformers.TrainingArguments(
        output_dir=str(work / "transformers-run"), max_steps=s.steps, per_device_train_batch_size=s.shape["batch"],
        per_device_eval_batch_size=s.shape["batch"], learning_rate=o.lr, weight_decay=o.weight_decay,
        adam_beta1=o.beta1, adam_beta2=o.beta2, adam_epsilon=o.eps, max_grad_norm=o.grad_clip,
        lr_scheduler_type="cosine_with_min_lr", lr_scheduler_kwargs={"min_lr_rate": o.min_lr_ratio},
        warmup_steps=o.warmup_steps, logging_steps=10, eval_strategy="steps", eval_steps=s.steps,
        save_strategy="steps", save_steps=s.steps, report_to="none", use_cpu=True,
        bf16=s.precision.precision == "bf16", dataloader_num_workers=0, disable_tqdm=True, seed=0)
    start = time.perf_counter()
    model = transformers.GPT2LMHeadModel.from_pretrained(s.model_dir, attn_implementation="sdpa")
    trainer = InOrder(model=model, args=args, train_dataset=_WindowDataset(s), eval_dataset=evaluation)
    trainer.remove_callback(transformers.PrinterCallback)  # its logs are read from log_history instead
    out = trainer.train()
    wall = time.perf_counter() - start
    history = [h for h in trainer.state.log_history if "loss" in h]
    evals = [h for h in trainer.state.log_history if "eval_loss" in h]
    return {"tokens_per_s": s.steps * s.tokens_per_step / out.metrics["train_runtime"], "wall_s": wall,
            "final_loss": history[-1]["loss"] if history else math.nan,
            "val_loss": evals[-1]["eval_loss"] if evals else math.nan}


def run_plain_loop(s: Setup) -> dict:
    """nanoGPT's loop around formerkit's model: the bare forward + backward + optimizer step."""
    start = time.perf_counter()
    model = fk.from_pretrained(s.model_dir).train()
    optimizer = build_optimizer(model, s.optim)
    loop_start = time.perf_counter()
    for step in range(s.steps):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, s.optim, s.steps)
        x, y = s.windows.batch(step)
        with s.autocast():
            logits = model(x).logits  # (B, T, V)
        loss = F.cross_entropy(logits.flatten(0, 1).float(), y.flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), s.optim.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    end = time.perf_counter()
    return {"tokens_per_s": s.steps * s.tokens_per_step / (end - loop_start), "wall_s": end - start,
            "final_loss": loss.item(), "val_loss": math.nan}


def matmul_peak(dtype: torch.dtype, sizes: tuple[int, ...] = (1024, 2048), repeats: int = 3) -> float:
    """FLOP/s of the fastest square matmul in ``dtype``: the best of ``repeats`` at each size in ``sizes``."""
    rates = []
    for n in sizes:
        a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
        product = functools.partial(torch.matmul, a, b)
        product()
        rates.append(2 * n**3 / min(_timed(product) for _ in range(repeats)))
    return max(rates)


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def flops_per_token(model: torch.nn.Module, shape: dict) -> float:
    """6 * (non-embedding parameters + the tied LM head) + 12 * layers * d_model * context (PaLM / nanoGPT)."""
    cfg = model.config
    non_embedding = model.num_parameters() - cfg.vocab_size * cfg.d_model - cfg.max_seq_len * cfg.d_model
    return 6 * (non_embedding + cfg.vocab_size * cfg.d_model) + 12 * cfg.n_layers * cfg.d_model * shape["seq_len"]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30, help="optimizer steps per run")
    parser.add_argument("--source", default="email,json,http,asyncio", help="standard-library packages to train on")
    parser.add_argument("--vocab", type=int, default=8192, help="BPE vocabulary size")
    parser.add_argument("--repeats", type=int, default=1, help="rounds of the three runs (alternating order)")
    parser.add_argument("--small", action="store_true", help="a tiny model (for the smoke test)")
    args = parser.parse_args(argv)
    keep_freed_memory()  # the same allocator settings for all three (formerkit train applies them itself)
    shape = SMALL if args.small else SHAPE
    print(f"machine: {describe_machine()}")
    print(f"transformers {transformers.__version__}")
    with tempfile.TemporaryDirectory() as tmp:
        s = Setup(Path(tmp), args.source.split(","), shape, args.steps, args.vocab)
        model = fk.from_pretrained(s.model_dir)
        flops = flops_per_token(model, shape)
        peak = matmul_peak(DTYPES[s.precision.precision])
        print(f"corpus: {len(s.corpus.train):,} training tokens; model {model.num_parameters() / 1e6:.2f}M "
              f"parameters, {shape}; {flops / 1e6:.1f} MFLOP/token")
        print(f"{s.precision.describe()}; matmul peak in {s.precision.precision}: {peak / 1e9:.0f} GFLOP/s")
        runs: dict[str, list[dict]] = {"formerkit train": [], "transformers Trainer": [], "plain loop": []}
        for r in range(args.repeats):
            order = list(runs) if r % 2 == 0 else list(reversed(runs))
            for name in order:
                work = Path(tmp) / f"{name.split()[0]}-{r}"
                work.mkdir()
                run = {"formerkit train": lambda w=work: run_formerkit(s, w),
                       "transformers Trainer": lambda w=work: run_transformers(s, w),
                       "plain loop": lambda: run_plain_loop(s)}[name]
                runs[name].append(run())
                print(f"  {name}: {runs[name][-1]}", flush=True)
    best = {name: max(results, key=lambda r: r["tokens_per_s"]) for name, results in runs.items()}
    print(f"\n{args.steps} steps of {s.tokens_per_step} tokens, best of {args.repeats}:")
    print("| runner | tokens/s (loop) | wall s (whole call) | MFU | final train loss | val loss |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name, r in best.items():
        print(f"| {name} | {r['tokens_per_s']:,.0f} | {r['wall_s']:.1f} | {flops * r['tokens_per_s'] / peak:.1%} | "
              f"{r['final_loss']:.3f} | {r['val_loss']:.3f} |")
    fk_rate = best["formerkit train"]["tokens_per_s"]
    ratio = fk_rate / best["transformers Trainer"]["tokens_per_s"]
    wall_ratio = best["transformers Trainer"]["wall_s"] / best["formerkit train"]["wall_s"]
    loop_share = fk_rate / best["plain loop"]["tokens_per_s"]
    print(f"\nformerkit train vs transformers Trainer: {ratio:.2f}x tokens/s, {wall_ratio:.2f}x wall time "
          f"({'PASS' if ratio >= 1.2 else 'MISS'}: target 1.2x)")
    print(f"formerkit train vs the plain loop (the bare step): {loop_share:.1%} of its tokens/s "
          f"({'PASS' if loop_share >= 0.95 else 'MISS'}: target within 5%)")
    return {"best": best, "runs": runs, "ratio": ratio, "loop_share": loop_share, "precision": s.precision.precision,
            "mfu": {name: flops * r["tokens_per_s"] / peak for name, r in best.items()},
            "median_tokens_per_s": {n: statistics.median(r["tokens_per_s"] for r in rs) for n, rs in runs.items()}}


if __name__ == "__main__":
    main()
