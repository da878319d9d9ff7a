"""Every variant against the unmodified model, in one process, on the same inputs: speed, FLOPs, tokens, memory.

    >>> from mame import bench
    >>> results = bench.compare(model, images, [bench.Variant("MaMe τ=0.8", "mame", {"tau": 0.8, "layers": 8}),
    ...                                         bench.Variant("ToMe r=16", "tome", {"r": 16})])
    >>> rich.print(bench.results_table(results))
"""

from __future__ import annotations

import copy
import functools
from dataclasses import dataclass, field
from typing import Any, Callable, Literal, Sequence

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from torch import nn

import mame.patch
from mame.baselines import tome
from mame.bench._inputs import Inputs, call, move, samples
from mame.bench.bound import bound_timing, merge_free_copy, merging_blocks
from mame.bench.flops import count_flops
from mame.bench.memory import peak_memory
from mame.bench.timing import SpeedResult, paired_speedup
from mame.bench.tokens import OneAtATime, merge_runtime, tokens_per_block

VariantKind = Literal["none", "mame", "tome"]


def _ended_ragged(patched: nn.Module) -> bool:
    """Whether the last forward of ``patched`` in this thread ended with a padded (ragged) batch."""
    runtime = merge_runtime(patched)
    return runtime is not None and runtime.state is not None and runtime.state.mask is not None


def _unchanged(model: nn.Module) -> nn.Module:
    return model


_PATCHERS: dict[str, Callable[..., nn.Module]] = {"none": _unchanged, "mame": mame.patch.auto, "tome": tome.patch_timm}


@dataclass(frozen=True)
class Variant:
    """One way of patching the model for a comparison.

    Attributes:
        name: label in tables and JSON, e.g. ``"MaMe τ=0.8"``.
        kind: ``"mame"`` (`mame.patch.auto`: timm, transformers or open_clip), ``"tome"`` (`mame.baselines.tome.patch_timm`) or ``"none"`` (the
            unmodified model against itself: the noise floor of the measurement).
        kwargs: keyword arguments of the patch function, e.g. ``{"tau": 0.8, "layers": 8}`` or ``{"r": 16}``.
    """

    name: str
    kind: VariantKind
    kwargs: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.kind not in _PATCHERS:
            raise ValueError(f"kind must be one of {tuple(_PATCHERS)}, got {self.kind!r}")

    def apply(self, model: nn.Module) -> nn.Module:
        """Patch ``model`` in place and return it."""
        return _PATCHERS[self.kind](model, **self.kwargs)


@dataclass(frozen=True)
class VariantResult:
    """One variant measured against the unmodified model in the same process.

    Attributes:
        name: the variant's label.
        kind: the variant's kind.
        kwargs: the patch arguments.
        speedup: unmodified time / variant time over interleaved pairs.
        flops: FLOPs of one forward of the variant on the whole batch (merge matmuls included).
        baseline_flops: the same for the unmodified model.
        flop_ratio: baseline_flops / flops, the speed-up a perfect implementation would reach.
        tokens_per_block: tokens after every block (mean over the batch).
        final_tokens: tokens after the last block.
        peak_memory: peak bytes allocated during one forward of the variant (None where not measured or not
            measurable).
        baseline_peak_memory: the same for the unmodified model.
        efficiency: speedup.ratio / flop_ratio, the share of the FLOP saving turned into time.
        bound: speed-up of the same model with every merge free (`merge_free_copy`), or None when not measured:
            what eager PyTorch on this machine can get from these token counts at most.
        real_token_flop_ratio: for a batch that ended ragged (per-sample merging), the FLOP ratio with every image
            run alone: the padding-free cost of the same merges, the ratio a ragged batch's speed-up is measured
            against (None otherwise).
        of_bound: the share of that bound the implementation reaches: merge-free time / variant time, timed
            directly in its own interleaved pairs of the two (`of_bound_pairs`), so that machine drift between the
            speed-up's pairs and the bound's does not enter it (None when not measured). Below 1 it is the merge's
            own cost; the gap from bound to FLOP ratio is the hardware's
            (small matrices run at fewer FLOP/s, fixed per-block costs stay).
    """

    name: str
    kind: str
    kwargs: dict[str, Any]
    speedup: SpeedResult
    flops: int
    baseline_flops: int
    flop_ratio: float
    tokens_per_block: list[float]
    final_tokens: float
    peak_memory: int | None
    baseline_peak_memory: int | None
    efficiency: float
    bound: SpeedResult | None = None
    of_bound: float | None = None
    of_bound_pairs: SpeedResult | None = None
    real_token_flop_ratio: float | None = None


