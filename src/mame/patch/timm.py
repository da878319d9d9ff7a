"""MaMe for timm Vision Transformers: DeiT, AugReg ViT, MAE ViT, DINOv2 (LayerScale), register tokens, no class token.

timm's `Block` runs ``x + drop_path1(ls1(attn(norm1(x))))`` then the same with ``mlp``/``norm2``/``ls2``, so the
default `BlockLayout` describes it as it is. Pooling is part of the patch: average pooling weighs each token by its
size (so merged and unmerged models pool the same image area) and attention pooling ("map") gets log(size) as bias.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from mame.attention import AttentionLayout
from mame.blocks import BlockLayout
from mame.budget import Budget, block_budget
from mame.patch.base import ScopedForward
from mame.patch.options import install_mame, resolve_preset



def _qkv(attn: nn.Module, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return attn.qkv(h).unflatten(-1, (3, attn.num_heads, attn.head_dim)).unbind(-3)


def _qk_norm(attn: nn.Module, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return attn.q_norm(q), attn.k_norm(k)


def _output(attn: nn.Module, out: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    out = attn.norm(out)
    gate = getattr(attn, "gate", None)
    if gate is not None:
        out = out * gate(h).sigmoid()
    return attn.proj_drop(attn.proj(out))


def _scale(attn: nn.Module) -> float:
    return attn.scale


def _dropout(attn: nn.Module) -> float:
    return attn.attn_drop.p


def _heads(attn: nn.Module) -> int:
    return attn.num_heads


# timm's `Attention` in pieces, as its own forward runs them.
TIMM_ATTENTION = AttentionLayout(qkv=_qkv, qk_norm=_qk_norm, output=_output, scale=_scale, dropout=_dropout,
                                 heads=_heads)
TIMM_LAYOUT = BlockLayout(attention=TIMM_ATTENTION)
SUPPORTED_POOLS = ("token", "avg", "max", "avgmax", "map", "")


def _vit_class() -> type:
    from timm.models.vision_transformer import VisionTransformer

    return VisionTransformer


def check_model(model: nn.Module) -> None:
    """Raise a ValueError naming the class when ``model`` is not a timm ViT whose blocks we can describe."""
    from timm.models.vision_transformer import Attention, Block

    if not isinstance(model, _vit_class()):
        raise ValueError(
            f"mame.patch.timm supports timm VisionTransformer models (ViT, DeiT, AugReg, MAE, DINOv2, registers), "
            f"got {type(model).__name__}")
    for index, block in enumerate(model.blocks):
        if type(block) is not Block and not (type(block).__name__.startswith("Mame") and isinstance(block, Block)):
            raise ValueError(
                f"mame.patch.timm supports timm `Block` (pre-norm, optional LayerScale); block {index} is "
                f"{type(block).__name__}")
        if type(block.attn) is not Attention:
            raise ValueError(f"mame.patch.timm supports timm `Attention`; block {index} has {type(block.attn).__name__}")
    pool = "map" if getattr(model, "attn_pool", None) is not None else model.global_pool
    if pool not in SUPPORTED_POOLS:
        raise ValueError(f"global_pool={pool!r} is not supported; supported: {SUPPORTED_POOLS}")


class PatchedViT(ScopedForward):
    """Mixin for timm `VisionTransformer`: per-forward state around each entry point, size- and padding-aware
    pooling, and intermediates unmerged to the patch grid."""

    def forward_features(self, *args, **kwargs):
        with self.mame.scope(self.training):
            return super().forward_features(*args, **kwargs)

    def forward_intermediates(
        self, x: torch.Tensor, indices: int | list[int] | None = None, return_prefix_tokens: bool = False,
        norm: bool = False, stop_early: bool = False, output_fmt: str = "NCHW", intermediates_only: bool = False,
        output_dict: bool = False, **kwargs,
    ):
        """timm's ``forward_intermediates`` with every intermediate unmerged to the full patch grid (through the
        fusion plans of the merges before it), so NCHW maps keep their meaning; the final features stay merged,
        as from ``forward_features``. Needs fusion plans: eval mode and a MaMe patch."""
        from timm.models._features import feature_take_indices

        if output_fmt not in ("NCHW", "NLC"):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NLC', got {output_fmt!r}")
        taken, _ = feature_take_indices(len(self.blocks), indices)
        with self.mame.scope(self.training) as state:
            final, raw = super().forward_intermediates(
                x, taken, return_prefix_tokens=True, norm=norm, stop_early=stop_early, output_fmt="NLC",
                intermediates_only=False, output_dict=False, **kwargs)
        merging = [i for i, block in enumerate(self.blocks) if block.__dict__.get("_mame_merger") is not None]
        prefix_count = self.num_prefix_tokens
        grid = self.patch_embed.dynamic_feat_size(x.shape[-2:])
        intermediates, prefixes = [], []
        for index, item in zip(sorted(set(taken)), raw):
            tokens = torch.cat([item[1], item[0]], dim=1) if prefix_count else item  # (spatial, prefix) pairs
            merges = sum(i <= index for i in merging)
            if merges > len(state.plans):
                raise ValueError(
                    f"forward_intermediates: block {index} comes after a merge, and unmerging it to the patch grid "
                    "needs fusion plans, which only MaMe keeps and only in eval mode (call model.eval())")
            for plan in reversed(state.plans[:merges]):
                tokens = plan.unmerge(tokens)
            patches = tokens[:, prefix_count:]
            if output_fmt == "NCHW":
                patches = patches.reshape(x.shape[0], *grid, -1).permute(0, 3, 1, 2).contiguous()
            intermediates.append(patches)
            prefixes.append(tokens[:, :prefix_count])
        with_prefix = return_prefix_tokens and prefix_count > 0
        if output_dict:
            result = {"image_intermediates": intermediates}
            if with_prefix:
                result["image_intermediates_prefix"] = prefixes
            if not intermediates_only:
                result["image_features"] = final
            return result
        if with_prefix:
            intermediates = list(zip(intermediates, prefixes))
        return intermediates if intermediates_only else (final, intermediates)

    def pool(self, x: torch.Tensor, pool_type: str | None = None) -> torch.Tensor:
        state = self.mame.state
        if state is None or state.sizes is None or state.sizes.shape != x.shape[:2]:
            return super().pool(x, pool_type)
        return pool_tokens(self, x, state.sizes, pool_type)


def pool_tokens(model: nn.Module, x: torch.Tensor, sizes: torch.Tensor, pool_type: str | None) -> torch.Tensor:
    """timm's pooling with every token weighted by its size (padding has size 0, so it is excluded)."""
    prefix = 0 if model.pool_include_prefix else model.num_prefix_tokens
    if model.attn_pool is not None:
        bias = sizes[:, prefix:].log().to(x.dtype)[:, None, None, :]  # proportional attention in the pool
        return model.attn_pool(x[:, prefix:], attn_mask=bias)
    pool_type = model.global_pool if pool_type is None else pool_type
    if pool_type == "token":
        return x[:, 0]
    if pool_type == "":
        return x
    tokens, weights = x[:, prefix:], sizes[:, prefix:].to(x.dtype).unsqueeze(-1)
    avg = (tokens * weights).sum(1) / weights.sum(1)
    peak = tokens.masked_fill(weights == 0, float("-inf")).amax(1)
    return {"avg": avg, "max": peak, "avgmax": 0.5 * (avg + peak)}[pool_type]


