"""Honest measurements: paired speed ratios, FLOPs that include attention, peak memory, tokens per block.

The rules every number here follows: speed is a ratio of baseline to method measured in one process, after
warm-up, over interleaved pairs that alternate which side runs first, reported as the median with its spread;
FLOPs count SDPA (which `FlopCounterMode` scores as zero on CPU unless a formula is registered) and the merge's own
matmuls; the FLOP ratio is the limit a speed-up should be compared with.

    >>> from mame import bench
    >>> results = bench.compare(model, images, [bench.Variant("MaMe τ=0.8", "mame", {"tau": 0.8, "layers": 8}),
    ...                                         bench.Variant("ToMe r=16", "tome", {"r": 16})])
    >>> rich.print(bench.results_table(results))
"""

from __future__ import annotations

import contextlib
import copy
import functools
import math
import os
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterator, Literal, Mapping, Sequence

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from torch import nn
from torch.utils.flop_counter import FlopCounterMode, flop_registry

import mame.patch
from mame.baselines import tome
from mame.blocks import MergeRuntime

VariantKind = Literal["none", "mame", "tome"]
Inputs = torch.Tensor | Sequence[Any] | Mapping[str, Any]


# --------------------------------------------------------------------------------------------------------- speed
@dataclass(frozen=True)
class SpeedResult:
    """Speed-up of a method over a baseline from interleaved pairs.

    Attributes:
        ratio: median over pairs of baseline_time / method_time (> 1 means the method is faster).
        ratio_low: smallest per-pair ratio.
        ratio_high: largest per-pair ratio.
        baseline_s: median seconds per baseline call.
        method_s: median seconds per method call.
        pairs: number of timed pairs.
        ratios: every per-pair ratio, in the order measured.
    """

    ratio: float
    ratio_low: float
    ratio_high: float
    baseline_s: float
    method_s: float
    pairs: int
    ratios: tuple[float, ...] = ()

    def __str__(self) -> str:
        return f"{self.ratio:.2f}x ({self.ratio_low:.2f}–{self.ratio_high:.2f}, {self.pairs} pairs)"


