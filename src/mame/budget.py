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

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import nn

from mame.blocks import BlockLayout

# budget(merging block indices, FLOP ratio) -> the share of tokens each of them removes (`install_mame`'s budget).
Budget = Callable[[tuple[int, ...], float], float]


def linear_flops_per_token(module: nn.Module) -> int:
    """FLOPs one token costs in the linear layers inside ``module``: its ``nn.Linear`` layers and the packed q/k/v
    input projections (``in_proj_weight``, run as ``F.linear``) of `nn.MultiheadAttention` and open_clip's
    `Attention`, which are parameters, not ``nn.Linear`` layers."""
    total = 0
    for m in module.modules():
        if isinstance(m, nn.Linear):
            total += 2 * m.in_features * m.out_features
        packed = getattr(m, "in_proj_weight", None)
        if isinstance(packed, torch.Tensor):  # None in an nn.MultiheadAttention with separate q/k/v weights
            total += 2 * packed.numel()
    return total


def embedding_flops(projection: nn.Module | None, patches: int) -> int:
    """FLOPs of a patch embedding that makes ``patches`` tokens: a convolution (2D; VideoMAE's 3D tubelets) or a
    linear layer on flattened patches (SigLIP2). Anything else (none, an identity) costs no FLOPs."""
    if isinstance(projection, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        per_patch = projection.in_channels * projection.out_channels * math.prod(projection.kernel_size)
        return 2 * patches * per_patch // projection.groups
    if isinstance(projection, nn.Linear):
        return 2 * patches * projection.in_features * projection.out_features
    return 0


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
        """One block: attention on ``tokens_in``, the merge when ``merges`` (similarity of the M destinations with
        the N sources, and eq 9's product, which reads only the ``tokens_in - tokens_out`` fused sources: a budget's
        plan is built from their columns, `mame.core._chosen_columns_plan`), the MLP on ``tokens_out`` (eq 12 merges
        between the two)."""
        total = self.attention_per_token * tokens_in + 4 * tokens_in ** 2 * self.width
        if merges:
            half = (tokens_in - num_special) / 2
            total += 2 * half * (half * self.metric_width + (tokens_in - tokens_out) * self.width)
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


def block_budget(block: nn.Module, layout: BlockLayout, *, dim: int, width: int, metric: str, patches: int,
                 num_special: int, depth: int, embedding: nn.Module | None) -> Budget:
    """The ``budget`` of `mame.patch.options.install_mame` for any family: the share of tokens each merging block
    removes for a FLOP ratio of ``flops`` at the model's nominal input size, counted from the family's own modules.

    Args:
        block: one of the model's blocks, all of which are alike; ``layout`` says where its attention and MLP are
            (the FLOPs of their linear layers, `linear_flops_per_token`).
        dim: the token width (what ``metric="x"`` compares).
        width: the attention's inner width, heads x head dim (what the keys are).
        metric: the merge metric (`mame.blocks.METRICS`): its width is part of the merge's cost.
        patches: the patch tokens at the nominal input size (the config's image size over its patch size, VideoMAE's
            frames over its tubelet size times that); ``num_special`` special tokens come on top.
        depth: the model's number of blocks.
        embedding: the patch projection, a cost the merges leave as it is (`embedding_flops`).
    """
    attention = layout.part(block, layout.attn)
    mlp = sum(linear_flops_per_token(layout.part(block, name)) for name in layout.mlp_paths)
    metric_width = {"x": dim, "keys_mean": width // layout.attention.heads(attention)}.get(metric, width)
    cost = BlockCost(linear_flops_per_token(attention), mlp, width, metric_width)
    fixed = embedding_flops(embedding, patches)

    def budget(layers: tuple[int, ...], flops: float) -> float:
        return share_for_flops(flops, cost, patches + num_special, num_special, layers, depth, fixed)

    return budget
