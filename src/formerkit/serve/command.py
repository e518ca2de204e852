"""``formerkit serve``: load a checkpoint and serve it over the OpenAI API with uvicorn.

FastAPI, uvicorn and jinja2 (chat templates) are the optional ``serve`` extra: this module
imports them only when the command runs, so ``import formerkit`` and the other commands never
need them.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import signal
import threading
from collections.abc import Iterator
from pathlib import Path

from formerkit.cliargs import non_negative_int, positive_int
from formerkit.errors import FormerkitError, InputError


def require_serving() -> None:
    """Raise FormerkitError saying how to install the serving extra when FastAPI, uvicorn or jinja2 is missing."""
    for name in ("fastapi", "uvicorn", "jinja2"):
        try:
            importlib.import_module(name)
        except ImportError as err:
            raise FormerkitError(f"formerkit serve needs {name} ({err}); install the serving extra: "
                                 "pip install 'formerkit[serve]'") from err


def build_app(checkpoint: str | Path, *, max_batch: int = 8, max_queue: int = 64, max_model_len: int | None = None,
              api_key: str | None = None, request_timeout: float | None = 600.0, model_name: str | None = None,
              max_body_bytes: int = 1 << 20):
    """Load ``checkpoint`` (model, tokenizer, chat template) and return the FastAPI app serving it.

    Decoder models generate (completions, chat) through a continuous-batching ``Engine`` of
    ``max_batch`` rows; encoder models serve embeddings. The engine starts with the app.
    """
    require_serving()
    from formerkit.checkpoints import from_pretrained
    from formerkit.rundir import resolve_checkpoint_dir
    from formerkit.serve.app import create_app
    from formerkit.serve.chat import load_chat_template
    from formerkit.serve.engine import Engine
    from formerkit.tokenizers import load_tokenizer

    directory = resolve_checkpoint_dir(Path(checkpoint))
    model = from_pretrained(directory).eval()
    tokenizer = load_tokenizer(directory)
    kind = model.config.kind
    if kind == "encoder-decoder":
        raise InputError("formerkit serve generates with decoder-only models and embeds with encoders; "
                         "this checkpoint is an encoder-decoder model")
    engine = (Engine(model, tokenizer, max_batch=max_batch, max_queue=max_queue, max_model_len=max_model_len)
              if kind == "decoder" else None)
    return create_app(engine, tokenizer, model_name=model_name or Path(checkpoint).resolve().name,
                      chat_template=load_chat_template(directory), embedder=model if kind == "encoder" else None,
                      api_key=api_key, request_timeout=request_timeout, max_body_bytes=max_body_bytes)


def stoppable_server(app, host: str, port: int):
    """A uvicorn ``Server`` for ``app`` that ends its run normally on SIGINT or SIGTERM.

    Either signal asks for a graceful shutdown (open requests finish, the engine stops); a
    second SIGINT forces it. Unlike uvicorn's own handling, the signal is not raised again
    once the server has stopped, so a stop request ends ``formerkit serve`` with exit code 0.
    """
    import uvicorn

    class Server(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            if threading.current_thread() is not threading.main_thread():
                yield
                return
            previous = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
            try:
                yield
            finally:
                for sig, handler in previous.items():
                    signal.signal(sig, handler)

    return Server(uvicorn.Config(app, host=host, port=port, log_level="info"))


def cmd_serve(args: argparse.Namespace) -> None:
    """``formerkit serve``: run the OpenAI-compatible server until SIGINT or SIGTERM (then exit code 0)."""
    require_serving()
    app = build_app(args.checkpoint, max_batch=args.max_batch, max_queue=args.max_queue,
                    max_model_len=args.max_model_len, api_key=args.api_key, request_timeout=args.timeout,
                    model_name=args.model_name)
    stoppable_server(app, args.host, args.port).run()


def add_serve_command(subparsers: argparse._SubParsersAction) -> None:
    """Register the ``serve`` subcommand on the ``formerkit`` parser's subparsers."""
    p = subparsers.add_parser("serve", help="serve a checkpoint over the OpenAI API (continuous batching)")
    p.add_argument("--checkpoint", required=True, help="checkpoint directory (native or HF) or training run directory")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    p.add_argument("--port", type=non_negative_int, default=8000, help="port to listen on (default: 8000)")
    p.add_argument("--max-batch", type=positive_int, default=8,
                   help="requests decoded together: rows of the KV cache (default: 8)")
    p.add_argument("--max-queue", type=non_negative_int, default=64,
                   help="requests that may wait for a row; beyond it the server answers 429 (default: 64)")
    p.add_argument("--max-model-len", type=positive_int, default=None,
                   help="longest prompt + max_tokens (default: the model's max_seq_len)")
    p.add_argument("--api-key", default=None,
                   help="require 'Authorization: Bearer KEY' on /v1 routes (default: no key needed)")
    p.add_argument("--timeout", type=float, default=600.0,
                   help="seconds a request may take, waiting included (default: 600.0)")
    p.add_argument("--model-name", default=None, help="the model id clients use (default: the directory name)")
    p.set_defaults(func=cmd_serve)
