"""The merges of one real forward replayed alone: MaMe's default against ToMe, one image, interleaved rounds.

One forward of the real DINOv2-S/14 on a bundled photo is run once per method with every merge's inputs captured (the
tokens, their sizes and the attention keys reaching it); then the twelve merges of each method are replayed, with
nothing else around them, in alternating rounds, and the ratio of the two is the median over rounds. This isolates
what a merge costs from the rest of the block (`bench_head_to_head.py` times whole forwards), which one image at a
time on a CPU is mostly the fixed overhead of its small operations. MaMe gets ToMe's own counted FLOP ratio as its
budget unless ``--flops`` is given, as in the head-to-head benchmark.

    python benchmarks/bench_merges_replayed.py --tome-r 20 --threads 2 --rounds 25
    python benchmarks/bench_merges_replayed.py --tome-r 20 --metric keys_mean   # ToMe's metric, for the similarity's share
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from typing import Callable

import torch
from rich.console import Console

import mame
from mame import data
from mame.baselines import tome
from mame.bench import count_flops, report_load
from mame.blocks import MameMerge, TokenState
from mame.models import load

Replay = list[tuple[Callable, torch.Tensor, torch.Tensor | None, torch.Tensor, int]]


def capture(model: torch.nn.Module, merger_type: type, image: torch.Tensor) -> Replay:
    """Every merge call of one forward of ``model`` on ``image``: (merger, tokens, sizes, keys, specials)."""
    calls: Replay = []
    original = merger_type.__call__

    def recording(self, x: torch.Tensor, state: TokenState, keys: torch.Tensor | None) -> torch.Tensor:
        sizes = None if state.sizes is None else state.sizes.clone()
        calls.append((self, x.clone(), sizes, keys.clone(), state.num_special))
        return original(self, x, state, keys)

    merger_type.__call__ = recording
    try:
        with torch.inference_mode():
            model(image)
    finally:
        merger_type.__call__ = original
    return calls


def replay(calls: Replay) -> None:
    for merger, x, sizes, keys, num_special in calls:
        merger(x, TokenState(num_special, sizes=sizes, keep_plans=False), keys)


def seconds_per_replay(calls: Replay, repeats: int) -> float:
    start = time.perf_counter()
    for _ in range(repeats):
        replay(calls)
    return (time.perf_counter() - start) / repeats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tome-r", type=int, default=20, help="ToMe's constant r")
    parser.add_argument("--flops", type=float, default=None, help="MaMe's budget (default: ToMe's counted ratio)")
    parser.add_argument("--metric", choices=["keys", "keys_mean", "x"], default="keys", help="MaMe's similarity metric")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=25)
    parser.add_argument("--repeats", type=int, default=20, help="replays per timed sample")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    console = Console()
    report_load(console, args.threads)

    model = load()
    image = data.preprocess([data.sample_photos()[0][1]], model=model)
    tome_model = tome.patch_timm(copy.deepcopy(model), r=args.tome_r)
    with torch.inference_mode():
        flops = args.flops or count_flops(model, image) / count_flops(tome_model, image)
    mame_model = mame.patch.timm(copy.deepcopy(model), flops=flops, metric=args.metric)
    mame_calls = capture(mame_model, MameMerge, image)
    tome_calls = capture(tome_model, tome.ToMeMerge, image)
    with torch.inference_mode():
        for _ in range(3):
            replay(mame_calls)
            replay(tome_calls)
        mame_times, tome_times = [], []
        for _ in range(args.rounds):
            mame_times.append(seconds_per_replay(mame_calls, args.repeats))
            tome_times.append(seconds_per_replay(tome_calls, args.repeats))
    ratio = statistics.median(m / t for m, t in zip(mame_times, tome_times))
    console.print(f"MaMe flops={flops:.3f} ({args.metric}), {len(mame_calls)} merges: "
                  f"{1e6 * statistics.median(mame_times):.0f} µs per forward; ToMe r={args.tome_r}, "
                  f"{len(tome_calls)} merges: {1e6 * statistics.median(tome_times):.0f} µs; "
                  f"MaMe time / ToMe time {ratio:.3f} (median of {args.rounds} rounds)")


if __name__ == "__main__":
    main()
