"""Table 2 of the paper on this machine: training from scratch with MaMe inside, on real Fashion-MNIST.

Three pairs, each trained the same way (same seed, data order, augmentation, schedule) with and without MaMe:

- ViT-T shape (12 blocks, width 192, 3 heads; 28x28 grayscale, patch 4 = 49 patches + the class token) without
  merging vs MaMe at blocks 3, 6, 9 (0-based 2, 5, 8; τ = 0.5, the 2:1 rule: 50 -> 25 -> 13 -> 7 tokens);
- a small Swin (width 64, depths 2-2-6-2, heads 2-4-8-16, window 7, patch 2: maps 14, 7, 4, 2) with its patch
  merging (width 64 -> 512) vs MaMe downsampling at constant width 64 (τ = 0.5);
- a small Iwin (`mame.iwin`, the same shape) with its convolutional downsampling vs MaMe downsampling.

Then, in one process, for each pair: test accuracy, parameters, FLOPs of one image (2 per multiply-accumulate,
attention and the merges' own matmuls counted), and the inference throughput ratio of the MaMe model over its
baseline from interleaved pairs (`mame.bench.paired_speedup`, eval mode, fp32, batch 64 test images; the paper times
batch 64 fp32 on an A100). The load average is recorded with the timings: they mean little above ~0.5 per thread.

    nice -n 19 python benchmarks/bench_train.py --phase train     # the six training runs (checkpoints kept)
    nice -n 19 python benchmarks/bench_train.py --phase measure --no-speed   # accuracy, sizes (any time)
    python benchmarks/bench_train.py --phase speed                # on a quiet machine: the speed ratios only
    python benchmarks/bench_train.py                              # all of it

Results: one JSON line per pair in ``benchmarks/results/train.jsonl`` (``--out``), runs under ``runs/bench_train``.
The schedule is cut to fit a shared 2-core CPU (``--train-samples`` images, ``--epochs`` passes); the paper trains
300 epochs on ImageNet-1k, so only the ratios and the direction of the accuracy change compare.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from mame import bench
from mame.downsample import model_size
from mame.train import TrainConfig, build_model, fashion_mnist_data, load_checkpoint, train

console = Console(width=None if Console().is_terminal else 150)

SPEED_KEYS = ("speedup", "speedup_min", "speedup_max", "speed_pairs", "speed_batch", "base_s", "mame_s",
              "load_average_1min", "load_after", "threads", "speed_date")
SMALL_HIERARCHY = dict(embed_dim=64, depths=[2, 2, 6, 2], num_heads=[2, 4, 8, 16], window_size=7)
# The paper's Table 2 (ImageNet-1k, A100, batch 64, fp32): (params M, GFLOPs, img/s, top-1) without / with MaMe.
PAPER = {
    "vit": dict(model="ViT-T", base=(5.72, 1.3, 2291, 72.2), mame=(5.72, 0.6, 4462, 70.9)),
    "swin": dict(model="Swin-T", base=(29.0, 4.5, 950, 81.3), mame=(1.45, 1.5, 1236, 60.3)),
    "iwin": dict(model="Iwin-T", base=(30.2, 4.7, 874, 82.0), mame=(1.46, 1.5, 1522, 65.1)),
}


@dataclass(frozen=True)
class Pair:
    key: str
    title: str
    base: TrainConfig
    mame: TrainConfig


def pairs(args: argparse.Namespace) -> list[Pair]:
    common = dict(data="fashion-mnist", epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, min_lr=1e-5,
                  warmup_lr=1e-6, warmup_epochs=args.warmup_epochs, weight_decay=0.05, label_smoothing=0.1,
                  clip_grad=5.0, drop_path=0.0, train_samples=args.train_samples, eval_samples=args.eval_samples,
                  seed=args.seed, log_every=20, progress=True, workers=0)
    root = Path(args.runs)
    vit = TrainConfig(model="vit_tiny_patch16_224", patch_size=4, **common)
    swin = TrainConfig(model="swin_tiny_patch4_window7_224", patch_size=2, model_kwargs=SMALL_HIERARCHY, **common)
    iwin = TrainConfig(model="iwin_tiny_patch4_window7_224", patch_size=2, model_kwargs=SMALL_HIERARCHY, **common)
    out = [
        Pair("vit", "ViT-T shape, 12 blocks; MaMe at blocks 3, 6, 9 (τ=0.5, 2:1)",
             replace(vit, out_dir=root / "vit"), replace(vit, mame_blocks=(2, 5, 8), tau=0.5, halve=True,
                                                         out_dir=root / "vit_mame")),
        Pair("swin", "Swin (64 wide, 2-2-6-2); MaMe downsampling (τ=0.5, constant width)",
             replace(swin, out_dir=root / "swin"), replace(swin, downsample="mame", downsample_tau=0.5,
                                                           out_dir=root / "swin_mame")),
        Pair("iwin", "Iwin (64 wide, 2-2-6-2); MaMe downsampling (τ=0.5, constant width)",
             replace(iwin, out_dir=root / "iwin"), replace(iwin, downsample="mame", downsample_tau=0.5,
                                                           out_dir=root / "iwin_mame")),
    ]
    return [pair for pair in out if pair.key in args.only]


def run_training(pair: Pair, force: bool) -> None:
    for config in (pair.base, pair.mame):
        done = Path(config.out_dir) / "last.pt"
        if done.is_file() and not force:
            saved = load_checkpoint(done)
            if saved["epoch"] >= config.epochs and saved["config"]["train_samples"] == config.train_samples:
                console.print(f"{config.out_dir}: trained already, skipping (--force retrains)")
                continue
        for stale in ("last.pt", "log.jsonl"):
            (Path(config.out_dir) / stale).unlink(missing_ok=True)
        start = time.perf_counter()
        train(config, console=console)
        console.print(f"{config.out_dir}: {time.perf_counter() - start:.0f} s")


def _trained(config: TrainConfig) -> tuple[torch.nn.Module, dict]:
    saved = load_checkpoint(Path(config.out_dir) / "last.pt")
    torch.manual_seed(config.seed)
    model = build_model(config, 10)
    model.load_state_dict(saved["model"])
    return model.eval(), saved


def _train_seconds(config: TrainConfig) -> float:
    lines = [json.loads(line) for line in (Path(config.out_dir) / "log.jsonl").read_text().splitlines()]
    return sum(line["seconds"] for line in lines if line.get("event") == "epoch")


def speed(models: tuple, x: torch.Tensor, args: argparse.Namespace) -> dict:
    """The paired inference speed ratio of models[1] over models[0] on ``x``, with the load around it."""
    load = bench.report_load(console, torch.get_num_threads())
    with torch.inference_mode():
        result = bench.paired_speedup(lambda: models[0](x), lambda: models[1](x), pairs=args.pairs, warmup=2,
                                      min_time=args.min_time)
    return dict(speedup=result.ratio, speedup_min=result.ratio_low, speedup_max=result.ratio_high,
                speed_pairs=result.pairs, speed_batch=int(x.shape[0]), base_s=result.baseline_s,
                mame_s=result.method_s, load_average_1min=load, load_after=bench.load_average(),
                threads=torch.get_num_threads(), speed_date=time.strftime("%Y-%m-%d %H:%M"))


def speed_batch(args: argparse.Namespace, test: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    from mame.train import Dist, TensorImages

    batch = TensorImages(test[:args.speed_batch], labels[:args.speed_batch], mean=args.stats[0], std=args.stats[1],
                         num_classes=10, shift=0)
    return next(batch.eval_batches(args.speed_batch, Dist()))[0]


def measure(pair: Pair, args: argparse.Namespace, test: torch.Tensor, labels: torch.Tensor) -> dict:
    from mame.train import Dist, TensorImages, evaluate

    models, saved = zip(*(_trained(config) for config in (pair.base, pair.mame)))
    sizes = [model_size(model, (1, 28, 28)) for model in models]
    accuracy = []
    for model in models:
        data = TensorImages(test, labels, mean=args.stats[0], std=args.stats[1], num_classes=10, shift=0)
        accuracy.append(evaluate(model, data, 256, torch.device("cpu"), None, Dist())[0])
    x = speed_batch(args, test, labels)
    timing = speed(models, x, args) if args.speed else dict(speedup=None)
    tokens = None
    if pair.key == "vit":
        with torch.inference_mode():
            models[1](x)
        tokens = [int(c) if isinstance(c, int) else float(c.float().mean()) for c in models[1].mame.last_token_counts]
    row = dict(
        pair=pair.key, title=pair.title,
        base=dict(model=pair.base.model, params=sizes[0].params, flops=sizes[0].flops, test_acc=accuracy[0],
                  train_seconds=_train_seconds(pair.base), final_train_loss=saved[0]["history"][-1]["train_loss"]),
        mame=dict(model=pair.mame.model, params=sizes[1].params, flops=sizes[1].flops, test_acc=accuracy[1],
                  train_seconds=_train_seconds(pair.mame), final_train_loss=saved[1]["history"][-1]["train_loss"],
                  settings=dict(mame_blocks=pair.mame.mame_blocks, tau=pair.mame.tau, halve=pair.mame.halve,
                                downsample=pair.mame.downsample, downsample_tau=pair.mame.downsample_tau)),
        tokens_per_block=tokens,
        acc_change=accuracy[1] - accuracy[0], param_ratio=sizes[1].params / sizes[0].params,
        flop_ratio=sizes[1].flops / sizes[0].flops, **timing,
        paper=PAPER[pair.key],
        paper_speedup=PAPER[pair.key]["mame"][2] / PAPER[pair.key]["base"][2],
        paper_flop_ratio=PAPER[pair.key]["mame"][1] / PAPER[pair.key]["base"][1],
        paper_acc_change=PAPER[pair.key]["mame"][3] - PAPER[pair.key]["base"][3],
        schedule=dict(train_samples=pair.base.train_samples, epochs=pair.base.epochs,
                      batch_size=pair.base.batch_size, lr=pair.base.lr, warmup_epochs=pair.base.warmup_epochs,
                      eval_images=len(labels)),
        meta=dict(torch=torch.__version__, dtype="float32", device="cpu", date=time.strftime("%Y-%m-%d %H:%M")),
    )
    return row


def table(rows: list[dict]) -> Table:
    out = Table(title="Training from scratch on Fashion-MNIST: baseline vs MaMe (paper's Table 2 ratios beside)")
    for column in ("pair", "acc base", "acc MaMe", "Δ acc", "params M", "GFLOPs", "FLOP ratio", "speed-up",
                   "paper: Δ acc / FLOP ratio / speed-up"):
        out.add_column(column, justify="left" if column == "pair" else "right")
    for row in rows:
        base, mame = row["base"], row["mame"]
        out.add_row(row["pair"], f"{base['test_acc']:.2f}", f"{mame['test_acc']:.2f}", f"{row['acc_change']:+.2f}",
                    f"{base['params'] / 1e6:.2f} → {mame['params'] / 1e6:.2f}",
                    f"{base['flops'] / 1e9:.3f} → {mame['flops'] / 1e9:.3f}", f"{row['flop_ratio']:.3f}",
                    "not timed" if row.get("speedup") is None else
                    f"{row['speedup']:.2f}x ({row['speedup_min']:.2f}–{row['speedup_max']:.2f}, load "
                    f"{row['load_average_1min']:.2f})",
                    f"{row['paper_acc_change']:+.1f} / {row['paper_flop_ratio']:.2f} / {row['paper_speedup']:.2f}x")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--phase", choices=("train", "measure", "speed", "all"), default="all",
                        help="speed: re-time the pairs of an existing --out file (its other numbers stay)")
    parser.add_argument("--no-speed", dest="speed", action="store_false", help="measure without timing")
    parser.add_argument("--only", default="vit,swin,iwin", help="comma-separated pairs: vit, swin, iwin")
    parser.add_argument("--train-samples", type=int, default=6000, help="training images (seeded subset)")
    parser.add_argument("--eval-samples", type=int, default=1000, help="test images evaluated after each epoch")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--warmup-epochs", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--runs", default="runs/bench_train", help="folder of the runs' checkpoints and logs")
    parser.add_argument("--force", action="store_true", help="retrain runs that are done")
    parser.add_argument("--test-images", type=int, default=10000, help="test images for the final accuracy")
    parser.add_argument("--speed-batch", type=int, default=64)
    parser.add_argument("--pairs", type=int, default=7, help="interleaved timing pairs")
    parser.add_argument("--min-time", type=float, default=0.5, help="seconds per timed sample")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/train.jsonl"))
    args = parser.parse_args()
    args.only = [name.strip() for name in args.only.split(",") if name.strip()]
    chosen = pairs(args)
    if args.phase in ("train", "all"):
        for pair in chosen:
            run_training(pair, args.force)
    if args.phase in ("measure", "speed", "all"):
        train_set, test_set = fashion_mnist_data(args.train_samples, None, args.seed, 28, 1)
        args.stats = (train_set.mean.flatten().tolist(), train_set.std.flatten().tolist())
        test = test_set.images[:args.test_images]
        labels = test_set.labels[:args.test_images]
        previous = ([json.loads(line) for line in args.out.read_text().splitlines()] if args.out.is_file()
                    else [])
        if args.phase == "speed":
            rows = previous or [dict(pair=pair.key) for pair in chosen]
            x = speed_batch(args, test, labels)
            for row in rows:
                pair = next((p for p in chosen if p.key == row["pair"]), None)
                if pair is not None:
                    row.update(speed(tuple(_trained(config)[0] for config in (pair.base, pair.mame)), x, args))
        else:
            rows = [measure(pair, args, test, labels) for pair in chosen]
            if not args.speed:  # keep the timings of an earlier --phase speed
                timed = {row["pair"]: row for row in previous if row.get("speedup") is not None}
                for row in rows:
                    row.update({key: value for key, value in timed.get(row["pair"], {}).items()
                                if key in SPEED_KEYS})
        console.print(table(rows) if all("base" in row for row in rows) else rows)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        with args.out.open("w") as handle:
            for row in rows:
                handle.write(json.dumps(row, default=list) + "\n")
        console.print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
