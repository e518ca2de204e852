"""Serving load test: ``formerkit serve`` (continuous batching) under Poisson arrivals vs one-at-a-time generation.

The model is generate_throughput.py's random-init Llama shape ("llama": 12 layers, d_model 768,
4 KV heads, 88.1M parameters; "llama-tiny" for a smoke run), saved by transformers with a BPE
tokenizer; formerkit loads the same directory, so every contender runs the same fp32 weights.

The server runs in a child process (``formerkit serve --max-batch 16``); the load comes from
this process with httpx's asyncio client: requests arrive as a Poisson process (``--rate``
per second) and at most ``concurrency`` are in flight at once, each streaming a completion
of exactly ``--new-tokens`` tokens (``ignore_eos``) after a prompt of 16-64 random token ids.
For every concurrency level it reports the time to first token (p50, p99), the inter-token
latency (p50, p99), requests/s and output tokens/s, and checks that every response is
well-formed and complete. The same run times the baselines on the same prompts, one request
after another: ``fk.generate`` and transformers' ``generate``. Before timing, the server's
greedy text for the first prompt is checked against ``fk.generate`` on that prompt alone.
``--soak S`` adds S seconds of 48 callers against 16 rows and 16 queue places: every refusal
must be a well-formed 429 and every accepted stream complete (malformed responses are counted).

    python benchmarks/serve_load.py [--model llama] [--levels 1,4,16] [--requests 4,12,32]
        [--new-tokens 64] [--rate 50] [--threads N] [--soak SECONDS]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import httpx  # noqa: E402

import formerkit as fk  # noqa: E402
from formerkit.hardware import describe_machine  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from generate_throughput import VOCAB, save_reference  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def prompts_for(n: int, seed: int = 0) -> list[list[int]]:
    """``n`` prompts of 16-64 random token ids (reproducible)."""
    rng = random.Random(seed)
    return [[rng.randrange(10, VOCAB) for _ in range(rng.randint(16, 64))] for _ in range(n)]


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0-100) of ``values``, nearest rank."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered) + 0.5) - 1))]


async def one_request(client: httpx.AsyncClient, prompt: list[int], new_tokens: int) -> dict:
    """Stream one completion; return its timings and whether it was well-formed and complete."""
    body = {"prompt": prompt, "max_tokens": new_tokens, "temperature": 0, "stream": True, "ignore_eos": True,
            "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    stamps, usage, ok = [], None, True
    async with client.stream("POST", "/v1/completions", json=body) as r:
        if r.status_code != 200:
            error = json.loads(await r.aread()).get("error", {})
            return {"ok": False, "status": r.status_code,
                    "error_ok": set(error) == {"message", "type", "param", "code"}}
        done = False
        async for line in r.aiter_lines():
            if not line:
                continue
            ok &= line.startswith("data: ")
            payload = line[6:]
            if payload == "[DONE]":
                done = True
                continue
            chunk = json.loads(payload)
            if "error" in chunk:
                ok = False
            elif chunk.get("usage"):
                usage = chunk["usage"]
            elif chunk["choices"] and chunk["choices"][0]["finish_reason"] is None:
                stamps.append(time.perf_counter())
    ok &= done and usage is not None and usage["completion_tokens"] == new_tokens
    gaps = [b - a for a, b in zip(stamps, stamps[1:], strict=False)]
    return {"ok": ok, "ttft": stamps[0] - start if stamps else float("nan"), "gaps": gaps,
            "tokens": usage["completion_tokens"] if usage else 0, "end": time.perf_counter()}


async def load(url: str, prompts: list[list[int]], concurrency: int, rate: float, new_tokens: int) -> dict:
    """Send ``prompts`` as Poisson arrivals at ``rate``/s with at most ``concurrency`` in flight; summarize."""
    rng = random.Random(1)
    gate = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=httpx.Limits(max_connections=64)) as client:

        async def guarded(prompt):
            async with gate:
                return await one_request(client, prompt, new_tokens)

        start = time.perf_counter()
        tasks = []
        for prompt in prompts:
            tasks.append(asyncio.create_task(guarded(prompt)))
            await asyncio.sleep(rng.expovariate(rate))
        results = await asyncio.gather(*tasks)
    elapsed = max(r.get("end", start) for r in results) - start
    good = [r for r in results if r["ok"]]
    gaps = [g for r in good for g in r["gaps"]]
    ttfts = [r["ttft"] for r in good]
    return {"failed": len(results) - len(good), "ttft_p50": percentile(ttfts, 50), "ttft_p99": percentile(ttfts, 99),
            "itl_p50": percentile(gaps, 50), "itl_p99": percentile(gaps, 99), "req_s": len(good) / elapsed,
            "tok_s": sum(r["tokens"] for r in good) / elapsed}


async def soak(url: str, prompts: list[list[int]], seconds: float, clients: int, new_tokens: int) -> dict:
    """``clients`` callers streaming completions back to back for ``seconds``; count outcomes.

    With more callers than batch rows + queue places, some are refused: a refusal must be a
    well-formed 429 OpenAI error, and every accepted request a complete, well-formed stream.
    """
    counts = {"ok": 0, "refused": 0, "malformed": 0}
    deadline = time.perf_counter() + seconds
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=httpx.Limits(max_connections=clients)) as client:

        async def caller(i: int) -> None:
            while time.perf_counter() < deadline:
                result = await one_request(client, prompts[i % len(prompts)], new_tokens)
                if result["ok"]:
                    counts["ok"] += 1
                elif result.get("status") == 429 and result.get("error_ok"):
                    counts["refused"] += 1
                    await asyncio.sleep(0.05)
                else:
                    counts["malformed"] += 1
                i += clients

        await asyncio.gather(*(caller(i) for i in range(clients)))
    return counts


def sequential(generate_one, prompts: list[list[int]]) -> float:
    """Output tokens/s of generating ``prompts`` one after another with ``generate_one(prompt) -> new tokens``.

    One untimed call first warms the library up (kernel choices, allocator).
    """
    generate_one(prompts[0])
    start = time.perf_counter()
    tokens = sum(generate_one(p) for p in prompts)
    return tokens / (time.perf_counter() - start)


def free_port() -> int:
    """A free TCP port on the loopback interface."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(directory: Path, max_batch: int, threads: int, max_queue: int = 256) -> tuple[subprocess.Popen, str]:
    """Start ``formerkit serve`` on a free port in a child process; return it and its base URL once it answers."""
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": str(threads)}
    proc = subprocess.Popen([sys.executable, "-m", "formerkit.cli", "serve", "--checkpoint", str(directory),
                             "--port", str(port), "--max-batch", str(max_batch), "--max-queue", str(max_queue)],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while True:
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError("the server did not start")
        time.sleep(0.5)


def main(argv: list[str] | None = None) -> dict:
    """Run the load test; print and return the measurements."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="llama", choices=["llama", "llama-tiny"])
    parser.add_argument("--levels", default="1,4,16")
    parser.add_argument("--requests", default="4,12,32", help="requests sent at each level")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--rate", type=float, default=50.0, help="Poisson arrival rate (requests/s)")
    parser.add_argument("--baseline-requests", type=int, default=4, help="requests timed for each baseline")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--soak", type=float, default=0.0,
                        help="also run a soak of this many seconds at the queue limit (max-batch 16, max-queue 16, "
                             "48 callers)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    levels = [int(x) for x in args.levels.split(",")]
    counts = [int(x) for x in args.requests.split(",")]
    print(f"machine: {describe_machine()}")
    results: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp) / args.model
        theirs = save_reference(args.model, directory)
        ours = fk.from_pretrained(directory).eval()
        tok = fk.load_tokenizer(directory)
        n = args.new_tokens
        prompts = prompts_for(max(counts))
        proc, url = start_server(directory, max(levels), args.threads)
        try:
            first = httpx.post(f"{url}/v1/completions", timeout=600, json={
                "prompt": prompts[0], "max_tokens": n, "temperature": 0, "ignore_eos": True}).json()
            alone = fk.generate(ours, [prompts[0]], max_new_tokens=n, eos_token_id=[])[0, len(prompts[0]):]
            results["greedy_equal"] = first["choices"][0]["text"] == tok.decode(alone.tolist())
            print(f"server greedy text == fk.generate alone: {results['greedy_equal']}")
            for level, count in zip(levels, counts, strict=True):
                stats = asyncio.run(load(f"{url}", prompts[:count], level, args.rate, n))
                results[f"serve@{level}"] = stats
                print(f"serve, concurrency {level:2d} ({count} requests): {stats['tok_s']:7.1f} tok/s, "
                      f"{stats['req_s']:.2f} req/s, TTFT p50 {stats['ttft_p50'] * 1e3:.0f} ms p99 "
                      f"{stats['ttft_p99'] * 1e3:.0f} ms, ITL p50 {stats['itl_p50'] * 1e3:.1f} ms p99 "
                      f"{stats['itl_p99'] * 1e3:.1f} ms, failed {stats['failed']}")
        finally:
            proc.terminate()
            proc.wait(30)
        if args.soak:
            proc, url = start_server(directory, 16, args.threads, max_queue=16)
            try:
                results["soak"] = asyncio.run(soak(url, prompts, args.soak, 48, n))
            finally:
                proc.terminate()
                proc.wait(30)
            print(f"soak, {args.soak:.0f} s at the queue limit (16 rows, 16 queued, 48 callers): {results['soak']}")
        base = prompts[:args.baseline_requests]
        with torch.no_grad():
            results["fk_sequential"] = sequential(
                lambda p: fk.generate(ours, [p], max_new_tokens=n, eos_token_id=[]).shape[1] - len(p), base)
            results["hf_sequential"] = sequential(
                lambda p: theirs.generate(torch.tensor([p]), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                          pad_token_id=0).shape[1] - len(p), base)
    print(f"sequential fk.generate: {results['fk_sequential']:.1f} tok/s; sequential transformers generate: "
          f"{results['hf_sequential']:.1f} tok/s")
    top = results[f"serve@{max(levels)}"]["tok_s"]
    print(f"serve at concurrency {max(levels)} / sequential transformers: {top / results['hf_sequential']:.2f}x; "
          f"/ sequential fk.generate: {top / results['fk_sequential']:.2f}x")
    return results


if __name__ == "__main__":
    main()
