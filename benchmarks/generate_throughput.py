"""Generation throughput: formerkit's ``generate`` vs transformers' ``generate`` (and llama.cpp) on the same weights.

Models: GPT-2-shaped decoders with a vocabulary of 8192 — "small" (6 layers, d_model 384,
6 heads) and "base" (12 layers, d_model 768, 12 heads) — and "llama", the Llama shape a CPU
user runs locally (12 layers, d_model 768, 12 heads, 4 KV heads, d_ff 2048: 88.1M parameters).
transformers builds each one (random init, sdpa attention) and saves it; formerkit loads that
directory, so both run identical weights, and the fp32 greedy tokens are checked to be equal
before any timing.

Each measurement generates ``--new-tokens`` tokens greedily after a ``--prompt-len``-token
prompt, at batch 1 and batch 8, with no EOS (every row produces every token); tokens/s
counts new tokens of all rows over the whole call (prefill included, as a user sees it).
``--prompt-speed N`` also times a prompt of N tokens (and one new token) at batch 1.
Precisions: fp32 and bf16 weights for both libraries, and formerkit's weight-only int8
(bf16 activations, ``quantize_int8``) and int4 (bf16 activations, ``quantize_int4`` in groups
of ``--group-size``, asymmetric; the float32 model is quantized, then converted to bf16).
The runs of all variants alternate, ``--repeats`` rounds, and the best round of each is
reported (the least disturbed by other work).

``--llamacpp`` (llama-shaped models; needs ``make bench-decode``'s optional reference) adds
llama.cpp on the same weights, converted by its own converter to f32, bf16 and q8_0 (for
formerkit's int8) and by its own quantizer to q4_0 (for formerkit's int4), and timed at
batch 1 in a child process per round (``llamacpp.py``). llama.cpp's rate counts the decode steps
after the prompt only, so a third table (and the targets) compares formerkit's and transformers'
decode steps alone too: (N - 1) / (time of N new tokens - time of 1), prefill and first token left out.

The bound: at batch 1 decoding is memory-bound, since every new token reads every weight
matrix once (the embedding lookup reads one row). The machine's read bandwidth is measured
(summing a 512 MB tensor, best of a few) and

    bound tokens/s = bandwidth / bytes of linear weights and LM head per token

(times the batch size at batch 8, where one weight read serves every row; compute may bind
first there). Weights that fit in the L3 cache can beat this DRAM bound.

    python benchmarks/generate_throughput.py [--models small,base,llama] [--batches 1,8]
        [--precisions fp32,bf16,int8,int4] [--group-size 64] [--new-tokens 200] [--prompt-speed 512] [--llamacpp]
        [--repeats 3] [--threads N]
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import transformers  # noqa: E402

import formerkit as fk  # noqa: E402
from formerkit.data import stdlib_source  # noqa: E402
from formerkit.hardware import describe_machine  # noqa: E402
from formerkit.layers.int4 import quantize_int4  # noqa: E402
from formerkit.layers.quantized import quantize_int8  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import llamacpp  # noqa: E402

transformers.logging.set_verbosity_error()

VOCAB = 8192
# family, n_layers, d_model, n_heads, n_kv_heads, d_ff
SHAPES = {"small": ("gpt2", 6, 384, 6, 6, 1536), "base": ("gpt2", 12, 768, 12, 12, 3072),
          "tiny": ("gpt2", 2, 64, 2, 2, 256), "llama": ("llama", 12, 768, 12, 4, 2048),
          "llama-tiny": ("llama", 2, 64, 4, 2, 128)}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "int8": torch.bfloat16, "int4": torch.bfloat16}
TARGETS = {"small": 4.0, "base": 1.5}  # formerkit / transformers tokens/s at batch 1
INT8_TARGET = 1.6  # formerkit int8 / formerkit fp32 on the base model
LLAMACPP_TARGETS = {"fp32": 1.0, "bf16": 0.9, "int8": 0.9, "int4": 0.9}  # formerkit / llama.cpp at batch 1


@dataclass(frozen=True)
class Run:
    """One timed variant: a model size, batch size, precision and library."""

    model: str
    batch: int
    precision: str
    library: str


def read_bandwidth(megabytes: int = 512, repeats: int = 5) -> float:
    """The machine's memory read bandwidth in bytes/s: the best of ``repeats`` sums of a large fp32 tensor."""
    x = torch.ones(megabytes * 2**20 // 4)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - start)
    return x.numel() * 4 / best


def weight_bytes_per_token(model: torch.nn.Module) -> int:
    """Bytes one decode step reads from weights: every linear layer's weight (and scales, zero points), once."""
    total = 0
    for module in model.modules():
        if isinstance(module, torch.nn.Linear):
            total += module.weight.numel() * module.weight.element_size()
        elif type(module).__name__ in ("Int8Linear", "Int4Linear"):
            total += sum(t.numel() * t.element_size() for t in module.buffers(recurse=False))
    return total


def save_reference(name: str, directory: Path, seed: int = 0) -> torch.nn.Module:
    """Build a random-init transformers model of the named shape, save it (and a tokenizer) to ``directory``; return it.

    "llama" is a ``LlamaForCausalLM`` with grouped-query attention and SwiGLU (std 0.1 weights, so
    greedy argmaxes are not near-ties); the others are ``GPT2LMHeadModel``s. A byte-level BPE
    tokenizer of the vocabulary's size, trained on the standard library's source, goes beside the
    llama weights: llama.cpp's converter needs one.
    """
    family, n_layers, d_model, n_heads, n_kv_heads, d_ff = SHAPES[name]
    torch.manual_seed(seed)
    if family == "llama":
        config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=d_model, num_hidden_layers=n_layers,
                                          num_attention_heads=n_heads, num_key_value_heads=n_kv_heads,
                                          intermediate_size=d_ff, max_position_embeddings=1024,
                                          initializer_range=0.1, tie_word_embeddings=False,
                                          attn_implementation="sdpa")
        theirs = transformers.LlamaForCausalLM(config).eval()
        fk.train_bpe(stdlib_texts(), VOCAB, max_chars=2_000_000).save(directory)
    else:
        config = transformers.GPT2Config(vocab_size=VOCAB, n_positions=1024, n_embd=d_model, n_layer=n_layers,
                                         n_head=n_heads, attn_implementation="sdpa")
        theirs = transformers.GPT2LMHeadModel(config).eval()
    theirs.save_pretrained(directory)
    return theirs


