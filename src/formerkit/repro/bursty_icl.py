"""Bursty data and in-context learning (Chan et al., "Data Distributional Properties Drive Emergent In-Context
Learning in Transformers", NeurIPS 2022).

Each sequence is 8 (item, label) pairs followed by a query item; the model predicts the query's label.
Training items belong to 512 classes drawn with Zipfian (long-tailed) frequencies, each with a fixed
label of 32. Two copies of the same small Transformer are trained on different data:

- bursty: the context holds 4 pairs of the query's class and 4 of one other class, so the answer is
  also in the context (and rare classes are seen too seldom to memorise);
- i.i.d.: the 8 context items are drawn independently from the same Zipfian distribution, so the
  query's class is rarely in the context.

In-context learning is then measured on 64 held-out classes never seen in training: two of them fill
the context (4 pairs each) with two labels assigned at random for that sequence only, and the query is
one of them; only reading the context can answer. The measure is the few-shot 2-way accuracy: the
model's choice between the two labels the context shows (chance: 1/2). In-weights learning is measured on
the 64 most frequent training classes with no exemplar of the query in the context.
"""

from __future__ import annotations

from pathlib import Path

import torch

from formerkit.config import ModelConfig
from formerkit.heads import IGNORE_INDEX
from formerkit.model import Transformer
from formerkit.repro.common import bar_png, fit
from formerkit.repro.registry import Outcome, Repro, register

CLASSES, HELD_OUT, LABELS, PAIRS = 512, 64, 32, 8
ITEMS = CLASSES + HELD_OUT  # item tokens 0 .. ITEMS - 1; label tokens follow them
CHANCE_MARGIN = 0.15  # "no in-context learning": within this of chance (1/2)


def zipf_probabilities(n: int, exponent: float = 1.0) -> torch.Tensor:
    """Class probabilities proportional to 1 / rank**exponent: (n,)."""
    weights = 1.0 / torch.arange(1, n + 1, dtype=torch.float64) ** exponent
    return (weights / weights.sum()).float()


def fixed_labels() -> torch.Tensor:
    """The label token of every training class (its class id mod the label count, offset past the items): (CLASSES,)."""
    return ITEMS + torch.arange(CLASSES) % LABELS


