"""Causal language models on the one patched block (paper section 5): positions, the causal mask and the KV cache.

A decoder-only LM may merge its prompt while it reads it (prefill) with MaMe's causal variants
(`mame.merge(..., causal="strict")`: a source joins only the nearest destination after it, so the merged prompt never
depends on later tokens; ``"paper"``: a destination only absorbs earlier sources, but whether a source is kept
depends on later ones). The block is still `mame.blocks.block_forward`; this module supplies what a causal LM adds to
it, chosen by the family's description (`AttentionLayout.cache_index`, `AttentionLayout.rotary`):

* `CausalMerge`, the merge step: MaMe, then the merged tokens put back in position order (fused destinations and
  preserved sources interleaved as they were, where `mame.merge` lists all destinations first), so that causal
  attention by position stays valid. Each token keeps the position of its destination (`SequenceState.positions`)
  and the row of the input it is anchored at (`SequenceState.index`), from which its rotary ``cos``/``sin`` are
  gathered, never recomputed from 0..L'.
* `CausalTokens`, the token layout of a causal LM's forward: attention where a key is visible to a query when its
  position is not later (and it is real), plus log(size) for proportional attention; keys and values written into
  transformers' ``Cache`` with ``update(k, v, layer_idx)``, so a merged layer's cache is shorter; grouped-query
  attention without copying the shared key/value heads.
* `CacheRecord`, kept on the cache object itself: position, realness and size of every cached key per layer, and the
  next position of each sequence. Later forwards (``generate``'s decoding steps) read it, so new tokens get the
  positions they would have had without merging, never one derived from the shorter cache length.

Layout of a batch of prompts. Real tokens come first in each row while the model runs (left padding, which
generation uses, is moved to the end, because the alternating partition must split each prompt as it would split it
alone); the final norm's input is then put back right-aligned at the prompt's length: row ``b`` ends with its merged
tokens in position order, padded in front with zeros, so the last column is always the last prompt token.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch

from mame.attention import attend
from mame.blocks import MameMerge, TokenState, _metric
from mame.core import FusionPlan, merge

RECORD_ATTRIBUTE = "_mame_record"  # where a transformers Cache keeps its `CacheRecord`


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """The rotation of rotary position embeddings on the last dimension: (x1, x2) -> (-x2, x1) by halves."""
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


def rotary_embedding(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor,
                     sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary position embeddings (Llama, Qwen2, Mistral) on (B, L, heads, head_dim) queries and keys, from each
    token's (B, L, head_dim) ``cos``/``sin``."""
    cos, sin = cos.unsqueeze(2), sin.unsqueeze(2)
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


