"""MaMe for Hugging Face ``transformers`` vision encoders, through the same patched block as timm.

A family is a description: where its layer keeps norms, attention, LayerScale and MLP (`BlockLayout`) and how its
attention module runs in pieces (`AttentionLayout`: separate q/k/v projections here). The attention core is
`mame.attention.attend` whatever ``attn_implementation`` the model was loaded with (eager, SDPA, flash): it is exact,
takes the padding and log(size) bias, and picks its path per shape; the model's own attention function is not used.

Families so far: DINOv2 (`Dinov2Model`: pre-norm layers with LayerScale) and ViT (`ViTModel`,
`ViTForImageClassification`: pre-norm layers, hidden dropout on each branch). Their pooled outputs and classifiers
read the class token, which never merges. Models whose head pools the patch tokens (e.g.
`Dinov2ForImageClassification`, which averages them) are refused until their pooling is size-weighted. ``last_hidden_state`` and ``hidden_states`` are the merged,
per-sample padded tokens: ``model.mame.unmerge`` maps the last one back to the patch grid.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import nn

from mame.attention import AttentionLayout
from mame.blocks import BlockLayout
from mame.patch.base import ScopedForward
from mame.patch.timm import install_mame


def _q_k_v(attn: nn.Module, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    shape = (*h.shape[:-1], attn.num_attention_heads, attn.head_dim)
    return attn.q_proj(h).view(shape), attn.k_proj(h).view(shape), attn.v_proj(h).view(shape)


def _no_qk_norm(attn: nn.Module, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return q, k


def _o_proj(attn: nn.Module, out: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    return attn.o_proj(out)


def _scaling(attn: nn.Module) -> float:
    return attn.scaling


def _attention_dropout(attn: nn.Module) -> float:
    return attn.attention_dropout


def _heads(attn: nn.Module) -> int:
    return attn.num_attention_heads


# transformers' attention modules with q_proj / k_proj / v_proj / o_proj (DINOv2 and the families written like it).
QKV_PROJ_ATTENTION = AttentionLayout(qkv=_q_k_v, qk_norm=_no_qk_norm, output=_o_proj, scale=_scaling,
                                     dropout=_attention_dropout, heads=_heads)
DINOV2_LAYOUT = BlockLayout(attention=QKV_PROJ_ATTENTION, norm1="norm1", attn="attention", ls1="layer_scale1",
                            drop_path1="drop_path", norm2="norm2", mlp="mlp", ls2="layer_scale2",
                            drop_path2="drop_path")


VIT_LAYOUT = BlockLayout(attention=QKV_PROJ_ATTENTION, norm1="layernorm_before", attn="attention", ls1=None,
                         drop_path1="dropout", norm2="layernorm_after", mlp="mlp", ls2=None, drop_path2="dropout")

# transformers class name -> (its patched layers, their description).
_FAMILIES: dict[str, tuple[Callable[[nn.Module], list[nn.Module]], BlockLayout]] = {
    "Dinov2Model": (lambda model: list(model.encoder.layer), DINOV2_LAYOUT),
    "ViTModel": (lambda model: list(model.layers), VIT_LAYOUT),
    "ViTForImageClassification": (lambda model: list(model.vit.layers), VIT_LAYOUT),
}


def _family(model: nn.Module) -> tuple[Callable[[nn.Module], list[nn.Module]], BlockLayout]:
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
    blocks, layout = _family(model)
    return install_mame(model, blocks(model), layout, 1, ScopedForward, tau=tau, layers=layers,
                        batch_rule=batch_rule, partition=partition, prune=prune, size_weighted=size_weighted,
                        proportional_attention=proportional_attention, packed=packed, check=check, metric=metric)
