"""The OpenAI-compatible HTTP app (FastAPI): completions, chat, embeddings, models, health, metrics.

``create_app`` wires an ``Engine`` (decoder models) or an embedding model (encoder models)
into the routes. Requests await their engine rows on the event loop; the engine runs in its
own thread, started and stopped with the app. Errors are OpenAI error objects
``{"error": {"message", "type", "param", "code"}}``: 400 for a bad request (the message names
the field), 401 without the API key, 413 for an oversized body, 429 when the queue is full,
500 when the model fails on a request, 504 when a request runs past its timeout.
"""

from __future__ import annotations

import asyncio
import base64
import threading
import time
from collections.abc import AsyncIterator

import torch
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool

from formerkit.embed import embed
from formerkit.errors import InputError
from formerkit.serve.chat import ChatTemplate
from formerkit.serve.engine import ContextLengthError, Engine, QueueFullError
from formerkit.serve.limits import BodyLimit
from formerkit.serve.responses import Batch, chat_logprobs, completion_logprobs, envelope, new_id, sse, usage
from formerkit.serve.schemas import ChatCompletionRequest, CompletionRequest, EmbeddingRequest, SamplingFields
from formerkit.tokenizers import Tokenizer

DEFAULT_MAX_TOKENS = 16  # as the OpenAI completions API
DISCONNECT_POLL = 1.0  # seconds between checks that a non-streaming client is still connected


