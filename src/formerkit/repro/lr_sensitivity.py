"""Learning-rate sensitivity and attention-logit growth (Wortsman et al., "Small-scale proxies for large-scale
Transformer training instabilities", ICLR 2024).

Small decoders with and without ``qk_norm`` (each head's queries and keys normalized, the paper's
qk-layernorm) train at learning rates from 3e-4 to 3e-1 on a synthetic language: a sparse random
Markov chain whose second half repeats the first, so attention matters. LR sensitivity is the
paper's E_lr[min(loss(lr), loss_init) - min_lr loss(lr)] over the grid; the attention logits are
the largest |q·k| / sqrt(d_head) seen in training (read at ``hook_attn_scores``).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from formerkit.config import ModelConfig
from formerkit.interp.run import hooks
from formerkit.model import Transformer
from formerkit.repro.common import fit, line_png
from formerkit.repro.registry import Outcome, Repro, register

VOCAB = 64


def markov_chain(gen: torch.Generator, vocab: int, successors: int = 4) -> torch.Tensor:
    """A transition matrix (vocab, vocab): each symbol goes to ``successors`` random others, with random weights."""
    probs = torch.zeros(vocab, vocab)
    for s in range(vocab):
        nxt = torch.randperm(vocab, generator=gen)[:successors]
        probs[s, nxt] = torch.rand(successors, generator=gen) + 0.1
    return probs / probs.sum(1, keepdim=True)


def repeated_markov_batch(gen: torch.Generator, chain: torch.Tensor, batch: int, half: int) -> torch.Tensor:
    """Ids (B, 2 * half): ``half`` steps of the chain from a uniform start, then the same ``half`` tokens again."""
    ids = torch.empty(batch, half, dtype=torch.long)
    ids[:, 0] = torch.randint(0, chain.shape[0], (batch,), generator=gen)
    for t in range(1, half):
        ids[:, t] = torch.multinomial(chain[ids[:, t - 1]], 1, generator=gen).squeeze(1)
    return torch.cat([ids, ids], dim=1)


def lr_sensitivity(final: list[float], initial: float) -> float:
    """The paper's LR sensitivity: mean over the grid of min(loss, initial) - the best loss (non-finite = initial)."""
    capped = [min(x, initial) if math.isfinite(x) else initial for x in final]
    return sum(capped) / len(capped) - min(capped)


def _train_one(qk_norm: bool, lr: float, seed: int, steps: int, batch: int, half: int,
               chain: torch.Tensor) -> dict:
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = Transformer(ModelConfig(vocab_size=VOCAB, d_model=64, n_layers=2, n_heads=4, d_ff=256,
                                    max_seq_len=2 * half, position="rope", qk_norm=qk_norm, qkv_bias=False,
                                    tie_embeddings=False))
    largest = [0.0]

    def watch(scores: torch.Tensor, hook) -> None:
        s = scores.detach()
        real = s > torch.finfo(s.dtype).min / 2  # (B, H, T, T): the causal entries
        top = float(s.abs().masked_fill(~real, 0).max())
        if math.isfinite(top):
            largest[0] = max(largest[0], top)

    def loss_at(step: int) -> torch.Tensor:
        return model(ids := repeated_markov_batch(gen, chain, batch, half), labels=ids).loss

    eval_gen = torch.Generator().manual_seed(seed + 1000)
    held_out = [repeated_markov_batch(eval_gen, chain, 64, half) for _ in range(4)]

    def evaluate() -> float:
        with torch.no_grad():
            return sum(float(model(ids, labels=ids).loss) for ids in held_out) / len(held_out)

    initial = evaluate()
    with hooks(model, [(lambda name: name.endswith("hook_attn_scores"), watch)]):
        losses = fit(model, loss_at, steps, lr=lr, warmup=steps // 10, weight_decay=1e-4, grad_clip=0.0)
    final = evaluate() if math.isfinite(losses[-1]) else float("nan")
    return {"qk_norm": qk_norm, "lr": lr, "initial": initial, "final": final, "max_attn_logit": largest[0],
            "diverged": not math.isfinite(final)}


def run(seed: int, quick: bool, out_dir: Path) -> Outcome:
    """Train the grid of learning rates with and without qk_norm; compare LR sensitivity and attention logits."""
    lrs, steps, batch, half = (([1e-3, 1e-1], 12, 8, 8) if quick else
                               ([3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1], 300, 32, 32))
    chain = markov_chain(torch.Generator().manual_seed(seed), VOCAB)
    runs = [_train_one(qk, lr, seed, steps, batch, half, chain) for qk in (False, True) for lr in lrs]
    table = [["qk_norm", "lr", "final loss", "max attention logit"]]
    table += [[r["qk_norm"], r["lr"], r["final"], r["max_attn_logit"]] for r in runs]
    sens = {}
    for qk in (False, True):
        mine = [r for r in runs if r["qk_norm"] == qk]
        sens[qk] = lr_sensitivity([r["final"] for r in mine], mine[0]["initial"])
    plain = [r for r in runs if not r["qk_norm"]]
    normed = [r for r in runs if r["qk_norm"]]
    line_png(out_dir / "loss_vs_lr.png",
             {f"qk_norm={qk}": (lrs, [r["final"] if not r["diverged"] else r["initial"] for r in runs
                                     if r["qk_norm"] == qk]) for qk in (False, True)},
             xlabel="learning rate", ylabel="final held-out loss (diverged: initial)", title="LR sensitivity",
             logx=True)
    line_png(out_dir / "attention_logits.png",
             {f"qk_norm={qk}": (lrs, [r["max_attn_logit"] for r in runs if r["qk_norm"] == qk])
              for qk in (False, True)},
             xlabel="learning rate", ylabel="largest |attention logit| in training", title="attention-logit growth",
             logx=True, logy=True)
    growth = plain[-1]["max_attn_logit"] / max(plain[0]["max_attn_logit"], 1e-12)
    return Outcome(
        value=sens[True] / max(sens[False], 1e-12),
        checks={"without qk_norm the attention logits at the largest lr are >= 5x those at the smallest": growth >= 5,
                "with qk_norm the largest lr's attention logits stay below those without it":
                    normed[-1]["max_attn_logit"] < plain[-1]["max_attn_logit"]},
        detail={"steps": steps, "batch": batch, "seq_len": 2 * half, "lrs": lrs,
                "lr_sensitivity_plain": sens[False], "lr_sensitivity_qk_norm": sens[True],
                "attention_logit_growth_plain": growth, "runs": runs},
        table=table,
    )


register(Repro(
    name="lr-sensitivity",
    claim="without qk-layernorm, attention logits grow at high learning rates in small models; qk-layernorm "
          "flattens the loss-vs-learning-rate curve (lower LR sensitivity)",
    paper="Wortsman et al., Small-scale proxies for large-scale Transformer training instabilities (ICLR 2024)",
    metric="LR sensitivity with qk_norm / without",
    threshold=0.8,
    direction="max",
    run=run,
    item=6,
    not_built="z-loss: formerkit's trainer has no z-loss term, so its effect on the curve is not measured",
))
