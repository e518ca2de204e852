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
from formerkit.model import Transformer
from formerkit.precision import DTYPES
from formerkit.train import parallel
from formerkit.train.allocator import keep_freed_memory
from formerkit.train.config import TrainConfig
from formerkit.train.distributed import DistInfo, barrier, mean_across, setup, teardown
from formerkit.train.init_from import init_weights
from formerkit.train.logging import RunLogger
from formerkit.train.objectives import split_micro
from formerkit.train.optim import build_optimizer, lr_at
from formerkit.train.report import (
    draw_samples,
    python_measures,
    reference_texts,
    sample_prompts,
    write_samples,
    write_summary,
)
from formerkit.train.setup import build_objective, prepare_tokenizer
from formerkit.train.state import latest_checkpoint, load_checkpoint, rng_state, save_checkpoint, set_rng_state
from formerkit.train.tuning import RunChoices, make_choices, use_attention


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
    precision: str = "fp32"  # the precision the run trained in (train.precision, resolved)
    tokens_per_s: float | None = None  # tokens trained per second of the loop, evaluation and checkpoints included
    python: dict = field(default_factory=dict)  # how Python-like the samples are (Python corpora)


def train(cfg: TrainConfig) -> TrainResult:
    """Train as ``cfg`` says: build or resume the run in ``cfg.checkpoint.run_dir`` and return its result."""
    info = setup(cfg.train.device)
    keep_freed_memory()  # no page faults on every step's fresh activation buffers (see train/allocator.py)
    threads = torch.get_num_threads()  # train.threads applies to this run only
    try:
        return _run(cfg, info)
    finally:
        torch.set_num_threads(threads)
        teardown(info)


def autocast_for(precision: str, device: torch.device):
    """A factory of autocast contexts for a resolved precision (fp32: a no-op context)."""
    if precision == "fp32":
        return contextlib.nullcontext
    return lambda: torch.autocast(device_type=device.type, dtype=DTYPES[precision])


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
    initialised = init_weights(model, cfg.model["init_from"]) if cfg.model.get("init_from") and not resumed else None
    choices = make_choices(cfg, model, info, resumed.state.get("choices", {}) if resumed else {})
    precision = choices.precision
    use_attention(model, choices.attention.chosen)
    parallel.shard(model, cfg, info)
    optimizer = build_optimizer(model, cfg.optim, choices.adamw.chosen)
    scaler = torch.amp.GradScaler(info.device.type) if precision.precision == "fp16" else None
    start = 0
    if resumed is not None:
        parallel.load_optimizer_state(model, optimizer, resumed.state["optimizer"])
        set_rng_state(resumed.state["rng"])
        if scaler is not None and "scaler" in resumed.state:
            scaler.load_state_dict(resumed.state["scaler"])
        start = resumed.step
    train_model = parallel.wrap(model, cfg, info)
    autocast = autocast_for(precision.precision, info.device)
    logger = RunLogger(run_dir, cfg.train.steps, enabled=info.is_main, progress=cfg.log.progress,
                       tensorboard=cfg.log.tensorboard, start_step=start)
    if info.is_main:
        where = f"resuming {resume_path} at step {start}" if resume_path else "starting"
        logger.message(f"formerkit train: {where}; {model.num_parameters() / 1e6:.2f}M parameters, "
                       f"{info.world_size} process(es) on {info.device}; {precision.describe()}")
        logger.message(f"speed: {choices.attention.describe()}; {choices.adamw.describe()}")
        if initialised is not None:
            logger.message(initialised.describe())
    result = TrainResult(run_dir=run_dir, step=start, checkpoint=resume_path, train_loss=None,
                         precision=precision.precision)
    try:
        _loop(cfg, info, model, train_model, optimizer, objective, tokenizer, autocast, logger, start, result,
              scaler, choices)
    finally:
        result.loss_curve = logger.close()
    if info.is_main and cfg.train.objective == "causal":
        _report_causal(cfg, model, tokenizer, source, autocast, result)
    if info.is_main and cfg.train.objective == "seq2seq" and cfg.log.samples:
        result.samples = objective.examples(model, cfg.log.samples, autocast)
    if info.is_main and hasattr(objective, "finish"):  # image classification: test accuracy, confusion matrix
        model.eval()
        result.test = objective.finish(model, run_dir, result.step, info.device, autocast)
    return result


