"""Training from scratch with MaMe inside (paper section 4, "Training From Scratch", Table 2).

MaMe is differentiable, so a model can learn with merging in place: a ViT merging at three blocks with the "2:1"
rule (every merge keeps the class token and the destinations, so the other tokens halve; preserved sources are
discarded, `mame.patch.timm(..., discard_preserved=True)`), or a Swin / Iwin whose patch merging is MaMe at constant
width (`mame.downsample`). The recipe is Swin's, which the paper follows: AdamW, linear warm-up then cosine decay
(per step), label smoothing, gradient clipping, optional mixup/cutmix and drop-path.

One process or many: under ``torchrun`` the same code runs data-parallel (DDP; NCCL on GPUs, gloo on CPUs). The
global batch is fixed, each rank takes an equal contiguous share of every global batch of a shared, seeded order,
and the logged loss is the mean over the global batch, so N processes follow the one-process loss curve (up to
float summation order) as long as nothing draws randomness per process (drop-path, dropout, mixup).

    >>> from mame.train import TrainConfig, train
    >>> result = train(TrainConfig(model="vit_tiny_patch16_224", data="fashion-mnist", epochs=2,
    ...                            mame_blocks=(2, 5, 8), tau=0.5, out_dir="runs/vit-t-mame"))
    >>> result.val_acc

Command line: ``mame train --model vit_tiny_patch16_224 --mame-blocks 2,5,8 --epochs 2`` or, data-parallel,
``torchrun --nproc_per_node=2 -m mame.train --model ...`` (same options).

Data: ``fashion-mnist`` (the Debian package ``dataset-fashion-mnist``, 28x28 grayscale, held in memory with a
deterministic per-sample augmentation) or an ImageFolder root with ``train/`` and ``val/`` class folders (timm's
transforms; RandAugment and random erasing as options).

Checkpoints: ``out_dir/last.pt`` after every epoch holds the model, optimizer, scheduler, gradient scaler, every
rank's RNG states, the epoch and the step; ``resume=True`` continues from it exactly (the data order is a function
of the seed and the epoch). ``out_dir/log.jsonl`` gets one JSON line per logged step and per epoch (loss, accuracy,
learning rate, images per second).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

CHECKPOINT_FORMAT = "mame-train/1"
FASHION_MNIST = "fashion-mnist"
AMP_MODES = ("auto", "bf16", "fp16", "off")
DOWNSAMPLE_MODES = ("mame",)
# Config fields that do not change the trajectory, so a resumed run may set them differently.
_RUNTIME_FIELDS = {"out_dir", "resume", "progress", "log_every", "workers", "threads", "device", "stop_after"}


@dataclass
class TrainConfig:
    """Everything a training run depends on (saved in every checkpoint).

    Attributes:
        model: a timm model name: a ViT (``vit_tiny_patch16_224``...), a Swin (``swin_tiny_patch4_window7_224``),
            an Iwin (``iwin_tiny_patch4_window7_224``, registered by `mame.iwin`) or their MaMe-downsampling names
            (``..._mame``).
        model_kwargs: extra keyword arguments of ``timm.create_model`` (``embed_dim``, ``depths``, ``num_heads``,
            ``window_size``...).
        data: ``"fashion-mnist"`` or the root of an ImageFolder tree with ``train/`` and ``val/``.
        img_size: input side; default 28 for Fashion-MNIST, the model's own for folders.
        patch_size: patch side; default for Fashion-MNIST 4 for ViTs (7x7 = 49 patches + the class token) and 2 for
            Swin/Iwin (a 14x14 map: two 7x7 windows a side, then 7, 4 and 2); the model's own for folders.
        in_chans: input channels; default 1 for Fashion-MNIST (grayscale), 3 for folders.
        train_samples: train on a fixed seeded subset of this many images (None: all).
        eval_samples: evaluate on a fixed seeded subset of this many images (None: all).
        mame_blocks: ViT blocks (0-based) that merge with MaMe; the paper's "layers 3, 6, 9" are (2, 5, 8).
        tau: similarity threshold of those merges (the paper's from-scratch setting is 0.5).
        halve: the 2:1 rule: discard preserved sources so the non-class tokens halve at every merge; False keeps
            them (eq 10: the token count then depends on the image).
        proportional_attention: log(size) attention bias for merged tokens (ToMe's; `mame.patch.timm`'s default).
        downsample: ``"mame"`` replaces a Swin's or Iwin's downsampling with MaMe at constant width.
        downsample_tau: τ of the MaMe downsampling.
        epochs: training epochs.
        batch_size: global batch size (split evenly over the processes).
        lr: peak learning rate (the Swin recipe: 5e-4 for a batch of 512; scale linearly).
        min_lr: learning rate at the end of the cosine decay.
        warmup_lr: learning rate at step 0 of the linear warm-up.
        warmup_epochs: length of the warm-up in epochs (fractions allowed; the paper uses 20 of 300).
        weight_decay: AdamW weight decay (not applied to biases, norms and position embeddings).
        label_smoothing: cross-entropy label smoothing (0.1 in the recipe).
        clip_grad: gradient-norm clipping (5.0 in the recipe; None: off).
        drop_path: stochastic depth rate passed to the model (None: the model's default).
        mixup: mixup alpha (0: off; 0.8 in the recipe), per process.
        cutmix: cutmix alpha (0: off; 1.0 in the recipe), per process.
        augment: train-time augmentation (Fashion-MNIST: random shifts of up to 2 px and horizontal flips; folders:
            random resized crop and flip, plus ``randaug``/``reprob``).
        randaug: timm auto-augment string for folders (the recipe: ``"rand-m9-mstd0.5-inc1"``; None: off).
        reprob: random-erasing probability for folders (0.25 in the recipe).
        amp: ``"auto"`` (bf16 on CUDA devices that have it, else fp16 with loss scaling; off on CPU), ``"bf16"``,
            ``"fp16"`` (CUDA only) or ``"off"``.
        seed: seeds the initialisation, the data order and the augmentation.
        out_dir: where ``last.pt`` and ``log.jsonl`` go.
        resume: continue from ``out_dir/last.pt`` (True) or from a given checkpoint path.
        device: ``"auto"`` (the local CUDA device if any, else CPU), ``"cpu"`` or ``"cuda"``.
        workers: data-loader workers for folders.
        threads: torch CPU threads (None: torch's choice, or 1 per process under torchrun).
        log_every: write a step line to the log every this many steps (the first step is always logged).
        progress: rich progress bars (rank 0 only).
        stop_after: end the run after this many epochs in all (the schedule still spans ``epochs``; a later
            ``resume`` continues it): for time-limited jobs, and to test that a resumed run matches a straight one.
    """

    model: str = "vit_tiny_patch16_224"
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    data: str = FASHION_MNIST
    img_size: int | None = None
    patch_size: int | None = None
    in_chans: int | None = None
    train_samples: int | None = None
    eval_samples: int | None = None
    mame_blocks: tuple[int, ...] | None = None
    tau: float = 0.5
    halve: bool = True
    proportional_attention: bool = True
    downsample: str | None = None
    downsample_tau: float = 0.5
    epochs: int = 10
    batch_size: int = 128
    lr: float = 5e-4
    min_lr: float = 5e-6
    warmup_lr: float = 5e-7
    warmup_epochs: float = 1.0
    weight_decay: float = 0.05
    label_smoothing: float = 0.1
    clip_grad: float | None = 5.0
    drop_path: float | None = None
    mixup: float = 0.0
    cutmix: float = 0.0
    augment: bool = True
    randaug: str | None = None
    reprob: float = 0.0
    amp: str = "auto"
    seed: int = 0
    out_dir: str | Path = "runs/train"
    resume: bool | str | Path = False
    device: str = "auto"
    workers: int = 4
    threads: int | None = None
    log_every: int = 50
    progress: bool = True
    stop_after: int | None = None

    def __post_init__(self) -> None:
        if self.mame_blocks is not None:
            self.mame_blocks = tuple(self.mame_blocks)
        self.model_kwargs = dict(self.model_kwargs)

    def check(self) -> None:
        """Raise a ValueError naming the option for settings that cannot work (before anything is built)."""
        from mame.core import check_tau

        check_tau(self.tau, "tau")
        check_tau(self.downsample_tau, "downsample_tau")
        if self.mame_blocks is not None and len(self.mame_blocks) == 0:
            raise ValueError("mame_blocks must name at least one block (or be None for no merging)")
        if self.downsample not in (None, *DOWNSAMPLE_MODES):
            raise ValueError(f"downsample must be None or one of {DOWNSAMPLE_MODES}, got {self.downsample!r}")
        if self.amp not in AMP_MODES:
            raise ValueError(f"amp must be one of {AMP_MODES}, got {self.amp!r}")
        positive = dict(epochs=self.epochs, batch_size=self.batch_size, log_every=self.log_every)
        for name, value in positive.items():
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        for name in ("train_samples", "eval_samples", "img_size", "patch_size", "in_chans", "threads", "stop_after"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a positive int or None, got {value!r}")
        if not self.lr > 0 or self.min_lr < 0 or self.warmup_lr < 0 or self.warmup_epochs < 0:
            raise ValueError("lr must be > 0 and min_lr, warmup_lr, warmup_epochs >= 0")
        if self.weight_decay < 0 or not 0 <= self.label_smoothing < 1 or self.mixup < 0 or self.cutmix < 0:
            raise ValueError("weight_decay, mixup and cutmix must be >= 0 and label_smoothing in [0, 1)")
        if self.drop_path is not None and not 0 <= self.drop_path < 1:
            raise ValueError(f"drop_path must be in [0, 1), got {self.drop_path!r}")
        if self.clip_grad is not None and not self.clip_grad > 0:
            raise ValueError(f"clip_grad must be > 0 or None, got {self.clip_grad!r}")
        if not 0 <= self.reprob <= 1:
            raise ValueError(f"reprob must be in [0, 1], got {self.reprob!r}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"device must be 'auto', 'cpu' or 'cuda', got {self.device!r}")

    def to_json(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["out_dir"] = str(self.out_dir)
        out["resume"] = self.resume if isinstance(self.resume, bool) else str(self.resume)
        out["mame_blocks"] = None if self.mame_blocks is None else list(self.mame_blocks)
        return out


# --------------------------------------------------------------------------------------------------- processes


@dataclass(frozen=True)
class Dist:
    """This process's place in a torchrun job (rank 0 of 1 without torchrun)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1


def _dist_from_env() -> Dist:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    return Dist(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))


def _init_dist(dist: Dist, device: torch.device) -> None:
    import torch.distributed as td

    if dist.active and not td.is_initialized():
        td.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")


def _all_reduce_sum(values: Sequence[float], dist: Dist, device: torch.device) -> list[float]:
    """Sum of ``values`` over all ranks (float64)."""
    tensor = torch.tensor(list(values), dtype=torch.float64, device=device)
    if dist.active:
        import torch.distributed as td

        td.all_reduce(tensor)
    return tensor.tolist()


def _resolve_device(config: TrainConfig, dist: Dist) -> torch.device:
    if config.device == "cpu" or (config.device == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ValueError("device='cuda' but torch sees no CUDA device")
    torch.cuda.set_device(dist.local_rank)
    return torch.device("cuda", dist.local_rank)


def _amp_dtype(config: TrainConfig, device: torch.device) -> torch.dtype | None:
    """The autocast dtype, or None for full precision."""
    if config.amp == "off":
        return None
    if config.amp == "auto":
        if device.type != "cuda":
            return None
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if config.amp == "fp16" and device.type != "cuda":
        raise ValueError("amp='fp16' needs a CUDA device; on CPU use amp='bf16' or 'off'")
    return torch.bfloat16 if config.amp == "bf16" else torch.float16


# --------------------------------------------------------------------------------------------------------- data


def _share(global_batch: int, dist: Dist) -> int:
    if global_batch % dist.world:
        raise ValueError(f"batch_size={global_batch} must be divisible by the number of processes ({dist.world}) so "
                         "that every rank takes an equal share of each global batch")
    return global_batch // dist.world


def _epoch_generator(seed: int, epoch: int, stream: int) -> torch.Generator:
    """A generator that depends only on (seed, epoch, stream): the same on every rank and after a resume."""
    return torch.Generator().manual_seed((seed * 1_000_003 + epoch) * 7 + stream)


class TensorImages:
    """Images held in memory as uint8 (N, C, H, W) with labels, augmented on the fly: a random shift of up to
    ``shift`` pixels (zero fill) and, with ``flip``, a horizontal flip with probability 1/2 per sample, drawn from
    (seed, epoch), so the same sample gets the same augmentation whatever the number of processes or a resume in
    between."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, mean: Sequence[float], std: Sequence[float],
                 num_classes: int, size: int | None = None, shift: int = 2, flip: bool = True) -> None:
        if images.dim() == 3:
            images = images.unsqueeze(1)
        self.images, self.labels = images, labels.long()
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
        self.num_classes = num_classes
        self.size = size or images.shape[-1]
        self.shift = shift
        self.flip = flip

    def __len__(self) -> int:
        return len(self.labels)

    def _to_input(self, images: torch.Tensor) -> torch.Tensor:
        x = (images.float() / 255.0 - self.mean) / self.std
        if x.shape[-1] != self.size or x.shape[-2] != self.size:
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False)
        return x

    def _augment(self, images: torch.Tensor, shifts: torch.Tensor, flips: torch.Tensor) -> torch.Tensor:
        pad = self.shift
        batch, _, height, width = images.shape
        padded = F.pad(images, (pad, pad, pad, pad))
        rows = (shifts[:, 0, None] + torch.arange(height)).view(batch, 1, height, 1)
        cols = (shifts[:, 1, None] + torch.arange(width)).view(batch, 1, 1, width)
        index = torch.arange(batch).view(batch, 1, 1, 1)
        channel = torch.arange(images.shape[1]).view(1, -1, 1, 1)
        out = padded[index, channel, rows, cols]
        return torch.where(flips.view(batch, 1, 1, 1), out.flip(-1), out)

    def train_batches(self, epoch: int, batch_size: int, seed: int, dist: Dist, augment: bool
                      ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """This rank's share of every full global batch of epoch ``epoch`` (the last partial batch is dropped)."""
        local = _share(batch_size, dist)
        order = torch.randperm(len(self), generator=_epoch_generator(seed, epoch, 0))
        augment = augment and (self.shift > 0 or self.flip)
        if augment:
            generator = _epoch_generator(seed, epoch, 1)
            shifts = torch.randint(0, 2 * self.shift + 1, (len(self), 2), generator=generator)
            flips = (torch.rand(len(self), generator=generator) < 0.5) & self.flip
        for step in range(len(self) // batch_size):
            start = step * batch_size + dist.rank * local
            index = order[start:start + local]
            images = self.images[index]
            if augment:
                images = self._augment(images, shifts[index], flips[index])
            yield self._to_input(images), self.labels[index]

    def eval_batches(self, batch_size: int, dist: Dist) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """This rank's strided share of the whole set, in batches of at most ``batch_size``."""
        index = torch.arange(dist.rank, len(self), dist.world)
        for start in range(0, len(index), batch_size):
            part = index[start:start + batch_size]
            yield self._to_input(self.images[part]), self.labels[part]


def fashion_mnist_data(train_samples: int | None, eval_samples: int | None, seed: int, size: int,
                       in_chans: int) -> tuple[TensorImages, TensorImages]:
    """Fashion-MNIST (Debian's ``dataset-fashion-mnist``) as `TensorImages`, normalised with the training set's
    mean and standard deviation; ``in_chans=3`` repeats the gray channel."""
    from mame.data import fashion_mnist_raw

    train_x, train_y = fashion_mnist_raw("train", train_samples, seed)
    test_x, test_y = fashion_mnist_raw("test", eval_samples, seed)
    mean = float(train_x.float().mean() / 255.0)
    std = float(train_x.float().std() / 255.0)
    train_x, test_x = train_x.unsqueeze(1), test_x.unsqueeze(1)
    if in_chans != 1:
        train_x, test_x = train_x.expand(-1, in_chans, -1, -1), test_x.expand(-1, in_chans, -1, -1)
    stats = dict(mean=[mean] * in_chans, std=[std] * in_chans, num_classes=10, size=size)
    return TensorImages(train_x, train_y, **stats), TensorImages(test_x, test_y, **stats, shift=0)


class FolderImages:
    """An ImageFolder split read by a DataLoader with timm's transforms; each rank reads its share of every global
    batch of a seeded order (as `TensorImages`)."""

    def __init__(self, root: Path, training: bool, input_size: tuple[int, int, int], data_config: dict[str, Any],
                 config: TrainConfig, subset: int | None) -> None:
        from timm.data import create_transform
        from torchvision.datasets import ImageFolder

        transform = create_transform(
            input_size, is_training=training and config.augment, auto_augment=config.randaug if training else None,
            re_prob=config.reprob if training else 0.0, interpolation=data_config.get("interpolation", "bicubic"),
            mean=data_config.get("mean", (0.485, 0.456, 0.406)), std=data_config.get("std", (0.229, 0.224, 0.225)),
            crop_pct=data_config.get("crop_pct"))
        self.dataset = ImageFolder(str(root), transform=transform)
        self.num_classes = len(self.dataset.classes)
        self.indices = torch.arange(len(self.dataset))
        if subset is not None:
            if subset > len(self.dataset):
                raise ValueError(f"{root} has {len(self.dataset)} images, asked for {subset}")
            self.indices = torch.randperm(len(self.dataset), generator=torch.Generator().manual_seed(config.seed))
            self.indices = self.indices[:subset].sort().values
        self.workers = config.workers

    def __len__(self) -> int:
        return len(self.indices)

    def _loader(self, batches: list[list[int]]) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        from torch.utils.data import DataLoader

        loader = DataLoader(self.dataset, batch_sampler=batches, num_workers=self.workers,
                            persistent_workers=False, pin_memory=torch.cuda.is_available())
        yield from loader

    def train_batches(self, epoch: int, batch_size: int, seed: int, dist: Dist, augment: bool
                      ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        local = _share(batch_size, dist)
        order = self.indices[torch.randperm(len(self), generator=_epoch_generator(seed, epoch, 0))]
        batches = [order[s * batch_size + dist.rank * local:][:local].tolist() for s in range(len(self) // batch_size)]
        yield from self._loader(batches)

    def eval_batches(self, batch_size: int, dist: Dist) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        mine = self.indices[dist.rank::dist.world].tolist()
        yield from self._loader([mine[s:s + batch_size] for s in range(0, len(mine), batch_size)])


def build_data(config: TrainConfig, input_size: tuple[int, int, int], data_config: dict[str, Any]
               ) -> tuple[TensorImages | FolderImages, TensorImages | FolderImages]:
    """The training and evaluation sets of ``config.data``."""
    if config.data == FASHION_MNIST:
        return fashion_mnist_data(config.train_samples, config.eval_samples, config.seed, input_size[-1],
                                  input_size[0])
    root = Path(config.data)
    if not (root / "train").is_dir() or not (root / "val").is_dir():
        raise ValueError(f"data must be {FASHION_MNIST!r} or an ImageFolder root with train/ and val/ class folders; "
                         f"{root} has no {'train/' if not (root / 'train').is_dir() else 'val/'}")
    train_set = FolderImages(root / "train", True, input_size, data_config, config, config.train_samples)
    eval_set = FolderImages(root / "val", False, input_size, data_config, config, config.eval_samples)
    if train_set.dataset.classes != eval_set.dataset.classes:
        raise ValueError(f"{root}: train/ and val/ have different class folders")
    return train_set, eval_set


# -------------------------------------------------------------------------------------------------------- model


def _family(name: str) -> str:
    """``"vit"`` (timm's VisionTransformer module), ``"hierarchical"`` (Swin, Iwin) or ``"other"``."""
    import timm.models  # importing mame (the package of this module) registered the Iwin and '_mame' models

    if not timm.models.is_model(name):
        raise ValueError(f"unknown model {name!r} (a timm name, or an Iwin / '_mame' name that mame registers)")
    module = timm.models.model_entrypoint(name).__module__
    if module in ("mame.iwin", "timm.models.swin_transformer"):
        return "hierarchical"
    return "vit" if module == "timm.models.vision_transformer" else "other"


def model_arguments(config: TrainConfig, num_classes: int) -> dict[str, Any]:
    """The keyword arguments of ``timm.create_model`` for ``config`` (Fashion-MNIST sizes filled in for ViTs, Swin
    and Iwin; other models get only the class and channel counts)."""
    kwargs: dict[str, Any] = dict(num_classes=num_classes)
    fmnist = config.data == FASHION_MNIST
    family = _family(config.model)
    sized = family != "other"
    img_size = config.img_size or (28 if fmnist and sized else None)
    patch_size = config.patch_size or ((4 if family == "vit" else 2) if fmnist and sized else None)
    in_chans = config.in_chans or (1 if fmnist else None)
    for name, value in (("img_size", img_size), ("patch_size", patch_size), ("in_chans", in_chans),
                        ("drop_path_rate", config.drop_path)):
        if value is not None:
            kwargs[name] = value
    kwargs.update(config.model_kwargs)
    return kwargs


def build_model(config: TrainConfig, num_classes: int) -> nn.Module:
    """The timm model of ``config`` with its MaMe settings applied (random initialisation from the current RNG)."""
    import timm

    if config.mame_blocks is not None and _family(config.model) == "hierarchical":
        raise ValueError(f"mame_blocks merges inside the blocks of a plain ViT; {config.model} is hierarchical: use "
                         "downsample='mame' to make MaMe its downsampling layer")
    model = timm.create_model(config.model, pretrained=False, **model_arguments(config, num_classes))
    if config.downsample == "mame":
        from mame.downsample import to_mame_downsampling

        if getattr(model, "mame_downsample", None) is None and getattr(model, "downsample_kind", None) != "mame":
            model = to_mame_downsampling(model, tau=config.downsample_tau)
    if config.mame_blocks is not None:
        from timm.models.vision_transformer import VisionTransformer

        if not isinstance(model, VisionTransformer) or not hasattr(model, "blocks"):
            raise ValueError(f"mame_blocks needs a timm VisionTransformer with a list of blocks; {config.model} "
                             f"({type(model).__name__}) has none")
        import mame.patch

        try:
            mame.patch.timm(model, tau=config.tau, layers=list(config.mame_blocks), batch_rule="per_sample",
                            preset="paper", discard_preserved=config.halve,
                            proportional_attention=config.proportional_attention)
        except ValueError as error:
            raise ValueError(f"mame_blocks={list(config.mame_blocks)}: {error}") from error
    return model


def _original_size(config: TrainConfig, num_classes: int, input_size: tuple[int, int, int]
                   ) -> dict[str, Any] | None:
    """Parameters and FLOPs of the same Swin / Iwin with its own downsampling, when ``config`` trains the MaMe
    variant (printed and logged beside the trained model's); None otherwise."""
    import timm

    from mame.downsample import model_size

    name = config.model
    if name.endswith("_mame"):
        name = name[: -len("_mame")]
    elif config.downsample != "mame":
        return None
    kwargs = {key: value for key, value in model_arguments(config, num_classes).items()
              if key not in ("mame_tau", "downsample")}
    size = model_size(timm.create_model(name, pretrained=False, **kwargs), input_size, name)
    return dict(model=name, params=size.params, flops=size.flops)


def input_size_of(model: nn.Module, config: TrainConfig) -> tuple[int, int, int]:
    """(C, H, W) the model takes."""
    embed = getattr(model, "patch_embed", None)
    img_size = getattr(embed, "img_size", None)
    in_chans = config.in_chans or (1 if config.data == FASHION_MNIST else 3)
    if img_size is None:
        size = config.img_size or model.pretrained_cfg.get("input_size", (3, 224, 224))[-1]
        return in_chans, size, size
    return in_chans, int(img_size[0]), int(img_size[1])


# ------------------------------------------------------------------------------------------------- schedule


class WarmupCosine:
    """Learning-rate factor per step: linear from ``warmup_lr`` to ``lr`` over ``warmup`` steps, then cosine to
    ``min_lr`` at ``total`` steps (a picklable object, so `LambdaLR.state_dict` keeps it)."""

    def __init__(self, lr: float, min_lr: float, warmup_lr: float, warmup: int, total: int) -> None:
        self.lr, self.min_lr, self.warmup_lr = lr, min_lr, warmup_lr
        self.warmup, self.total = warmup, max(total, 1)

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            value = self.warmup_lr + (self.lr - self.warmup_lr) * step / self.warmup
        else:
            progress = min(1.0, (step - self.warmup) / max(1, self.total - self.warmup))
            value = self.min_lr + (self.lr - self.min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))
        return value / self.lr


# ---------------------------------------------------------------------------------------------------- checkpoint


def _rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    state = dict(torch=torch.get_rng_state(), python=list(random.getstate()[1]), python_version=random.getstate()[0],
                 python_gauss=random.getstate()[2],
                 numpy=[np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]])
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate((state["python_version"], tuple(state["python"]), state["python_gauss"]))
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _gather_objects(value: Any, dist: Dist) -> list[Any]:
    if not dist.active:
        return [value]
    import torch.distributed as td

    out: list[Any] = [None] * dist.world
    td.all_gather_object(out, value)
    return out


def _save_atomic(payload: dict[str, Any], path: Path) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """A checkpoint written by `train` (weights-only unpickling: tensors, numbers, strings, lists, dicts)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path} (train first, or drop --resume)")
    payload = torch.load(path, map_location="cpu", weights_only=True)
    if payload.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not a mame training checkpoint ({CHECKPOINT_FORMAT})")
    return payload


# ------------------------------------------------------------------------------------------------------ training


@dataclass
class TrainResult:
    """What a run produced.

    Attributes:
        model: the trained model (unwrapped from DDP, still patched when it merges).
        config: the run's settings.
        history: one dict per epoch (train loss/accuracy, eval loss/accuracy, images per second, seconds).
        val_acc: top-1 accuracy (%) on the evaluation set after the last epoch.
        val_loss: the evaluation loss after the last epoch.
        checkpoint: path of ``last.pt``.
        log: path of ``log.jsonl``.
    """

    model: nn.Module
    config: TrainConfig
    history: list[dict[str, Any]]
    val_acc: float
    val_loss: float
    checkpoint: Path
    log: Path


class _Log:
    """JSON lines on rank 0."""

    def __init__(self, path: Path, enabled: bool) -> None:
        self.path, self.enabled = path, enabled

    def write(self, record: dict[str, Any]) -> None:
        if self.enabled:
            with self.path.open("a") as handle:
                handle.write(json.dumps(record, default=str) + "\n")


def _progress(enabled: bool):
    if not enabled:
        return contextlib.nullcontext(None)
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                               TimeRemainingColumn)

    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("{task.fields[status]}"), TimeElapsedColumn(), TimeRemainingColumn())


def evaluate(model: nn.Module, data: TensorImages | FolderImages, batch_size: int, device: torch.device,
             amp: torch.dtype | None, dist: Dist = Dist()) -> tuple[float, float, float]:
    """Top-1 accuracy (%), mean cross-entropy and images per second of ``model`` on ``data`` (all ranks)."""
    was_training = model.training
    model.eval()
    correct = total = 0
    loss_sum = 0.0
    start = time.perf_counter()
    with torch.inference_mode(), _autocast(device, amp):
        for images, labels in data.eval_batches(batch_size, dist):
            images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
            logits = model(images).float()
            loss_sum += float(F.cross_entropy(logits, labels, reduction="sum"))
            correct += int((logits.argmax(-1) == labels).sum())
            total += len(labels)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    correct, total, loss_sum, seconds = _all_reduce_sum([correct, total, loss_sum, seconds], dist, device)
    model.train(was_training)
    return 100.0 * correct / max(total, 1), loss_sum / max(total, 1), total / max(seconds / dist.world, 1e-9)


def _autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def train(config: TrainConfig, console: Any = None) -> TrainResult:
    """Train ``config.model`` from scratch as ``config`` says (one process, or each rank of a torchrun job).

    Raises:
        ValueError: for settings that cannot work (named in the message), before any data is read.
        FileNotFoundError: for ``resume`` without a checkpoint, or Fashion-MNIST not installed.
    """
    from rich.console import Console

    config.check()
    dist = _dist_from_env()
    device = _resolve_device(config, dist)
    amp = _amp_dtype(config, device)
    _init_dist(dist, device)
    if config.threads:
        torch.set_num_threads(config.threads)
    console = console or Console(stderr=True)
    out_dir = Path(config.out_dir)
    if dist.main:
        out_dir.mkdir(parents=True, exist_ok=True)
    checkpoint_path = out_dir / "last.pt"
    log = _Log(out_dir / "log.jsonl", dist.main)

    resumed = None
    if config.resume:
        resumed = load_checkpoint(checkpoint_path if config.resume is True else Path(config.resume))
        _check_resume(config, resumed["config"])

    # The same seed on every rank: identical initial weights (DDP broadcasts rank 0's anyway).
    torch.manual_seed(config.seed)
    random.seed(config.seed)
    np.random.seed(config.seed)
    num_classes = 10 if config.data == FASHION_MNIST else None
    if num_classes is None:
        from torchvision.datasets.folder import find_classes

        if not (Path(config.data) / "train").is_dir():
            raise ValueError(f"data must be {FASHION_MNIST!r} or an ImageFolder root with train/ and val/ class "
                             f"folders; {config.data} has no train/")
        num_classes = len(find_classes(str(Path(config.data) / "train"))[0])
    model = build_model(config, num_classes)
    input_size = input_size_of(model, config)
    data_config = dict(getattr(model, "pretrained_cfg", {}) or {})
    train_set, eval_set = build_data(config, input_size, data_config)
    if len(train_set) < config.batch_size:
        raise ValueError(f"batch_size={config.batch_size} is larger than the training set ({len(train_set)} images)")
    model.to(device)
    params = sum(p.numel() for p in model.parameters())

    import timm.optim

    optimizer = timm.optim.create_optimizer_v2(model, "adamw", lr=config.lr, weight_decay=config.weight_decay)
    steps_per_epoch = len(train_set) // config.batch_size
    total_steps = steps_per_epoch * config.epochs
    schedule = WarmupCosine(config.lr, config.min_lr, config.warmup_lr,
                            round(config.warmup_epochs * steps_per_epoch), total_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    scaler = torch.amp.GradScaler(device.type, enabled=amp is torch.float16)
    mixup = None
    if config.mixup > 0 or config.cutmix > 0:
        from timm.data import Mixup

        mixup = Mixup(mixup_alpha=config.mixup, cutmix_alpha=config.cutmix, label_smoothing=config.label_smoothing,
                      num_classes=num_classes)

    start_epoch, step, history = 0, 0, []
    # After initialisation each rank draws its own randomness (drop-path, dropout, mixup).
    torch.manual_seed(config.seed * 1000 + dist.rank + 1)
    random.seed(config.seed * 1000 + dist.rank + 1)
    np.random.seed(config.seed * 1000 + dist.rank + 1)
    if resumed is not None:
        model.load_state_dict(resumed["model"])
        optimizer.load_state_dict(resumed["optimizer"])
        scheduler.load_state_dict(resumed["scheduler"])
        scaler.load_state_dict(resumed["scaler"])
        start_epoch, step, history = resumed["epoch"], resumed["step"], list(resumed["history"])
        states = resumed["rng"]
        if len(states) == dist.world:
            _set_rng_state(states[dist.rank])
        elif dist.main:
            console.print(f"[yellow]resumed on {dist.world} processes from a {len(states)}-process checkpoint: "
                          "each rank reseeds its own randomness (drop-path, mixup), so the run is not bit-exact[/]")
    net: nn.Module = model
    if dist.active:
        from torch.nn.parallel import DistributedDataParallel

        net = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)

    if resumed is None:
        from mame.downsample import model_size

        flops = model_size(model, input_size).flops if dist.main else None
        original = _original_size(config, num_classes, input_size) if dist.main else None
        log.write(dict(event="start", config=config.to_json(), world_size=dist.world, device=str(device),
                       amp=str(amp).replace("torch.", "") if amp else "off", params=params, flops=flops,
                       original=original, input_size=list(input_size), train_images=len(train_set),
                       eval_images=len(eval_set), steps_per_epoch=steps_per_epoch))
        if original is not None and config.progress:
            console.print(f"MaMe downsampling: {params / 1e6:.2f} M parameters and {flops / 1e9:.3f} GFLOPs per "
                          f"image, against {original['params'] / 1e6:.2f} M and {original['flops'] / 1e9:.3f} "
                          f"GFLOPs for {original['model']} with its own downsampling")
    else:
        log.write(dict(event="resume", epoch=start_epoch, step=step, world_size=dist.world))
    if dist.main and config.progress:
        console.print(f"{config.model}: {params / 1e6:.2f} M parameters, input {'x'.join(map(str, input_size))}, "
                      f"{len(train_set)} training / {len(eval_set)} evaluation images, {dist.world} process(es) on "
                      f"{device}, amp {amp or 'off'}")

    criterion = nn.CrossEntropyLoss(label_smoothing=config.label_smoothing)
    val_acc = val_loss = float("nan")
    with _progress(dist.main and config.progress) as progress:
        task = progress.add_task("train", total=total_steps, completed=step, status="") if progress else None
        for epoch in range(start_epoch, min(config.epochs, config.stop_after or config.epochs)):
            net.train()
            epoch_start = time.perf_counter()
            seen = loss_sum = correct = 0.0
            window_start, window_images = time.perf_counter(), 0
            for images, labels in train_set.train_batches(epoch, config.batch_size, config.seed, dist,
                                                          config.augment):
                images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
                targets = labels
                if mixup is not None:
                    images, targets = mixup(images, labels)
                with _autocast(device, amp):
                    logits = net(images)
                    if mixup is not None:
                        loss = torch.sum(-targets * F.log_softmax(logits.float(), dim=-1), dim=-1).mean()
                    else:
                        loss = criterion(logits.float(), targets)
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                if config.clip_grad is not None:
                    scaler.unscale_(optimizer)
                    torch.nn.utils.clip_grad_norm_(model.parameters(), config.clip_grad)
                scaler.step(optimizer)
                scaler.update()
                scheduler.step()
                step += 1
                local_loss = float(loss.detach())
                local_correct = float((logits.detach().argmax(-1) == labels).sum())
                global_loss, global_correct = _all_reduce_sum([local_loss, local_correct], dist, device)
                global_loss /= dist.world
                seen += config.batch_size
                loss_sum += global_loss * config.batch_size
                correct += global_correct
                window_images += config.batch_size
                if step == 1 or step % config.log_every == 0:
                    elapsed = time.perf_counter() - window_start
                    rate = window_images / max(elapsed, 1e-9)
                    log.write(dict(event="step", epoch=epoch, step=step, loss=global_loss,
                                   lr=optimizer.param_groups[0]["lr"], img_per_s=rate))
                    window_start, window_images = time.perf_counter(), 0
                if progress is not None:
                    progress.update(task, advance=1, status=f"epoch {epoch + 1}/{config.epochs} loss "
                                                            f"{global_loss:.3f}")
            train_seconds = time.perf_counter() - epoch_start
            val_acc, val_loss, eval_rate = evaluate(model, eval_set, config.batch_size, device, amp, dist)
            record = dict(event="epoch", epoch=epoch, step=step, train_loss=loss_sum / max(seen, 1),
                          train_acc=100.0 * correct / max(seen, 1) if mixup is None else None, val_loss=val_loss,
                          val_acc=val_acc, lr=optimizer.param_groups[0]["lr"],
                          train_img_per_s=seen / max(train_seconds, 1e-9), eval_img_per_s=eval_rate,
                          seconds=time.perf_counter() - epoch_start)
            history.append({k: v for k, v in record.items() if k != "event"})
            log.write(record)
            if progress is not None:
                progress.console.print(f"epoch {epoch + 1}: train loss {record['train_loss']:.4f}, val acc "
                                       f"{val_acc:.2f} %, val loss {val_loss:.4f}, {record['train_img_per_s']:.1f} "
                                       "train img/s")
            rng = _gather_objects(_rng_state(), dist)
            if dist.main:
                _save_atomic(dict(format=CHECKPOINT_FORMAT, config=config.to_json(), epoch=epoch + 1, step=step,
                                  model=model.state_dict(), optimizer=optimizer.state_dict(),
                                  scheduler=scheduler.state_dict(), scaler=scaler.state_dict(), rng=rng,
                                  history=history), checkpoint_path)
            if dist.active:
                import torch.distributed as td

                td.barrier()
    if history:
        val_acc, val_loss = history[-1]["val_acc"], history[-1]["val_loss"]
    log.write(dict(event="end", epoch=len(history), step=step, val_acc=val_acc, val_loss=val_loss))
    return TrainResult(model=model, config=config, history=history, val_acc=val_acc, val_loss=val_loss,
                       checkpoint=checkpoint_path, log=out_dir / "log.jsonl")


def _check_resume(config: TrainConfig, saved: dict[str, Any]) -> None:
    current = config.to_json()
    different = sorted(name for name in current if name not in _RUNTIME_FIELDS and current[name] != saved.get(name))
    if different:
        details = ", ".join(f"{name}: {saved.get(name)!r} -> {current[name]!r}" for name in different)
        raise ValueError(f"resume needs the settings the checkpoint was trained with; these differ: {details}")


def close(together: bool = True) -> None:
    """Tear down the process group (torchrun jobs), if one is open.

    ``together``: wait at a barrier first, so that no process closes its gloo connections while a peer still uses
    them (a peer that closes first can abort the other at exit with "terminate called without an active
    exception"). Off on an error path, where the other processes may never reach the barrier."""
    import torch.distributed as td

    if td.is_available() and td.is_initialized():
        if together:
            td.barrier()
        td.destroy_process_group()


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m mame.train ...`` (and ``torchrun ... -m mame.train ...``): the options of ``mame train``."""
    import typer

    from mame.train_cli import train_command

    command = typer.Typer(add_completion=False)
    command.command()(train_command)
    command(list(sys.argv[1:] if argv is None else argv), prog_name="python -m mame.train")


if __name__ == "__main__":
    main()
