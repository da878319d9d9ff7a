"""FLOP budgets: the share of tokens each merging block removes so that a model runs at a target FLOP ratio.

A budget replaces the hand-set τ (beyond the paper: its stated future work). Every merging block removes the same
share of the mergeable tokens that reach it (the geometric token schedule, the one that kept the features closest to
the unmodified model's in ``benchmarks/accuracy_study.md``), and each image gets its own threshold for that share
(`mame.core.budget_threshold`). The token counts then depend only on the input length, never on the pixels, so the
FLOP ratio is known at patch time: it is counted here from the shapes of the blocks' linear layers, the way
`mame.bench.count_flops` counts a forward (2 FLOPs per multiply-accumulate; attention's two products, the merge's
similarity and fusion products; norms and activations are not FLOPs).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from torch import nn


def linear_flops_per_token(module: nn.Module) -> int:
    """FLOPs one token costs in the ``nn.Linear`` layers inside ``module``."""
    return sum(2 * m.in_features * m.out_features for m in module.modules() if isinstance(m, nn.Linear))


@dataclass(frozen=True)
class BlockCost:
    """The FLOPs of one transformer block as a function of its token counts.

    Attributes:
        attention_per_token: FLOPs per token of the attention's linear layers (q, k, v and output projections).
        mlp_per_token: FLOPs per token of the MLP's linear layers.
        width: the attention's inner width (heads x head dim): QK^T and AV cost 4 * L^2 * width.
        metric_width: width of the features the merge compares (the keys: the attention's inner width).
    """

    attention_per_token: int
    mlp_per_token: int
    width: int
    metric_width: int

    def flops(self, tokens_in: float, tokens_out: float, num_special: int, merges: bool) -> float:
        """One block: attention on ``tokens_in``, the merge (similarity of M destinations with N sources and the
        fusion product) when ``merges``, the MLP on ``tokens_out`` (eq 12 merges between the two)."""
        total = self.attention_per_token * tokens_in + 4 * tokens_in ** 2 * self.width
        if merges:
            half = (tokens_in - num_special) / 2
            total += 2 * half * half * (self.metric_width + self.width)
        return total + self.mlp_per_token * tokens_out


def geometric_counts(tokens: int, num_special: int, layers: Sequence[int], depth: int, share: float) -> list[int]:
    """Tokens (special ones included) leaving each of ``depth`` blocks when the blocks in ``layers`` each remove
    ``share`` of the mergeable tokens reaching them (rounded as `mame.blocks.MameMerge.merge_count` rounds; at
    most the sources of the alternating split, half of them rounded up)."""
    counts, mergeable = [], tokens - num_special
    merging = set(layers)
    for index in range(depth):
        if index in merging:
            mergeable -= min(int(round(mergeable * share)), (mergeable + 1) // 2)
        counts.append(num_special + mergeable)
    return counts


def flop_ratio(cost: BlockCost, tokens: int, num_special: int, layers: Sequence[int], depth: int, share: float,
               fixed: float = 0.0) -> float:
    """Unmodified FLOPs / merged FLOPs of ``depth`` equal blocks (plus ``fixed`` FLOPs outside them, the patch
    embedding) at ``share``."""
    base = fixed + depth * cost.flops(tokens, tokens, num_special, merges=False)
    merged, entering = fixed, tokens
    merging = set(layers)
    for index, leaving in enumerate(geometric_counts(tokens, num_special, layers, depth, share)):
        merged += cost.flops(entering, leaving, num_special, merges=index in merging)
        entering = leaving
    return base / merged


def share_for_flops(target: float, cost: BlockCost, tokens: int, num_special: int, layers: Sequence[int],
                    depth: int, fixed: float = 0.0) -> float:
    """The share each merging block removes for a FLOP ratio of ``target`` (bisection; the ratio rises with the
    share). Raises a ValueError naming the reachable range when the target is out of it."""
    if isinstance(target, bool) or not isinstance(target, (int, float)) or not target >= 1.0:
        raise ValueError(f"flops must be a FLOP reduction factor >= 1 (2.0 = half the FLOPs), got {target!r}")
    if not layers:
        raise ValueError("a FLOP budget needs at least one merging block (layers is empty)")
    highest = flop_ratio(cost, tokens, num_special, layers, depth, 0.5, fixed)
    if target > highest:
        raise ValueError(f"flops={target} is out of reach: merging half of the tokens in each of the {len(layers)} "
                         f"merging blocks gives {highest:.2f}x; merge in more blocks or lower the target")
    low, high = 0.0, 0.5
    for _ in range(40):
        middle = (low + high) / 2
        if flop_ratio(cost, tokens, num_special, layers, depth, middle, fixed) < target:
            low = middle
        else:
            high = middle
    return high
