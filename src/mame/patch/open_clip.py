"""MaMe for open_clip's `VisionTransformer` (the image tower of `CLIP`, `CustomTextCLIP` and `CoCa`), described for
the shared patched block (`mame.blocks.block_forward`); no open_clip forward is copied.

Two block kinds are described: `ResidualAttentionBlock` (``ln_1``, an `nn.MultiheadAttention` with packed
``in_proj_weight``, ``ls_1``, ``ln_2``, ``mlp``, ``ls_2``) and `CustomResidualAttentionBlock` (open_clip's own
`Attention`, with optional qk-norm, per-head output scale, inner and post-attention LayerNorms). The blocks must run
batch-first, (B, L, d), as open_clip >= 2.24 runs its towers. The class token never merges. Pools: ``'tok'`` reads
the class token; ``'avg'`` weighs every patch token by the patches it stands for (padding weighs 0); attention pools
(``attentional_pool``: CoCa's, ``'parallel'``, ``'cascade'``) get log(size) on their keys, -inf on padding;
``'none'`` returns all merged tokens. The tokens returned with ``output_tokens=True`` are the merged, per-sample
padded ones (``model.mame.state.mask`` marks the real ones): ``model.mame.unmerge`` maps them back to the patch grid
once the class token is put in front (for ``'tok'``/``'avg'``, e.g. ``unmerge(F.pad(tokens, (0, 0, 1, 0)))[:, 1:]``).
Patch dropout (training) drops patches before the blocks, which then merge the patches kept. The text tower is
never patched. Refused: scaled cosine attention, non-batch-first towers, ``forward_intermediates``.
"""

from __future__ import annotations

import math
from operator import attrgetter
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from mame.attention import AttentionLayout
from mame.blocks import BlockLayout
from mame.budget import block_budget
from mame.patch.base import ScopedForward, set_attributes, swap_class, unpatch
from mame.patch.hf import SizeAwarePooling
from mame.patch.options import install_mame, resolve_preset