class APIError(Exception):
    """An error answered as an OpenAI error object with ``status``."""

    def __init__(self, status: int, message: str, type_: str, param: str | None = None,
                 code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code

    def response(self) -> JSONResponse:
        """This error as a JSON response."""
        body = {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status)


def create_app(engine: Engine | None, tokenizer: Tokenizer, *, model_name: str,
               chat_template: ChatTemplate | None = None, embedder: torch.nn.Module | None = None,
               api_key: str | None = None, request_timeout: float | None = 600.0,
               max_body_bytes: int = 1 << 20) -> FastAPI:
    """The FastAPI app serving ``engine`` (generation) and/or ``embedder`` (embeddings) as ``model_name``.

    api_key: required as ``Authorization: Bearer KEY`` on /v1 routes when set. request_timeout:
    seconds a generation request may take (queue included). max_body_bytes: larger bodies get 413.
    """

    async def lifespan(_app: FastAPI):
        if engine is not None:
            engine.start()
        yield
        if engine is not None:
            engine.stop()

    app = FastAPI(title="formerkit serve", lifespan=lifespan)
    app.add_middleware(BodyLimit, max_bytes=max_body_bytes)
    app.state.engine = engine
    embed_lock = threading.Lock()
    created = int(time.time())

    @app.exception_handler(APIError)
    async def _api_error(_request: Request, err: APIError) -> JSONResponse:
        return err.response()

    @app.exception_handler(InputError)
    async def _bad_input(_request: Request, err: InputError) -> JSONResponse:
        return APIError(400, str(err), "invalid_request_error").response()

    @app.exception_handler(Exception)
    async def _unexpected(_request: Request, err: Exception) -> JSONResponse:
        return APIError(500, f"internal error: {type(err).__name__}: {err}", "server_error").response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(_request: Request, err: RequestValidationError) -> JSONResponse:
        first = err.errors()[0]
        loc = [str(p) for p in first.get("loc", ()) if p != "body"]
        field = ".".join(loc) or None
        message = f"{field}: {first.get('msg')}" if field else str(first.get("msg"))
        return APIError(400, message, "invalid_request_error", field).response()

    def authorize(request: Request) -> None:
        if api_key is not None and request.headers.get("authorization") != f"Bearer {api_key}":
            raise APIError(401, "missing or wrong API key: send 'Authorization: Bearer <key>'",
                           "authentication_error", code="invalid_api_key")

    def generator() -> Engine:
        if engine is None:
            raise APIError(400, f"{model_name} is an encoder model: it embeds (POST /v1/embeddings) and does not "
                           "generate", "invalid_request_error", "model")
        return engine

    def submit_all(batch: Batch, prompts: list[list[int]], body: SamplingFields, logprobs: int | None) -> None:
        """Queue n choices per prompt; on any refusal cancel the ones queued and raise the API error."""
        max_tokens = body.max_tokens or DEFAULT_MAX_TOKENS
        try:
            for prompt in prompts:
                for j in range(body.n):
                    seed = body.seed + j if body.seed is not None else None
                    batch.submit(prompt, body.sampling(max_tokens, logprobs, seed))
        except QueueFullError as err:
            batch.cancel()
            raise APIError(429, str(err), "rate_limit_error", code="queue_full") from err
        except ContextLengthError as err:
            batch.cancel()
            raise APIError(400, str(err), "invalid_request_error", "messages" if isinstance(
                body, ChatCompletionRequest) else "prompt", "context_length_exceeded") from err
        except InputError as err:
            batch.cancel()
            raise APIError(400, str(err), "invalid_request_error") from err

    async def finish(batch: Batch, request: Request) -> None:
        """Wait until every choice has finished; cancel them if the client leaves; raise for failed ones."""
        try:
            while batch.pending:
                try:
                    await asyncio.wait_for(batch.next_event(), timeout=DISCONNECT_POLL)
                except TimeoutError:
                    if await request.is_disconnected():
                        batch.cancel()
                        return
        except asyncio.CancelledError:
            batch.cancel()
            raise
        for choice in batch.choices:
            check_outcome(choice.request)

    def check_outcome(request) -> None:
        if request.finish_reason == "error":
            raise APIError(500, f"the model failed on this request: {request.error}", "server_error")
        if request.finish_reason == "timeout":
            raise APIError(504, f"the request took longer than the server's timeout ({request_timeout} s)",
                           "timeout_error", code="timeout")

    def encode_prompts(prompt: str | list) -> tuple[list[list[int]], list[str]]:
        """Token ids and texts of a completions ``prompt``: text, texts, ids or lists of ids."""
        if isinstance(prompt, str):
            prompt = [prompt]
        if prompt and all(isinstance(p, int) for p in prompt):
            prompt = [prompt]
        if not prompt:
            raise APIError(400, "prompt is empty", "invalid_request_error", "prompt")
        ids = [tokenizer.encode(p) if isinstance(p, str) else list(p) for p in prompt]
        return ids, [p if isinstance(p, str) else tokenizer.decode(p) for p in prompt]

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics() -> PlainTextResponse:
        text = engine.metrics.render() if engine is not None else ""
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4")

    @app.get("/v1/models", dependencies=[Depends(authorize)])
    async def models() -> dict:
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created,
                                            "owned_by": "formerkit"}]}

    @app.post("/v1/completions", dependencies=[Depends(authorize)])
    async def completions(body: CompletionRequest, request: Request):
        gen = generator()
        if body.echo and body.logprobs is not None:
            raise APIError(400, "echo with logprobs (log-probabilities of the prompt) is not supported; drop one",
                           "invalid_request_error", "echo")
        prompts, texts = encode_prompts(body.prompt)
        batch = Batch(gen, request_timeout)
        submit_all(batch, prompts, body, body.logprobs)
        response_id, n = new_id("cmpl"), body.n
        if body.stream:
            return stream_response(batch, completion_chunks(batch, body, prompts, texts, response_id))
        await finish(batch, request)
        choices = []
        for choice in batch.choices:
            prefix = texts[choice.index // n] if body.echo else ""
            logprobs = (completion_logprobs(tokenizer, choice.logprobs, len(prefix))
                        if body.logprobs is not None else None)
            choices.append({"index": choice.index, "text": prefix + choice.request.text, "logprobs": logprobs,
                            "finish_reason": choice.request.finish_reason})
        return {**envelope("text_completion", response_id, model_name, choices),
                "usage": usage(prompts, batch.choices)}

    async def completion_chunks(batch: Batch, body: CompletionRequest, prompts: list[list[int]], texts: list[str],
                                response_id: str) -> AsyncIterator[str]:
        now = int(time.time())
        if body.echo:
            for i in range(len(batch.choices)):
                yield sse(envelope("text_completion", response_id, model_name,
                                   [{"index": i, "text": texts[i // body.n], "logprobs": None,
                                     "finish_reason": None}], now))
        async for choice, output in batch.events():
            if output.finish_reason in ("error", "timeout"):
                yield sse(error_payload(choice.request))
                continue
            logprobs = None
            if output.logprobs is not None:
                logprobs = completion_logprobs(tokenizer, [(output.token, output.logprobs)])
            if output.token is None and output.finish_reason is None:
                continue
            yield sse(envelope("text_completion", response_id, model_name,
                               [{"index": choice.index, "text": output.text, "logprobs": logprobs,
                                 "finish_reason": output.finish_reason}], now))
        if body.stream_options is not None and body.stream_options.include_usage:
            yield sse({**envelope("text_completion", response_id, model_name, [], now),
                       "usage": usage(prompts, batch.choices)})
        yield sse("[DONE]")

    def error_payload(request) -> dict:
        try:
            check_outcome(request)
        except APIError as err:
            return {"error": {"message": err.message, "type": err.type, "param": err.param, "code": err.code}}
        return {}

    def stream_response(batch: Batch, chunks: AsyncIterator[str]) -> StreamingResponse:
        """Stream ``chunks`` as server-sent events; a client that disconnects cancels the batch's rows."""

        async def cancelling() -> AsyncIterator[str]:
            try:
                async for chunk in chunks:
                    yield chunk
            finally:
                batch.cancel()

        return StreamingResponse(cancelling(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @app.post("/v1/chat/completions", dependencies=[Depends(authorize)])
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        gen = generator()
        if chat_template is None:
            raise APIError(400, f"{model_name} has no chat template (no chat_template in its tokenizer_config.json "
                           "and no chat_template.jinja); use POST /v1/completions with a prompt",
                           "invalid_request_error", "messages")
        messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        try:
            text = chat_template.render(messages, body.add_generation_prompt)
        except InputError as err:
            raise APIError(400, str(err), "invalid_request_error", "messages") from err
        prompts = [tokenizer.encode(text, add_special_tokens=False)]
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
        batch = Batch(gen, request_timeout)
        submit_all(batch, prompts, body, logprobs)
        response_id = new_id("chatcmpl")
        if body.stream:
            return stream_response(batch, chat_chunks(batch, body, prompts, response_id))
        await finish(batch, request)
        choices = [{"index": c.index, "message": {"role": "assistant", "content": c.request.text},
                    "logprobs": chat_logprobs(tokenizer, c.logprobs) if body.logprobs else None,
                    "finish_reason": c.request.finish_reason} for c in batch.choices]
        return {**envelope("chat.completion", response_id, model_name, choices), "usage": usage(prompts, batch.choices)}

    async def chat_chunks(batch: Batch, body: ChatCompletionRequest, prompts: list[list[int]],
                          response_id: str) -> AsyncIterator[str]:
        now = int(time.time())
        for choice in batch.choices:
            yield sse(envelope("chat.completion.chunk", response_id, model_name,
                               [{"index": choice.index, "delta": {"role": "assistant", "content": ""},
                                 "logprobs": None, "finish_reason": None}], now))
        async for choice, output in batch.events():
            if output.finish_reason in ("error", "timeout"):
                yield sse(error_payload(choice.request))
                continue
            if output.token is not None:
                logprobs = chat_logprobs(tokenizer, [(output.token, output.logprobs)]) if output.logprobs else None
                if not output.text and logprobs is None:
                    continue
                delta, reason = {"content": output.text}, None
            else:
                delta, reason, logprobs = {}, output.finish_reason, None
            yield sse(envelope("chat.completion.chunk", response_id, model_name,
                               [{"index": choice.index, "delta": delta, "logprobs": logprobs,
                                 "finish_reason": reason}], now))
        if body.stream_options is not None and body.stream_options.include_usage:
            yield sse({**envelope("chat.completion.chunk", response_id, model_name, [], now),
                       "usage": usage(prompts, batch.choices)})
        yield sse("[DONE]")

    @app.post("/v1/embeddings", dependencies=[Depends(authorize)])
    async def embeddings(body: EmbeddingRequest) -> dict:
        if embedder is None:
            raise APIError(400, f"{model_name} is a decoder model: embeddings need an encoder checkpoint "
                           "(e.g. a sentence-transformers model)", "invalid_request_error", "model")
        texts = [body.input] if isinstance(body.input, str) else body.input
        if not texts:
            raise APIError(400, "input is empty: give a string or a list of strings", "invalid_request_error",
                           "input")

        def run() -> torch.Tensor:
            with embed_lock:
                return embed(embedder, tokenizer, list(texts))  # (N, d_model), normalized

        vectors = await run_in_threadpool(run)
        tokens = sum(len(tokenizer.encode(t)) for t in texts)
        data = []
        for i, vector in enumerate(vectors):
            value = (base64.b64encode(vector.numpy().astype("<f4").tobytes()).decode() if
                     body.encoding_format == "base64" else vector.tolist())
            data.append({"object": "embedding", "index": i, "embedding": value})
        return {"object": "list", "data": data, "model": model_name,
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}

    return app
