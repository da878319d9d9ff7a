"""Offline data: bundled photos, preprocessing, Fashion-MNIST from Debian's package."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from PIL import Image

from mame.data import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    fashion_mnist,
    fashion_mnist_available,
    fashion_mnist_raw,
    preprocess,
    sample_photos,
    to_model_input,
)

# CI installs dataset-fashion-mnist, so there a missing package must fail, not skip.
needs_fashion_mnist = pytest.mark.skipif(
    not fashion_mnist_available() and not os.environ.get("CI"),
    reason="needs `apt-get install -y dataset-fashion-mnist`",
)


def test_sample_photos_are_20_distinct_rgb_photos_in_fixed_order() -> None:
    photos = sample_photos()
    assert len(photos) >= 20
    assert all(image.mode == "RGB" and min(image.size) >= 100 for _, image in photos)
    assert len({name for name, _ in photos}) == len({image.tobytes() for _, image in photos}) == len(photos)
    again = sample_photos(5)
    assert [name for name, _ in again] == [name for name, _ in photos[:5]]
    assert all(a.tobytes() == b.tobytes() for (_, a), (_, b) in zip(again, photos[:5], strict=True))
    with pytest.raises(ValueError):
        sample_photos(len(photos) + 1)


def test_preprocess_letterbox_and_crop() -> None:
    # A wide image of exactly the mean colour: normalises to 0 where there is image, -mean/std in the padding.
    colour = tuple(round(m * 255) for m in IMAGENET_MEAN)
    wide = Image.new("RGB", (400, 200), colour)
    x = preprocess([wide, wide.convert("L").convert("RGB")], size=112)
    assert x.shape == (2, 3, 112, 112) and x.dtype == torch.float32
    assert x[0, :, 28:84].abs().max() < 0.01  # the image band: rows 28..83
    padding = -torch.tensor(IMAGENET_MEAN) / torch.tensor(IMAGENET_STD)
    assert torch.allclose(x[0, :, :28], padding.view(3, 1, 1).expand(3, 28, 112))
    crop = preprocess(wide, size=112, mode="center_crop")
    assert crop.shape == (1, 3, 112, 112) and crop.abs().max() < 0.01  # no padding


@needs_fashion_mnist
def test_fashion_mnist_subset() -> None:
    x, y = fashion_mnist("test", n=32, seed=0, size=64)
    assert x.shape == (32, 3, 64, 64) and x.dtype == torch.float32
    assert y.shape == (32,) and y.dtype == torch.int64 and 0 <= y.min() and y.max() <= 9
    rgb = x * torch.tensor(IMAGENET_STD).view(1, 3, 1, 1) + torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    assert torch.allclose(rgb[:, 0], rgb[:, 1], atol=1e-5) and torch.allclose(rgb[:, 0], rgb[:, 2], atol=1e-5)
    x2, y2 = fashion_mnist("test", n=32, seed=0, size=64)
    assert torch.equal(x, x2) and torch.equal(y, y2)
    raw, _ = fashion_mnist_raw("test", n=32, seed=1)
    assert raw.shape == (32, 28, 28) and raw.dtype == torch.uint8
    assert not torch.equal(to_model_input(raw, 64), x)  # another seed, another subset
    small, _ = fashion_mnist_raw("test", n=8, seed=0)
    assert torch.equal(to_model_input(small, 64), x[:8])  # a smaller n is a prefix of a larger one


@needs_fashion_mnist
def test_fashion_mnist_full_splits() -> None:
    for split, count in (("train", 60_000), ("test", 10_000)):
        images, labels = fashion_mnist_raw(split)
        assert images.shape == (count, 28, 28)
        assert np.array_equal(labels.bincount().numpy(), np.full(10, count // 10))
