"""The continuous-batching engine: many requests decoded together in the rows of one static KV cache.

Every ``step`` the scheduler
1. retires cancelled and timed-out requests (their rows are free at once);
2. admits waiting requests into free rows: their prompts are prefilled together, as left-padded
   batches of similar lengths (``prefill.prefill_groups``), exactly as ``fk.generate`` prefills
   a left-padded batch; each prompt is copied into its row (``slots.insert_row``) and its first
   token chosen from its row of the prefill's logits;
3. decodes every running row in one forward pass (``Transformer.decode`` over the leading rows
   that hold them, ``slots.leading_rows``: rows hold different numbers of tokens, laid out
   like a left-padded batch), and chooses each row's token with that request's own options
   and generator (``RowSampler``);
4. retires a row as soon as it emits an EOS id, a stop sequence or stop string, or its
   ``max_tokens``-th token.

Other rows' slots are masked and every row has its own positions, so a request's tokens do not
depend on the other requests in the batch (only the float rounding of batched matrix products
can differ): greedy output is the output of ``fk.generate`` on that prompt alone, and a
seeded request draws the tokens ``fk.generate(..., seed=...)`` draws. The engine runs in the caller's thread (``step``,
``run_until_idle``) or in its own (``start``); results arrive through each request's
``on_output`` callback and its ``wait``.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from formerkit.cache import KVCache
from formerkit.errors import InputError
from formerkit.generate.config import GenerationConfig, special_ids
from formerkit.generate.steps import decode_step, inference
from formerkit.generate.text import TEXT_CONTEXT, RowText
from formerkit.layers.linear import tune_linears
from formerkit.serve.metrics import Metrics
from formerkit.serve.prefill import prefill_batch, prefill_groups
from formerkit.serve.sampling import RowSampler, SamplingParams, TokenLogprobs
from formerkit.serve.slots import insert_row, leading_rows, shift_window
from formerkit.tokenizers import Tokenizer

COMPACT_MIN = 64  # dead slots before the rows' tokens worth a shift (attention reads them every step)


class QueueFullError(InputError):
    """The engine's waiting queue is full; the caller should retry later (HTTP 429)."""


class ContextLengthError(InputError):
    """A prompt (plus max_tokens) does not fit in the model's context (HTTP 400)."""


@dataclass(frozen=True)
class Output:
    """One event of a request: a new token (with its text piece), and/or the end of the request.

    token: the new token id (None for an event that only finishes the request). text: the text
    released with it (cut before stop strings; "" without a tokenizer). finish_reason: None
    while running, then "stop" (EOS, stop sequence or string), "length" (max_tokens),
    "cancelled", "timeout" or "error" (``error`` holds the exception).
    """

    token: int | None
    text: str = ""
    logprobs: TokenLogprobs | None = None
    finish_reason: str | None = None
    error: BaseException | None = None


