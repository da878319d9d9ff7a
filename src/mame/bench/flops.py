"""FLOPs of what actually runs: every matmul, linear and convolution, attention included.

`FlopCounterMode` scores the fused CPU SDPA kernels, and the fused self-attention that `nn.MultiheadAttention` runs in
eval mode (open_clip's blocks, SigLIP's pooling head), as zero unless a formula is registered; this module registers
them (2 FLOPs per multiply-accumulate of the projections, QK^T and AV), so the FLOP ratio of a merged model against
the unmodified one is the limit its speed-up should be compared with.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch.utils.flop_counter import FlopCounterMode, flop_registry

from mame.bench._inputs import Inputs, call


def _attention_flops(query_shape: torch.Size, key_shape: torch.Size, value_shape: torch.Size) -> int:
    """QK^T and AV of (B, H, Lq, hd) queries against (B, Hkv, Lk, hd) keys: 2 FLOPs per multiply-accumulate."""
    batch, heads, len_q, head_dim = query_shape
    len_k, value_dim = key_shape[-2], value_shape[-1]
    return 2 * batch * heads * len_q * len_k * (head_dim + value_dim)


def _sdpa_forward_flop(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return _attention_flops(query_shape, key_shape, value_shape)


def _sdpa_backward_flop(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    # Recompute QK^T, then dScores = dO V^T, dV = P^T dO, dQ = dS K, dK = dS^T Q: five matmuls of the forward's size.
    batch, heads, len_q, head_dim = query_shape
    len_k, value_dim = key_shape[-2], value_shape[-1]
    return 2 * batch * heads * len_q * len_k * (3 * head_dim + 2 * value_dim)


def _native_mha_flop(query_shape, key_shape, value_shape, embed_dim, num_head, qkv_weight_shape, qkv_bias_shape,
                     proj_weight_shape, *args, out_shape=None, **kwargs) -> int:
    """`nn.MultiheadAttention`'s fused kernel (its inference fast path, batch-first (B, L, E) inputs): the packed
    q/k/v projection (q on the queries, k and v on the keys), QK^T and AV, the output projection."""
    batch, len_q, in_width = query_shape
    len_k = key_shape[1]
    head_dim = embed_dim // num_head
    projections = 2 * batch * ((len_q + 2 * len_k) * embed_dim * in_width
                               + len_q * proj_weight_shape[0] * proj_weight_shape[1])
    heads = (batch, num_head, len_q, head_dim), (batch, num_head, len_k, head_dim)
    return projections + _attention_flops(*heads, heads[1])


def _fused_formulas() -> dict[Any, Callable[..., int]]:
    """Formulas for the fused attention kernels this torch has but `flop_registry` does not score (CPU flash SDPA,
    the backend-overridable SDPA kernel, `nn.MultiheadAttention`'s fast path). The CUDA flash/efficient/cuDNN SDPA
    kernels are already scored by torch; the math backend decomposes into ``bmm`` and is counted as matmuls."""
    formulas: dict[Any, Callable[..., int]] = {}
    candidates = [("_native_multi_head_attention", _native_mha_flop)]
    for name in ("_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_fused_attention_overrideable"):
        candidates += [(name, _sdpa_forward_flop), (f"{name}_backward", _sdpa_backward_flop)]
    for op_name, formula in candidates:
        op = getattr(torch.ops.aten, op_name, None)
        if op is not None and op not in flop_registry:
            formulas[op] = formula
    return formulas


def flop_counter() -> FlopCounterMode:
    """A silent `FlopCounterMode` that also scores the fused attention kernels (its ``get_flop_counts()`` gives the
    FLOPs of every submodule, e.g. of each block)."""
    return FlopCounterMode(display=False, custom_mapping=_fused_formulas())


def count_flops(model: Callable[..., Any], inputs: Inputs) -> int:
    """FLOPs of one forward of ``model`` on ``inputs`` (2 per multiply-accumulate), attention included.

    Every matmul, linear and convolution is counted, so a merge's own similarity and fusion matmuls are part of
    the total; elementwise work (norms, softmax, activations) is not, as is usual.

    Args:
        model: a module or any callable.
        inputs: a tensor (``model(x)``), a tuple/list of positional arguments or a mapping of keyword arguments.
    """
    counter = flop_counter()
    with torch.inference_mode(), counter:
        call(model, inputs)
    return int(counter.get_total_flops())
