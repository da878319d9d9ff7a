"""A timm ViT forward written out by hand for the baselines' tests: each block's attention computed as the explicit
probability matrix, so a test's reference reduction sees exactly what the paper's pseudo-code sees."""

from __future__ import annotations

from typing import Callable

import timm
import torch
from torch import nn

# (block index, tokens after attention, sizes, attention probabilities (B, heads, L, L), raw keys (B, L, heads, hd))
# -> (tokens, sizes) after the block's reduction.
Reduction = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
                     tuple[torch.Tensor, torch.Tensor]]


def tiny_vit(seed: int = 0, depth: int = 4, **kwargs) -> nn.Module:
    """A tiny random ViT: 32 px images in 8 px patches (16 patches + class token), 4 blocks, 192 wide."""
    torch.manual_seed(seed)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=depth,
                             **kwargs).eval()


def images(batch: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def reference_features(model: nn.Module, x: torch.Tensor, reduce: Reduction, proportional: bool
                       ) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """Final features, sizes and tokens after every block of ``model`` on ``x``, with ``reduce`` applied between
    each block's attention and MLP (log(size) added to the logits when ``proportional``)."""
    t = model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(x))))
    sizes = torch.ones(t.shape[:2])
    counts = []
    for index, block in enumerate(model.blocks):
        attn = block.attn
        batch, length, dim = t.shape
        qkv = attn.qkv(block.norm1(t)).reshape(batch, length, 3, attn.num_heads, attn.head_dim)
        keys = qkv[:, :, 1]
        q, k, v = (part.transpose(1, 2) for part in qkv.unbind(2))
        logits = (attn.q_norm(q) @ attn.k_norm(k).transpose(-1, -2)) * attn.head_dim ** -0.5
        if proportional:
            logits = logits + sizes.log()[:, None, None, :]
        probs = logits.softmax(-1)
        out = (probs @ v).transpose(1, 2).reshape(batch, length, dim)
        t = t + block.ls1(attn.proj(attn.norm(out)))
        t, sizes = reduce(index, t, sizes, probs, keys)
        t = t + block.ls2(block.mlp(block.norm2(t)))
        counts.append(t.shape[1])
    return model.norm(t), sizes, counts