@dataclass(eq=False)
class Request:
    """One submitted prompt and what it has produced so far (made by ``Engine.submit``)."""

    prompt: list[int]
    params: SamplingParams
    on_output: Callable[[Output], None] | None = None
    deadline: float | None = None  # time.monotonic() after which the request times out
    arrived: float = field(default_factory=time.monotonic)
    tokens: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None
    error: BaseException | None = None
    cancelled: bool = False
    row: int | None = None
    cached: int = 0  # tokens of this request in its cache row
    last_time: float = 0.0
    _text: RowText | None = None
    _sampler: RowSampler | None = None
    _done: threading.Event = field(default_factory=threading.Event)

    @property
    def finished(self) -> bool:
        """Whether the request has ended (any finish reason)."""
        return self._done.is_set()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the request has ended (or ``timeout`` seconds pass); return whether it ended."""
        return self._done.wait(timeout)


class Engine:
    """Continuous batching over one static KV cache of ``max_batch`` rows (see the module docstring).

    model: a decoder-only formerkit ``Transformer`` with an LM head. tokenizer: needed for text
    (stop strings, ``Output.text``); without one the engine works on token ids. max_queue:
    requests that may wait for a row; ``submit`` beyond it raises QueueFullError. max_model_len:
    the longest prompt + max_tokens (default: the model's max_seq_len).
    """

    def __init__(self, model: nn.Module, tokenizer: Tokenizer | None = None, *, max_batch: int = 8,
                 max_queue: int = 64, max_model_len: int | None = None) -> None:
        cfg = model.config
        if cfg.kind != "decoder" or getattr(model, "lm_head", None) is None:
            raise InputError(f"the serving engine generates with decoder-only models with a language-model head; "
                             f"this is a kind={cfg.kind!r} model with head={cfg.head!r}")
        if cfg.attn_type == "linear":
            raise InputError("the serving engine moves each request's keys and values between cache rows, and a "
                             "linear-attention model keeps a running state instead; generate with fk.generate")
        if max_batch < 1 or max_queue < 0:
            raise InputError(f"max_batch must be >= 1 and max_queue >= 0, got {max_batch} and {max_queue}")
        self.model, self.tokenizer = model, tokenizer
        self.max_batch, self.max_queue = max_batch, max_queue
        self.max_model_len = min(max_model_len or cfg.max_seq_len, cfg.max_seq_len)
        self.device = next(model.parameters()).device
        self.special = special_ids(GenerationConfig(), cfg, tokenizer_eos=tokenizer.eos_id if tokenizer else None,
                                   tokenizer_pad=tokenizer.pad_id if tokenizer else None)
        self.cache = KVCache.for_model(model, max_batch, 2 * self.max_model_len)
        self.rows: list[Request | None] = [None] * max_batch
        self._views: dict[int, KVCache] = {}  # rows in use -> a cache over the leading rows (``slots.leading_rows``)
        self.metrics = Metrics(max_batch)
        self._waiting: deque[Request] = deque()
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False
        tune_linears(model)

    # ---- submitting (any thread) ----

    def submit(self, prompt: Sequence[int], params: SamplingParams | None = None, *,
               on_output: Callable[[Output], None] | None = None, timeout: float | None = None) -> Request:
        """Queue a prompt (token ids) for generation; return its ``Request``.

        Raises InputError for a bad prompt or options, ContextLengthError when prompt +
        max_tokens exceeds max_model_len (the message names both), and QueueFullError when
        ``max_queue`` requests are already waiting. ``timeout``: seconds until the request
        ends with finish_reason "timeout".
        """
        params = params or SamplingParams()
        ids = self._check_prompt(prompt, params)
        sampler = RowSampler(params, ids, self.model.config.vocab_size, self.device)
        if params.stop and self.tokenizer is None:
            raise InputError("stop strings need a tokenizer: build the Engine with one, or use stop_token_ids")
        request = Request(ids, params, on_output,
                          deadline=time.monotonic() + timeout if timeout is not None else None)
        request._sampler = sampler
        if self.tokenizer is not None:
            request._text = RowText(self.tokenizer, ids[-TEXT_CONTEXT:], set(self._eos(params)), list(params.stop))
        with self._cond:
            if len(self._waiting) >= self.max_queue:
                with self.metrics.lock:
                    self.metrics.rejected += 1
                raise QueueFullError(f"the server is at capacity: {len(self._waiting)} requests are waiting "
                                     f"(max_queue={self.max_queue}); retry later")
            self._waiting.append(request)
            with self.metrics.lock:
                self.metrics.waiting = len(self._waiting)
            self._cond.notify()
        return request

    def cancel(self, request: Request) -> None:
        """Ask for ``request`` to end (finish_reason "cancelled"); its row is freed at the next step."""
        with self._cond:
            request.cancelled = True
            self._cond.notify()

    def _check_prompt(self, prompt: Sequence[int], params: SamplingParams) -> list[int]:
        """The prompt as a list of ids, checked against the vocabulary and the context length."""
        if isinstance(prompt, (str, bytes)) or not isinstance(prompt, Sequence) or not prompt:
            raise InputError("the prompt must be a non-empty list of token ids")
        vocab = self.model.config.vocab_size
        if not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < vocab for t in prompt):
            raise InputError(f"prompt token ids must be integers in [0, {vocab})")
        params.generation_config()  # validates the options
        total = len(prompt) + params.max_tokens
        if total > self.max_model_len:
            raise ContextLengthError(
                f"this model's maximum context length is {self.max_model_len} tokens, but the prompt has "
                f"{len(prompt)} tokens and max_tokens is {params.max_tokens} ({total} in all); shorten the prompt "
                "or lower max_tokens")
        return list(prompt)

    def _eos(self, params: SamplingParams) -> tuple[int, ...]:
        return () if params.ignore_eos else self.special.eos

    # ---- running ----

    @property
    def idle(self) -> bool:
        """True when no request is waiting or running."""
        return not self._waiting and all(r is None for r in self.rows)

    def step(self) -> None:
        """One scheduling step: retire cancelled/timed-out requests, admit waiting ones, decode the batch once."""
        now = time.monotonic()
        admitted = []
        with self._cond:
            for request in list(self._waiting):
                if request.cancelled or (request.deadline is not None and now > request.deadline):
                    self._waiting.remove(request)
                    self._finish(request, "cancelled" if request.cancelled else "timeout")
            free = sum(r is None for r in self.rows)
            while self._waiting and len(admitted) < free:
                admitted.append(self._waiting.popleft())
            with self.metrics.lock:
                self.metrics.waiting = len(self._waiting)
        for request in self.rows:
            if request is not None and (request.cancelled or (request.deadline is not None and now > request.deadline)):
                self._finish(request, "cancelled" if request.cancelled else "timeout")
        if admitted:
            self._admit(admitted)
        if any(r is not None for r in self.rows):
            self._decode()
        with self.metrics.lock:
            self.metrics.running = sum(r is not None for r in self.rows)

    def run_until_idle(self) -> None:
        """Step until every submitted request has ended (in the calling thread)."""
        while not self.idle:
            self.step()

    def start(self) -> None:
        """Run the engine in a background thread until ``stop``."""
        if self._thread is not None:
            return
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="formerkit-engine", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop the background thread; requests still waiting or running end as "cancelled"."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        for request in [*self._waiting, *(r for r in self.rows if r is not None)]:
            self._finish(request, "cancelled")
        self._waiting.clear()

    def _loop(self) -> None:
        while True:
            with self._cond:
                while self.idle and not self._stopping:
                    self._cond.wait()
                if self._stopping:
                    return
            self.step()

    # ---- one request ----

    def _admit(self, requests: list[Request]) -> None:
        """Prefill the admitted ``requests`` in batches (``prefill_groups``); place each in a row, emit its first token.

        When a batched pass raises, its prompts are prefilled again one at a time, so only a
        prompt the model cannot run fails (that request alone, with finish_reason "error").
        """
        for group in prefill_groups([len(r.prompt) for r in requests]):
            batch = [requests[i] for i in group]
            try:
                prefilled, logits = self._prefill(batch)
            except Exception as err:  # the model failed on this batch: find the prompt(s) it fails on
                if len(batch) == 1:
                    self._finish(batch[0], "error", err)
                else:
                    self._admit_one_by_one(batch)
                continue
            self._place(batch, prefilled, logits)

    def _admit_one_by_one(self, requests: list[Request]) -> None:
        """Prefill each of ``requests`` alone; one the model fails on ends with "error", the others are placed."""
        for request in requests:
            try:
                prefilled, logits = self._prefill([request])
            except Exception as err:
                self._finish(request, "error", err)
                continue
            self._place([request], prefilled, logits)

    def _prefill(self, batch: list[Request]) -> tuple[KVCache, torch.Tensor]:
        """One prefill pass over ``batch`` as a left-padded batch: (its cache, the next-token logits (B, V))."""
        with inference(self.model):
            prefilled, logits = prefill_batch(self.model, [r.prompt for r in batch], self.special.pad)
        with self.metrics.lock:
            self.metrics.prefills += 1
        return prefilled, logits

    def _place(self, batch: list[Request], prefilled: KVCache, logits: torch.Tensor) -> None:
        """Copy each request of a prefilled ``batch`` into a free row and emit its first token from logits (B, V)."""
        if not any(r is not None for r in self.rows):
            self.cache.truncate(0)
            self.cache.advance(prefilled.length)
        elif self.cache.length < prefilled.length:
            shift_window(self.cache, prefilled.length)
        for b, request in enumerate(batch):
            n = len(request.prompt)
            row = self.rows.index(None)
            insert_row(self.cache, row, prefilled, b, n)
            request.row, request.cached = row, n
            self.rows[row] = request
            with self.metrics.lock:
                self.metrics.prompt_tokens += n
            self._emit(request, *request._sampler.choose(logits[b:b + 1]))

    def _decode(self) -> None:
        """Feed every running row its last token in one forward pass and choose each row's next token."""
        live = [r for r in self.rows if r is not None]
        longest = max(r.cached for r in live)
        if self.cache.length == self.cache.max_len or self.cache.length - longest >= max(COMPACT_MIN,
                                                                                         self.cache.length // 2):
            shift_window(self.cache, longest)
        used = max(r.row for r in live) + 1  # rows [0, used) hold every running request
        view = self._views.get(used) or self._views.setdefault(used, leading_rows(self.cache, used))
        view.length = self.cache.length
        tokens = torch.tensor([r.tokens[-1] if r else self.special.pad for r in self.rows[:used]],
                              device=self.device)  # (used,)
        positions = torch.tensor([r.cached if r else 0 for r in self.rows[:used]], device=self.device)  # (used,)
        try:
            with inference(self.model):
                logits = decode_step(self.model, tokens, positions, view)  # (used, V)
        except Exception as err:  # the batch failed: fail its requests, keep serving the next ones
            for request in live:
                self._finish(request, "error", err)
            return
        finally:
            self.cache.length = view.length  # the cursor tensor moved with the view; its host copy follows
        with self.metrics.lock:
            self.metrics.steps += 1
        for request in live:
            request.cached += 1
            self._emit(request, *request._sampler.choose(logits[request.row:request.row + 1]))

    def _emit(self, request: Request, token: int, logprobs: TokenLogprobs | None) -> None:
        """Record a new token of ``request``, deliver it, and retire the request if it is done."""
        now = time.monotonic()
        with self.metrics.lock:
            self.metrics.generation_tokens += 1
            (self.metrics.itl.observe(now - request.last_time) if request.tokens
             else self.metrics.ttft.observe(now - request.arrived))
        request.last_time = now
        request.tokens.append(token)
        params = request.params
        reason = "stop" if token in self._eos(params) else None
        if request._text is not None and request._text.add(token):
            reason = "stop"
        tokens = request.tokens
        if any(len(seq) <= len(tokens) and tokens[-len(seq):] == list(seq) for seq in params.stop_token_ids):
            reason = "stop"
        if reason is None and len(request.tokens) >= params.max_tokens:
            reason = "length"
        piece = request._text.release(final=reason is not None) if request._text is not None else ""
        request.text += piece
        self._deliver(request, Output(token, piece, logprobs))
        if reason is not None:
            self._finish(request, reason)

    def _finish(self, request: Request, reason: str, error: BaseException | None = None) -> None:
        """End ``request`` with ``reason``: free its row, deliver the final event, wake its waiters."""
        if request.finished:
            return
        if request.row is not None and self.rows[request.row] is request:
            self.rows[request.row] = None
        request.finish_reason, request.error = reason, error
        with self.metrics.lock:
            self.metrics.requests[reason] += 1
        self._deliver(request, Output(None, finish_reason=reason, error=error))
        request._done.set()

    def _deliver(self, request: Request, output: Output) -> None:
        """Hand ``output`` to the request's callback; a callback that raises cancels its request only."""
        if request.on_output is None:
            return
        try:
            request.on_output(output)
        except Exception:  # e.g. the client's event loop is gone: nobody is listening any more
            request.cancelled = True