def default_sync() -> Callable[[], None]:
    """``torch.cuda.synchronize`` when CUDA has been used in this process (kernels are asynchronous), else a no-op."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return torch.cuda.synchronize
    return _no_sync


def _no_sync() -> None:
    return None


def _time_call(fn: Callable[[], Any], repeats: int, sync: Callable[[], None]) -> float:
    """Seconds per call of ``fn``, averaged over ``repeats`` back-to-back calls."""
    sync()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    sync()
    return (time.perf_counter() - start) / repeats


def _repeats_for(fn: Callable[[], Any], min_time: float, sync: Callable[[], None]) -> int:
    """How many calls make one timed sample last at least ``min_time`` (short calls are dominated by timer noise)."""
    if min_time <= 0:
        return 1
    return max(1, math.ceil(min_time / max(_time_call(fn, 1, sync), 1e-9)))


def paired_speedup(
    baseline: Callable[[], Any],
    method: Callable[[], Any],
    *,
    pairs: int = 7,
    warmup: int = 2,
    min_time: float = 0.0,
    sync: Callable[[], None] | None = None,
    on_pair: Callable[[int], None] | None = None,
) -> SpeedResult:
    """Time ``method`` against ``baseline`` in interleaved pairs and report the median ratio.

    Pair ``k`` runs baseline then method when ``k`` is even and method then baseline when it is odd, so slow drift
    of the machine (turbo, thermal, other jobs) and "second call is warmer" effects hit both sides equally.

    Args:
        baseline: the reference, called with no arguments.
        method: the candidate, called with no arguments.
        pairs: timed pairs (the median of an odd count is one of the measured ratios).
        warmup: untimed calls of each side before timing (allocator, caches, lazy initialisation, JIT).
        min_time: each timed sample repeats its callable until it lasts at least this many seconds (calibrated
            once after warm-up, separately for each side); 0 times single calls.
        sync: called before starting and before stopping each clock; defaults to `default_sync` so that
            asynchronous CUDA work is finished inside the sample it belongs to.
        on_pair: called with the index of each pair once it is timed (progress bars).

    Returns:
        the `SpeedResult`.
    """
    if pairs < 1:
        raise ValueError(f"pairs must be >= 1, got {pairs}")
    if warmup < 0:
        raise ValueError(f"warmup must be >= 0, got {warmup}")
    sync = default_sync() if sync is None else sync
    for _ in range(warmup):
        baseline()
        method()
    repeats_baseline = _repeats_for(baseline, min_time, sync)
    repeats_method = _repeats_for(method, min_time, sync)
    baseline_times, method_times = [], []
    for k in range(pairs):
        if k % 2 == 0:
            baseline_times.append(_time_call(baseline, repeats_baseline, sync))
            method_times.append(_time_call(method, repeats_method, sync))
        else:
            method_times.append(_time_call(method, repeats_method, sync))
            baseline_times.append(_time_call(baseline, repeats_baseline, sync))
        if on_pair is not None:
            on_pair(k)
    ratios = tuple(b / max(m, 1e-12) for b, m in zip(baseline_times, method_times))
    return SpeedResult(ratio=statistics.median(ratios), ratio_low=min(ratios), ratio_high=max(ratios),
                       baseline_s=statistics.median(baseline_times), method_s=statistics.median(method_times),
                       pairs=pairs, ratios=ratios)


# --------------------------------------------------------------------------------------------------------- FLOPs
def _attention_flops(query_shape: torch.Size, key_shape: torch.Size, value_shape: torch.Size) -> int:
    """QK^T and AV of (B, H, Lq, hd) queries against (B, Hkv, Lk, hd) keys: 2 FLOPs per multiply-accumulate."""
    batch, heads, len_q, head_dim = query_shape
    len_k, value_dim = key_shape[-2], value_shape[-1]
    return 2 * batch * heads * len_q * len_k * (head_dim + value_dim)


def _sdpa_forward_flop(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return _attention_flops(query_shape, key_shape, value_shape)


def _sdpa_backward_flop(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    # Recompute QK^T, then dScores = dO V^T, dV = P^T dO, dQ = dS K, dK = dS^T Q: five matmuls of the forward's size.
    batch, heads, len_q, head_dim = query_shape
    len_k, value_dim = key_shape[-2], value_shape[-1]
    return 2 * batch * heads * len_q * len_k * (3 * head_dim + 2 * value_dim)


def _sdpa_formulas() -> dict[Any, Callable[..., int]]:
    """Formulas for the fused SDPA kernels this torch has but `flop_registry` does not score (CPU flash, the
    backend-overridable kernel). The CUDA flash/efficient/cuDNN kernels are already scored by torch; the math
    backend decomposes into ``bmm`` and is counted as matmuls."""
    formulas: dict[Any, Callable[..., int]] = {}
    for name in ("_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_fused_attention_overrideable"):
        for op_name, formula in ((name, _sdpa_forward_flop), (f"{name}_backward", _sdpa_backward_flop)):
            op = getattr(torch.ops.aten, op_name, None)
            if op is not None and op not in flop_registry:
                formulas[op] = formula
    return formulas


def _call(model: Callable[..., Any], inputs: Inputs) -> Any:
    """``model(inputs)`` for a tensor, ``model(*inputs)`` for a sequence, ``model(**inputs)`` for a mapping."""
    if isinstance(inputs, Mapping):
        return model(**inputs)
    if isinstance(inputs, (tuple, list)):
        return model(*inputs)
    return model(inputs)


def count_flops(model: Callable[..., Any], inputs: Inputs) -> int:
    """FLOPs of one forward of ``model`` on ``inputs`` (2 per multiply-accumulate), attention included.

    Every matmul, linear and convolution is counted, so a merge's own similarity and fusion matmuls are part of
    the total; elementwise work (norms, softmax, activations) is not, as is usual.

    Args:
        model: a module or any callable.
        inputs: a tensor (``model(x)``), a tuple/list of positional arguments or a mapping of keyword arguments.
    """
    counter = flop_counter()
    with torch.inference_mode(), counter:
        _call(model, inputs)
    return int(counter.get_total_flops())


def flop_counter() -> FlopCounterMode:
    """A silent `FlopCounterMode` that also scores the fused SDPA kernels (its ``get_flop_counts()`` gives the
    FLOPs of every submodule, e.g. of each block)."""
    return FlopCounterMode(display=False, custom_mapping=_sdpa_formulas())


# -------------------------------------------------------------------------------------------------------- memory
@contextlib.contextmanager
def _quiet_stderr() -> Iterator[None]:
    """Silence file descriptor 2 (Kineto prints start/stop lines from C++ that Python cannot intercept)."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


