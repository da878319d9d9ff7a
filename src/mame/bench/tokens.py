"""Tokens after every block: the one place where mame counts them.

A model patched by mame (MaMe or ToMe) reports its own counts (per-sample merging pads a ragged batch, so the tensor
shape would over-count; the mean over the batch is reported); an unmodified model with a ``blocks`` list is counted
from the length of every block's output. `tokens_per_block` reads one forward, `BlockTokens` every forward while it
is open (feature extraction over many batches), `OneAtATime` each sample of single-image serving.
"""

from __future__ import annotations

import functools
import math
import statistics
from typing import Any

import torch
from torch import nn

from mame.bench._inputs import Inputs, call, samples
from mame.blocks import MergeRuntime


def merge_runtime(model: Any) -> MergeRuntime | None:
    """The `MergeRuntime` of a model patched by mame, None for any other model."""
    runtime = getattr(model, "mame", None)
    return runtime if isinstance(runtime, MergeRuntime) else None


class BlockTokens:
    """Reads the tokens after every block of each forward of ``model`` while open (use it as a context manager).

    A patched model's counts come from its runtime (nothing is hooked). An unmodified model's come from forward
    hooks on its ``blocks``, removed by `close`: open it around the forwards to count, not around timed ones.
    A model that is neither (no ``blocks``) counts nothing: `last` is empty.
    """

    def __init__(self, model: nn.Module) -> None:
        self.runtime = merge_runtime(model)
        blocks = getattr(model, "blocks", None) if self.runtime is None else None
        self._lengths: list[float] = [math.nan] * len(blocks) if blocks is not None else []
        self._hooks = [block.register_forward_hook(functools.partial(self._record, index))
                       for index, block in enumerate(blocks or ())]

    def _record(self, index: int, _module: nn.Module, _args: Any, out: torch.Tensor) -> None:
        self._lengths[index] = float(out.shape[1])

    @property
    def countable(self) -> bool:
        """Whether the model is patched by mame or has a ``blocks`` list."""
        return self.runtime is not None or bool(self._lengths)

    @property
    def last(self) -> list[float]:
        """Tokens after every block of the last forward (empty before the first, or when not `countable`)."""
        if self.runtime is not None:
            return [float(count) for count in self.runtime.last_token_counts]
        return [] if any(math.isnan(length) for length in self._lengths) else list(self._lengths)

    def close(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks = []

    def __enter__(self) -> BlockTokens:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()


def tokens_per_block(model: nn.Module, inputs: Inputs | None = None) -> list[float]:
    """Tokens after every block: of the last forward for a model patched by mame (MaMe or ToMe; mean over the batch
    when samples differ), the full count for an unmodified model.

    Args:
        model: a patched model, or an unmodified one with a ``blocks`` list (timm ViT).
        inputs: when given, one forward is run on them first (needed for a patched model that has not run yet; for
            an unmodified model the count is then read from the blocks' outputs instead of the patch grid).
    """
    with BlockTokens(model) as counter:
        if not counter.countable:
            raise ValueError(f"{type(model).__name__} is neither patched by mame nor has a `blocks` list to count")
        if inputs is not None:
            with torch.inference_mode():
                call(model, inputs)
        elif counter.runtime is None:
            grid = getattr(getattr(model, "patch_embed", None), "num_patches", None)
            if grid is None:
                raise ValueError(f"cannot tell the token count of {type(model).__name__} without inputs")
            return [float(grid + model.num_prefix_tokens)] * len(model.blocks)
        counts = counter.last
    if not counts:
        raise ValueError("the patched model has not run a forward yet: pass inputs")
    return counts


class OneAtATime:
    """Calls ``model`` on each sample of a batch in turn (single-image serving), keeping every sample's token counts.

    Any function here that takes a model and inputs (`count_flops`, `paired_speedup` callables, `compare` with
    ``one_at_a_time=True``) can be given this wrapper instead of the model. Counts are kept for a patched model
    only, which reports them at no cost; an unmodified model is not hooked, so its timed calls stay untouched.
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.counts: list[list[float]] = []

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """The model on each sample of the batch (a tensor, positional or keyword inputs; see `samples`): the
        outputs concatenated when they are tensors, else their list."""
        self.counts, outputs = [], []
        counter = BlockTokens(self.model) if merge_runtime(self.model) is not None else None
        for sample in samples(kwargs if kwargs else (args[0] if len(args) == 1 else args)):
            outputs.append(call(self.model, sample))
            if counter is not None:
                self.counts.append(counter.last)
        return torch.cat(outputs) if all(isinstance(out, torch.Tensor) for out in outputs) else outputs

    @property
    def mean_token_counts(self) -> list[float]:
        """Tokens after every block, averaged over the samples of the last call (empty for an unpatched model)."""
        return [statistics.fmean(column) for column in zip(*self.counts)]
