"""MaMe for Hugging Face ``transformers`` vision encoders, through the same patched block as timm.

A family is a description: where its layer keeps norms, attention, LayerScale and MLP (`BlockLayout`) and how its
attention module runs in pieces (`AttentionLayout`: separate q/k/v projections here). The attention core is
`mame.attention.attend` whatever ``attn_implementation`` the model was loaded with (eager, SDPA, flash): it is exact,
takes the padding and log(size) bias, and picks its path per shape; the model's own attention function is not used.

Families so far: DINOv2 (`Dinov2Model`: pre-norm layers with LayerScale), ViT (`ViTModel`,
`ViTForImageClassification`: pre-norm layers, hidden dropout on each branch) and CLIP's vision tower
(`CLIPVisionModel`, `CLIPVisionModelWithProjection`, and `CLIPModel`, whose text tower is left alone; the tower's
forward opens each forward's state, so ``get_image_features`` is covered). Their pooled outputs and classifiers read
the class token, which never merges. Models whose head pools the patch tokens (e.g.
`Dinov2ForImageClassification`, which averages them) are refused until their pooling is size-weighted. ``last_hidden_state`` and ``hidden_states`` are the merged,
per-sample padded tokens: ``model.mame.unmerge`` maps the last one back to the patch grid.
"""

from __future__ import annotations

from dataclasses import dataclass
from operator import attrgetter
from typing import Callable, Sequence

import torch
from torch import nn

from mame.attention import AttentionLayout
from mame.blocks import BlockLayout
from mame.patch.base import ScopedForward
from mame.patch.timm import install_mame


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


@dataclass(frozen=True)
class _Family:
    """Where a model keeps its layers, how they are described, and which module's forward opens each forward's
    state (the model itself, or its vision tower when other methods reach the tower directly)."""

    vision: Callable[[nn.Module], nn.Module]  # the module that holds the layers
    layers: str  # attribute path of the layers inside it
    layout: BlockLayout
    scope_tower: bool = False


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
    (see there); the class token never merges. Undo with ``mame.unpatch(model)``."""
    family = _family(model)
    tower = family.vision(model)
    return install_mame(model, list(attrgetter(family.layers)(tower)), family.layout, 1, ScopedForward, tau=tau,
                        layers=layers, scoped=tower if family.scope_tower else None,
                        batch_rule=batch_rule, partition=partition, prune=prune, size_weighted=size_weighted,
                        proportional_attention=proportional_attention, packed=packed, check=check, metric=metric)
