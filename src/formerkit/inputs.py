"""Checks on what a user passes to a model, raising InputError with a precise message."""

from __future__ import annotations

import torch

from formerkit.config import ModelConfig
from formerkit.errors import InputError

INDEX_DTYPES = (torch.int64, torch.int32)  # what nn.Embedding accepts as indices


def check_ids(name: str, ids: torch.Tensor, cfg: ModelConfig) -> None:
    """Require ``ids`` to be an integer (B, T) tensor with T >= 1 and values in the vocabulary."""
    if not isinstance(ids, torch.Tensor):
        raise InputError(f"{name} must be a torch.Tensor of token ids, got {type(ids).__name__}")
    if ids.dim() != 2:
        raise InputError(
            f"{name} must have shape (batch, seq_len), got {tuple(ids.shape)}; "
            "add a batch dimension with ids.unsqueeze(0)"
        )
    if ids.dtype not in INDEX_DTYPES:
        raise InputError(
            f"{name} must hold integer token ids, got dtype {ids.dtype}; use torch.long (ids.long())"
        )
    if ids.numel() == 0:
        raise InputError(f"{name} is empty (shape {tuple(ids.shape)}); pass at least one sequence of one token")
    if torch.compiler.is_compiling():
        return
    lo, hi = int(ids.min()), int(ids.max())
    if lo < 0 or hi >= cfg.vocab_size:
        bad = lo if lo < 0 else hi
        raise InputError(
            f"{name} contains token id {bad}, outside the vocabulary [0, {cfg.vocab_size}); "
            "check that the tokenizer matches the model"
        )


def check_mask(name: str, mask: torch.Tensor | None, ids: torch.Tensor, past: int = 0) -> None:
    """Require a padding mask of shape (B, past + T) for ids (B, T), holding only 0 and 1.

    ``past`` is the number of tokens already in a KV cache, which the mask also covers.
    """
    if mask is None:
        return
    expected = (ids.shape[0], past + ids.shape[1])
    if not isinstance(mask, torch.Tensor) or tuple(mask.shape) != expected:
        shape = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
        cached = f" ({past} cached + {ids.shape[1]} new tokens)" if past else ""
        raise InputError(
            f"{name} must have the same shape as its ids {expected}{cached}, got {shape}; "
            "pass 1 for real tokens and 0 for padding"
        )
    if not torch.compiler.is_compiling() and mask.numel() and not bool(((mask == 0) | (mask == 1)).all()):
        raise InputError(f"{name} must contain only 0 (padding) and 1 (real token)")


def check_positions(positions: torch.Tensor, cfg: ModelConfig) -> None:
    """Require integer positions; for learned position tables, every one below max_seq_len."""
    if positions.dtype not in INDEX_DTYPES:
        raise InputError(f"position_ids must hold integer positions, got dtype {positions.dtype}")
    if cfg.position != "learned" or torch.compiler.is_compiling():
        return
    top = int(positions.max())
    if top >= cfg.max_seq_len or int(positions.min()) < 0:
        raise InputError(
            f"sequence reaches position {top}, but this model's learned positions stop at "
            f"max_seq_len={cfg.max_seq_len}; truncate the input to {cfg.max_seq_len} tokens"
        )


def check_labels(
    labels: torch.Tensor | None,
    expected: tuple[int, ...],
    what: str,
    *,
    num_classes: int | None = None,
    integer: bool = False,
) -> None:
    """Require ``labels`` to have the shape the head expects.

    integer: require an integer dtype. num_classes: require values in [0, num_classes) or -100.
    """
    if labels is None:
        return
    if not isinstance(labels, torch.Tensor) or tuple(labels.shape) != expected:
        shape = tuple(labels.shape) if isinstance(labels, torch.Tensor) else type(labels).__name__
        raise InputError(f"labels must have shape {expected} for {what}, got {shape}")
    if integer and (labels.dtype.is_floating_point or labels.dtype == torch.bool or labels.is_complex()):
        raise InputError(f"labels must hold integer class ids for {what}, got dtype {labels.dtype}")
    if num_classes is not None and labels.numel() and not torch.compiler.is_compiling():
        valid = (labels == -100) | ((labels >= 0) & (labels < num_classes))
        if not bool(valid.all()):
            bad = labels[~valid][0].item()
            raise InputError(
                f"labels contain {bad}, outside [0, {num_classes}) for {what}; use -100 to ignore a position"
            )


