"""Patch models in place: ``mame.patch.timm(model, tau=0.8, layers=8)`` (timm ViTs), ``mame.patch.hf(model, ...)``
(transformers encoders, ``pip install 'mame[hf]'``); undo with ``mame.unpatch(model)``."""

from mame.patch.base import unpatch
from mame.patch.hf import patch_hf
from mame.patch.timm import patch_timm

timm = patch_timm  # the public spelling: mame.patch.timm(model, ...)
hf = patch_hf

__all__ = ["hf", "timm", "patch_hf", "patch_timm", "unpatch"]
