"""MiniLM (Wang et al., "MiniLM: Deep Self-Attention Distillation for Task-Agnostic Compression of Pre-Trained
Transformers", NeurIPS 2020): a half-size student distilled by the teacher's last-layer attention and value
relations beats the same student trained alone.

A 4-layer Llama-style teacher is trained by formerkit's trainer on the standard library's email package
(byte tokens). Two students with 2 layers and a narrower feed-forward layer (under half the teacher's
parameters), identically initialised, then train for the same steps on the same batches with the same
optimizer (``formerkit.compress.distill``): one on the next-token loss alone, one distilled (logit KD
at T = 1 with MiniLM's attention-distribution and value-relation KL on the last layer). The measure is
held-out next-token accuracy.
"""

from __future__ import annotations

import contextlib
import io
import tempfile
from pathlib import Path

import torch

from formerkit.compress.distill import Distiller, DistillSettings, distill
from formerkit.data import resolve_source
from formerkit.model import Transformer
from formerkit.repro.common import bar_png
from formerkit.repro.registry import Outcome, Repro, register
from formerkit.repro.trained import package_config, package_source, train_on_package, windows
from formerkit.tokenizers import ByteTokenizer
from formerkit.train.config import OptimSection
from formerkit.train.distributed import DistInfo
from formerkit.train.setup import build_objective

FULL = dict(layers=4, d_model=128, heads=4, seq_len=128, batch=16, package="email", teacher_steps=1200,
            steps=500, eval_batches=8)
QUICK = dict(layers=4, d_model=32, heads=2, seq_len=32, batch=4, package="json", teacher_steps=3, steps=2,
             eval_batches=1)
STUDENT_FF = 2  # the students' d_ff, in multiples of d_model (the teacher's: 3)


@torch.no_grad()
def accuracy_and_loss(model: Transformer, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[float, float]:
    """Held-out next-token accuracy and mean loss (nats) of ``model`` over (x, y) windows."""
    model.eval()
    hits = total = count = 0.0
    for x, y in batches:
        logits = model(x).logits  # (B, T, V)
        hits += float((logits.argmax(-1) == y).sum())
        total += float(torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="sum"))
        count += y.numel()
    return hits / count, total / count


def run(seed: int, quick: bool, out_dir: Path) -> Outcome:
    """Train the teacher, then the plain and the distilled student; the value is their accuracy ratio."""
    shape = QUICK if quick else FULL
    sizes = dict(layers=shape["layers"], d_model=shape["d_model"], heads=shape["heads"], seq_len=shape["seq_len"],
                 batch=shape["batch"], seed=seed)
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        teacher = train_on_package(work / "teacher", shape["package"], work / "cache", steps=shape["teacher_steps"],
                                   **sizes)
        held_out = windows(shape["package"], work / "cache", max_batches=shape["eval_batches"],
                           batch=shape["batch"], seq_len=shape["seq_len"])
        cfg = package_config(work / "students", shape["package"], work / "cache", steps=shape["steps"], **sizes)
        objective, _, _ = build_objective(cfg, ByteTokenizer(), resolve_source(package_source(shape["package"])),
                                          DistInfo(0, 1, 0, torch.device("cpu")))
        rows["teacher"] = (teacher.num_parameters(), *accuracy_and_loss(teacher, held_out))
        optim = OptimSection(lr=3e-3, warmup_steps=max(1, shape["steps"] // 20))
        distilled = DistillSettings(temperature=1.0, alpha=1.0, attention_weight=1.0)
        for name, settings in (("student alone", DistillSettings(alpha=0.0)), ("student distilled", distilled)):
            torch.manual_seed(seed)  # the same initialisation for both students
            student = Transformer(teacher.config.replace(n_layers=2, d_ff=STUDENT_FF * shape["d_model"]))
            with contextlib.redirect_stdout(io.StringIO()):
                distill(Distiller(teacher, student, settings), objective, steps=shape["steps"], optim=optim)
            rows[name] = (student.num_parameters(), *accuracy_and_loss(student, held_out))
    share = rows["student distilled"][0] / rows["teacher"][0]
    bar_png(out_dir / "minilm.png", {"held-out accuracy": {n: r[1] for n, r in rows.items()},
                                     "held-out loss (nats)": {n: r[2] for n, r in rows.items()}})
    table = [["model", "parameters", "share of teacher's", "held-out accuracy", "held-out loss"]]
    table += [[n, p, p / rows["teacher"][0], acc, loss] for n, (p, acc, loss) in rows.items()]
    return Outcome(
        value=rows["student distilled"][1] / rows["student alone"][1],
        checks={"the students have at most half the teacher's parameters": share <= 0.5},
        detail={"teacher_steps": shape["teacher_steps"], "student_steps": shape["steps"],
                "models": {n: {"parameters": p, "accuracy": a, "loss": lo} for n, (p, a, lo) in rows.items()}},
        table=table,
    )


register(Repro(
    name="minilm-distillation",
    claim="a student at half the teacher's size distilled by the last layer's attention and value relations "
          "(with the logits) beats the same student trained alone for the same steps",
    paper="Wang et al., MiniLM: Deep Self-Attention Distillation for Task-Agnostic Compression of Pre-Trained "
          "Transformers (NeurIPS 2020)",
    metric="held-out accuracy, distilled student / student alone",
    threshold=1.02,
    direction="min",
    run=run,
    item=11,
))
