"""The training loop: one function, ``train(cfg)``, for one process or many under torchrun."""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml
from torch import nn

from formerkit.checkpoints.files import atomic_write
from formerkit.data import resolve_source
from formerkit.errors import ConfigError, TrainingError
from formerkit.generate import generate_text
from formerkit.model import Transformer
from formerkit.train import parallel
from formerkit.train.config import TrainConfig
from formerkit.train.distributed import DistInfo, barrier, mean_across, setup, teardown
from formerkit.train.logging import RunLogger
from formerkit.train.objectives import split_micro
from formerkit.train.optim import build_optimizer, lr_at
from formerkit.train.setup import build_objective, prepare_tokenizer
from formerkit.train.state import latest_checkpoint, load_checkpoint, rng_state, save_checkpoint, set_rng_state

SAMPLE_PROMPTS = ["def ", "class ", "import ", "    return "]


@dataclass
class TrainResult:
    """What a finished (or stopped) run produced."""

    run_dir: Path
    step: int
    checkpoint: Path | None
    train_loss: float | None
    val: dict[str, float] = field(default_factory=dict)
    samples: list[str] = field(default_factory=list)
    loss_curve: Path | None = None
    stopped: str | None = None
    test: dict[str, float] = field(default_factory=dict)  # held-out test metrics (image classification)


def train(cfg: TrainConfig) -> TrainResult:
    """Train as ``cfg`` says: build or resume the run in ``cfg.checkpoint.run_dir`` and return its result."""
    info = setup(cfg.train.device)
    threads = torch.get_num_threads()  # train.threads applies to this run only
    try:
        return _run(cfg, info)
    finally:
        torch.set_num_threads(threads)
        teardown(info)


def _autocast(cfg: TrainConfig, device: torch.device):
    if cfg.train.precision == "bf16":
        return lambda: torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext


def _check_resume(cfg: TrainConfig, run_dir: Path) -> Path | None:
    latest = latest_checkpoint(run_dir)
    if latest is None:
        return None
    if not cfg.checkpoint.resume:
        raise TrainingError(f"{run_dir} already holds checkpoints (latest {latest.name}); resume it with "
                            "--checkpoint.resume true or choose another --checkpoint.run_dir")
    saved = yaml.safe_load((run_dir / "config.yaml").read_text()) if (run_dir / "config.yaml").is_file() else {}
    for section in ("model", "data"):
        if saved.get(section) not in (None, cfg.to_dict()[section]):
            raise TrainingError(f"{run_dir} was trained with different {section} options ({saved[section]}); "
                                "resume with the same options or choose another --checkpoint.run_dir")
    return latest


