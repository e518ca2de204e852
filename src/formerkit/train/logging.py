"""The logging side of a training loop: progress bar, metrics.jsonl, TensorBoard, and a loss-curve PNG.

``RunLogger`` writes everything a run reports into its run directory:

- ``metrics.jsonl``: one JSON object per line, ``{"step", "split", "time", **metrics}``, flushed after every
  line so a killed run keeps all it logged. Non-finite numbers are written as the strings ``"nan"``, ``"inf"``
  and ``"-inf"`` (JSON has no literal for them); ``read_metrics`` turns them back into floats.
- ``tensorboard/``: TensorBoard event files with scalars ``train/<key>`` and ``val/<key>``, flushed at every
  logged step like the metrics file.
- ``loss_curve.png``: written by ``close`` from the whole metrics file, so a resumed run plots its full history.

A logger made with ``enabled=False`` (every rank but rank 0 in distributed training) does nothing at all.
"""

from __future__ import annotations

import io
import json
import math
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from tqdm import tqdm

from formerkit.errors import DataError
from formerkit.fileio import atomic_write

if TYPE_CHECKING:
    from tensorboardX import SummaryWriter

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"
LOSS_CURVE_FILE = "loss_curve.png"

_RESERVED = ("step", "split", "time")
_NONFINITE = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}
_NON_TTY_MININTERVAL_S = 5.0  # seconds between bar redraws when stderr is a file or a CI log
_SMOOTH_MIN_POINTS = 50  # draw a smoothed train-loss line from this many points on


def read_metrics(path: str | Path) -> list[dict]:
    """Parse a metrics.jsonl file and return its records in file order.

    A last line that is not valid JSON (a run killed mid-write) is skipped; a bad line anywhere else raises
    ``DataError``. The strings ``"nan"``, ``"inf"`` and ``"-inf"`` are turned back into floats.
    """
    return [
        {k: _NONFINITE.get(v, v) if isinstance(v, str) else v for k, v in record.items()}
        for _, record in _read_lines(path)
    ]