def _qkv(attn: nn.Module, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Packed input projection (both attention kinds): rows q, k, v, each heads x head_dim."""
    qkv = F.linear(h, attn.in_proj_weight, attn.in_proj_bias)
    return qkv.unflatten(-1, (3, attn.num_heads, attn.head_dim)).unbind(-3)


def _no_qk_norm(attn: nn.Module, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return q, k


def _ln_qk(attn: nn.Module, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return attn.ln_q(q), attn.ln_k(k)  # Identity unless qk_norm


def _scale(attn: nn.Module) -> float:
    return attn.head_dim ** -0.5


def _mha_output(attn: nn.Module, out: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    return attn.out_proj(out)


def _attention_output(attn: nn.Module, out: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    if attn.head_scale is not None:  # scale_heads: one factor per head
        out = (out.unflatten(-1, (attn.num_heads, attn.head_dim)) * attn.head_scale.view(-1, 1)).flatten(-2)
    return attn.out_drop(attn.out_proj(attn.ln_inner(out)))


def _attn_drop(attn: nn.Module) -> float:
    return attn.attn_drop.p


MHA_ATTENTION = AttentionLayout(qkv=_qkv, qk_norm=_no_qk_norm, output=_mha_output, scale=_scale,
                                dropout=attrgetter("dropout"), heads=attrgetter("num_heads"))
OPEN_CLIP_ATTENTION = AttentionLayout(qkv=_qkv, qk_norm=_ln_qk, output=_attention_output, scale=_scale,
                                      dropout=_attn_drop, heads=attrgetter("num_heads"))
RESIDUAL_LAYOUT = BlockLayout(attention=MHA_ATTENTION, norm1="ln_1", attn="attn", ls1="ls_1", drop_path1=None,
                              norm2="ln_2", mlp="mlp", ls2="ls_2", drop_path2=None)
# The custom block runs ls_1(ln_attn(attn(...))): the two slots the attention branch applies in order.
CUSTOM_LAYOUT = BlockLayout(attention=OPEN_CLIP_ATTENTION, norm1="ln_1", attn="attn", ls1="ln_attn",
                            drop_path1="ls_1", norm2="ln_2", mlp="mlp", ls2="ls_2", drop_path2=None)


class PatchedVisionTransformer(ScopedForward):
    """Mixin for open_clip's `VisionTransformer`: per-forward state around ``forward``, size-weighted 'avg' pool."""

    def _global_pool(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        state = self.mame.state
        if (self.pool_type != "avg" or self.attn_pool is not None or state is None or state.sizes is None
                or tuple(state.sizes.shape) != tuple(x.shape[:2])):
            return super()._global_pool(x)
        tokens, weights = x[:, 1:], state.sizes[:, 1:, None].to(x.dtype)  # padding has size 0
        return (tokens * weights).sum(1) / weights.sum(1), tokens

    def forward_intermediates(self, *args, **kwargs):
        raise ValueError("forward_intermediates is not supported on a mame-patched open_clip VisionTransformer "
                         "(merged tokens no longer fill the patch grid); call mame.unpatch(model) first")


def _tower(model: nn.Module) -> nn.Module:
    """The VisionTransformer to patch: ``model`` itself or its ``visual``; a ValueError for anything else."""
    try:
        import open_clip
        from open_clip.transformer import VisionTransformer
    except ImportError as error:  # the optional extra
        raise ImportError("mame.patch.open_clip needs open_clip: pip install 'mame[clip]'") from error
    if isinstance(model, VisionTransformer):
        return model
    if isinstance(model, (open_clip.CLIP, open_clip.CustomTextCLIP, open_clip.CoCa)):
        if isinstance(model.visual, VisionTransformer):
            return model.visual
        raise ValueError(f"mame.patch.open_clip supports open_clip's VisionTransformer image tower; this model's is "
                         f"{type(model.visual).__name__}")
    raise ValueError("mame.patch.open_clip supports open_clip's CLIP, CustomTextCLIP, CoCa and VisionTransformer, got "
                     f"{type(model).__name__}")


def _layout(tower: nn.Module) -> BlockLayout:
    """The description of the tower's blocks; a ValueError for what cannot be described."""
    from open_clip.transformer import Attention, CustomResidualAttentionBlock, ResidualAttentionBlock

    if getattr(tower.transformer, "batch_first", False) is not True:
        raise ValueError("mame.patch.open_clip needs a batch-first tower (blocks that see (B, L, d), open_clip >= "
                         "2.24); this one runs its blocks as (L, B, d)")
    if getattr(tower.patch_dropout, "exclude_first_token", True) is not True:
        raise ValueError("mame.patch.open_clip needs patch dropout to keep the class token (exclude_first_token)")
    layouts = set()
    for index, block in enumerate(tower.transformer.resblocks):
        attn = block.attn
        if type(block) is ResidualAttentionBlock and type(attn) is nn.MultiheadAttention:
            if not attn._qkv_same_embed_dim or attn.bias_k is not None or attn.add_zero_attn:
                raise ValueError(f"block {index}: nn.MultiheadAttention with kdim/vdim, add_bias_kv or add_zero_attn "
                                 "is not supported")
            layouts.add(RESIDUAL_LAYOUT)
        elif type(block) is CustomResidualAttentionBlock and type(attn) is Attention:
            if attn.logit_scale is not None:
                raise ValueError(f"block {index}: scaled cosine attention (scaled_cosine_attn) is not supported")
            layouts.add(CUSTOM_LAYOUT)
        else:
            raise ValueError(f"mame.patch.open_clip supports ResidualAttentionBlock (nn.MultiheadAttention) and "
                             f"CustomResidualAttentionBlock (Attention); block {index} is {type(block).__name__} "
                             f"with {type(attn).__name__}")
    if len(layouts) != 1:
        raise ValueError("mame.patch.open_clip needs blocks of one kind throughout the tower")
    return layouts.pop()


def patch_open_clip(model: nn.Module, tau: float | Sequence[float] | None = None,
                    layers: int | Sequence[int] | None = None, *, flops: float | None = None,
                    batch_rule: str = "per_sample", partition: str = "alternating", prune: bool = True,
                    size_weighted: bool = False, proportional_attention: bool = True, packed: bool = True,
                    check: bool = False, metric: str = "x", similarity: str = "cosine", seed: int = 0) -> nn.Module:
    """Apply MaMe in place to an open_clip image tower, with the options of `mame.patch.timm` (see there) and the
    paper's defaults (timm's ``preset="paper"``): τ = 0.8 (``tau=None``) on the first 8 blocks (``layers=None``), the
    tokens as metric, pruning. ``flops`` (not with ``tau``) is a FLOP budget instead, as in `mame.patch.timm`: the
    FLOP ratio (e.g. 2.0 = half) at the tower's image size, counted from its blocks' attention and MLP and its patch
    convolution; every block merges then (unless ``layers`` is given), metric and pruning stay as given or the
    defaults above, and a batch stays rectangular. ``model``: a `CLIP`, `CustomTextCLIP` or `CoCa` (its ``visual`` is
    patched and opens each forward's state, so ``encode_image`` and ``model(image, text)`` merge; the text tower stays
    untouched) or a bare `VisionTransformer`. ``model.mame`` holds the settings and counts; undo with
    ``mame.unpatch(model)``."""
    tower = _tower(model)
    unpatch(model)  # describe the original classes
    layout = _layout(tower)
    blocks = list(tower.transformer.resblocks)
    chosen = resolve_preset("paper", tau, layers, flops, metric, prune, len(blocks), size_weighted)
    width = tower.transformer.width  # the token width, and heads x head dim in both attention kinds
    budget = block_budget(blocks[0], layout, dim=width, width=width, metric=chosen["metric"],
                          patches=math.prod(tower.grid_size), num_special=1, depth=len(blocks), embedding=tower.conv1)
    install_mame(model, blocks, layout, 1, PatchedVisionTransformer, scoped=None if tower is model else tower,
                 batch_rule=batch_rule, partition=partition, proportional_attention=proportional_attention,
                 packed=packed, check=check, budget=budget, similarity=similarity, seed=seed, **chosen)
    pools = [tower.attn_pool]  # a 'cascade' contrastive pool reads the first pool's outputs, not the tokens
    if getattr(tower, "attn_pool_type", "") == "parallel":
        pools.append(tower.attn_pool_contrastive)
    for pool in pools:
        if pool is not None:
            swap_class(pool.attn, SizeAwarePooling, model.mame)
            set_attributes(pool.attn, model.mame, mame=model.mame)
    return model
