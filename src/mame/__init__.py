"""mame: MaMe (matrix-based token merging) for faster transformers, with ToMe side by side.

    >>> import mame
    >>> y, plan = mame.merge(x, tau=0.8, num_special=1)   # (B, L, d) -> (B, L', d)
    >>> mame.patch.timm(model, tau=0.8, layers=8)          # in place
    >>> mame.unpatch(model)
"""

from mame import patch
from mame.core import FusionPlan, fusion_weights, merge, partition_indices
from mame.patch import unpatch
from mame import _timm_registry

_timm_registry.install()  # Iwin and MaMe-downsampling models in timm's registry, once timm is imported

__version__ = "0.1.0"
__all__ = ["FusionPlan", "fusion_weights", "merge", "partition_indices", "patch", "unpatch", "__version__"]
