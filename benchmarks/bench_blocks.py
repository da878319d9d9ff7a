"""Where a merged model's time goes, block by block: the unmodified model against the merge-free copy.

The merge-free copy (`mame.bench.merge_free_copy`) computes on exactly the token counts the real merges produce,
with the merges themselves free. Comparing its per-block time with the unmodified model's shows how much of each
block's FLOP saving the hardware turns into time (speed ratio vs FLOP ratio per block); the whole model's gap between
the merge-free bound and the real speed-up is the merge's own cost.

    python benchmarks/bench_blocks.py --photos 8 --tau 0.8 --threads 2 --repeats 5
"""

from __future__ import annotations

import argparse
import copy
import time
from collections import defaultdict

import torch
from rich.console import Console
from torch import nn

import mame
from mame import data, models
from mame.bench import OneAtATime, count_flops, flop_counter, merge_free_copy, report_load


def time_blocks(model: nn.Module, seconds: dict) -> list:
    """Add each block's wall time (CPU: kernels are synchronous) to ``seconds[index]``; returns the hook handles."""
    handles, start = [], {}
    for index, block in enumerate(model.blocks):
        handles.append(block.register_forward_pre_hook(lambda _m, _a, i=index: start.__setitem__(i, time.perf_counter())))
        handles.append(block.register_forward_hook(
            lambda _m, _a, _o, i=index: seconds.__setitem__(i, seconds[i] + time.perf_counter() - start[i])))
    return handles


def block_flops(model: nn.Module, x: torch.Tensor) -> list[int]:
    """FLOPs of every block over one-at-a-time forwards of ``x`` (a merging block's merge matmuls included)."""
    counter = flop_counter()
    with torch.inference_mode(), counter:
        OneAtATime(model)(x)
    by_module = counter.get_flop_counts()
    return [sum(next(ops for name, ops in by_module.items() if name.endswith(f"blocks.{index}")).values())
            for index in range(len(model.blocks))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--photos", type=int, default=8, help="bundled photos, run one at a time")
    parser.add_argument("--tau", type=float, default=0.8)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5, help="alternating timed runs of each model")
    parser.add_argument("--fit", choices=data.FIT_MODES, default="center_crop", help="how photos become square input")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    model = models.load(progress=False)
    x = data.preprocess([image for _, image in data.sample_photos(args.photos)], model=model, mode=args.fit)
    report_load(Console(), torch.get_num_threads())
    patched = mame.patch.timm(copy.deepcopy(model), tau=args.tau, layers=args.layers)
    real = OneAtATime(patched)
    free_model = merge_free_copy(patched, lambda: real(x))
    with torch.inference_mode():
        real(x)
    counts = real.counts
    flops_base, flops_free = block_flops(model, x), block_flops(free_model, x)

    seconds_base, seconds_free = defaultdict(float), defaultdict(float)
    handles = time_blocks(model, seconds_base) + time_blocks(free_model, seconds_free)
    run_base, run_free = OneAtATime(model), OneAtATime(free_model)
    with torch.inference_mode():
        run_base(x), run_free(x)  # warm-up
        seconds_base.clear(), seconds_free.clear()
        for _ in range(args.repeats):
            run_base(x)
            run_free(x)
    for handle in handles:
        handle.remove()

    calls = args.repeats * len(x)
    print(f"{len(x)} photos one at a time, MaMe tau={args.tau} on the first {args.layers} blocks, "
          f"{torch.get_num_threads()} threads, {args.repeats} alternating repeats; merges made free")
    print("block  tokens out  unmodified ms  merge-free ms  speed ratio  FLOP ratio  share")
    for index in range(len(model.blocks)):
        tokens = sum(c[index] for c in counts) / len(counts)
        ratio = seconds_base[index] / seconds_free[index]
        flop_ratio = flops_base[index] / flops_free[index]
        print(f"{index + 1:5d}  {tokens:10.1f}  {seconds_base[index] / calls * 1e3:13.3f}  "
              f"{seconds_free[index] / calls * 1e3:13.3f}  {ratio:10.2f}x  {flop_ratio:9.2f}x  {ratio / flop_ratio:5.0%}")
    total_base, total_free = sum(seconds_base.values()), sum(seconds_free.values())
    total_flop = count_flops(OneAtATime(model), x) / count_flops(OneAtATime(free_model), x)
    print(f"all blocks: speed ratio {total_base / total_free:.2f}x, whole-model FLOP ratio {total_flop:.2f}x")


if __name__ == "__main__":
    main()
