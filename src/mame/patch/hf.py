"""MaMe for Hugging Face ``transformers`` vision encoders, through the same patched block as timm.

A family is a description: where its layer keeps norms, attention, LayerScale and MLP (`BlockLayout`) and how its
attention module runs in pieces (`AttentionLayout`: separate q/k/v projections here). The attention core is
`mame.attention.attend` whatever ``attn_implementation`` the model was loaded with (eager, SDPA, flash): it is exact,
takes the padding and log(size) bias, and picks its path per shape; the model's own attention function is not used.

Families so far: DINOv2 (`Dinov2Model`: pre-norm layers with LayerScale), ViT (`ViTModel`,
`ViTForImageClassification`: pre-norm layers, hidden dropout on each branch), CLIP's vision tower
(`CLIPVisionModel`, `CLIPVisionModelWithProjection`, and `CLIPModel`, whose text tower is left alone; the tower's
forward opens each forward's state, so ``get_image_features`` is covered) and SigLIP's (`SiglipVisionModel`,
`SiglipModel`: no class token; its attention-pooling head weighs tokens by log(size) through `SizeAwarePooling`).
Pooled outputs and classifiers read the class token, which never merges, or that size-aware pool. Models whose head
averages the patch tokens (e.g. `Dinov2ForImageClassification`) are refused until their pooling is size-weighted.
``last_hidden_state`` and ``hidden_states`` are the merged, per-sample padded tokens: ``model.mame.unmerge`` maps the
last one back to the patch grid.
"""

from __future__ import annotations

from dataclasses import dataclass
from operator import attrgetter
from typing import Callable, Sequence

import torch
from torch import nn

from mame.attention import AttentionLayout
from mame.blocks import BlockLayout
from mame.patch.base import Picklable, ScopedForward, set_attributes, swap_class
from mame.patch.options import install_mame


