"""A fake clock for `mame.bench.timing`: timed ratios that are known exactly, whatever else the machine is doing."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from torch import nn

from mame.bench import timing


class FakeClock:
    """Stands in for ``time.perf_counter``: time passes only when `advance` is called."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def use_fake_clock(monkeypatch: pytest.MonkeyPatch) -> FakeClock:
    """Make `mame.bench.timing` (and what times through it: `mame.bench.compare`, `mame.evaluate`) read a `FakeClock`
    for this test."""
    clock = FakeClock()
    monkeypatch.setattr(timing, "time", SimpleNamespace(perf_counter=clock))
    return clock


def charge_block_tokens(model: nn.Module, clock: FakeClock) -> None:
    """Every forward of a block of ``model`` (and of its deep copies) takes as many fake seconds as it receives
    tokens, and merging costs nothing: a timed speed-up is then the ratio of the tokens the blocks process."""
    for block in model.blocks:
        block.register_forward_pre_hook(lambda _block, args: clock.advance(args[0].shape[1]))
