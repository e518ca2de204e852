"""Starting a student from its teacher's weights (as DistilBERT does): a subset of its layers, its
embeddings and head, and in each kept layer the feed-forward neurons that matter most.
"""

from __future__ import annotations

import re

import torch

from formerkit.errors import ConfigError
from formerkit.model import Transformer

_BLOCK = re.compile(r"^blocks\.(\d+)\.")


def spaced_layers(teacher_layers: int, student_layers: int) -> list[int]:
    """Evenly spaced teacher layers for a shallower student, the last one included: 4 -> 2 gives [1, 3]."""
    if not 1 <= student_layers <= teacher_layers:
        raise ConfigError(f"a student initialized from its teacher needs 1 to {teacher_layers} layers (the "
                          f"teacher's), got {student_layers}")
    return [round((i + 1) * teacher_layers / student_layers) - 1 for i in range(student_layers)]


def neuron_importance(teacher: Transformer, layer: int) -> torch.Tensor:
    """(d_ff,) score of each feed-forward neuron of a layer: ||its input weights|| * ||its output weights||."""
    mlp = teacher.blocks[layer].mlp
    score = mlp.fc_in.weight.norm(dim=1) * mlp.fc_out.weight.norm(dim=0)  # (d_ff,)
    if mlp.fc_gate is not None:
        score = score * mlp.fc_gate.weight.norm(dim=1)
    return score


@torch.no_grad()
def init_from_teacher(student: Transformer, teacher: Transformer, layers: list[int] | None = None) -> list[int]:
    """Copy the teacher's weights into ``student``: its layers ``layers`` (default: ``spaced_layers``),
    embeddings, final norm and head; a narrower ``d_ff`` keeps each layer's most important neurons
    (``neuron_importance``), in their order. Everything else must have the teacher's shape.

    Returns the teacher layers used. Raises ConfigError naming a tensor whose shape cannot be taken over.
    """
    if student.config.kind == "encoder-decoder":
        raise ConfigError("initializing an encoder-decoder student from its teacher is not supported")
    layers = layers if layers is not None else spaced_layers(teacher.config.n_layers, student.config.n_layers)
    if len(layers) != student.config.n_layers:
        raise ConfigError(f"{len(layers)} teacher layers given for a student of {student.config.n_layers} layers")
    source = teacher.state_dict()
    kept = {}
    for name, target in student.state_dict().items():
        match = _BLOCK.match(name)
        teacher_name = _BLOCK.sub(f"blocks.{layers[int(match[1])]}.", name) if match else name
        value = source.get(teacher_name)
        if value is not None and value.shape != target.shape and match and ".mlp." in name:
            layer = layers[int(match[1])]
            if layer not in kept:
                kept[layer] = neuron_importance(teacher, layer).topk(student.config.d_ff).indices.sort().values
            value = _take_neurons(name, value, kept[layer])
        if value is None or value.shape != target.shape:
            have = "missing" if value is None else f"of shape {tuple(value.shape)}"
            raise ConfigError(f"cannot initialize the student's {name} {tuple(target.shape)} from the teacher's "
                              f"{teacher_name} ({have}); a student started from its teacher may differ in n_layers "
                              "and d_ff only")
        target.copy_(value)
    return layers


def _take_neurons(name: str, value: torch.Tensor, neurons: torch.Tensor) -> torch.Tensor:
    """The rows (fc_in, fc_gate) or columns (fc_out weight) of the kept neurons; fc_out's bias as it is."""
    if ".fc_out." in name:
        return value[:, neurons] if value.dim() == 2 else value
    return value[neurons]
