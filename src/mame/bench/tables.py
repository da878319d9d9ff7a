"""What a comparison prints and saves: the rich table, the JSON report and the run's metadata (load included)."""

from __future__ import annotations

import platform
from dataclasses import asdict
from typing import Any, Mapping, Sequence

import torch
from rich.table import Table

import mame
from mame.bench._inputs import Inputs, first_tensor
from mame.bench.compare import VariantResult
from mame.bench.load import load_average


def run_meta(model_name: str, inputs: Inputs, *, dtype: torch.dtype | None = None,
             device: torch.device | str | None = None, load: float | None = None) -> dict[str, Any]:
    """What a reader needs to interpret the numbers: model, batch, dtype, device, threads, versions, and the 1-minute
    load average (``load_average_1min``; None where the system does not report it).

    Args:
        load: the load average read before timing began (`report_load` returns it); None reads it now, when the
            benchmark's own threads already count in it.
    """
    first = first_tensor(inputs)
    device = torch.device(device) if device is not None else first.device
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor()
                                                                                       or platform.machine())
    return {"model": model_name, "batch": int(first.shape[0]), "input_shape": list(first.shape),
            "dtype": str(dtype or first.dtype).removeprefix("torch."), "device": str(device),
            "device_name": device_name, "threads": torch.get_num_threads(),
            "load_average_1min": load_average() if load is None else load, "torch": torch.__version__,
            "mame": mame.__version__, "python": platform.python_version()}


def _mib(value: int | None) -> str:
    return "n/a" if value is None else f"{value / 2**20:,.1f}"


def results_table(results: Sequence[VariantResult], title: str | None = None) -> Table:
    """A rich table: one row per variant, the speed-up next to the FLOP ratio it should be compared with (and next
    to the merge-free bound when it was measured)."""
    with_bound = any(result.bound is not None for result in results)
    with_real = any(result.real_token_flop_ratio is not None for result in results)
    table = Table(title=title)
    table.add_column("variant")
    headers = ["tokens out", "GFLOPs", "FLOP ratio", "speed-up (min–max)", "efficiency"]
    headers += ["real-token FLOP ratio", "of it"] if with_real else []
    headers += ["merge-free bound", "of bound"] if with_bound else []
    for header in headers + ["peak MiB"]:
        table.add_column(header, justify="right")
    for result in results:
        row = [result.name, f"{result.final_tokens:.1f}", f"{result.flops / 1e9:.2f}", f"{result.flop_ratio:.2f}x",
               str(result.speedup), f"{result.efficiency:.0%}"]
        if with_real:
            real = result.real_token_flop_ratio
            row += ["–", "–"] if real is None else [f"{real:.2f}x", f"{result.speedup.ratio / real:.0%}"]
        if with_bound:
            row += ["–", "–"] if result.bound is None else [f"{result.bound.ratio:.2f}x", f"{result.of_bound:.0%}"]
        table.add_row(*row, _mib(result.peak_memory))
    return table


def results_to_json(results: Sequence[VariantResult], meta: Mapping[str, Any]) -> dict[str, Any]:
    """A JSON-ready dict ``{"meta": ..., "results": [...]}`` with every field of every result."""
    return {"meta": dict(meta), "results": [asdict(result) for result in results]}
