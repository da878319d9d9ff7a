"""Automatic thresholds: make a patched model meet a budget (the paper's stated future work).

Two ways to fit them on a few unlabelled calibration images:

- **per block** (default): one threshold per merging block, fitted so that the calibration batch keeps a target
  number of tokens after every block: a token schedule (``"geometric"``, the default: every merging block merges
  the same share of what reaches it; ``"linear"``: the same number, as ToMe's constant r; ``"decreasing"``: ToMe's
  decreasing schedule) whose strength is chosen for the target.
  In the spirit of DyMU (Wang et al., arXiv 2504.17040, which fits one threshold per layer for an average token
  count): each image still merges what it can, only the *average* meets the schedule. All thresholds for one
  schedule come from a single forward of the calibration batch: in each merging block the threshold is bisected on
  that block's own merge (cheap: no attention or MLP is re-run), then applied, and the next block sees the result.
  A linear schedule over 12 blocks cannot pass a FLOP ratio of about 2 (even merging down to nothing, the blocks
  see half the tokens on average); ``"decreasing"`` (more merged early, as ToMe's decreasing schedule) reaches
  about 3 and ``"geometric"`` any ratio.
- **shared**: one τ on every patched block, found by bisection (the paper's single τ).

Targets: a token budget ("keep 30 % of the tokens after block 8"), a FLOP ratio (counted, merge matmuls and
attention included) or a speed-up. A speed-up is first met as a FLOP ratio (the limit a perfect implementation
reaches), then the measured efficiency (speed-up / FLOP ratio) of that setting corrects the FLOP target once. Token
and FLOP targets are deterministic: the same images and settings give the same thresholds.

The thresholds stay with the patch: ``model.mame.save_thresholds(path)`` writes them (and what they were fitted for)
as JSON, `load_thresholds` patches a model with them again.

    >>> result = calibrate(model, images, target_flops=2.0)         # per-block thresholds, model left patched
    >>> model.mame.save_thresholds("dinov2_2x.json")
    >>> load_thresholds(other_model, "dinov2_2x.json")              # the same merges on another copy
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, Mapping

import torch
from rich.progress import Progress
from torch import nn

import mame
from mame.bench import count_flops, paired_speedup, tokens_per_block
from mame.bench.flops import flop_counter
from mame.blocks import THRESHOLDS_FORMAT, MameMerge, MergeRuntime, TokenState
from mame.patch.options import resolve_layers

TargetKind = Literal["tokens", "flops", "speedup"]
Schedule = Literal["linear", "geometric", "decreasing"]
SCHEDULES = ("linear", "geometric", "decreasing")
PAPER_LAYERS = 8  # the paper's training-free setting: the first 8 blocks


@dataclass
class CalibrationResult:
    """What `calibrate` chose and how it got there.

    Attributes:
        taus: the chosen τ for each patched block (all equal for ``per_block=False``).
        layers: the patched blocks.
        kind: ``"tokens"`` (share of tokens kept after ``block``), ``"flops"`` (FLOP ratio) or ``"speedup"``.
        target: the requested value.
        achieved: the value reached on the calibration images (for ``"speedup"`` the measured speed-up).
        flop_ratio: unmodified FLOPs / patched FLOPs on the calibration images at the chosen thresholds.
        history: every search step: ``(tau, value)`` for a shared τ, ``(schedule strength, value)`` per block.
        per_block: whether each block has a threshold of its own.
        schedule: the token schedule of per-block thresholds (None for a shared τ).
        target_tokens_per_block: the schedule's tokens after every patched block (mean per image, special tokens
            included; empty for a shared τ).
        tokens_per_block: tokens after every block of the model on the calibration images (mean per image).
    """

    taus: tuple[float, ...]
    layers: tuple[int, ...]
    kind: TargetKind
    target: float
    achieved: float
    flop_ratio: float
    history: list[tuple[float, float]] = field(default_factory=list)
    per_block: bool = False
    schedule: str | None = None
    target_tokens_per_block: tuple[float, ...] = ()
    tokens_per_block: tuple[float, ...] = ()

    def __str__(self) -> str:
        if self.per_block:
            where = (f"per-block τ {[round(t, 4) for t in self.taus]} on blocks {list(self.layers)} "
                     f"({self.schedule} schedule)")
        else:
            where = f"τ = {self.taus[0]:.4f} on blocks {list(self.layers)}"
        return (f"{where}: {self.kind} target {self.target:g}, reached {self.achieved:.3f} "
                f"(FLOP ratio {self.flop_ratio:.2f}x) in {len(self.history)} steps")

    def to_json(self) -> dict[str, Any]:
        """The result as a JSON-ready dict (what `load_thresholds` finds under ``"calibration"``)."""
        return json.loads(json.dumps(dataclasses.asdict(self)))  # tuples become lists, as a JSON file gives back


def _bisect(evaluate: Callable[[float], float], target: float, increasing: bool, steps: int,
            history: list[tuple[float, float]] | None, low: float = 0.0, high: float = 1.0,
            tolerance: float = 0.0) -> float:
    """The argument in [low, high] whose value is closest to ``target``, by bisection on a monotone function
    (``increasing`` in its argument or decreasing); stops early once within ``tolerance``."""
    best, best_gap = high, float("inf")
    for _ in range(steps):
        middle = (low + high) / 2
        value = evaluate(middle)
        if history is not None:
            history.append((middle, value))
        if abs(value - target) < best_gap:
            best, best_gap = middle, abs(value - target)
        if best_gap <= tolerance:
            break
        if (value < target) == increasing:
            low = middle
        else:
            high = middle
    return best


def _regula_falsi(evaluate: Callable[[float], float], target: float, increasing: bool, steps: int,
                  history: list[tuple[float, float]], low: float, high: float, value_high: float,
                  tolerance: float) -> float:
    """`_bisect` for a smooth monotone function whose value at ``high`` is known: once both ends of the bracket
    have values the next point is interpolated between them (the Illinois variant of regula falsi, which halves the
    weight of an end kept twice in a row), so a FLOP ratio is met in a few evaluations instead of a dozen."""
    best, best_gap = high, abs(value_high - target)
    value_low: float | None = None
    kept_side = 0
    for _ in range(steps):
        if value_low is None:
            point = (low + high) / 2
        else:
            point = low + (target - value_low) * (high - low) / (value_high - value_low)
            margin = 0.01 * (high - low)
            point = min(max(point, low + margin), high - margin)
        value = evaluate(point)
        history.append((point, value))
        if abs(value - target) < best_gap:
            best, best_gap = point, abs(value - target)
        if best_gap <= tolerance:
            break
        if (value < target) == increasing:
            low, value_low = point, value
            if kept_side == 1:  # the high end was kept twice: pull its value towards the target
                value_high = target + (value_high - target) / 2
            kept_side = 1
        else:
            high, value_high = point, value
            if kept_side == -1 and value_low is not None:
                value_low = target + (value_low - target) / 2
            kept_side = -1
    return best


def token_schedule(schedule: str, tokens: float, num_special: int, merges: int, final_share: float) -> list[float]:
    """Tokens (special ones included) a batch should keep after each of ``merges`` merging blocks.

    The mergeable tokens (``tokens - num_special``) fall to ``final_share`` of their number after the last merging
    block: by the same count in every block (``"linear"``, ToMe's constant r), by a count falling linearly to
    nothing over the blocks (``"decreasing"``, ToMe's decreasing schedule: the k-th of K merging blocks merges a
    share proportional to K - k) or by the same factor (``"geometric"``). No block is asked to merge more than half
    of what reaches it (an alternating partition cannot: half of the tokens are destinations).

    Args:
        schedule: ``"linear"``, ``"decreasing"`` or ``"geometric"``.
        tokens: tokens entering the first merging block, special ones included.
        num_special: special tokens (they never merge).
        merges: number of merging blocks.
        final_share: share of the mergeable tokens left after the last merging block, in [0, 1].
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    if not 0.0 <= final_share <= 1.0:
        raise ValueError(f"final_share must be in [0, 1], got {final_share}")
    mergeable = float(tokens - num_special)
    counts, previous = [], mergeable
    for step in range(1, merges + 1):
        if schedule == "linear":
            wanted = mergeable * (1.0 - (1.0 - final_share) * step / merges)
        elif schedule == "decreasing":
            removed = sum(merges - k for k in range(step)) / (merges * (merges + 1) / 2)
            wanted = mergeable * (1.0 - (1.0 - final_share) * removed)
        else:
            wanted = mergeable * final_share ** (step / merges)
        previous = max(wanted, previous / 2)
        counts.append(num_special + previous)
    return counts


class _FittingMerge:
    """A `Merger` that fits its own block's τ during one forward: bisection on the block's merge until the batch
    keeps ``target`` tokens (mean per image), then the merge at that τ. The FLOPs of the trial merges are kept apart
    (``trial_flops``), so a FLOP counter around the forward also gives the cost of the fitted model itself."""

    def __init__(self, merger: MameMerge, target: float, steps: int, counter: Any | None) -> None:
        self.merger = merger
        self.target = target
        self.steps = steps
        self.counter = counter
        self.needs_keys = merger.needs_keys
        self.tau: float | None = None
        self.trial_flops = 0

    def _total_flops(self) -> int:
        return 0 if self.counter is None else int(self.counter.get_total_flops())

    def __call__(self, x: torch.Tensor, state: TokenState, keys: torch.Tensor | None) -> torch.Tensor:
        before = self._total_flops()

        def kept(tau: float) -> float:
            return float(self.merger.kept_tokens(x, state, keys, tau).float().mean())

        # More tokens are kept as τ rises; τ = 1 keeps all, τ = -1 merges every source that can merge. Half a
        # token (mean per image) is as close as a schedule needs.
        self.tau = _bisect(kept, self.target, increasing=True, steps=self.steps, history=None, low=-1.0, high=1.0,
                           tolerance=0.5)
        self.trial_flops += self._total_flops() - before
        return dataclasses.replace(self.merger, tau=self.tau)(x, state, keys)


@dataclass
class _Fit:
    """Per-block thresholds fitted for one schedule strength, and what they cost on the calibration images."""

    final_share: float
    taus: tuple[float, ...]
    targets: tuple[float, ...]
    flops: int
    tokens: tuple[float, ...]


def _fit_per_block(probe: nn.Module, images: torch.Tensor, indices: tuple[int, ...], schedule: str,
                   final_share: float, tau_steps: int, patch_kwargs: Mapping[str, Any], tokens: float) -> _Fit:
    """One forward of ``images`` through ``probe`` (patched here, unpatched after) that fits a τ for every block in
    ``indices`` to the schedule of ``final_share`` (``tokens``: what enters the blocks, special ones included)."""
    mame.patch.timm(probe, tau=[1.0] * len(indices), layers=list(indices), **patch_kwargs)
    try:
        targets = token_schedule(schedule, tokens, probe.num_prefix_tokens, len(indices), final_share)
        counter = flop_counter()
        fitters = []
        for index, target in zip(indices, targets):
            block = probe.blocks[index]
            fitter = _FittingMerge(block._mame_merger, target, tau_steps, counter)
            object.__setattr__(block, "_mame_merger", fitter)  # removed with the other attributes by unpatch
            fitters.append(fitter)
        with torch.inference_mode(), counter:
            probe(images)
        flops = int(counter.get_total_flops()) - sum(f.trial_flops for f in fitters)
        counts = tuple(float(c) for c in probe.mame.last_token_counts)
    finally:
        mame.unpatch(probe)
    return _Fit(final_share, tuple(f.tau for f in fitters), tuple(targets), flops, counts)


def calibrate(
    model: nn.Module,
    images: torch.Tensor,
    *,
    target_tokens: float | None = None,
    target_flops: float | None = None,
    target_speedup: float | None = None,
    block: int | None = None,
    layers: int | list[int] | None = None,
    steps: int = 12,
    pairs: int = 3,
    apply: bool = True,
    progress: bool = True,
    per_block: bool = True,
    schedule: Schedule = "geometric",
    tau_steps: int = 20,
    **patch_kwargs,
) -> CalibrationResult:
    """Fit thresholds so that MaMe on ``layers`` meets one target on the calibration ``images``.

    Args:
        model: an unpatched timm VisionTransformer (`mame.patch.timm` is used).
        images: (B, 3, H, W) calibration batch: unlabelled images of the kind the model will see. 32 are enough
            for the thresholds to transfer (benchmarks/study_accuracy.py: fitted on 32 Fashion-MNIST or MNIST
            images, the FLOP ratio on 1,000 others was within about 2 % of the target; fitted on 16, within 10 %).
        target_tokens: share of tokens (special ones included) to keep after ``block`` (1-based; default the last
            patched block), in (0, 1).
        target_flops: FLOP reduction factor, > 1 (e.g. 2.0 = half the FLOPs).
        target_speedup: measured speed-up factor, > 1.
        block: the block whose output counts for ``target_tokens``.
        layers: blocks to patch (int = first K); default every block for per-block thresholds, the paper's first 8
            for a shared τ.
        steps: search steps of the target (on the schedule's strength per block, on τ when shared).
        pairs: timing pairs for ``target_speedup``.
        apply: leave ``model`` patched with the chosen thresholds (``model.mame.calibration`` then says what they
            were fitted for, and ``model.mame.save_thresholds(path)`` saves them).
        progress: show a progress bar.
        per_block: one threshold per merging block fitted to a token schedule (default), or one shared τ.
        schedule: the per-block token schedule: ``"geometric"`` (default: every merging block merges the same share
            of what reaches it; it reaches any FLOP ratio and kept the features closest to the unmodified model's in
            benchmarks/study_accuracy.py), ``"decreasing"`` (ToMe's decreasing schedule, up to about 3x) or
            ``"linear"`` (the same count in every block, ToMe's constant r, up to about 2x); see `token_schedule`.
        tau_steps: bisection steps of each block's τ (per-block thresholds; resolution 2^(1 - tau_steps)).
        **patch_kwargs: passed to `mame.patch.timm` (metric, batch_rule, size_weighted, ...).

    Returns:
        the `CalibrationResult`.
    """
    given = [(k, v) for k, v in (("tokens", target_tokens), ("flops", target_flops), ("speedup", target_speedup))
             if v is not None]
    if len(given) != 1:
        raise ValueError("give exactly one of target_tokens, target_flops, target_speedup")
    kind, target = given[0]
    if kind == "tokens" and not 0 < target < 1:
        raise ValueError(f"target_tokens must be a share in (0, 1), got {target}")
    if kind != "tokens" and target <= 1:
        raise ValueError(f"target_{kind} must be > 1 (a reduction factor), got {target}")
    if isinstance(getattr(model, "mame", None), MergeRuntime):
        raise ValueError("model is already patched: pass the unmodified model (call mame.unpatch first)")
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    if "tau" in patch_kwargs:
        raise ValueError("calibrate chooses tau itself: do not pass tau")

    depth = len(model.blocks)
    indices = resolve_layers((depth if per_block else PAPER_LAYERS) if layers is None else layers, depth)
    if not indices:
        raise ValueError("layers selects no block: nothing to calibrate")
    block_index = (max(indices) + 1 if block is None else block) - 1
    if not 0 <= block_index < depth:
        raise ValueError(f"block must be in [1, {depth}], got {block}")
    fit = _per_block if per_block else _shared
    with Progress(transient=True, disable=not progress) as bar:
        task = bar.add_task(f"calibrating {'per-block thresholds' if per_block else 'τ'} for a {kind} target of "
                            f"{target:g}", total=None)
        result = fit(model, images, kind, target, indices, block_index, steps, pairs,
                     lambda: bar.advance(task), schedule=schedule, tau_steps=tau_steps, patch_kwargs=patch_kwargs)
    if apply:
        mame.patch.timm(model, tau=list(result.taus), layers=list(indices), **patch_kwargs)
        model.mame.calibration = result.to_json() | {"images": int(images.shape[0]),
                                                     "image_size": list(images.shape[-2:])}
    return result


def _per_block(model: nn.Module, images: torch.Tensor, kind: str, target: float, indices: tuple[int, ...],
               block_index: int, steps: int, pairs: int, advance: Callable[[], None], *, schedule: str,
               tau_steps: int, patch_kwargs: Mapping[str, Any]) -> CalibrationResult:
    base = copy.deepcopy(model).eval()
    probe = copy.deepcopy(model).eval()
    history: list[tuple[float, float]] = []
    base_flops = count_flops(base, images)
    base_tokens = tokens_per_block(base)
    total_tokens, first_tokens = base_tokens[block_index], base_tokens[0]
    fits: dict[float, _Fit] = {}

    def fitted(share: float) -> _Fit:
        if share not in fits:
            advance()
            fits[share] = _fit_per_block(probe, images, indices, schedule, share, tau_steps, patch_kwargs,
                                         first_tokens)
        return fits[share]

    def flop_ratio(share: float) -> float:
        return base_flops / fitted(share).flops

    def solve_flops(flop_target: float) -> float:
        # A share of 1 keeps every token (ratio 1, less the cost of the similarity); within 0.5 % is as close as a few
        # images can tell (their token counts are whole numbers), and closer than the ratio transfers to other images.
        return _regula_falsi(flop_ratio, flop_target, increasing=False, steps=steps, history=history, low=0.0,
                             high=1.0, value_high=1.0, tolerance=0.005 * flop_target)

    if kind == "tokens":
        # The schedule alone says which strength keeps the target share after the block (no forward needed);
        # blocks after the last merging one keep what it left.
        merging_before = [i for i in indices if i <= block_index]
        if not merging_before:
            raise ValueError(f"block {block_index + 1} comes before every patched block: nothing merges by then")
        position = len(merging_before) - 1

        def scheduled_share(share: float) -> float:
            counts = token_schedule(schedule, first_tokens, model.num_prefix_tokens, len(indices), share)
            return counts[position] / total_tokens

        share = _bisect(scheduled_share, target, increasing=True, steps=max(steps, 30), history=None)
        history.append((share, scheduled_share(share)))
    else:
        flop_target = target
        if kind == "speedup":
            share = solve_flops(flop_target)
            patched = mame.patch.timm(copy.deepcopy(model).eval(), tau=list(fitted(share).taus), layers=list(indices),
                                      **patch_kwargs)
            flop_target = target / max(_measure(base, patched, images, pairs) / flop_ratio(share), 1e-3)
            history.clear()
        share = solve_flops(flop_target)
    chosen = fitted(share)
    ratio = base_flops / chosen.flops
    if kind == "tokens":
        achieved = chosen.tokens[block_index] / total_tokens
    elif kind == "flops":
        achieved = ratio
    else:
        patched = mame.patch.timm(copy.deepcopy(model).eval(), tau=list(chosen.taus), layers=list(indices),
                                  **patch_kwargs)
        achieved = _measure(base, patched, images, pairs)
    return CalibrationResult(taus=chosen.taus, layers=indices, kind=kind, target=target, achieved=achieved,
                             flop_ratio=ratio, history=history, per_block=True, schedule=schedule,
                             target_tokens_per_block=chosen.targets, tokens_per_block=chosen.tokens)


def _shared(model: nn.Module, images: torch.Tensor, kind: str, target: float, indices: tuple[int, ...],
            block_index: int, steps: int, pairs: int, advance: Callable[[], None], *, schedule: str,
            tau_steps: int, patch_kwargs: Mapping[str, Any]) -> CalibrationResult:
    """One τ for every patched block, by bisection on τ in [0, 1] (the number of merged tokens falls as τ rises)."""
    base = copy.deepcopy(model).eval()
    probe = copy.deepcopy(model).eval()
    history: list[tuple[float, float]] = []
    with torch.inference_mode():
        base_flops = count_flops(base, images)
        total_tokens = tokens_per_block(base)[block_index]

        def patched(tau: float) -> nn.Module:
            advance()
            return mame.patch.timm(probe, tau=tau, layers=indices, **patch_kwargs)

        def flop_ratio(tau: float) -> float:
            return base_flops / count_flops(patched(tau), images)

        def kept_share(tau: float) -> float:
            return tokens_per_block(patched(tau), images)[block_index] / total_tokens

        if kind == "tokens":
            tau = _bisect(kept_share, target, increasing=True, steps=steps, history=history)
        else:
            flop_target = target
            if kind == "speedup":
                # First meet the speed-up as a FLOP ratio, then correct the target by the measured efficiency.
                tau = _bisect(flop_ratio, flop_target, increasing=False, steps=steps, history=history,
                              tolerance=0.005 * flop_target)
                efficiency = _measure(base, patched(tau), images, pairs) / flop_ratio(tau)
                flop_target = target / max(efficiency, 1e-3)
                history.clear()
            tau = _bisect(flop_ratio, flop_target, increasing=False, steps=steps, history=history,
                          tolerance=0.005 * flop_target)
        ratio = flop_ratio(tau)
        counts = tuple(float(c) for c in tokens_per_block(probe))
        if kind == "tokens":
            achieved = counts[block_index] / total_tokens
        elif kind == "flops":
            achieved = ratio
        else:
            achieved = _measure(base, patched(tau), images, pairs)
    return CalibrationResult(taus=(tau,) * len(indices), layers=indices, kind=kind, target=target,
                             achieved=achieved, flop_ratio=ratio, history=history, per_block=False,
                             tokens_per_block=counts)


def _measure(base: nn.Module, patched: nn.Module, images: torch.Tensor, pairs: int) -> float:
    with torch.inference_mode():
        return paired_speedup(lambda: base(images), lambda: patched(images), pairs=pairs, warmup=1).ratio


def load_thresholds(model: nn.Module, source: str | os.PathLike | Mapping[str, Any], **overrides: Any) -> nn.Module:
    """Patch ``model`` in place with thresholds saved by ``model.mame.save_thresholds(path)`` (a path or the dict
    of ``model.mame.thresholds()``), through `mame.patch.auto`; ``overrides`` replace saved options (e.g.
    ``packed=False``). The model then merges exactly as the model they were saved from, and
    ``model.mame.calibration`` says what they were fitted for.

    Raises:
        ValueError: the file is not a MaMe thresholds file, or its layers do not fit the model.
    """
    document = source if isinstance(source, Mapping) else json.loads(Path(source).read_text())
    if not isinstance(document, Mapping) or document.get("format") != THRESHOLDS_FORMAT:
        raise ValueError(f"not a MaMe thresholds file (format {THRESHOLDS_FORMAT!r}): {str(source)[:200]}")
    settings = dict(document["settings"]) | overrides
    mame.patch.auto(model, **settings)
    model.mame.calibration = document.get("calibration")
    return model

