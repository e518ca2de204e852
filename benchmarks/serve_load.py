"""Serving load test: ``formerkit serve`` vs llama.cpp's server and one-at-a-time generation, plus a soak.

The model is generate_throughput.py's random-init Llama shape ("llama": 12 layers, d_model 768,
4 KV heads, 88.1M parameters; "llama-tiny" for a smoke run), saved by transformers with a BPE
tokenizer; formerkit loads the same directory and llama.cpp's own converter turns it into an f32
GGUF file (``llamacpp.py``), so every contender runs the same fp32 weights.

Each server runs in a child process with ``--threads`` threads: ``formerkit serve --max-batch
16`` (continuous batching); llama.cpp's own C++ server ``llama-server -np 16`` (16 parallel slots
of 1,024 tokens, continuous batching; built from the llama-cpp-python source distribution by
``make bench-serve``, found at ``--llama-server`` or ``$FORMERKIT_LLAMA_SERVER``; skipped when
absent); and ``python -m llama_cpp.server`` (llama-cpp-python's OpenAI-compatible server, one
llama.cpp context: it serves ONE request at a time, queueing the rest behind a lock;
``--interrupt_requests False`` so a new request does not cut the stream in progress; ``--n_batch
512``; skipped when llama-cpp-python[server] or the converter is missing, or with ``--no-llamacpp``).
The load comes from this process with httpx's asyncio client: requests arrive as a Poisson process
(``--rate`` per second) with at most ``concurrency`` in flight, each streaming a greedy completion
of exactly ``--new-tokens`` tokens (formerkit: ``ignore_eos``; llama.cpp: ``min_tokens``) after
the same text prompt (16-64 random token ids of the BPE vocabulary, decoded). For every server
and concurrency level it reports requests/s, output tokens/s, the time to first token (p50, p95,
p99) and the inter-token latency (p50, p99), and checks that every response is well-formed and
complete. The same run times the baselines on the same prompts, one request after another:
``fk.generate`` and transformers' ``generate``. Before timing, formerkit's greedy text for the
first prompt is checked against ``fk.generate`` on that prompt alone (and compared with llama.cpp's).

``--soak S`` then runs formerkit serve (16 rows, 16 queue places) for S seconds under 24 callers
sending a mix: streamed and non-streamed completions of 8-64 tokens, clients that hang up after a
few tokens, and bad requests (a wrong type, a prompt over the context). Intended outcomes are
counted (the 400s, and 429s when the queue is full); anything else (a 5xx, a malformed or
incomplete response) is an error. It reports the server's RSS at the start and end and p95
latency per 30-second window, and checks that the server holds no row or queue entry afterwards.

    python benchmarks/serve_load.py [--model llama] [--levels 1,4,16] [--requests 4,12,32]
        [--new-tokens 64] [--rate 50] [--threads N] [--no-llamacpp] [--soak SECONDS]
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
import llamacpp  # noqa: E402
from generate_throughput import VOCAB, save_reference  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
WINDOW = 30.0  # seconds per soak report window
LLAMA_SERVER = ROOT / ".cache/llama-server/src/build/bin/llama-server"  # where make bench-serve builds it


def prompts_for(n: int, tok: fk.Tokenizer, seed: int = 0) -> list[str]:
    """``n`` text prompts: 16-64 random ids of the vocabulary, decoded (reproducible)."""
    rng = random.Random(seed)
    return [tok.decode([rng.randrange(10, VOCAB) for _ in range(rng.randint(16, 64))]) for _ in range(n)]


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0-100) of ``values``, nearest rank (nan when empty)."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered) + 0.5) - 1))]


def request_body(server: str, prompt: str, new_tokens: int, stream: bool = True) -> dict:
    """A greedy completion of exactly ``new_tokens`` tokens, in the fields ``server`` understands."""
    body = {"prompt": prompt, "max_tokens": new_tokens, "temperature": 0, "stream": stream}
    if server == "llama.cpp":
        return {**body, "min_tokens": new_tokens, "repeat_penalty": 1.0}  # its default penalty is 1.1
    if server == "llama-server":
        return {**body, "ignore_eos": True, "repeat_penalty": 1.0}
    return {**body, "ignore_eos": True, **({"stream_options": {"include_usage": True}} if stream else {})}


async def one_request(client: httpx.AsyncClient, body: dict, new_tokens: int, hang_up_after: int | None = None) -> dict:
    """Stream one completion; return its timings, its text and whether it was well-formed and complete.

    With ``hang_up_after`` the client closes the connection after that many token events (a
    cancelled client); the result is then ok when those events were well-formed.
    """
    start = time.perf_counter()
    stamps, usage, ok, finish, text = [], None, True, None, []
    async with client.stream("POST", "/v1/completions", json=body) as r:
        if r.status_code != 200:
            error = json.loads(await r.aread()).get("error", {})
            return {"ok": False, "status": r.status_code, "end": time.perf_counter(),
                    "error_ok": set(error) == {"message", "type", "param", "code"}}
        done = False
        async for line in r.aiter_lines():
            if not line or line.startswith(":"):  # an SSE comment (keep-alive ping)
                continue
            ok &= line.startswith("data: ")
            payload = line[6:]
            if payload == "[DONE]":
                done = True
                continue
            chunk = json.loads(payload)
            if "error" in chunk:
                ok = False
                continue
            usage = chunk.get("usage") or usage  # llama-server sends it with the last choice, formerkit alone
            if chunk["choices"]:
                text.append(chunk["choices"][0]["text"])
                finish = chunk["choices"][0]["finish_reason"] or finish
                if chunk["choices"][0]["finish_reason"] is None:
                    stamps.append(time.perf_counter())
                    if hang_up_after is not None and len(stamps) >= hang_up_after:
                        return {"ok": ok, "end": time.perf_counter(), "cancelled": True}
    tokens = usage["completion_tokens"] if usage else (new_tokens if finish == "length" else 0)
    ok &= done and finish == "length" and tokens == new_tokens
    gaps = [b - a for a, b in zip(stamps, stamps[1:], strict=False)]
    return {"ok": ok, "ttft": stamps[0] - start if stamps else float("nan"), "gaps": gaps, "tokens": tokens,
            "text": "".join(text), "end": time.perf_counter()}


async def load(url: str, server: str, prompts: list[str], concurrency: int, rate: float, new_tokens: int) -> dict:
    """Send ``prompts`` as Poisson arrivals at ``rate``/s with at most ``concurrency`` in flight; summarize."""
    rng = random.Random(1)
    gate = asyncio.Semaphore(concurrency)
    # a fresh connection per request: llama-server closes a streamed response's connection, and a reused one fails
    limits = httpx.Limits(max_connections=64, max_keepalive_connections=0)
    async with httpx.AsyncClient(base_url=url, timeout=1200, limits=limits) as client:

        async def guarded(prompt):
            async with gate:
                return await one_request(client, request_body(server, prompt, new_tokens), new_tokens)

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
    return {"failed": len(results) - len(good), "ttft_p50": percentile(ttfts, 50), "ttft_p95": percentile(ttfts, 95),
            "ttft_p99": percentile(ttfts, 99), "itl_p50": percentile(gaps, 50), "itl_p99": percentile(gaps, 99),
            "req_s": len(good) / elapsed, "tok_s": sum(r["tokens"] for r in good) / elapsed}


def rss_mib(pid: int) -> float:
    """The resident memory of process ``pid`` in MiB (from /proc)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


