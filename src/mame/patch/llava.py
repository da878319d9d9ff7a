"""MaMe on the vision tower of transformers' LLaVA (`LlavaForConditionalGeneration`): the language model reads fewer
image tokens.

``mame.patch.hf(llava)`` (or `patch_llava`) patches ``llava.model.vision_tower`` (CLIP's or SigLIP's tower, through
`mame.patch.hf`) and wraps three things around the unchanged LLaVA code, all undone by ``mame.unpatch(llava)``:

* ``get_image_features`` (on `LlavaModel`) hands each image's *real* tokens to the language model: padding of the
  per-sample batch dropped, the class token dropped for ``vision_feature_select_strategy="default"``, and the tokens
  put back in spatial order (below). ``llava.mame.last_visual_tokens`` (a `VisualTokens`) keeps, per image, how many
  features it gave (``llava.mame.last_visual_token_counts``), how many patches each stands for and where it sits.
* ``forward`` and ``generate`` take the processor's prompts as they are, with the full, unmerged run of
  ``config.image_token_id`` placeholders per image: the image features are computed once, each image's run is cut to
  its merged count (`shrink_image_runs`), rows are re-padded, and LLaVA's own forward or generate runs on the shorter
  prompts with those features (transformers' ``mm_encoder_outputs``), so the vision tower never runs twice.
* ``llava.mame`` is the tower's `MergeRuntime`, with the LLaVA records above added.

Order of the merged tokens. One merge (`mame.merge`, `FusionPlan`) lays out each sample as [specials, the fused
destinations in their original order, the preserved sources in their original order] (or the input itself, in its
own order, where nothing merged). So the destinations keep their spatial order, but the preserved sources come after
all of them, and a second merge partitions that already reordered sequence: after several merges the tower's output
is not in raster order. Each output token is anchored at one input position, its own: a destination or a preserved
source of the last merge, which was itself a kept token of the merge before, down to one patch of the grid (a merged
token is anchored at the patch of its destination). `VisualTokens.positions` holds that patch, and the features are
sorted by it, so the language model reads them in raster order of their destinations, as it reads unmerged patches.

Which blocks may merge. ``hidden_states[k]`` of the tower is the output of block ``k - 1`` (``hidden_states[0]`` is
the embedding output). LLaVA reads ``hidden_states[vision_feature_layer]``; a merge in a block after that one would
change nothing the language model reads (wasted work) and would leave the tower's final padding mask and sizes
describing other tokens than the selected ones. So with ``vision_feature_layer = v`` (index ``k`` into the
``depth + 1`` hidden states, ``k = v % (depth + 1)``) only blocks ``0 .. k - 1`` may merge; others are refused. A
list of feature layers is supported as long as every merge comes before the first of them (the concatenated hidden
states then hold the same tokens).
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn

from mame.blocks import MergeRuntime, TokenState
from mame.core import FusionPlan
from mame.patch.base import Picklable, set_attributes, swap_class, unpatch
from mame.patch.options import refuse_flops

_STRATEGIES = ("default", "full")
# The attribute of a forward's `TokenState` that keeps LLaVA's record of it (the state belongs to one forward of one
# thread, so the record does too).
_RECORD = "llava_visual_tokens"


@dataclass
class VisualTokens:
    """What one LLaVA image encoding handed to the language model, image by image (in the order of ``pixel_values``).

    Attributes:
        counts: visual tokens per image that reach the language model.
        sizes: per image, a (count,) float tensor: how many patches each feature stands for (the class token, kept by
            strategy "full", stands for 1). With strategy "default" they sum to the patches of the image.
        positions: per image, a (count,) long tensor: the patch (row-major index into the patch grid) each feature
            is anchored at, its destination's own patch, increasing; -1 for the class token (strategy "full").
        unmerged: placeholder tokens per image without merging (what the processor writes for one image).
        input_ids: the prompts the language model read after the placeholder runs were shrunk (None when the last
            encoding shrank no prompt: `get_image_features` called alone, or nothing merged).
        attention_mask: the attention mask that went with ``input_ids`` (None as above, or when none was needed).
    """

    counts: list[int]
    sizes: list[torch.Tensor]
    positions: list[torch.Tensor]
    unmerged: int
    input_ids: torch.Tensor | None = None
    attention_mask: torch.Tensor | None = None


class LlavaRuntime(Picklable):
    """Mixin for the tower's `MergeRuntime` of a patched LLaVA (``llava.mame``): the records of the last image
    encoding of this thread, next to the runtime's own (``last_token_counts`` counts the tower's tokens, class token
    and padding rule included, averaged over the images)."""

    @property
    def last_visual_tokens(self) -> VisualTokens | None:
        """The `VisualTokens` of this thread's last LLaVA image encoding (None before the first)."""
        return getattr(self.state, _RECORD, None)

    @property
    def last_visual_token_counts(self) -> list[int]:
        """Visual tokens per image that reached the language model in this thread's last LLaVA image encoding."""
        record = self.last_visual_tokens
        return [] if record is None else list(record.counts)


