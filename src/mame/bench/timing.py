"""Speed: the ratio of a baseline's time to a method's, from interleaved pairs timed in one process.

Pair ``k`` runs baseline then method when ``k`` is even and method then baseline when it is odd, after warm-up; the
reported ratio is the median of the per-pair ratios, with their range. Timings taken while another process loads the
CPU are not worth reading: see `mame.bench.load`.
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch


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
