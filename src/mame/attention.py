"""Attention run in pieces, so that a ragged batch costs what its real tokens cost.

A patched block runs every token-wise step (norms, qkv and output projections, LayerScale, MLP) on the real tokens
of the batch packed into one (T, d) matrix; only the score-softmax core of attention needs to know which tokens
belong to which image. `TokenLayout` says how the tokens of one forward are laid out between merges:

- `PaddedTokens`: the batch as it is, (B, L, d): every sample real (uniform batches, single images), or a padded
  batch in training mode, where per-sample drop-path needs the batch dimension;
- `PackedTokens`: a ragged batch in inference, packed to its T real tokens. Attention runs on groups of samples of
  similar length (each group padded only to its own longest sample), chosen by a cost model measured here
  (`benchmarks/bench_attention.py`): a group costs a fixed overhead per call plus its score matrix, so samples of
  equal length share a call and very different ones do not pay for each other's padding.

The core itself (`attend`) takes whichever exact path is fastest for the shape: PyTorch's fused SDPA, or a plain
matmul-softmax-matmul where its score matrix stays in cache (CPU, small token counts). The same rule serves every
model, the unmodified one included, so no ratio is flattered by a slow baseline.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Callable, Protocol

import torch
import torch.nn.functional as F
from torch import nn

# Where matmul-softmax beats fused SDPA, per device type: score matrices (samples x heads x queries x keys elements)
# between MATMUL_MIN_SCORES and MATMUL_MAX_SCORES, on at most MATMUL_MAX_TOKENS keys. Measured by
# benchmarks/bench_attention.py (table in benchmarks/attention_paths.md). CPU: there the unfused path is 10-60 %
# faster while its scores stay in cache, and 2-2.5x slower beyond (from 160 tokens on 4 samples, at 257 tokens always);
# below 10k scores SDPA's single call wins. CUDA is not measured here: fused kernels win there, so SDPA always.
MATMUL_MIN_SCORES = 10_000
MATMUL_MAX_SCORES = {"cpu": 400_000}
MATMUL_MAX_TOKENS = 200


def attention_path(device: torch.device, samples: int, heads: int, queries: int, keys: int) -> str:
    """``"matmul"`` or ``"sdpa"``: the faster exact attention core for this shape on this device (see the table)."""
    scores = samples * heads * queries * keys
    if keys <= MATMUL_MAX_TOKENS and MATMUL_MIN_SCORES <= scores <= MATMUL_MAX_SCORES.get(device.type, 0):
        return "matmul"
    return "sdpa"


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None, scale: float,
           dropout_p: float = 0.0) -> torch.Tensor:
    """Softmax attention of (n, L, heads, head_dim) queries, keys and values, with an additive float ``bias``
    broadcastable to (n, heads, L, L) or None; returns (n, L, heads * head_dim)."""
    n, length, heads, _ = q.shape
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    if dropout_p == 0.0 and attention_path(q.device, n, heads, length, k.shape[2]) == "matmul":
        scores = (q * scale) @ k.transpose(-2, -1)
        if bias is not None:
            scores = scores + bias
        out = scores.softmax(dim=-1) @ v
    else:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=dropout_p, scale=scale)
    return out.transpose(1, 2).reshape(n, length, -1)


@dataclass(frozen=True)
class AttentionLayout:
    """How to run one family's attention module in pieces (each a function of the module and token-wise input).

    Attributes:
        qkv: ``qkv(attn, h)`` -> raw queries, keys, values (..., heads, head_dim) of normed tokens ``h`` (..., d);
            the keys, before any qk-norm, are what key-based merging metrics use.
        qk_norm: ``qk_norm(attn, q, k)`` -> normed queries and keys (identity for most models).
        output: ``output(attn, o, h)`` -> (..., d) from the attention output ``o`` (..., heads * head_dim) and the
            attention's input ``h`` (gates).
        scale: ``scale(attn)`` -> the logit scale.
        dropout: ``dropout(attn)`` -> attention-probability dropout in training.
        heads: ``heads(attn)`` -> the number of heads (for the cost of attention groups).
        cache_index: causal language models only (`mame.causal`): ``cache_index(attn)`` -> the layer's index in
            transformers' KV ``Cache``. When set, the block's attention runs through the token layout's
            ``attend_cached`` (positions, causal mask, cache update, grouped-query heads); None for encoders.
        rotary: causal language models only: ``rotary(q, k, cos, sin)`` -> q and k (B, L, heads, head_dim) with
            rotary position embeddings applied from each token's own ``cos``/``sin`` (B, L, head_dim); None where
            positions do not enter attention (learned absolute positions, GPT-2).
    """

    qkv: Callable[[nn.Module, torch.Tensor], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
    qk_norm: Callable[[nn.Module, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
    output: Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]
    scale: Callable[[nn.Module], float]
    dropout: Callable[[nn.Module], float]
    heads: Callable[[nn.Module], int]
    cache_index: Callable[[nn.Module], int] | None = None
    rotary: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
                     tuple[torch.Tensor, torch.Tensor]] | None = None


# ------------------------------------------------------------------------------------------------ token layouts
@dataclass(frozen=True)
class AttentionGroup:
    """Samples attended in one call. ``rows`` picks their tokens from the packed (T, ...) tokens, each sample padded
    to ``length`` by repeating its first token (masked as a key by ``key_bias``); ``targets`` says where each output
    row goes (T, one past the last packed row, for padding). Both are None when the group is the packed range
    [start, start + count * length) itself: then nothing is gathered or scattered."""

    count: int
    length: int
    start: int
    rows: torch.Tensor | None
    targets: torch.Tensor | None
    key_bias: torch.Tensor | None  # (count, 1, 1, length) float: -inf on padding, plus log(size) if proportional


QkNorm = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


class TokenLayout(Protocol):
    """How one forward's tokens are laid out for token-wise steps (see the module docstring)."""

    def pack(self, x: torch.Tensor) -> torch.Tensor:
        """(B, L, ...) -> the layout's tokens."""

    def unpack(self, tokens: torch.Tensor) -> torch.Tensor:
        """The layout's tokens -> (B, L, ...), zeros on padding."""

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, dropout_p: float,
               qk_norm: QkNorm) -> torch.Tensor:
        """Attention of the layout's (..., heads, head_dim) queries, keys and values -> (..., heads * head_dim)."""


