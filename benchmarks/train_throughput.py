"""Training throughput: formerkit vs transformers' GPT2LMHeadModel, same weights and batches, in one run.

The model is GPT-2-shaped (6 layers, d_model 384, 6 heads, context 256, vocab 8192, batch 8).
transformers builds it (sdpa attention, dropout 0) and saves it; formerkit loads that
directory, so both start from identical weights (checked: the fp32 loss of one batch).

formerkit trains through its own training code: ``build_optimizer`` (AdamW, decay groups),
``parallel.wrap`` (torch.compile when asked), ``trainer.accumulate_gradients`` with
``trainer.autocast_for`` and the ``CausalLM.loss`` objective, then ``trainer.apply_gradients``
(clip to 1.0, step, zero). transformers trains with the same AdamW settings and parameter
groups (``decay_groups``), the same learning-rate schedule, the same clipping, and the same
loss (cross-entropy of its float32 logits against the shifted targets), with ``use_cache=False``.

Precision modes: fp32 (no autocast) and bf16 (autocast, fp32 master weights), each with and
without torch.compile. Every (mode, library) trainer is built and warmed up (compilation
excluded from the timings) first; then the timed steps run in rounds that visit every trainer
in turn, a block of steps each, so all of them see the same machine state. Throughput is the
median step time; ratios are transformers time / formerkit time (above 1: formerkit faster).

The machine's own matmul peak (square fp32 and bf16 matmuls, the best of a few sizes) is
measured first, and model FLOPs utilization (MFU) is reported against it, with

    FLOPs/token = 6 * (N_nonembedding + vocab * d_model) + 12 * n_layers * d_model * seq_len

(6N for the forward and backward matmuls, the tied LM-head matmul counted, plus the attention
score/value matmuls as in the PaLM / nanoGPT estimate).

Finally the loss-parity check trains formerkit in its default mode (``TrainSection`` defaults:
bf16 autocast, no compile) and in fp32 for ``--loss-steps`` steps from the same weights on the
same batches, alternating, and compares the mean loss of the last 10 steps.

    python benchmarks/train_throughput.py [--steps 20] [--modes fp32,bf16,fp32-compile,bf16-compile]
        [--loss-steps 200] [--threads N] [--profile 3] [--malloc reuse|default]

By default the benchmark makes glibc's malloc keep freed memory (``--malloc reuse``): otherwise
every large activation buffer is a fresh mmap whose pages fault in again on every step, which
costs about a quarter of a bf16 step on this CPU for both libraries and varies with the heap's
history. ``--malloc default`` measures the allocator as the environment configures it.

The batches come from a fixed random Markov chain over the vocabulary (each token has 4
possible successors), so the loss really falls, and both libraries see exactly the same ones.
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import resource
import statistics
import tempfile
import time
from collections import defaultdict
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch.profiler import record_function

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import transformers  # noqa: E402

import formerkit as fk  # noqa: E402
from formerkit.precision import resolve_precision  # noqa: E402
from formerkit.train import parallel, trainer  # noqa: E402
from formerkit.train.allocator import keep_freed_memory  # noqa: E402
from formerkit.train.config import OptimSection, TrainConfig, TrainSection  # noqa: E402
from formerkit.train.distributed import DistInfo  # noqa: E402
from formerkit.train.objectives import CausalLM  # noqa: E402
from formerkit.train.optim import build_optimizer, decay_groups, lr_at  # noqa: E402

transformers.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()

CPU = torch.device("cpu")
MODES = {"fp32": ("fp32", False), "bf16": ("bf16", False),
         "fp32-compile": ("fp32", True), "bf16-compile": ("bf16", True)}
LIBS = ("formerkit", "transformers")


@dataclass(frozen=True)
class Shape:
    """The benchmarked model and batch."""

    n_layers: int = 6
    d_model: int = 384
    n_heads: int = 6
    seq_len: int = 256
    vocab: int = 8192
    batch: int = 8

    @property
    def tokens(self) -> int:
        """Tokens trained on per step."""
        return self.batch * self.seq_len


# ---------------------------------------------------------------------------------------------
# Machine peak and model FLOPs


def matmul_gflops(dtype: torch.dtype, sizes=(1024, 2048, 4096), repeats: int = 5) -> dict[int, float]:
    """GFLOPS of square (n x n) @ (n x n) matmuls in ``dtype``: the best of ``repeats`` per size.

    The best, not the median: other processes only ever slow a repeat down, and a peak should
    not be underestimated (that would flatter the MFU).
    """
    out = {}
    for n in sizes:
        a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
        a @ b  # warm up
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            a @ b
            times.append(time.perf_counter() - start)
        out[n] = 2 * n**3 / min(times) / 1e9
    return out


def flops_per_token(model: torch.nn.Module, shape: Shape) -> tuple[float, dict[str, float]]:
    """Training FLOPs per token (see the module docstring) and its terms."""
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    seen, non_embedding = set(), 0
    for p in model.parameters():
        if id(p) not in seen and id(p) not in embeddings:
            non_embedding += p.numel()
        seen.add(id(p))
    head = shape.vocab * shape.d_model
    attention = 12 * shape.n_layers * shape.d_model * shape.seq_len
    total = 6 * (non_embedding + head) + attention
    return total, {"N_nonembedding": non_embedding, "lm_head": head, "attention": attention}


# ---------------------------------------------------------------------------------------------
# Models and data


def build_models(shape: Shape, seed: int = 0) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(transformers GPT2LMHeadModel, formerkit Transformer) with identical weights, in train mode."""
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(n_embd=shape.d_model, n_layer=shape.n_layers, n_head=shape.n_heads,
                                  vocab_size=shape.vocab, n_positions=shape.seq_len, resid_pdrop=0.0,
                                  embd_pdrop=0.0, attn_pdrop=0.0, use_cache=False, attn_implementation="sdpa")
    hf_model = transformers.GPT2LMHeadModel(cfg)
    with tempfile.TemporaryDirectory() as tmp:
        hf_model.save_pretrained(tmp)
        fk_model = fk.from_pretrained(tmp)
    return hf_model.train(), fk_model.train()