@functools.cache
def _consume_profiler_warning() -> None:
    """Free, under a silenced profiler, a block allocated before it started.

    The CPU allocator warns once per process that such frees are not recorded. That is expected here (the peak is
    of what ``fn`` itself allocates), so the warning is spent once in silence instead of reaching the user.
    """
    block = torch.empty(1)
    with _quiet_stderr(), torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU],
                                                 profile_memory=True):
        del block


def _cpu_peak_memory(fn: Callable[[], Any]) -> int:
    # The profiler sees every allocation and free of the CPU allocator (also buffers that kernels allocate
    # internally); the running sum of those events, in time order, peaks at the answer.
    _consume_profiler_warning()
    profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True)
    with _quiet_stderr():
        profiler.start()
    try:
        fn()
    finally:
        with _quiet_stderr():
            profiler.stop()
    events = [e for e in profiler.profiler.kineto_results.events()
              if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU]
    live = peak = 0
    for event in sorted(events, key=lambda e: e.start_ns()):
        live += event.nbytes()
        peak = max(peak, live)
    return peak


def peak_memory(fn: Callable[[], Any], device: torch.device | str = "cpu") -> int | None:
    """Peak bytes allocated during ``fn()`` above what was allocated when it started (activations, workspaces).

    CUDA: the caching allocator's own peak counter, minus what was allocated at the start. CPU: the peak of the
    running total of the allocation and free events that ``torch.profiler`` (``profile_memory=True``) records,
    temporaries allocated inside kernels included; frees of blocks allocated before ``fn`` started are not recorded,
    so this is the peak of what ``fn`` itself allocated and still held. Other devices: None, rather than a number
    that would mean something else.
    """
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        start = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return int(torch.cuda.max_memory_allocated(device) - start)
    if device.type == "cpu":
        return _cpu_peak_memory(fn)
    return None


# -------------------------------------------------------------------------------------------------------- tokens
def tokens_per_block(model: nn.Module, inputs: Inputs | None = None) -> list[float]:
    """Tokens after every block: of the last forward for a model patched by mame (MaMe or ToMe; mean over the batch
    when samples differ), the full count for an unmodified model.

    Args:
        model: a patched model, or an unmodified one with a ``blocks`` list (timm ViT).
        inputs: when given, one forward is run on them first (needed for a patched model that has not run yet; for
            an unmodified model the count is then read from the blocks' outputs instead of the patch grid).
    """
    runtime = getattr(model, "mame", None)
    runtime = runtime if isinstance(runtime, MergeRuntime) else None
    blocks = getattr(model, "blocks", None)
    if runtime is None and blocks is None:
        raise ValueError(f"{type(model).__name__} is neither patched by mame nor has a `blocks` list to count")
    if inputs is None:
        if runtime is not None:
            if not runtime.last_token_counts:
                raise ValueError("the patched model has not run a forward yet: pass inputs")
            return [float(c) for c in runtime.last_token_counts]
        grid = getattr(getattr(model, "patch_embed", None), "num_patches", None)
        if grid is None:
            raise ValueError(f"cannot tell the token count of {type(model).__name__} without inputs")
        return [float(grid + model.num_prefix_tokens)] * len(blocks)
    counts: list[float] = []
    hooks = [] if runtime is not None else [
        block.register_forward_hook(lambda _module, _args, out: counts.append(float(out.shape[1]))) for block in blocks]
    try:
        with torch.inference_mode():
            _call(model, inputs)
    finally:
        for hook in hooks:
            hook.remove()
    return [float(c) for c in runtime.last_token_counts] if runtime is not None else counts


