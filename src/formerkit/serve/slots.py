"""Rows of one static ``KVCache`` used as independent slots: insert a prefilled row, shift the window.

The engine keeps every running request in its own batch row of one ``KVCache``. The cache
has one write cursor for all rows, so every row's tokens END at the cursor: a row holding n
tokens occupies slots [cursor - n, cursor), and its earlier slots are masked as padding
(``key_mask`` False). This is exactly the layout of a left-padded batch, which
``Transformer.decode`` already runs; these helpers only move data between rows and slots:

- ``insert_row`` copies one prompt of a prefilled left-padded batch (or a prompt prefilled
  alone) into one row, ending at the cursor, and masks the rest of that row;
- ``shift_window`` moves every row's last ``keep`` slots to [0, keep) (or further right), so
  the cursor can be moved back when it reaches the end of the buffer, or forward when a new
  prompt is longer than the cursor.
"""

from __future__ import annotations

from formerkit.cache import KVCache


def insert_row(cache: KVCache, row: int, prefilled: KVCache, src: int = 0, n: int | None = None) -> None:
    """Copy the last ``n`` written slots of row ``src`` of ``prefilled`` to ``row`` of ``cache``, [cursor - n, cursor).

    ``prefilled`` is a cache filled by one prefill pass over a left-padded batch, so row ``src``'s
    ``n`` real tokens are its last ``n`` written slots (n defaults to all of them: a one-row cache
    of one prompt). The row's other slots are masked (``key_mask`` False), so nothing left there by
    an earlier request is attended to. Needs cache.length >= n (see ``shift_window``).
    """
    n = prefilled.length if n is None else n
    first, last = prefilled.length - n, prefilled.length
    end = cache.length
    start = end - n
    for dst, source in zip(cache.layers, prefilled.layers, strict=True):
        dst.k[row, :, start:end] = source.k[src, :, first:last]  # (KV, n, D)
        dst.v[row, :, start:end] = source.v[src, :, first:last]
    cache.key_mask[row] = False
    cache.key_mask[row, start:end] = prefilled.key_mask[src, first:last]
    cache.positions[row, start:end] = prefilled.positions[src, first:last]
    cache.padded = True


def shift_window(cache: KVCache, keep: int) -> None:
    """Move the slots [cursor - keep, cursor) of every row to [0, keep) and set the cursor to ``keep``.

    With keep > cursor the data moves right instead and the ``keep - cursor`` slots opened at
    the start are masked. Every row ends at the cursor, so one shift serves all rows: a row
    holding at most ``keep`` tokens keeps all of them, in order.
    """
    end = cache.length
    if keep == end:
        return
    if not 0 <= keep <= cache.max_len:
        raise ValueError(f"cannot keep {keep} slots in a cache of {cache.max_len}")
    src = slice(max(end - keep, 0), end)
    dst = slice(max(keep - end, 0), keep)
    buffers = [t for layer in cache.layers for t in (layer.k, layer.v)]
    for t in buffers:
        t[:, :, dst] = t[:, :, src].clone()  # (B, KV, kept, D)
    for t in (cache.positions, cache.key_mask):
        t[:, dst] = t[:, src].clone()  # (B, kept)
    if keep > end:
        cache.key_mask[:, :keep - end] = False
    cache.truncate(min(end, keep))
    cache.advance(keep - cache.length)


def leading_rows(cache: KVCache, rows: int) -> KVCache:
    """A cache over the first ``rows`` rows of ``cache``: its buffers are views, its write cursor the same tensor.

    Decoding through it writes into ``cache`` itself, so the engine can run a step over only the
    rows in use. Its host-side ``length`` is a copy: set it from ``cache`` before a pass and back after.
    """
    view = KVCache(len(cache.layers), rows, 1, 1, 1, cross=False, dtype=cache.layers[0].k.dtype,
                   device=cache.cursor.device, window_step=cache.window_step)
    view.max_len = cache.max_len
    for mine, theirs in zip(view.layers, cache.layers, strict=True):
        mine.k, mine.v = theirs.k[:rows], theirs.v[:rows]  # (rows, KV, L, D) views
    view.positions, view.key_mask = cache.positions[:rows], cache.key_mask[:rows]  # (rows, L) views
    view.cursor, view._offsets = cache.cursor, cache._offsets
    view.padded = True
    return view
