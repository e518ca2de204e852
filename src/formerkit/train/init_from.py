"""Fine-tuning: a run that starts from pretrained weights (``--model.init_from PATH``).

PATH is a Hugging Face directory, a native formerkit directory, or a training run directory (its
latest checkpoint). The run's model is the checkpoint's architecture, with the head its objective
needs and any model options the user set on top (dropout, ``num_labels``, ...). Every weight whose
name and shape the two models share is copied. What the checkpoint does not have, or has in
another size because the run changed it (a classifier on an encoder, a new vocabulary, another
label count), starts from fresh initialization and is reported by name; a weight of any other
part that differs in shape is a CheckpointError listing them all.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from formerkit.checkpoints import from_pretrained, load_config, tied_names
from formerkit.errors import CheckpointError, ConfigError
from formerkit.model import Transformer

# weights a run may add or size anew: heads, and the tables sized by the vocabulary
_REPLACEABLE = ("lm_head.", "classifier.", "pooler.", "tok_embed.")
# model options that describe the run rather than the architecture: the user's value wins
_ARCHITECTURE_KEYS = {"kind", "d_model", "n_layers", "n_decoder_layers", "n_heads", "n_kv_heads", "d_head", "d_ff",
                      "decoder_n_heads", "decoder_n_kv_heads", "decoder_d_ff", "position", "norm", "norm_placement",
                      "activation", "gated", "parallel_block", "patch_size"}


@dataclass
class InitReport:
    """What ``init_weights`` did: the weights copied, those initialised fresh, those of the source left unused."""

    source: Path
    copied: int
    initialised: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)

    def describe(self) -> str:
        """One line for the run's log."""
        line = f"initialised from {self.source}: {self.copied} tensors copied"
        if self.initialised:
            line += f"; new (fresh initialization): {', '.join(self.initialised)}"
        if self.dropped:
            line += f"; not used from the checkpoint: {', '.join(self.dropped)}"
        return line


def init_model_options(path: str | Path, options: dict[str, Any], needs: dict[str, Any]) -> dict[str, Any]:
    """The run's model options: the checkpoint's config, the objective's ``needs`` (kind, head), then ``options``.

    Raises ConfigError when the objective needs another kind of model than the checkpoint holds,
    or when ``options`` change the architecture (the weights would not fit).
    """
    source = load_config(path)
    values = source.to_dict()
    values.pop("label_names")  # the classes of the run's own data name its labels
    if "kind" in needs and source.kind != needs["kind"]:
        raise ConfigError(f"the checkpoint in {path} is a {source.kind} model; this objective trains a "
                          f"{needs['kind']} model: choose another --train.objective or checkpoint")
    changed = sorted(k for k in options if k in _ARCHITECTURE_KEYS and options[k] != values.get(k))
    if changed:
        raise ConfigError(f"model.init_from={path} fixes the architecture; remove "
                          + ", ".join(f"--model.{k} (checkpoint: {values.get(k)!r})" for k in changed))
    values.update(needs)
    values.update(options)
    return values


def init_weights(model: Transformer, path: str | Path) -> InitReport:
    """Copy the weights of the checkpoint at ``path`` into ``model`` where name and shape agree; return a report.

    Raises CheckpointError listing the weights outside the heads and vocabulary tables whose shapes differ.
    """
    source = from_pretrained(path)
    theirs = {k: v for k, v in source.state_dict().items() if k not in tied_names(source)}
    own = model.state_dict()
    tied = tied_names(model)
    mismatched = [f"{k}: checkpoint {tuple(v.shape)}, model {tuple(own[k].shape)}"
                  for k, v in theirs.items() if k in own and v.shape != own[k].shape and not k.startswith(_REPLACEABLE)]
    if mismatched:
        raise CheckpointError(f"the weights in {path} do not fit the run's model — wrong shapes: "
                              f"{'; '.join(mismatched)}")
    copied, initialised = 0, []
    with torch.no_grad():
        for name, tensor in own.items():
            if name in tied:
                continue
            if name in theirs and theirs[name].shape == tensor.shape:
                tensor.copy_(theirs[name])
                copied += 1
            else:
                initialised.append(name)
    dropped = [k for k, v in theirs.items() if k not in own or v.shape != own[k].shape]
    return InitReport(Path(path), copied, initialised, dropped)

