"""Offline data: bundled photos, preprocessing, Fashion-MNIST from Debian's package."""

from __future__ import annotations

import os

import numpy as np
import pytest
import timm
import torch
from PIL import Image

from mame.data import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    DataConfig,
    data_config,
    fashion_mnist,
    fashion_mnist_available,
    fashion_mnist_raw,
    fit_image,
    labelled_raw,
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


def test_preprocess_centre_crops_by_default_and_letterboxes_on_request() -> None:
    # A wide image of exactly the mean colour: normalises to 0 where there is image, -mean/std in the padding.
    colour = tuple(round(m * 255) for m in IMAGENET_MEAN)
    wide = Image.new("RGB", (400, 200), colour)
    crop = preprocess([wide, wide.convert("L").convert("RGB")], size=112)
    assert crop.shape == (2, 3, 112, 112) and crop.dtype == torch.float32
    assert crop[0].abs().max() < 0.01  # the default fills the square with image: no padding rows
    assert fit_image(wide, size=112).getpixel((0, 0)) == colour
    x = preprocess(wide, size=112, mode="letterbox")
    assert x[0, :, 28:84].abs().max() < 0.01  # the image band: rows 28..83
    padding = -torch.tensor(IMAGENET_MEAN) / torch.tensor(IMAGENET_STD)
    assert torch.allclose(x[0, :, :28], padding.view(3, 1, 1).expand(3, 28, 112))
    assert fit_image(wide, size=112, mode="letterbox").getpixel((0, 0)) == (0, 0, 0)
    with pytest.raises(ValueError, match="mode"):
        preprocess(wide, mode="squash")


def test_default_centre_crop_keeps_the_middle() -> None:
    # Left third red, middle third green, right third blue: the centre crop of the wide image is all green.
    wide = Image.new("RGB", (300, 100), (0, 255, 0))
    wide.paste((255, 0, 0), (0, 0, 100, 100))
    wide.paste((0, 0, 255), (200, 0, 300, 100))
    picture = np.asarray(fit_image(wide, size=50)).astype(int)
    assert picture.shape == (50, 50, 3) and (picture[:, 2:-2] == (0, 255, 0)).all()


def test_preprocess_follows_the_model_data_config_as_timm_does() -> None:
    """With a model, size, crop_pct, interpolation, mean and std come from its data config, and the result is what
    timm's own evaluation transform gives (vit_small_patch16_224: crop_pct 0.9, mean and std 0.5)."""
    from timm.data import create_transform, resolve_model_data_config

    model = timm.create_model("vit_small_patch16_224", pretrained=False, depth=1)
    config = data_config(model)
    assert (config.size, config.crop_pct, config.mean) == (224, 0.9, (0.5, 0.5, 0.5))
    photo = sample_photos(1)[0][1]
    expected = create_transform(**resolve_model_data_config(model), is_training=False)(photo)
    assert torch.allclose(preprocess(photo, model=model)[0], expected, atol=1e-6)
    # Without a data config: plain resize of the shorter side and centre crop, ImageNet statistics.
    assert data_config() == data_config(torch.nn.Linear(2, 2)) == DataConfig(
        size=224, mean=IMAGENET_MEAN, std=IMAGENET_STD, crop_pct=1.0, interpolation="bicubic")
    assert data_config(model, size=112, crop_pct=1.0).size == 112  # explicit arguments win


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


def test_digits_splits_are_fixed_and_partition_the_set() -> None:
    """scikit-learn's digits: a fixed fifth is the test split whatever the seed, the two splits together are the
    whole set (each image once), and subsets are seeded prefixes."""
    from sklearn.datasets import load_digits

    train, train_labels = labelled_raw("digits", "train")
    test, test_labels = labelled_raw("digits", "test")
    assert train.shape == (1438, 8, 8) and test.shape == (359, 8, 8) and train.dtype == torch.uint8
    assert int(train.max()) == 255 and int(train.min()) == 0
    assert set(train_labels.tolist()) == set(range(10)) == set(test_labels.tolist())

    def rows(images: torch.Tensor, labels) -> list[tuple]:
        return sorted(tuple(image.flatten().tolist()) + (int(label),) for image, label in zip(images, labels))

    bunch = load_digits()
    whole = torch.from_numpy(np.rint(bunch.images * (255 / 16)).astype(np.uint8))
    assert rows(torch.cat([train, test]), torch.cat([train_labels, test_labels])) == rows(whole, bunch.target)
    small, small_labels = labelled_raw("digits", "test", n=16, seed=3)
    again, _ = labelled_raw("digits", "test", n=32, seed=3)
    assert torch.equal(small, again[:16]) and small_labels.shape == (16,)
    with pytest.raises(ValueError, match="359 images"):
        labelled_raw("digits", "test", n=400)