def _run(cfg: TrainConfig, info: DistInfo) -> TrainResult:
    run_dir = Path(cfg.checkpoint.run_dir)
    resume_path = _check_resume(cfg, run_dir)
    if info.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        text = yaml.safe_dump(cfg.to_dict(), sort_keys=False)
        atomic_write(run_dir / "config.yaml", lambda tmp: tmp.write_text(text))
    if cfg.train.batch_size % (cfg.train.grad_accum * info.world_size):
        raise ConfigError(f"train.batch_size={cfg.train.batch_size} must be divisible by grad_accum x processes "
                          f"= {cfg.train.grad_accum * info.world_size}")
    torch.manual_seed(cfg.train.seed)
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    source = resolve_source(cfg.data.source, text_field=cfg.data.text_field) \
        if cfg.train.objective not in ("classify", "seq2seq", "image-classify") else None
    tokenizer = prepare_tokenizer(cfg, run_dir, resume_path, source, info)
    objective, model_cfg = build_objective(cfg, tokenizer, source, info)
    model = Transformer(model_cfg).to(info.device)
    resumed = load_checkpoint(resume_path, model) if resume_path is not None else None
    parallel.shard(model, cfg, info)
    optimizer = build_optimizer(model, cfg.optim)
    start = 0
    if resumed is not None:
        parallel.load_optimizer_state(model, optimizer, resumed.state["optimizer"])
        set_rng_state(resumed.state["rng"])
        start = resumed.step
    train_model = parallel.wrap(model, cfg, info)
    autocast = _autocast(cfg, info.device)
    logger = RunLogger(run_dir, cfg.train.steps, enabled=info.is_main, progress=cfg.log.progress,
                       tensorboard=cfg.log.tensorboard, start_step=start)
    if info.is_main:
        where = f"resuming {resume_path} at step {start}" if resume_path else "starting"
        logger.message(f"formerkit train: {where}; {model.num_parameters() / 1e6:.2f}M parameters, "
                       f"{info.world_size} process(es) on {info.device}, precision {cfg.train.precision}")
    result = TrainResult(run_dir=run_dir, step=start, checkpoint=resume_path, train_loss=None)
    try:
        _loop(cfg, info, model, train_model, optimizer, objective, tokenizer, autocast, logger, start, result)
    finally:
        result.loss_curve = logger.close()
    if info.is_main and cfg.train.objective == "causal" and cfg.log.samples:
        prompts = SAMPLE_PROMPTS if cfg.data.source in (None, "", "stdlib") else [""]
        model.eval()
        with autocast():
            result.samples = [generate_text(model, tokenizer, prompts[i % len(prompts)],
                                            max_new_tokens=min(cfg.log.sample_tokens, model.config.max_seq_len // 2),
                                            temperature=0.8, top_k=50,
                                            seed=cfg.train.seed + i)
                              for i in range(cfg.log.samples)]
    if info.is_main and cfg.train.objective == "seq2seq" and cfg.log.samples:
        result.samples = objective.examples(model, cfg.log.samples, autocast)
    if info.is_main and hasattr(objective, "finish"):  # image classification: test accuracy, confusion matrix
        model.eval()
        result.test = objective.finish(model, run_dir, result.step, info.device, autocast)
    return result


def accumulate_gradients(train_model: parallel.Wrapped, loss_fn, micro: list[dict], device: torch.device,
                         autocast) -> torch.Tensor:
    """Forward and backward every micro-batch of one step (all-reducing only after the last).

    Each micro-batch's loss is divided by their number, so the gradients are those of the mean
    over the step's batch. Returns that mean loss (a detached scalar tensor).
    """
    loss_sum = torch.zeros((), device=device)
    for i, batch in enumerate(micro):
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        with parallel.maybe_no_sync(train_model, skip=i < len(micro) - 1):
            with autocast():
                loss = loss_fn(train_model, batch) / len(micro)
            loss.backward()
        loss_sum += loss.detach()
    return loss_sum


def apply_gradients(model: nn.Module, optimizer: torch.optim.Optimizer, grad_clip: float) -> float:
    """Clip the gradients, take the optimizer step, clear them; return the norm before clipping."""
    grad_norm = parallel.clip(model, grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm


def _loop(cfg: TrainConfig, info: DistInfo, model: Transformer, train_model: parallel.Wrapped, optimizer, objective,
          tokenizer, autocast, logger: RunLogger, start: int, result: TrainResult) -> None:
    t = cfg.train
    started = time.monotonic()
    window_tokens, window_start = 0, time.monotonic()
    step = start
    if step >= t.steps:  # a finished run: report where it stands
        train_model.eval()
        result.val = objective.evaluate(train_model, info.device, autocast)
    while step < t.steps:
        train_model.train()
        lr = lr_at(step, cfg.optim, t.steps)
        for group in optimizer.param_groups:
            group["lr"] = lr
        micro = split_micro(objective.train_batch(step), t.grad_accum)
        window_tokens += sum(objective.tokens(b) for b in micro) * info.world_size
        loss_sum = accumulate_gradients(train_model, objective.loss, micro, info.device, autocast)
        loss_value = mean_across(float(loss_sum), info)
        if not math.isfinite(loss_value):
            optimizer.zero_grad(set_to_none=True)
            last_good = latest_checkpoint(result.run_dir)
            raise TrainingError(f"the loss became {loss_value} at step {step + 1}; training stopped. The last good "
                                f"checkpoint is {last_good or 'none (none was saved yet)'}; lower --optim.lr or "
                                "check the data")
        grad_norm = apply_gradients(model, optimizer, cfg.optim.grad_clip)
        step += 1
        result.step, result.train_loss = step, loss_value
        if step % cfg.log.every == 0 or step == t.steps:
            elapsed = time.monotonic() - window_start
            logger.log_train(step, {"loss": loss_value, "lr": lr, "grad_norm": grad_norm,
                                    "tokens_per_s": window_tokens / max(elapsed, 1e-9)})
            window_tokens, window_start = 0, time.monotonic()
        out_of_time = t.max_minutes is not None and time.monotonic() - started > t.max_minutes * 60
        out_of_time = mean_across(float(out_of_time), info) > 0  # every process stops together
        final = step == t.steps or out_of_time
        if step % cfg.eval.every == 0 or final:
            train_model.eval()
            result.val = objective.evaluate(train_model, info.device, autocast)
            logger.log_eval(step, result.val)
        if step % cfg.checkpoint.every == 0 or final:
            state = {"step": step, "optimizer": parallel.optimizer_state(model, optimizer),
                     "rng": rng_state(), "config": cfg.to_dict()}
            weights_model = parallel.full_model(model, info, cfg)
            if info.is_main:
                result.checkpoint = save_checkpoint(result.run_dir, step, weights_model, tokenizer, state,
                                                    cfg.checkpoint.keep)
            barrier(info)
        if out_of_time and step < t.steps:
            result.stopped = f"time limit of {t.max_minutes} minutes reached at step {step}"
            logger.message(f"stopping: {result.stopped}; resume with the same command to continue")
            break
