"""ToMe (Bolya et al., "Token Merging: Your ViT but Faster", ICLR 2023), written here for side-by-side runs.

Reproduces the official implementation (facebookresearch/ToMe): bipartite soft matching on the attention keys (mean
over heads) with A = even and B = odd positions of the *whole* sequence, class token included; size-weighted
averaging; proportional attention (log(size) added to the logits through the SDPA bias); at most half of the
unprotected tokens merged per block. Prefix tokens are protected as the official code protects its two: a prefix
token in A (the class token, every second register) never merges, and one in B (the distillation token, the other
registers) receives nothing. It runs inside the same patched block as MaMe, so LayerScale (which the official patch
drops), qk-norm, fused attention and registers are handled.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn

from mame.blocks import Merger, MergeRuntime, TokenState
from mame.patch.base import install
from mame.patch.options import resolve_layers
from mame.patch.timm import TIMM_LAYOUT, PatchedViT, check_model


def bipartite_soft_matching(metric: torch.Tensor, r: int, num_protected: int = 0
                            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ToMe's matching on the whole sequence (B, T, c), as the official code does it: A = even positions, B = odd
    positions, the leading ``num_protected`` tokens included. Protected tokens in A never merge (their rows of
    scores are -inf, as the official code does for the class token) and protected tokens in B receive nothing
    (their columns are -inf, as it does for the distillation token). Each A token proposes its most similar B
    token (cosine); the ``r`` A tokens with the best proposals merge.

    Returns:
        ``(kept_a, merged_a, target_b)``: (B, |A| - r) indices of A tokens that stay (in order; protected ones
        first), (B, r) indices of A tokens that merge and (B, r) the index in B each of them joins.
    """
    metric = metric.detach()  # the matching is discrete: no gradient flows through it
    metric = metric / metric.norm(dim=-1, keepdim=True)
    scores = metric[:, ::2] @ metric[:, 1::2].transpose(-1, -2)
    scores[:, : (num_protected + 1) // 2] = -math.inf  # protected tokens at even positions: never sources
    scores[:, :, : num_protected // 2] = -math.inf  # protected tokens at odd positions: never destinations
    best_score, best_b = scores.max(dim=-1)
    order = best_score.argsort(dim=-1, descending=True)
    merged_a, kept_a = order[:, :r], order[:, r:]
    return kept_a.sort(dim=-1).values, merged_a, best_b.gather(1, merged_a)


def row_index(index: torch.Tensor, channels: int) -> torch.Tensor:
    """(B, K) token indices as the (B, K, channels) index that `gather`/`scatter_add` along dim 1 take."""
    return index.unsqueeze(-1).expand(-1, -1, channels)


def take_rows(t: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """The rows ``index`` (B, K) of each sample of ``t`` (B, L, c)."""
    return t.gather(1, row_index(index, t.shape[-1]))


def sized(x: torch.Tensor, sizes: torch.Tensor) -> torch.Tensor:
    """(B, L, d + 1): each token times its size, then the size, so one sum of rows merges values and sizes."""
    weights = sizes.to(x.dtype).unsqueeze(-1)
    return torch.cat([x * weights, weights], dim=-1)


def unsized(x: torch.Tensor, sizes: torch.Tensor, merged: torch.Tensor, num_special: int
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """``x``'s specials, then the size-weighted means of ``merged`` (sums of `sized` rows); and their sizes."""
    new_sizes = merged[..., -1]
    return (torch.cat([x[:, :num_special], merged[..., :-1] / new_sizes.unsqueeze(-1)], dim=1),
            torch.cat([sizes[:, :num_special], new_sizes.to(sizes.dtype)], dim=1))


def merge_weighted(x: torch.Tensor, sizes: torch.Tensor, metric: torch.Tensor, r: int, num_special: int
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge ``r`` tokens of (B, L, d) ``x`` by size-weighted averaging (official ToMe: at most half of the
    unprotected tokens per step); the ``num_special`` leading tokens take part in the partition but never change.

    Returns ``(x', sizes')`` with layout [specials, kept A tokens, B tokens], each in original order.
    """
    r = min(r, (x.shape[1] - num_special) // 2)
    if r <= 0:
        return x, sizes
    kept_a, merged_a, target_b = bipartite_soft_matching(metric.float(), r, num_special)
    weighted = sized(x, sizes)
    a, b = weighted[:, ::2], weighted[:, 1::2]
    b = b.scatter_add(1, row_index(target_b, b.shape[-1]), take_rows(a, merged_a))
    # Protected tokens come first among the kept A tokens and the B tokens and are unchanged: take them from x.
    merged = torch.cat([take_rows(a, kept_a)[:, (num_special + 1) // 2 :], b[:, num_special // 2 :]], dim=1)
    return unsized(x, sizes, merged, num_special)


@dataclass(frozen=True)
class ToMeMerge:
    """The ToMe step of one block: merge ``r`` tokens using the block's attention keys."""

    r: int
    needs_keys = True

    def __call__(self, x: torch.Tensor, state: TokenState, keys: torch.Tensor | None) -> torch.Tensor:
        if state.mask is not None:
            raise ValueError("ToMe merges the same number of tokens in every sample and cannot follow padding")
        x, sizes = merge_weighted(x, state.ones_sizes(x), keys.mean(2), self.r, state.num_special)  # mean of heads
        state.sizes = sizes.detach()  # bookkeeping, see `TokenState.sizes`
        return x


def parse_r(r: int | Sequence[int], depth: int) -> tuple[int, ...]:
    """``r`` tokens merged in every block (int) or one value per block."""
    values = (r,) * depth if isinstance(r, int) else tuple(r)
    if len(values) != depth or any(not isinstance(v, int) or v < 0 for v in values):
        raise ValueError(f"r must be a non-negative int or one per block ({depth}), got {r!r}")
    return values


def patch_timm(model: nn.Module, r: int | Sequence[int] = 16, *, proportional_attention: bool = True,
               layers: int | Sequence[int] | None = None) -> nn.Module:
    """Apply ToMe in place to a timm VisionTransformer: ``r`` tokens merged in each block (all blocks by default).

    Args:
        model: a timm ``VisionTransformer``.
        r: tokens merged per block, an int or one per block of the model.
        proportional_attention: add log(size) to attention logits (ToMe's default).
        layers: restrict merging to these blocks (int = first K); default all.
    """
    check_model(model)
    depth = len(model.blocks)
    indices = resolve_layers(depth if layers is None else layers, depth)
    rs = parse_r(r, depth)
    mergers = {i: ToMeMerge(rs[i]) for i in indices if rs[i] > 0}
    settings = dict(method="tome", r=rs, layers=indices, proportional_attention=proportional_attention)
    return install_timm(model, mergers, settings, proportional_attention)


def install_timm(model: nn.Module, mergers: dict[int, Merger], settings: dict, proportional_attention: bool
                 ) -> nn.Module:
    """Install a baseline's ``mergers`` (block index -> merger) on a checked timm ViT, with ``settings`` (their
    ``method`` and options, ``layers`` included) kept at ``model.mame.settings``."""
    runtime = MergeRuntime(settings=settings, layers=settings["layers"], num_special=model.num_prefix_tokens)
    return install(model, list(model.blocks), TIMM_LAYOUT, mergers, runtime, proportional_attention, PatchedViT)