def sequences(items: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids (B, 2 * PAIRS + 2): the context pairs, the query item and its label; and the causal-LM labels
    (B, 2 * PAIRS + 2), where only the query's label is a target (predicted after the query item).

    items: (B, PAIRS + 1) item tokens, the last the query; labels: (B, PAIRS + 1) their label tokens.
    """
    B = items.shape[0]
    ids = torch.stack([items, labels], dim=2).reshape(B, 2 * (PAIRS + 1))  # (B, 2 * PAIRS + 2)
    lm_labels = torch.full_like(ids, IGNORE_INDEX)
    lm_labels[:, -1] = ids[:, -1]
    return ids, lm_labels


def _two_class_context(first: torch.Tensor, second: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Items (B, PAIRS + 1): 4 of ``first`` and 4 of ``second`` (B,) in shuffled order, then ``first`` as query."""
    B = first.shape[0]
    half = PAIRS // 2
    context = torch.cat([first[:, None].expand(B, half), second[:, None].expand(B, half)], dim=1)  # (B, PAIRS)
    order = torch.rand(B, PAIRS, generator=gen).argsort(dim=1)
    return torch.cat([context.gather(1, order), first[:, None]], dim=1)


def training_batch(bursty: bool, batch: int, probs: torch.Tensor, gen: torch.Generator
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """One training batch (ids, LM labels) of bursty or i.i.d. sequences over the training classes."""
    if bursty:
        query = torch.multinomial(probs, batch, replacement=True, generator=gen)
        other = torch.multinomial(probs, batch, replacement=True, generator=gen)
        other = torch.where(other == query, (other + 1) % CLASSES, other)  # two distinct classes
        items = _two_class_context(query, other, gen)
    else:
        items = torch.multinomial(probs, batch * (PAIRS + 1), replacement=True, generator=gen).view(batch, PAIRS + 1)
    return sequences(items, fixed_labels()[items])


def icl_batch(batch: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Held-out classes with labels assigned for one sequence only: (ids, LM labels)."""
    pair = torch.rand(batch, HELD_OUT, generator=gen).argsort(dim=1)[:, :2] + CLASSES  # two distinct held-out classes
    items = _two_class_context(pair[:, 0], pair[:, 1], gen)
    chosen = torch.rand(batch, LABELS, generator=gen).argsort(dim=1)[:, :2] + ITEMS  # two distinct labels
    labels = torch.where(items == pair[:, :1], chosen[:, :1], chosen[:, 1:])
    return sequences(items, labels)


def iwl_batch(batch: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Frequent training classes as queries, the context drawn from other training classes: (ids, LM labels)."""
    query = torch.randint(0, HELD_OUT, (batch,), generator=gen)  # the 64 most frequent classes
    context = torch.randint(HELD_OUT, CLASSES, (batch, PAIRS), generator=gen)
    items = torch.cat([context, query[:, None]], dim=1)
    return sequences(items, fixed_labels()[items])


@torch.no_grad()
def accuracy(model: Transformer, ids: torch.Tensor, labels: torch.Tensor, *, among_context: bool = False) -> float:
    """Share of sequences whose query label (the last token) is the model's choice after the query item: the
    argmax over the whole vocabulary, or with ``among_context`` over the labels the context shows (the
    few-shot 2-way accuracy, chance 1/2)."""
    logits = model(ids[:, :-1]).logits[:, -1].float()  # (B, V)
    if among_context:
        shown = torch.zeros_like(logits, dtype=torch.bool).scatter_(1, ids[:, 1:2 * PAIRS:2], True)  # (B, V)
        logits = logits.masked_fill(~shown, float("-inf"))
    return float((logits.argmax(-1) == ids[:, -1]).float().mean())


def run(seed: int, quick: bool, out_dir: Path) -> Outcome:
    """Train on bursty and on i.i.d. data; the value is the bursty model's in-context accuracy on new classes."""
    steps, batch, width = (20, 16, 32) if quick else (3000, 64, 64)
    probs = zipf_probabilities(CLASSES)
    results = {}
    for name, bursty in (("bursty", True), ("i.i.d.", False)):
        torch.manual_seed(seed)
        gen = torch.Generator().manual_seed(seed)
        model = Transformer(ModelConfig(vocab_size=ITEMS + LABELS, d_model=width, n_layers=2, n_heads=4,
                                        d_ff=4 * width, max_seq_len=2 * PAIRS + 2, position="learned",
                                        tie_embeddings=False))

        def loss_at(step: int, model: Transformer = model, bursty: bool = bursty, gen: torch.Generator = gen):
            ids, labels = training_batch(bursty, batch, probs, gen)
            return model(ids, labels=labels).loss

        fit(model, loss_at, steps, lr=1e-3, warmup=steps // 20, weight_decay=0.0)
        test = torch.Generator().manual_seed(seed + 1000)
        icl = icl_batch(2000, test)
        results[name] = {"icl": accuracy(model, *icl, among_context=True), "icl_any_token": accuracy(model, *icl),
                         "iwl": accuracy(model, *iwl_batch(2000, test))}
    bar_png(out_dir / "bursty_icl.png",
            {"in-context accuracy, new classes (chance 0.5)": {n: r["icl"] for n, r in results.items()},
             "in-weights accuracy, frequent classes": {n: r["iwl"] for n, r in results.items()}})
    table = [["training data", "in-context 2-way accuracy (new classes)", "same, argmax over every token",
              "in-weights accuracy (frequent classes)"]]
    table += [[n, r["icl"], r["icl_any_token"], r["iwl"]] for n, r in results.items()]
    return Outcome(
        value=results["bursty"]["icl"],
        checks={f"the i.i.d.-trained model stays within {CHANCE_MARGIN} of chance in context":
                abs(results["i.i.d."]["icl"] - 0.5) <= CHANCE_MARGIN},
        detail={"steps": steps, "batch": batch, "d_model": width, "classes": CLASSES, "held_out": HELD_OUT,
                "labels": LABELS, "results": results},
        table=table,
    )


register(Repro(
    name="bursty-icl",
    claim="in-context learning emerges when training data are bursty and long-tailed, not when they are i.i.d.",
    paper="Chan et al., Data Distributional Properties Drive Emergent In-Context Learning in Transformers "
          "(NeurIPS 2022)",
    metric="in-context accuracy on new classes, bursty training",
    threshold=0.8,
    direction="min",
    run=run,
    item=5,
))
