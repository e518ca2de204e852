"""KV-cache eviction policies: which cached tokens generation keeps when its cache has a token budget.

``CachePolicy`` is the ``cache_policy`` option of ``GenerationConfig`` (``generate(...,
cache_policy="h2o:64")``, ``formerkit generate --cache-policy h2o:64``). With a budget of B
tokens every query attends to at most B keys, itself included: after each forward pass the
cache is brought back to B - 1 tokens, so its buffers hold max(prompt, B) slots however many
tokens are generated. The policies, as strings ``KIND[:BUDGET[:EXTRA]]``:

- ``full``: keep everything (the default; no budget).
- ``sliding:B``: the B - 1 most recent tokens.
- ``sinks:B[:S]``: StreamingLLM (Xiao et al.): the first S tokens (attention sinks, default 4)
  and the most recent ones. Positions are re-indexed within the cache for RoPE, ALiBi and T5's
  relative bias: a query sits at the cache's length, a kept key at its index in the cache.
- ``h2o:B[:R]``: H2O (Zhang et al.): the R most recent tokens, the current one included
  (default B // 2), and the rest of the budget to the heavy hitters, the tokens with the largest
  attention received so far (summed over the layer's heads and over every query), per layer.
- ``tova:B``: TOVA (Oren et al.): drop the token with the lowest attention weight from the
  current query, averaged over the layer's heads, per layer.

H2O and TOVA keep a different set of tokens in each layer (and batch row), so they read each
layer's attention through its ``hook_pattern`` hook point (which runs that layer's eager path).
"""

from __future__ import annotations

from dataclasses import dataclass

from formerkit.config import ModelConfig
from formerkit.errors import InputError, did_you_mean

KINDS = ("full", "sliding", "sinks", "h2o", "tova")
PER_LAYER = ("h2o", "tova")  # the policies that read each layer's attention and keep per-layer token sets
REINDEXED_POSITIONS = ("rope", "alibi", "relative")  # position kinds whose keys the sinks policy re-indexes


@dataclass(frozen=True)
class CachePolicy:
    """An eviction policy and its token budget (see the module docstring).

    kind: one of ``KINDS``. budget: the most keys a query attends to, itself included (None only
    for ``full``). sinks: the ``sinks`` policy's attention sinks. recent: the ``h2o`` policy's
    recent window, the current token included (None: budget // 2, at least 1).
    """

    kind: str = "full"
    budget: int | None = None
    sinks: int = 4
    recent: int | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise InputError(f"cache_policy {self.kind!r} is not a policy{did_you_mean(str(self.kind), KINDS)}; "
                             f"choose one of {', '.join(KINDS)}")
        if self.kind == "full":
            if self.budget is not None:
                raise InputError(f"cache_policy 'full' keeps every token and takes no budget (got {self.budget}); "
                                 "choose sliding, sinks, h2o or tova to bound the cache")
            return
        _count("budget", self.budget, 1, f"the most keys a query attends to under {self.kind!r}")
        if self.kind == "sinks":
            _count("sinks", self.sinks, 0, "the attention sinks kept at the start")
            if self.budget <= self.sinks:
                raise InputError(f"cache_policy sinks: the budget ({self.budget}) must exceed the sink count "
                                 f"({self.sinks}) so that the current token fits beside the sinks; raise the "
                                 f"budget to at least {self.sinks + 1} or lower the sinks")
        if self.kind == "h2o":
            if self.recent is None:
                object.__setattr__(self, "recent", max(1, self.budget // 2))
            _count("recent", self.recent, 1, "h2o's recent window, the current token included")
            if self.recent > self.budget:
                raise InputError(f"cache_policy h2o: the recent window ({self.recent}) cannot exceed the budget "
                                 f"({self.budget}); lower it (the rest of the budget goes to heavy hitters)")

    @property
    def evicts(self) -> bool:
        """Whether the policy bounds the cache (every kind but ``full``)."""
        return self.kind != "full"

    @property
    def per_layer(self) -> bool:
        """Whether each layer keeps its own tokens, chosen from its attention (H2O, TOVA)."""
        return self.kind in PER_LAYER

    def __str__(self) -> str:
        if self.kind == "full":
            return "full"
        extra = {"sinks": f":{self.sinks}", "h2o": f":{self.recent}"}.get(self.kind, "")
        return f"{self.kind}:{self.budget}{extra}"


def _count(name: str, value: object, minimum: int, what: str) -> None:
    """Require an int >= minimum; InputError naming the field and what it is."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise InputError(f"cache_policy {name} ({what}) must be an integer >= {minimum}, got {value!r}")


def parse_cache_policy(spec: CachePolicy | str | None) -> CachePolicy:
    """The CachePolicy of ``spec``: a CachePolicy, None (full), or a string ``KIND[:BUDGET[:EXTRA]]``.

    EXTRA is the sink count for ``sinks`` and the recent window for ``h2o``. Raises InputError
    for anything else, naming the part that is wrong.
    """
    if spec is None:
        return CachePolicy()
    if isinstance(spec, CachePolicy):
        return spec
    if not isinstance(spec, str):
        raise InputError(f"cache_policy must be a string such as 'h2o:64' or a CachePolicy, got {spec!r}")
    kind, *numbers = spec.strip().split(":")
    extra_name = {"sinks": "sinks", "h2o": "recent"}.get(kind)
    if len(numbers) > (2 if extra_name else 1):
        form = f"{kind}:BUDGET" + (f"[:{extra_name.upper()}]" if extra_name else "")
        raise InputError(f"cache_policy {spec!r}: write it as {form}")
    values = []
    for number in numbers:
        try:
            values.append(int(number))
        except ValueError:
            raise InputError(f"cache_policy {spec!r}: {number!r} is not an integer (KIND:BUDGET, e.g. "
                             "'sinks:64:4')") from None
    if kind in KINDS and kind != "full" and not values:
        raise InputError(f"cache_policy {spec!r} needs a budget: {kind}:BUDGET, e.g. '{kind}:64'")
    options = {"budget": values[0]} if values else {}
    if len(values) == 2:
        options[extra_name] = values[1]
    return CachePolicy(kind, **options)


def check_policy(policy: CachePolicy, cfg: ModelConfig) -> None:
    """Refuse a policy the model cannot run: InputError saying what to choose instead.

    Per-layer policies (h2o, tova) need per-layer key positions, which ALiBi and T5's relative
    bias (one bias per stack) do not have. A model with its own ``sliding_window`` masks keys by
    their slot in the cache, which only full and sliding eviction keep in step with positions.
    """
    if not policy.evicts:
        return
    if cfg.attn_type == "linear":
        raise InputError(f"cache_policy {policy} evicts keys and values, but a linear-attention model keeps a "
                         "fixed-size running state instead (already O(1) memory); use cache_policy='full'")
    if cfg.kind == "encoder-decoder":
        raise InputError(f"cache_policy {policy} is for decoder-only models; an encoder-decoder's decoder keeps "
                         "its whole cache: use cache_policy='full'")
    if policy.per_layer and cfg.position in ("alibi", "relative"):
        raise InputError(f"cache_policy {policy.kind} keeps different tokens in each layer, but {cfg.position} "
                         "positions bias every layer from one set of key positions; use 'sliding' or 'sinks' with "
                         "this model")
    if cfg.sliding_window is not None and policy.kind != "sliding":
        raise InputError(f"this model attends within sliding_window={cfg.sliding_window}, a mask by cache slot "
                         f"that cache_policy {policy.kind} would shift; use cache_policy "
                         f"'sliding:{cfg.sliding_window}' (or 'full')")
