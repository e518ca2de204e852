"""The report behind ``formerkit inspect`` (``interp/command.py``): what a model does with one prompt.

The report holds the model's next-token prediction, the logit lens (each layer's residual stream
read through the final norm and the LM head), the heads that write most towards the prediction
(direct logit attribution), the attention view of every layer and head, and — given a corrupted
prompt of the same length — the residual-stream patching map. Pictures are PNGs inlined as data
URIs and the attention view is an inlined page (``iframe srcdoc``): nothing is fetched.
"""

from __future__ import annotations

import base64
import html
from dataclasses import dataclass

import torch
from torch import nn

from formerkit.errors import InputError
from formerkit.interp.patching import get_act_patch_resid_pre
from formerkit.interp.plots import attention_png, logit_lens_png, patching_png
from formerkit.interp.resid import logit_attrs, logit_lens, stack_head_results
from formerkit.interp.run import run_with_cache
from formerkit.interp.views import attention_html, patterns_from_cache


@dataclass
class Prompt:
    """A tokenized prompt: ids (1, T) and each token's text."""

    ids: torch.Tensor
    tokens: list[str]


def tokenize(model: nn.Module, tokenizer, text: str, what: str = "prompt") -> Prompt:
    """Encode ``text`` with special tokens; InputError if empty or longer than the model's context."""
    ids = tokenizer.encode(text)
    if not ids:
        raise InputError(f"the {what} encodes to no tokens; give some text")
    limit = model.config.max_seq_len
    if len(ids) > limit:
        raise InputError(f"the {what} has {len(ids)} tokens but the model reads at most {limit}; shorten it")
    return Prompt(torch.tensor([ids]), [tokenizer.decode([i], skip_special_tokens=False) for i in ids])


def _img(png: bytes, alt: str) -> str:
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode("ascii")}">'


def _cell(text: str, shade: float) -> str:
    ink = "color:#fff;" if shade > 0.6 else ""
    return f'<td style="{ink}background: rgba(0,128,0,{shade:.2f})">{html.escape(repr(text)[1:-1])}</td>'


def _predictions(logits: torch.Tensor, tokenizer, k: int = 5) -> str:
    probs, ids = logits[0, -1].float().softmax(-1).topk(k)
    rows = "".join(f"<tr><td><code>{html.escape(repr(tokenizer.decode([int(i)], skip_special_tokens=False)))}</code>"
                   f"</td><td>{p:.3f}</td></tr>" for p, i in zip(probs.tolist(), ids, strict=True))
    return f"<h2>Next token</h2><table><tr><th>token</th><th>probability</th></tr>{rows}</table>"


def _lens_section(model: nn.Module, cache, prompt: Prompt, tokenizer) -> str:
    lens, labels = logit_lens(model, cache)  # (layers + 1, 1, T, vocab)
    probs, ids = lens[:, 0].float().softmax(-1).max(-1)  # (layers + 1, T) each
    top = [[tokenizer.decode([int(i)], skip_special_tokens=False) for i in row] for row in ids]
    png = logit_lens_png(probs, top, layer_labels=labels, tokens=prompt.tokens)
    head = "".join(f"<th>{html.escape(repr(t)[1:-1])}</th>" for t in prompt.tokens)
    body = "".join(f"<tr><th>{html.escape(label)}</th>" + "".join(map(_cell, row, prow)) + "</tr>"
                   for label, row, prow in zip(labels, top, probs.tolist(), strict=True))
    return ("<h2>Logit lens</h2><p>Each row reads the residual stream entering a layer (the last row: the output) "
            "through the final norm and the LM head; a cell shows the top token predicted at that position, "
            "shaded by its probability.</p>" + _img(png, "logit lens") +
            f'<div class="scroll"><table class="lens"><tr><th></th>{head}</tr>{body}</table></div>')


def _heads_section(model: nn.Module, cache, logits: torch.Tensor, prompt: Prompt, tokenizer, top_k: int) -> str:
    target = logits[0, -1].argmax()
    stack, labels = stack_head_results(cache, layer=-1, pos_slice=-1, return_labels=True)  # (L*H, 1, d_model)
    attrs = logit_attrs(cache, stack, target.view(1), pos_slice=-1)[:, 0]  # (L*H,)
    order = attrs.abs().argsort(descending=True)[:top_k]
    answer = html.escape(repr(tokenizer.decode([int(target)], skip_special_tokens=False)))
    rows, pictures = "", ""
    for i in order.tolist():
        layer, head = (int(x) for x in labels[i][1:].split("H"))
        rows += f"<tr><td>{html.escape(labels[i])}</td><td>{attrs[i].item():+.3f}</td></tr>"
        pattern = cache["pattern", layer][0, head]  # (T, T)
        pictures += _img(attention_png(pattern, prompt.tokens, title=f"layer {layer}, head {head}"), labels[i])
    return (f"<h2>Heads writing towards {answer}</h2><p>Direct logit attribution at the last position: each "
            "head's output, through the final norm's scale, projected on the predicted token's unembedding.</p>"
            f"<table><tr><th>head</th><th>attribution</th></tr>{rows}</table>{pictures}")


