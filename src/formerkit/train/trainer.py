"""The training loop: one function, ``train(cfg)``, for one process or many under torchrun."""

from __future__ import annotations

import contextlib
import math
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml
from torch import nn

from formerkit.checkpoints import load_weights_into
from formerkit.data import resolve_source
from formerkit.errors import ConfigError, FormerkitWarning, TrainingError
from formerkit.fileio import atomic_write
from formerkit.model import Transformer
from formerkit.precision import DTYPES
from formerkit.train import parallel
from formerkit.train.allocator import keep_freed_memory
from formerkit.train.config import TrainConfig
from formerkit.train.distributed import DistInfo, barrier, mean_across, setup, teardown
from formerkit.train.guard import RunLock, StopSignals
from formerkit.train.init_from import init_weights
from formerkit.train.logging import RunLogger
from formerkit.train.lora import STATE_KEY as LORA_STATE
from formerkit.train.lora import attach_lora, lora_state, merged_copy, save_run_adapter
from formerkit.train.objectives import split_micro
from formerkit.train.optim import Schedule, build_optimizer, resume_schedule
from formerkit.train.report import report_causal
from formerkit.train.setup import build_objective, prepare_tokenizer
from formerkit.train.state import Resumed, latest_checkpoint, resume_point, rng_state, save_checkpoint, set_rng_state
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
    """Train as ``cfg`` says: build or resume the run in ``cfg.checkpoint.run_dir`` and return its result.

    The run directory is locked for the run's life (rank 0); Ctrl-C or SIGTERM during the loop
    saves a checkpoint and returns with ``result.stopped`` saying so.
    """
    info = setup(cfg.train.device)
    keep_freed_memory()  # no page faults on every step's fresh activation buffers (see train/allocator.py)
    threads = torch.get_num_threads()  # train.threads applies to this run only
    lock = RunLock(cfg.checkpoint.run_dir) if info.is_main else contextlib.nullcontext()
    try:
        with lock:
            if isinstance(lock, RunLock) and lock.took_over:
                was = lock.took_over
                warnings.warn(f"taking over the run directory's lock left by pid {was.get('pid')} (started "
                              f"{was.get('started')}), which is no longer running", FormerkitWarning, stacklevel=2)
            return _run(cfg, info)
    finally:
        torch.set_num_threads(threads)
        teardown(info)


def autocast_for(precision: str, device: torch.device):
    """A factory of autocast contexts for a resolved precision (fp32: a no-op context)."""
    if precision == "fp32":
        return contextlib.nullcontext
    return lambda: torch.autocast(device_type=device.type, dtype=DTYPES[precision])


def _check_resume(cfg: TrainConfig, run_dir: Path) -> Resumed | None:
    """The checkpoint to resume from (read whole), after checking the run's options still match; None: start."""
    which = cfg.checkpoint.resume
    if which is False:
        latest = latest_checkpoint(run_dir)
        if latest is not None:
            raise TrainingError(f"{run_dir} already holds checkpoints (latest {latest.name}); resume it with "
                                "--checkpoint.resume true (or a step directory) or choose another "
                                "--checkpoint.run_dir")
        return None
    resumed = resume_point(run_dir, which)
    if resumed is None:
        return None
    saved = yaml.safe_load((run_dir / "config.yaml").read_text()) if (run_dir / "config.yaml").is_file() else {}
    for section in ("model", "data", "lora"):
        if saved.get(section) not in (None, cfg.to_dict()[section]):
            raise TrainingError(f"{run_dir} was trained with different {section} options ({saved[section]}); "
                                "resume with the same options or choose another --checkpoint.run_dir")
    return resumed


@dataclass
class _Run:
    """Everything the loop works with."""

    cfg: TrainConfig
    info: DistInfo
    model: Transformer
    train_model: parallel.Wrapped
    optimizer: torch.optim.Optimizer
    objective: object
    tokenizer: object
    autocast: object
    logger: RunLogger
    scaler: torch.amp.GradScaler | None
    choices: RunChoices
    schedule: Schedule
    result: TrainResult