def _read_lines(path: str | Path) -> list[tuple[str, dict]]:
    """Return (line, parsed JSON) for each non-blank line of ``path``, skipping a truncated last line."""
    lines = [line for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
    parsed = []
    for i, line in enumerate(lines):
        try:
            parsed.append((line, json.loads(line)))
        except json.JSONDecodeError as e:
            if i < len(lines) - 1:
                raise DataError(f"{path}: line {i + 1} is not valid JSON ({e})") from e
    return parsed


class RunLogger:
    """Report a training run to a progress bar, ``metrics.jsonl``, TensorBoard and a loss-curve PNG.

    ``total_steps`` sizes the progress bar; ``start_step`` > 0 resumes a run: the bar starts there, metrics records
    after ``start_step`` (the steps that will be run again) are dropped, and TensorBoard is told to hide the old
    events from those steps. With ``start_step`` == 0 an existing metrics file is replaced by a fresh one and
    TensorBoard hides all older events in the directory. ``progress=False`` hides the bar and
    ``tensorboard=False`` skips the event files; ``enabled=False`` makes every method a no-op.
    """

    def __init__(
        self,
        run_dir: str | Path,
        total_steps: int,
        *,
        enabled: bool = True,
        progress: bool = True,
        tensorboard: bool = True,
        start_step: int = 0,
    ) -> None:
        self.run_dir = Path(run_dir)
        self.enabled = enabled
        self._bar: tqdm | None = None
        self._writer: SummaryWriter | None = None
        if not enabled:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        metrics_path = self.run_dir / METRICS_FILE
        if start_step > 0 and metrics_path.exists():
            _truncate_metrics(metrics_path, start_step)
            self._file = metrics_path.open("a", encoding="utf-8")
        else:
            self._file = metrics_path.open("w", encoding="utf-8")
        if tensorboard:
            from tensorboardX import SummaryWriter  # imported here: slow to import, often unused

            # purge_step hides events left in the directory at steps >= it: those after start_step on a resume,
            # all of them on a fresh start.
            purge_step = start_step + 1 if start_step > 0 else 0
            self._writer = SummaryWriter(str(self.run_dir / TENSORBOARD_DIR), purge_step=purge_step)
        if progress:
            is_tty = getattr(sys.stderr, "isatty", lambda: False)()
            self._bar = tqdm(
                total=total_steps,
                initial=start_step,
                file=sys.stderr,
                dynamic_ncols=True,
                mininterval=0.1 if is_tty else _NON_TTY_MININTERVAL_S,
                unit="step",
            )

    def log_train(self, step: int, metrics: dict[str, float]) -> None:
        """Record training metrics for ``step`` and move the progress bar there; returns nothing.

        The bar's postfix shows ``loss``, ``tokens_per_s`` and ``lr`` from ``metrics`` when present.
        """
        if not self.enabled:
            return
        self._record(step, "train", metrics)
        if self._bar is not None:
            postfix = {}
            if "loss" in metrics:
                postfix["loss"] = f"{float(metrics['loss']):.4f}"
            if "tokens_per_s" in metrics:
                postfix["tok/s"] = tqdm.format_sizeof(float(metrics["tokens_per_s"]))
            if "lr" in metrics:
                postfix["lr"] = f"{float(metrics['lr']):.2e}"
            self._bar.set_postfix(postfix, refresh=False)  # redrawn by update(), which honours mininterval
            self._bar.update(max(0, step - self._bar.n))

    def log_eval(self, step: int, metrics: dict[str, float]) -> None:
        """Record validation metrics for ``step`` (split ``"val"``); returns nothing."""
        if self.enabled:
            self._record(step, "val", metrics)

    def message(self, text: str) -> None:
        """Print ``text`` as a line on stdout without breaking the progress bar; returns nothing."""
        if not self.enabled:
            return
        if self._bar is not None:
            tqdm.write(text)
        else:
            print(text, flush=True)

    def close(self) -> Path | None:
        """Close the bar, the metrics file and TensorBoard, then plot the whole metrics file.

        Returns the path of ``loss_curve.png``, or None when the logger is disabled or no train loss was
        logged. Safe to call more than once.
        """
        if not self.enabled:
            return None
        if self._bar is not None:
            self._bar.close()
        if self._writer is not None:
            self._writer.close()
        self._file.close()
        return _plot_loss_curve(read_metrics(self.run_dir / METRICS_FILE), self.run_dir / LOSS_CURVE_FILE)

    def _record(self, step: int, split: str, metrics: dict[str, float]) -> None:
        """Append one line to metrics.jsonl (flushed) and add each metric to TensorBoard as ``<split>/<key>``."""
        clash = [k for k in metrics if k in _RESERVED]
        if clash:
            raise ValueError(f"metric names {clash} are reserved in metrics.jsonl; rename them")
        values = {k: _json_value(v) for k, v in metrics.items()}
        record = {"step": int(step), "split": split, "time": round(time.time(), 3), **values}
        self._file.write(json.dumps(record, allow_nan=False) + "\n")
        self._file.flush()
        if self._writer is not None:
            for key, value in metrics.items():
                self._writer.add_scalar(f"{split}/{key}", float(value), int(step))
            self._writer.flush()  # a killed run keeps every logged step in TensorBoard too


def _json_value(value: float) -> int | float | str:
    """Return ``value`` as something JSON can hold: ints stay ints, non-finite floats become "nan"/"inf"/"-inf"."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    value = float(value)
    return value if math.isfinite(value) else str(value)


def _truncate_metrics(path: Path, last_step: int) -> None:
    """Rewrite ``path`` atomically, keeping only the records with step <= ``last_step``; returns nothing."""
    kept = "".join(line + "\n" for line, record in _read_lines(path) if record["step"] <= last_step)
    atomic_write(path, lambda tmp: tmp.write_text(kept, encoding="utf-8"))


def _plot_loss_curve(records: list[dict], path: Path) -> Path | None:
    """Draw train loss (smoothed when long) and validation loss against step into a PNG at ``path``.

    Returns ``path``, or None (writing nothing) when ``records`` hold no finite train loss.
    """
    train = _losses(records, "train")
    if not train:
        return None
    val = _losses(records, "val")
    fig = Figure(figsize=(8, 5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    steps, losses = zip(*train, strict=True)
    long_run = len(train) >= _SMOOTH_MIN_POINTS
    ax.plot(steps, losses, color="tab:blue", alpha=0.35 if long_run else 1.0, linewidth=1, label="train")
    if long_run:
        window = max(5, len(train) // 25)
        smoothed = np.convolve(losses, np.ones(window) / window, mode="valid")
        ax.plot(steps[window - 1 :], smoothed, color="tab:blue", linewidth=2, label=f"train (mean of {window})")
    if val:
        ax.plot(*zip(*val, strict=True), "o", color="tab:orange", label="validation")
    every = losses + tuple(v for _, v in val)
    if min(every) > 0 and max(every) > 10 * min(every):
        ax.set_yscale("log")
    ax.set_title(f"Loss: {path.parent.name}")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    atomic_write(path, lambda tmp: tmp.write_bytes(buffer.getvalue()))
    return path


def _losses(records: list[dict], split: str) -> list[tuple[int, float]]:
    """Return the (step, loss) pairs of ``split`` whose loss is a finite number, in file order."""
    return [
        (r["step"], float(r["loss"]))
        for r in records
        if r.get("split") == split and isinstance(r.get("loss"), int | float) and math.isfinite(r["loss"])
    ]
