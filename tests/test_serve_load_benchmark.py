"""benchmarks/serve_load.py: the stream parser reads formerkit's and llama-server's SSE framings; a tiny run works."""

from __future__ import annotations

import asyncio
import json

import pytest

from conftest import load_script, require

require("transformers")
httpx = require("httpx")


@pytest.fixture(scope="module")
def bench():
    return load_script("benchmarks/serve_load.py")


def _sse(chunks: list[dict]) -> bytes:
    return "".join(f"data: {json.dumps(c)}\n\n" for c in chunks).encode() + b"data: [DONE]\n\n"


def _choice(text: str, finish: str | None) -> dict:
    return {"choices": [{"text": text, "index": 0, "finish_reason": finish}]}


FORMERKIT = [_choice("a", None), _choice("b", None), _choice("", "length"),
             {"choices": [], "usage": {"completion_tokens": 2}}]  # usage in a chunk of its own
LLAMA_SERVER = [_choice("a", None), _choice("b", None),
                {**_choice("", "length"), "usage": {"completion_tokens": 2}}]  # usage with the last choice


@pytest.mark.parametrize("chunks", [FORMERKIT, LLAMA_SERVER], ids=["formerkit", "llama-server"])
def test_one_request_reads_both_framings(bench, chunks):
    transport = httpx.MockTransport(lambda request: httpx.Response(200, content=_sse(chunks)))

    async def go():
        async with httpx.AsyncClient(base_url="http://test", transport=transport) as client:
            return await bench.one_request(client, {"prompt": "x"}, 2)

    result = asyncio.run(go())
    assert result["ok"] and result["tokens"] == 2 and result["text"] == "ab" and len(result["gaps"]) == 1


def test_an_incomplete_stream_is_not_ok(bench):
    chunks = [_choice("a", None), {**_choice("", "length"), "usage": {"completion_tokens": 1}}]
    transport = httpx.MockTransport(lambda request: httpx.Response(200, content=_sse(chunks)))

    async def go():
        async with httpx.AsyncClient(base_url="http://test", transport=transport) as client:
            return await bench.one_request(client, {"prompt": "x"}, 2)

    assert not asyncio.run(go())["ok"]  # 1 token where 2 were asked


def test_request_bodies_ask_each_server_for_exactly_n_greedy_tokens(bench):
    assert bench.request_body("formerkit", "p", 5)["ignore_eos"] is True
    assert bench.request_body("llama-server", "p", 5) == {"prompt": "p", "max_tokens": 5, "temperature": 0,
                                                          "stream": True, "ignore_eos": True, "repeat_penalty": 1.0}
    assert bench.request_body("llama.cpp", "p", 5)["min_tokens"] == 5


def test_tiny_load_run_without_llamacpp(bench, tmp_path, capsys):
    out = bench.main(["--model", "llama-tiny", "--levels", "2", "--requests", "3", "--baseline-requests", "1",
                      "--new-tokens", "4", "--no-llamacpp", "--llama-server", str(tmp_path / "absent")])
    assert out["greedy_equal"] is True
    assert out["formerkit serve@2"]["failed"] == 0 and out["formerkit serve@2"]["tok_s"] > 0
    assert out["fk_sequential"] > 0 and out["hf_sequential"] > 0
    assert "llama-server -np 16 skipped" in capsys.readouterr().out
