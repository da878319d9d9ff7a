"""The options every family shares: which blocks merge, at which thresholds, with which settings, checked once at
patch time and installed through `mame.patch.base.install` (`install_mame`)."""

from __future__ import annotations

from typing import Sequence

from torch import nn

from mame.blocks import METRICS, BlockLayout, MameMerge, Merger, MergeRuntime
from mame.budget import Budget
from mame.core import check_options, check_tau
from mame.patch.base import ScopedForward, install


def resolve_layers(layers: int | Sequence[int], depth: int) -> tuple[int, ...]:
    """``layers`` as block indices: an int K means the first K blocks."""
    def is_int(value) -> bool:
        return isinstance(value, int) and not isinstance(value, bool)

    if not (is_int(layers) or (isinstance(layers, Sequence) and not isinstance(layers, str)
                               and all(is_int(i) for i in layers))):
        raise TypeError(f"layers must be an int (first K blocks) or a list of block indices, got {layers!r}")
    if is_int(layers):
        if not 0 <= layers <= depth:
            raise ValueError(f"layers={layers} is out of range: the model has {depth} blocks")
        return tuple(range(layers))
    indices = tuple(layers)
    bad = [i for i in indices if not 0 <= i < depth]
    if bad or len(set(indices)) != len(indices):
        raise ValueError(f"layers must be distinct block indices in [0, {depth}), got {list(layers)}")
    return tuple(sorted(indices))


def resolve_taus(tau: float | Sequence[float], count: int) -> tuple[float, ...]:
    """``tau`` as one value per patched block, each checked to lie in [-1, 1]."""
    if isinstance(tau, (int, float)):
        taus = (tau,) * count
    elif isinstance(tau, Sequence) and not isinstance(tau, str):
        taus = tuple(tau)
    else:
        raise TypeError(f"tau must be a number in [-1, 1] or one per patched block, got {tau!r}")
    if len(taus) != count:
        raise ValueError(f"tau must be a float or one value per patched block ({count}), got {len(taus)} values")
    return tuple(check_tau(value) for value in taus)


PRESETS = ("default", "paper")
DEFAULT_FLOPS = 2.0  # the budget of `patch_timm` when neither tau nor flops is given


def resolve_preset(preset: str, tau: float | Sequence[float] | None, layers: int | Sequence[int] | None,
                   flops: float | None, metric: str | None, prune: bool | None, depth: int,
                   size_weighted: bool | None = None) -> dict:
    """The patch arguments a preset fills in where the caller left them out (None).

    ``"default"``: the settings that kept accuracy best at a given FLOP ratio in benchmarks/accuracy_study.md: the
    attention keys as metric, size-weighted fusion, every block, a FLOP budget (``DEFAULT_FLOPS``) when no τ is
    given, and pruning (eqs 5-8) under that budget, where it only decides where each chosen source goes; with a
    hand-set τ pruning stays off (eq 7 leaves unmerged every source that passes τ for a single destination, so a
    fitted τ has to drop further for the same count: `perblock-keys-geo` against `-noprune` in the study).
    ``"paper"``: the paper's literal operator: the tokens as metric, pruning, eq 9's plain average, τ = 0.8 on the
    first 8 blocks; with a FLOP budget (``flops``), every block, as the budget spreads its merges over all of them.
    The defaults of `mame.patch.hf` and `mame.patch.open_clip` are this preset's. Returns ``tau``, ``flops`` (one of
    them None), ``layers``, ``metric``, ``prune`` and ``size_weighted``.
    """
    if preset not in PRESETS:
        raise ValueError(f"preset must be one of {PRESETS}, got {preset!r}")
    if tau is not None and flops is not None:
        raise ValueError("give tau (similarity thresholds) or flops (a FLOP budget), not both")
    paper = preset == "paper"
    if tau is None and flops is None:
        tau, flops = (0.8, None) if paper else (None, DEFAULT_FLOPS)
    first_eight = paper and flops is None
    return dict(tau=tau, flops=flops, layers=(8 if first_eight else depth) if layers is None else layers,
                metric=("x" if paper else "keys") if metric is None else metric,
                prune=(paper or flops is not None) if prune is None else prune,
                size_weighted=(not paper) if size_weighted is None else size_weighted)