def _q_k_v(attn: nn.Module, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    shape = (*h.shape[:-1], -1, attn.head_dim)
    return attn.q_proj(h).view(shape), attn.k_proj(h).view(shape), attn.v_proj(h).view(shape)


def _no_qk_norm(attn: nn.Module, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return q, k


@dataclass(frozen=True)
class _Projection:
    """The attention's output projection, by attribute name (``o_proj``, ``out_proj``)."""

    name: str

    def __call__(self, attn: nn.Module, out: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        return getattr(attn, self.name)(out)


def projection_attention(output: str, scale: str, dropout: str, heads: str) -> AttentionLayout:
    """transformers' attention modules with ``q_proj`` / ``k_proj`` / ``v_proj`` and ``head_dim``, by the names of
    their output projection, logit scale, dropout probability and head count."""
    return AttentionLayout(qkv=_q_k_v, qk_norm=_no_qk_norm, output=_Projection(output), scale=attrgetter(scale),
                           dropout=attrgetter(dropout), heads=attrgetter(heads))


# DINOv2, ViT (transformers >= 5): o_proj, scaling, attention_dropout, num_attention_heads.
O_PROJ_ATTENTION = projection_attention("o_proj", "scaling", "attention_dropout", "num_attention_heads")
# CLIP: out_proj, scale, dropout, num_heads.
CLIP_ATTENTION = projection_attention("out_proj", "scale", "dropout", "num_heads")

DINOV2_LAYOUT = BlockLayout(attention=O_PROJ_ATTENTION, norm1="norm1", attn="attention", ls1="layer_scale1",
                            drop_path1="drop_path", norm2="norm2", mlp="mlp", ls2="layer_scale2",
                            drop_path2="drop_path")
VIT_LAYOUT = BlockLayout(attention=O_PROJ_ATTENTION, norm1="layernorm_before", attn="attention", ls1=None,
                         drop_path1="dropout", norm2="layernorm_after", mlp="mlp", ls2=None, drop_path2="dropout")
CLIP_LAYOUT = BlockLayout(attention=CLIP_ATTENTION, norm1="layer_norm1", attn="self_attn", ls1=None, drop_path1=None,
                          norm2="layer_norm2", mlp="mlp", ls2=None, drop_path2=None)


class SizeAwarePooling(Picklable):
    """Mixin for the `nn.MultiheadAttention` that pools a patched tower's tokens (SigLIP's attention-pooling head):
    its keys get the running forward's log(size) bias, which is -inf on padding, so the pool weighs every merged
    token by the patches it stands for and never sees padding (as `mame.patch.timm` does for timm's "map" pool)."""

    def forward(self, query, key, value, *args, **kwargs):
        state = self.mame.state
        if (not args and kwargs.get("attn_mask") is None and state is not None and state.sizes is not None
                and tuple(state.sizes.shape) == tuple(key.shape[:2])):
            bias = state.sizes.log().to(key.dtype)[:, None, :].expand(-1, query.shape[1], -1)
            kwargs["attn_mask"] = bias.repeat_interleave(self.num_heads, dim=0)  # (B * heads, queries, keys)
        return super().forward(query, key, value, *args, **kwargs)


@dataclass(frozen=True)
class _Family:
    """Where a model keeps its layers, how they are described, how many leading tokens never merge, which module's
    forward opens each forward's state (the model itself, or its vision tower when other methods reach the tower
    directly) and which attention pool reads the merged tokens."""

    vision: Callable[[nn.Module], nn.Module]  # the module that holds the layers
    layers: str  # attribute path of the layers inside it
    layout: BlockLayout
    scope_tower: bool = False
    num_special: int = 1
    pool: str | None = None  # attribute path, inside the tower, of an nn.MultiheadAttention pool


def _itself(model: nn.Module) -> nn.Module:
    return model


# transformers class name -> its description. CLIP's text tower is never patched.
_FAMILIES: dict[str, _Family] = {
    "Dinov2Model": _Family(_itself, "encoder.layer", DINOV2_LAYOUT),
    "ViTModel": _Family(_itself, "layers", VIT_LAYOUT),
    "ViTForImageClassification": _Family(attrgetter("vit"), "layers", VIT_LAYOUT),
    "CLIPVisionModel": _Family(_itself, "encoder.layers", CLIP_LAYOUT),
    "CLIPVisionModelWithProjection": _Family(attrgetter("vision_model"), "encoder.layers", CLIP_LAYOUT, True),
    "CLIPModel": _Family(attrgetter("vision_model"), "encoder.layers", CLIP_LAYOUT, True),
    # SigLIP: no class token, an attention-pooling head; its layers are written like CLIP's.
    "SiglipVisionModel": _Family(_itself, "encoder.layers", CLIP_LAYOUT, num_special=0, pool="head.attention"),
    "SiglipModel": _Family(attrgetter("vision_model"), "encoder.layers", CLIP_LAYOUT, True, 0, "head.attention"),
}


def _family(model: nn.Module) -> _Family:
    """The description of ``model``'s family; a ValueError naming the class for any other model."""
    try:
        import transformers
    except ImportError as error:  # the optional extra
        raise ImportError("mame.patch.hf needs transformers: pip install 'mame[hf]'") from error
    for name, family in _FAMILIES.items():
        if isinstance(model, getattr(transformers, name)):
            return family
    raise ValueError(f"mame.patch.hf supports transformers' {', '.join(_FAMILIES)} so far, got "
                     f"{type(model).__name__} (heads that pool patch tokens need size-weighted pooling first)")


def patch_hf(model: nn.Module, tau: float | Sequence[float] = 0.8, layers: int | Sequence[int] = 8, *,
             batch_rule: str = "per_sample", partition: str = "alternating", prune: bool = True,
             size_weighted: bool = False, proportional_attention: bool = True, packed: bool = True,
             check: bool = False, metric: str = "x") -> nn.Module:
    """Apply MaMe in place to a transformers vision encoder, with the options and defaults of `mame.patch.timm`
    (see there); the class token, where the model has one, never merges. Undo with ``mame.unpatch(model)``."""
    family = _family(model)
    tower = family.vision(model)
    install_mame(model, list(attrgetter(family.layers)(tower)), family.layout, family.num_special, ScopedForward,
                 tau=tau, layers=layers, scoped=tower if family.scope_tower else None, batch_rule=batch_rule,
                 partition=partition, prune=prune, size_weighted=size_weighted,
                 proportional_attention=proportional_attention, packed=packed, check=check, metric=metric)
    pool = _attribute(tower, family.pool)
    if pool is not None:
        swap_class(pool, SizeAwarePooling, model.mame)
        set_attributes(pool, model.mame, mame=model.mame)
    return model


def _attribute(module: nn.Module, path: str | None) -> nn.Module | None:
    """``module``'s submodule at the dotted ``path``, None when there is no path or no such submodule (SigLIP
    without a head)."""
    if path is None:
        return None
    for name in path.split("."):
        module = getattr(module, name, None)
    return module
