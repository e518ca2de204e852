"""RunLogger: metrics.jsonl, resume truncation, TensorBoard events, the loss-curve PNG, the bar and messages."""

from __future__ import annotations

import json
import math
import struct

import numpy as np
import pytest
from matplotlib.image import imread
from tensorboardX.proto.event_pb2 import Event, SessionLog

from formerkit.errors import DataError
from formerkit.train.logging import RunLogger, read_metrics


def _logger(run_dir, total_steps=100, **kw) -> RunLogger:
    return RunLogger(run_dir, total_steps, **{"progress": False, "tensorboard": False, **kw})


def _lines(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _log_run(run_dir, losses, start=1, val_every=0, **kw) -> RunLogger:
    logger = _logger(run_dir, **kw)
    for step, loss in enumerate(losses, start=start):
        logger.log_train(step, {"loss": loss, "lr": 1e-3, "tokens_per_s": 12345.0})
        if val_every and step % val_every == 0:
            logger.log_eval(step, {"loss": loss * 1.1})
    return logger


def _events(event_dir) -> list[Event]:
    """Read every complete event from the TFRecord-framed event files in ``event_dir`` (length, crc, data, crc).

    A record cut short (a process killed while writing) ends the file's events.
    """
    events = []
    for path in sorted(event_dir.glob("events.out.tfevents.*")):
        data, pos = path.read_bytes(), 0
        while pos + 8 <= len(data):
            (length,) = struct.unpack("<Q", data[pos : pos + 8])
            if pos + 12 + length + 4 > len(data):
                break
            events.append(Event.FromString(data[pos + 12 : pos + 12 + length]))
            pos += 12 + length + 4
    return events


def _scalars(event_dir) -> dict[str, list[tuple[int, float]]]:
    """Return {tag: [(step, value), ...]} for every simple scalar in ``event_dir``."""
    out: dict[str, list[tuple[int, float]]] = {}
    for event in _events(event_dir):
        for value in event.summary.value:
            out.setdefault(value.tag, []).append((event.step, value.simple_value))
    return out


def test_metrics_jsonl_is_written_and_flushed_before_close(tmp_path):
    logger = _logger(tmp_path / "run")
    logger.log_train(1, {"loss": 2.5, "lr": 1e-3, "tokens": 4096})
    logger.log_eval(1, {"loss": 2.75})
    lines = _lines(tmp_path / "run" / "metrics.jsonl")  # read while the file is still open
    assert [(r["step"], r["split"]) for r in lines] == [(1, "train"), (1, "val")]
    assert lines[0]["loss"] == 2.5 and lines[0]["lr"] == 1e-3 and lines[0]["tokens"] == 4096
    assert lines[1]["loss"] == 2.75
    assert all(abs(r["time"] - lines[0]["time"]) < 60 and r["time"] > 1.6e9 for r in lines)
    logger.close()


def test_non_finite_values_are_valid_json_and_round_trip(tmp_path):
    logger = _logger(tmp_path)
    logger.log_train(1, {"loss": math.nan, "grad_norm": math.inf, "x": -math.inf})
    text = (tmp_path / "metrics.jsonl").read_text()
    assert "NaN" not in text and "Infinity" not in text
    (record,) = _lines(tmp_path / "metrics.jsonl")  # json.loads accepts NaN too, so check the strings
    assert (record["loss"], record["grad_norm"], record["x"]) == ("nan", "inf", "-inf")
    (parsed,) = read_metrics(tmp_path / "metrics.jsonl")
    assert math.isnan(parsed["loss"]) and parsed["grad_norm"] == math.inf and parsed["x"] == -math.inf
    assert logger.close() is None  # no finite train loss: no plot


def test_reserved_metric_names_are_rejected(tmp_path):
    logger = _logger(tmp_path)
    with pytest.raises(ValueError, match="reserved"):
        logger.log_train(1, {"step": 3.0})
    logger.close()


def test_resume_keeps_steps_up_to_start_step_and_appends(tmp_path):
    _log_run(tmp_path, [5.0, 4.0, 3.0, 2.0, 1.0], val_every=2).close()  # steps 1..5, val at 2 and 4
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 6, "split": "tra')  # killed mid-write
    logger = _logger(tmp_path, start_step=3)
    assert [(r["step"], r["split"]) for r in _lines(tmp_path / "metrics.jsonl")] == [
        (1, "train"),
        (2, "train"),
        (2, "val"),
        (3, "train"),
    ]
    assert not list(tmp_path.glob("*.tmp"))
    logger.log_train(4, {"loss": 0.5})
    train = [(r["step"], r["loss"]) for r in read_metrics(tmp_path / "metrics.jsonl") if r["split"] == "train"]
    assert train == [(1, 5.0), (2, 4.0), (3, 3.0), (4, 0.5)]
    logger.close()


def test_fresh_start_overwrites_existing_metrics(tmp_path):
    _log_run(tmp_path, [3.0, 2.0, 1.0]).close()
    logger = _logger(tmp_path)
    assert (tmp_path / "metrics.jsonl").read_text() == ""
    logger.log_train(1, {"loss": 9.0})
    assert [(r["step"], r["loss"]) for r in _lines(tmp_path / "metrics.jsonl")] == [(1, 9.0)]
    logger.close()


def test_disabled_logger_writes_and_prints_nothing(tmp_path, capsys):
    run_dir = tmp_path / "run"
    logger = RunLogger(run_dir, 10, enabled=False)
    logger.log_train(1, {"loss": 1.0, "tokens_per_s": 10.0, "lr": 0.1})
    logger.log_eval(1, {"loss": 1.0})
    logger.message("hello")
    assert logger.close() is None
    assert not run_dir.exists()
    assert capsys.readouterr() == ("", "")


def test_tensorboard_events_hold_the_scalars(tmp_path):
    logger = _log_run(tmp_path, [3.0, 2.0, 1.0, 0.5], val_every=2, tensorboard=True)
    logger.close()
    scalars = _scalars(tmp_path / "tensorboard")
    assert scalars["train/loss"] == [(1, 3.0), (2, 2.0), (3, 1.0), (4, 0.5)]
    assert [s for s, _ in scalars["val/loss"]] == [2, 4]
    assert scalars["val/loss"][0][1] == pytest.approx(2.2)
    assert scalars["train/tokens_per_s"][0] == (1, 12345.0)
    assert scalars["train/lr"][0][1] == pytest.approx(1e-3)


def test_tensorboard_resume_marks_later_steps_for_purging(tmp_path):
    _log_run(tmp_path, [3.0, 2.0, 1.0, 0.5], tensorboard=True).close()
    _log_run(tmp_path, [0.9], start=3, start_step=2, tensorboard=True).close()
    starts = [e.step for e in _events(tmp_path / "tensorboard") if e.session_log.status == SessionLog.START]
    assert starts[-1] == 3  # TensorBoard hides the first run's events at steps >= 3


def test_loss_curve_png_is_valid_and_depends_on_history(tmp_path):
    falling = [10.0 * 0.97**i for i in range(120)]  # > 10x range: log scale, and long enough to smooth
    path_a = _log_run(tmp_path / "a" / "run", falling, val_every=20).close()
    path_b = _log_run(tmp_path / "b" / "run", [1.0 + 0.5 * math.sin(i / 3) for i in range(10)], val_every=5).close()
    assert path_a == tmp_path / "a" / "run" / "loss_curve.png" and path_b == tmp_path / "b" / "run" / "loss_curve.png"
    for path in (path_a, path_b):
        data = path.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    pixels_a, pixels_b = imread(path_a), imread(path_b)
    assert pixels_a.shape == pixels_b.shape and pixels_a.shape[0] > 100
    assert not np.array_equal(pixels_a, pixels_b)
    assert pixels_a.std() > 0.01  # not a blank canvas
    assert not list((tmp_path / "a" / "run").glob("*.tmp"))


def test_close_twice_and_resumed_run_plots_full_history(tmp_path):
    resumed_dir, solo_dir = tmp_path / "resumed" / "run", tmp_path / "solo" / "run"  # same name: same title
    _log_run(resumed_dir, [4.0, 3.0, 2.0]).close()
    logger = _log_run(resumed_dir, [1.5, 1.0], start=4, start_step=3)
    first = logger.close()
    assert logger.close() == first and first.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    solo = _log_run(solo_dir, [1.5, 1.0], start=4).close()
    assert not np.array_equal(imread(first), imread(solo))  # the resumed plot includes steps 1-3
    same = _log_run(tmp_path / "again" / "run", [4.0, 3.0, 2.0, 1.5, 1.0]).close()
    assert np.array_equal(imread(first), imread(same))  # ...and is exactly the plot of one uninterrupted run


def test_close_without_train_loss_returns_none(tmp_path):
    logger = _logger(tmp_path)
    logger.log_eval(1, {"loss": 1.0})
    assert logger.close() is None
    assert not (tmp_path / "loss_curve.png").exists()


def test_read_metrics_skips_truncated_last_line_only(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "split": "train", "loss": 2.0}\n{"step": 2, "split": "train", "lo')
    assert read_metrics(path) == [{"step": 1, "split": "train", "loss": 2.0}]
    path.write_text('{"step": 1, "spl\n{"step": 2, "split": "train", "loss": 2.0}\n')
    with pytest.raises(DataError, match="line 1"):
        read_metrics(path)


def test_progress_bar_shows_postfix_and_does_not_flood_a_non_tty(tmp_path, capsys):
    logger = RunLogger(tmp_path, 200, tensorboard=False, start_step=0)
    for step in range(1, 101):
        logger.log_train(step, {"loss": 1.23456, "tokens_per_s": 12345.0, "lr": 3e-4})
    logger.message("eval done")
    logger.close()
    out, err = capsys.readouterr()
    assert out == "eval done\n"
    assert "100/200" in err and "loss=1.2346" in err and "tok/s=12.3k" in err and "lr=3.00e-04" in err
    assert err.count("/200") <= 4  # stderr is not a tty here: a few redraws, not one per step


def test_progress_bar_starts_at_start_step(tmp_path, capsys):
    _log_run(tmp_path, [2.0] * 5).close()
    logger = RunLogger(tmp_path, 50, tensorboard=False, start_step=5)
    logger.close()
    assert "5/50" in capsys.readouterr().err


def test_message_without_progress_bar_prints(tmp_path, capsys):
    logger = _logger(tmp_path)
    logger.message("no bar here")
    logger.close()
    assert capsys.readouterr() == ("no bar here\n", "")