def refuse_flops(flops: float | None, model: str, why: str) -> None:
    """Raise a ValueError for a FLOP budget (``flops`` not None) on a model that cannot take one, saying ``why``."""
    if flops is not None:
        raise ValueError(f"flops={flops!r}: {model} takes a similarity threshold (tau), not a FLOP budget: {why}")


def mame_mergers(
    layers: tuple[int, ...], taus: tuple[float, ...], *, partition: str, prune: bool, batch_rule: str,
    causal: bool | str, size_weighted: bool, check: bool = False, metric: str = "x", discard_preserved: bool = False,
    share: float | None = None, similarity: str = "cosine", seed: int = 0,
) -> dict[int, Merger]:
    """One checked `MameMerge` per patched block (``discard_preserved``: the 2:1 rule, see `patch_timm`; ``share``:
    a budget, see `mame.budget`, in place of ``taus``; ``similarity`` and ``seed``: see `patch_timm`)."""
    check_options(partition, batch_rule, causal, similarity=similarity)
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    if batch_rule == "per_sample" and partition != "alternating" and len(layers) > 1:
        # After the first merge the batch is ragged, and these partitions would split each padded sample
        # differently from the same sample alone (see `mame.merge`'s mask).
        raise ValueError(f"partition={partition!r} with batch_rule='per_sample' can merge in one block only (it "
                         "cannot split a padded sample as it would split it alone); use partition='alternating' or "
                         "batch_rule='any'")
    return {
        index: MameMerge(tau=t, partition=partition, prune=prune, batch_rule=batch_rule, causal=causal,
                         size_weighted=size_weighted, check_finite=check, metric=metric,
                         discard_preserved=discard_preserved, share=share, similarity=similarity, seed=seed)
        for index, t in zip(layers, taus)
    }


def install_mame(model: nn.Module, blocks: list[nn.Module], layout: BlockLayout, num_special: int,
                 model_mixin: type[ScopedForward], *, tau: float | Sequence[float] | None, layers: int | Sequence[int],
                 batch_rule: str, partition: str, prune: bool, size_weighted: bool, proportional_attention: bool,
                 packed: bool, check: bool, metric: str, scoped: nn.Module | None = None,
                 discard_preserved: bool = False, flops: float | None = None,
                 budget: Budget | None = None, similarity: str = "cosine",
                 seed: int = 0) -> nn.Module:
    """Check the options of `patch_timm` (the same for every family) and patch ``blocks`` described by ``layout``
    (``scoped``: see `mame.patch.base.install`). With ``flops`` instead of ``tau``, ``budget(layers, flops)`` gives
    the share of tokens each merging block removes (`mame.budget.block_budget`; None: the family takes no budget)."""
    indices = resolve_layers(layers, len(blocks))
    share = None
    if flops is not None:
        if budget is None:
            refuse_flops(flops, type(model).__name__, "its token count (a text model's sequence length) is "
                         "known only at run time")
        share, taus = budget(indices, flops), (1.0,) * len(indices)
    else:
        taus = resolve_taus(tau, len(indices))
    mergers = mame_mergers(indices, taus, partition=partition, prune=prune, batch_rule=batch_rule, causal=False,
                           size_weighted=size_weighted, check=check, metric=metric,
                           discard_preserved=discard_preserved, share=share, similarity=similarity,
                           seed=seed)
    thresholds = dict(tau=taus) if share is None else dict(flops=float(flops))
    settings = dict(method="mame", **thresholds, layers=indices, batch_rule=batch_rule, partition=partition,
                    prune=prune, size_weighted=size_weighted, proportional_attention=proportional_attention,
                    metric=metric, similarity=similarity, seed=seed)
    if discard_preserved:  # only when set, so the saved thresholds of other families stay valid patch arguments
        settings["discard_preserved"] = True
    runtime = MergeRuntime(settings=settings, layers=indices, num_special=num_special, packed=packed)
    return install(model, blocks, layout, mergers, runtime, proportional_attention, model_mixin, scoped)