def markov_batches(n: int, shape: Shape, seed: int = 0, successors: int = 4) -> list[tuple[torch.Tensor, ...]]:
    """``n`` batches (x, y) of windows from a fixed random Markov chain over the vocabulary.

    Each token has ``successors`` possible next tokens with fixed probabilities, so a model can
    learn the chain and the loss falls well below log(vocab). y is x shifted by one.
    """
    g = torch.Generator().manual_seed(seed)
    table = torch.randint(0, shape.vocab, (shape.vocab, successors), generator=g)
    probs = torch.tensor([0.5, 0.25, 0.15, 0.1][:successors] if successors <= 4 else [1.0] * successors)
    cum = (probs / probs.sum()).cumsum(0)
    out = []
    for i in range(n):  # batch i depends only on (seed, i), whatever n is
        g = torch.Generator().manual_seed(seed * 1_000_003 + i + 1)
        token = torch.randint(0, shape.vocab, (shape.batch,), generator=g)
        picks = torch.searchsorted(cum, torch.rand(shape.batch, shape.seq_len, generator=g)).clamp(max=successors - 1)
        seq = torch.empty(shape.batch, shape.seq_len + 1, dtype=torch.long)
        seq[:, 0] = token
        for t in range(shape.seq_len):
            token = table[token, picks[:, t]]
            seq[:, t + 1] = token
        out.append(seq)
    return [(s[:, :-1].contiguous(), s[:, 1:].contiguous()) for s in out]