def build_pair(name: str, directory: Path) -> tuple[torch.nn.Module, torch.nn.Module]:
    """The transformers model of the named shape saved to ``directory``, and formerkit's load of it: (ours, theirs)."""
    theirs = save_reference(name, directory)
    return fk.from_pretrained(directory).eval(), theirs


def variants(ours: torch.nn.Module, theirs: torch.nn.Module, precisions: list[str], group_size: int = 64) -> dict:
    """Models per (precision, library): fp32 and bf16 copies of both, formerkit's int8 and int4 (bf16 activations)."""
    out = {}
    for precision in precisions:
        if precision == "int8":
            out[precision, "formerkit"] = quantize_int8(copy.deepcopy(ours).to(torch.bfloat16))
            continue
        if precision == "int4":
            out[precision, "formerkit"] = quantize_int4(copy.deepcopy(ours), group_size).to(torch.bfloat16)
            continue
        dtype = DTYPES[precision]
        out[precision, "formerkit"] = copy.deepcopy(ours).to(dtype)
        out[precision, "transformers"] = copy.deepcopy(theirs).to(dtype)
    return out


def generator(library: str, model: torch.nn.Module, prompt: torch.Tensor, new_tokens: int):
    """A no-argument callable that generates ``new_tokens`` greedy tokens after ``prompt`` (B, T)."""
    if library == "formerkit":
        return lambda: fk.generate(model, prompt, max_new_tokens=new_tokens)
    mask = torch.ones_like(prompt)
    return lambda: model.generate(prompt, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                  do_sample=False, pad_token_id=0)


