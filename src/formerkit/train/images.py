"""Image classification for ``formerkit train``: the run's image splits, the model options they imply, the objective.

The source (``data.source``: ``digits``, an ``.npz`` or a folder of class folders) is split once into a
held-out test set (``data.test_fraction`` of every class, with a fixed seed) and the rest; the rest is
split again into train and validation (``data.val_fraction``, seeded by ``train.seed``). Validation is
evaluated during training; the test set once, at the end (accuracy and a confusion matrix).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from formerkit.data.images import TEST_SEED, ImageData, check_image_shape, check_labels_in_range, load_images
from formerkit.errors import ConfigError, DataError
from formerkit.train.config import TrainConfig
from formerkit.train.objectives import Batch, step_generator
from formerkit.train.vision_report import confusion_matrix, write_report

EVAL_CHUNK = 256


@dataclass(frozen=True)
class ImageSplits:
    """The three parts of a run's images."""

    train: ImageData
    val: ImageData
    test: ImageData


def image_splits(cfg: TrainConfig) -> ImageSplits:
    """Load ``cfg.data.source`` and split it into train / validation / test (each non-empty)."""
    data = load_images(cfg.data.source)
    chosen = cfg.model.get("num_labels")  # a class count the user set must hold every label
    if chosen is not None:
        check_labels_in_range(data.labels, chosen, f"{data.description} with model.num_labels={chosen}")
        names = data.label_names[:chosen] + [str(i) for i in range(len(data.label_names), chosen)]
        data = ImageData(data.images, data.labels, names, data.description)
    if len(data) < 3:
        raise DataError(f"{data.description}: {len(data)} image(s) cannot be split into train, validation and test; "
                        "give at least 3 (many more to learn anything)")
    rest, test = data.split(cfg.data.test_fraction, TEST_SEED)
    train, val = rest.split(cfg.data.val_fraction, cfg.train.seed)
    return ImageSplits(train, val, test)


def image_model_options(cfg: TrainConfig, data: ImageData) -> TrainConfig:
    """``cfg`` with model.image_size and model.num_channels taken from the images unless the user set them.

    Raises ConfigError when the model is not an image model (no patch_size) and DataError when the
    images do not fit the model's image size or channel count.
    """
    model = dict(cfg.model)
    if model.get("patch_size") is None and not _preset_has_patches(model.get("preset")):
        raise ConfigError("train.objective=image-classify needs an image model: --model.preset vit-digits, or set "
                          "--model.patch_size (see examples/digits.yaml)")
    _, channels, height, width = data.images.shape
    if height != width:
        raise DataError(f"{data.description}: images are {height}x{width}; image models read square images")
    model.setdefault("image_size", height)
    model.setdefault("num_channels", channels)
    check_image_shape(data, model["num_channels"], model["image_size"])
    return TrainConfig.from_dict({**cfg.to_dict(), "model": model})


def _preset_has_patches(name: str | None) -> bool:
    from formerkit.presets import PRESETS

    return name in PRESETS and PRESETS[name].get("patch_size") is not None


def random_shift(images: torch.Tensor, max_shift: int, generator: torch.Generator) -> torch.Tensor:
    """Translate each image (N, C, H, W) by up to ``max_shift`` pixels in x and y, filling with zeros."""
    n, _, h, w = images.shape
    padded = F.pad(images, (max_shift,) * 4)  # (N, C, H + 2s, W + 2s)
    offsets = torch.randint(0, 2 * max_shift + 1, (n, 2), generator=generator)  # (N, 2): top, left
    return torch.stack([padded[i, :, top:top + h, left:left + w] for i, (top, left) in enumerate(offsets.tolist())])


@dataclass
class ImageClassification:
    """Classify images; reports validation loss and accuracy, and the test confusion matrix at the end."""

    splits: ImageSplits
    batch_size: int
    rank: int
    world_size: int
    seed: int
    tokens_per_image: int
    max_shift: int = 0

    def train_batch(self, step: int) -> Batch:
        """This process's rows of a random global batch of training images for step ``step``."""
        generator = step_generator(self.seed, step, 11)
        rows = torch.randint(0, len(self.splits.train), (self.batch_size,), generator=generator)
        images = self.splits.train.images[rows]  # (B, C, H, W)
        if self.max_shift:
            images = random_shift(images, self.max_shift, generator)
        local = self.batch_size // self.world_size
        part = slice(self.rank * local, (self.rank + 1) * local)
        return {"pixels": images[part], "labels": self.splits.train.labels[rows][part]}

    def loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        """Cross-entropy of the class logits."""
        return model(pixel_values=batch["pixels"], labels=batch["labels"]).loss

    def tokens(self, batch: Batch) -> int:
        """Patch tokens the batch reads (images x tokens per image)."""
        return batch["pixels"].shape[0] * self.tokens_per_image

    @torch.no_grad()
    def _predict(self, model: nn.Module, data: ImageData, device: torch.device, autocast) -> tuple[float, torch.Tensor]:
        """Mean loss and predicted classes (N,) over ``data``."""
        total, predictions = 0.0, []
        for start in range(0, len(data), EVAL_CHUNK):
            pixels = data.images[start:start + EVAL_CHUNK].to(device)
            labels = data.labels[start:start + EVAL_CHUNK].to(device)
            with autocast():
                out = model(pixel_values=pixels, labels=labels)
            total += out.loss.item() * len(labels)
            predictions.append(out.logits.argmax(-1).cpu())
        return total / max(len(data), 1), torch.cat(predictions)

    def evaluate(self, model: nn.Module, device: torch.device, autocast) -> dict[str, float]:
        """Loss and accuracy over the whole validation split."""
        loss, predictions = self._predict(model, self.splits.val, device, autocast)
        accuracy = (predictions == self.splits.val.labels).float().mean().item()
        return {"loss": loss, "accuracy": accuracy}

    def finish(self, model: nn.Module, run_dir: Path, step: int, device: torch.device, autocast) -> dict[str, Any]:
        """Evaluate the held-out test split once: write the confusion-matrix PNG and test_metrics.json."""
        test = self.splits.test
        loss, predictions = self._predict(model, test, device, autocast)
        matrix = confusion_matrix(predictions, test.labels, len(test.label_names))
        return write_report(run_dir, step, matrix, test.label_names, loss if math.isfinite(loss) else float("nan"))