def compare(
    model: nn.Module,
    inputs: Inputs,
    variants: Sequence[Variant],
    *,
    pairs: int = 7,
    warmup: int = 2,
    min_time: float = 0.0,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    progress: bool = True,
    bound: bool = False,
    one_at_a_time: bool = False,
    memory: bool = True,
) -> list[VariantResult]:
    """Measure every variant against the unmodified model, in this process, on the same inputs.

    The caller's model is not changed: an eval-mode copy (on ``device``/``dtype`` when given) is the baseline and
    each variant patches its own copy of it, so both sides of every pair are ready-made modules.

    Args:
        model: an unmodified model (for ``"tome"`` variants a timm VisionTransformer).
        inputs: a batch: a tensor, a tuple of positional arguments or a mapping of keyword arguments.
        variants: what to compare.
        pairs: timed pairs per variant.
        warmup: untimed calls of each side before timing.
        min_time: shortest timed sample in seconds, see `paired_speedup`.
        device: where to run (default: where the model is).
        dtype: floating dtype of weights and inputs (CPU: float32 or bfloat16; CUDA also float16).
        progress: show a rich progress bar on stderr.
        bound: also time each variant with its merges made free (`merge_free_copy`) and report that speed-up as
            ``bound`` and the share of it reached as ``of_bound`` (merge-free vs variant in pairs of their own).
            Both are timed with at least
            `BOUND_PAIRS` pairs of samples lasting at least `BOUND_MIN_TIME` seconds (`bound_timing`).
        one_at_a_time: run the samples of ``inputs`` one by one (each without its padding), as single-image serving
            does; FLOPs and speed cover the whole loop, tokens per block are the mean over samples.
        memory: measure peak memory (one extra forward of each side under the profiler); False leaves it None.

    Returns:
        one `VariantResult` per variant, in order.
    """
    if merge_runtime(model) is not None:
        raise ValueError("model is patched by mame: pass the unmodified model (call mame.unpatch first)")
    runner = OneAtATime if one_at_a_time else _unchanged
    baseline = copy.deepcopy(model).to(device=device, dtype=dtype).eval()
    run_device = torch.device(device) if device is not None else next(baseline.parameters()).device
    inputs = move(inputs, run_device, dtype)
    run_baseline = runner(baseline)

    def measure_memory(run: Callable[..., Any]) -> int | None:
        return peak_memory(lambda: call(run, inputs), run_device) if memory else None

    with torch.inference_mode():
        baseline_flops = count_flops(run_baseline, inputs)
        baseline_peak = measure_memory(run_baseline)
    results = []
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    bound_settings = bound_timing(pairs, min_time)
    with Progress(*columns, console=Console(stderr=True), disable=not progress, transient=True) as bar:
        overall = bar.add_task("variants", total=len(variants))
        for variant in variants:
            patched = variant.apply(copy.deepcopy(baseline))
            with_bound = bound and bool(merging_blocks(patched))  # nothing to make free without merges
            task = bar.add_task(f"  {variant.name}", total=pairs + (2 * bound_settings["pairs"] if with_bound else 0))
            run_patched = runner(patched)
            with torch.inference_mode():
                flops = count_flops(run_patched, inputs)  # one_at_a_time: this call also leaves the token counts
                real_flop_ratio = None
                if not one_at_a_time and _ended_ragged(patched):
                    real_flop_ratio = (count_flops(OneAtATime(baseline), inputs)
                                       / count_flops(OneAtATime(patched), inputs))
                if one_at_a_time and run_patched.counts:
                    tokens = run_patched.mean_token_counts
                else:
                    tokens = tokens_per_block(patched, samples(inputs)[0] if one_at_a_time else inputs)
                peak = measure_memory(run_patched)
                timed = functools.partial(paired_speedup, warmup=warmup, on_pair=lambda _: bar.advance(task))
                speed = timed(lambda: call(run_baseline, inputs), lambda: call(run_patched, inputs), pairs=pairs,
                              min_time=min_time)
                bound_speed = share = None
                if with_bound:
                    run_free = runner(merge_free_copy(patched, lambda: call(run_patched, inputs)))
                    bound_speed = timed(lambda: call(run_baseline, inputs), lambda: call(run_free, inputs),
                                        **bound_settings)
                    share = timed(lambda: call(run_free, inputs), lambda: call(run_patched, inputs),
                                  **bound_settings)
            flop_ratio = baseline_flops / flops
            results.append(VariantResult(
                name=variant.name, kind=variant.kind, kwargs=dict(variant.kwargs), speedup=speed, flops=flops,
                baseline_flops=baseline_flops, flop_ratio=flop_ratio, tokens_per_block=tokens,
                final_tokens=tokens[-1], peak_memory=peak, baseline_peak_memory=baseline_peak,
                efficiency=speed.ratio / flop_ratio, bound=bound_speed,
                of_bound=None if share is None else share.ratio, of_bound_pairs=share,
                real_token_flop_ratio=real_flop_ratio))
            bar.remove_task(task)
            bar.advance(overall)
    return results
