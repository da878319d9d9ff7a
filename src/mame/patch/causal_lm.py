"""MaMe in transformers' decoder-only language models: the prompt merged during prefill, a shorter KV cache.

``mame.patch.hf(lm, tau=..., layers=..., causal="strict")`` (or `patch_causal_lm`) patches ``LlamaForCausalLM``,
``Qwen2ForCausalLM``, ``MistralForCausalLM`` (rotary positions, grouped-query attention) and ``GPT2LMHeadModel``
(learned absolute positions, fused ``c_attn``). As for every family, a model is a *description* on the one block
forward (`mame.blocks.block_forward`): where its layer keeps its norms, attention and MLP (`BlockLayout`) and how its
attention runs in pieces (`AttentionLayout`, with the layer's cache index and its rotary embedding); the causal parts
(positions, causal mask, cache writes, merge order) are `mame.causal`'s.

What a patched LM does:

* **Prefill** (a forward from an empty or no cache) merges the prompt's hidden states in the chosen layers, after
  their attention (eq 12), with a causal MaMe (`causal="strict"`, the default: the merged prompt never depends on
  later tokens; ``"paper"``: section 5's mask, whose kept sources depend on later tokens, harmless for a finished
  prompt). The merged sequence stays in position order; each token keeps its destination's position, so rotary
  ``cos``/``sin`` are gathered at it. A layer's KV cache holds the tokens that reach its attention, so a layer after a
  merge caches fewer keys: ``lm.mame.last_kv_lengths`` and ``lm.mame.last_token_counts`` report them. The first
  ``num_special`` prompt tokens (default 1: the attention sink, BOS) never merge.
* **Decoding** (a forward that continues a cache, as ``generate`` does after prefill) never merges: new tokens get the
  positions they would have had without merging (from ``position_ids``, from the ``attention_mask``'s count of real
  tokens, or from the cache's record, never from the shorter cache length) and attend to the merged keys.
* **Padding**: a batch of prompts padded on either side (generation pads on the left) is merged prompt by prompt
  (each as it would be alone); the logits come back right-aligned at the input length: row ``b``'s last columns are
  its merged tokens' outputs in position order (``lm.mame.last_anchors`` says which input column each holds), zeros
  in front, and the last column is the last prompt token's, which is what generation reads.

Refused with a clear error: non-causal merging (``causal=False``), ``labels`` (compute the loss from the logits:
merged outputs do not line up with the labels), ``token_type_ids``, cross-attention, attention weights, a sliding
window, a cache changed outside mame (cropped or reordered to other sequences).
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass
from operator import attrgetter
from typing import Callable, Sequence

import torch
from torch import nn

from mame.attention import AttentionLayout
from mame.blocks import BlockLayout, MergeRuntime, block_forward
from mame.causal import (CausalMerge, SequenceState, cache_argument, cache_record, output_cache, real_first,
                         right_align, rotary_embedding)
from mame.patch.base import Picklable, set_attributes, swap_class, unpatch
from mame.patch.options import mame_mergers, resolve_layers, resolve_taus


def _no_qk_norm(attn: nn.Module, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return q, k


@dataclass(frozen=True)
class _GroupedQKV:
    """Separate q / k / v projections split into heads of ``head_dim`` each (keys and values may have fewer heads
    than queries: grouped-query attention)."""

    q: str = "q_proj"
    k: str = "k_proj"
    v: str = "v_proj"

    def __call__(self, attn: nn.Module, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        shape = (*h.shape[:-1], -1, attn.head_dim)
        return tuple(attrgetter(name)(attn)(h).view(shape) for name in (self.q, self.k, self.v))


def _o_proj(attn: nn.Module, out: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    return attn.o_proj(out)


def _gpt2_qkv(attn: nn.Module, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """GPT-2's fused ``c_attn`` (a Conv1D giving [q | k | v]), split into heads."""
    shape = (*h.shape[:-1], -1, attn.head_dim)
    return tuple(part.view(shape) for part in attn.c_attn(h).split(attn.split_size, dim=-1))


