"""Register mame's models (Iwin, Swin and Iwin with MaMe downsampling; `mame.iwin`) in timm's model registry
without making ``import mame`` import timm (1-2 s).

If timm is already imported, the models are registered at once; otherwise a one-shot import hook registers them
right after ``timm`` itself has been imported, wherever that happens, so ``import mame; import timm;
timm.create_model("iwin_tiny_patch4_window7_224")`` works as for any timm model. Importing `mame.iwin` directly
registers them too.
"""

from __future__ import annotations

import importlib
import importlib.abc
import sys
import threading
from types import ModuleType

_LOCK = threading.Lock()


def _register() -> None:
    importlib.import_module("mame.iwin")  # registering is a side effect of the import


class _RegisterAfterTimm(importlib.abc.MetaPathFinder):
    """Finds nothing itself: when ``timm`` is about to be imported, wraps its loader so that `_register` runs once
    the package has finished executing, then leaves ``sys.meta_path``."""

    def find_spec(self, fullname: str, path=None, target: ModuleType | None = None):
        if fullname != "timm":
            return None
        _remove_hook()
        spec = None
        for finder in list(sys.meta_path):  # the finders that would have found it, in their order
            find = getattr(finder, "find_spec", None)
            spec = find(fullname, path, target) if find is not None else None
            if spec is not None:
                break
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        loader = spec.loader
        original_exec = loader.exec_module

        def exec_then_register(module: ModuleType) -> None:
            original_exec(module)
            _register()

        loader.exec_module = exec_then_register  # type: ignore[method-assign]
        return spec


def _remove_hook() -> None:
    with _LOCK:
        sys.meta_path[:] = [finder for finder in sys.meta_path if not isinstance(finder, _RegisterAfterTimm)]


def install() -> None:
    """Register now if timm is imported, else once it is."""
    if "timm" in sys.modules:
        _register()
        return
    with _LOCK:
        if not any(isinstance(finder, _RegisterAfterTimm) for finder in sys.meta_path):
            sys.meta_path.insert(0, _RegisterAfterTimm())
