"""Interpretability: run a model with hooks on its hook points and with caches of their activations.

``run_with_cache`` and ``run_with_hooks`` follow TransformerLens; ``ActivationCache`` reads
its short keys (``cache["pattern", 0]``). See docs/interpretability.md.
"""

from formerkit.interp.activations import ActivationCache
from formerkit.interp.names import get_act_name
from formerkit.interp.resid import logit_lens, top_tokens
from formerkit.interp.run import Hook, hook_points, hooks, run_with_cache, run_with_hooks

__all__ = ["ActivationCache", "Hook", "get_act_name", "hook_points", "hooks", "logit_lens", "run_with_cache",
           "run_with_hooks", "top_tokens"]