async def soak(url: str, pid: int, prompts: list[str], seconds: float, clients: int, max_len: int) -> dict:
    """``clients`` callers sending a mix of good, cancelled and bad requests for ``seconds``; count outcomes.

    Outcomes: "ok" (complete, well-formed), "cancelled" (hung up after a few well-formed events),
    "bad_400" (a bad request answered by a well-formed 400), "refused_429" (queue full, a well-formed
    429) and "errors" (anything else). Also RSS per window and p95 latency of completed requests per window.
    """
    counts = {"ok": 0, "cancelled": 0, "bad_400": 0, "refused_429": 0, "errors": 0}
    latencies: list[tuple[float, float]] = []  # (finish time from start, seconds) of completed requests
    rss = [(0.0, rss_mib(pid))]
    start = time.perf_counter()
    deadline = start + seconds
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=httpx.Limits(max_connections=clients)) as client:

        async def caller(i: int) -> None:
            rng = random.Random(i)
            while time.perf_counter() < deadline:
                prompt, n, kind = rng.choice(prompts), rng.randint(8, 64), rng.random()
                began = time.perf_counter()
                if kind < 0.45:
                    result = await one_request(client, request_body("formerkit", prompt, n), n)
                elif kind < 0.75:
                    result = await plain_request(client, request_body("formerkit", prompt, n, stream=False), n)
                elif kind < 0.9:
                    result = await one_request(client, request_body("formerkit", prompt, n), n,
                                               hang_up_after=rng.randint(1, 4))
                else:
                    body = ({"prompt": prompt, "max_tokens": "many"} if rng.random() < 0.5 else
                            {"prompt": prompt, "max_tokens": max_len})
                    result = await plain_request(client, body, 0)
                    if result.get("status") == 400 and result.get("error_ok"):
                        counts["bad_400"] += 1
                        continue
                if result.get("cancelled") and result["ok"]:
                    counts["cancelled"] += 1
                elif result["ok"]:
                    counts["ok"] += 1
                    latencies.append((result["end"] - start, result["end"] - began))
                elif result.get("status") == 429 and result.get("error_ok"):
                    counts["refused_429"] += 1
                    await asyncio.sleep(0.05)
                else:
                    counts["errors"] += 1

        async def sampler() -> None:
            while time.perf_counter() < deadline:
                await asyncio.sleep(min(WINDOW, max(0.0, deadline - time.perf_counter())))
                rss.append((time.perf_counter() - start, rss_mib(pid)))

        await asyncio.gather(sampler(), *(caller(i) for i in range(clients)))
        await asyncio.sleep(1.0)  # the last hung-up rows are freed at the next step
        metrics = (await client.get("/metrics")).text
    windows = []
    for w in range(int(-(-seconds // WINDOW))):
        inside = [d for t, d in latencies if w * WINDOW <= t < (w + 1) * WINDOW]
        windows.append((len(inside), percentile(inside, 95)))
    idle = "formerkit_running_requests 0" in metrics and "formerkit_queue_depth 0" in metrics
    return {**counts, "rss_mib": rss, "p95_by_window": windows, "idle_after": idle}


async def plain_request(client: httpx.AsyncClient, body: dict, new_tokens: int) -> dict:
    """One non-streamed completion: ok when it is a complete, well-formed response of ``new_tokens`` tokens."""
    r = await client.post("/v1/completions", json=body)
    if r.status_code != 200:
        error = r.json().get("error", {})
        return {"ok": False, "status": r.status_code, "error_ok": set(error) == {"message", "type", "param", "code"}}
    out = r.json()
    ok = (out.get("object") == "text_completion" and out["usage"]["completion_tokens"] == new_tokens
          and out["choices"][0]["finish_reason"] == "length")
    return {"ok": ok, "end": time.perf_counter()}


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


def start_process(command: list[str], port: int, threads: int) -> tuple[subprocess.Popen, str]:
    """Start a server ``command`` listening on ``port``; return it and its base URL once /v1/models answers."""
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": str(threads)}
    proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 600
    while True:
        try:
            if httpx.get(f"{url}/v1/models", timeout=5).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"the server did not start: {' '.join(command)}")
        time.sleep(0.5)


def formerkit_server(directory: Path, threads: int, max_batch: int = 16, max_queue: int = 256):
    """``formerkit serve`` on a free port: (process, url)."""
    port = free_port()
    return start_process([sys.executable, "-m", "formerkit.cli", "serve", "--checkpoint", str(directory),
                          "--port", str(port), "--max-batch", str(max_batch), "--max-queue", str(max_queue)],
                         port, threads)


def llamacpp_server(gguf: Path, threads: int):
    """llama-cpp-python's server (``python -m llama_cpp.server``) on ``gguf``, on a free port: (process, url)."""
    port = free_port()
    return start_process([sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--host", "127.0.0.1",
                          "--port", str(port), "--n_threads", str(threads), "--n_threads_batch", str(threads),
                          "--n_ctx", "1024", "--n_batch", "512", "--interrupt_requests", "False",
                          "--verbose", "False"], port, threads)


def llama_server(binary: Path, gguf: Path, threads: int, slots: int = 16):
    """llama.cpp's C++ ``llama-server`` with ``slots`` parallel slots of 1,024 tokens on ``gguf``: (process, url)."""
    port = free_port()
    return start_process([str(binary), "--model", str(gguf), "--host", "127.0.0.1", "--port", str(port),
                          "--threads", str(threads), "--threads-batch", str(threads), "--parallel", str(slots),
                          "--ctx-size", str(1024 * slots), "--batch-size", "512", "--cont-batching",
                          "--no-webui"], port, threads)


def stop(proc: subprocess.Popen) -> None:
    """Ask a server process to stop (SIGTERM) and wait for it."""
    proc.terminate()
    proc.wait(60)


def run_levels(name: str, url: str, server: str, prompts: list[str], args, levels, counts, results) -> None:
    """The load at every concurrency level against one server; print and record each."""
    for level, count in zip(levels, counts, strict=True):
        stats = asyncio.run(load(url, server, prompts[:count], level, args.rate, args.new_tokens))
        results[f"{name}@{level}"] = stats
        print(f"{name}, concurrency {level:2d} ({count} requests): {stats['tok_s']:7.1f} tok/s, "
              f"{stats['req_s']:.2f} req/s, TTFT p50 {stats['ttft_p50'] * 1e3:.0f} ms p95 "
              f"{stats['ttft_p95'] * 1e3:.0f} ms p99 {stats['ttft_p99'] * 1e3:.0f} ms, ITL p50 "
              f"{stats['itl_p50'] * 1e3:.1f} ms p99 {stats['itl_p99'] * 1e3:.1f} ms, failed {stats['failed']}",
              flush=True)


def main(argv: list[str] | None = None) -> dict:
    """Run the load test (and the soak); print and return the measurements."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="llama", choices=["llama", "llama-tiny"])
    parser.add_argument("--levels", default="1,4,16")
    parser.add_argument("--requests", default="4,12,32", help="requests sent at each level")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--rate", type=float, default=50.0, help="Poisson arrival rate (requests/s)")
    parser.add_argument("--baseline-requests", type=int, default=4, help="requests timed for each baseline")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--no-llamacpp", action="store_true", help="skip llama-cpp-python's server")
    parser.add_argument("--llama-server", type=Path,
                        default=Path(os.environ.get("FORMERKIT_LLAMA_SERVER", LLAMA_SERVER)),
                        help="llama.cpp's C++ llama-server binary (make bench-serve builds it; skipped when absent)")
    parser.add_argument("--no-load", action="store_true", help="skip the load levels and baselines (soak only)")
    parser.add_argument("--soak", type=float, default=0.0,
                        help="then soak formerkit serve for this many seconds (16 rows, 16 queue places, 24 callers)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    levels = [int(x) for x in args.levels.split(",")]
    counts = [int(x) for x in args.requests.split(",")]
    print(f"machine: {describe_machine()}", flush=True)
    results: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp) / args.model
        theirs = save_reference(args.model, directory)
        ours = fk.from_pretrained(directory).eval()
        tok = fk.load_tokenizer(directory)
        prompts = prompts_for(max(counts), tok)
        if not args.no_load:
            load_and_baselines(args, directory, ours, theirs, tok, prompts, levels, counts, results)
        if args.soak:
            proc, url = formerkit_server(directory, args.threads, max_queue=16)
            try:
                results["soak"] = asyncio.run(soak(url, proc.pid, prompts, args.soak, 24, ours.config.max_seq_len))
            finally:
                stop(proc)
            report_soak(args.soak, results["soak"])
    return results


def load_and_baselines(args, directory: Path, ours, theirs, tok, prompts: list[str], levels, counts,
                       results: dict) -> None:
    """The load levels against formerkit serve (and llama.cpp's server), then the sequential baselines."""
    n = args.new_tokens
    proc, url = formerkit_server(directory, args.threads)
    try:
        first = asyncio.run(first_text(url, "formerkit", prompts[0], n))
        ids = tok.encode(prompts[0])
        alone = fk.generate(ours, [ids], max_new_tokens=n, eos_token_id=[])[0, len(ids):]
        results["greedy_equal"] = first == tok.decode(alone.tolist())
        print(f"formerkit serve greedy text == fk.generate alone: {results['greedy_equal']}", flush=True)
        run_levels("formerkit serve", url, "formerkit", prompts, args, levels, counts, results)
    finally:
        stop(proc)
    converter_missing = llamacpp.available()
    gguf = None if converter_missing else llamacpp.convert(directory, directory / "model-f32.gguf", "fp32")
    why = converter_missing or (None if args.llama_server.is_file() else f"no binary at {args.llama_server}; "
                                "make bench-serve builds it")
    reference_levels("llama-server -np 16", "llama-server", why,
                     lambda: llama_server(args.llama_server, gguf, args.threads), first, prompts, args, levels, counts,
                     results)
    why = "--no-llamacpp" if args.no_llamacpp else converter_missing or server_missing()
    reference_levels("llama-cpp-python server", "llama.cpp", why, lambda: llamacpp_server(gguf, args.threads),
                     first, prompts, args, levels, counts, results)
    base = [tok.encode(p) for p in prompts[:args.baseline_requests]]
    with torch.no_grad():
        results["fk_sequential"] = sequential(
            lambda p: fk.generate(ours, [p], max_new_tokens=n, eos_token_id=[]).shape[1] - len(p), base)
        results["hf_sequential"] = sequential(
            lambda p: theirs.generate(torch.tensor([p]), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                      pad_token_id=0).shape[1] - len(p), base)
    print(f"sequential fk.generate: {results['fk_sequential']:.1f} tok/s; sequential transformers generate: "
          f"{results['hf_sequential']:.1f} tok/s")
    top = max(levels)
    ours_top = results[f"formerkit serve@{top}"]["tok_s"]
    line = (f"formerkit serve at concurrency {top}: {ours_top / results['hf_sequential']:.2f}x sequential "
            f"transformers, {ours_top / results['fk_sequential']:.2f}x sequential fk.generate")
    for name in ("llama-server -np 16", "llama-cpp-python server"):
        if f"{name}@{top}" in results:
            line += f", {ours_top / results[f'{name}@{top}']['tok_s']:.2f}x {name}"
    print(line)


def reference_levels(name: str, server: str, why: str | None, start, first: str, prompts: list[str], args,
                     levels: list[int], counts: list[int], results: dict) -> None:
    """The load levels against one llama.cpp server (``start()`` -> (process, url)), or why it is skipped."""
    if why:
        print(f"{name} skipped: {why}")
        return
    proc, url = start()
    try:
        theirs_text = asyncio.run(first_text(url, server, prompts[0], args.new_tokens))
        print(f"{name} greedy text == formerkit's: {theirs_text == first}", flush=True)
        run_levels(name, url, server, prompts, args, levels, counts, results)
    finally:
        stop(proc)


def server_missing() -> str | None:
    """Why llama-cpp-python's server cannot run here (its extras missing), or None."""
    try:
        import llama_cpp.server.app  # noqa: F401
    except ImportError as err:
        return f"{err}; pip install 'llama-cpp-python[server]=={llamacpp.VERSION}'"
    return None


async def first_text(url: str, server: str, prompt: str, new_tokens: int) -> str:
    """The streamed greedy text of one request for ``prompt`` (also warms the server up)."""
    async with httpx.AsyncClient(base_url=url, timeout=600) as client:
        result = await one_request(client, request_body(server, prompt, new_tokens), new_tokens)
    if not result["ok"]:
        raise RuntimeError(f"{server}: the first request failed: {result}")
    return result["text"]


def report_soak(seconds: float, result: dict) -> None:
    """Print the soak's outcome counts, memory and latency per window."""
    counts = {k: result[k] for k in ("ok", "cancelled", "bad_400", "refused_429", "errors")}
    print(f"soak, {seconds:.0f} s (16 rows, 16 queue places, 24 callers): {counts}; rows and queue empty "
          f"afterwards: {result['idle_after']}")
    print("  RSS MiB over time: " + ", ".join(f"{t:.0f}s {m:.0f}" for t, m in result["rss_mib"]))
    print("  p95 latency of completed requests per 30 s window: "
          + ", ".join(f"{p:.1f}s (n={c})" if c else "none (n=0)" for c, p in result["p95_by_window"]))


if __name__ == "__main__":
    main()