@dataclass
class CacheRecord:
    """What mame knows about the keys in one transformers ``Cache`` (kept on it as ``_mame_record``).

    Attributes:
        positions: per layer, (B, K) long: the position of each cached key (a merged key: its destination's).
        valid: per layer, (B, K) bool: False for padding slots (a short prompt of a batch, padded after merging).
        sizes: per layer, (B, K) float32: how many prompt tokens each cached key stands for (0 on padding).
        next_position: (B,) long, the position the next token of each sequence gets; None before the first forward.
    """

    positions: dict[int, torch.Tensor] = field(default_factory=dict)
    valid: dict[int, torch.Tensor] = field(default_factory=dict)
    sizes: dict[int, torch.Tensor] = field(default_factory=dict)
    next_position: torch.Tensor | None = None

    def kv_lengths(self) -> list[list[int]]:
        """Real cached keys per layer (in layer order), one count per sequence."""
        return [self.valid[layer].sum(dim=1).tolist() for layer in sorted(self.valid)]

    def layer(self, layer: int, batch: int, stored: int, device: torch.device
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The record of ``layer``'s ``stored`` cached keys; a cache filled outside mame (an unpatched prefill) is
        taken as unpadded keys at positions 0..stored-1, each standing for one token."""
        if layer not in self.positions:
            if stored and self.next_position is None:
                self.next_position = torch.full((batch,), stored, dtype=torch.long, device=device)
            self.positions[layer] = torch.arange(stored, device=device).expand(batch, -1)
            self.valid[layer] = torch.ones(batch, stored, dtype=torch.bool, device=device)
            self.sizes[layer] = torch.ones(batch, stored, device=device)
        positions = self.positions[layer]
        if positions.shape != (batch, stored):
            raise RuntimeError(f"the KV cache of layer {layer} holds {stored} keys for {batch} sequences, but mame's "
                               f"record has {tuple(positions.shape)}: the cache was changed outside mame (cropped, "
                               "reordered to another batch, or a sliding-window cache)")
        return positions, self.valid[layer], self.sizes[layer]


def cache_record(cache: object | None) -> CacheRecord | None:
    """The `CacheRecord` kept on a transformers ``Cache`` (None when there is no cache or none was kept)."""
    return None if cache is None else getattr(cache, RECORD_ATTRIBUTE, None)


def attach_record(cache: object, record: CacheRecord) -> None:
    """Keep ``record`` on ``cache`` (read by every later forward that continues from it)."""
    setattr(cache, RECORD_ATTRIBUTE, record)


def output_cache(output: object) -> object | None:
    """The KV cache a transformers model output carries: ``output.cache`` (transformers >= 5.24) or
    ``output.past_key_values`` (earlier)."""
    cache = getattr(output, "cache", None)
    if cache is None and "cache" not in getattr(output, "keys", lambda: ())():
        cache = getattr(output, "past_key_values", None)
    return cache


def cache_argument(module: object) -> str:
    """The name under which ``module``'s forward takes its KV cache: ``"cache"`` (transformers >= 5.24) or
    ``"past_key_values"``."""
    return _cache_argument(type(module))


@functools.lru_cache(maxsize=None)
def _cache_argument(module_class: type) -> str:
    import inspect

    forward = module_class.forward
    for cls in module_class.__mro__:  # a patched class's own forward takes both; its parent's tells the version
        if "forward" in vars(cls) and not getattr(vars(cls)["forward"], "_mame_takes_both", False):
            forward = vars(cls)["forward"]
            break
    return "cache" if "cache" in inspect.signature(forward).parameters else "past_key_values"


def cache_length(cache: object, layer: int) -> int:
    """Keys stored for ``layer`` in a transformers ``Cache`` (0 before its first update)."""
    layers = getattr(cache, "layers", None)
    if layers is not None and layer >= len(layers):
        return 0
    return int(cache.get_seq_length(layer))


@dataclass
class SequenceState:
    """The causal-LM part of one forward's `TokenState` (``state.sequence``), made by the patched model's forward.

    Attributes:
        positions: (B, L) long, the position of each current token (a merged token: its destination's).
        index: (B, L) long, the row of this forward's (real-first) input each current token is anchored at: its own,
            or its destination's; rotary ``cos``/``sin`` are gathered with it.
        columns: (B, L_in) long, the column of the caller's input each row of the real-first input came from.
        prefill: this forward reads a prompt from an empty cache: merging allowed (new tokens never merge).
        input_length: L_in, the caller's sequence length (outputs are re-aligned to it).
        cache: the transformers ``Cache`` the layers write to (None without one, e.g. ``use_cache=False``).
        record: the `CacheRecord` of ``cache`` (a fresh one without a cache).
        rotary_table: the (cos, sin) each layer was handed for the input rows (None for learned positions).
        merged: some merge of this forward changed the tokens (``index`` is no longer the identity).
    """

    positions: torch.Tensor
    index: torch.Tensor
    columns: torch.Tensor
    prefill: bool
    input_length: int
    cache: object | None = None
    record: CacheRecord = field(default_factory=CacheRecord)
    rotary_table: tuple[torch.Tensor, torch.Tensor] | None = None
    merged: bool = False
    _layout_key: tuple | None = field(default=None, repr=False)
    _layout: "CausalTokens | None" = field(default=None, repr=False)

    def bind(self, cache: object | None, rotary_table: tuple[torch.Tensor, torch.Tensor] | None) -> None:
        """Take the cache and the rotary table a layer was handed (the same for every layer of a forward)."""
        if cache is not None and self.cache is None:
            self.cache = cache
            record = cache_record(cache)
            if record is None:
                attach_record(cache, self.record)
            else:
                self.record = record
        if rotary_table is not None and self.rotary_table is None:
            self.rotary_table = rotary_table

    def token_layout(self, state: TokenState, x: torch.Tensor, proportional: bool) -> "CausalTokens":
        """The `CausalTokens` of the current tokens (made once per merge, shared by the blocks until the next)."""
        key = (state.sizes, state.mask, self.positions, self.rotary_table, proportional, x.dtype)
        if self._layout_key is not None and all(a is b for a, b in zip(self._layout_key, key)):
            return self._layout
        cos = sin = None
        if self.rotary_table is not None:
            cos, sin = (self._gather(table) for table in self.rotary_table)
        sizes = state.ones_sizes(x) if state.mask is None else state.token_weights(x)
        self._layout_key = key
        self._layout = CausalTokens(self, self.positions, state.mask, sizes, proportional, cos, sin)
        return self._layout

    def _gather(self, table: torch.Tensor) -> torch.Tensor:
        """Rows of a (B or 1, L_in, c) per-input-row table at each current token's anchor row."""
        batch = self.index.shape[0]
        table = table.expand(batch, -1, -1)
        if not self.merged:
            return table  # every token still sits at its own input row
        return table.gather(1, self.index.unsqueeze(-1).expand(-1, -1, table.shape[-1]))

    def store(self, layer: int, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor, valid: torch.Tensor,
              sizes: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Write this layer's new keys and values (B, L, kv_heads, head_dim) to the cache and its record; return
        every key and value the queries see (B, K, kv_heads, head_dim) with their positions, realness and sizes."""
        if self.cache is None:
            return k, v, positions, valid, sizes
        batch, new = k.shape[:2]
        before = cache_length(self.cache, layer)
        old_positions, old_valid, old_sizes = self.record.layer(layer, batch, before, k.device)
        keys, values = self.cache.update(k.transpose(1, 2), v.transpose(1, 2), layer)
        stored = cache_length(self.cache, layer)
        if keys.shape[-2] != before + new or stored != before + new:
            raise RuntimeError(f"layer {layer}'s KV cache kept {stored} of {before + new} keys (a sliding-window or "
                               "static cache?); mame's causal merging needs a cache that keeps every key "
                               "(transformers' DynamicCache without a sliding window)")
        record = self.record
        record.positions[layer] = torch.cat([old_positions, positions], dim=1)
        record.valid[layer] = torch.cat([old_valid, valid], dim=1)
        record.sizes[layer] = torch.cat([old_sizes, sizes], dim=1)
        return (keys.transpose(1, 2), values.transpose(1, 2), record.positions[layer], record.valid[layer],
                record.sizes[layer])


@dataclass(frozen=True)
class CausalTokens:
    """The token layout of a causal LM's forward (`mame.attention.TokenLayout`): tokens stay (B, L, ...), real
    tokens first in each row; attention goes through `attend_cached`."""

    sequence: SequenceState
    positions: torch.Tensor  # (B, L) long
    mask: torch.Tensor | None  # (B, L) bool, real tokens; None when all are
    sizes: torch.Tensor  # (B, L) float32, prompt tokens each token stands for (0 on padding)
    proportional: bool
    cos: torch.Tensor | None  # (B, L, head_dim): rotary tables at each token's position
    sin: torch.Tensor | None

    def pack(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def unpack(self, tokens: torch.Tensor) -> torch.Tensor:
        return tokens

    def attend(self, q, k, v, scale, dropout_p, qk_norm):
        raise TypeError("a causal LM's attention needs its layer's KV-cache index: describe the family with "
                        "AttentionLayout.cache_index")

    def attend_cached(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, dropout_p: float,
                      qk_norm, rotary, layer: int) -> torch.Tensor:
        """Causal attention of (B, L, heads, head_dim) queries on the cached keys and these (B, L, kv_heads,
        head_dim) keys and values (kv_heads divides heads: grouped-query attention), which are written to the cache
        first; returns (B, L, heads * head_dim)."""
        q, k = qk_norm(q, k)
        if rotary is not None:
            if self.cos is None:
                raise RuntimeError("this layer applies rotary position embeddings but was handed none "
                                   "(position_embeddings)")
            q, k = rotary(q, k, self.cos, self.sin)
        valid = self.mask if self.mask is not None else torch.ones(self.positions.shape, dtype=torch.bool,
                                                                    device=q.device)
        keys, values, key_positions, key_valid, key_sizes = self.sequence.store(layer, k, v, self.positions, valid,
                                                                                self.sizes)
        if self.mask is None and not self.proportional and keys.shape[1] == k.shape[1]:
            # A prompt without padding or earlier keys: its tokens are in position order, so "key position <= query
            # position" is the lower triangle, and fused causal attention needs no mask.
            return causal_attend(q, keys, values, scale, dropout_p)
        # A key is visible to a query at or after its position; padding queries see every real key (their rows are
        # discarded, but must stay finite).
        visible = key_valid[:, None, :] & (key_positions[:, None, :] <= self.positions[:, :, None])
        if self.mask is not None:
            visible = visible | (~self.mask[:, :, None] & key_valid[:, None, :])
        bias = torch.zeros(visible.shape, dtype=q.dtype, device=q.device).masked_fill_(~visible, float("-inf"))
        if self.proportional:
            bias = bias + key_sizes.clamp_min(1e-30).log().to(q.dtype)[:, None, :]  # ToMe's proportional attention
        return grouped_attend(q, keys, values, bias, scale, dropout_p)


def causal_attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                  dropout_p: float = 0.0) -> torch.Tensor:
    """Lower-triangular (causal) attention of (B, L, heads, d) queries on (B, L, kv_heads, d) keys and values
    (grouped-query heads read in place); returns (B, L, heads * d)."""
    batch, length, heads, dim = q.shape
    out = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), dropout_p=dropout_p, is_causal=True, scale=scale,
        enable_gqa=k.shape[2] != heads)
    return out.transpose(1, 2).reshape(batch, length, heads * dim)


def grouped_attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor, scale: float,
                   dropout_p: float = 0.0) -> torch.Tensor:
    """`mame.attention.attend` for (B, Lq, heads, d) queries on (B, K, kv_heads, d) keys and values with a (B, Lq, K)
    additive bias, where each group of ``heads / kv_heads`` consecutive query heads shares one key/value head: the
    group's queries are stacked along the query axis, so the shared heads are read in place, never copied."""
    batch, length, heads, dim = q.shape
    kv_heads = k.shape[2]
    if heads % kv_heads:
        raise ValueError(f"{heads} query heads cannot share {kv_heads} key/value heads")
    group = heads // kv_heads
    if group == 1:
        return attend(q, k, v, bias[:, None], scale, dropout_p)
    stacked = q.view(batch, length, kv_heads, group, dim).permute(0, 3, 1, 2, 4).reshape(batch, group * length,
                                                                                       kv_heads, dim)
    stacked_bias = bias[:, None].expand(-1, group, -1, -1).reshape(batch, 1, group * length, -1)
    out = attend(stacked, k, v, stacked_bias, scale, dropout_p)  # (B, group * Lq, kv_heads * d)
    out = out.view(batch, group, length, kv_heads, dim).permute(0, 2, 3, 1, 4)
    return out.reshape(batch, length, heads * dim)


@dataclass(frozen=True)
class CausalMerge:
    """The merge step of a causal LM's block: `MameMerge`'s MaMe (with a causal mode), then the merged tokens back in
    position order, each keeping its destination's position and anchor row. Merges only in prefill."""

    mame: MameMerge

    @property
    def needs_keys(self) -> bool:
        return self.mame.needs_keys

    def __call__(self, x: torch.Tensor, state: TokenState, keys: torch.Tensor | None) -> torch.Tensor:
        sequence = state.sequence
        if sequence is None or not sequence.prefill:
            return x  # tokens that continue a cache never merge
        m = self.mame
        mask_in = state.mask
        y, plan = merge(x, m.tau, state.num_special, m.partition, m.prune, m.batch_rule, m.causal, m.eps,
                        dst_ratio=m.dst_ratio, seed=m.seed, sizes=state.sizes, mask=mask_in,
                        size_weighted=m.size_weighted, check=False, metric=_metric(m.metric, keys))
        if y is x:  # nothing merged in any sample: the tokens, their order and sizes are the input's
            return x
        order, anchor, real = position_order(plan, mask_in, y.shape[1])
        y = y.gather(1, order.unsqueeze(-1).expand(-1, -1, y.shape[-1])) * real.unsqueeze(-1).to(y.dtype)
        state.sizes = (plan.sizes.gather(1, order) * real).detach()
        state.mask = None if bool(real.all()) else real
        sequence.positions = sequence.positions.gather(1, anchor)
        sequence.index = sequence.index.gather(1, anchor)
        sequence.merged = True
        return y


def position_order(plan: FusionPlan, mask: torch.Tensor | None,
                   out_length: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Put a merge's output back in position order. `mame.merge` lays out each sample as [specials, fused
    destinations, preserved sources]; here every kept token (special, real destination, preserved source) is placed
    in the order of its input position, so destinations and preserved sources interleave as in the input.

    Args:
        plan: the merge's `FusionPlan`.
        mask: (B, L) bool real tokens of the merge's input (real first), or None.
        out_length: L', the merge output's length.

    Returns:
        ``(order, anchor, real)``, each (B, L'): the merge-output slot to read for each position-ordered slot, the
        input position that slot is anchored at (its destination or its own), and whether the slot is real.
    """
    batch, length = plan.sizes_in.shape
    device = plan.sizes_in.device
    kept = torch.zeros(batch, length, dtype=torch.bool, device=device)
    kept[:, : plan.num_special] = True
    kept[:, plan.dst_idx] = True
    kept[:, plan.src_idx] = plan.preserved
    if mask is not None:
        kept &= mask
    holder = plan.source_map  # the merge-output slot of every kept token
    slot = torch.where(kept, kept.cumsum(dim=1) - 1, out_length)  # its ordered slot; a spare column if not kept
    order = torch.zeros(batch, out_length + 1, dtype=torch.long, device=device)
    order.scatter_(1, slot, holder.clamp_min(0))
    anchor = torch.zeros(batch, out_length + 1, dtype=torch.long, device=device)
    anchor.scatter_(1, slot, torch.arange(length, device=device).expand(batch, -1))
    real = torch.arange(out_length, device=device) < kept.sum(dim=1, keepdim=True)
    return order[:, :out_length], anchor[:, :out_length], real


def real_first(mask: torch.Tensor) -> torch.Tensor:
    """(B, L) long permutation putting each row's real tokens first (in order), then its padding (in order)."""
    real = mask.long()
    lengths = real.sum(dim=1, keepdim=True)
    target = torch.where(mask, real.cumsum(dim=1) - 1, lengths + (1 - real).cumsum(dim=1) - 1)
    return torch.empty_like(target).scatter_(1, target, torch.arange(mask.shape[1], device=mask.device)
                                            .expand_as(target).contiguous())


def right_align(x: torch.Tensor, mask: torch.Tensor | None, length: int) -> torch.Tensor:
    """(B, L', ...) tokens whose real tokens come first in each row (``mask``; None = all real) as (B, length, ...),
    each row's real tokens at its end, zeros in front."""
    batch, current = x.shape[:2]
    if mask is None and current == length:
        return x
    lengths = torch.full((batch,), current, device=x.device) if mask is None else mask.sum(dim=1)
    target = torch.arange(current, device=x.device) + (length - lengths)[:, None]
    if mask is not None:
        target = torch.where(mask, target, length)  # padding to a spare column, cut off below
    out = x.new_zeros(batch, length + 1, *x.shape[2:])
    index = target.view(batch, current, *([1] * (x.dim() - 2))).expand_as(x)
    return out.scatter_(1, index, x)[:, :length]
