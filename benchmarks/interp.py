"""What caching and patching cost: formerkit.interp against TransformerLens on one Llama-shaped checkpoint.

transformers builds a Llama-shaped model (random init) and saves it with a tokenizer; formerkit
loads it, transformers loads it, and TransformerLens 4 boots its ``TransformerBridge`` from the same
directory offline (benchmarks/interp_models.py). On the same ids (batch x tokens of the shape) it times
the plain forward of each library, formerkit's forward with its hook points made bare identities
(the cost of unused hook points), ``run_with_cache`` storing every hook point and only
``hook_resid_post``, with the bytes of the tensors each cache stores (summed, and counting
shared memory once) and the peak rise of resident memory during
the call (``interp_models.peak_bytes``). Then a ``resid_pre`` patching sweep at batch 1 (clean and
corrupted prompts differ in one token): formerkit's batched ``get_act_patch_resid_pre``, one
formerkit forward per (layer, position) with one hook, and TransformerLens' own
``transformer_lens.patching.get_act_patch_resid_pre`` on the bridge. Times are the best of
``--repeats`` rounds, each round running every case once in turn (the forwards and caches after
one untimed warm-up round). It prints the machine, a table,
and the issue's targets with verdicts.

    python benchmarks/interp.py [--shape tiny|small|88m] [--batch-size 64] [--repeats 3] [--threads N]
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")  # read when torch imports tqdm; TransformerLens' sweeps draw bars
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import formerkit as fk  # noqa: E402
import interp_models as im  # noqa: E402
from formerkit.hardware import describe_machine  # noqa: E402
from formerkit.interp import get_act_name, run_with_cache, run_with_hooks  # noqa: E402
from formerkit.interp.patching import get_act_patch_resid_pre  # noqa: E402

RESID_POST = "hook_resid_post"


def is_resid_post(name: str) -> bool:
    """The names filter of the filtered caches."""
    return name.endswith(RESID_POST)


def naive_resid_pre(model: fk.Transformer, corrupted: torch.Tensor, cache, metric) -> torch.Tensor:
    """One forward per (layer, position), as TransformerLens runs it. Returns (n_layers, pos)."""
    out = torch.zeros(model.config.n_layers, corrupted.shape[1])
    for layer, pos in itertools.product(*map(range, out.shape)):
        name = get_act_name("resid_pre", layer)

        def patch(act, hook, pos=pos, name=name):
            act = act.clone()
            act[:, pos] = cache[name][:, pos]
            return act

        out[layer, pos] = metric(run_with_hooks(model, corrupted, fwd_hooks=[(name, patch)]))
    return out


def measure_caching(model: fk.Transformer, hf: torch.nn.Module, bridge, ids: torch.Tensor, repeats: int) -> dict:
    """Forward and cache times, cache bytes and peaks, and the largest resid_post difference of the two caches."""
    cases = {
        "fk_forward_s": lambda: model(ids),
        "fk_bare_forward_s": lambda: im.without_hook_points(model, ids),
        "hf_forward_s": lambda: hf(ids),
        "tl_forward_s": lambda: bridge(ids),
        "fk_cache_s": lambda: run_with_cache(model, ids),
        "tl_cache_s": lambda: bridge.run_with_cache(ids),
        "fk_resid_s": lambda: run_with_cache(model, ids, names_filter=is_resid_post),
        "tl_resid_s": lambda: bridge.run_with_cache(ids, names_filter=is_resid_post),
    }
    for fn in cases.values():  # warm-up: first calls pay for allocations and lazy initialisation
        fn()
    out = im.best_times(cases, repeats)
    for key in ("fk_forward", "tl_forward", "fk_cache", "tl_cache"):
        out[key + "_peak"] = im.peak_bytes(cases[key + "_s"])
    (_, ours), (_, theirs) = run_with_cache(model, ids), bridge.run_with_cache(ids)
    (out["fk_cache_bytes"], out["fk_cache_held"]), (out["tl_cache_bytes"], out["tl_cache_held"]) = map(
        im.cache_bytes, (ours, theirs))
    out |= {
            "fk_cache_entries": len(ours), "tl_cache_entries": len(theirs),
            "resid_post_diff": max((ours[n] - theirs[n]).abs().max().item() for n in ours if is_resid_post(n))}
    return out


def measure_sweep(model: fk.Transformer, bridge, vocab: int, positions: int, batch_size: int, repeats: int) -> dict:
    """The resid_pre sweep three ways: times, and the largest differences from formerkit's batched table."""
    from transformer_lens import patching

    clean = torch.randint(0, vocab, (1, positions), generator=torch.Generator().manual_seed(1))
    corrupted = clean.clone()
    corrupted[0, positions // 2] = (clean[0, positions // 2] + 1) % vocab
    answer, wrong = int(clean[0, -1]), (int(corrupted[0, -1]) + 1) % vocab

    def metric(logits: torch.Tensor) -> torch.Tensor:
        return (logits[:, -1, answer] - logits[:, -1, wrong]).mean()

    resid_pre = lambda n: n.endswith("hook_resid_pre")  # noqa: E731
    _, cache = run_with_cache(model, clean, names_filter=resid_pre)
    _, tl_cache = bridge.run_with_cache(clean, names_filter=resid_pre)
    tables = {}

    def keep(key: str, fn):
        return lambda: tables.__setitem__(key, fn())

    out = im.best_times({
        "fk_sweep_s": keep("fk", lambda: get_act_patch_resid_pre(model, corrupted, cache, metric,
                                                                 batch_size=batch_size)),
        "naive_sweep_s": keep("naive", lambda: naive_resid_pre(model, corrupted, cache, metric)),
        "tl_sweep_s": keep("tl", lambda: patching.get_act_patch_resid_pre(bridge, corrupted, tl_cache, metric)),
    }, repeats)
    return out | {"cells": tables["fk"].numel(), "max_diff": (tables["fk"] - tables["naive"]).abs().max().item(),
                  "tl_max_diff": (tables["fk"] - tables["tl"]).abs().max().item()}


def targets(r: dict) -> list[tuple[str, float, bool]]:
    """The issue's targets: (what, measured ratio, met)."""
    cache_speedup = r["tl_cache_s"] / r["fk_cache_s"]
    filtered = r["fk_resid_s"] / r["fk_forward_s"]
    sweep = r["tl_sweep_s"] / r["fk_sweep_s"]
    no_hook = r["fk_forward_s"] / r["fk_bare_forward_s"]
    return [
        (f"full cache >= 1.3x faster than TransformerLens ({cache_speedup:.2f}x) with <= its peak "
         f"({r['fk_cache_peak'] / 2**20:.0f} vs {r['tl_cache_peak'] / 2**20:.0f} MiB)", cache_speedup,
         cache_speedup >= 1.3 and r["fk_cache_peak"] <= r["tl_cache_peak"]),
        (f"resid_post cache within 5% of the plain forward ({filtered:.3f}x)", filtered, filtered <= 1.05),
        (f"patching sweep >= 3x faster than TransformerLens ({sweep:.2f}x)", sweep, sweep >= 3),
        (f"forward with no hooks within 1% of one without hook points ({no_hook:.3f}x)", no_hook, no_hook <= 1.01),
    ]


def report(r: dict) -> None:
    """Print the machine, the table and the targets."""
    mib = lambda b: f"{b / 2**20:.1f} MiB"  # noqa: E731
    ms = lambda s: f"{s * 1e3:.1f} ms"  # noqa: E731
    print(describe_machine())
    print(f"llama-shaped {r['shape']}: {r['params'] / 1e6:.1f}M parameters; caches on {r['batch']} x {r['tokens']} "
          f"tokens; resid_pre sweep of {r['cells']} patches at batch 1")
    rows = [
        ("forward", ms(r["fk_forward_s"]), ms(r["tl_forward_s"]), f"transformers {ms(r['hf_forward_s'])}"),
        ("forward, hook points bare", ms(r["fk_bare_forward_s"]), "", ""),
        ("run_with_cache, every hook", ms(r["fk_cache_s"]), ms(r["tl_cache_s"]), ""),
        ("  tensors, their bytes", f"{r['fk_cache_entries']}, {mib(r['fk_cache_bytes'])}",
         f"{r['tl_cache_entries']}, {mib(r['tl_cache_bytes'])}", ""),
        ("  distinct storages' bytes", mib(r["fk_cache_held"]), mib(r["tl_cache_held"]), ""),
        ("  peak rise (forward alone)", f"{mib(r['fk_cache_peak'])} ({mib(r['fk_forward_peak'])})",
         f"{mib(r['tl_cache_peak'])} ({mib(r['tl_forward_peak'])})", ""),
        ("run_with_cache, resid_post", ms(r["fk_resid_s"]), ms(r["tl_resid_s"]), ""),
        ("resid_pre sweep", f"{r['fk_sweep_s']:.3f} s", f"{r['tl_sweep_s']:.3f} s",
         f"one forward per patch {r['naive_sweep_s']:.3f} s"),
    ]
    print(f"  {'':30} {'formerkit':>22} {'TransformerLens':>22}")
    for label, ours, theirs, note in rows:
        print(f"  {label:30} {ours:>22} {theirs:>22}  {note}")
    print(f"  largest differences: resid_post caches {r['resid_post_diff']:.1e}, sweep vs one forward per patch "
          f"{r['max_diff']:.1e}, vs TransformerLens {r['tl_max_diff']:.1e}")
    for what, _, met in targets(r):
        print(f"  target {'met' if met else 'MISSED'}: {what}")


def main(argv: list[str] | None = None) -> dict:
    """Build the checkpoint, load it three ways, measure; print and return the measurements."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=list(im.SHAPES), default="small")
    parser.add_argument("--batch-size", type=int, default=64, help="rows per patched forward")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    shape = im.SHAPES[args.shape]
    batch, tokens = shape["cache_input"]
    with tempfile.TemporaryDirectory() as tmp, torch.no_grad():
        vocab = im.save_checkpoint(args.shape, Path(tmp))
        model, hf, bridge = im.load_all(Path(tmp))
        ids = torch.randint(0, vocab, (batch, tokens), generator=torch.Generator().manual_seed(0))
        result = {"shape": args.shape, "params": sum(p.numel() for p in model.parameters()), "batch": batch,
                  "tokens": tokens}
        result |= measure_caching(model, hf, bridge, ids, args.repeats)
        result |= measure_sweep(model, bridge, vocab, shape["positions"], args.batch_size, args.repeats)
    report(result)
    return result


if __name__ == "__main__":
    main()