def _normalised_layers(layer: int | Sequence[int], depth: int) -> list[int]:
    """``vision_feature_layer`` as indices into the tower's ``depth + 1`` hidden states."""
    chosen = [layer] if isinstance(layer, int) and not isinstance(layer, bool) else layer
    if (not isinstance(chosen, Sequence) or isinstance(chosen, str) or not chosen
            or not all(isinstance(i, int) and not isinstance(i, bool) for i in chosen)):
        raise ValueError(f"vision_feature_layer must be an int or a non-empty list of ints, got {layer!r}")
    bad = [i for i in chosen if not -(depth + 1) <= i <= depth]
    if bad:
        raise ValueError(f"vision_feature_layer {bad} is out of range: the vision tower has {depth + 1} hidden states")
    return [i % (depth + 1) for i in chosen]


def check_feature_choice(layer: int | Sequence[int], strategy: str, runtime: MergeRuntime, depth: int) -> None:
    """Refuse, with a ValueError, a LLaVA feature selection that the patched tower cannot serve: a strategy other
    than "default" / "full", "default" on a tower without a class token, or merging blocks whose output comes after
    the selected hidden state (see the module's docstring)."""
    if strategy not in _STRATEGIES:
        raise ValueError(f"vision_feature_select_strategy must be one of {_STRATEGIES} for a mame-patched LLaVA, got "
                         f"{strategy!r}")
    if strategy == "default" and runtime.num_special < 1:
        raise ValueError("vision_feature_select_strategy='default' drops the class token, but this vision tower has "
                         "none (its first token may merge with others); use 'full'")
    first = min(_normalised_layers(layer, depth))
    late = [index for index in runtime.layers if index >= first]
    if late:
        raise ValueError(
            f"vision_feature_layer={layer!r} selects hidden_states[{first}], the output of block {first - 1}, but "
            f"layers {late} merge in blocks after it: that merging is wasted and would leave the tower's padding "
            f"mask describing other tokens than the selected ones. Merge only in blocks < {first} (e.g. "
            f"layers={first} for the first {first} blocks)")


def _anchors(plans: Sequence[FusionPlan], batch: int, length: int, device: torch.device) -> torch.Tensor:
    """(B, L') position in the tower's input sequence of the token each output token is anchored at: its own
    position where it was kept through every merge (a destination or a preserved source, down to one input token);
    -1 on padding."""
    anchors = torch.arange(length, device=device).expand(batch, -1)
    for plan in plans:
        special = plan.num_special
        kept = torch.zeros(batch, plan.num_tokens_in, dtype=torch.bool, device=device)
        kept[:, :special] = True
        kept[:, plan.dst_idx] = True
        kept[:, plan.src_idx] = plan.preserved
        holder = plan.source_map  # a kept token is held by its own output token; padding by none (-1)
        kept &= holder >= 0
        out = torch.full((batch, plan.num_tokens_out + 1), -1, dtype=torch.long, device=device)
        # Tokens not kept go to a spare last column, cut off below.
        out.scatter_(1, torch.where(kept, holder, plan.num_tokens_out), anchors)
        anchors = out[:, :-1]
    return anchors


def _real_tokens(features: Sequence[torch.Tensor], state: TokenState,
                 strategy: str) -> tuple[list[torch.Tensor], VisualTokens]:
    """Each image's real tokens of the projected tower output (B of (L', D), padded, class token included) in the
    spatial order of their anchors, the class token dropped for strategy "default"; and their record."""
    if len(state.plans) < state.merges:
        raise RuntimeError("the vision tower's merges kept no fusion plans, so its tokens cannot be put in order")
    batch, length = len(features), features[0].shape[0]
    device = features[0].device
    unmerged_length = state.plans[0].num_tokens_in if state.plans else length  # every patch and the specials
    anchors = _anchors(state.plans, batch, unmerged_length, device)
    if tuple(anchors.shape) != (batch, length):
        raise RuntimeError(f"the tower's last merge gave {tuple(anchors.shape)} tokens, the selected hidden state "
                           f"{(batch, length)}: the merging blocks must all come before it")
    special = state.num_special
    drop = 1 if strategy == "default" else 0
    chosen, sizes, positions = [], [], []
    for b, tokens in enumerate(features):
        real = anchors[b] >= 0 if state.mask is None else state.mask[b]
        where = anchors[b][real]
        order = where.argsort()
        size = torch.ones(length, device=device) if state.sizes is None else state.sizes[b]
        chosen.append(tokens[real][order][drop:])
        sizes.append(size[real][order][drop:])
        positions.append((where[order] - special).clamp_min(-1)[drop:])
    record = VisualTokens(counts=[len(t) for t in chosen], sizes=sizes, positions=positions,
                          unmerged=unmerged_length - drop)
    return chosen, record


