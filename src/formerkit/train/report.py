"""What a finished causal-LM run reports: samples, how much they read as Python, and ``summary.json``.

``RUN_DIR/samples.txt`` holds the samples, separated by a line of ``---``. ``RUN_DIR/summary.json``
holds ``steps_done``, ``steps_planned``, ``precision``, ``tokens_per_s``, ``val_loss`` (nats per
token), ``val_bpb`` (bits per byte) and, when the corpus is Python, ``sample_python_line_share``
and ``sample_token_kind_tv`` (see ``formerkit.data.python_code``) with the corpus's own figures.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import torch
from torch import nn

from formerkit.data import TextSource, validation_documents
from formerkit.data.python_code import token_kind_mix, tokenizable_line_share, total_variation
from formerkit.fileio import atomic_write, read_json, write_json
from formerkit.generate import GenerationConfig, generate_text

SAMPLES_FILE = "samples.txt"
SUMMARY_FILE = "summary.json"
PYTHON_PROMPTS = ("def ", "class ", "import ", "for ")
REFERENCE_CHARS = 1_000_000  # validation text the corpus's token-kind mix is measured on


def sample_prompts(source: TextSource | None, count: int) -> list[str]:
    """``count`` prompts: the Python openers in turn for a Python corpus, else empty prompts (start of a document)."""
    prompts = PYTHON_PROMPTS if source is not None and source.is_python else ("",)
    return [prompts[i % len(prompts)] for i in range(count)]


def draw_samples(model: nn.Module, tokenizer, prompts: list[str], max_new_tokens: int, seed: int,
                 autocast) -> list[str]:
    """Sample a continuation of every prompt in one batch, ignoring end-of-text; return prompt + continuation each.

    min-p sampling (temperature 1, tokens below a tenth of the most likely one's probability
    left out) with token healing. Each sample has exactly ``max_new_tokens`` new tokens (capped
    so prompt and sample fit the model's context).
    """
    longest = max(len(tokenizer.encode(p, add_special_tokens=False)) for p in prompts)
    new_tokens = max(0, min(max_new_tokens, model.config.max_seq_len - max(longest, 1)))
    model.eval()
    config = GenerationConfig(max_new_tokens=new_tokens, temperature=1.0, min_p=0.1, seed=seed, eos_token_id=())
    with torch.no_grad(), autocast():
        return generate_text(model, tokenizer, prompts, config, heal=True)


def reference_texts(source: TextSource, val_fraction: float, seed: int = 0) -> list[str]:
    """Up to ``REFERENCE_CHARS`` of the source's validation documents, in a seeded random order."""
    names = source.names
    chosen = validation_documents(names, val_fraction)
    order = [i for i in range(len(names)) if chosen[i]]
    random.Random(seed).shuffle(order)
    wanted, texts, total = set(order), {}, 0
    for index, text in enumerate(source.documents()):
        if index in wanted:
            texts[index] = text
    out = []
    for index in order:
        out.append(texts[index])
        total += len(texts[index])
        if total >= REFERENCE_CHARS:
            break
    return out


def python_measures(samples: list[str], reference: list[str]) -> dict[str, float]:
    """How Python-like the samples are, next to the same measures on the reference (corpus) text."""
    corpus_mix = token_kind_mix(reference)
    sample_mix = token_kind_mix(samples)
    return {"sample_python_line_share": tokenizable_line_share(samples),
            "sample_token_kind_tv": total_variation(sample_mix, corpus_mix),
            "corpus_python_line_share": tokenizable_line_share(reference),
            "sample_token_kinds": sample_mix, "corpus_token_kinds": corpus_mix}


def write_samples(run_dir: Path, samples: list[str]) -> Path:
    """Write the samples to ``RUN_DIR/samples.txt`` (atomically), separated by ``---`` lines; return the path."""
    path = Path(run_dir) / SAMPLES_FILE
    text = "\n---\n".join(samples) + "\n"
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))
    return path


def write_summary(run_dir: Path, summary: dict[str, Any]) -> Path:
    """Write ``summary`` to ``RUN_DIR/summary.json`` (atomically); return the path."""
    path = Path(run_dir) / SUMMARY_FILE
    write_json(path, summary, sort_keys=False)
    return path


def report_causal(cfg, model: nn.Module, tokenizer, source: TextSource | None, autocast, result) -> None:
    """A finished causal run's samples (measured as Python for a Python corpus), samples.txt and summary.json.

    ``cfg`` is the run's TrainConfig and ``result`` its TrainResult, whose ``samples`` and
    ``python`` this fills in.
    """
    tokens_per_s = result.tokens_per_s
    earlier = Path(result.run_dir) / SUMMARY_FILE
    if tokens_per_s is None and earlier.is_file():  # a finished run evaluated again: keep the speed it trained at
        tokens_per_s = read_json(earlier).get("tokens_per_s")
    summary = {"steps_done": result.step, "steps_planned": cfg.train.steps, "precision": result.precision,
               "tokens_per_s": tokens_per_s, "val_loss": result.val.get("loss"),
               "val_bpb": result.val.get("bits_per_byte")}
    if cfg.log.samples:
        prompts = sample_prompts(source, cfg.log.samples)
        result.samples = draw_samples(model, tokenizer, prompts, cfg.log.sample_tokens, cfg.train.seed, autocast)
        write_samples(result.run_dir, result.samples)
        if source is not None and source.is_python:
            result.python = python_measures(result.samples, reference_texts(source, cfg.data.val_fraction))
            summary.update(result.python)
    write_summary(result.run_dir, summary)
