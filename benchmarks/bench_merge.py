"""Cost of one MaMe merge relative to one transformer block (target: at most 5 %).

Times ``mame.merge`` (argument checks included), ``mame.merge(check=False)`` that patched blocks
call, and the per-sample batch rule against one forward of a timm ViT block on the same tokens, in one process with
interleaved pairs (`mame.bench.paired_speedup`). Random tokens are almost never similar enough to merge, so the same
is measured on a smooth (low-frequency) random field where neighbouring tokens are alike, as in real images.

    python benchmarks/bench_merge.py --batch 32 --tokens 257 --dim 384 --threads 2 --tau 0.8 --pairs 9
"""

from __future__ import annotations

import argparse
import math
from typing import Callable

import torch
import torch.nn.functional as F
from rich.console import Console
from timm.models.vision_transformer import Block

import mame
from mame.bench import paired_speedup, report_load


def random_tokens(batch: int, tokens: int, dim: int, generator: torch.Generator) -> torch.Tensor:
    """I.i.d. Gaussian tokens: cosine similarities near 0, so almost nothing merges."""
    return torch.randn(batch, tokens, dim, generator=generator)


def smooth_tokens(batch: int, tokens: int, dim: int, num_special: int, generator: torch.Generator,
                  noise: float = 0.2) -> torch.Tensor:
    """Specials followed by a square grid of tokens that vary slowly in space (a 4x4 field upsampled bicubically,
    plus a little noise), so that neighbouring tokens are similar as patches of a real image are."""
    side = math.isqrt(tokens - num_special)
    if side * side != tokens - num_special:
        raise ValueError(f"tokens - num_special must be a square grid, got {tokens - num_special}")
    coarse = torch.randn(batch, dim, 4, 4, generator=generator)
    field = F.interpolate(coarse, size=(side, side), mode="bicubic", align_corners=False).flatten(2).transpose(1, 2)
    field = field + noise * torch.randn(field.shape, generator=generator)
    special = torch.randn(batch, num_special, dim, generator=generator)
    return torch.cat([special, field], dim=1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=257, help="tokens per sample, specials included")
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--heads", type=int, default=6)
    parser.add_argument("--num-special", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tau", type=float, default=0.8)
    parser.add_argument("--pairs", type=int, default=9)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--min-time", type=float, default=0.2, help="shortest timed sample, seconds")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    block = Block(dim=args.dim, num_heads=args.heads).eval()
    generator = torch.Generator().manual_seed(args.seed)
    inputs = {
        "random": random_tokens(args.batch, args.tokens, args.dim, generator),
        "smooth": smooth_tokens(args.batch, args.tokens, args.dim, args.num_special, generator),
    }
    tau, special = args.tau, args.num_special
    merges: dict[str, Callable[[torch.Tensor], tuple[torch.Tensor, mame.FusionPlan]]] = {
        "mame.merge": lambda x: mame.merge(x, tau=tau, num_special=special),
        "merge(check=False)": lambda x: mame.merge(x, tau, special, check=False),
        "merge(check=False) per_sample": lambda x: mame.merge(x, tau, special, batch_rule="per_sample", check=False),
    }
    report_load(Console(), torch.get_num_threads())
    print(f"x: ({args.batch}, {args.tokens}, {args.dim}) float32, CPU, {torch.get_num_threads()} threads, "
          f"tau={tau}, {args.pairs} pairs, torch {torch.__version__}")
    with torch.inference_mode():
        for input_name, x in inputs.items():
            print(f"\n{input_name} tokens")
            for merge_name, merge in merges.items():
                _, plan = merge(x)
                kept = plan.lengths.float().mean().item()
                speed = paired_speedup(lambda: block(x), lambda: merge(x), pairs=args.pairs, warmup=args.warmup,
                                       min_time=args.min_time)
                # The speed ratio is block/merge; its reciprocal is the merge's share of a block.
                print(f"  {merge_name:<27} tokens {args.tokens} -> {kept:6.1f}   block {speed.baseline_s * 1e3:7.2f} ms"
                      f"   merge {speed.method_s * 1e3:6.2f} ms   merge/block {100 / speed.ratio:5.2f} % "
                      f"({100 / speed.ratio_high:.2f}–{100 / speed.ratio_low:.2f})")


if __name__ == "__main__":
    main()