def _gpt2_output(attn: nn.Module, out: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    return attn.resid_dropout(attn.c_proj(out))


# Llama, Qwen2, Mistral: q/k/v/o projections, rotary positions, key/value heads shared by groups of query heads.
ROTARY_ATTENTION = AttentionLayout(qkv=_GroupedQKV(), qk_norm=_no_qk_norm, output=_o_proj, scale=attrgetter("scaling"),
                                   dropout=attrgetter("attention_dropout"),
                                   heads=attrgetter("config.num_attention_heads"), cache_index=attrgetter("layer_idx"),
                                   rotary=rotary_embedding)
ROTARY_LAYOUT = BlockLayout(attention=ROTARY_ATTENTION, norm1="input_layernorm", attn="self_attn", ls1=None,
                            drop_path1=None, norm2="post_attention_layernorm", mlp="mlp", ls2=None, drop_path2=None)
# GPT-2: fused c_attn, learned absolute positions (added to the embeddings, so attention needs none).
GPT2_ATTENTION = AttentionLayout(qkv=_gpt2_qkv, qk_norm=_no_qk_norm, output=_gpt2_output, scale=attrgetter("scaling"),
                                 dropout=attrgetter("attn_dropout.p"), heads=attrgetter("num_heads"),
                                 cache_index=attrgetter("layer_idx"), rotary=None)
GPT2_LAYOUT = BlockLayout(attention=GPT2_ATTENTION, norm1="ln_1", attn="attn", ls1=None, drop_path1=None,
                          norm2="ln_2", mlp="mlp", ls2=None, drop_path2=None)


def _refuse_window(model: nn.Module) -> str | None:
    if getattr(model.config, "sliding_window", None) is not None:
        return (f"sliding-window attention (config.sliding_window={model.config.sliding_window}) is not supported: "
                "its cache drops keys by count, which merged keys do not follow. For prompts shorter than the window "
                "set model.config.sliding_window = None before patching (same outputs)")
    return None


def _refuse_gpt2(model: nn.Module) -> str | None:
    if model.config.add_cross_attention:
        return "GPT-2 with cross-attention (add_cross_attention=True) is not supported"
    return None


@dataclass(frozen=True)
class _LMFamily:
    """Where a causal LM keeps its layers and final norm, and how its layers are described."""

    layers: str
    final_norm: str
    layout: BlockLayout
    refuse: Callable[[nn.Module], str | None] = lambda model: None


_FAMILIES: dict[str, _LMFamily] = {
    "LlamaForCausalLM": _LMFamily("model.layers", "model.norm", ROTARY_LAYOUT),
    "Qwen2ForCausalLM": _LMFamily("model.layers", "model.norm", ROTARY_LAYOUT, _refuse_window),
    "MistralForCausalLM": _LMFamily("model.layers", "model.norm", ROTARY_LAYOUT, _refuse_window),
    "GPT2LMHeadModel": _LMFamily("transformer.h", "transformer.ln_f", GPT2_LAYOUT, _refuse_gpt2),
}


def lm_family(model: nn.Module) -> _LMFamily | None:
    """The description of ``model``'s causal-LM family, None when it is not one of them."""
    for cls in type(model).__mro__:
        family = _FAMILIES.get(cls.__name__)
        if family is not None and cls.__module__.startswith("transformers."):
            return family
    return None


# --------------------------------------------------------------------------------------------- patched modules
class CausalRuntime(Picklable):
    """Mixin for a patched LM's `MergeRuntime` (``lm.mame``): the last forward's causal records next to the
    runtime's own (``last_token_counts``: real tokens after each layer, averaged over the batch)."""

    @property
    def last_sequence(self) -> SequenceState | None:
        """The `SequenceState` of this thread's last forward (None before the first)."""
        state = self.state
        return None if state is None else state.sequence

    @property
    def last_kv_lengths(self) -> list[list[int]]:
        """Real keys in each layer's KV cache after this thread's last forward, one count per sequence (empty
        without a cache)."""
        sequence = self.last_sequence
        if sequence is None or sequence.cache is None:
            return []
        return sequence.record.kv_lengths()

    @property
    def last_anchors(self) -> torch.Tensor | None:
        """(B, L_in) for every column of the last prefill's output, the column of the input holding the
        destination (or own token) that output stands for; -1 for the zero padding in front. A merged token stands
        for its destination and the earlier sources it absorbed, so it depends on no input column after its
        anchor."""
        sequence = self.last_sequence
        if sequence is None:
            return None
        columns = sequence.columns.gather(1, sequence.index)
        state = self.state
        anchors = right_align(columns + 1, state.mask, sequence.input_length)
        return anchors - 1


_SIGNATURES: dict[type, inspect.Signature] = {}


def _signature(cls: type) -> inspect.Signature:
    if cls not in _SIGNATURES:
        _SIGNATURES[cls] = inspect.signature(cls.forward)
    return _SIGNATURES[cls]


# Layer arguments that would change what the layer computes, and why they cannot be honoured.
_REFUSED_LAYER_ARGUMENTS = {
    "encoder_hidden_states": "cross-attention",
    "output_attentions": "attention weights (the patched attention returns none)",
}


class CausalLayer(Picklable):
    """Mixin put in front of a causal LM's decoder layer: the forward is the shared `block_forward`. The layer's own
    attention mask and position ids are not needed (the forward's `SequenceState` holds each token's position and
    realness); its cache and rotary table are taken from its arguments."""

    def forward(self, hidden_states, *args, **kwargs):
        runtime: MergeRuntime = self._mame_runtime
        state = runtime.active_state
        if state is None or state.sequence is None:
            raise RuntimeError("a mame-patched causal LM layer runs inside its patched model's forward; call the "
                               "model (or mame.unpatch it first)")
        parent = type(self).__bases__[-1]
        arguments = _signature(parent).bind(self, hidden_states, *args, **kwargs).arguments
        extra = dict(arguments.pop("kwargs", {}))
        arguments.update(extra)
        for name, what in _REFUSED_LAYER_ARGUMENTS.items():
            value = arguments.get(name)
            if value is not None and value is not False:
                raise ValueError(f"a mame-patched {parent.__name__} cannot return or use {what}")
        cache = arguments.get("cache", arguments.get("past_key_values"))  # renamed in transformers 5.24
        state.sequence.bind(cache, arguments.get("position_embeddings"))
        merger = self._mame_merger if state.sequence.prefill else None
        return block_forward(self, hidden_states, self._mame_layout, runtime, merger, self._mame_proportional)


class AlignedOutput(Picklable):
    """Mixin for the final norm of a patched LM: a prefill's merged, real-first tokens are put back right-aligned at
    the input length before the norm (so the language-model head's last column is the last prompt token)."""

    def forward(self, x, *args, **kwargs):
        state = self.mame.active_state
        sequence = None if state is None else state.sequence
        if sequence is not None and sequence.prefill:
            x = right_align(x, state.mask, sequence.input_length)
        return super().forward(x, *args, **kwargs)


class CausalLMForward(Picklable):
    """Mixin for a patched causal LM: each forward gets its own state with every token's position and realness
    (see the module docstring); arguments after ``input_ids`` are keyword-only."""

    def forward(self, input_ids=None, *, attention_mask=None, position_ids=None, cache=None, past_key_values=None,
                inputs_embeds=None, labels=None, use_cache=None, logits_to_keep=0, **kwargs):
        # transformers 5.24 renamed the cache argument ``past_key_values`` to ``cache``: either is taken.
        if cache is not None and past_key_values is not None and cache is not past_key_values:
            raise ValueError("give the KV cache once, as cache or as past_key_values")
        past_key_values = cache if cache is not None else past_key_values
        if labels is not None:
            raise ValueError("a mame-patched causal LM takes no labels: merged outputs do not line up with them; "
                             "compute the loss from the logits (lm.mame.last_anchors says which token each holds)")
        for name in ("token_type_ids", "encoder_hidden_states"):
            if kwargs.get(name) is not None:
                raise ValueError(f"a mame-patched causal LM cannot honour {name}")
        if kwargs.get("output_attentions"):
            raise ValueError("a mame-patched causal LM returns no attention weights (output_attentions)")
        tokens = input_ids if input_ids is not None else inputs_embeds
        if tokens is None:
            raise ValueError("give input_ids or inputs_embeds")
        batch, length = tokens.shape[:2]
        device = tokens.device
        with self.mame.scope(self.training) as state:
            record = cache_record(past_key_values)
            prefill = past_key_values is None or (record is None and past_key_values.get_seq_length() == 0)
            if attention_mask is not None:
                if attention_mask.dim() != 2 or attention_mask.shape[0] != batch or attention_mask.shape[1] < length:
                    raise ValueError(f"attention_mask must be a (batch, past + new tokens) padding mask covering the "
                                     f"{length} new tokens, got shape {tuple(attention_mask.shape)}")
                real = attention_mask[:, -length:].bool()
            else:
                real = torch.ones(batch, length, dtype=torch.bool, device=device)
            if position_ids is not None:
                positions = position_ids.to(device).expand(batch, length)
            else:
                counted = (real.long().cumsum(dim=1) - 1).clamp_min(0)
                # Continuing a cache: from its record's next positions (a cache filled without mame holds every
                # earlier token, so its length is the next position).
                start = None if record is None else record.next_position
                if start is None and not prefill:
                    start = torch.full((batch,), past_key_values.get_seq_length(), dtype=torch.long, device=device)
                positions = counted if start is None or prefill else counted + start[:, None]
            columns = torch.arange(length, device=device).expand(batch, -1)
            padded = not bool(real.all())
            if prefill and padded:
                if bool((real.sum(dim=1) <= state.num_special).any()):
                    raise ValueError(f"every prompt needs more than its {state.num_special} leading tokens that never "
                                     "merge; some row of the attention_mask has fewer real tokens")
                columns = real_first(real)
                real = real.gather(1, columns)
                positions = positions.gather(1, columns)
                # Padding gets the positions after its row's last real token (never read: padding is masked).
                tail = positions.gather(1, (real.sum(dim=1, keepdim=True) - 1).clamp_min(0)) + 1
                positions = torch.where(real, positions, tail + (~real).long().cumsum(dim=1) - 1)
                if input_ids is not None:
                    input_ids = input_ids.gather(1, columns)
                else:
                    inputs_embeds = inputs_embeds.gather(1, columns.unsqueeze(-1).expand_as(inputs_embeds))
            state.mask = real if padded else None
            sequence = SequenceState(positions=positions, index=torch.arange(length, device=device).expand(batch, -1),
                                     columns=columns, prefill=prefill, input_length=length)
            if record is not None:
                sequence.record = record
            state.sequence = sequence
            kwargs[cache_argument(self)] = past_key_values
            output = super().forward(input_ids=input_ids, attention_mask=None, position_ids=positions,
                                     inputs_embeds=inputs_embeds, use_cache=use_cache, logits_to_keep=logits_to_keep,
                                     **kwargs)
            returned = output_cache(output)
            if returned is not None and sequence.cache is not returned:
                raise RuntimeError("the patched layers were not handed the model's KV cache (has transformers renamed "
                                   "the layers' cache argument?); their keys would be missing from it")
            last = torch.where(real, positions, -1).amax(dim=1) + 1
            previous = sequence.record.next_position
            sequence.record.next_position = last if previous is None or prefill else torch.maximum(previous, last)
            return output

    forward._mame_takes_both = True  # `mame.causal.cache_argument` looks past it to the parent's forward


# ------------------------------------------------------------------------------------------------------ patching
def patch_causal_lm(model: nn.Module, tau: float | Sequence[float] = 0.8, layers: int | Sequence[int] = 8, *,
                    causal: bool | str | None = "strict", batch_rule: str = "per_sample",
                    partition: str = "alternating", prune: bool = True, size_weighted: bool = False,
                    proportional_attention: bool = True, check: bool = False, metric: str = "x",
                    num_special: int = 1, similarity: str = "cosine", seed: int = 0) -> nn.Module:
    """Apply causal MaMe in place to a transformers causal LM (see the module docstring); undo with
    ``mame.unpatch(model)``.

    Args:
        model: ``LlamaForCausalLM``, ``Qwen2ForCausalLM``, ``MistralForCausalLM`` or ``GPT2LMHeadModel``.
        tau: similarity threshold in [-1, 1], one for all merging layers or one per merging layer; 1 merges nothing.
        layers: the first K layers (int) or a list of layer indices that merge during prefill.
        causal: ``"strict"`` (default; prefix-causal) or ``"paper"`` / True (section 5's mask); None = "strict".
            ``False`` is refused: a prompt token would absorb later ones.
        batch_rule, partition, prune, metric, check, similarity, seed: as for `mame.patch.timm`.
        size_weighted: fuse tokens weighted by how many prompt tokens each stands for (merges after the first).
        proportional_attention: add log(size) to each key's logit (prefill and decoding).
        num_special: leading prompt tokens that never merge (the attention sink).
    """
    family = lm_family(model)
    if family is None:
        raise ValueError(f"mame.patch.causal_lm supports transformers' {', '.join(_FAMILIES)}, got "
                         f"{type(model).__name__}")
    reason = family.refuse(model)
    if reason is not None:
        raise ValueError(f"mame.patch.causal_lm: {reason}")
    if causal is None:
        causal = "strict"
    if causal is False:
        raise ValueError("a causal LM needs causal merging: causal='strict' (prefix-causal) or 'paper' (section 5); "
                         "causal=False would let prompt tokens absorb later ones, which decoding cannot follow")
    if isinstance(num_special, bool) or not isinstance(num_special, int) or num_special < 0:
        raise ValueError(f"num_special must be a non-negative int, got {num_special!r}")
    unpatch(model)
    blocks = list(attrgetter(family.layers)(model))
    indices = resolve_layers(layers, len(blocks))
    taus = resolve_taus(tau, len(indices))
    inner = mame_mergers(indices, taus, partition=partition, prune=prune, batch_rule=batch_rule, causal=causal,
                         size_weighted=size_weighted, check=check, metric=metric, similarity=similarity, seed=seed)
    settings = dict(method="mame", tau=taus, layers=indices, causal=causal, batch_rule=batch_rule,
                    partition=partition, prune=prune, size_weighted=size_weighted,
                    proportional_attention=proportional_attention, metric=metric, num_special=num_special,
                    similarity=similarity, seed=seed)
    runtime = MergeRuntime(settings=settings, layers=indices, num_special=num_special, packed=False)
    for index, block in enumerate(blocks):
        merger = CausalMerge(inner[index]) if index in inner else None
        set_attributes(block, runtime, _mame_layout=family.layout, _mame_runtime=runtime, _mame_merger=merger,
                       _mame_proportional=proportional_attention)
        swap_class(block, CausalLayer, runtime)
    norm = attrgetter(family.final_norm)(model)
    swap_class(norm, AlignedOutput, runtime)
    set_attributes(norm, runtime, mame=runtime)
    swap_class(model, CausalLMForward, runtime)
    swap_class(runtime, CausalRuntime, runtime)
    set_attributes(model, runtime, mame=runtime)
    return model


@functools.lru_cache(maxsize=None)
def is_causal_lm_class(cls: type) -> bool:
    """True for the transformers causal-LM classes `patch_causal_lm` describes (and their subclasses)."""
    return any(base.__name__ in _FAMILIES and base.__module__.startswith("transformers.") for base in cls.__mro__)