# --------------------------------------------------------------------------------------------- merge-free bound
class OneAtATime:
    """Calls ``model`` on each sample of a batch in turn (single-image serving), keeping every sample's token counts.

    Any function here that takes a model and inputs (`count_flops`, `paired_speedup` callables, `compare` with
    ``one_at_a_time=True``) can be given this wrapper instead of the model.
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.counts: list[list[float]] = []

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self.counts, outputs = [], []
        runtime = getattr(self.model, "mame", None)
        for i in range(x.shape[0]):
            outputs.append(self.model(x[i : i + 1]))
            if isinstance(runtime, MergeRuntime):
                self.counts.append(runtime.last_token_counts)
        return torch.cat(outputs)

    @property
    def mean_token_counts(self) -> list[float]:
        """Tokens after every block, averaged over the samples of the last call (empty for an unpatched model)."""
        return [statistics.fmean(column) for column in zip(*self.counts)]


@dataclass
class _ReplayMerge:
    """A merge that costs nothing: returns the first ``length`` tokens and sets the sizes and padding mask a real
    merge produced on the same inputs, one recorded forward after another, so every later block computes on
    exactly the token counts, attention biases and packed MLP rows of the real run."""

    outputs: list[tuple[int, torch.Tensor | None, torch.Tensor | None]]
    step: int = 0
    needs_keys = False

    def __call__(self, x: torch.Tensor, state: Any, keys: torch.Tensor | None) -> torch.Tensor:
        length, state.sizes, state.mask = self.outputs[self.step % len(self.outputs)]
        self.step += 1
        return x[:, :length].contiguous()  # a copy when B > 1, as the real merge makes a new tensor too


def _merging_blocks(model: nn.Module) -> list[nn.Module]:
    return [module for module in model.modules() if module.__dict__.get("_mame_merger") is not None]


def merge_free_copy(patched: nn.Module, call: Callable[[], Any]) -> nn.Module:
    """A copy of ``patched`` whose merges cost nothing: the speed-up it reaches is the bound for any implementation
    of the same merges on the same inputs (same token counts, same attention and MLP work; only the merge's own
    similarity, weights and fusion are free).

    Args:
        patched: a model patched by `mame.patch` or `mame.baselines.tome`.
        call: runs ``patched`` exactly as it will be timed (e.g. ``lambda: patched(x)``); the copy replays the
            recorded merges in that order, so it must then be called the same way.
    """
    blocks = _merging_blocks(patched)
    if not blocks:
        raise ValueError("the model has no merging blocks: patch it with mame first")
    replay = copy.deepcopy(patched)  # before recording: the copy must not carry the recording wrappers
    records: list[list] = []
    originals = {}
    for block in blocks:
        real, record = block._mame_merger, []
        originals[block] = real
        records.append(record)

        def recording(x, state, keys, real=real, record=record):
            merged = real(x, state, keys)
            record.append((merged.shape[1], state.sizes, state.mask))
            return merged

        recording.needs_keys = real.needs_keys
        object.__setattr__(block, "_mame_merger", recording)
    try:
        with torch.inference_mode():
            call()
    finally:
        for block, real in originals.items():
            object.__setattr__(block, "_mame_merger", real)
    for block, record in zip(_merging_blocks(replay), records):
        object.__setattr__(block, "_mame_merger", _ReplayMerge(record))
    return replay


# ------------------------------------------------------------------------------------------------------- compare
def _unchanged(model: nn.Module) -> nn.Module:
    return model


_PATCHERS: dict[str, Callable[..., nn.Module]] = {"none": _unchanged, "mame": mame.patch.timm, "tome": tome.patch_timm}


@dataclass(frozen=True)
class Variant:
    """One way of patching the model for a comparison.

    Attributes:
        name: label in tables and JSON, e.g. ``"MaMe τ=0.8"``.
        kind: ``"mame"`` (`mame.patch.timm`), ``"tome"`` (`mame.baselines.tome.patch_timm`) or ``"none"`` (the
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
        peak_memory: peak bytes allocated during one forward of the variant (None where not measurable).
        baseline_peak_memory: the same for the unmodified model.
        efficiency: speedup.ratio / flop_ratio, the share of the FLOP saving turned into time.
        bound: speed-up of the same model with every merge free (`merge_free_copy`), or None when not measured:
            what eager PyTorch on this machine can get from these token counts at most.
        of_bound: speedup.ratio / bound.ratio, the share of that bound the implementation reaches (None when
            not measured). Below 1 it is the merge's own cost; the gap from bound to FLOP ratio is the hardware's
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


def _values(inputs: Inputs) -> list[Any]:
    if isinstance(inputs, Mapping):
        return list(inputs.values())
    return list(inputs) if isinstance(inputs, (tuple, list)) else [inputs]


def _move(inputs: Inputs, device: torch.device | None, dtype: torch.dtype | None) -> Inputs:
    """Inputs on ``device``; floating tensors also cast to ``dtype`` (token ids and masks keep theirs)."""
    def move(value: Any) -> Any:
        if not isinstance(value, torch.Tensor):
            return value
        return value.to(device=device, dtype=dtype if value.is_floating_point() else None)

    if isinstance(inputs, Mapping):
        return {key: move(value) for key, value in inputs.items()}
    if isinstance(inputs, (tuple, list)):
        return type(inputs)(move(value) for value in inputs)
    return move(inputs)


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
) -> list[VariantResult]:
    """Measure every variant against the unmodified model, in this process, on the same inputs.

    The caller's model is not changed: an eval-mode copy (on ``device``/``dtype`` when given) is the baseline and
    each variant patches its own copy of it, so both sides of every pair are ready-made modules.

    Args:
        model: an unmodified model (for ``"mame"``/``"tome"`` variants a timm VisionTransformer).
        inputs: a batch: a tensor, a tuple of positional arguments or a mapping of keyword arguments.
        variants: what to compare.
        pairs: timed pairs per variant.
        warmup: untimed calls of each side before timing.
        min_time: shortest timed sample in seconds, see `paired_speedup`.
        device: where to run (default: where the model is).
        dtype: floating dtype of weights and inputs (CPU: float32 or bfloat16; CUDA also float16).
        progress: show a rich progress bar on stderr.
        bound: also time each variant with its merges made free (`merge_free_copy`) and report that speed-up as
            ``bound`` and the share of it reached as ``of_bound``.
        one_at_a_time: run the samples of ``inputs`` (a tensor) one by one, as single-image serving does; FLOPs
            and speed cover the whole loop, tokens per block are the mean over samples.

    Returns:
        one `VariantResult` per variant, in order.
    """
    if isinstance(getattr(model, "mame", None), MergeRuntime):
        raise ValueError("model is patched by mame: pass the unmodified model (call mame.unpatch first)")
    if one_at_a_time and not isinstance(inputs, torch.Tensor):
        raise ValueError("one_at_a_time needs a batch tensor as inputs")
    runner = OneAtATime if one_at_a_time else _unchanged
    baseline = copy.deepcopy(model).to(device=device, dtype=dtype).eval()
    run_device = torch.device(device) if device is not None else next(baseline.parameters()).device
    inputs = _move(inputs, run_device, dtype)
    run_baseline = runner(baseline)
    with torch.inference_mode():
        baseline_flops = count_flops(run_baseline, inputs)
        baseline_peak = peak_memory(lambda: _call(run_baseline, inputs), run_device)
    results = []
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=Console(stderr=True), disable=not progress, transient=True) as bar:
        overall = bar.add_task("variants", total=len(variants))
        for variant in variants:
            patched = variant.apply(copy.deepcopy(baseline))
            with_bound = bound and bool(_merging_blocks(patched))  # nothing to make free without merges
            task = bar.add_task(f"  {variant.name}", total=pairs * (2 if with_bound else 1))
            run_patched = runner(patched)
            with torch.inference_mode():
                flops = count_flops(run_patched, inputs)  # one_at_a_time: this call also leaves the token counts
                if one_at_a_time and run_patched.counts:
                    tokens = run_patched.mean_token_counts
                else:
                    tokens = tokens_per_block(patched, inputs[:1] if one_at_a_time else inputs)
                peak = peak_memory(lambda: _call(run_patched, inputs), run_device)
                timed = functools.partial(paired_speedup, pairs=pairs, warmup=warmup, min_time=min_time,
                                          on_pair=lambda _: bar.advance(task))
                speed = timed(lambda: _call(run_baseline, inputs), lambda: _call(run_patched, inputs))
                bound_speed = None
                if with_bound:
                    run_free = runner(merge_free_copy(patched, lambda: _call(run_patched, inputs)))
                    bound_speed = timed(lambda: _call(run_baseline, inputs), lambda: _call(run_free, inputs))
            flop_ratio = baseline_flops / flops
            results.append(VariantResult(
                name=variant.name, kind=variant.kind, kwargs=dict(variant.kwargs), speedup=speed, flops=flops,
                baseline_flops=baseline_flops, flop_ratio=flop_ratio, tokens_per_block=tokens,
                final_tokens=tokens[-1], peak_memory=peak, baseline_peak_memory=baseline_peak,
                efficiency=speed.ratio / flop_ratio, bound=bound_speed,
                of_bound=None if bound_speed is None else speed.ratio / bound_speed.ratio))
            bar.remove_task(task)
            bar.advance(overall)
    return results