def check_targets(labels: torch.Tensor, causal: bool) -> None:
    """Require a position to predict: a label other than -100 (for a causal LM, after the shift by one).

    Cross-entropy over no targets is NaN; an InputError says why instead.
    """
    if torch.compiler.is_compiling() or bool((labels != -100).any()):
        return
    shift = " after the shift by one of a causal LM (a one-token sequence has no next token)" if causal else ""
    raise InputError(f"labels leave no position to predict: every label is -100{shift}; give at least one real "
                     "target, or call the model without labels")


def check_token_types(token_type_ids: torch.Tensor, ids: torch.Tensor, cfg: ModelConfig) -> None:
    """Require segment ids shaped like ``ids`` with values below type_vocab_size."""
    if cfg.type_vocab_size == 0:
        raise InputError("token_type_ids given, but this model has no token type embeddings (type_vocab_size=0)")
    if not isinstance(token_type_ids, torch.Tensor) or tuple(token_type_ids.shape) != tuple(ids.shape):
        shape = tuple(token_type_ids.shape) if isinstance(token_type_ids, torch.Tensor) else type(token_type_ids)
        raise InputError(f"token_type_ids must have shape {tuple(ids.shape)}, got {shape}")
    if token_type_ids.dtype not in INDEX_DTYPES:
        raise InputError(f"token_type_ids must hold integer segment ids, got dtype {token_type_ids.dtype}")
    if not torch.compiler.is_compiling() and (
        int(token_type_ids.min()) < 0 or int(token_type_ids.max()) >= cfg.type_vocab_size
    ):
        raise InputError(f"token_type_ids must be in [0, {cfg.type_vocab_size})")


def check_pixel_values(pixel_values: torch.Tensor, cfg: ModelConfig) -> None:
    """Require a floating (B, C, H, W) image batch with the channels and size the image model was built for."""
    expected = f"(batch, {cfg.num_channels}, {cfg.image_size}, {cfg.image_size})"
    if not isinstance(pixel_values, torch.Tensor):
        raise InputError(f"pixel_values must be a torch.Tensor of shape {expected}, got {type(pixel_values).__name__}")
    if pixel_values.dim() != 4:
        hint = "; add a batch dimension with pixel_values.unsqueeze(0)" if pixel_values.dim() == 3 else ""
        raise InputError(f"pixel_values must have shape {expected}, got {tuple(pixel_values.shape)}{hint}")
    if not pixel_values.dtype.is_floating_point:
        raise InputError(f"pixel_values must be floating point, got dtype {pixel_values.dtype}; "
                         "scale integer pixels, e.g. pixel_values.float() / 255")
    B, C, H, W = pixel_values.shape
    if B == 0:
        raise InputError(f"pixel_values is empty (shape {tuple(pixel_values.shape)}); pass at least one image")
    if C != cfg.num_channels:
        layout = "; is it channels-last? use pixel_values.permute(0, 3, 1, 2)" if W == cfg.num_channels else ""
        raise InputError(f"pixel_values has {C} channels, but the model expects num_channels={cfg.num_channels} "
                         f"(shape {expected}, got {tuple(pixel_values.shape)}){layout}")
    if (H, W) != (cfg.image_size, cfg.image_size):
        raise InputError(f"pixel_values images are {H}x{W}, but the model expects {cfg.image_size}x{cfg.image_size} "
                         f"(shape {expected}, got {tuple(pixel_values.shape)}); resize the images")
