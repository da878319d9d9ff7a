"""Patch models in place: ``mame.patch.timm(model, tau=0.8, layers=8)`` (timm ViTs), ``mame.patch.hf(model, ...)``
(transformers encoders, ``pip install 'mame[hf]'``), ``mame.patch.open_clip(model, ...)`` (open_clip image towers,
``pip install 'mame[clip]'``); undo with ``mame.unpatch(model)``."""

from mame.patch.base import unpatch
from mame.patch.hf import patch_hf
from mame.patch.open_clip import patch_open_clip  # imports open_clip itself only when called
from mame.patch.timm import patch_timm

timm = patch_timm  # the public spelling: mame.patch.timm(model, ...)
hf = patch_hf
open_clip = patch_open_clip

__all__ = ["hf", "open_clip", "timm", "patch_hf", "patch_open_clip", "patch_timm", "unpatch"]
