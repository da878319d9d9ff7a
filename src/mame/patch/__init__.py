"""Patch models in place: ``mame.patch.timm(model, tau=0.8, layers=8)``; undo with ``mame.unpatch(model)``."""

from mame.patch.base import unpatch
from mame.patch.timm import patch_timm

timm = patch_timm  # the public spelling: mame.patch.timm(model, ...)

__all__ = ["timm", "patch_timm", "unpatch"]
