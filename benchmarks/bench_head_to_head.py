"""MaMe's default against ToMe head to head at equal FLOPs: the two patched models timed against each other in
interleaved pairs (`mame.bench.paired_speedup`), one photo at a time or in a batch, on the real DINOv2-S/14.

`mame bench` times every variant against the unmodified model, one variant after another, so a load change on a
shared machine between two variants moves their ratios apart by several percent. Here each pair runs ToMe, then
MaMe (or the reverse), so drift hits both sides: the ratio says directly which is faster. For each ToMe ``r`` the
MaMe patch takes ToMe's own counted FLOP ratio as its budget (``flops=``), so both do the same arithmetic.
``--merge-free`` also times the two merge-free copies against each other (`mame.bench.merge_free_copy`: the same
token counts with merges that cost nothing), which separates the token schedule's share of the ratio from the cost
of the merges themselves.

    python benchmarks/bench_head_to_head.py --tome-r 16 --tome-r 20 --threads 2 --images 8
    python benchmarks/bench_head_to_head.py --tome-r 16 --batch 32 --threads 2
"""

from __future__ import annotations

import argparse
import copy

import torch
from rich.console import Console
from rich.progress import track
from rich.table import Table

import mame
from mame import data
from mame.baselines import tome
from mame.bench import count_flops, merge_free_copy, paired_speedup, report_load
from mame.models import load


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tome-r", type=int, action="append", help="ToMe r values (repeat the option)")
    parser.add_argument("--tome-even", type=int, action="append", default=[],
                        help="ToMe with r merged in every other block (0, 2, ...) only (repeat the option)")
    parser.add_argument("--mame-layers", type=lambda s: [int(i) for i in s.split(",")], default=None,
                        help="blocks MaMe merges in, comma list (default: the patch's default)")
    parser.add_argument("--images", type=int, default=8, help="bundled photos, run one at a time (without --batch)")
    parser.add_argument("--batch", type=int, default=0, help="run the photos as one batch of this size instead")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--pairs", type=int, default=9)
    parser.add_argument("--min-time", type=float, default=0.3, help="shortest timed sample, seconds")
    parser.add_argument("--merge-free", action="store_true", help="also time the merge-free copies head to head")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    console = Console()
    report_load(console, args.threads)

    model = load()
    photos = [image for _, image in data.sample_photos()]
    count = args.batch or args.images
    images = data.preprocess([photos[i % len(photos)] for i in range(count)], model=model)
    inputs = [images] if args.batch else list(images.split(1))

    def run(patched: torch.nn.Module):
        def call() -> None:
            for x in inputs:
                patched(x)
        return call

    baseline_flops = count_flops(model, images[:1])
    shape = f"batch {count}" if args.batch else f"{count} photos one at a time"
    where = "default" if args.mame_layers is None else f"in blocks {','.join(map(str, args.mame_layers))}"
    table = Table(title=f"MaMe {where} vs ToMe at equal FLOPs, {shape}, {args.threads} threads")
    columns = ["ToMe", "ToMe FLOP ratio", "MaMe FLOP ratio", "ToMe time / MaMe time (min-max)"]
    for column in columns + (["merges free: ToMe / MaMe"] if args.merge_free else []):
        table.add_column(column)
    with torch.inference_mode():
        depth = len(model.blocks)
        schedules = [(f"r={r}", r) for r in args.tome_r or ([] if args.tome_even else [16])]
        schedules += [(f"r={r} in even blocks", [r if i % 2 == 0 else 0 for i in range(depth)]) for r in args.tome_even]
        mame_options = {} if args.mame_layers is None else {"layers": args.mame_layers}
        for name, r in track(schedules, description="pairs", console=console):
            tome_model = tome.patch_timm(copy.deepcopy(model), r=r)
            tome_ratio = baseline_flops / count_flops(tome_model, images[:1])
            mame_model = mame.patch.timm(copy.deepcopy(model), flops=tome_ratio, **mame_options)
            mame_ratio = baseline_flops / count_flops(mame_model, images[:1])
            timed = [(run(tome_model), run(mame_model))]
            if args.merge_free:
                timed.append(tuple(run(merge_free_copy(patched, run(patched))) for patched in (tome_model, mame_model)))
            cells = []
            for tome_call, mame_call in timed:
                result = paired_speedup(tome_call, mame_call, pairs=args.pairs, min_time=args.min_time)
                cells.append(f"{result.ratio:.3f} ({result.ratio_low:.3f}-{result.ratio_high:.3f}, "
                             f"{result.pairs} pairs)")
            table.add_row(name, f"{tome_ratio:.3f}x", f"{mame_ratio:.3f}x", *cells)
    console.print(table)
    console.print("A ratio above 1: MaMe is faster than ToMe at the same FLOPs.")


if __name__ == "__main__":
    main()
