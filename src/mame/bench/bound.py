"""The merge-free bound: the speed-up a patched model would reach if its merges cost nothing.

`merge_free_copy` records the token counts, sizes and padding that the real merges produce on given inputs and
returns a copy of the model whose merges replay them as a free truncation, so every later block computes on exactly
the tokens of the real run. Its speed-up over the unmodified model is the most any implementation of the same merges
can reach on this machine; the real speed-up divided by it ("of bound") is the share the implementation keeps.

Because "of bound" divides by it, the bound is timed more carefully than a plain speed-up: `bound_timing` gives it
at least `BOUND_PAIRS` interleaved pairs and samples of at least `BOUND_MIN_TIME` seconds.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

# One photo takes tens of milliseconds on 2 CPU threads, and with 3-7 pairs of single calls the bound moved by a few
# percent between runs: as much as the merge's own cost that it is meant to reveal. Nine pairs keep the median away
# from up to four disturbed pairs, and samples of at least 0.2 s (a call repeated until then) average out timer
# resolution, scheduler ticks and OpenMP wake-ups, the noise that dominates calls of a few milliseconds.
BOUND_PAIRS = 9
BOUND_MIN_TIME = 0.2


def bound_timing(pairs: int, min_time: float) -> dict[str, float | int]:
    """`paired_speedup` settings for timing a merge-free copy: the caller's, raised to at least `BOUND_PAIRS` pairs
    and samples of `BOUND_MIN_TIME` seconds (see the module docstring for why)."""
    return {"pairs": max(pairs, BOUND_PAIRS), "min_time": max(min_time, BOUND_MIN_TIME)}


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


def merging_blocks(model: nn.Module) -> list[nn.Module]:
    """The blocks of ``model`` that merge tokens (patched by `mame.patch` or `mame.baselines.tome`)."""
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
    blocks = merging_blocks(patched)
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
    for block, record in zip(merging_blocks(replay), records):
        object.__setattr__(block, "_mame_merger", _ReplayMerge(record))
    return replay
