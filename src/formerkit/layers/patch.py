"""Image input for Vision Transformers: non-overlapping patches, linearly embedded, and a CLS token.

A Conv2d whose kernel and stride both equal the patch size is a linear map applied to each
flattened patch: cutting the image into patches and multiplying by one matrix gives the same
numbers (tested).
"""

from __future__ import annotations

import torch
from torch import nn


class PatchEmbed(nn.Module):
    """Cut (B, C, H, W) images into patch_size x patch_size patches and embed each as a d_model vector.

    With ``cls_token`` a learned vector is prepended to every sequence (ViT's class token).
    Patches are ordered row by row, as the reference implementation orders them.
    """

    def __init__(self, num_channels: int, d_model: int, patch_size: int, *, cls_token: bool, init_std: float) -> None:
        super().__init__()
        self.proj = nn.Conv2d(num_channels, d_model, kernel_size=patch_size, stride=patch_size)
        nn.init.normal_(self.proj.weight, std=init_std)
        nn.init.zeros_(self.proj.bias)
        self.cls_token = nn.Parameter(torch.randn(1, 1, d_model) * init_std) if cls_token else None

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Map pixel_values (B, C, H, W) to embeddings (B, [1 +] num_patches, d_model)."""
        x = self.proj(pixel_values.to(self.proj.weight.dtype))  # (B, d_model, H/p, W/p)
        x = x.flatten(2).transpose(1, 2)  # (B, N, d_model), patches row by row
        if self.cls_token is None:
            return x
        cls = self.cls_token.to(x.dtype).expand(x.shape[0], -1, -1)  # (B, 1, d_model)
        return torch.cat((cls, x), dim=1)  # (B, 1 + N, d_model)
