"""A quick look at what a causal LM has learned: temperature / top-k sampling by full recomputation.

This is deliberately simple (no KV cache): it recomputes the whole window for every token.
"""

from __future__ import annotations

import torch

from formerkit.errors import InputError
from formerkit.model import Transformer


@torch.no_grad()
def sample_ids(model: Transformer, prompt: list[int], *, max_new_tokens: int, temperature: float = 0.8,
               top_k: int | None = 50, generator: torch.Generator | None = None,
               stop_id: int | None = None) -> list[int]:
    """Extend ``prompt`` by up to ``max_new_tokens`` sampled ids; returns only the new ids.

    The context is cut to the last ``max_seq_len`` tokens. temperature 0 means greedy.
    Stops early at ``stop_id``.
    """
    cfg = model.config
    if cfg.kind != "decoder" or model.lm_head is None:
        raise InputError("sampling needs a decoder-only model with a language-model head")
    if not prompt:
        raise InputError("the prompt is empty: give at least one token")
    if temperature < 0:
        raise InputError(f"temperature must be >= 0, got {temperature}")
    device = next(model.parameters()).device
    ids = list(prompt)
    new: list[int] = []
    for _ in range(max_new_tokens):
        window = torch.tensor([ids[-cfg.max_seq_len:]], device=device)  # (1, T)
        logits = model(window).logits[0, -1].float()  # (V,)
        if temperature == 0:
            token = int(logits.argmax())
        else:
            logits = logits / temperature
            if top_k is not None and top_k < logits.numel():
                cutoff = logits.topk(top_k).values[-1]
                logits = logits.masked_fill(logits < cutoff, float("-inf"))
            probs = logits.softmax(-1).cpu()
            token = int(torch.multinomial(probs, 1, generator=generator))
        if token == stop_id:
            break
        ids.append(token)
        new.append(token)
    return new


def sample_text(model: Transformer, tokenizer, prompt: str, *, max_new_tokens: int = 100, temperature: float = 0.8,
                top_k: int | None = 50, seed: int | None = None) -> str:
    """Sample a continuation of ``prompt`` and return prompt + continuation as text."""
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    prompt_ids = tokenizer.encode(prompt, add_special_tokens=False)
    if not prompt_ids:
        eos = tokenizer.eos_id
        if eos is None:
            raise InputError("the prompt is empty and the tokenizer has no end-of-text token to start from")
        prompt_ids = [eos]
    new = sample_ids(model, prompt_ids, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                     generator=generator, stop_id=tokenizer.eos_id)
    return prompt + tokenizer.decode(new)