def _run(cfg: TrainConfig, info: DistInfo) -> TrainResult:
    run_dir = Path(cfg.checkpoint.run_dir)
    resumed = _check_resume(cfg, run_dir)
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
    tokenizer = prepare_tokenizer(cfg, run_dir, resumed.tokenizer if resumed else None, source, info)
    objective, model_cfg, data_line = build_objective(cfg, tokenizer, source, info)
    model = Transformer(model_cfg).to(info.device)
    start, schedule = 0, Schedule(0, cfg.train.steps)
    lora = cfg.lora.r > 0
    if resumed is not None:
        if not lora:  # a LoRA run rebuilds its frozen weights from init_from and its adapters from the state
            load_weights_into(model, resumed.weights, resumed.path)
        start = resumed.step
        schedule = resume_schedule(resumed.state, cfg, run_dir)
    initialised = init_weights(model, cfg.model["init_from"]) \
        if cfg.model.get("init_from") and (not resumed or lora) else None
    lora_line = attach_lora(model, cfg, initialised, resumed.state.get(LORA_STATE) if resumed else None) \
        if lora else None
    choices = make_choices(cfg, model, info, resumed.state.get("choices", {}) if resumed else {})
    use_attention(model, choices.attention.chosen)
    parallel.shard(model, cfg, info)
    optimizer = build_optimizer(model, cfg.optim, choices.adamw.chosen)
    scaler = torch.amp.GradScaler(info.device.type) if choices.precision.precision == "fp16" else None
    if resumed is not None:
        parallel.load_optimizer_state(model, optimizer, resumed.state["optimizer"])
        set_rng_state(resumed.state["rng"])
        if scaler is not None and "scaler" in resumed.state:
            scaler.load_state_dict(resumed.state["scaler"])
    logger = RunLogger(run_dir, cfg.train.steps, enabled=info.is_main, progress=cfg.log.progress,
                       tensorboard=cfg.log.tensorboard, start_step=start)
    if info.is_main:
        where = f"resuming {resumed.path} at step {start}" if resumed else "starting"
        logger.message(f"formerkit train: {where}; {model.num_parameters() / 1e6:.2f}M parameters, "
                       f"{info.world_size} process(es) on {info.device}; {choices.precision.describe()}")
        logger.message(f"speed: {choices.attention.describe()}; {choices.adamw.describe()}")
        logger.message(data_line)
        per_step = cfg.train.batch_size * cfg.train.seq_len
        logger.message(f"plan: steps {start + 1}-{cfg.train.steps}, {per_step:,} tokens per step (batch "
                       f"{cfg.train.batch_size} x {cfg.train.seq_len}), {per_step * (cfg.train.steps - start):,} "
                       f"tokens to go{schedule.describe(cfg.optim)}; run directory {run_dir}")
        if initialised is not None:
            logger.message(initialised.describe())
        if lora_line is not None:
            logger.message(lora_line)
    result = TrainResult(run_dir=run_dir, step=start, checkpoint=resumed.path if resumed else None, train_loss=None,
                         precision=choices.precision.precision)
    run = _Run(cfg, info, model, parallel.wrap(model, cfg, info), optimizer, objective, tokenizer,
               autocast_for(choices.precision.precision, info.device), logger, scaler, choices, schedule, result)
    try:
        with StopSignals() as signals:
            _loop(run, start, signals)
    finally:
        result.loss_curve = logger.close()
    if result.stopped and result.stopped.startswith("interrupted"):
        return result
    _finish(run, source)
    return result


def _finish(run: _Run, source) -> None:
    """What a run does after its last step: samples and summary, translations, or the image test report."""
    cfg, info, result = run.cfg, run.info, run.result
    if not info.is_main:
        return
    if cfg.train.objective == "causal":
        report_causal(cfg, run.model, run.tokenizer, source, run.autocast, result)
    if cfg.train.objective == "seq2seq" and cfg.log.samples:
        result.samples = run.objective.examples(run.model, cfg.log.samples, run.autocast)
    if hasattr(run.objective, "finish"):  # image classification: test accuracy, confusion matrix
        run.model.eval()
        result.test = run.objective.finish(run.model, result.run_dir, result.step, info.device, run.autocast)


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