def hf_loss(model, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """transformers' side of the loss: exactly CausalLM.loss on GPT2LMHeadModel's logits."""
    logits = model(input_ids=x, use_cache=False).logits  # (B, T, V)
    return F.cross_entropy(logits.flatten(0, 1).float(), y.flatten())


# ---------------------------------------------------------------------------------------------
# Trainers: one optimizer step each call


class FormerkitTrainer:
    """formerkit's own training path: the pieces ``trainer._loop`` runs for one step."""

    def __init__(self, model, precision: str, compile: bool, optim: OptimSection, total_steps: int) -> None:
        self.name = "formerkit"
        self.model = model
        self.cfg = TrainConfig.from_dict({"train": {"precision": precision, "compile": compile, "device": "cpu"},
                                          "optim": asdict(optim)})
        info = DistInfo(rank=0, world_size=1, local_rank=0, device=CPU)
        self.optimizer = build_optimizer(model, self.cfg.optim)
        self.wrapped = parallel.wrap(model, self.cfg, info)
        self.autocast = trainer.autocast_for(precision, CPU)
        self.objective = CausalLM(train=None, val_tokens=None, seq_len=0, eval_batch_size=1, eval_batches=0)
        self.total_steps = total_steps

    def step(self, i: int, x: torch.Tensor, y: torch.Tensor) -> float:
        """Train on one batch as step ``i`` of the schedule; return the loss."""
        self.wrapped.train()
        lr = lr_at(i, self.cfg.optim, self.total_steps)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        with record_function("forward+backward"):
            loss = trainer.accumulate_gradients(self.wrapped, self.objective.loss, [{"x": x, "y": y}], CPU,
                                                self.autocast)
            value = float(loss)
        with record_function("optimizer"):
            trainer.apply_gradients(self.model, self.optimizer, self.cfg.optim.grad_clip)
        return value


class TransformersTrainer:
    """A plain PyTorch loop around GPT2LMHeadModel with the same optimizer, schedule, clip and loss."""

    def __init__(self, model, precision: str, compile: bool, optim: OptimSection, total_steps: int) -> None:
        self.name = "transformers"
        self.model = model
        self.optim = optim
        decay, no_decay = decay_groups(model)
        self.params = decay + no_decay
        self.optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": optim.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=optim.lr, betas=(optim.beta1, optim.beta2), eps=optim.eps)
        self.forward = torch.compile(model) if compile else model
        self.bf16 = precision == "bf16"
        self.total_steps = total_steps

    def step(self, i: int, x: torch.Tensor, y: torch.Tensor) -> float:
        """Train on one batch as step ``i`` of the schedule; return the loss."""
        self.model.train()
        lr = lr_at(i, self.optim, self.total_steps)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        with record_function("forward+backward"):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.bf16):
                loss = hf_loss(self.forward, x, y)
            loss.backward()
            value = float(loss.detach())
        with record_function("optimizer"):
            torch.nn.utils.clip_grad_norm_(self.params, self.optim.grad_clip)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        return value


def make_trainer(lib: str, pristine: dict, mode: str, optim: OptimSection, total_steps: int):
    """A trainer for ``lib`` in ``mode`` on a fresh copy of the pristine model."""
    precision, compile = MODES[mode]
    cls = FormerkitTrainer if lib == "formerkit" else TransformersTrainer
    return cls(copy.deepcopy(pristine[lib]), precision, compile, optim, total_steps)


# ---------------------------------------------------------------------------------------------
# Measurements


