"""Which learning algorithm is in-context learning? (Akyürek et al., ICLR 2023), at small scale.

formerkit decoders of depth 1, 2 and 4 (softmax attention, pre-LayerNorm, MLPs, no positions)
learn in-context linear regression. The (x, y) tokens, zero-padded to d_model, replace the token
embeddings at ``hook_embed``; the prediction is the y slot of the query's final hidden state.
Each trained model's predictions are compared (squared prediction difference, the paper's SPD)
with one step of gradient descent at its best rate and with least squares on the context; the
claim is that deeper models move from gradient descent towards least squares.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from formerkit.config import ModelConfig
from formerkit.interp.run import hooks
from formerkit.model import Transformer
from formerkit.repro.common import fit, line_png
from formerkit.repro.icl_regression import best_gd_rate, gd_predictions, regression_tokens, ridge_predictions
from formerkit.repro.registry import Outcome, Repro, register

D, N, WIDTH = 4, 8, 32  # input dimension, context size, d_model


def predict(model: Transformer, tokens: torch.Tensor) -> torch.Tensor:
    """Query predictions (B,) of ``model`` on regression tokens (B, T, d + 1), read at the y slot."""
    padded = F.pad(tokens, (0, model.config.d_model - tokens.shape[-1]))  # (B, T, d_model)
    ids = torch.zeros(tokens.shape[:2], dtype=torch.long)
    with hooks(model, [("hook_embed", lambda act, hook: padded)]):
        hidden = model(ids).hidden_states  # (B, T, d_model)
    return hidden[:, -1, tokens.shape[-1] - 1]


def spd(a: torch.Tensor, b: torch.Tensor) -> float:
    """Squared prediction difference: the mean of (a - b)²."""
    return float(((a - b) ** 2).mean())


def run(seed: int, quick: bool, out_dir: Path) -> Outcome:
    """Train one model per depth; measure SPD to one GD step and to least squares on held-out tasks."""
    depths, steps, batch, tasks = ([1, 2], 40, 64, 500) if quick else ([1, 2, 4], 1500, 128, 5000)
    gen = torch.Generator().manual_seed(seed)
    fit_tokens, fit_targets = regression_tokens(gen, 2 * tasks, N, D)
    eta = best_gd_rate(fit_tokens, fit_targets)
    tokens, targets = regression_tokens(gen, tasks, N, D)
    gd, ls = gd_predictions(tokens, eta), ridge_predictions(tokens, 0.0)
    table = [["layers", "model MSE", "SPD to 1-step GD", "SPD to least squares", "LS / GD"]]
    ratios = []
    for depth in depths:
        torch.manual_seed(seed)
        model = Transformer(ModelConfig(vocab_size=1, d_model=WIDTH, n_layers=depth, n_heads=2, d_ff=4 * WIDTH,
                                        max_seq_len=N + 1, position="none", final_norm=False, head="none"))

        def loss_at(step: int, model: Transformer = model) -> torch.Tensor:
            batch_tokens, batch_targets = regression_tokens(gen, batch, N, D)
            return F.mse_loss(predict(model, batch_tokens), batch_targets)

        fit(model, loss_at, steps, lr=1e-3, warmup=steps // 10, weight_decay=0.0)
        with torch.no_grad():
            pred = predict(model, tokens)
        to_gd, to_ls = spd(pred, gd), spd(pred, ls)
        ratios.append(to_ls / to_gd)
        table.append([depth, spd(pred, targets), to_gd, to_ls, ratios[-1]])
    line_png(out_dir / "spd_by_depth.png", {"SPD to least squares / SPD to 1-step GD": (depths, ratios)},
             xlabel="layers", ylabel="ratio (below 1: closer to least squares)", title="in-context algorithm by depth",
             hline=1.0)
    return Outcome(
        value=ratios[-1],
        checks={"the ratio falls with every added depth":
                all(b < a for a, b in zip(ratios[:-1], ratios[1:], strict=True))},
        detail={"d": D, "n_context": N, "d_model": WIDTH, "steps": steps, "batch": batch, "gd_rate": eta,
                "test_tasks": tasks, "gd_mse": spd(gd, targets), "least_squares_mse": spd(ls, targets),
                "ratio_by_depth": dict(zip(depths, ratios, strict=True))},
        table=table,
    )


register(Repro(
    name="icl-algorithm",
    claim="trained Transformers' in-context predictions move from gradient descent towards least squares as "
          "depth grows: the deepest is closer to least squares than to one GD step",
    paper="Akyürek et al., What learning algorithm is in-context learning? Investigations with linear models "
          "(ICLR 2023)",
    metric="SPD to least squares / SPD to one GD step, deepest model",
    threshold=1.0,
    direction="max",
    run=run,
    item=4,
))