def timm_budget(model: nn.Module, metric: str) -> Budget:
    """``budget(layers, flops)`` for `install_mame`: the share of tokens each merging block removes for a FLOP
    ratio of ``flops`` at the model's own input size (`mame.budget.block_budget`)."""
    attn = model.blocks[0].attn
    embed = model.patch_embed
    return block_budget(model.blocks[0], TIMM_LAYOUT, dim=model.embed_dim, width=attn.num_heads * attn.head_dim,
                        metric=metric, patches=embed.num_patches, num_special=model.num_prefix_tokens,
                        depth=len(model.blocks), embedding=embed.proj)


def patch_timm(
    model: nn.Module,
    tau: float | Sequence[float] | None = None,
    layers: int | Sequence[int] | None = None,
    *,
    flops: float | None = None,
    preset: str = "default",
    batch_rule: str = "per_sample",
    partition: str = "alternating",
    prune: bool | None = None,
    size_weighted: bool | None = None,
    proportional_attention: bool = True,
    packed: bool = True,
    check: bool = False,
    metric: str | None = None,
    discard_preserved: bool = False,
    similarity: str = "cosine",
    seed: int = 0,
) -> nn.Module:
    """Apply MaMe in place to a timm VisionTransformer (eqs 11-13 in each chosen block).

    ``mame.patch.timm(model)`` halves the FLOPs: every block merges the same share of each image's tokens, each image
    at its own threshold, compared on the attention keys, with the paper's pruning deciding where each source goes
    and fusion weighted by how many patches each token stands for (the choices that kept accuracy best at a given
    FLOP ratio, benchmarks/accuracy_study.md). ``mame.patch.timm(model, preset="paper")`` is the paper's operator as
    written: τ = 0.8 on the first 8 blocks, the tokens as metric, pruning, eq 9's plain average. `mame.calibrate` fits
    one threshold per block for a target on your own images instead.

    Args:
        model: a timm ``VisionTransformer`` (DeiT, AugReg, MAE, DINOv2 with LayerScale, with registers, any of the
            ``token``/``avg``/``map`` pools). Its ``num_prefix_tokens`` special tokens never merge.
        tau: similarity threshold, one float or one per patched block (0.8 is the paper's training-free setting).
            Not with ``flops``.
        layers: an int K (the first K blocks; the paper uses 8) or a list of block indices. Default: every block
            (``preset="paper"`` without ``flops``: the first 8).
        flops: a FLOP budget instead of τ: the FLOP ratio (unmodified / merged, e.g. 2.0 = half) at the model's
            input size, counted as `mame.bench` counts it. Every merging block removes the same share of the
            mergeable tokens reaching it, and each image merges its most similar sources at its own threshold
            (`mame.core.budget_threshold`), so the ratio does not depend on the images and a batch stays rectangular.
            Default 2.0 when τ is not given either (``preset="default"``).
        preset: ``"default"`` or ``"paper"``; it fills in ``tau``/``flops``, ``layers``, ``metric`` and ``prune``
            where they are not given (see `mame.patch.options.resolve_preset`).
        batch_rule: ``"per_sample"`` (default: each image keeps its own tokens; the batch becomes ragged and is
            carried with a key-padding mask in SDPA and a packed MLP, and every image gets the result it would get
            alone) or ``"any"`` (the paper's batch-wide rule: a token kept by one image is kept for all, which
            throws the speed-up away on varied batches).
        partition: ``"alternating"`` (the paper's default), ``"sequential"`` or ``"random"`` (seeded by ``seed``):
            the partitions the paper's ablation compares (Figure 2c).
        prune: the adaptive weight pruning of eqs 5-8: a source keeps only its weights above their mean. Default on
            under a budget (``flops``), which has already chosen the sources that merge, so pruning only decides
            where each goes, and a source whose weights are all equal (one destination past its threshold) keeps
            them (beyond the paper). With a hand-set τ it is off by default (``preset="paper"``: on), because eq 7
            as written drops such a source and a τ then has to drop further for the same count.
        size_weighted: a token standing for k patches weighs k when it is fused again (as ToMe's weighted average;
            with all sizes 1 it is eq 9). Default on (``preset="paper"``: off, eq 9's plain average): with the
            budget's merging spread over all blocks, tokens are fused many times over, and an unweighted average lets
            a late single patch count as much as a token standing for 30; on the real DINOv2-S/14 it kept the
            features closer to the unmodified model's at every FLOP ratio (cos 0.9542 against 0.9357 at 2.5x on
            MNIST, benchmarks/accuracy_study.md).
        proportional_attention: add log(size) to the attention logits (as ToMe does), so a merged token keeps the
            attention weight of the patches it stands for. On by default: it raised k-NN / probe accuracy at
            τ = 0.7, 0.8 and 0.975 (`mame eval`); with all sizes 1 it is exactly plain attention.
        packed: on ragged batches (per-sample merging) run every token-wise step of a block on the real tokens
            only, and attention on groups of samples of similar length (`mame.attention`); off = the padded batch.
        metric: what the similarity is computed on: ``"x"`` (the tokens themselves, the paper's eq 2),
            ``"keys"`` (the block's attention keys, all heads side by side; the default) or ``"keys_mean"`` (the
            keys averaged over heads, ToMe's metric). The tokens are fused either way.
        similarity: how eq 2's S is computed: ``"cosine"`` (the paper's, default), or the kinds its ablation
            compares (Figure 2b): ``"euclidean"``, ``"dot"``, ``"softmax"``, defined in `mame.core.similarity_matrix`.
        seed: the seed of ``partition="random"`` (the same partition in every block and forward).
        check: scan the tokens for NaN and Inf before every merge and raise a ValueError. Off by default, like
            the patched forward's other checks (one pass over the tokens per merge); without it NaN input gives NaN
            output, as in the unpatched model.
        discard_preserved: drop the preserved sources instead of keeping them, so every merge keeps exactly the class
            token(s) and the destinations: the paper's "2:1" rule for training from scratch (section 4: the tokens
            other than the class token halve at each merge point; `mame.train`). Off by default (eq 10 keeps them).

    Returns:
        the same model, patched; ``model.mame`` holds the settings and ``model.mame.last_token_counts``.
    """
    check_model(model)
    chosen = resolve_preset(preset, tau, layers, flops, metric, prune, len(model.blocks), size_weighted)
    return install_mame(model, list(model.blocks), TIMM_LAYOUT, model.num_prefix_tokens, PatchedViT,
                        batch_rule=batch_rule, partition=partition, proportional_attention=proportional_attention,
                        packed=packed, check=check, discard_preserved=discard_preserved,
                        budget=timm_budget(model, chosen["metric"]), similarity=similarity, seed=seed, **chosen)