class LlavaImageFeatures(Picklable):
    """Mixin for `LlavaModel`: ``get_image_features`` gives each image's real tokens in spatial order (see the
    module's docstring) and records them on the forward's state."""

    def get_image_features(self, pixel_values: torch.Tensor, vision_feature_layer: int | list[int] | None = None,
                           vision_feature_select_strategy: str | None = None,
                           image_sizes: torch.Tensor | None = None, **kwargs):
        layer = self.config.vision_feature_layer if vision_feature_layer is None else vision_feature_layer
        strategy = (self.config.vision_feature_select_strategy if vision_feature_select_strategy is None
                    else vision_feature_select_strategy)
        runtime: MergeRuntime = self.mame
        check_feature_choice(layer, strategy, runtime, self.vision_tower.config.num_hidden_layers)
        if image_sizes is not None:
            raise ValueError("a mame-patched LLaVA takes no image_sizes: its images are split by their merged token "
                             "counts (llava.mame.last_visual_token_counts), not by their sizes")
        return_dict = kwargs.pop("return_dict", None)
        if return_dict is None:
            return_dict = getattr(self.config, "return_dict", True)
        with runtime.scope(self.training) as state:
            # The order of the tokens needs the plans, which training forwards do not keep: keep them for this
            # encoding, and drop them afterwards in training (they would hold the autograd graph until the next one).
            state.keep_plans = True
            # "full": the class token is dropped below, with the padding, once the tokens are in order.
            output = super().get_image_features(pixel_values, vision_feature_layer=layer,
                                                vision_feature_select_strategy="full", return_dict=True, **kwargs)
            features, record = _real_tokens(output.pooler_output, state, strategy)
            if self.training:
                state.plans.clear()
                state.keep_plans = False
        setattr(state, _RECORD, record)
        output.pooler_output = features
        return output if return_dict else output.to_tuple()


