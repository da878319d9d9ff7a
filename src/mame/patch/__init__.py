"""Patch models in place: ``mame.patch.timm(model, tau=0.8, layers=8)`` (timm ViTs), ``mame.patch.hf(model, ...)``
(transformers encoders, ``pip install 'mame[hf]'``), ``mame.patch.open_clip(model, ...)`` (open_clip image towers,
``pip install 'mame[clip]'``), or ``mame.patch.auto(model, ...)`` for whichever of them fits the model; undo with
``mame.unpatch(model)``."""

from torch import nn

from mame.patch.base import unpatch
from mame.patch.hf import patch_hf
from mame.patch.open_clip import patch_open_clip  # imports open_clip itself only when called
from mame.patch.timm import patch_timm



def patch_auto(model: nn.Module, **options) -> nn.Module:
    """`patch_timm`, `patch_hf` or `patch_open_clip`, by where ``model`` comes from (its class's module); the same
    options as those."""
    patchers = {"timm": patch_timm, "transformers": patch_hf, "open_clip": patch_open_clip}
    for cls in type(model).__mro__:  # a patched model's own class comes from mame; its parents say where it is from
        source = cls.__module__.split(".")[0]
        if source in patchers:
            return patchers[source](model, **options)
    raise ValueError(f"mame.patch.auto patches timm, transformers and open_clip models, got {type(model).__name__}")


timm = patch_timm  # the public spelling: mame.patch.timm(model, ...)
hf = patch_hf
open_clip = patch_open_clip
auto = patch_auto

__all__ = ["auto", "hf", "open_clip", "timm", "patch_auto", "patch_hf", "patch_open_clip", "patch_timm", "unpatch"]
