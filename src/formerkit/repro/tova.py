"""TOVA (Oren et al., "Transformers are Multi-State RNNs", 2024): at 1/8 of the KV cache, keeping the tokens the
current query attends to most stays close to the full cache and beats a sliding window of the same size.

A small Llama-style decoder is trained by formerkit's trainer on the standard library's email package
(byte tokens, 256-token windows). Held-out windows are then read token by token as generation reads
them (``formerkit.generate.eviction.policy_logits``: one decoding step per token, eviction after each)
with the full cache, with TOVA at a budget of 1/8 of the context (32 tokens), and with a sliding
window of the same 32 tokens; the measure is held-out perplexity.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F

from formerkit.generate.cache_policy import parse_cache_policy
from formerkit.generate.eviction import policy_logits
from formerkit.repro.common import bar_png
from formerkit.repro.registry import Outcome, Repro, register
from formerkit.repro.trained import trained_and_held_out

FULL = dict(layers=4, d_model=128, heads=4, seq_len=256, batch=8, package="email", steps=600, rows=4)
QUICK = dict(layers=1, d_model=32, heads=2, seq_len=32, batch=2, package="json", steps=3, rows=1)
BUDGET_SHARE = 8  # the budget is 1/8 of the context


def perplexity(model, rows: torch.Tensor, policy: str) -> float:
    """Held-out perplexity of rows (B, T) read one token at a time under the cache ``policy``."""
    logits = policy_logits(model, rows, parse_cache_policy(policy))  # (B, T, V)
    return math.exp(float(F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), rows[:, 1:].flatten())))


def run(seed: int, quick: bool, out_dir: Path) -> Outcome:
    """Train, read the held-out rows under each policy; the value is TOVA's perplexity over the full cache's."""
    shape = QUICK if quick else FULL
    model, x = trained_and_held_out(shape, seed)
    rows = x[:shape["rows"]]
    budget = shape["seq_len"] // BUDGET_SHARE
    ppl = {name: perplexity(model, rows, spec)
           for name, spec in (("full", "full"), (f"tova:{budget}", f"tova:{budget}"),
                              (f"sliding:{budget}", f"sliding:{budget}"))}
    full, tova, sliding = ppl.values()
    bar_png(out_dir / "tova.png", {f"held-out perplexity (budget {budget} of {shape['seq_len']})": ppl})
    return Outcome(
        value=tova / full,
        checks={"TOVA beats the sliding window of the same budget": tova < sliding},
        detail={"steps": shape["steps"], "context": shape["seq_len"], "budget": budget,
                "tokens": int(rows.numel()), "perplexity": ppl},
        table=[["cache", "held-out perplexity", "vs full"]] + [[n, p, p / full] for n, p in ppl.items()],
    )


register(Repro(
    name="tova",
    claim="TOVA at 1/8 of the KV cache stays within 10% of the full cache's perplexity and beats a sliding window "
          "of the same size",
    paper="Oren et al., Transformers are Multi-State RNNs (2024)",
    metric="perplexity, TOVA at 1/8 / full cache",
    threshold=1.10,
    direction="max",
    run=run,
    item=9,
))
