"""OpenAI response objects and the bridge from engine events (a thread) to the event loop.

``Batch`` submits the choices of one HTTP request to the engine and receives their events on
an ``asyncio.Queue`` (the engine's thread hands them over with ``call_soon_threadsafe``).
The builders turn finished choices into ``text_completion`` / ``chat.completion`` objects,
with ``usage`` and ``logprobs`` in the OpenAI layout, and stream pieces into SSE chunks.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from dataclasses import dataclass, field

from formerkit.serve.engine import Engine, Output, Request
from formerkit.serve.sampling import SamplingParams, TokenLogprobs
from formerkit.tokenizers import Tokenizer


@dataclass
class Choice:
    """One generated choice of an HTTP request: its prompt, its engine request and its log-probabilities."""

    index: int
    prompt: list[int]
    request: Request | None = None
    logprobs: list[tuple[int, TokenLogprobs]] = field(default_factory=list)


class Batch:
    """The choices of one HTTP request, submitted together and cancelled together."""

    def __init__(self, engine: Engine, timeout: float | None) -> None:
        self.engine, self.timeout = engine, timeout
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue[tuple[Choice, Output]] = asyncio.Queue()
        self.choices: list[Choice] = []
        self._pending = 0

    def submit(self, prompt: list[int], params: SamplingParams) -> Choice:
        """Queue one choice in the engine (raises the engine's InputError / QueueFullError)."""
        choice = Choice(len(self.choices), prompt)

        def deliver(output: Output) -> None:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, (choice, output))

        choice.request = self.engine.submit(prompt, params, on_output=deliver, timeout=self.timeout)
        self.choices.append(choice)
        self._pending += 1
        return choice

    def cancel(self) -> None:
        """Cancel every choice that has not finished (the client left, or a sibling failed)."""
        for choice in self.choices:
            if not choice.request.finished:
                self.engine.cancel(choice.request)

    @property
    def pending(self) -> int:
        """Choices whose final event has not been received yet."""
        return self._pending

    async def next_event(self) -> tuple[Choice, Output]:
        """The next (choice, output) from the engine (safe to cancel while it waits)."""
        choice, output = await self.queue.get()
        if output.logprobs is not None:
            choice.logprobs.append((output.token, output.logprobs))
        if output.finish_reason is not None:
            self._pending -= 1
        return choice, output

    async def events(self):
        """Yield (choice, output) as the engine produces them, until every choice has finished."""
        while self._pending:
            yield await self.next_event()


def new_id(prefix: str) -> str:
    """A fresh response id like OpenAI's (``cmpl-...``, ``chatcmpl-...``)."""
    return f"{prefix}-{uuid.uuid4().hex}"


def usage(prompts: list[list[int]], choices: list[Choice]) -> dict:
    """The ``usage`` object: prompt tokens (each prompt once), completion tokens (every choice)."""
    prompt_tokens = sum(len(p) for p in prompts)
    completion = sum(len(c.request.tokens) for c in choices)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion, "total_tokens": prompt_tokens + completion}


def token_text(tokenizer: Tokenizer, token: int) -> str:
    """One token as text (special tokens included), for log-probability listings.

    A token that is not text on its own (part of a multi-byte character) is written
    ``token_id:N`` (vLLM's spelling), so distinct tokens never share a name.
    """
    text = tokenizer.decode([token], skip_special_tokens=False)
    return f"token_id:{token}" if "\ufffd" in text else text


def completion_logprobs(tokenizer: Tokenizer, entries: list[tuple[int, TokenLogprobs]], offset: int = 0) -> dict:
    """The legacy completions ``logprobs`` object: tokens, token_logprobs, top_logprobs, text_offset."""
    tokens = [token_text(tokenizer, t) for t, _ in entries]
    offsets, position = [], offset
    for text in tokens:
        offsets.append(position)
        position += len(text)
    return {"tokens": tokens, "token_logprobs": [lp.logprob for _, lp in entries],
            "top_logprobs": [{token_text(tokenizer, t): v for t, v in lp.top} for _, lp in entries],
            "text_offset": offsets}


def chat_logprobs(tokenizer: Tokenizer, entries: list[tuple[int, TokenLogprobs]]) -> dict:
    """The chat ``logprobs`` object: content = [{token, logprob, bytes, top_logprobs}]."""

    def item(token: int, logprob: float) -> dict:
        text = token_text(tokenizer, token)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

    return {"content": [{**item(t, lp.logprob), "top_logprobs": [item(a, v) for a, v in lp.top]}
                        for t, lp in entries]}


def sse(payload: dict | str) -> str:
    """One server-sent event: ``data: {json}`` and a blank line (``data: [DONE]`` for the end)."""
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n"


def envelope(object_name: str, response_id: str, model: str, choices: list[dict], created: int | None = None) -> dict:
    """The fields every completion object and chunk has: id, object, created, model, choices."""
    return {"id": response_id, "object": object_name, "created": created or int(time.time()), "model": model,
            "choices": choices}
