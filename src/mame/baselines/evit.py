"""EViT (Liang et al., "Not All Patches Are What You Need: Expediting Vision Transformers via Token
Reorganizations", ICLR 2022) in its training-free form, on the same patched block and harness as MaMe and ToMe.

Written from the paper (section 3, "token reorganization"): in a reorganising block, between attention and MLP
(where MaMe merges, eq 12 of the MaMe paper), the class token's attention to every other token, averaged over the
heads, is each token's *attentiveness* a_i. Of the n non-special tokens the ``k = ceil(keep_rate * n)`` most
attentive are kept as they are; the other n - k ("inattentive") are fused into one token appended after them,
``x_fused = sum_i a_i x_i`` over the inattentive tokens. The class token (and any register) is untouched. A fused
token of an earlier reorganisation is an ordinary token in the next one (it may be kept or fused again). The paper
reorganises blocks 4, 7 and 10 of a 12-block ViT (indices 3, 6, 9) at keep rate 0.7.

Where this differs from the published (trained) form, and why:
- ``normalize=True`` (default) fuses with the weighted *average* ``sum a_i x_i / sum a_i``. EViT fine-tunes with
  the plain sum, whose norm is the inattentive tokens' share of attention (often a few percent of a token's): a
  pretrained model that never saw such a token reads it as noise. ``normalize=False`` gives the published sum.
- Token sizes are tracked (the fused token stands for the sizes of what it fused), so size-aware pooling counts it
  as the patches it replaced and, with ``proportional_attention=True`` (ToMe's rule, off by default as in EViT),
  attention adds log(size). The ranking then uses the attention the block really computed, bias included.
- Kept tokens stay in their original order (EViT orders them by attentiveness); attention and the MLP do not depend
  on token order, so only the layout of intermediate outputs differs.

The class token's query is the one thing the shared block does not hand a merger: a forward hook on the block's
``attn.qkv`` projection keeps it for the merge that follows in the same block (`_ClassQuery`), so nothing is
recomputed and `mame.blocks` stays untouched; `mame.unpatch` removes the hook.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn

from mame.baselines.tome import install_timm, take_rows
from mame.blocks import TokenState
from mame.patch.options import resolve_layers
from mame.patch.timm import TIMM_ATTENTION, check_model

EVIT_LAYERS = (3, 6, 9)  # the paper's reorganising blocks of a 12-block ViT (4th, 7th and 10th)


def reorganise(x: torch.Tensor, attentiveness: torch.Tensor, sizes: torch.Tensor, keep_rate: float,
               num_special: int, normalize: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """EViT's token reorganisation of (B, L, d) tokens.

    Args:
        x: tokens, the ``num_special`` leading ones (class token first) untouched.
        attentiveness: (B, L - num_special) the class token's attention to each non-special token (mean over heads).
        sizes: (B, L) how many original patches each token stands for.
        keep_rate: share of the n non-special tokens kept, ``ceil(keep_rate * n)`` of them (EViT's rounding).
        num_special: leading tokens never reorganised.
        normalize: fuse with the attention-weighted average (True) or EViT's plain weighted sum (False).

    Returns:
        ``(x', sizes')``: [specials, kept tokens in original order, fused token], and their sizes (the fused token's
        is the sum of what it fused). Unchanged when every token is kept.
    """
    count = x.shape[1] - num_special
    keep = math.ceil(keep_rate * count)
    if keep >= count:
        return x, sizes
    kept = attentiveness.topk(keep, dim=1).indices.sort(dim=1).values  # (B, k), positions among non-special
    fused = torch.ones_like(attentiveness, dtype=torch.bool).scatter_(1, kept, False)  # (B, n) inattentive tokens
    tokens, token_sizes = x[:, num_special:], sizes[:, num_special:]
    weights = attentiveness * fused
    if normalize:
        weights = weights / weights.sum(dim=1, keepdim=True)
    fused_token = torch.einsum("bn,bnd->bd", weights.to(x.dtype), tokens)
    fused_size = (token_sizes * fused).sum(dim=1, keepdim=True)
    return (torch.cat([x[:, :num_special], take_rows(tokens, kept), fused_token.unsqueeze(1)], dim=1),
            torch.cat([sizes[:, :num_special], token_sizes.gather(1, kept), fused_size], dim=1))


class _ClassQuery:
    """Forward hook on a block's qkv projection that keeps the class token's raw query (B, heads * head_dim) for the
    merge later in the same block. Per thread, so forwards sharing one patched model in several threads never read
    each other's query; a copy or pickle of the model starts with none."""

    def __init__(self) -> None:
        self._local = threading.local()

    def __call__(self, module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        # timm's qkv output is (B, L, 3 * heads * head_dim), queries first; row 0 is the class token.
        self._local.query = output[:, 0, : output.shape[-1] // 3]

    def pop(self) -> torch.Tensor:
        query = getattr(self._local, "query", None)
        if query is None:
            raise RuntimeError("EViT found no class-token query: the block's attention did not run its qkv projection")
        self._local.query = None  # a stale query must never serve a later block
        return query

    def __getstate__(self) -> dict:
        return {}

    def __setstate__(self, state: dict) -> None:
        self._local = threading.local()


@dataclass(frozen=True, eq=False)
class EViTMerge:
    """The EViT step of one block: rank by the class token's attention, keep the top share, fuse the rest.

    Attributes:
        keep_rate: share of the non-special tokens kept, in (0, 1].
        attn: the block's timm ``Attention`` (for its qk-norms and scale).
        query: the hook that caught the class token's query in this block.
        proportional_attention: the block's attention adds log(size); the ranking then does too.
        normalize: see `reorganise`.
    """

    keep_rate: float
    attn: nn.Module
    query: _ClassQuery
    proportional_attention: bool = False
    normalize: bool = True
    needs_keys = True

    def class_attention(self, keys: torch.Tensor, state: TokenState) -> torch.Tensor:
        """(B, L) the class token's attention to every token in this block, mean over heads, from the raw keys
        (B, L, heads, head_dim) and the query the hook caught."""
        query = self.query.pop().unflatten(-1, keys.shape[-2:])  # (B, heads, head_dim)
        query, keys = TIMM_ATTENTION.qk_norm(self.attn, query, keys)
        logits = torch.einsum("bhd,blhd->bhl", query, keys).float() * TIMM_ATTENTION.scale(self.attn)
        if self.proportional_attention and state.sizes is not None:
            logits = logits + state.sizes.log().unsqueeze(1)
        return logits.softmax(dim=-1).mean(dim=1)

    def __call__(self, x: torch.Tensor, state: TokenState, keys: torch.Tensor | None) -> torch.Tensor:
        attention = self.class_attention(keys, state)
        if state.mask is not None:
            raise ValueError("EViT keeps the same number of tokens in every sample and cannot follow padding")
        x, sizes = reorganise(x, attention[:, state.num_special:], state.ones_sizes(x), self.keep_rate,
                              state.num_special, self.normalize)
        state.sizes = sizes.detach()  # bookkeeping, see `TokenState.sizes`
        return x


def _keep_rates(keep_rate: float | Sequence[float], count: int) -> tuple[float, ...]:
    """``keep_rate`` as one value per reorganising block, each checked to lie in (0, 1]."""
    rates = (keep_rate,) * count if isinstance(keep_rate, (int, float)) else tuple(keep_rate)
    if len(rates) != count or any(isinstance(r, bool) or not isinstance(r, (int, float)) or not 0 < r <= 1
                                  for r in rates):
        raise ValueError(f"keep_rate must be a number in (0, 1] or one per reorganising block ({count}), "
                         f"got {keep_rate!r}")
    return tuple(float(r) for r in rates)


def patch_timm(model: nn.Module, keep_rate: float | Sequence[float] = 0.7,
               layers: int | Sequence[int] = EVIT_LAYERS, *, proportional_attention: bool = False,
               normalize: bool = True) -> nn.Module:
    """Apply training-free EViT in place to a timm VisionTransformer with a class token.

    Args:
        model: a timm ``VisionTransformer`` whose first prefix token is a class token.
        keep_rate: share of the non-special tokens each reorganising block keeps (EViT's 0.7 by default), one float
            or one per block in ``layers``.
        layers: the reorganising blocks (default 3, 6, 9: EViT's for 12-block ViTs; int = the first K blocks).
        proportional_attention: add log(size) to the attention logits, so the fused token weighs as the patches it
            stands for (ToMe's rule; EViT has none, hence off).
        normalize: fuse with the attention-weighted average (default, training-free) or EViT's plain weighted sum.

    Returns:
        the same model, patched; ``model.mame.last_token_counts`` gives the tokens after every block.
    """
    check_model(model)
    if getattr(model, "cls_token", None) is None:
        raise ValueError("EViT ranks tokens by the class token's attention; this model has no class token")
    indices = resolve_layers(layers, len(model.blocks))
    rates = _keep_rates(keep_rate, len(indices))
    hooks = {index: _ClassQuery() for index in indices}
    mergers = {index: EViTMerge(rate, model.blocks[index].attn, hooks[index], proportional_attention, normalize)
               for index, rate in zip(indices, rates)}
    settings = dict(method="evit", keep_rate=rates, layers=indices, proportional_attention=proportional_attention,
                    normalize=normalize)
    install_timm(model, mergers, settings, proportional_attention)
    for index, hook in hooks.items():
        model.mame.undo.append(model.blocks[index].attn.qkv.register_forward_hook(hook).remove)
    return model
