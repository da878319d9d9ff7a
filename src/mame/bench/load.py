"""System load: timings taken while other processes keep the CPU busy are not worth reading.

With OpenMP, every parallel region waits for its slowest thread; when another process holds one of the cores, a
2-thread run stalls in every region, and small operations (a merge's many few-microsecond steps, attention on short
sequences) take up to ten times as long while large matrix products barely notice. The ratios then say more about the
other process than about the method. Benchmarks therefore print the 1-minute load average with their metadata and
warn when it is above `LOAD_PER_THREAD` times the threads they use.
"""

from __future__ import annotations

import os

from rich.console import Console

LOAD_PER_THREAD = 0.5


def load_average() -> float | None:
    """The 1-minute system load average (``os.getloadavg``), or None where the system does not report one."""
    try:
        return float(os.getloadavg()[0])
    except (AttributeError, OSError):  # Windows has no getloadavg; OSError when it cannot be read
        return None


def load_warning(load: float | None, threads: int) -> str | None:
    """The warning to show when ``load`` is above `LOAD_PER_THREAD` × ``threads``, else None (also when unknown)."""
    limit = LOAD_PER_THREAD * threads
    if load is None or load <= limit:
        return None
    return (f"load average {load:.2f} is above {LOAD_PER_THREAD:g} x {threads} threads = {limit:g}: another process "
            "is using the CPU, and OpenMP waits can make small operations up to ten times slower. Timings taken now "
            "are not comparable; rerun on a quiet machine.")


def report_load(console: Console, threads: int) -> float | None:
    """Print the 1-minute load average on ``console``, and a yellow warning when it is high for ``threads``.

    Call it before timing: once the benchmark runs, its own threads count in the load. Returns the load average
    (None where unavailable), e.g. for `run_meta`.
    """
    load = load_average()
    cpus = os.cpu_count()
    shown = "unavailable" if load is None else f"{load:.2f}"
    console.print(f"load average (1 min): {shown}, {cpus} CPUs, {threads} torch threads")
    warning = load_warning(load, threads)
    if warning is not None:
        console.print(f"[bold yellow]warning:[/] [yellow]{warning}[/]")
    return load
