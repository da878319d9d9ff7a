"""Peak memory of one call: what the call itself allocates and holds at its peak (activations, workspaces).

CUDA reads the caching allocator's peak counter; CPU sums the allocation and free events that ``torch.profiler``
records, in time order.
"""

from __future__ import annotations

import contextlib
import functools
import os
import sys
from typing import Any, Callable, Iterator

import torch


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