def check_initial_loss(pristine: dict, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    """fp32 loss of one batch under both libraries (identical weights), without grad."""
    objective = CausalLM(train=None, val_tokens=None, seq_len=0, eval_batch_size=1, eval_batches=0)
    with torch.no_grad():
        ours = float(objective.loss(pristine["formerkit"], {"x": x, "y": y}))
        theirs = float(hf_loss(pristine["transformers"], x, y))
    return ours, theirs


def measure(trainers: dict, batches: list, steps: int, warmup: int, block: int = 4) -> dict:
    """Warm every trainer up, then time ``steps`` steps of each in interleaved rounds.

    Each round runs ``block`` consecutive steps of every trainer in turn: the first step after
    a switch finds the caches cold, and with blocks of 4 the median is a warm step, as in a
    real training loop.

    Returns {key: {"times": [...], "warmup_s": first-step seconds (compilation included)}}.
    """
    results = {}
    for key, tr in trainers.items():
        start = time.perf_counter()
        tr.step(0, *batches[0])
        first = time.perf_counter() - start
        for i in range(1, warmup):
            tr.step(i, *batches[i % len(batches)])
        results[key] = {"times": [], "warmup_s": first}
    done = 0
    while done < steps:
        n = min(block, steps - done)
        for key, tr in trainers.items():
            for i in range(warmup + done, warmup + done + n):
                start = time.perf_counter()
                tr.step(i, *batches[i % len(batches)])
                results[key]["times"].append(time.perf_counter() - start)
        done += n
    return results


def default_mode(shape: Shape) -> str:
    """The mode ``formerkit train`` picks by default on this machine: its ``precision: auto`` probe, no compile."""
    choice = resolve_precision(TrainSection().precision, CPU, d_model=shape.d_model, d_ff=4 * shape.d_model,
                               rows=shape.tokens)
    return choice.precision + ("-compile" if TrainSection().compile else "")


def loss_parity(pristine: dict, batches: list, steps: int, optim: OptimSection, mode: str) -> dict:
    """formerkit's default ``mode`` vs fp32, ``steps`` steps each from the same weights and batches."""
    precision, compile = MODES[mode]
    runs = {"default": FormerkitTrainer(copy.deepcopy(pristine["formerkit"]), precision, compile, optim, steps),
            "fp32": FormerkitTrainer(copy.deepcopy(pristine["formerkit"]), "fp32", False, optim, steps)}
    losses, times = defaultdict(list), defaultdict(list)
    for i in range(steps):
        for name, tr in runs.items():
            start = time.perf_counter()
            losses[name].append(tr.step(i, *batches[i % len(batches)]))
            times[name].append(time.perf_counter() - start)
    tail = min(10, steps)
    final = {name: statistics.fmean(v[-tail:]) for name, v in losses.items()}
    return {"precision": precision, "compile": compile, "losses": dict(losses),
            "final": final, "rel_diff": abs(final["default"] - final["fp32"]) / final["fp32"],
            "median_s": {name: statistics.median(v) for name, v in times.items()}, "times": dict(times)}


_CATEGORIES = [  # (category, substrings of aten op names), first match wins
    ("attention (sdpa)", ("scaled_dot_product", "flash_attention")),
    ("matmul", ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "mkldnn", "onednn")),
    ("loss (log_softmax, nll)", ("log_softmax", "nll_loss", "cross_entropy")),
    ("layernorm", ("layer_norm",)),
    ("gelu", ("gelu", "tanh", "aten::pow")),
    ("dtype casts and copies", ("aten::copy_", "aten::_to_copy", "aten::clone")),
    ("embedding", ("embedding",)),
]


def _category(name: str) -> str:
    return next((c for c, keys in _CATEGORIES if any(k in name for k in keys)), "other elementwise/reductions")


def profile_breakdown(tr, batches: list, steps: int) -> dict[str, float]:
    """Seconds per step by kind of work, from torch.profiler.

    Every aten op's self time is counted once: under the trainer's "optimizer" scope (clip,
    AdamW step, zero_grad) it is optimizer time; elsewhere it goes to a category by op name
    (inductor's generated code counts as "compiled graph"). What is left of the wall time is Python,
    dispatch and autograd bookkeeping.
    """
    from torch.profiler import ProfilerActivity, profile

    for i in range(2):  # warm
        tr.step(i, *batches[i % len(batches)])
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        start = time.perf_counter()
        for i in range(2, 2 + steps):
            tr.step(i, *batches[i % len(batches)])
        wall = time.perf_counter() - start
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
    totals: dict[str, float] = defaultdict(float)
    for evt in prof.events():
        name = evt.name
        compiled = "CompiledFxGraph" in name  # inductor's generated code (fused kernels), around its aten calls
        if not (name.startswith("aten::") or compiled):
            continue
        parent, in_optimizer = evt.cpu_parent, False
        while parent is not None:
            if parent.name == "optimizer":
                in_optimizer = True
                break
            parent = parent.cpu_parent
        cat = "optimizer (clip + AdamW + zero)" if in_optimizer else (
            "compiled graph (fused kernels)" if compiled else _category(name))
        totals[cat] += evt.self_cpu_time_total / 1e6
    out = {cat: t / steps for cat, t in sorted(totals.items(), key=lambda kv: -kv[1])}
    out["python, dispatch, autograd (rest)"] = max(0.0, wall - sum(totals.values())) / steps
    out["_wall_per_step"] = wall / steps
    out["_page_faults_per_step"] = faults / steps
    return out


# ---------------------------------------------------------------------------------------------
# Report


def _fmt_pass(ok: bool) -> str:
    return "PASS" if ok else "MISS"