def check_same_tokens(ours: torch.nn.Module, theirs: torch.nn.Module, prompt: torch.Tensor, new_tokens: int) -> bool:
    """Whether both libraries' fp32 greedy continuations of ``prompt`` are identical."""
    with torch.no_grad():
        a = generator("formerkit", ours, prompt, new_tokens)()
        b = generator("transformers", theirs, prompt, new_tokens)()
    return torch.equal(a, b)


def measure(models: dict, prompts: dict[int, torch.Tensor], name: str, new_tokens: int, repeats: int,
            ggufs: dict[str, Path], speed_prompt: torch.Tensor | None
            ) -> tuple[dict[Run, float], dict[Run, float], dict[Run, float]]:
    """Best decode and prompt tokens/s of every variant over ``repeats`` alternating rounds: (decode, prompt, steps).

    Decode: every (batch, precision, library) generates ``new_tokens`` after its prompt, timed
    whole. Prompt (when ``speed_prompt`` is given): batch 1, that prompt and one new token.
    llama.cpp (``ggufs``: precision -> converted file) runs batch 1 in a child process per round.
    Steps (batch 1, with ``ggufs``): the decode steps alone, as llama.cpp's rate counts them:
    (new_tokens - 1) / (best time of new_tokens - best time of 1 new token), so the prefill and the
    first token are left out on both sides.
    """
    calls, prompt_calls, first_calls = {}, {}, {}
    for (precision, library), model in models.items():
        for batch, prompt in prompts.items():
            calls[Run(name, batch, precision, library)] = generator(library, model, prompt, new_tokens)
            if batch == 1 and ggufs:
                first_calls[Run(name, batch, precision, library)] = generator(library, model, prompt, 1)
        if speed_prompt is not None:
            prompt_calls[Run(name, 1, precision, library)] = generator(library, model, speed_prompt, 1)
    decode, prefill = dict.fromkeys(calls, 0.0), dict.fromkeys(prompt_calls, 0.0)
    whole, first = dict.fromkeys(first_calls, float("inf")), dict.fromkeys(first_calls, float("inf"))
    threads, short = torch.get_num_threads(), prompts[1][0].tolist() if 1 in prompts else []
    long = speed_prompt[0].tolist() if speed_prompt is not None else short
    with torch.no_grad():
        for call in [*calls.values(), *prompt_calls.values()]:
            call()  # warm up: allocator, kernels, lazy initialisation
        for _ in range(repeats):
            for table, timed, tokens in ((decode, calls, new_tokens), (prefill, prompt_calls, None)):
                for run, call in timed.items():
                    start = time.perf_counter()
                    call()
                    done = run.batch * new_tokens if tokens else speed_prompt.shape[1]
                    seconds = time.perf_counter() - start
                    table[run] = max(table[run], done / seconds)
                    if run in whole and timed is calls:
                        whole[run] = min(whole[run], seconds)
            for run, call in first_calls.items():
                start = time.perf_counter()
                call()
                first[run] = min(first[run], time.perf_counter() - start)
            for precision, gguf in ggufs.items():
                got = llamacpp.measure(gguf, threads, short, long, new_tokens)
                run = Run(name, 1, precision, "llama.cpp")
                decode[run] = max(decode.get(run, 0.0), got["decode_tps"])
                if speed_prompt is not None:
                    prefill[run] = max(prefill.get(run, 0.0), got["prompt_tps"])
    steps = {run: (new_tokens - 1) / max(whole[run] - first[run], 1e-9) for run in first_calls}
    steps.update({run: tps for run, tps in decode.items() if run.library == "llama.cpp"})
    return decode, prefill, steps