# ------------------------------------------------------------------------------------------------------- reports
def run_meta(model_name: str, inputs: Inputs, *, dtype: torch.dtype | None = None,
             device: torch.device | str | None = None) -> dict[str, Any]:
    """What a reader needs to interpret the numbers: model, batch, dtype, device, threads, versions."""
    first = next(value for value in _values(inputs) if isinstance(value, torch.Tensor))
    device = torch.device(device) if device is not None else first.device
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor()
                                                                                       or platform.machine())
    return {"model": model_name, "batch": int(first.shape[0]), "input_shape": list(first.shape),
            "dtype": str(dtype or first.dtype).removeprefix("torch."), "device": str(device),
            "device_name": device_name, "threads": torch.get_num_threads(), "torch": torch.__version__,
            "mame": mame.__version__, "python": platform.python_version()}


def _mib(value: int | None) -> str:
    return "n/a" if value is None else f"{value / 2**20:,.1f}"


def results_table(results: Sequence[VariantResult], title: str | None = None) -> Table:
    """A rich table: one row per variant, the speed-up next to the FLOP ratio it should be compared with (and next
    to the merge-free bound when it was measured)."""
    with_bound = any(result.bound is not None for result in results)
    table = Table(title=title)
    table.add_column("variant")
    headers = ["tokens out", "GFLOPs", "FLOP ratio", "speed-up (min–max)", "efficiency"]
    headers += ["merge-free bound", "of bound"] if with_bound else []
    for header in headers + ["peak MiB"]:
        table.add_column(header, justify="right")
    for result in results:
        row = [result.name, f"{result.final_tokens:.1f}", f"{result.flops / 1e9:.2f}", f"{result.flop_ratio:.2f}x",
               str(result.speedup), f"{result.efficiency:.0%}"]
        if with_bound:
            row += ["–", "–"] if result.bound is None else [f"{result.bound.ratio:.2f}x", f"{result.of_bound:.0%}"]
        table.add_row(*row, _mib(result.peak_memory))
    return table


def results_to_json(results: Sequence[VariantResult], meta: Mapping[str, Any]) -> dict[str, Any]:
    """A JSON-ready dict ``{"meta": ..., "results": [...]}`` with every field of every result."""
    return {"meta": dict(meta), "results": [asdict(result) for result in results]}
