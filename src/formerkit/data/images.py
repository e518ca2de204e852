"""Labeled images for image classification: sklearn's 8x8 digits, an ``.npz`` file, or class folders of images.

Every source becomes ``ImageData``: float32 pixels (N, C, H, W) and integer labels (N,). Problems
raise ``DataError`` naming the file (and the sample index or image file) and what to do.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from formerkit.errors import ConfigError, DataError

DIGITS = "digits"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif")
TEST_SEED = 1234  # the held-out test split does not move with train.seed


@dataclass(frozen=True)
class ImageData:
    """Images (N, C, H, W) float32 with labels (N,) int64; ``label_names[i]`` names label ``i``."""

    images: torch.Tensor
    labels: torch.Tensor
    label_names: list[str]
    description: str

    def __len__(self) -> int:
        """Number of images."""
        return int(self.labels.shape[0])

    def split(self, fraction: float, seed: int) -> tuple[ImageData, ImageData]:
        """Stratified random split into (rest, held out): about ``fraction`` of every class is held out.

        Deterministic in ``seed``; with two or more images both parts are non-empty.
        """
        if not isinstance(fraction, (int, float)) or not 0 < fraction < 1:
            raise ConfigError(f"a split fraction must be a number strictly between 0 and 1, got {fraction!r}")
        generator = torch.Generator().manual_seed(seed)
        held = []
        for label in range(len(self.label_names)):
            members = torch.nonzero(self.labels == label).flatten()  # (n_label,)
            members = members[torch.randperm(len(members), generator=generator)]
            held.extend(members[: round(len(members) * fraction)].tolist())
        if len(self) >= 2:
            order = torch.randperm(len(self), generator=generator).tolist()
            if not held:
                held = order[:1]
            elif len(held) == len(self):
                held = held[:-1]
        keep = sorted(set(range(len(self))) - set(held))
        return self._take(keep), self._take(sorted(held))

    def _take(self, index: list[int]) -> ImageData:
        rows = torch.tensor(index, dtype=torch.long)
        return ImageData(self.images[rows], self.labels[rows], self.label_names, self.description)


def load_digits() -> ImageData:
    """sklearn's 1,797 handwritten digits: 8x8 grayscale images (pixels 0..16 scaled to [0, 1]), labels 0-9."""
    try:
        from sklearn.datasets import load_digits as sklearn_digits
    except ImportError as err:
        raise DataError("data.source=digits needs scikit-learn, which ships the 8x8 digits images: "
                        "pip install scikit-learn (or pip install 'formerkit[vision]')") from err
    bunch = sklearn_digits()
    images = torch.tensor(bunch.images, dtype=torch.float32)[:, None] / 16.0  # (1797, 1, 8, 8)
    labels = torch.tensor(bunch.target, dtype=torch.long)
    return ImageData(images, labels, [str(i) for i in range(10)], "sklearn digits (1,797 8x8 grayscale images)")


def load_npz(path: str | Path) -> ImageData:
    """Read an ``.npz`` with ``images`` (N, H, W) or (N, C, H, W) and integer ``labels`` (N,).

    Optional ``label_names`` (K,) names the classes; labels must then be below K. Integer
    pixels are divided by 255; floating pixels are kept as they are.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"image file {path} does not exist; give an .npz with 'images' and 'labels' arrays")
    try:
        with np.load(path, allow_pickle=False) as archive:
            arrays = {key: archive[key] for key in archive.files}
    except (OSError, ValueError) as err:
        raise DataError(f"{path} is not a readable .npz file (numpy.savez without object arrays): {err}") from err
    for key in ("images", "labels"):
        if key not in arrays:
            raise DataError(f"{path} has no '{key}' array (arrays here: {', '.join(sorted(arrays)) or 'none'}); "
                            "save with numpy.savez(path, images=..., labels=...)")
    images, labels = arrays["images"], arrays["labels"]
    if images.ndim == 3:
        images = images[:, None]
    if images.ndim != 4:
        raise DataError(f"{path}: 'images' must have shape (N, H, W) or (N, C, H, W), got {images.shape}")
    if len(images) == 0:
        raise DataError(f"{path}: 'images' holds no images")
    if labels.ndim != 1 or len(labels) != len(images):
        raise DataError(f"{path}: 'labels' must have shape ({len(images)},), one per image, got {labels.shape}")
    if not np.issubdtype(labels.dtype, np.integer):
        raise DataError(f"{path}: 'labels' must be integers, got dtype {labels.dtype}")
    if images.dtype == np.bool_ or not (np.issubdtype(images.dtype, np.integer)
                                        or np.issubdtype(images.dtype, np.floating)):
        raise DataError(f"{path}: 'images' must hold integer or floating pixels, got dtype {images.dtype}")
    pixels = torch.from_numpy(np.ascontiguousarray(images)).float()
    if np.issubdtype(images.dtype, np.integer):
        pixels = pixels / 255.0
    finite = torch.isfinite(pixels.flatten(1)).all(dim=1)  # (N,)
    if not bool(finite.all()):
        raise DataError(f"{path}: image {int((~finite).nonzero()[0])} holds NaN or infinite pixels")
    names = [str(n) for n in arrays["label_names"].tolist()] if "label_names" in arrays else None
    labels_t = torch.from_numpy(labels.astype(np.int64))
    if names is None:
        negative = (labels_t < 0).nonzero()
        if len(negative):
            i = int(negative[0])
            raise DataError(f"{path}: label {int(labels_t[i])} of sample {i} is negative; labels are 0..K-1")
        names = [str(i) for i in range(int(labels_t.max()) + 1)]
    check_labels_in_range(labels_t, len(names), str(path))
    return ImageData(pixels, labels_t, names, f"{path} ({len(pixels)} images of {tuple(pixels.shape[1:])})")


def _read_image(path: Path) -> np.ndarray:
    """One image file as an (C, H, W) uint8 array: 1 channel for grayscale, 3 for colour (alpha dropped)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            mode = "L" if image.mode in ("1", "L", "I", "I;16", "F", "LA") else "RGB"
            array = np.asarray(image.convert(mode))
    except (OSError, UnidentifiedImageError) as err:
        raise DataError(f"{path} is not a readable image: {err}") from err
    return array[None] if array.ndim == 2 else array.transpose(2, 0, 1)