def _loop(run: _Run, start: int, signals: StopSignals) -> None:
    """Train from step ``start`` to ``train.steps``: log, evaluate and save on schedule; stop on time or signal."""
    cfg, info, t, result = run.cfg, run.info, run.cfg.train, run.result
    started = time.monotonic()
    trained_tokens = 0
    window_tokens, window_start = 0, time.monotonic()
    step = start
    if step >= t.steps:  # a finished run: report where it stands
        run.train_model.eval()
        result.val = run.objective.evaluate(run.train_model, info.device, run.autocast)
    while step < t.steps:
        run.train_model.train()
        lr = run.schedule.lr(step, cfg.optim)
        for group in run.optimizer.param_groups:
            group["lr"] = lr
        micro = split_micro(run.objective.train_batch(step), t.grad_accum)
        step_tokens = sum(run.objective.tokens(b) for b in micro) * info.world_size
        window_tokens += step_tokens
        trained_tokens += step_tokens
        loss_sum = accumulate_gradients(run.train_model, run.objective.loss, micro, info.device, run.autocast,
                                        run.scaler)
        loss_value = mean_across(float(loss_sum), info)
        if not math.isfinite(loss_value):
            run.optimizer.zero_grad(set_to_none=True)
            last_good = latest_checkpoint(result.run_dir)
            raise TrainingError(f"the loss became {loss_value} at step {step + 1}; training stopped. The last good "
                                f"checkpoint is {last_good or 'none (none was saved yet)'}; lower --optim.lr or "
                                "check the data")
        grad_norm = apply_gradients(run.model, run.optimizer, cfg.optim.grad_clip, run.scaler)
        step += 1
        result.step, result.train_loss = step, loss_value
        result.tokens_per_s = trained_tokens / max(time.monotonic() - started, 1e-9)
        if step % cfg.log.every == 0 or step == t.steps:
            elapsed = time.monotonic() - window_start
            run.logger.log_train(step, {"loss": loss_value, "lr": lr, "grad_norm": grad_norm,
                                        "tokens_per_s": window_tokens / max(elapsed, 1e-9)})
            if step - start == cfg.log.every and step < t.steps:  # the first window: how long the rest will take
                per_step = elapsed / cfg.log.every
                run.logger.message(f"{per_step:.2f} s per step so far: about {_minutes(per_step * (t.steps - step))} "
                                   "to go, evaluation and checkpoints aside")
            window_tokens, window_start = 0, time.monotonic()
        out_of_time = t.max_minutes is not None and time.monotonic() - started > t.max_minutes * 60
        stop = mean_across(float(out_of_time) + 2 * float(signals.received is not None), info)
        final = step == t.steps or stop > 0  # every process stops together
        if (step % cfg.eval.every == 0 or final) and not signals.received:
            run.train_model.eval()
            result.val = run.objective.evaluate(run.train_model, info.device, run.autocast)
            run.logger.log_eval(step, result.val)
        if step % cfg.checkpoint.every == 0 or final:
            _save(run, step)
        if signals.received and step < t.steps:
            result.stopped = f"interrupted by {signals.received} at step {step}"
            run.logger.message(f"{result.stopped}: saved {result.checkpoint}; run the same command to resume")
            break
        if stop > 0 and step < t.steps:
            result.stopped = f"time limit of {t.max_minutes} minutes reached at step {step}"
            run.logger.message(f"stopping: {result.stopped}; resume with the same command to continue")
            break


def _save(run: _Run, step: int) -> None:
    """Write checkpoint ``step``: weights, tokenizer, optimizer, RNG, schedule and start-up choices."""
    state = {"step": step, "optimizer": parallel.optimizer_state(run.model, run.optimizer), "rng": rng_state(),
             "config": run.cfg.to_dict(), "choices": run.choices.saved(), "schedule": run.schedule.saved()}
    if run.scaler is not None:
        state["scaler"] = run.scaler.state_dict()
    weights_model = parallel.full_model(run.model, run.info, run.cfg)
    if run.cfg.lora.r > 0:
        state[LORA_STATE] = lora_state(run.model)
        weights_model = merged_copy(run.model)
    if run.info.is_main:
        run.result.checkpoint = save_checkpoint(run.result.run_dir, step, weights_model, run.tokenizer, state,
                                                run.cfg.checkpoint.keep)
        if run.cfg.lora.r > 0:
            save_run_adapter(run.model, run.cfg)
    barrier(run.info)


def _minutes(seconds: float) -> str:
    return f"{seconds / 60:.1f} minutes" if seconds >= 90 else f"{seconds:.0f} s"
