"""Token-reduction methods by name, for `mame sweep` and `mame viz`: one `Method` entry per method.

A method patches a model in place from a plain settings dict (what a sweep point records as JSON), so a new
baseline joins every sweep, plot and merge map with one entry in `METHODS`:

    >>> model = METHODS["tome"].apply(model, {"r": 8})
    >>> METHODS["mame"].apply(model, {"tau": 0.8, "blocks": 8})
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping

from torch import nn

import mame.patch
from mame.baselines import evit, pitome, tome


def _mame(model: nn.Module, tau: float, blocks: int, partition: str = "alternating", seed: int = 0,
          batch_rule: str = "per_sample") -> nn.Module:
    """The paper's MaMe (the tokens as metric, pruning) at ``tau`` on the first ``blocks`` blocks. A random
    partition needs the paper's batch rule (``"any"``) as soon as more than one block merges (`mame.patch.timm`
    refuses it otherwise)."""
    return mame.patch.timm(model, tau=tau, layers=blocks, partition=partition, seed=seed, batch_rule=batch_rule,
                           metric="x", prune=True)


def _mame_flops(model: nn.Module, flops: float) -> nn.Module:
    """MaMe as the library patches by default: a FLOP budget, every image merging at its own threshold."""
    return mame.patch.timm(model, flops=float(flops))


def _tome(model: nn.Module, r: int) -> nn.Module:
    return tome.patch_timm(model, r=int(r))


def _evit(model: nn.Module, keep_rate: float) -> nn.Module:
    """EViT at its paper's places (blocks 4, 7 and 10 of 12), moved to the same relative depth in other models."""
    depth = len(model.blocks)
    layers = sorted({min(depth - 1, round(index * depth / 12)) for index in evit.EVIT_LAYERS})
    return evit.patch_timm(model, keep_rate=float(keep_rate), layers=layers)


def _pitome(model: nn.Module, r: int) -> nn.Module:
    return pitome.patch_timm(model, r=int(r))


def _unchanged(model: nn.Module) -> nn.Module:
    return model


@dataclass(frozen=True)
class Method:
    """How to patch a model for one setting of a method.

    Attributes:
        name: registry key, also the ``method`` field of sweep points (``"mame"``, ``"tome"``, ...).
        label: shown in legends and titles.
        param: the setting a baseline sweep varies and a merge map matches (``"r"`` for ToMe); ``"tau"`` for MaMe.
        grid: default values of ``param`` for a sweep, from the lightest reduction to the strongest.
        patch: ``patch(model, **settings)`` patches ``model`` in place and returns it.
    """

    name: str
    label: str
    param: str
    grid: tuple[float, ...]
    patch: Callable[..., nn.Module]

    def apply(self, model: nn.Module, settings: Mapping[str, Any]) -> nn.Module:
        """Patch ``model`` in place for ``settings`` and return it."""
        return self.patch(model, **settings)

    def describe(self, settings: Mapping[str, Any]) -> str:
        """A short label for one setting, e.g. ``"ToMe r=8"`` or ``"MaMe τ=0.8, 8 blocks"``."""
        if self.name == "mame":
            extra = "" if settings.get("partition", "alternating") == "alternating" else (
                f", {settings['partition']} seed {settings.get('seed', 0)}")
            return f"{self.label} τ={settings['tau']:g}, {settings['blocks']} blocks{extra}"
        if not settings:
            return self.label
        return f"{self.label} " + ", ".join(f"{key}={value:g}" if isinstance(value, float) else f"{key}={value}"
                                            for key, value in settings.items())


METHODS: dict[str, Method] = {
    "none": Method("none", "unmodified", "", (), _unchanged),
    "mame": Method("mame", "MaMe", "tau", (0.95, 0.9, 0.85, 0.8, 0.75, 0.7), _mame),
    "mame_flops": Method("mame_flops", "MaMe (FLOP budget)", "flops", (1.5, 2.0, 3.0, 4.0), _mame_flops),
    "tome": Method("tome", "ToMe", "r", (2, 4, 8, 12, 16, 20), _tome),
    "evit": Method("evit", "EViT", "keep_rate", (0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3), _evit),
    "pitome": Method("pitome", "PiToMe", "r", (2, 4, 8, 12, 16, 20), _pitome),
}


def method(name: str) -> Method:
    """The registered method ``name``; a ValueError lists the known ones."""
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}: choose among {', '.join(METHODS)}")
    return METHODS[name]