def _report_causal(cfg: TrainConfig, model: Transformer, tokenizer, source, autocast, result: TrainResult) -> None:
    """Samples (with their Python measures for a Python corpus), samples.txt and summary.json of a causal run."""
    summary = {"steps_done": result.step, "steps_planned": cfg.train.steps, "precision": result.precision,
               "tokens_per_s": result.tokens_per_s, "val_loss": result.val.get("loss"),
               "val_bpb": result.val.get("bits_per_byte")}
    if cfg.log.samples:
        prompts = sample_prompts(source, cfg.log.samples)
        result.samples = draw_samples(model, tokenizer, prompts, cfg.log.sample_tokens, cfg.train.seed, autocast)
        write_samples(result.run_dir, result.samples)
        if source is not None and source.is_python:
            result.python = python_measures(result.samples, reference_texts(source, cfg.data.val_fraction))
            summary.update(result.python)
    write_summary(result.run_dir, summary)


def accumulate_gradients(train_model: parallel.Wrapped, loss_fn, micro: list[dict], device: torch.device,
                         autocast, scaler: torch.amp.GradScaler | None = None) -> torch.Tensor:
    """Forward and backward every micro-batch of one step (all-reducing only after the last).

    Each micro-batch's loss is divided by their number, so the gradients are those of the mean
    over the step's batch (multiplied by the fp16 loss scale when a ``scaler`` is given).
    Returns that mean loss (a detached scalar tensor).
    """
    loss_sum = torch.zeros((), device=device)
    for i, batch in enumerate(micro):
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        with parallel.maybe_no_sync(train_model, skip=i < len(micro) - 1):
            with autocast():
                loss = loss_fn(train_model, batch) / len(micro)
            (loss if scaler is None else scaler.scale(loss)).backward()
        loss_sum += loss.detach()
    return loss_sum


def apply_gradients(model: nn.Module, optimizer: torch.optim.Optimizer, grad_clip: float,
                    scaler: torch.amp.GradScaler | None = None) -> float:
    """Clip the gradients, take the optimizer step, clear them; return the norm before clipping.

    With an fp16 ``scaler`` the gradients are unscaled first, and a step whose gradients
    overflowed is skipped (the scaler lowers its scale).
    """
    if scaler is not None:
        scaler.unscale_(optimizer)
    grad_norm = parallel.clip(model, grad_clip)
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm


def _loop(cfg: TrainConfig, info: DistInfo, model: Transformer, train_model: parallel.Wrapped, optimizer, objective,
          tokenizer, autocast, logger: RunLogger, start: int, result: TrainResult,
          scaler: torch.amp.GradScaler | None, choices: RunChoices) -> None:
    t = cfg.train
    started = time.monotonic()
    trained_tokens = 0
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
        step_tokens = sum(objective.tokens(b) for b in micro) * info.world_size
        window_tokens += step_tokens
        trained_tokens += step_tokens
        loss_sum = accumulate_gradients(train_model, objective.loss, micro, info.device, autocast, scaler)
        loss_value = mean_across(float(loss_sum), info)
        if not math.isfinite(loss_value):
            optimizer.zero_grad(set_to_none=True)
            last_good = latest_checkpoint(result.run_dir)
            raise TrainingError(f"the loss became {loss_value} at step {step + 1}; training stopped. The last good "
                                f"checkpoint is {last_good or 'none (none was saved yet)'}; lower --optim.lr or "
                                "check the data")
        grad_norm = apply_gradients(model, optimizer, cfg.optim.grad_clip, scaler)
        step += 1
        result.step, result.train_loss = step, loss_value
        result.tokens_per_s = trained_tokens / max(time.monotonic() - started, 1e-9)
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
                     "rng": rng_state(), "config": cfg.to_dict(), "choices": choices.saved()}
            if scaler is not None:
                state["scaler"] = scaler.state_dict()
            weights_model = parallel.full_model(model, info, cfg)
            if info.is_main:
                result.checkpoint = save_checkpoint(result.run_dir, step, weights_model, tokenizer, state,
                                                    cfg.checkpoint.keep)
            barrier(info)
        if out_of_time and step < t.steps:
            result.stopped = f"time limit of {t.max_minutes} minutes reached at step {step}"
            logger.message(f"stopping: {result.stopped}; resume with the same command to continue")
            break