def shrink_image_runs(input_ids: torch.Tensor, counts: Sequence[int], unmerged: int, image_token_id: int, *,
                      padding_side: str, pad_token_id: int = 0, attention_mask: torch.Tensor | None = None,
                      labels: torch.Tensor | None = None,
                      token_type_ids: torch.Tensor | None = None) -> dict[str, torch.Tensor | None]:
    """Cut each image's run of placeholder tokens to its merged count and re-pad the rows.

    The k-th placeholder of the batch (row by row) stands for the k-th image feature, as in LLaVA's own forward; with
    ``unmerged`` placeholders per image, image ``i`` keeps the first ``counts[i]`` of its own and drops the rest.
    Shorter rows are padded on ``padding_side`` ("left" or "right") with ``pad_token_id``, attention 0, label -100
    and token type 0; an attention mask is made when padding is needed and none was given.

    Prompts that already hold one placeholder per merged feature are returned as they are. Returns the tensors under
    their argument names (``input_ids``, ``attention_mask``, ``labels``, ``token_type_ids``; None where not given).
    """
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be (batch, length), got shape {tuple(input_ids.shape)}")
    result = dict(input_ids=input_ids, attention_mask=attention_mask, labels=labels, token_type_ids=token_type_ids)
    placeholder = input_ids == image_token_id
    total, merged = int(placeholder.sum()), sum(counts)
    if total == merged:
        return result
    if total != len(counts) * unmerged:
        raise ValueError(
            f"Image features and image tokens do not match: the prompts hold {total} image placeholder tokens (id "
            f"{image_token_id}); the {len(counts)} images need {unmerged} each as the processor writes them "
            f"({len(counts) * unmerged}), or {merged} after merging ({list(counts)} per image)")
    for name, value in result.items():
        if value is not None and tuple(value.shape) != tuple(input_ids.shape):
            raise ValueError(f"{name} must have the shape of input_ids {tuple(input_ids.shape)}, got "
                             f"{tuple(value.shape)}")
    # Rank of every placeholder in the batch -> its image and its place within the image's run.
    rank = (placeholder.flatten().cumsum(0) - 1).view_as(input_ids).clamp_min(0)
    limit = torch.as_tensor(list(counts), device=input_ids.device)[(rank // unmerged).clamp_max(len(counts) - 1)]
    keep = ~placeholder | (rank % unmerged < limit)
    lengths = keep.sum(dim=1, keepdim=True)
    width = int(lengths.max())
    kept_first = torch.sort((~keep).to(torch.int8), dim=1, stable=True).indices  # kept positions, in order, first
    slot = torch.arange(width, device=input_ids.device).unsqueeze(0)
    index = slot - (width - lengths) if padding_side == "left" else slot.expand(len(input_ids), -1)
    real = (index >= 0) & (index < lengths)
    source = kept_first.gather(1, index.clamp(0, input_ids.shape[1] - 1))
    if attention_mask is None and not bool(real.all()):
        result["attention_mask"] = torch.ones_like(input_ids)
    pads = dict(input_ids=pad_token_id, attention_mask=0, labels=-100, token_type_ids=0)
    return {name: None if value is None else value.gather(1, source).masked_fill(~real, pads[name])
            for name, value in result.items()}


def _keywords(method, args: tuple, kwargs: dict) -> dict:
    """A call's arguments as keywords, by ``method``'s signature (``**kwargs`` flattened in)."""
    signature = inspect.signature(method)
    bound = signature.bind(*args, **kwargs)
    result = {}
    for name, value in bound.arguments.items():
        kind = signature.parameters[name].kind
        if kind is inspect.Parameter.VAR_KEYWORD:
            result.update(value)
        elif kind is inspect.Parameter.VAR_POSITIONAL:
            raise TypeError(f"{method.__qualname__} takes no extra positional arguments, got {len(value)}")
        else:
            result[name] = value
    return result


class LlavaGeneration(Picklable):
    """Mixin for `LlavaForConditionalGeneration`: ``forward`` and ``generate`` take prompts with the full placeholder
    run of every image, encode the images once, shrink the runs to the merged counts and run LLaVA's own code on the
    shorter prompts with the computed features (``mm_encoder_outputs``)."""

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        # `mame.patch.base.patched_class` makes (mixin, parent). generate reads forward's signature (does it take
        # mm_encoder_outputs, logits_to_keep?), so the patched class's forward wears its parent's.
        parent = cls.__bases__[-1]

        def forward(self, *args, **kwargs):
            return LlavaGeneration._mame_forward(self, *args, **kwargs)

        cls.forward = functools.update_wrapper(forward, parent.forward)

    def _mame_forward(self, *args, **kwargs):
        if len(args) < 2 and kwargs.get("pixel_values") is None:  # no images (generate's steps): nothing to do
            return super().forward(*args, **kwargs)
        inputs = _keywords(super().forward, args, kwargs)
        mask = inputs.get("attention_mask")
        left = mask is not None and mask.dim() == 2 and bool((mask[:, 0] == 0).any())
        return super().forward(**self._mame_encode_and_shrink(inputs, "left" if left else "right")[0])

    @torch.no_grad()
    def generate(self, inputs: torch.Tensor | None = None, *args, **kwargs):
        """transformers' ``generate``, the prompts' placeholder runs shrunk to the merged counts (rows padded on the
        left, as decoder-only generation needs). The returned sequences start with the prompts as given, so
        ``sequences[:, input_ids.shape[1]:]`` are the new tokens as without merging."""
        if kwargs.get("pixel_values") is None:
            return super().generate(inputs, *args, **kwargs)
        if inputs is not None:
            if kwargs.get("input_ids") is not None:
                raise ValueError("pass the prompts once: as inputs or as input_ids")
            kwargs["input_ids"] = inputs
        prompts = kwargs.get("input_ids")
        shrunk, record = self._mame_encode_and_shrink(kwargs, "left")
        output = super().generate(None, *args, **shrunk)
        if record is None or record.input_ids is None:
            return output
        start = record.input_ids.shape[1]

        def with_given_prompts(sequences: torch.Tensor) -> torch.Tensor:
            repeats = sequences.shape[0] // prompts.shape[0]
            return torch.cat([prompts.repeat_interleave(repeats, dim=0).to(sequences.device), sequences[:, start:]], 1)

        if isinstance(output, torch.Tensor):
            return with_given_prompts(output)
        output.sequences = with_given_prompts(output.sequences)
        return output

    def _mame_encode_and_shrink(self, inputs: dict, padding_side: str) -> tuple[dict, VisualTokens | None]:
        """``inputs`` (keyword arguments of forward or generate) with the images encoded once into
        ``mm_encoder_outputs`` and the prompts' placeholder runs shrunk, and the encoding's record; ``inputs`` as
        they are and None when there are no images."""
        if inputs.get("pixel_values") is None:
            return inputs, None
        if inputs.get("input_ids") is None:
            raise ValueError("a mame-patched LLaVA needs input_ids with pixel_values (the image placeholder runs are "
                             "shrunk to the merged token counts; inputs_embeds cannot be)")
        if inputs.get("mm_encoder_outputs"):
            raise ValueError("pass either pixel_values or mm_encoder_outputs, not both")
        inputs = dict(inputs)
        pixel_values = inputs.pop("pixel_values")
        encoded = self.model.get_image_features(
            pixel_values=pixel_values, vision_feature_layer=inputs.get("vision_feature_layer"),
            vision_feature_select_strategy=inputs.get("vision_feature_select_strategy"),
            image_sizes=inputs.get("image_sizes"), return_dict=True)
        record: VisualTokens = self.mame.last_visual_tokens
        ids = inputs["input_ids"]
        placeholders = int((ids == self.config.image_token_id).sum())
        if placeholders != sum(record.counts) and inputs.get("position_ids") is not None:
            raise ValueError("position_ids cannot be given with images to a mame-patched LLaVA: the image "
                             "placeholder runs shrink, so the positions would no longer match; leave them to the model")
        shrunk = shrink_image_runs(ids, record.counts, record.unmerged, self.config.image_token_id,
                                   padding_side=padding_side, pad_token_id=_pad_token_id(self.config),
                                   attention_mask=inputs.get("attention_mask"), labels=inputs.get("labels"),
                                   token_type_ids=inputs.get("token_type_ids"))
        if shrunk["input_ids"] is not ids:
            record.input_ids, record.attention_mask = shrunk["input_ids"], shrunk["attention_mask"]
        inputs.update((name, value) for name, value in shrunk.items() if value is not None)
        inputs["mm_encoder_outputs"] = {"image": encoded}
        return inputs, record


def _pad_token_id(config) -> int:
    """The pad token of a LLaVA config (its own, its text model's), or 0."""
    for holder in (config, getattr(config, "text_config", None)):
        value = getattr(holder, "pad_token_id", None)
        if value is not None:
            return int(value)
    return 0


def patch_llava(model: nn.Module, tau: float | Sequence[float] = 0.8, layers: int | Sequence[int] = 8,
                **options) -> nn.Module:
    """Apply MaMe in place to the vision tower of a transformers `LlavaForConditionalGeneration`, so that fewer image
    tokens reach the language model (see the module's docstring); ``options`` are `mame.patch.hf`'s (defaults
    included: ``batch_rule="per_sample"`` keeps every image's own count), all but ``flops``: a FLOP budget is
    refused. ``layers`` index the tower's blocks and must all come before ``config.vision_feature_layer``'s hidden
    state. Undo with ``mame.unpatch(model)``."""
    try:
        from transformers import LlavaForConditionalGeneration
    except ImportError as error:  # the optional extra
        raise ImportError("mame.patch.llava needs transformers: pip install 'mame[hf]'") from error
    if not isinstance(model, LlavaForConditionalGeneration):
        raise ValueError(f"patch_llava takes a transformers LlavaForConditionalGeneration, got {type(model).__name__}")
    refuse_flops(options.get("flops"), "LLaVA", "most of its FLOPs are its language model's, on prompts whose length "
                 "is known only at run time")
    from mame.patch.hf import patch_hf  # hf dispatches LLaVA here: imported late, as hf imports this module late

    unpatch(model)
    inner = model.model
    tower = inner.vision_tower
    strategy = model.config.vision_feature_select_strategy
    if strategy not in _STRATEGIES:  # before patching, so nothing is left half done
        raise ValueError(f"vision_feature_select_strategy must be one of {_STRATEGIES}, got {strategy!r}")
    patch_hf(tower, tau, layers, **options)
    runtime = tower.mame
    try:
        check_feature_choice(model.config.vision_feature_layer, strategy, runtime, tower.config.num_hidden_layers)
    except ValueError:
        unpatch(tower)
        raise
    swap_class(runtime, LlavaRuntime, runtime)
    swap_class(inner, LlavaImageFeatures, runtime)
    swap_class(model, LlavaGeneration, runtime)
    set_attributes(inner, runtime, mame=runtime)
    set_attributes(model, runtime, mame=runtime)
    return model
