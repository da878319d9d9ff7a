"""Automatic τ: choose the threshold that makes a patched model meet a budget (the paper's stated future work).

The number of merged tokens falls as τ rises, so the budget is met by bisection on τ over a few calibration images:
a token budget ("keep 50 % of the tokens after block 8"), a FLOP ratio (counted, merge matmuls and attention
included) or a speed-up. A speed-up is first met as a FLOP ratio (the limit a perfect implementation reaches), then
the measured efficiency (speed-up / FLOP ratio) of that setting corrects the FLOP target once. Token and FLOP targets
are deterministic: the same images and settings give the same τ.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Callable, Literal

import torch
from rich.progress import Progress
from torch import nn

import mame
from mame.blocks import MergeRuntime
from mame.bench import count_flops, paired_speedup, tokens_per_block
from mame.patch.options import resolve_layers

TargetKind = Literal["tokens", "flops", "speedup"]


@dataclass
class CalibrationResult:
    """What `calibrate` chose and how it got there.

    Attributes:
        taus: the chosen τ for each patched block.
        layers: the patched blocks.
        kind: ``"tokens"`` (share of tokens kept after ``block``), ``"flops"`` (FLOP ratio) or ``"speedup"``.
        target: the requested value.
        achieved: the value reached on the calibration images (for ``"speedup"`` the measured speed-up).
        flop_ratio: unmodified FLOPs / patched FLOPs on the calibration images at the chosen τ.
        history: ``(tau, value)`` for every bisection step.
    """

    taus: tuple[float, ...]
    layers: tuple[int, ...]
    kind: TargetKind
    target: float
    achieved: float
    flop_ratio: float
    history: list[tuple[float, float]] = field(default_factory=list)

    def __str__(self) -> str:
        return (f"τ = {self.taus[0]:.4f} on blocks {list(self.layers)}: {self.kind} target {self.target:g}, "
                f"reached {self.achieved:.3f} (FLOP ratio {self.flop_ratio:.2f}x) in {len(self.history)} steps")


def _bisect(evaluate: Callable[[float], float], target: float, increasing_in_tau: bool, steps: int,
            history: list[tuple[float, float]], low: float = 0.0, high: float = 1.0) -> float:
    """τ in [low, high] whose value is closest to ``target``, by bisection on a monotone function of τ."""
    best_tau, best_gap = high, float("inf")
    for _ in range(steps):
        tau = (low + high) / 2
        value = evaluate(tau)
        history.append((tau, value))
        if abs(value - target) < best_gap:
            best_tau, best_gap = tau, abs(value - target)
        if (value < target) == increasing_in_tau:
            low = tau
        else:
            high = tau
    return best_tau


def calibrate(
    model: nn.Module,
    images: torch.Tensor,
    *,
    target_tokens: float | None = None,
    target_flops: float | None = None,
    target_speedup: float | None = None,
    block: int | None = None,
    layers: int | list[int] = 8,
    steps: int = 12,
    pairs: int = 3,
    apply: bool = True,
    progress: bool = True,
    **patch_kwargs,
) -> CalibrationResult:
    """Pick τ so that MaMe on ``layers`` meets one target on the calibration ``images``.

    Args:
        model: an unpatched timm VisionTransformer (`mame.patch.timm` is used).
        images: (B, 3, H, W) calibration batch (a few images suffice).
        target_tokens: share of tokens to keep after ``block`` (1-based; default the last patched block), in (0, 1).
        target_flops: FLOP reduction factor, > 1 (e.g. 2.0 = half the FLOPs).
        target_speedup: measured speed-up factor, > 1.
        block: the block whose output counts for ``target_tokens``.
        layers: blocks to patch (int = first K).
        steps: bisection steps (τ resolution 2^-steps).
        pairs: timing pairs for ``target_speedup``.
        apply: leave ``model`` patched with the chosen τ.
        progress: show a progress bar.
        **patch_kwargs: passed to `mame.patch.timm` (batch_rule, size_weighted, ...).

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

    indices = resolve_layers(layers, len(model.blocks))
    if not indices:
        raise ValueError("layers selects no block: nothing to calibrate")
    block_index = (max(indices) + 1 if block is None else block) - 1
    if not 0 <= block_index < len(model.blocks):
        raise ValueError(f"block must be in [1, {len(model.blocks)}], got {block}")
    base = copy.deepcopy(model).eval()
    probe = copy.deepcopy(model).eval()
    history: list[tuple[float, float]] = []
    with torch.inference_mode(), Progress(transient=True, disable=not progress) as bar:
        task = bar.add_task(f"calibrating τ for a {kind} target of {target:g}", total=None)
        base_flops = count_flops(base, images)
        total_tokens = tokens_per_block(base)[block_index]

        def patched(tau: float) -> nn.Module:
            bar.advance(task)
            return mame.patch.timm(probe, tau=tau, layers=indices, **patch_kwargs)

        def flop_ratio(tau: float) -> float:
            return base_flops / count_flops(patched(tau), images)

        def kept_share(tau: float) -> float:
            return tokens_per_block(patched(tau), images)[block_index] / total_tokens

        if kind == "tokens":
            tau = _bisect(kept_share, target, increasing_in_tau=True, steps=steps, history=history)
        else:
            flop_target = target
            if kind == "speedup":
                # First meet the speed-up as a FLOP ratio, then correct the target by the measured efficiency.
                tau = _bisect(flop_ratio, flop_target, increasing_in_tau=False, steps=steps, history=history)
                efficiency = _measure(base, patched(tau), images, pairs) / flop_ratio(tau)
                flop_target = target / max(efficiency, 1e-3)
                history.clear()
            tau = _bisect(flop_ratio, flop_target, increasing_in_tau=False, steps=steps, history=history)
        ratio = flop_ratio(tau)
        if kind == "tokens":
            achieved = kept_share(tau)
        elif kind == "flops":
            achieved = ratio
        else:
            achieved = _measure(base, patched(tau), images, pairs)
    result = CalibrationResult(taus=(tau,) * len(indices), layers=indices, kind=kind, target=target,
                               achieved=achieved, flop_ratio=ratio, history=history)
    if apply:
        mame.patch.timm(model, tau=tau, layers=indices, **patch_kwargs)
    return result


def _measure(base: nn.Module, patched: nn.Module, images: torch.Tensor, pairs: int) -> float:
    return paired_speedup(lambda: base(images), lambda: patched(images), pairs=pairs, warmup=1).ratio
