"""The one patched transformer-block forward shared by every integration, and the per-forward token state.

Eqs 11-13 of the paper: ``x' = x + MSA(LN(x))``, ``x'' = MaMe(x')``, ``x = x'' + MLP(LN(x''))``, with LayerScale
and drop-path kept wherever the family has them. An integration only *describes* its block with a `BlockLayout`
(where the norms, attention, MLP and LayerScale are); it never re-writes the forward, so an upstream change is a
one-line change in a description, not a drifting copy of the block (what went wrong for ToMe and OpenToMe).

Per-forward state (`TokenState`: token sizes, padding mask, plans) is created at the start of every forward by the
model wrapper and handed to the blocks through the shared `MergeRuntime`; results are written once at the end.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Protocol

import torch
from torch import nn

from mame.core import FusionPlan, merge


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


def _call_timm_attention(attn: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return attn(x, attn_mask=bias)


@dataclass(frozen=True)
class BlockLayout:
    """Where a pre-norm transformer block keeps its parts (attribute names; ``None`` = not present = identity).

    ``call_attention(attn_module, x, bias)`` runs the attention with an additive float bias of shape (B, 1, 1, L)
    (key padding and proportional attention) or ``None``; it must keep the fused SDPA path.
    """

    norm1: str = "norm1"
    attn: str = "attn"
    ls1: str | None = "ls1"
    drop_path1: str | None = "drop_path1"
    norm2: str = "norm2"
    mlp: str = "mlp"
    ls2: str | None = "ls2"
    drop_path2: str | None = "drop_path2"
    call_attention: Callable[[nn.Module, torch.Tensor, torch.Tensor | None], torch.Tensor] = _call_timm_attention

    def part(self, block: nn.Module, name: str | None) -> Callable[[torch.Tensor], torch.Tensor]:
        return _identity if name is None else getattr(block, name, _identity)


@dataclass
class TokenState:
    """What one forward pass knows about its tokens, created fresh at the start of every forward.

    Attributes:
        num_special: leading tokens that never merge.
        sizes: (B, L) float, original patches each token stands for, or None while every size is 1.
        mask: (B, L) bool, True = real token, or None while no sample is padded.
        plans: one `FusionPlan` per merge (kept when ``keep_plans``), for unmerging and source maps.
        counts: real tokens per sample after every block, as tensors until the forward ends.
    """

    num_special: int
    sizes: torch.Tensor | None = None
    mask: torch.Tensor | None = None
    keep_plans: bool = True
    plans: list = field(default_factory=list)
    counts: list = field(default_factory=list)
    _bias_key: tuple | None = field(default=None, repr=False)
    _bias: torch.Tensor | None = field(default=None, repr=False)

    def attention_bias(self, x: torch.Tensor, proportional: bool) -> torch.Tensor | None:
        """Additive (B, 1, 1, L) bias: -inf on padding, plus log(size) for proportional attention (ToMe's).

        Made once per merge and reused by the blocks after it until sizes or mask change."""
        if self.mask is None and (not proportional or self.sizes is None):
            return None
        key = (self.sizes, self.mask, proportional, x.dtype)
        if self._bias_key is not None and all(a is b for a, b in zip(self._bias_key, key)):
            return self._bias
        if proportional and self.sizes is not None:
            bias = self.sizes.log()  # size 0 (padding) gives -inf
        else:
            bias = torch.zeros(self.mask.shape, device=x.device).masked_fill(~self.mask, float("-inf"))
        self._bias_key, self._bias = key, bias.to(x.dtype)[:, None, None, :]
        return self._bias

    def ones_sizes(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ones(x.shape[:2], device=x.device, dtype=torch.float32) if self.sizes is None else self.sizes

    def record(self, x: torch.Tensor) -> None:
        self.counts.append(x.shape[1] if self.mask is None else self.mask.sum(dim=1))


class Merger(Protocol):
    """A token-reduction step placed between attention and MLP (MaMe here, ToMe in `mame.baselines.tome`)."""

    needs_keys: bool

    def __call__(self, x: torch.Tensor, state: TokenState, keys: torch.Tensor | None) -> torch.Tensor: ...


@dataclass(frozen=True)
class MameMerge:
    """The MaMe step of one block (eq 12), with its settings checked once at patch time."""

    tau: float
    partition: str = "alternating"
    prune: bool = True
    batch_rule: str = "any"
    causal: bool | str = False
    dst_ratio: float = 0.5
    seed: int = 0
    size_weighted: bool = False
    eps: float = 1e-6
    needs_keys = False

    def __call__(self, x: torch.Tensor, state: TokenState, keys: torch.Tensor | None) -> torch.Tensor:
        y, plan = merge(
            x, self.tau, state.num_special, self.partition, self.prune, self.batch_rule, self.causal, self.eps,
            dst_ratio=self.dst_ratio, seed=self.seed, sizes=state.sizes, mask=state.mask,
            size_weighted=self.size_weighted, check=False)
        # Samples of equal length need no padding mask: attention then runs without a bias, the MLP unpacked.
        state.sizes = plan.sizes
        state.mask = None if plan.mask is None or bool(plan.mask.all()) else plan.mask
        if state.keep_plans:
            state.plans.append(plan)
        return y


@dataclass
class MergeRuntime:
    """Lives at ``model.mame``: the frozen settings and the state of the current (or last) forward.

    The first block of the model starts a fresh `TokenState`, so ``forward``, ``forward_features``,
    ``forward_intermediates`` and direct calls of the blocks all begin clean; nothing is popped from shared lists.
    """

    settings: object
    layers: tuple[int, ...]
    num_special: int
    packed_mlp: bool = True
    state: TokenState | None = None
    undo: list[Callable[[], None]] = field(default_factory=list, repr=False)

    def __getstate__(self) -> dict:
        # Copies and pickles of a patched model start clean: the last forward's tensors belong to that forward.
        return {**self.__dict__, "state": None}

    def begin(self, keep_plans: bool) -> TokenState:
        self.state = TokenState(num_special=self.num_special, keep_plans=keep_plans)
        return self.state

    @property
    def last_token_counts(self) -> list[float]:
        """Tokens after every block of the last forward (mean over the batch for per-sample merging)."""
        if self.state is None:
            return []
        return [c if isinstance(c, int) else float(c.float().mean()) for c in self.state.counts]

    @property
    def last_plans(self) -> list[FusionPlan]:
        return [] if self.state is None else list(self.state.plans)

    def unmerge(self, features: torch.Tensor) -> torch.Tensor:
        """Map per-token outputs of the last forward (B, L', c) back to the full token grid (B, L, c)."""
        state = self.state
        if state is None:
            raise RuntimeError("run a forward pass before unmerging")
        if not state.keep_plans:
            raise RuntimeError("the last forward ran in training mode and kept no fusion plans; call model.eval()")
        for plan in reversed(state.plans):
            features = plan.unmerge(features)
        return features

    @property
    def source_map(self) -> torch.Tensor | None:
        """(B, L) for each original token, the index of the token that holds it after the last forward
        (-1 for discarded tokens), or None when nothing was merged or plans were not kept."""
        plans = self.last_plans
        if not plans:
            return None
        result = plans[0].source_map
        for plan in plans[1:]:
            result = torch.where(result >= 0, plan.source_map.gather(1, result.clamp_min(0)), -1)
        return result


def block_forward(
    block: nn.Module,
    x: torch.Tensor,
    layout: BlockLayout,
    runtime: MergeRuntime,
    merger: Merger | None,
    proportional_attention: bool,
) -> torch.Tensor:
    """Eqs 11-13 with LayerScale and drop-path: attention branch, merge, MLP branch."""
    state = runtime.state
    if getattr(block, "_mame_index", None) == 0 or state is None:
        state = runtime.begin(keep_plans=not block.training)
    part = layout.part
    bias = state.attention_bias(x, proportional_attention)
    x = x + part(block, layout.drop_path1)(part(block, layout.ls1)(
        layout.call_attention(getattr(block, layout.attn), part(block, layout.norm1)(x), bias)))
    if merger is not None:
        x = merger(x, state, block.__dict__.pop("_mame_keys", None))  # popped: no stale keys kept after a forward

    def mlp_branch(t: torch.Tensor) -> torch.Tensor:
        return part(block, layout.drop_path2)(part(block, layout.ls2)(getattr(block, layout.mlp)(
            part(block, layout.norm2)(t))))

    mask = state.mask
    if mask is not None and runtime.packed_mlp and not block.training:
        # Ragged batch: run the MLP (two thirds of a block's FLOPs) on the real tokens only.
        real = x[mask]
        x = x.masked_scatter(mask.unsqueeze(-1), real + mlp_branch(real.unsqueeze(0)).squeeze(0))
    else:
        x = x + mlp_branch(x)
    state.record(x)
    return x
