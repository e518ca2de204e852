"""``formerkit serve`` as its own process: it starts, answers on a loopback port, and stops cleanly on a signal.

The command runs as a user runs it (``python -m formerkit.cli serve``) on a tiny checkpoint
saved in tmp_path, with ``--port 0`` (the system picks a free port; the test reads it from
uvicorn's start-up line). SIGINT (Ctrl-C) and SIGTERM (what service managers send) must each
end it with exit code 0 and free the port.
"""

from __future__ import annotations

import json
import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

import formerkit as fk
from conftest import require
from formerkit.generate.text import generate_text

require("fastapi")  # the serve extra: make installs it, so CI fails rather than skips without it
httpx = require("httpx")

ROOT = Path(__file__).resolve().parents[1]
SMALL = dict(n_layers=1, d_model=32, n_heads=4, n_kv_heads=2, d_ff=48, vocab_size=259, max_seq_len=64,
             tie_embeddings=False)
TEMPLATE = "{% for m in messages %}<{{ m.role }}>{{ m.content }}\n{% endfor %}<assistant>"
STARTED = re.compile(r"Uvicorn running on http://127\.0\.0\.1:(\d+)")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A tiny Llama-shaped decoder with a byte tokenizer and a chat template, saved as a native checkpoint."""
    torch.manual_seed(0)
    model = fk.Transformer(fk.ModelConfig.from_preset("llama", **SMALL)).eval()
    directory = tmp_path_factory.mktemp("serve-process") / "tiny"
    fk.save_pretrained(model, directory, tokenizer=fk.ByteTokenizer())
    (directory / "tokenizer_config.json").write_text(json.dumps({"chat_template": TEMPLATE}))
    return directory


class _Process:
    """``formerkit serve`` in a child process; its stderr lines are collected by a thread (the pipe never fills)."""

    def __init__(self, checkpoint: Path) -> None:
        env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
        self.proc = subprocess.Popen([sys.executable, "-m", "formerkit.cli", "serve", "--checkpoint", str(checkpoint),
                                      "--port", "0", "--max-batch", "4"],
                                     env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        self.lines: queue.Queue[str] = queue.Queue()
        self.log: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stderr:
            self.log.append(line)
            self.lines.put(line)

    def port(self, timeout: float = 60.0) -> int:
        """The port the server listens on, once uvicorn says it is running."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                match = STARTED.search(self.lines.get(timeout=0.5))
            except queue.Empty:
                assert self.proc.poll() is None, f"formerkit serve exited early:\n{''.join(self.log)}"
                continue
            if match:
                return int(match.group(1))
        raise AssertionError(f"formerkit serve did not start within {timeout} s:\n{''.join(self.log)}")


def _port_is_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def _check_answers(url: str, checkpoint: Path) -> None:
    """/health, a completion and a streamed chat, each equal to generating alone."""
    assert httpx.get(f"{url}/health", timeout=10).json() == {"status": "ok"}
    model, tok = fk.from_pretrained(checkpoint).eval(), fk.load_tokenizer(checkpoint)
    done = httpx.post(f"{url}/v1/completions", timeout=30,
                      json={"prompt": "Once upon", "max_tokens": 8, "temperature": 0}).json()
    assert done["choices"][0]["text"] == generate_text(model, tok, "Once upon", max_new_tokens=8)[9:]
    assert done["usage"]["completion_tokens"] == 8
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 6, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=30) as r:
        lines = [line for line in r.iter_lines() if line]
    assert lines[-1] == "data: [DONE]" and all(line.startswith("data: ") for line in lines)
    chunks = [json.loads(line[6:]) for line in lines[:-1]]
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)
    rendered = "<user>hi\n<assistant>"
    assert text == generate_text(model, tok, rendered, max_new_tokens=6)[len(rendered):]
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"


def test_serve_runs_as_a_process_answers_and_stops_cleanly_on_sigint_and_sigterm(checkpoint):
    # two servers start at once (their start-up is mostly imports): one is stopped by each signal
    servers = {signal.SIGINT: _Process(checkpoint), signal.SIGTERM: _Process(checkpoint)}
    try:
        for stop, server in servers.items():
            port = server.port()
            _check_answers(f"http://127.0.0.1:{port}", checkpoint)
            server.proc.send_signal(stop)
            assert server.proc.wait(20) == 0, f"{stop.name}:\n{''.join(server.log)}"
            assert _port_is_free(port), f"port {port} still taken after {stop.name}"
    finally:
        for server in servers.values():
            if server.proc.poll() is None:
                server.proc.kill()
                server.proc.wait(10)
