"""Learning-rate sensitivity and attention-logit growth (Wortsman et al., "Small-scale proxies for large-scale
Transformer training instabilities", ICLR 2024).

Small decoders with and without ``qk_norm`` (each head's queries and keys normalized, the paper's
qk-layernorm) train at learning rates from 3e-4 to 3e-1 on a synthetic language: a sparse random
Markov chain whose second half repeats the first, so attention matters. A third arm trains without
qk_norm but with the paper's other remedy, the output z-loss (1e-4 x log^2 Z, ``train.z_loss_coef``).
LR sensitivity is the
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
from formerkit.train.objectives import output_z_loss

VOCAB = 64
Z_LOSS = 1e-4  # the paper's (and PaLM's) coefficient
ARMS = {"plain": (False, 0.0), "qk_norm": (True, 0.0), "z_loss": (False, Z_LOSS)}  # name: (qk_norm, z-loss coef)


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


def _train_one(arm: str, lr: float, seed: int, steps: int, batch: int, half: int, chain: torch.Tensor) -> dict:
    qk_norm, z_coef = ARMS[arm]
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
        out = model(ids := repeated_markov_batch(gen, chain, batch, half), labels=ids)
        return out.loss + z_coef * output_z_loss(out.logits) if z_coef else out.loss

    eval_gen = torch.Generator().manual_seed(seed + 1000)
    held_out = [repeated_markov_batch(eval_gen, chain, 64, half) for _ in range(4)]

    def evaluate() -> tuple[float, float]:
        """Held-out cross-entropy and mean |log Z| of the output softmax."""
        with torch.no_grad():
            outs = [model(ids, labels=ids) for ids in held_out]
        log_z = sum(float(torch.logsumexp(o.logits, -1).abs().mean()) for o in outs) / len(outs)
        return sum(float(o.loss) for o in outs) / len(outs), log_z

    initial, _ = evaluate()
    with hooks(model, [(lambda name: name.endswith("hook_attn_scores"), watch)]):
        losses = fit(model, loss_at, steps, lr=lr, warmup=steps // 10, weight_decay=1e-4, grad_clip=0.0)
    final, log_z = evaluate() if math.isfinite(losses[-1]) else (float("nan"), float("nan"))
    return {"arm": arm, "qk_norm": qk_norm, "z_loss": z_coef, "lr": lr, "initial": initial, "final": final,
            "max_attn_logit": largest[0], "mean_abs_log_z": log_z, "diverged": not math.isfinite(final)}


def run(seed: int, quick: bool, out_dir: Path) -> Outcome:
    """Train the grid of learning rates plain, with qk_norm and with the z-loss; compare LR sensitivity and logits."""
    lrs, steps, batch, half = (([1e-3, 1e-1], 12, 8, 8) if quick else
                               ([3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1], 300, 32, 32))
    chain = markov_chain(torch.Generator().manual_seed(seed), VOCAB)
    runs = [_train_one(arm, lr, seed, steps, batch, half, chain) for arm in ARMS for lr in lrs]
    table = [["arm", "lr", "final loss", "max attention logit", "mean |log Z|"]]
    table += [[r["arm"], r["lr"], r["final"], r["max_attn_logit"], r["mean_abs_log_z"]] for r in runs]
    by_arm = {arm: [r for r in runs if r["arm"] == arm] for arm in ARMS}
    sens = {arm: lr_sensitivity([r["final"] for r in mine], mine[0]["initial"]) for arm, mine in by_arm.items()}
    line_png(out_dir / "loss_vs_lr.png",
             {arm: (lrs, [r["final"] if not r["diverged"] else r["initial"] for r in mine])
              for arm, mine in by_arm.items()},
             xlabel="learning rate", ylabel="final held-out loss (diverged: initial)", title="LR sensitivity",
             logx=True)
    line_png(out_dir / "attention_logits.png",
             {arm: (lrs, [r["max_attn_logit"] for r in mine]) for arm, mine in by_arm.items()},
             xlabel="learning rate", ylabel="largest |attention logit| in training", title="attention-logit growth",
             logx=True, logy=True)
    plain, normed = by_arm["plain"], by_arm["qk_norm"]
    growth = plain[-1]["max_attn_logit"] / max(plain[0]["max_attn_logit"], 1e-12)
    z_ratio = sens["z_loss"] / max(sens["plain"], 1e-12)
    return Outcome(
        value=sens["qk_norm"] / max(sens["plain"], 1e-12),
        checks={"without qk_norm the attention logits at the largest lr are >= 5x those at the smallest": growth >= 5,
                "with qk_norm the largest lr's attention logits stay below those without it":
                    normed[-1]["max_attn_logit"] < plain[-1]["max_attn_logit"],
                "the output z-loss (1e-4) lowers LR sensitivity by >= 20% (z-loss / plain <= 0.8)": z_ratio <= 0.8},
        detail={"steps": steps, "batch": batch, "seq_len": 2 * half, "lrs": lrs, "z_loss_coef": Z_LOSS,
                "lr_sensitivity_plain": sens["plain"], "lr_sensitivity_qk_norm": sens["qk_norm"],
                "lr_sensitivity_z_loss": sens["z_loss"], "z_loss_over_plain": z_ratio,
                "attention_logit_growth_plain": growth, "runs": runs},
        table=table,
    )


register(Repro(
    name="lr-sensitivity",
    claim="without qk-layernorm, attention logits grow at high learning rates in small models; qk-layernorm "
          "flattens the loss-vs-learning-rate curve (lower LR sensitivity), and so does the output z-loss",
    paper="Wortsman et al., Small-scale proxies for large-scale Transformer training instabilities (ICLR 2024)",
    metric="LR sensitivity with qk_norm / without",
    threshold=0.8,
    direction="max",
    run=run,
    item=6,
))
