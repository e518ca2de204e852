"""The end-of-run report of image classification: test accuracy and a confusion-matrix PNG."""

from __future__ import annotations

from pathlib import Path

import torch

from formerkit.fileio import atomic_write, write_json

CONFUSION_PNG = "confusion_matrix.png"
TEST_METRICS = "test_metrics.json"


def confusion_matrix(predictions: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Counts (K, K): row = true class, column = predicted class, for predictions and labels (N,)."""
    flat = labels.long() * num_classes + predictions.long()  # (N,)
    return torch.bincount(flat, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def plot_confusion(matrix: torch.Tensor, names: list[str], path: Path, title: str) -> Path:
    """Draw the confusion matrix (K, K) with its counts into a PNG at ``path``; return the path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    k = matrix.shape[0]
    fig, ax = plt.subplots(figsize=(1.5 + 0.45 * k, 1.2 + 0.45 * k), dpi=120)
    ax.imshow(matrix.numpy(), cmap="Blues")
    ax.set_xticks(range(k), names, rotation=90 if max(map(len, names)) > 3 else 0)
    ax.set_yticks(range(k), names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    peak = int(matrix.max()) if matrix.numel() else 0
    if k <= 30:
        for i in range(k):
            for j in range(k):
                value = int(matrix[i, j])
                if value:
                    ax.text(j, i, str(value), ha="center", va="center", fontsize=7,
                            color="white" if value > peak / 2 else "black")
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))  # a crash never leaves half a PNG
    plt.close(fig)
    return path


def write_report(run_dir: Path, step: int, matrix: torch.Tensor, names: list[str], loss: float) -> dict[str, float]:
    """Write ``confusion_matrix.png`` and ``test_metrics.json`` into ``run_dir``; return the test metrics."""
    total = int(matrix.sum())
    accuracy = float(matrix.trace()) / max(total, 1)
    metrics = {"accuracy": accuracy, "loss": loss, "images": total}
    plot_confusion(matrix, names, run_dir / CONFUSION_PNG,
                   f"test accuracy {accuracy:.2%} ({int(matrix.trace())}/{total}), step {step}")
    record = {"step": step, **metrics, "label_names": names, "confusion_matrix": matrix.tolist()}
    write_json(run_dir / TEST_METRICS, record)
    return metrics
