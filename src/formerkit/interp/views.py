"""Self-contained HTML attention views: every layer and head of a pattern, no network, no CDN.

The page carries the patterns as bytes (255 x the probability's square root, rounded) in base64,
with the model view's thumbnails reduced in advance, and draws them on canvases, so it stays
responsive with thousands of tokens where a view drawing one SVG line per token pair stalls.
Three views share one layer/head selection:

- the heat map of one head (or the mean of a layer's heads), query rows by key columns, with the
  tokens and the weight under the pointer;
- the token view: pick a query token and every key token's background shows how much it is read;
- the model view: a thumbnail of every layer and head (block maxima, at most 64 x 64 cells);
  clicking one selects it.

Shades follow the square root of the weight, so weights of long inputs (1/T each) still show.

Tokens reach the page only as JSON data written into the DOM as text (``textContent``), and the
JSON has ``<``, ``>`` and ``&`` escaped, so a token such as ``</script><script>...`` is shown, never run.
"""

from __future__ import annotations

import base64
import html
import json
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

from formerkit.errors import InputError
from formerkit.fileio import atomic_write
from formerkit.interp.activations import ActivationCache

MAX_MB = 64.0  # pattern bytes a page may carry; more would make a browser crawl
THUMB = 64  # side of the model view's thumbnails, in cells


def patterns_from_cache(cache: ActivationCache, *, batch: int = 0, stack: str = "",
                        cross: bool = False) -> torch.Tensor:
    """Stack the cached attention patterns of one batch row: returns (layers, heads, query, key) float32.

    ``stack`` is "encoder" or "decoder" for encoder–decoder models; ``cross`` reads the decoder's
    cross-attention instead of its self-attention.
    """
    prefix = f"{stack}." if stack else ""
    part = "cross_attn" if cross else "attn"
    names = [n for n in cache.keys() if n.startswith(f"{prefix}blocks.") and n.endswith(f".{part}.hook_pattern")]
    names.sort(key=lambda n: int(n[len(prefix):].split(".")[1]))
    if not names:
        raise InputError(f"the cache holds no {prefix}blocks.*.{part}.hook_pattern; run run_with_cache with the "
                         "patterns (names_filter=lambda n: n.endswith('hook_pattern'))")
    rows = cache[names[0]].shape[0]
    if not -rows <= batch < rows:
        raise InputError(f"batch={batch} is outside the cache's {rows} rows")
    return torch.stack([cache[n][batch].float() for n in names])


