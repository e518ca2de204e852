"""Image classification training: image sources, splits, bad data, the objective, and the end-of-run report."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch

import formerkit as fk
from formerkit.data.images import ImageData, load_digits, load_image_folder, load_images, load_npz
from formerkit.train import TrainConfig, train
from formerkit.train.config import options_help
from formerkit.train.images import image_splits, random_shift
from formerkit.train.vision_report import confusion_matrix

TINY = ["--model.preset", "vit-digits", "--model.d_model", "32", "--model.n_layers", "2", "--model.n_heads", "2",
        "--model.d_ff", "64"]


def config(tmp_path, source: str, *extra: str, steps: int = 40) -> TrainConfig:
    args = [*TINY, "--train.objective", "image-classify", "--data.source", source, "--train.steps", str(steps),
            "--train.batch_size", "32", "--train.precision", "fp32", "--optim.lr", "3e-3", "--optim.warmup_steps",
            "5", "--eval.every", "1000", "--checkpoint.every", "1000", "--checkpoint.run_dir", str(tmp_path / "run"),
            "--log.progress", "false", "--log.tensorboard", "false", "--log.every", "10", "--train.threads", "1",
            *extra]
    return TrainConfig.load(None, args)


def two_class_npz(tmp_path, n: int = 60, **extra) -> str:
    """Images whose top half (class 0) or bottom half (class 1) is bright: learnable in a few steps."""
    g = np.random.default_rng(0)
    images = g.integers(0, 60, size=(n, 8, 8)).astype(np.uint8)
    labels = np.arange(n) % 2
    for i, label in enumerate(labels):
        images[i, 4 * label:4 * label + 4] += 180
    path = tmp_path / "two.npz"
    np.savez(path, **{"images": images, "labels": labels, **extra})
    return str(path)


# ---- sources -------------------------------------------------------------------------------------------
def test_digits_are_8x8_in_unit_range():
    data = load_digits()
    assert data.images.shape == (1797, 1, 8, 8) and data.images.dtype == torch.float32
    assert 0.0 == data.images.min() and data.images.max() == 1.0
    assert data.label_names == [str(i) for i in range(10)] and set(data.labels.tolist()) == set(range(10))


def test_missing_scikit_learn_names_the_install_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    with pytest.raises(fk.DataError, match="pip install scikit-learn"):
        load_images("digits")


def test_npz_channels_first_integer_and_named_labels(tmp_path):
    path = tmp_path / "rgb.npz"
    np.savez(path, images=np.full((4, 3, 6, 6), 255, dtype=np.uint8), labels=np.array([0, 1, 2, 1]),
             label_names=np.array(["cat", "dog", "owl"]))
    data = load_npz(path)
    assert data.images.shape == (4, 3, 6, 6) and float(data.images.max()) == 1.0
    assert data.label_names == ["cat", "dog", "owl"] and data.labels.tolist() == [0, 1, 2, 1]


def test_image_folder_reads_class_folders_of_pngs(tmp_path):
    from PIL import Image

    for name, value in [("circle", 30), ("square", 220)]:
        (tmp_path / name).mkdir()
        for i in range(3):
            Image.fromarray(np.full((8, 8), value + i, dtype=np.uint8)).save(tmp_path / name / f"{i}.png")
    (tmp_path / "square" / "notes.txt").write_text("not an image")
    data = load_image_folder(tmp_path)
    assert data.images.shape == (6, 1, 8, 8) and data.label_names == ["circle", "square"]
    assert data.labels.tolist() == [0, 0, 0, 1, 1, 1]
    assert data.images[3, 0, 0, 0].item() == pytest.approx(220 / 255)
    Image.fromarray(np.zeros((9, 8), dtype=np.uint8)).save(tmp_path / "square" / "odd.png")
    with pytest.raises(fk.DataError, match=r"odd\.png is 9x8 with 1 channel"):
        load_image_folder(tmp_path)


@pytest.mark.parametrize("arrays, fragment", [
    ({"images": np.zeros((3, 8, 8)), "labels": np.array([0, 1, 5]), "label_names": np.array(["a", "b"])},
     "label 5 of sample 2 is outside the 2 classes"),
    ({"images": np.zeros((3, 8, 8)), "labels": np.array([0, -1, 1])}, "label -1 of sample 1 is negative"),
    ({"images": np.zeros((3, 8)), "labels": np.array([0, 1, 1])}, r"shape \(N, H, W\) or \(N, C, H, W\)"),
    ({"images": np.zeros((3, 8, 8)), "labels": np.array([0, 1])}, r"one per image, got \(2,\)"),
    ({"images": np.zeros((3, 8, 8)), "labels": np.array([0.0, 1.0, 1.0])}, "must be integers"),
    ({"images": np.zeros((0, 8, 8)), "labels": np.zeros(0, dtype=int)}, "holds no images"),
    ({"pixels": np.zeros((3, 8, 8)), "labels": np.array([0, 1, 1])}, "no 'images' array"),
    ({"images": np.array([np.zeros((8, 8)), np.full((8, 8), np.nan)]), "labels": np.array([0, 1])},
     "image 1 holds NaN"),
])
def test_bad_npz_files_are_named(tmp_path, arrays, fragment):
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)
    with pytest.raises(fk.DataError, match=fragment):
        load_npz(path)


def test_bad_sources(tmp_path):
    with pytest.raises(fk.DataError, match="does not exist"):
        load_images(str(tmp_path / "nope.npz"))
    (tmp_path / "empty" / "a").mkdir(parents=True)
    with pytest.raises(fk.DataError, match="hold no images"):
        load_images(str(tmp_path / "empty"))
    with pytest.raises(fk.DataError, match="no class folders"):
        load_images(str(tmp_path / "empty" / "a"))
    assert len(load_images(None)) == 1797  # the embedded default: the digits


def test_splits_are_stratified_disjoint_and_the_test_set_is_fixed(tmp_path):
    parts = image_splits(config(tmp_path, "digits"))
    other = image_splits(config(tmp_path, "digits", "--train.seed", "7"))
    assert len(parts.test) == 359 and len(parts.train) + len(parts.val) + len(parts.test) == 1797
    assert torch.equal(parts.test.images, other.test.images)  # train.seed moves the validation split only
    assert not torch.equal(parts.val.images, other.val.images)
    counts = torch.bincount(parts.test.labels, minlength=10)
    assert counts.min() >= 34 and counts.max() <= 38  # about 20% of every class
    data = ImageData(torch.arange(10.0).reshape(10, 1, 1, 1), torch.zeros(10, dtype=torch.long), ["x"], "t")
    rest, held = data.split(0.3, 0)
    assert sorted(rest.images.flatten().tolist() + held.images.flatten().tolist()) == list(range(10))
    assert len(held) == 3


def test_random_shift_moves_pixels_and_fills_zeros():
    images = torch.arange(1.0, 17.0).reshape(1, 1, 4, 4).repeat(50, 1, 1, 1)
    shifted = random_shift(images, 1, torch.Generator().manual_seed(0))
    assert shifted.shape == images.shape
    for out in shifted:
        ok = [torch.equal(out[0], torch.nn.functional.pad(images[0, 0], (1, 1, 1, 1))[t:t + 4, s:s + 4])
              for t in range(3) for s in range(3)]
        assert any(ok)
    assert len({tuple(x.flatten().tolist()) for x in shifted}) > 3


def test_confusion_matrix_counts():
    m = confusion_matrix(torch.tensor([0, 1, 1, 2, 0]), torch.tensor([0, 1, 2, 2, 1]), 3)
    assert m.tolist() == [[1, 0, 0], [1, 1, 0], [0, 1, 1]]


# ---- configuration errors ------------------------------------------------------------------------------
def test_run_options_are_checked(tmp_path):
    with pytest.raises(fk.ConfigError, match="needs an image model"):
        train(TrainConfig.load(None, ["--train.objective", "image-classify", "--data.source", "digits",
                                      "--checkpoint.run_dir", str(tmp_path / "r")]))
    with pytest.raises(fk.DataError, match=r"images are \(1, 8, 8\).*expects \(1, 16, 16\)"):
        train(config(tmp_path, "digits", "--model.image_size", "16", "--model.max_seq_len", "65"))
    with pytest.raises(fk.DataError, match=r"expects \(3, 8, 8\)"):
        train(config(tmp_path, "digits", "--model.num_channels", "3"))
    with pytest.raises(fk.DataError, match=r"model.num_labels=5: label 5 of sample \d+ is outside the 5 classes"):
        train(config(tmp_path, "digits", "--model.num_labels", "5"))  # the digits are labelled 0..9
    for bad in (["--data.test_fraction", "1.5"], ["--data.augment_shift", "-1"], ["--train.threads", "-2"]):
        with pytest.raises(fk.ConfigError, match=bad[0][2:]):
            config(tmp_path, "digits", *bad)
    help_text = options_help()
    for option in ["image-classify", "--data.test_fraction", "--data.augment_shift", "--train.threads", "digits"]:
        assert option in help_text


# ---- training ------------------------------------------------------------------------------------------
def test_npz_run_learns_and_reports(tmp_path):
    result = train(config(tmp_path, two_class_npz(tmp_path), "--data.test_fraction", "0.3", steps=30))
    assert result.val["accuracy"] >= 0.9 and result.test["accuracy"] >= 0.9
    assert result.test["images"] == 18
    model = fk.from_pretrained(tmp_path / "run")
    assert model.config.patch_size == 2 and model.config.num_labels == 2 and model.config.num_channels == 1


def test_tiny_vit_learns_digits_and_writes_the_confusion_matrix(tmp_path):
    threads = torch.get_num_threads()
    result = train(config(tmp_path, "digits", steps=600))  # 0.85-0.96 over seeds 0-3; 300 steps gave 0.52-0.90
    run = tmp_path / "run"
    assert result.test["accuracy"] > 0.7  # chance is 0.1
    assert result.val["accuracy"] > 0.7
    assert (run / "confusion_matrix.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    record = json.loads((run / "test_metrics.json").read_text())
    matrix = torch.tensor(record["confusion_matrix"])
    assert matrix.shape == (10, 10) and int(matrix.sum()) == 359 == record["images"]
    assert record["accuracy"] == pytest.approx(float(matrix.trace()) / 359)
    assert not (run / "tokenizer").exists()
    assert torch.get_num_threads() == threads  # train.threads=1 held for the run only