def report(results: dict, shape: Shape, flops_tok: float, peak: dict[str, float], modes: list[str]) -> dict:
    """Print the throughput table; return tokens/s per (mode, lib)."""
    toks = {key: shape.tokens / statistics.median(r["times"]) for key, r in results.items()}
    print(f"\n{'mode':14s} {'formerkit tok/s':>16s} {'transformers tok/s':>19s} {'ratio':>7s} "
          f"{'fk MFU (own peak)':>18s} {'fk MFU (bf16 peak)':>19s} {'hf MFU (bf16 peak)':>19s} {'first step s':>16s}")
    for mode in modes:
        ours, theirs = toks[(mode, "formerkit")], toks[(mode, "transformers")]
        own_peak = peak[MODES[mode][0]]
        first = f"{results[(mode, 'formerkit')]['warmup_s']:.1f}/{results[(mode, 'transformers')]['warmup_s']:.1f}"
        print(f"{mode:14s} {ours:16.0f} {theirs:19.0f} {ours / theirs:6.2f}x "
              f"{flops_tok * ours / own_peak:17.1%} {flops_tok * ours / peak['bf16']:18.1%} "
              f"{flops_tok * theirs / peak['bf16']:18.1%} {first:>16s}")
    return toks


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20, help="timed steps per mode and library")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (compilation happens here)")
    parser.add_argument("--modes", default=",".join(MODES), help=f"comma-separated subset of {','.join(MODES)}")
    parser.add_argument("--loss-steps", type=int, default=200, help="steps of the loss-parity runs (0: skip)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--profile", type=int, default=3, help="profile N steps of formerkit's default mode and "
                        "of transformers bf16 (and bf16-compile when measured): where the time goes (0: skip)")
    parser.add_argument("--malloc", choices=("reuse", "default"), default="reuse",
                        help="reuse: keep freed memory in the process (no per-step page faults, see "
                        "keep_freed_memory); default: glibc as configured by the environment")
    parser.add_argument("--small", action="store_true", help="a tiny model (for the smoke test)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    malloc = "glibc defaults (or the environment's MALLOC_ settings)"
    if args.malloc == "reuse":
        malloc = "freed memory kept for reuse (mallopt M_MMAP_MAX=0, M_TRIM_THRESHOLD=2 GiB)" \
            if keep_freed_memory() else "no glibc: allocator left as is"
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    for m in modes:
        if m not in MODES:
            parser.error(f"unknown mode {m!r}; choose from {', '.join(MODES)}")
    shape = Shape(n_layers=2, d_model=32, n_heads=4, seq_len=32, vocab=256, batch=2) if args.small else Shape()
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, {torch.get_num_threads()} threads, "
          f"CPU capability {torch.backends.cpu.get_cpu_capability()}; malloc: {malloc}")

    sizes = (128, 256) if args.small else (1024, 2048, 4096)
    peak = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        gf = matmul_gflops(dtype, sizes)
        peak[name] = max(gf.values()) * 1e9
        print(f"matmul peak {name}: " + ", ".join(f"n={n} {v:.0f}" for n, v in gf.items())
              + f" GFLOPS -> best {peak[name] / 1e9:.0f}")

    mode_default = default_mode(shape)
    print(f"formerkit's default mode on this machine (precision: auto): {mode_default}")
    hf_model, fk_model = build_models(shape)
    pristine = {"formerkit": fk_model, "transformers": hf_model}
    flops_tok, terms = flops_per_token(fk_model, shape)
    print(f"model: {shape}; formerkit {fk_model.num_parameters() / 1e6:.2f}M parameters")
    print(f"FLOPs/token = 6*(N_nonembedding {terms['N_nonembedding']:,} + vocab*d {terms['lm_head']:,}) "
          f"+ 12*L*d*T {terms['attention']:,} = {flops_tok / 1e6:.1f} MFLOP "
          f"({flops_tok * shape.tokens / 1e9:.1f} GFLOP per step of {shape.tokens} tokens)")

    n_batches = max(args.loss_steps, args.warmup + args.steps, 1)
    batches = markov_batches(n_batches, shape)
    ours, theirs = check_initial_loss(pristine, *batches[0])
    print(f"initial fp32 loss on batch 0: formerkit {ours:.6f}, transformers {theirs:.6f}, "
          f"|diff| {abs(ours - theirs):.2e} ({_fmt_pass(abs(ours - theirs) < 1e-4)}: < 1e-4); "
          f"log(vocab) = {math.log(shape.vocab):.4f}")

    optim = OptimSection()
    total = max(args.loss_steps, args.warmup + args.steps)
    out: dict = {"peak": peak, "flops_per_token": flops_tok, "initial_loss": (ours, theirs),
                 "default_mode": mode_default}
    if modes:
        trainers = {}
        for mode in modes:
            for lib in LIBS:
                trainers[(mode, lib)] = make_trainer(lib, pristine, mode, optim, total)
        start = time.perf_counter()
        results = measure(trainers, batches, args.steps, args.warmup)
        print(f"throughput: {args.warmup} warmup + {args.steps} timed steps per trainer, "
              f"interleaved; {time.perf_counter() - start:.0f} s")
        toks = report(results, shape, flops_tok, peak, modes)
        out["tokens_per_s"] = toks
        out["results"] = results
        del trainers
        print("\ntargets:")
        if "fp32" in modes:
            r = toks[("fp32", "formerkit")] / toks[("fp32", "transformers")]
            print(f"  formerkit fp32 >= 1.05x transformers fp32: {r:.3f}x  {_fmt_pass(r >= 1.05)}"
                  + ("" if r >= 1.05 else f" (short by {1.05 / r - 1:.1%})"))
        hf_bf16 = [m for m in ("bf16", "bf16-compile") if m in modes]
        if mode_default in modes and hf_bf16:
            best = max(hf_bf16, key=lambda m: toks[(m, "transformers")])
            r = toks[(mode_default, "formerkit")] / toks[(best, "transformers")]
            print(f"  formerkit default ({mode_default}) >= 1.2x best transformers ({best}): {r:.3f}x  "
                  f"{_fmt_pass(r >= 1.2)}" + ("" if r >= 1.2 else f" (short by {1.2 / r - 1:.1%})"))
            mfu = flops_tok * toks[(mode_default, "formerkit")] / peak["bf16"]
            print(f"  formerkit default MFU >= 60% of the bf16 peak: {mfu:.1%}  {_fmt_pass(mfu >= 0.6)}"
                  + ("" if mfu >= 0.6 else f" (needs {0.6 / mfu:.2f}x the throughput)"))
            fastest = max((m for m in modes if m.startswith("bf16")), key=lambda m: toks[(m, "formerkit")])
            if fastest != mode_default:
                mfu = flops_tok * toks[(fastest, "formerkit")] / peak["bf16"]
                print(f"    (formerkit's fastest mode, {fastest}: {mfu:.1%} of the bf16 peak)")
    if args.loss_steps:
        start = time.perf_counter()
        parity = loss_parity(pristine, batches, args.loss_steps, optim, mode_default)
        f = parity["final"]
        print(f"\nloss parity, {args.loss_steps} steps ({time.perf_counter() - start:.0f} s): formerkit default "
              f"({parity['precision']}, compile={parity['compile']}) {f['default']:.4f} vs fp32 {f['fp32']:.4f} "
              f"(mean of the last 10 steps; start {parity['losses']['fp32'][0]:.4f}): relative difference "
              f"{parity['rel_diff']:.2%}  {_fmt_pass(parity['rel_diff'] <= 0.02)} (<= 2%)")
        print(f"  step medians during it: default {parity['median_s']['default'] * 1e3:.0f} ms, "
              f"fp32 {parity['median_s']['fp32'] * 1e3:.0f} ms")
        out["parity"] = parity
    if args.profile:
        print(f"\nprofile ({args.profile} steps each, self CPU time per step by kind of work):")
        out["profile"] = {}
        profiled = [("formerkit", mode_default), ("transformers", "bf16")]
        if "bf16-compile" in modes:
            profiled.append(("transformers", "bf16-compile"))
        for lib, mode in profiled:
            tr = make_trainer(lib, pristine, mode, optim, total)
            prof = profile_breakdown(tr, batches, args.profile)
            wall, faults = prof.pop("_wall_per_step"), prof.pop("_page_faults_per_step")
            print(f"  {lib} {mode}: {wall * 1e3:.0f} ms/step, {faults:.0f} page faults/step")
            for cat, t in prof.items():
                print(f"    {cat:34s} {t * 1e3:7.1f} ms  {t / wall:6.1%}")
            out["profile"][(lib, mode)] = prof
    return out


if __name__ == "__main__":
    main()
