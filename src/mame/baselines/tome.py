"""ToMe (Bolya et al., "Token Merging: Your ViT but Faster", ICLR 2023), written here for side-by-side runs.

Bipartite soft matching on the attention keys (mean over heads), size-weighted averaging and proportional attention
(log(size) added to the logits through the SDPA bias), as the ToMe paper describes. It runs inside the same patched
block as MaMe, so LayerScale, qk-norm, fused attention and register tokens are handled (the original ToMe patch
silently drops LayerScale and protects only the class token). All special tokens are kept out of the matching.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn

from mame.blocks import MergeRuntime, TokenState
from mame.patch.base import install
from mame.patch.timm import TIMM_LAYOUT, PatchedViT, check_model, resolve_layers


def bipartite_soft_matching(metric: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ToMe's matching on (B, T, c) non-special tokens: A = even positions, B = odd positions.

    Each A token proposes its most similar B token (cosine); the ``r`` A tokens with the best proposals merge.

    Returns:
        ``(kept_a, merged_a, target_b)``: (B, |A| - r) indices of A tokens that stay, (B, r) indices of A tokens
        that merge and (B, r) the index in B each of them joins.
    """
    metric = metric / metric.norm(dim=-1, keepdim=True)
    scores = metric[:, ::2] @ metric[:, 1::2].transpose(-1, -2)
    best_score, best_b = scores.max(dim=-1)
    order = best_score.argsort(dim=-1, descending=True)
    merged_a, kept_a = order[:, :r], order[:, r:]
    return kept_a.sort(dim=-1).values, merged_a, best_b.gather(1, merged_a)


def merge_weighted(x: torch.Tensor, sizes: torch.Tensor, metric: torch.Tensor, r: int, num_special: int
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge ``r`` tokens of (B, L, d) ``x`` by size-weighted averaging; specials stay first and untouched.

    Returns ``(x', sizes')`` with layout [specials, kept A tokens (original order), B tokens (original order)].
    """
    special, tokens = x[:, :num_special], x[:, num_special:]
    r = min(r, tokens.shape[1] // 2)
    if r <= 0:
        return x, sizes
    kept_a, merged_a, target_b = bipartite_soft_matching(metric[:, num_special:].float(), r)
    weights = sizes[:, num_special:].to(x.dtype).unsqueeze(-1)
    weighted = torch.cat([tokens * weights, weights], dim=-1)  # merge values and sizes in one pass
    a, b = weighted[:, ::2], weighted[:, 1::2]
    channels = weighted.shape[-1]
    kept = a.gather(1, kept_a.unsqueeze(-1).expand(-1, -1, channels))
    moving = a.gather(1, merged_a.unsqueeze(-1).expand(-1, -1, channels))
    b = b.scatter_add(1, target_b.unsqueeze(-1).expand(-1, -1, channels), moving)
    merged = torch.cat([kept, b], dim=1)
    new_sizes = merged[..., -1]
    merged_x = merged[..., :-1] / new_sizes.unsqueeze(-1)
    return (torch.cat([special, merged_x], dim=1),
            torch.cat([sizes[:, :num_special], new_sizes.to(sizes.dtype)], dim=1))


@dataclass(frozen=True)
class ToMeMerge:
    """The ToMe step of one block: merge ``r`` tokens using the block's attention keys."""

    r: int
    needs_keys = True

    def __call__(self, x: torch.Tensor, state: TokenState, keys: torch.Tensor | None) -> torch.Tensor:
        if state.mask is not None:
            raise ValueError("ToMe merges the same number of tokens in every sample and cannot follow padding")
        x, sizes = merge_weighted(x, state.ones_sizes(x), keys, self.r, state.num_special)
        state.sizes = sizes.detach()  # bookkeeping, see `TokenState.sizes`
        return x


@dataclass
class _KeyCapture:
    """Forward hook on ``attn.qkv`` that hands the keys, averaged over heads, to the running forward's state (never
    to the shared block, which concurrent forwards would overwrite).

    An object rather than a closure, so that a deep copy of a patched model writes into its own runtime."""

    runtime: MergeRuntime
    heads: int
    head_dim: int

    def __call__(self, module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        batch, tokens, _ = output.shape
        self.runtime.state.keys = output.view(batch, tokens, 3, self.heads, self.head_dim)[:, :, 1].mean(2)


def _capture_keys(block: nn.Module) -> torch.utils.hooks.RemovableHandle:
    """Make the block's attention hand its keys to the running forward (ToMe's metric)."""
    attn = block.attn
    return attn.qkv.register_forward_hook(_KeyCapture(block._mame_runtime, attn.num_heads, attn.head_dim))


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
    runtime = MergeRuntime(settings=settings, layers=indices, num_special=model.num_prefix_tokens)
    return install(model, list(model.blocks), TIMM_LAYOUT, mergers, runtime, proportional_attention, PatchedViT,
                   key_hook=_capture_keys)
