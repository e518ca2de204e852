"""Length generalization by position scheme (Kazemnejad et al., "The Impact of Positional Encoding on Length
Generalization in Transformers", NeurIPS 2023).

Decoder-only models that differ only in ``position`` (none, relative, alibi, rope, learned) learn to
copy or reverse a sequence of at most 20 symbols and are tested on 21 to 40. A sequence is
``x_1 .. x_L SEP y_1 .. y_L``; the loss and the accuracy count the y tokens only (accuracy under
teacher forcing: the argmax at each output position).
"""

from __future__ import annotations

from pathlib import Path

import torch

from formerkit.config import ModelConfig
from formerkit.heads import IGNORE_INDEX
from formerkit.model import Transformer
from formerkit.repro.common import fit, line_png
from formerkit.repro.registry import Outcome, Repro, register

SYMBOLS, SEP, PAD = 10, 10, 11  # ids 0-9 are the symbols
POSITIONS = ("none", "relative", "alibi", "rope", "learned")
TRAIN_MAX, TEST_MAX = 20, 40


def task_batch(gen: torch.Generator, task: str, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Ids (B, 2 * max(L) + 1) and labels of copy/reverse sequences of the given lengths (B,), right-padded.

    Labels hold the output symbols at their positions (causal LM labels, shifted inside the model);
    the input, the separator and the padding are ignored.
    """
    B, longest = lengths.shape[0], int(lengths.max())
    ids = torch.full((B, 2 * longest + 1), PAD, dtype=torch.long)
    labels = torch.full_like(ids, IGNORE_INDEX)
    for i, length in enumerate(lengths.tolist()):
        x = torch.randint(0, SYMBOLS, (length,), generator=gen)
        y = x if task == "copy" else x.flip(0)
        ids[i, :length], ids[i, length], ids[i, length + 1:2 * length + 1] = x, SEP, y
        labels[i, length + 1:2 * length + 1] = y
    return ids, labels


def output_accuracy(model: Transformer, ids: torch.Tensor, labels: torch.Tensor) -> tuple[float, float]:
    """(token accuracy, exact match) of the model's argmax on the labelled positions of a batch."""
    with torch.no_grad():
        pred = model(ids).logits[:, :-1].argmax(-1)  # (B, T - 1): position t predicts t + 1
    target = labels[:, 1:]
    scored = target != IGNORE_INDEX
    right = (pred == target) & scored
    tokens = float(right.sum() / scored.sum())
    exact = float((right | ~scored).all(1).float().mean())
    return tokens, exact


def _train_one(position: str, task: str, seed: int, steps: int, batch: int, width: int) -> Transformer:
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = Transformer(ModelConfig(vocab_size=12, d_model=width, n_layers=2, n_heads=4, d_ff=4 * width,
                                    max_seq_len=2 * TEST_MAX + 1, position=position, tie_embeddings=False))

    def loss_at(step: int) -> torch.Tensor:
        ids, labels = task_batch(gen, task, torch.randint(1, TRAIN_MAX + 1, (batch,), generator=gen))
        return model(ids, labels=labels).loss

    fit(model, loss_at, steps, lr=1e-3, warmup=steps // 10, weight_decay=0.0)
    return model


def run(seed: int, quick: bool, out_dir: Path) -> Outcome:
    """Train one model per position scheme and task; measure output accuracy at lengths 1-20 and 21-40."""
    tasks, steps, batch, width, per_length = ((("copy",), 20, 16, 32, 2) if quick else
                                              (("copy",), 600, 32, 48, 20))
    table = [["task", "position", "token acc 1-20", "token acc 21-40", "exact 1-20", "exact 21-40"]]
    ood: dict[str, float] = {}
    for task in tasks:
        curves = {}
        for position in POSITIONS:
            model = _train_one(position, task, seed, steps, batch, width)
            eval_gen = torch.Generator().manual_seed(seed + 1000)
            by_length = [output_accuracy(model, *task_batch(eval_gen, task, torch.full((per_length,), n)))
                         for n in range(1, TEST_MAX + 1)]
            inside, outside = by_length[:TRAIN_MAX], by_length[TRAIN_MAX:]
            row = [sum(acc[k] for acc in part) / len(part) for part in (inside, outside) for k in (0, 1)]
            table.append([task, position, row[0], row[2], row[1], row[3]])
            ood[position] = ood.get(position, 0.0) + row[2] / len(tasks)
            curves[position] = (range(1, TEST_MAX + 1), [acc[0] for acc in by_length])
        line_png(out_dir / f"{task}.png", curves, xlabel="length (trained up to 20)", ylabel="output token accuracy",
                 title=f"{task}: length generalization by position scheme")
    best_other = max(v for k, v in ood.items() if k != "none")
    return Outcome(
        value=ood["none"] - best_other,
        checks={"learned absolute positions are the worst at 21-40": ood["learned"] == min(ood.values())},
        detail={"tasks": list(tasks), "steps": steps, "batch": batch, "d_model": width, "layers": 2,
                "eval_per_length": per_length, "ood_token_accuracy_mean_over_tasks": ood},
        table=table,
    )


register(Repro(
    name="length-generalization",
    claim="decoder-only models trained on copy/reverse of length <= 20 and tested at 21-40: no positional encoding "
          "(NoPE) is competitive or best, learned absolute positions worst",
    paper="Kazemnejad et al., The Impact of Positional Encoding on Length Generalization in Transformers "
          "(NeurIPS 2023)",
    metric="NoPE's token accuracy at 21-40 minus the best other scheme's",
    threshold=-0.05,
    direction="min",
    run=run,
    item=2,
))
