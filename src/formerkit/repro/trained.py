"""For the reproductions that train on text: a small Llama-style model trained by formerkit's own trainer
(``formerkit.train``) on one package of the standard library's source (byte tokens), that package's
fixed held-out windows, and the held-out loss."""

from __future__ import annotations

import contextlib
import io
import sysconfig
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from formerkit.checkpoints import from_pretrained
from formerkit.data import eval_batches, load_corpus, resolve_source
from formerkit.model import Transformer
from formerkit.tokenizers import ByteTokenizer
from formerkit.train import TrainConfig, train


def package_source(package: str) -> str:
    """The directory of a standard-library package (the embedded corpus' own text)."""
    return str(Path(sysconfig.get_paths()["stdlib"]) / package)


VAL_FRACTION = 0.05  # of the package's files held out, the same in training and in ``windows``


def windows(package: str, cache_dir: Path, *, batch: int, seq_len: int, max_batches: int,
            split: str = "val") -> list:
    """Fixed (x, y) windows (B, T) of the package's byte tokens, from its held-out ("val") or "train" split."""
    corpus = load_corpus(resolve_source(package_source(package)), ByteTokenizer(), cache_dir=cache_dir,
                         val_fraction=VAL_FRACTION)
    tokens = corpus.val if split == "val" else corpus.train
    return eval_batches(tokens, batch_size=batch, seq_len=seq_len, max_batches=max_batches)


def package_config(run_dir: Path, package: str, cache_dir: Path, *, layers: int, d_model: int, heads: int,
                   seq_len: int, batch: int, steps: int, seed: int = 0, extra: Sequence[str] = ()) -> TrainConfig:
    """The training config of a Llama-style model (``extra``: more ``--model.*``/``--train.*`` options) on the
    package's byte tokens, in fp32, evaluated and saved once at the end."""
    args = ["--model.preset", "llama", "--model.n_layers", str(layers), "--model.d_model", str(d_model),
            "--model.n_heads", str(heads), "--model.d_ff", str(d_model * 3), "--model.max_seq_len", str(seq_len),
            "--data.source", package_source(package), "--data.tokenizer", "byte",
            "--data.cache_dir", str(cache_dir), "--data.val_fraction", str(VAL_FRACTION),
            "--train.steps", str(steps),
            "--train.batch_size", str(batch), "--train.seq_len", str(seq_len), "--train.precision", "fp32",
            "--train.seed", str(seed), "--optim.lr", "3e-3", "--optim.warmup_steps", str(max(1, steps // 20)),
            "--eval.every", str(steps), "--checkpoint.every", str(steps), "--checkpoint.run_dir", str(run_dir),
            "--log.progress", "false", "--log.samples", "0", *extra]
    return TrainConfig.load(None, args)


def train_on_package(run_dir: Path, package: str, cache_dir: Path, **sizes: Any) -> Transformer:
    """Train the model of ``package_config(run_dir, package, cache_dir, **sizes)`` with ``formerkit.train``
    quietly; return it from its run directory in eval mode."""
    with contextlib.redirect_stdout(io.StringIO()):
        train(package_config(run_dir, package, cache_dir, **sizes))
    return from_pretrained(run_dir).eval()


def trained_and_held_out(shape: dict[str, Any], seed: int, extra: Sequence[str] = ()
                         ) -> tuple[Transformer, torch.Tensor]:
    """Train one model of ``shape`` (layers, d_model, heads, seq_len, batch, package, steps) in a temporary
    directory; return it and one batch of held-out windows x (batch, seq_len)."""
    size = dict(batch=shape["batch"], seq_len=shape["seq_len"])
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model = train_on_package(work / "run", shape["package"], work / "cache", layers=shape["layers"],
                                 d_model=shape["d_model"], heads=shape["heads"], steps=shape["steps"], seed=seed,
                                 extra=extra, **size)
        x, _ = windows(shape["package"], work / "cache", max_batches=1, **size)[0]
    return model, x


@torch.no_grad()
def held_out_loss(model: Transformer, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
    """Mean next-token loss (nats per token) over (x, y) windows."""
    total = count = 0.0
    for x, y in batches:
        logits = model(x).logits  # (B, T, V)
        total += float(torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="sum"))
        count += y.numel()
    return total / count