def _table(title: str, rates: dict[Run, float], batches: bool, ratios: dict, key: str,
           bound_per_row: dict[str, float] | None) -> None:
    """Print one table: formerkit's tokens/s per (batch,) precision beside transformers' and llama.cpp's, ratios
    (recorded in ``ratios`` under (batch, precision, key + library)) and, with ``bound_per_row``
    (precision -> tokens/s of one row at the bandwidth bound), the bound and formerkit's share of it."""
    bound_head = f" {'bound':>8} {'% of bound':>11}" if bound_per_row else ""
    print(f"{'batch' if batches else '':>5} {'precision':>9} {'formerkit':>10} {'transformers':>13} {'ratio':>6} "
          f"{'llama.cpp':>10} {'ratio':>6}{bound_head}   ({title})")
    for run in sorted((r for r in rates if r.library == "formerkit"), key=lambda r: (r.batch, r.precision)):
        ours = rates[run]
        line = f"{run.batch if batches else '':>5} {run.precision:>9} {ours:10.1f}"
        for library, width in (("transformers", 13), ("llama.cpp", 10)):
            theirs = rates.get(Run(run.model, run.batch, run.precision, library))
            ratios[run.batch, run.precision, key + library] = ours / theirs if theirs else None
            line += f" {theirs:{width}.1f} {ours / theirs:5.2f}x" if theirs else f" {'-':>{width}} {'-':>6}"
        if bound_per_row:
            bound = run.batch * bound_per_row[run.precision]
            line += f" {bound:8.1f} {ours / bound:10.0%}"
        print(line)


def report(name: str, best: dict[Run, float], prefill: dict[Run, float], bandwidth: float,
           weight_bytes: dict[str, int], steps: dict[Run, float] | None = None) -> dict:
    """Print one model's tables (decode and prompt tokens/s per library, ratios, bound); return the ratios.

    The ratios are formerkit's tokens/s over each reference's at the same precision and batch:
    {(batch, precision, "transformers" | "llama.cpp" | "prompt llama.cpp" | "steps llama.cpp" ...): ratio};
    with ``steps`` (decode steps alone, batch 1) a third table compares those like for like.
    """
    _, n_layers, d_model, *_ = SHAPES[name]
    print(f"\n{name}: {n_layers} layers, d_model {d_model}, vocab {VOCAB}")
    per_row = {precision: bandwidth / size for precision, size in weight_bytes.items()}
    ratios: dict = {}
    _table("decode tokens/s", best, True, ratios, "", per_row)
    if prefill:
        _table("prompt tokens/s, batch 1", prefill, False, ratios, "prompt ", None)
    if steps:
        _table("decode steps alone, tokens/s, batch 1", steps, False, ratios, "steps ", per_row)
    return ratios


def convert_all(directory: Path, precisions: list[str]) -> dict[str, Path]:
    """llama.cpp's GGUF files of the checkpoint in ``directory``, one per precision (int8 -> q8_0, int4 -> q4_0)."""
    return {p: llamacpp.convert(directory, directory / f"model-{llamacpp.OUTTYPES[p]}.gguf", p) for p in precisions}


def print_targets(results: dict, names: list[str], precisions: list[str]) -> None:
    """Print each target and its verdict: against transformers (GPT-2 shapes) and llama.cpp (the llama shape)."""
    print("\ntargets (batch 1, formerkit / reference at the same precision):")
    for name in names:
        ratios = results["ratios"][name]
        for precision in precisions:
            ratio = ratios.get((1, precision, "transformers"))
            if name in TARGETS and ratio is not None:
                verdict = "met" if ratio >= TARGETS[name] else f"missed ({ratio / TARGETS[name]:.0%} of it)"
                print(f"  {name} {precision} vs transformers: {ratio:.2f}x, target {TARGETS[name]}x: {verdict}")
            ratio, target = ratios.get((1, precision, "steps llama.cpp")), LLAMACPP_TARGETS.get(precision)
            if ratio is not None and target is not None:
                verdict = "met" if ratio >= target else f"missed ({ratio / target:.0%} of it)"
                print(f"  {name} {precision} vs llama.cpp {llamacpp.OUTTYPES[precision]} (decode steps alone): "
                      f"{ratio:.2f}x, target {target}x: {verdict}")
        fp32 = results["best"].get(Run(name, 1, "fp32", "formerkit"))
        for precision in ("int8", "int4"):
            quantized = results["best"].get(Run(name, 1, precision, "formerkit"))
            if not (fp32 and quantized):
                continue
            gain = quantized / fp32
            results.setdefault(f"{precision}_gain", {})[name] = gain
            target = f", target {INT8_TARGET}x: {'met' if gain >= INT8_TARGET else 'missed'}" \
                if name == "base" and precision == "int8" else ""
            print(f"  {name} {precision} / own fp32 at batch 1: {gain:.2f}x{target}")


