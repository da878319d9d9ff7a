"""Family-independent patching: swap classes for dynamic subclasses that remember their parent (as tomesd does).

An integration calls `install` with the blocks it found, their `BlockLayout`, one `Merger` per merging block and an
optional model mixin (pooling); `unpatch` restores every original class and removes every added attribute, so the
unpatched model is bit-identical to the original.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from torch import nn

from mame.blocks import BlockLayout, Merger, MergeRuntime, block_forward

_SUBCLASSES: dict[tuple[type, type], type] = {}


def patched_class(mixin: type, parent: type) -> type:
    """The subclass of ``parent`` with ``mixin`` in front, made once per pair."""
    key = (mixin, parent)
    if key not in _SUBCLASSES:
        _SUBCLASSES[key] = type(f"Mame{parent.__name__}", (mixin, parent), {})
    return _SUBCLASSES[key]


def _new_patched(mixin: type, parent: type) -> nn.Module:
    cls = patched_class(mixin, parent)
    return cls.__new__(cls)


class Picklable:
    """Base of the mixins: a patched module pickles (``torch.save``, ``copy.deepcopy``) as "mixin + parent class",
    both importable, since the subclass made at patch time has no importable name of its own."""

    def __reduce_ex__(self, protocol):
        mixin, parent = type(self).__bases__
        return _new_patched, (mixin, parent), self.__getstate__()


class ScopedForward(Picklable):
    """Mixin for the patched model: every model-level forward runs with per-forward state of its own."""

    def forward(self, *args, **kwargs):
        with self.mame.scope(self.training):
            return super().forward(*args, **kwargs)


# Arguments a block may be handed and ignore: transformers passes ``output_hidden_states`` down to its layers, but
# records hidden states by hooks on the layers' outputs, whatever the layers do with the flag.
_RECORDING_FLAGS = frozenset({"output_hidden_states"})


class PatchedBlock(Picklable):
    """Mixin put in front of a block's own class; the forward is the shared `block_forward`."""

    def forward(self, x, *args, **kwargs):
        # Encoder loops pass their layer's own arguments (transformers: the attention mask, positionally, None for
        # images); only one that would have to act on the merged sequence is refused.
        given = [f"argument {i + 2}" for i, value in enumerate(args) if value is not None and value is not False]
        given += [name for name, value in kwargs.items()
                  if value is not None and value is not False and name not in _RECORDING_FLAGS]
        if given:
            raise ValueError(
                f"a mame-patched {type(self).__bases__[-1].__name__} cannot honour {', '.join(given)}: merging changes "
                "the sequence, so an outside attention mask, causal flag or positions cannot stay aligned, and its "
                "attention returns no weights (padding masks go to the model's forward; or call mame.unpatch first)")
        return block_forward(self, x, self._mame_layout, self._mame_runtime, self._mame_merger,
                             self._mame_proportional)


# Undo steps are small objects, not closures: a deep copy of a patched model then undoes its own modules.
@dataclass
class _RestoreClass:
    module: nn.Module
    parent: type

    def __call__(self) -> None:
        self.module.__class__ = self.parent


@dataclass
class _RemoveAttributes:
    module: nn.Module
    names: tuple[str, ...]

    def __call__(self) -> None:
        for name in self.names:
            if name in self.module.__dict__:
                object.__delattr__(self.module, name)


def swap_class(module: nn.Module, mixin: type, runtime: MergeRuntime) -> None:
    """Give ``module`` a subclass of its own class with ``mixin`` in front, undone by ``runtime.undo``."""
    parent = type(module)
    module.__class__ = patched_class(mixin, parent)
    runtime.undo.append(_RestoreClass(module, parent))


def set_attributes(module: nn.Module, runtime: MergeRuntime, **values) -> None:
    """Set plain (non-module) attributes on ``module`` and register their removal."""
    for name, value in values.items():
        object.__setattr__(module, name, value)
    runtime.undo.append(_RemoveAttributes(module, tuple(values)))


def install(
    model: nn.Module,
    blocks: Sequence[nn.Module],
    layout: BlockLayout,
    mergers: dict[int, Merger],
    runtime: MergeRuntime,
    proportional_attention: bool = False,
    model_mixin: type[ScopedForward] = ScopedForward,
    scoped: nn.Module | None = None,
) -> nn.Module:
    """Patch ``blocks`` in place; every block is patched so padding and sizes carry through the unmerged ones too.

    ``scoped`` is the module whose ``forward`` opens each forward's state (default ``model``): a tower inside a
    larger model when the model reaches it through other methods (CLIP's ``get_image_features``)."""
    unpatch(model)
    for index, block in enumerate(blocks):
        merger = mergers.get(index)
        set_attributes(block, runtime, _mame_layout=layout, _mame_runtime=runtime, _mame_merger=merger,
                       _mame_proportional=proportional_attention)
        swap_class(block, PatchedBlock, runtime)
    scoped = model if scoped is None else scoped
    swap_class(scoped, model_mixin, runtime)
    set_attributes(model, runtime, mame=runtime)
    if scoped is not model:
        set_attributes(scoped, runtime, mame=runtime)
    return model


def unpatch(model: nn.Module) -> nn.Module:
    """Restore the original classes and attributes of a model patched by `mame` (no-op if it is not patched)."""
    runtime = model.__dict__.get("mame")
    if isinstance(runtime, MergeRuntime):
        for undo in reversed(runtime.undo):
            undo()
        runtime.undo.clear()
    return model
