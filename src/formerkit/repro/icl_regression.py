"""In-context linear regression tasks and the closed-form learners the trained models are compared with.

A task draws W ~ N(0, I) (d,), points x_i ~ U(-1, 1)^d and targets y_i = W·x_i. A sequence holds
N context tokens (x_i, y_i) and a query token (x_q, 0), each of width d + 1.
"""

from __future__ import annotations

import torch


def regression_tokens(gen: torch.Generator, batch: int, n_context: int, d: int,
                      noise: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens (B, N + 1, d + 1) of ``batch`` fresh tasks (the query's y entry is 0) and the query targets (B,)."""
    w = torch.randn(batch, d, generator=gen)  # (B, d)
    x = torch.rand(batch, n_context + 1, d, generator=gen) * 2 - 1  # (B, N + 1, d)
    y = (x @ w[:, :, None]).squeeze(-1)  # (B, N + 1)
    y = y + noise * torch.randn(y.shape, generator=gen)
    tokens = torch.cat([x, y[..., None]], dim=-1)  # (B, N + 1, d + 1)
    tokens[:, -1, -1] = 0.0
    return tokens, y[:, -1]


def gd_step_feature(tokens: torch.Tensor) -> torch.Tensor:
    """(1/N) Σ_i y_i x_i·x_q per sequence (B,): one gradient-descent step from W = 0 on the context's squared
    loss, with learning rate 1, predicts this at the query; learning rate η predicts η times it."""
    x, y = tokens[:, :-1, :-1], tokens[:, :-1, -1]  # (B, N, d), (B, N)
    xq = tokens[:, -1, :-1]  # (B, d)
    return ((x @ xq[:, :, None]).squeeze(-1) * y).mean(1)


def best_gd_rate(tokens: torch.Tensor, targets: torch.Tensor) -> float:
    """The learning rate η minimizing the mean squared error of one GD step's predictions (least squares in η)."""
    s = gd_step_feature(tokens)
    return float((s * targets).sum() / (s * s).sum())


def gd_predictions(tokens: torch.Tensor, lr: float, steps: int = 1) -> torch.Tensor:
    """Predictions (B,) at the query after ``steps`` of full-batch GD from W = 0 on (1/2N) Σ (W·x_i - y_i)²."""
    x, y = tokens[:, :-1, :-1], tokens[:, :-1, -1]  # (B, N, d), (B, N)
    w = torch.zeros(x.shape[0], x.shape[2], dtype=x.dtype)
    for _ in range(steps):
        residual = (x @ w[:, :, None]).squeeze(-1) - y  # (B, N)
        w = w - lr * (x * residual[..., None]).mean(1)
    return (w * tokens[:, -1, :-1]).sum(-1)


def ridge_predictions(tokens: torch.Tensor, lam: float) -> torch.Tensor:
    """Predictions (B,) at the query of ridge regression on the context (λ = 0: least squares, minimum norm)."""
    x, y = tokens[:, :-1, :-1].double(), tokens[:, :-1, -1].double()  # (B, N, d), (B, N)
    d = x.shape[2]
    gram = x.transpose(1, 2) @ x + lam * torch.eye(d, dtype=x.dtype)  # (B, d, d)
    w = torch.linalg.lstsq(gram, (x.transpose(1, 2) @ y[..., None])).solution.squeeze(-1)  # (B, d)
    return (w * tokens[:, -1, :-1].double()).sum(-1).to(tokens.dtype)
