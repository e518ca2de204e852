"""A run that protects itself: one process per run directory, and a clean stop on Ctrl-C or SIGTERM.

``RunLock`` takes an exclusive ``flock`` on ``RUN_DIR/.lock`` and writes the holder's pid, host
and start time into it. A second ``formerkit train`` on the same directory fails at once with a
TrainingError naming the holder. The kernel drops the lock when its process dies, however it
dies, so a lock file left behind by a killed run is stale by construction: the next run takes it
over (and says so).

``StopSignals`` turns SIGINT and SIGTERM into a flag the training loop reads after each step:
the loop saves a checkpoint and returns, instead of dying mid-step with a traceback. A second
signal while the checkpoint is written is deferred too (the save is atomic anyway).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import threading
import time
from pathlib import Path
from types import FrameType

from formerkit.errors import TrainingError

try:
    import fcntl
except ImportError:  # not POSIX: runs are not locked
    fcntl = None

LOCK_FILE = ".lock"


class RunLock:
    """Exclusive ownership of a run directory for the life of the context (a no-op where flock is missing)."""

    def __init__(self, run_dir: str | Path) -> None:
        self.path = Path(run_dir) / LOCK_FILE
        self._handle = None
        self.took_over: dict | None = None  # what a stale lock file said, when one was taken over

    def __enter__(self) -> RunLock:
        if fcntl is None:
            return self
        self.path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(self.path, "a+")  # noqa: SIM115 - held open for the life of the lock
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read(handle)
            handle.close()
            who = f"pid {holder.get('pid', '?')} on {holder.get('host', '?')}, started {holder.get('started', '?')}"
            raise TrainingError(f"{self.path.parent} is in use by another formerkit train ({who}); wait for it to "
                                "finish or choose another --checkpoint.run_dir") from None
        self.took_over = _read(handle) or None
        handle.seek(0)
        handle.truncate()
        handle.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                 "started": time.strftime("%Y-%m-%d %H:%M:%S")}) + "\n")
        handle.flush()
        self._handle = handle
        return self

    def __exit__(self, *exc) -> None:
        if self._handle is not None:
            self._handle.seek(0)
            self._handle.truncate()  # an empty file: nobody holds the run
            fcntl.flock(self._handle, fcntl.LOCK_UN)
            self._handle.close()
            self._handle = None


def _read(handle) -> dict:
    handle.seek(0)
    try:
        data = json.loads(handle.read() or "{}")
    except json.JSONDecodeError:
        return {}
    return data if isinstance(data, dict) else {}


class StopSignals:
    """While active, SIGINT and SIGTERM set ``received`` (the signal's name) instead of killing the process.

    Installed only from the main thread (Python delivers signals there); elsewhere it does nothing.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.received: str | None = None
        self._previous: dict[int, object] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.received = signal.Signals(signum).name

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