def _patching_section(model: nn.Module, cache, logits: torch.Tensor, clean: Prompt, corrupted: Prompt,
                      tokenizer) -> str:
    if corrupted.ids.shape != clean.ids.shape:
        raise InputError(f"the corrupted prompt has {corrupted.ids.shape[1]} tokens and the prompt "
                         f"{clean.ids.shape[1]}: patching needs prompts of the same length")
    with torch.no_grad():
        corrupted_logits = model(corrupted.ids).logits
    good, bad = int(logits[0, -1].argmax()), int(corrupted_logits[0, -1].argmax())
    if good == bad:
        def metric(out: torch.Tensor) -> torch.Tensor:
            return out[0, -1, good]
        what = "the logit of the clean prediction (both prompts predict it)"
    else:
        clean_diff = logits[0, -1, good] - logits[0, -1, bad]
        corrupt_diff = corrupted_logits[0, -1, good] - corrupted_logits[0, -1, bad]

        def metric(out: torch.Tensor) -> torch.Tensor:
            return (out[0, -1, good] - out[0, -1, bad] - corrupt_diff) / (clean_diff - corrupt_diff)
        what = "the logit difference between the two predictions, 0 = corrupted, 1 = clean"
    result = get_act_patch_resid_pre(model, corrupted.ids, cache, metric)  # (layers, T)
    png = patching_png(result, row_labels=[str(i) for i in range(result.shape[0])], col_labels=clean.tokens,
                       title="clean resid_pre patched into the corrupted run")
    names = ", ".join(html.escape(repr(tokenizer.decode([i], skip_special_tokens=False))) for i in (good, bad))
    return (f"<h2>Activation patching</h2><p>Predictions (clean, corrupted): {names}. Each cell patches the clean "
            f"residual stream entering one layer at one position into the corrupted run; the value is {what}.</p>"
            + _img(png, "activation patching"))


def inspect_report(model: nn.Module, tokenizer, prompt: str, *, corrupted: str | None = None,
                   top_heads: int = 5, title: str = "formerkit inspect") -> str:
    """Return the HTML report of ``model`` on ``prompt`` (see the module docstring).

    Needs a single-stack model (decoder or encoder); the lens, head and patching sections need its
    LM head and are left out, with a note, for a model without one.
    """
    if getattr(model, "blocks", None) is None:
        raise InputError("formerkit inspect reads single-stack models (decoder-only or encoder); for an "
                         "encoder-decoder, use formerkit.interp's functions on each stack")
    model.eval()
    clean = tokenize(model, tokenizer, prompt)
    logits, cache = run_with_cache(model, clean.ids)
    parts = [f"<h1>{html.escape(title)}</h1><p>Prompt ({len(clean.tokens)} tokens): "
             f"<code>{html.escape(prompt)}</code></p>"]
    if getattr(model, "lm_head", None) is not None:
        parts += [_predictions(logits, tokenizer), _lens_section(model, cache, clean, tokenizer),
                  _heads_section(model, cache, logits, clean, tokenizer, top_heads)]
        if corrupted is not None:
            other = tokenize(model, tokenizer, corrupted, "corrupted prompt")
            parts.append(_patching_section(model, cache, logits, clean, other, tokenizer))
    else:
        parts.append("<p>This model has no LM head: the logit lens, head attribution and patching sections "
                     "need one and are left out.</p>")
    view = attention_html(clean.tokens, patterns_from_cache(cache), title="Attention, every layer and head")
    parts.append(f'<h2>Attention</h2><iframe title="attention view" srcdoc="{html.escape(view)}"></iframe>')
    style = ("body{font:14px system-ui,sans-serif;margin:16px;color:#222}table{border-collapse:collapse}"
             "td,th{border:1px solid #ddd;padding:2px 6px;font-family:monospace;white-space:pre}"
             ".scroll{overflow-x:auto}img{max-width:100%;display:block;margin:8px 0}"
             "iframe{width:100%;height:1400px;border:1px solid #ccc}")
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f"<style>{style}</style></head><body>{''.join(parts)}</body></html>")
