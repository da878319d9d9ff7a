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

import inspect
from dataclasses import dataclass
from operator import attrgetter
from typing import Callable, Sequence

import torch
from torch import nn

from mame.attention import AttentionLayout
from mame.blocks import BlockLayout
from mame.budget import Budget, block_budget
from mame.patch.base import Picklable, ScopedForward, set_attributes, swap_class
from mame.patch.causal_lm import is_causal_lm_class, patch_causal_lm
from mame.patch.options import install_mame, refuse_flops, resolve_preset


def _no_qk_norm(attn: nn.Module, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return q, k


@dataclass(frozen=True)
class _QKV:
    """Separate q / k / v projections, by attribute path inside the attention module, split into heads."""

    q: str
    k: str
    v: str
    heads: Callable[[nn.Module], int]

    def __call__(self, attn: nn.Module, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        shape = (*h.shape[:-1], self.heads(attn), -1)
        q, k, v = (attrgetter(name)(attn)(h).view(shape) for name in (self.q, self.k, self.v))
        return q, k, v


@dataclass(frozen=True)
class _Projection:
    """The attention's output projection, by attribute path (``o_proj``, ``out_proj``, ``output.dense``)."""

    name: str

    def __call__(self, attn: nn.Module, out: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        return attrgetter(self.name)(attn)(out)


def projection_attention(output: str, scale: str, dropout: str, heads: str, q: str = "q_proj", k: str = "k_proj",
                         v: str = "v_proj") -> AttentionLayout:
    """transformers' attention modules with separate query / key / value projections, by the attribute paths
    (inside the module the block calls) of those projections, the output projection, the logit scale, the dropout
    probability and the head count."""
    heads_of = attrgetter(heads)
    return AttentionLayout(qkv=_QKV(q, k, v, heads_of), qk_norm=_no_qk_norm, output=_Projection(output),
                           scale=attrgetter(scale), dropout=attrgetter(dropout), heads=heads_of)


# DINOv2, ViT (transformers >= 5): o_proj, scaling, attention_dropout, num_attention_heads.
O_PROJ_ATTENTION = projection_attention("o_proj", "scaling", "attention_dropout", "num_attention_heads")
# CLIP, SigLIP, SigLIP2: out_proj, scale, dropout, num_heads.
CLIP_ATTENTION = projection_attention("out_proj", "scale", "dropout", "num_heads")
# VideoMAE: the block calls a wrapper holding the self-attention (``attention``: query/key/value) and its output.
VIDEOMAE_ATTENTION = projection_attention(
    "output.dense", "attention.scaling", "attention.dropout_prob", "attention.num_attention_heads",
    q="attention.query", k="attention.key", v="attention.value")
# BERT: the same wrapper, named ``self`` / ``output``.
BERT_ATTENTION = projection_attention("output.dense", "self.scaling", "self.dropout.p", "self.num_attention_heads",
                                      q="self.query", k="self.key", v="self.value")

DINOV2_LAYOUT = BlockLayout(attention=O_PROJ_ATTENTION, norm1="norm1", attn="attention", ls1="layer_scale1",
                            drop_path1="drop_path", norm2="norm2", mlp="mlp", ls2="layer_scale2",
                            drop_path2="drop_path")
VIT_LAYOUT = BlockLayout(attention=O_PROJ_ATTENTION, norm1="layernorm_before", attn="attention", ls1=None,
                         drop_path1="dropout", norm2="layernorm_after", mlp="mlp", ls2=None, drop_path2="dropout")
CLIP_LAYOUT = BlockLayout(attention=CLIP_ATTENTION, norm1="layer_norm1", attn="self_attn", ls1=None, drop_path1=None,
                          norm2="layer_norm2", mlp="mlp", ls2=None, drop_path2=None)
# VideoMAE: pre-norm; the MLP is ``intermediate`` then ``output.dense`` (whose module adds the residual itself, so the
# block runs its pieces, not the module).
VIDEOMAE_LAYOUT = BlockLayout(attention=VIDEOMAE_ATTENTION, norm1="layernorm_before", attn="attention", ls1=None,
                              drop_path1="attention.output.dropout", norm2="layernorm_after",
                              mlp=("intermediate", "output.dense"), ls2=None, drop_path2="output.dropout")
# BERT: post-norm, ``LayerNorm(x + dropout(branch))`` with the norm and dropout inside each output module.
BERT_LAYOUT = BlockLayout(attention=BERT_ATTENTION, norm1="attention.output.LayerNorm", attn="attention", ls1=None,
                          drop_path1="attention.output.dropout", norm2="output.LayerNorm",
                          mlp=("intermediate", "output.dense"), ls2=None, drop_path2="output.dropout",
                          post_norm=True)


class SizeAwarePooling(Picklable):
    """Mixin for the `nn.MultiheadAttention` that pools a patched tower's tokens (SigLIP's attention-pooling head):
    its keys get the running forward's log(size) bias, which is -inf on padding, so the pool weighs every merged
    token by the patches it stands for and never sees padding (as `mame.patch.timm` does for timm's "map" pool)."""

    def forward(self, query, key, value, *args, **kwargs):
        state = self.mame.state
        bias = None if state is None else state.key_bias()
        if not args and kwargs.get("attn_mask") is None and bias is not None and bias.shape == key.shape[:2]:
            bias = bias.to(key.dtype)[:, None, :].expand(-1, query.shape[1], -1)
            kwargs["attn_mask"] = bias.repeat_interleave(self.num_heads, dim=0)  # (B * heads, queries, keys)
        return super().forward(query, key, value, *args, **kwargs)


class PaddedInputForward(Picklable):
    """Mixin for a model whose forward takes a (B, L) padding mask (BERT's ``attention_mask``, SigLIP2's
    ``pixel_attention_mask``; the argument's name is ``_mame_padding_argument``): the mask becomes the forward's
    first `TokenState.mask` and the model itself is handed None. Padding and merging are then one mechanism: padding
    never merges into real tokens, attention and pools ignore it, and every sample gets what it would get alone."""

    def forward(self, *args, **kwargs):
        name = self._mame_padding_argument
        bound = inspect.signature(super().forward).bind(*args, **kwargs)
        mask = bound.arguments.get(name)
        bound.arguments[name] = None
        with self.mame.scope(self.training) as state:
            if mask is not None:
                state.mask = _padding_mask(mask, name)
            return super().forward(*bound.args, **bound.kwargs)


def _padding_mask(mask: torch.Tensor, name: str) -> torch.Tensor | None:
    """A (B, L) 0/1 padding mask as `TokenState.mask` (None when nothing is padded), checked to be right padding."""
    if mask.dim() != 2:
        raise ValueError(f"a mame-patched model takes {name} as a (batch, tokens) padding mask, got shape "
                         f"{tuple(mask.shape)}")
    mask = mask.bool()
    lengths = mask.sum(dim=1, keepdim=True)
    if not torch.equal(mask, torch.arange(mask.shape[1], device=mask.device) < lengths):
        raise ValueError(f"{name}: a mame-patched model needs padding at the end of each sample (right padding, "
                         "e.g. tokenizer.padding_side = 'right')")
    return None if bool(mask.all()) else mask


class MeanPooledEncoder(Picklable):
    """Mixin for the encoder inside a classifier whose head averages its tokens with a plain ``mean(1)`` (VideoMAE):
    inside the classifier's forward, its output tokens come out multiplied by L * w (w: each token's share of the
    original tokens, 0 on padding), so the head's plain mean is the size-weighted mean over real tokens, the mean of
    the unmerged sequence. Called on its own (outside the classifier) the encoder returns its tokens unchanged."""

    def forward(self, *args, **kwargs):
        output = super().forward(*args, **kwargs)
        state = self.mame.active_state
        if state is not None:
            tokens = output.last_hidden_state
            weights = state.token_weights(tokens)
            share = weights * (tokens.shape[1] / weights.sum(dim=1, keepdim=True))
            output.last_hidden_state = tokens * share.to(tokens.dtype).unsqueeze(-1)
        return output


@dataclass(frozen=True)
class _Patches:
    """Where a tower embeds its patches, by attribute paths inside it: the projection (a convolution; SigLIP2: a
    linear layer on flattened patches) and the number of patch tokens at the config's nominal size (image size over
    patch size, squared; VideoMAE: times frames over tubelet size; SigLIP2: ``num_patches``, the most patches an
    image is resized to, the processor's ``max_num_patches``)."""

    projection: str
    count: str


# Dinov2, ViT, VideoMAE keep both in a patch-embeddings module; CLIP, SigLIP, SigLIP2 in the embeddings module.
_PATCH_EMBEDDINGS = _Patches("embeddings.patch_embeddings.projection", "embeddings.patch_embeddings.num_patches")
_EMBEDDINGS = _Patches("embeddings.patch_embedding", "embeddings.num_patches")


@dataclass(frozen=True)
class _Family:
    """Where a model keeps its layers, how they are described, how many leading tokens never merge, which module's
    forward opens each forward's state (the model itself, or its vision tower when other methods reach the tower
    directly), which forward argument is a padding mask, which attention pool reads the merged tokens and which
    encoder's tokens a head averages, and where its patches are embedded (None: a text model, whose token count,
    the sequence length, is known only at run time, so it takes no FLOP budget)."""

    vision: Callable[[nn.Module], nn.Module]  # the module that holds the layers
    layers: str  # attribute path of the layers inside it
    layout: BlockLayout
    scope_tower: bool = False
    num_special: int = 1
    pool: str | None = None  # attribute path, inside the tower, of an nn.MultiheadAttention pool
    padding_argument: str | None = None  # the scoped forward's (B, L) padding-mask argument
    mean_pooled: bool = False  # the head averages the tower's output tokens with a plain mean
    refuse: Callable[[nn.Module], str | None] = lambda model: None  # why a configuration is not supported
    patches: _Patches | None = _PATCH_EMBEDDINGS


def _itself(model: nn.Module) -> nn.Module:
    return model


def _refuse_decoder(model: nn.Module) -> str | None:
    config = model.config
    if config.is_decoder or config.add_cross_attention:
        return "BERT as a decoder (causal or cross-attention) is not supported: merging is non-causal here"
    return None


def _refuse_token_pool(model: nn.Module) -> str | None:
    if model.fc_norm is None:
        return ("VideoMAE with use_mean_pooling=False reads the first token, which has no special role and merges; "
                "only the mean-pooling classifier is supported")
    return None


_SIGLIP2 = dict(num_special=0, pool="head.attention", padding_argument="pixel_attention_mask", patches=_EMBEDDINGS)

# transformers class name -> its description. Text towers are never patched.
_FAMILIES: dict[str, _Family] = {
    "Dinov2Model": _Family(_itself, "encoder.layer", DINOV2_LAYOUT),
    "ViTModel": _Family(_itself, "layers", VIT_LAYOUT),
    "ViTForImageClassification": _Family(attrgetter("vit"), "layers", VIT_LAYOUT),
    "CLIPVisionModel": _Family(_itself, "encoder.layers", CLIP_LAYOUT, patches=_EMBEDDINGS),
    "CLIPVisionModelWithProjection": _Family(attrgetter("vision_model"), "encoder.layers", CLIP_LAYOUT, True,
                                             patches=_EMBEDDINGS),
    "CLIPModel": _Family(attrgetter("vision_model"), "encoder.layers", CLIP_LAYOUT, True, patches=_EMBEDDINGS),
    # SigLIP: no class token, an attention-pooling head; its layers are written like CLIP's.
    "SiglipVisionModel": _Family(_itself, "encoder.layers", CLIP_LAYOUT, num_special=0, pool="head.attention",
                                 patches=_EMBEDDINGS),
    "SiglipModel": _Family(attrgetter("vision_model"), "encoder.layers", CLIP_LAYOUT, True, 0, "head.attention",
                           patches=_EMBEDDINGS),
    # SigLIP2: SigLIP's layers and head, variable resolution with a patch padding mask.
    "Siglip2VisionModel": _Family(_itself, "encoder.layers", CLIP_LAYOUT, **_SIGLIP2),
    "Siglip2Model": _Family(attrgetter("vision_model"), "encoder.layers", CLIP_LAYOUT, True, **_SIGLIP2),
    # VideoMAE: no class token; the classifier averages the tokens.
    "VideoMAEModel": _Family(_itself, "encoder.layer", VIDEOMAE_LAYOUT, num_special=0),
    "VideoMAEForVideoClassification": _Family(attrgetter("videomae"), "encoder.layer", VIDEOMAE_LAYOUT,
                                              num_special=0, mean_pooled=True, refuse=_refuse_token_pool),
    # BERT: post-norm; [CLS] never merges, [SEP] may; the tokenizer's attention_mask is the padding mask.
    "BertModel": _Family(_itself, "encoder.layer", BERT_LAYOUT, padding_argument="attention_mask",
                         refuse=_refuse_decoder, patches=None),
}


def _family(model: nn.Module) -> _Family:
    """The description of ``model``'s family; a ValueError naming the class for any other model."""
    try:
        import transformers
    except ImportError as error:  # the optional extra
        raise ImportError("mame.patch.hf needs transformers: pip install 'mame[hf]'") from error
    for name, family in _FAMILIES.items():
        if isinstance(model, getattr(transformers, name)):
            reason = family.refuse(model)
            if reason is not None:
                raise ValueError(f"mame.patch.hf: {reason}")
            return family
    raise ValueError(f"mame.patch.hf supports transformers' {', '.join(_FAMILIES)} so far, got "
                     f"{type(model).__name__} (heads that pool patch tokens need size-weighted pooling first)")


def patch_hf(model: nn.Module, tau: float | Sequence[float] | None = None, layers: int | Sequence[int] | None = None,
             *, flops: float | None = None, batch_rule: str = "per_sample", partition: str = "alternating",
             prune: bool = True, size_weighted: bool = False, proportional_attention: bool = True,
             packed: bool = True, check: bool = False, metric: str = "x", causal: bool | str | None = None,
             similarity: str = "cosine", seed: int = 0) -> nn.Module:
    """Apply MaMe in place to a transformers encoder, with the options of `mame.patch.timm` (see there) and the
    paper's defaults (timm's ``preset="paper"``): τ = 0.8 (``tau=None``) on the first 8 blocks (``layers=None``), the
    tokens as metric, pruning. The class token, where the model has one, never merges. Undo with
    ``mame.unpatch(model)``.

    ``flops`` (not with ``tau``) is a FLOP budget instead, as in `mame.patch.timm`: the FLOP ratio (e.g. 2.0 = half)
    at the config's input size (image size and patch size; VideoMAE's frames and tubelet size; SigLIP2's
    ``num_patches``), counted from the family's own attention, MLP and patch-embedding layers. Every block merges
    then (unless ``layers`` is given); metric and pruning stay as given or the defaults above. Each image removes the
    same share of its tokens, so a batch stays rectangular. BERT (its token count is the sequence length, known only
    at run time), LLaVA and causal LMs take ``tau`` only.

    Padded inputs (BERT's ``attention_mask``, SigLIP2's ``pixel_attention_mask``) must be padded at the end of each
    sample. ``last_hidden_state`` is then the merged, per-sample padded tokens: ``model.mame.mean_pool(hidden)`` is
    each sample's mean over its original tokens, ``model.mame.state.mask`` marks real tokens.
    A ``LlavaForConditionalGeneration`` goes to `mame.patch.llava.patch_llava`: fewer image tokens reach its LM.
    A decoder-only LM (Llama, Qwen2, Mistral, GPT-2) goes to `mame.patch.causal_lm.patch_causal_lm`: its prompt is
    merged causally during prefill (``causal``: "strict" by default, or "paper"), its KV cache is shorter; encoders
    take no ``causal`` option."""
    if is_causal_lm_class(type(model)):
        refuse_flops(flops, type(model).__name__, "its prompt length, and so its FLOPs, is known only at run time")
        given = {name: value for name, value in (("tau", tau), ("layers", layers)) if value is not None}
        return patch_causal_lm(model, **given, causal=causal, batch_rule=batch_rule, partition=partition,
                               prune=prune, size_weighted=size_weighted,
                               proportional_attention=proportional_attention, check=check, metric=metric,
                               similarity=similarity, seed=seed)
    if causal not in (None, False):
        raise ValueError(f"causal={causal!r}: causal merging is for decoder-only language models (Llama, Qwen2, "
                         f"Mistral, GPT-2); {type(model).__name__} merges its tokens non-causally")
    del causal
    if any(cls.__name__ == "LlavaForConditionalGeneration" for cls in type(model).__mro__):
        options = dict(locals())  # every argument, as given
        from mame.patch.llava import patch_llava  # imported here: it needs transformers' LLaVA
        return patch_llava(**options)
    family = _family(model)
    tower = family.vision(model)
    scoped = tower if family.scope_tower else model
    mixin = ScopedForward if family.padding_argument is None else PaddedInputForward
    blocks = list(attrgetter(family.layers)(tower))
    chosen = resolve_preset("paper", tau, layers, flops, metric, prune, len(blocks), size_weighted)
    install_mame(model, blocks, family.layout, family.num_special, mixin, scoped=scoped, batch_rule=batch_rule,
                 partition=partition, proportional_attention=proportional_attention,
                 packed=packed, check=check, budget=_budget(family, tower, blocks, chosen["metric"]),
                 similarity=similarity, seed=seed, **chosen)
    if family.padding_argument is not None:
        set_attributes(scoped, model.mame, _mame_padding_argument=family.padding_argument)
    for module in {id(m): m for m in (model, scoped)}.values():
        register_output_recording(module)
    for module, mixin in ((_attribute(tower, family.pool), SizeAwarePooling),
                          (tower if family.mean_pooled else None, MeanPooledEncoder)):
        if module is not None:
            swap_class(module, mixin, model.mame)
            set_attributes(module, model.mame, mame=model.mame)
    return model


def _budget(family: _Family, tower: nn.Module, blocks: list[nn.Module], metric: str) -> Budget | None:
    """The family's FLOP budget (`mame.budget.block_budget`) at its config's nominal size; None for text models."""
    if family.patches is None:
        return None
    hidden = tower.config.hidden_size  # the token width, and heads x head dim in every family here
    return block_budget(blocks[0], family.layout, dim=hidden, width=hidden, metric=metric,
                        patches=attrgetter(family.patches.count)(tower), num_special=family.num_special,
                        depth=len(blocks), embedding=attrgetter(family.patches.projection)(tower))


def register_output_recording(model: nn.Module) -> None:
    """Let a transformers model whose class was swapped still record hidden states (``output_hidden_states``):
    transformers looks up what a model can record (``_can_record_outputs``) by the name of its class, which is new
    for a patched class. The entry names only the patched class, so it is inert once the model is unpatched."""
    from transformers.utils import output_capturing  # a private registry: kept to this one place

    registry = getattr(output_capturing, "_CAN_RECORD_REGISTRY", None)
    if registry is not None and not registry.get(model) and hasattr(type(model), "_can_record_outputs"):
        registry[model] = type(model)._can_record_outputs


def _attribute(module: nn.Module, path: str | None) -> nn.Module | None:
    """``module``'s submodule at the dotted ``path``, None when there is no path or no such submodule (SigLIP
    without a head)."""
    if path is None:
        return None
    for name in path.split("."):
        module = getattr(module, name, None)
    return module
