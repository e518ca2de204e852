"""Early-exit greedy decoding (Elbayad et al., "Depth-Adaptive Transformer"; Schuster et al., CALM).

A decoder trained with exit heads (``ModelConfig.exit_layers``; the exits and the LM head are trained
jointly) can predict a token before its last layer. At each step the stream passes the layers in
order; after each exit layer the exit's most likely next token is read, and when its probability
reaches ``threshold`` (in every row of the batch) the step stops there. The layers it skipped still
take the keys and values of the exit's stream into their KV cache (``Block.fill_cache``), so later
tokens attend to a cache entry at every layer. The prompt is always run through every layer.

``threshold`` above 1 never exits (plain greedy decoding); 0 always takes the first exit.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from formerkit.errors import InputError
from formerkit.generate.config import GenerationConfig, with_options
from formerkit.generate.plan import make_plan
from formerkit.generate.processors import process
from formerkit.generate.steps import inference, start_decoding
from formerkit.model import Transformer


@dataclass
class EarlyExitOutput:
    """What ``early_exit_generate`` returns.

    sequences: (B, T + n), as ``generate`` returns them. layers_used: for each decoding step after the
    first token (which the prompt's pass predicts with every layer), the layers it ran.
    """

    sequences: torch.Tensor
    layers_used: list[int]

    @property
    def mean_layers(self) -> float:
        """Layers run per decoding step, on average (the model's depth when nothing exits early)."""
        return sum(self.layers_used) / max(len(self.layers_used), 1)


def _check(model: Transformer, config: GenerationConfig, threshold: object) -> None:
    """InputError for a model without exits, a bad threshold, or options early exit does not take."""
    if getattr(model, "exits", None) is None:
        raise InputError("early-exit decoding needs a decoder trained with exit heads (ModelConfig.exit_layers); "
                         "this model has none")
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not threshold >= 0:
        raise InputError(f"threshold must be a probability (a number >= 0; above 1 never exits), got {threshold!r}")
    unsupported = config.beyond_plain_greedy()
    if unsupported:
        raise InputError(f"early-exit decoding is greedy; it does not take {', '.join(unsupported)}")


def early_exit_generate(model: Transformer, input_ids: torch.Tensor | Sequence[Sequence[int]],
                        config: GenerationConfig | None = None, *, threshold: float = 0.9,
                        attention_mask: torch.Tensor | None = None, **options) -> EarlyExitOutput:
    """Greedy decoding that leaves each step at the first exit at least ``threshold`` sure of its token.

    Takes what ``generate`` takes for a decoder (prompts as a left-padded (B, T) tensor with its mask,
    or lists of ids) with greedy options only: max_new_tokens, EOS and pad ids.
    Returns an EarlyExitOutput.
    """
    config = with_options(config, options)
    _check(model, config, threshold)
    plan = make_plan(model, input_ids, attention_mask, config)
    B, pad = plan.ids.shape[0], plan.pad
    if plan.max_new_tokens == 0:
        return EarlyExitOutput(plan.ids, [])
    with inference(model):
        cache, logits, positions = start_decoding(model, plan.ids, plan.mask, plan.decoder_start,
                                                  plan.max_new_tokens)
        live = torch.ones(B, dtype=torch.bool, device=plan.ids.device)
        columns: list[torch.Tensor] = []
        layers_used: list[int] = []
        while True:
            token = torch.where(live, process(logits, config).argmax(-1), pad)  # (B,)
            columns.append(token)
            live = live & ~(token[:, None] == plan.eos_ids).any(-1)
            if len(columns) == plan.max_new_tokens or not bool(live.any()):
                break
            step_logits, layers = model.decode_with_exits(token[:, None], positions[:, None], cache, threshold)
            logits = step_logits[:, -1]  # (B, V)
            layers_used.append(layers)
            positions = positions + 1
    return EarlyExitOutput(torch.cat([plan.ids, torch.stack(columns, dim=1)], dim=1), layers_used)