def _as_layers(patterns: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
    """Patterns as one (layers, heads, query, key) tensor; a single (heads, query, key) layer becomes one layer."""
    if not isinstance(patterns, torch.Tensor):
        shapes = {tuple(p.shape) for p in patterns}
        if len(shapes) != 1:
            raise InputError(f"every layer's pattern needs one shape (heads, query, key); got {sorted(shapes)}")
        patterns = torch.stack(list(patterns))
    if patterns.dim() == 3:
        patterns = patterns.unsqueeze(0)
    if patterns.dim() != 4:
        raise InputError("patterns must be (layers, heads, query, key) or (heads, query, key); "
                         f"got {tuple(patterns.shape)}")
    return patterns.detach().float().cpu()


def attention_html(tokens: Sequence[str], patterns: torch.Tensor | Sequence[torch.Tensor], *,
                   key_tokens: Sequence[str] | None = None, layer_labels: Sequence[str] | None = None,
                   title: str = "Attention", max_mb: float = MAX_MB) -> str:
    """Return one self-contained HTML page viewing ``patterns`` over ``tokens``.

    patterns: (layers, heads, query, key) probabilities, or a list of (heads, query, key), or one
    (heads, query, key). ``tokens`` label the queries, ``key_tokens`` the keys (default: ``tokens``;
    give the source tokens for cross-attention). ``layer_labels`` name the layers (default "0", "1", ...).
    Raises InputError when the token counts do not match the patterns' sides, or when the page would
    carry more than ``max_mb`` MB of patterns (view fewer layers, or a shorter input).
    """
    stacked = _as_layers(patterns)
    L, H, T, S = stacked.shape
    keys = list(tokens) if key_tokens is None else list(key_tokens)
    if len(tokens) != T or len(keys) != S:
        raise InputError(f"the patterns attend from {T} queries to {S} keys, but {len(tokens)} query tokens and "
                         f"{len(keys)} key tokens were given")
    labels = [str(i) for i in range(L)] if layer_labels is None else [str(x) for x in layer_labels]
    if len(labels) != L:
        raise InputError(f"{len(labels)} layer labels for {L} layers")
    size_mb = L * H * T * S / 1e6
    if size_mb > max_mb:
        raise InputError(f"these patterns take {size_mb:.0f} MB in the page (limit {max_mb:g} MB): view fewer layers "
                         "(patterns[i:j]) or a shorter input, or raise max_mb")
    thumbs = F.adaptive_max_pool2d(stacked.view(L * H, 1, T, S), (min(T, THUMB), min(S, THUMB)))  # block maxima
    data = {"tokens": [str(t) for t in tokens], "keys": [str(t) for t in keys], "layers": labels,
            "shape": [L, H, T, S], "weights": _encode(stacked),
            "thumb_shape": list(thumbs.shape[-2:]), "thumbs": _encode(thumbs)}
    payload = json.dumps(data).replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
    return _PAGE.replace("@TITLE@", html.escape(title)).replace("@DATA@", payload)


def _encode(weights: torch.Tensor) -> str:
    """Probabilities as base64 bytes of round(255 * sqrt(p)): small weights keep their resolution (1/65025 at 0)."""
    return base64.b64encode((weights.clamp(0, 1).sqrt() * 255).round().to(torch.uint8).numpy().tobytes()).decode()


def save_html(page: str, path: str | Path) -> Path:
    """Write an HTML page atomically (a reader never sees half a file); returns the path."""
    path = Path(path)
    atomic_write(path, lambda tmp: tmp.write_text(page, encoding="utf-8"))
    return path


_PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>@TITLE@</title>
<style>
body { font: 14px system-ui, sans-serif; margin: 16px; color: #222; }
.controls { display: flex; gap: 16px; align-items: center; flex-wrap: wrap; margin-bottom: 8px; }
#heat { image-rendering: pixelated; border: 1px solid #ccc; cursor: crosshair; }
#tip { min-height: 1.4em; font-family: monospace; white-space: pre; }
#tokens span { font-family: monospace; white-space: pre; padding: 1px 2px; margin: 1px; display: inline-block;
  border: 1px solid #eee; cursor: pointer; }
#tokens span.query { outline: 2px solid #d33; }
#grid { display: grid; gap: 4px; margin-top: 8px; }
#grid canvas { image-rendering: pixelated; border: 1px solid #ddd; cursor: pointer; width: 64px; height: 64px; }
#grid canvas.on { border-color: #d33; }
.label { font-size: 11px; color: #666; text-align: center; }
</style></head><body>
<h2>@TITLE@</h2>
<div class="controls">
  <label>layer <select id="layer"></select></label>
  <label>head <select id="head"></select></label>
  <span id="size"></span>
</div>
<h3>Heat map</h3>
<div id="tip"></div>
<canvas id="heat"></canvas>
<h3>Tokens</h3>
<p>Click a query token: each key token's shade is the attention it receives.</p>
<div id="tokens"></div>
<h3>Every layer and head</h3>
<div id="grid"></div>
<script id="attention-data" type="application/json">@DATA@</script>
<script>
"use strict";
const data = JSON.parse(document.getElementById("attention-data").textContent);
const [L, H, T, S] = data.shape;
function bytes(text) {
  const raw = atob(text), out = new Uint8Array(raw.length);
  for (let i = 0; i < raw.length; i++) out[i] = raw.charCodeAt(i);
  return out;
}
const weights = bytes(data.weights), thumbWeights = bytes(data.thumbs);
const [TT, TS] = data.thumb_shape;
const layerSel = document.getElementById("layer"), headSel = document.getElementById("head");
data.layers.forEach((name, i) => layerSel.add(new Option("layer " + name, i)));
headSel.add(new Option("mean of heads", -1));
for (let h = 0; h < H; h++) headSel.add(new Option("head " + h, h));
headSel.value = 0;
document.getElementById("size").textContent = T + " queries x " + S + " keys, " + L + " layers x " + H + " heads";
let query = T - 1;

// stored bytes are 255 * sqrt(p): the weight is their square, the shade the byte itself
function weight(l, h, q, k) {
  if (h >= 0) return (weights[((l * H + h) * T + q) * S + k] / 255) ** 2;
  let sum = 0;
  for (let j = 0; j < H; j++) sum += (weights[((l * H + j) * T + q) * S + k] / 255) ** 2;
  return sum / H;
}

function paint(canvas, rows, cols, shade) {
  canvas.width = cols; canvas.height = rows;
  const ctx = canvas.getContext("2d"), img = ctx.createImageData(cols, rows);
  for (let r = 0; r < rows; r++) {
    for (let c = 0; c < cols; c++) {
      const v = Math.round(255 * (1 - shade(r, c))), at = 4 * (r * cols + c);
      img.data[at] = v; img.data[at + 1] = v; img.data[at + 2] = 255; img.data[at + 3] = 255;
    }
  }
  ctx.putImageData(img, 0, 0);
}

const heat = document.getElementById("heat"), tip = document.getElementById("tip");
function drawHeat() {
  const l = +layerSel.value, h = +headSel.value;
  paint(heat, T, S, (q, k) => Math.sqrt(weight(l, h, q, k)));
  const side = Math.max(T, S), scale = side > 640 ? 640 / side : Math.floor(640 / side);
  heat.style.width = S * scale + "px"; heat.style.height = T * scale + "px";
}
heat.addEventListener("mousemove", (e) => {
  const box = heat.getBoundingClientRect();
  const q = Math.min(T - 1, Math.floor((e.clientY - box.top) / box.height * T));
  const k = Math.min(S - 1, Math.floor((e.clientX - box.left) / box.width * S));
  tip.textContent = "query " + q + " " + JSON.stringify(data.tokens[q]) + "  ->  key " + k + " " +
    JSON.stringify(data.keys[k]) + ": " + weight(+layerSel.value, +headSel.value, q, k).toFixed(3);
});

const tokenBox = document.getElementById("tokens");
function drawTokens() {
  tokenBox.replaceChildren();
  const l = +layerSel.value, h = +headSel.value;
  const queries = document.createElement("div"), keys = document.createElement("div");
  data.tokens.forEach((tok, q) => {
    const span = document.createElement("span");
    span.textContent = tok;
    span.title = "query " + q;
    if (q === query) span.className = "query";
    span.addEventListener("click", () => { query = q; drawTokens(); });
    queries.appendChild(span);
  });
  data.keys.forEach((tok, k) => {
    const span = document.createElement("span");
    const w = weight(l, h, query, k);
    span.textContent = tok;
    span.title = "key " + k + ": " + w.toFixed(3);
    span.style.background = "rgba(0, 0, 255, " + Math.sqrt(w).toFixed(3) + ")";
    if (w > 0.25) span.style.color = "#fff";
    keys.appendChild(span);
  });
  const head = (text) => { const p = document.createElement("p"); p.textContent = text; return p; };
  tokenBox.append(head("queries"), queries, head("keys read by query " + query), keys);
}

const grid = document.getElementById("grid");
grid.style.gridTemplateColumns = "repeat(" + (H + 1) + ", max-content)";
const thumbs = [];
for (let l = 0; l < L; l++) {
  const name = document.createElement("div");
  name.className = "label"; name.textContent = "layer " + data.layers[l];
  grid.appendChild(name);
  for (let h = 0; h < H; h++) {
    const c = document.createElement("canvas");
    c.title = "layer " + data.layers[l] + ", head " + h;
    c.addEventListener("click", () => { layerSel.value = l; headSel.value = h; redraw(); });
    grid.appendChild(c);
    thumbs.push([c, l, h]);
  }
}
for (const [c, l, h] of thumbs) {
  const base = (l * H + h) * TT * TS;
  paint(c, TT, TS, (r, k) => thumbWeights[base + r * TS + k] / 255);
}
function drawGrid() {
  for (const [c, l, h] of thumbs) c.classList.toggle("on", l === +layerSel.value && h === +headSel.value);
}
function redraw() { drawHeat(); drawTokens(); drawGrid(); }
layerSel.addEventListener("change", redraw);
headSel.addEventListener("change", redraw);
redraw();
</script></body></html>
"""