def stdlib_texts():
    """The standard library's source files as texts (the tokenizer's training corpus)."""
    return stdlib_source().documents()


def main(argv: list[str] | None = None) -> dict:
    """Run the benchmark; return the measurements (used by the smoke test)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="small,base", help=f"comma-separated subset of {','.join(SHAPES)}")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--precisions", default="fp32,bf16,int8", help="comma-separated subset of "
                        f"{','.join(DTYPES)}")
    parser.add_argument("--group-size", type=int, default=64, help="int4: input features per scale and zero point")
    parser.add_argument("--prompt-len", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=200)
    parser.add_argument("--prompt-speed", type=int, default=0, help="also time a prompt of this many tokens")
    parser.add_argument("--llamacpp", action="store_true", help="add llama.cpp columns (llama-shaped models)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    names, precisions = args.models.split(","), args.precisions.split(",")
    batches = [int(b) for b in args.batches.split(",")]
    if args.llamacpp and (why := llamacpp.available()):
        raise SystemExit(f"--llamacpp: {why}")
    bandwidth = read_bandwidth()
    print(f"{describe_machine()}\ntorch {torch.__version__}, transformers {transformers.__version__}, "
          f"{torch.get_num_threads()} threads; measured read bandwidth {bandwidth / 1e9:.1f} GB/s")
    results: dict = {"bandwidth": bandwidth, "best": {}, "prefill": {}, "ratios": {}, "same_tokens": {}}
    generator_seed = torch.Generator().manual_seed(0)
    for name in names:
        with tempfile.TemporaryDirectory() as tmp:
            directory = Path(tmp)
            ours, theirs = build_pair(name, directory)
            prompts = {b: torch.randint(0, VOCAB, (b, args.prompt_len), generator=generator_seed) for b in batches}
            speed = torch.randint(0, VOCAB, (1, args.prompt_speed), generator=generator_seed) \
                if args.prompt_speed else None
            results["same_tokens"][name] = same = check_same_tokens(ours, theirs, prompts[batches[0]], args.new_tokens)
            print(f"\n{name}: fp32 greedy tokens identical to transformers': {same}")
            ggufs = convert_all(directory, precisions) if args.llamacpp and SHAPES[name][0] == "llama" else {}
            models = variants(ours, theirs, precisions, args.group_size)
            weight_bytes = {p: weight_bytes_per_token(models[p, "formerkit"]) for p in precisions}
            best, prefill, steps = measure(models, prompts, name, args.new_tokens, args.repeats, ggufs, speed)
            if "fp32" in ggufs:
                results["llamacpp_agreement"] = agreement(ours, prompts, ggufs["fp32"], args.new_tokens)
        results["best"].update(best)
        results["prefill"].update(prefill)
        results.setdefault("steps", {}).update(steps)
        results["ratios"][name] = report(name, best, prefill, bandwidth, weight_bytes, steps)
    print_targets(results, names, precisions)
    return results


def agreement(ours: torch.nn.Module, prompts: dict[int, torch.Tensor], gguf: Path, new_tokens: int) -> int:
    """How many of formerkit's fp32 greedy tokens match llama.cpp's f32 ones before the first difference (printed)."""
    prompt = prompts[min(prompts)][:1]
    with torch.no_grad():
        mine = fk.generate(ours, prompt, max_new_tokens=new_tokens)[0, prompt.shape[1]:].tolist()
    theirs = llamacpp.measure(gguf, torch.get_num_threads(), prompt[0].tolist(), prompt[0].tolist(), new_tokens)
    same = next((i for i, (a, b) in enumerate(zip(mine, theirs["tokens"], strict=True)) if a != b), len(mine))
    print(f"fp32 greedy tokens equal to llama.cpp f32's: the first {same} of {len(mine)}")
    return same


if __name__ == "__main__":
    main()
