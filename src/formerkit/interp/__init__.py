"""Interpretability: run a model with hooks on its hook points and with caches of their activations.

``run_with_cache`` and ``run_with_hooks`` follow TransformerLens; ``ActivationCache`` reads
its short keys (``cache["pattern", 0]``). See docs/interpretability.md.
"""

from formerkit.interp.activations import ActivationCache
from formerkit.interp.attribution import (
    attention_flow,
    attention_relevance,
    attention_rollout,
    gradient_x_input,
    integrated_gradients,
)
from formerkit.interp.lens import decoder_lens
from formerkit.interp.names import get_act_name
from formerkit.interp.patching import (
    ablate_heads,
    ablate_neurons,
    get_act_patch_attn_head_out_all_pos,
    get_act_patch_attn_head_out_by_pos,
    get_act_patch_attn_head_pattern_all_pos,
    get_act_patch_attn_out,
    get_act_patch_block_every,
    get_act_patch_mlp_out,
    get_act_patch_resid_mid,
    get_act_patch_resid_pre,
)
from formerkit.interp.resid import logit_lens, top_tokens
from formerkit.interp.run import Hook, hook_points, hooks, run_with_cache, run_with_hooks

__all__ = ["ActivationCache", "Hook", "ablate_heads", "ablate_neurons", "attention_flow",
           "attention_relevance", "attention_rollout", "decoder_lens", "get_act_name",
           "get_act_patch_attn_head_out_all_pos", "get_act_patch_attn_head_out_by_pos",
           "get_act_patch_attn_head_pattern_all_pos", "get_act_patch_attn_out", "get_act_patch_block_every",
           "get_act_patch_mlp_out", "get_act_patch_resid_mid", "get_act_patch_resid_pre", "gradient_x_input",
           "hook_points", "hooks", "integrated_gradients",
           "logit_lens", "run_with_cache", "run_with_hooks", "top_tokens"]