@dataclass(frozen=True)
class PaddedTokens:
    """Tokens stay (B, L, ...); attention takes ``bias`` (B, 1, 1, L) (padding and proportional attention) or None."""

    bias: torch.Tensor | None

    def pack(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def unpack(self, tokens: torch.Tensor) -> torch.Tensor:
        return tokens

    def attend(self, q, k, v, scale, dropout_p, qk_norm):
        q, k = qk_norm(q, k)
        return attend(q, k, v, self.bias, scale, dropout_p)


@dataclass(frozen=True)
class PackedTokens:
    """The T real tokens of a (B, L, ...) padded batch as (T, ...); attention by `AttentionGroup`."""

    batch: int
    length: int
    rows: torch.Tensor  # (T,) flat row (b * L + position) of every real token, sample by sample
    groups: tuple[AttentionGroup, ...]

    def pack(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(self.batch * self.length, *x.shape[2:]).index_select(0, self.rows)

    def unpack(self, tokens: torch.Tensor) -> torch.Tensor:
        out = tokens.new_zeros(self.batch * self.length, *tokens.shape[1:])
        return out.index_copy_(0, self.rows, tokens).view(self.batch, self.length, *tokens.shape[1:])

    def attend(self, q, k, v, scale, dropout_p, qk_norm):
        total = q.shape[0]
        # One spare row receives the outputs of padding positions, so every group is written in one step.
        out = q.new_empty(total + 1, q.shape[1] * v.shape[2])
        for group in self.groups:
            if group.rows is None:
                parts = [t.narrow(0, group.start, group.count * group.length) for t in (q, k, v)]
            else:
                parts = [t.index_select(0, group.rows) for t in (q, k, v)]
            gq, gk, gv = (t.view(group.count, group.length, *t.shape[1:]) for t in parts)
            gq, gk = qk_norm(gq, gk)
            result = attend(gq, gk, gv, group.key_bias, scale, dropout_p).flatten(0, 1)
            if group.targets is None:
                out.narrow(0, group.start, len(result)).copy_(result)
            else:
                out.index_copy_(0, group.targets, result)
        return out.narrow(0, 0, total)


# Cost of one attention group, in seconds: a fixed part (call overhead, the gathers of its rows) plus its score
# matrix. CPU: from benchmarks/attention_paths.md (2-core machine): SDPA's call costs about 29 us and a score element
# 2.5 ns (relative least squares); the group's three row gathers and qk-norm calls add about 10 us. CUDA
# was not measured here (no GPU at hand): a kernel launch costs microseconds while a score element costs picoseconds,
# so these placeholders group samples much more eagerly; re-fit them on the GPU before trusting them.
GROUP_OVERHEAD_S = {"cpu": 40e-6, "cuda": 20e-6}
SCORE_ELEMENT_S = {"cpu": 2.5e-9, "cuda": 2e-12}


def group_samples(lengths: list[int], heads: int, device_type: str) -> list[list[int]]:
    """Split samples into attention groups of minimal modelled cost: a group costs its overhead plus count x heads x
    longest^2 score elements. Some optimal split groups samples contiguous in length order, so an exact dynamic
    programme over the sorted lengths finds it in O(B^2)."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    overhead = GROUP_OVERHEAD_S.get(device_type, GROUP_OVERHEAD_S["cuda"])
    per_score = SCORE_ELEMENT_S.get(device_type, SCORE_ELEMENT_S["cuda"]) * heads
    best = [0.0] + [float("inf")] * len(order)  # best[i]: cost of grouping the i longest samples
    cut = [0] * (len(order) + 1)
    for end in range(1, len(order) + 1):
        for start in range(end):
            longest = lengths[order[start]]
            cost = best[start] + overhead + per_score * (end - start) * longest * longest
            if cost < best[end]:
                best[end], cut[end] = cost, start
    groups, end = [], len(order)
    while end > 0:
        groups.append(sorted(order[cut[end]:end]))
        end = cut[end]
    return sorted(groups)  # by first sample


def packed_layout(mask: torch.Tensor, sizes: torch.Tensor | None, heads: int, dtype: torch.dtype) -> PackedTokens:
    """The `PackedTokens` of a padded batch whose real tokens are a prefix of each sample (``mask`` (B, L));
    ``sizes`` (B, L) are added to the attention logits as log(size) (proportional attention), None for none."""
    batch, length = mask.shape
    device = mask.device
    lengths = mask.sum(dim=1).tolist()  # one host synchronisation per merge: group shapes are host decisions
    starts = [0, *itertools.accumulate(lengths)]
    rows = mask.view(-1).nonzero().squeeze(1)
    log_sizes = None if sizes is None else sizes.view(-1).index_select(0, rows).log().to(dtype)  # (T,)
    total = len(rows)
    groups = []
    for members in group_samples(lengths, heads, device.type):
        longest = max(lengths[i] for i in members)
        start = starts[members[0]]
        position = torch.arange(longest, device=device)
        real = torch.stack([position < lengths[i] for i in members])  # (count, longest)
        first = torch.tensor([starts[i] for i in members], device=device).unsqueeze(1)
        group_rows = torch.where(real, first + position, first).view(-1)  # padding repeats the sample's first token
        key_bias = None
        if log_sizes is not None or not bool(real.all()):
            key_bias = torch.zeros(real.shape, device=device, dtype=dtype).masked_fill(~real, float("-inf"))
            if log_sizes is not None:
                key_bias = key_bias + log_sizes.index_select(0, group_rows).view(real.shape)
            key_bias = key_bias[:, None, None, :]
        if all(lengths[i] == longest for i in members) and members == list(range(members[0], members[-1] + 1)):
            # Consecutive samples of equal length: a range of the packed tokens, attended in place.
            groups.append(AttentionGroup(len(members), longest, start, None, None, key_bias))
        else:
            targets = torch.where(real.view(-1), group_rows, total)
            groups.append(AttentionGroup(len(members), longest, start, group_rows, targets, key_bias))
    return PackedTokens(batch, length, rows, tuple(groups))
