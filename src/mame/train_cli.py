"""``mame train`` (and ``python -m mame.train`` / ``torchrun ... -m mame.train``): the options of
`mame.train.TrainConfig` on the command line."""

from __future__ import annotations

import json
from enum import Enum
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console


class Amp(str, Enum):
    """Mixed precision (`mame.train.TrainConfig.amp`)."""

    auto = "auto"
    bf16 = "bf16"
    fp16 = "fp16"
    off = "off"


class Downsample(str, Enum):
    """Downsampling layers to swap in (`mame.train.TrainConfig.downsample`)."""

    mame = "mame"


def _blocks(text: Optional[str]) -> Optional[tuple[int, ...]]:
    if text is None:
        return None
    try:
        return tuple(int(part) for part in text.replace(" ", "").split(",") if part)
    except ValueError:
        raise typer.BadParameter(f"--mame-blocks must be comma-separated block indices such as 2,5,8, got {text!r}")


def _kwargs(text: Optional[str]) -> dict:
    if not text:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise typer.BadParameter(f"--model-kwargs must be a JSON object: {error}")
    if not isinstance(value, dict):
        raise typer.BadParameter(f"--model-kwargs must be a JSON object, got {text!r}")
    return value


def train_command(
    model: str = typer.Option("vit_tiny_patch16_224", help="timm model name: a ViT, a Swin, an Iwin "
                              "(iwin_tiny_patch4_window7_224, ...) or a MaMe-downsampling name (..._mame)"),
    model_kwargs: Optional[str] = typer.Option(None, help="JSON object of extra timm.create_model arguments, e.g. "
                                               "'{\"embed_dim\": 64, \"depths\": [2, 2, 6, 2]}'"),
    data: str = typer.Option("fashion-mnist", help="'fashion-mnist' (Debian's dataset-fashion-mnist) or an "
                             "ImageFolder root with train/ and val/ class folders"),
    img_size: Optional[int] = typer.Option(None, min=1, help="input side (Fashion-MNIST default 28)"),
    patch_size: Optional[int] = typer.Option(None, min=1, help="patch side (Fashion-MNIST default: 4 for ViTs = 49 "
                                             "patches + class token, 2 for Swin/Iwin = a 14x14 map)"),
    in_chans: Optional[int] = typer.Option(None, min=1, help="input channels (Fashion-MNIST default 1)"),
    train_samples: Optional[int] = typer.Option(None, min=1, help="train on a seeded subset of this size"),
    eval_samples: Optional[int] = typer.Option(None, min=1, help="evaluate on a seeded subset of this size"),
    mame_blocks: Optional[str] = typer.Option(None, help="ViT blocks that merge with MaMe, 0-based and "
                                              "comma-separated: '2,5,8' is the paper's blocks 3, 6, 9"),
    tau: float = typer.Option(0.5, help="similarity threshold of the block merges (paper: 0.5)"),
    halve: bool = typer.Option(True, "--halve/--no-halve", help="the 2:1 rule: discard preserved sources so the "
                               "non-class tokens halve at every merge (--no-halve keeps them, eq 10)"),
    proportional_attention: bool = typer.Option(True, "--proportional-attention/--no-proportional-attention",
                                                help="log(size) attention bias for merged tokens"),
    downsample: Optional[Downsample] = typer.Option(None, help="'mame': MaMe as the downsampling of a Swin or Iwin "
                                                    "(constant width)"),
    downsample_tau: float = typer.Option(0.5, help="τ of the MaMe downsampling"),
    epochs: int = typer.Option(10, min=1),
    batch_size: int = typer.Option(128, min=1, help="global batch size (split over the processes)"),
    lr: float = typer.Option(5e-4, help="peak learning rate (Swin recipe: 5e-4 per 512 images of batch)"),
    min_lr: float = typer.Option(5e-6, help="learning rate at the end of the cosine decay"),
    warmup_lr: float = typer.Option(5e-7, help="learning rate at the start of the linear warm-up"),
    warmup_epochs: float = typer.Option(1.0, help="warm-up length in epochs (paper: 20 of 300)"),
    weight_decay: float = typer.Option(0.05),
    label_smoothing: float = typer.Option(0.1),
    clip_grad: float = typer.Option(5.0, help="gradient-norm clip (0: off)"),
    drop_path: Optional[float] = typer.Option(None, help="stochastic depth rate (default: the model's)"),
    mixup: float = typer.Option(0.0, help="mixup alpha (recipe: 0.8)"),
    cutmix: float = typer.Option(0.0, help="cutmix alpha (recipe: 1.0)"),
    augment: bool = typer.Option(True, "--augment/--no-augment", help="train-time augmentation"),
    randaug: Optional[str] = typer.Option(None, help="timm auto-augment for folders, e.g. rand-m9-mstd0.5-inc1"),
    reprob: float = typer.Option(0.0, help="random-erasing probability for folders (recipe: 0.25)"),
    amp: Amp = typer.Option(Amp.auto, help="mixed precision: auto = bf16/fp16 on CUDA, off on CPU"),
    seed: int = typer.Option(0),
    out_dir: Path = typer.Option(Path("runs/train"), help="folder for last.pt and log.jsonl"),
    resume: bool = typer.Option(False, "--resume", help="continue exactly from OUT_DIR/last.pt"),
    resume_from: Optional[Path] = typer.Option(None, help="continue exactly from this checkpoint"),
    device: str = typer.Option("auto", help="auto, cpu or cuda"),
    workers: int = typer.Option(4, min=0, help="data-loader workers (ImageFolder data)"),
    threads: Optional[int] = typer.Option(None, min=1, help="torch CPU threads per process"),
    log_every: int = typer.Option(50, min=1, help="log a step line every this many steps"),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="rich progress bar"),
    stop_after: Optional[int] = typer.Option(None, min=1, help="end after this many epochs in all (the schedule "
                                             "still spans --epochs; --resume continues it)"),
) -> None:
    """Train a model from scratch with MaMe inside: merging in ViT blocks with the 2:1 rule (--mame-blocks) or
    MaMe as the downsampling of Swin / Iwin (--downsample mame); AdamW, warm-up + cosine, a checkpoint per epoch,
    exact --resume, JSON-lines log. Data-parallel: torchrun --nproc_per_node=N -m mame.train (same options)."""
    from mame.train import TrainConfig, close, train

    console = Console(stderr=True)
    config = TrainConfig(
        model=model, model_kwargs=_kwargs(model_kwargs), data=data, img_size=img_size, patch_size=patch_size,
        in_chans=in_chans, train_samples=train_samples, eval_samples=eval_samples, mame_blocks=_blocks(mame_blocks),
        tau=tau, halve=halve, proportional_attention=proportional_attention,
        downsample=downsample.value if downsample else None, downsample_tau=downsample_tau, epochs=epochs,
        batch_size=batch_size, lr=lr, min_lr=min_lr, warmup_lr=warmup_lr, warmup_epochs=warmup_epochs,
        weight_decay=weight_decay, label_smoothing=label_smoothing, clip_grad=clip_grad or None,
        drop_path=drop_path, mixup=mixup, cutmix=cutmix, augment=augment, randaug=randaug, reprob=reprob,
        amp=amp.value, seed=seed, out_dir=out_dir, resume=resume_from or resume, device=device, workers=workers,
        threads=threads, log_every=log_every, progress=progress, stop_after=stop_after)
    try:
        result = train(config, console=console)
    except (ValueError, FileNotFoundError) as error:
        close(together=False)
        console.print(f"[red]error:[/] {error}")
        raise typer.Exit(2)
    close()
    if result.history and (not _is_worker()):
        last = result.history[-1]
        console.print(f"done: val acc {result.val_acc:.2f} %, val loss {result.val_loss:.4f}, "
                      f"{last['train_img_per_s']:.1f} train img/s; checkpoint {result.checkpoint}, log {result.log}")


def _is_worker() -> bool:
    import os

    return int(os.environ.get("RANK", "0")) != 0