def load_image_folder(root: str | Path) -> ImageData:
    """Read ``root/<class name>/<image>`` files (PNG, JPEG, BMP, GIF); classes are the sorted folder names.

    Every image must have the size and channel count of the first one; the error names the file.
    """
    root = Path(root)
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise DataError(f"{root} has no class folders; put the images of each class in root/<class name>/")
    images, labels, first = [], [], None
    for label, name in enumerate(classes):
        files = sorted(p for p in (root / name).iterdir()
                       if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith("."))
        for file in files:
            array = _read_image(file)
            if first is None:
                first = (file, array.shape)
            elif array.shape != first[1]:
                c, h, w = array.shape
                raise DataError(f"{file} is {h}x{w} with {c} channel(s), but {first[0]} is {first[1][1]}x"
                                f"{first[1][2]} with {first[1][0]}; all images must have one size and channel count")
            images.append(array)
            labels.append(label)
    if not images:
        raise DataError(f"{root}: the class folders {', '.join(classes)} hold no images "
                        f"({', '.join(IMAGE_SUFFIXES)})")
    pixels = torch.from_numpy(np.stack(images)).float() / 255.0  # (N, C, H, W)
    return ImageData(pixels, torch.tensor(labels, dtype=torch.long), classes,
                     f"{root} ({len(images)} images of {tuple(pixels.shape[1:])} in {len(classes)} classes)")


def load_images(spec: str | None) -> ImageData:
    """The labeled images ``spec`` names: ``digits`` (also the default, for None or ""), a ``.npz`` file,
    or a folder of class folders."""
    if spec is None or spec in ("", DIGITS):
        return load_digits()
    path = Path(spec).expanduser()
    if path.suffix == ".npz":
        return load_npz(path)
    if path.is_dir():
        return load_image_folder(path)
    if not path.exists():
        raise DataError(f"image source {spec} does not exist; use digits, an .npz file or a folder of class folders")
    raise DataError(f"{spec} is not an image source; use digits, an .npz file or a folder of class folders")


def check_labels_in_range(labels: torch.Tensor, num_classes: int, where: str) -> None:
    """Require every label in [0, num_classes); the DataError names the first bad sample's index."""
    bad = ((labels < 0) | (labels >= num_classes)).nonzero()
    if len(bad):
        i = int(bad[0])
        raise DataError(f"{where}: label {int(labels[i])} of sample {i} is outside the {num_classes} classes "
                        f"[0, {num_classes}); fix the label or the class count")


def check_image_shape(data: ImageData, channels: int, size: int) -> None:
    """Require (C, H, W) = (channels, size, size); the DataError says what the model expects and the data has."""
    shape = tuple(data.images.shape[1:])
    if shape != (channels, size, size):
        hint = " (channels-last? use numpy.moveaxis(images, -1, 1))" if shape[-1] == channels else ""
        raise DataError(f"{data.description}: images are {shape} (channels, height, width) but the model expects "
                        f"({channels}, {size}, {size}){hint}; set model.image_size / model.num_channels to match "
                        "or convert the images")
