"""The one patched transformer-block forward shared by every integration, and the per-forward token state.

Eqs 11-13 of the paper: ``x' = x + MSA(LN(x))``, ``x'' = MaMe(x')``, ``x = x'' + MLP(LN(x''))``, with LayerScale
and drop-path kept wherever the family has them. An integration only *describes* its block with a `BlockLayout`
(where the norms, attention, MLP and LayerScale are); it never re-writes the forward, so an upstream change is a
one-line change in a description, not a drifting copy of the block (what went wrong for ToMe and OpenToMe).

Per-forward state (`TokenState`: token sizes, padding mask, plans) belongs to the forward, never to the shared model:
the model wrapper opens `MergeRuntime.scope` around each forward, the blocks find that forward's state through a
context variable (so threads sharing one patched model never meet), and replays by activation checkpointing find the
state each block was handed from the tensor they are replayed on.
"""

from __future__ import annotations

import contextlib
import functools
import json
import operator
import os
import threading
import weakref
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Protocol

import torch
from torch import nn

from mame.attention import AttentionLayout, PaddedTokens, TokenLayout, packed_layout
from mame.core import FusionPlan, merge


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


@dataclass(frozen=True)
class BlockLayout:
    """Where a transformer block keeps its parts, and how its attention module runs in pieces (`AttentionLayout`).

    Parts are attribute paths inside the block (dotted for nested modules, ``"attention.output.dense"``; ``None`` or
    a missing attribute = identity). ``mlp`` may be several paths applied in turn (BERT's ``intermediate`` then
    ``output.dense``). Pre-norm blocks (ViT, ``post_norm=False``) run ``x + drop_path(ls(f(norm(x))))``; post-norm
    blocks (BERT) run ``norm(x + drop_path(ls(f(x))))``. The merge sits between the attention and MLP steps either
    way (eq 12)."""

    attention: AttentionLayout
    norm1: str | None = "norm1"
    attn: str = "attn"
    ls1: str | None = "ls1"
    drop_path1: str | None = "drop_path1"
    norm2: str | None = "norm2"
    mlp: str | tuple[str, ...] = "mlp"
    ls2: str | None = "ls2"
    drop_path2: str | None = "drop_path2"
    post_norm: bool = False

    def part(self, block: nn.Module, name: str | None) -> Callable[[torch.Tensor], torch.Tensor]:
        if name is None:
            return _identity
        try:
            return operator.attrgetter(name)(block)
        except AttributeError:
            return _identity

    def residual(self, block: nn.Module, x: torch.Tensor, branch: torch.Tensor, norm: str | None,
                 ls: str | None, drop_path: str | None) -> torch.Tensor:
        """``x`` plus a branch's output through LayerScale and drop-path, normed after the sum when post-norm."""
        x = x + self.part(block, drop_path)(self.part(block, ls)(branch))
        return self.part(block, norm)(x) if self.post_norm else x

    def branch_input(self, block: nn.Module, x: torch.Tensor, norm: str | None) -> torch.Tensor:
        """What a branch reads: the normed tokens (pre-norm) or the tokens themselves (post-norm)."""
        return x if self.post_norm else self.part(block, norm)(x)

    @property
    def mlp_paths(self) -> tuple[str, ...]:
        """The MLP's paths, applied in turn."""
        return (self.mlp,) if isinstance(self.mlp, str) else self.mlp

    def run_mlp(self, block: nn.Module, h: torch.Tensor) -> torch.Tensor:
        for name in self.mlp_paths:
            h = self.part(block, name)(h)
        return h


@dataclass
class TokenState:
    """What one forward pass knows about its tokens, created fresh at the start of every forward.

    Attributes:
        num_special: leading tokens that never merge.
        sizes: (B, L) float, original patches each token stands for, or None while every size is 1. Detached: no
            gradient flows through sizes (as in ToMe, whose sizes are counts), so a block replayed by activation
            checkpointing, which only sees its tensor input, computes exactly the gradients of the first run.
        mask: (B, L) bool, True = real token, or None while no sample is padded.
        plans: one `FusionPlan` per merge (kept when ``keep_plans``), for unmerging and source maps.
        counts: real tokens per sample after every block, as tensors until the forward ends.
        merges: merges run so far (a merger that keeps no plans, as ToMe, leaves fewer plans than merges).
        sequence: causal language models only: the forward's `mame.causal.SequenceState` (each token's position,
            the KV cache and its record); it then lays out the tokens (`token_layout`), None for encoders.
    """

    num_special: int
    sizes: torch.Tensor | None = None
    mask: torch.Tensor | None = None
    keep_plans: bool = True
    plans: list = field(default_factory=list)
    counts: list = field(default_factory=list)
    merges: int = 0
    sequence: object | None = None
    _layout_key: tuple | None = field(default=None, repr=False)
    _layout: TokenLayout | None = field(default=None, repr=False)

    def token_layout(self, x: torch.Tensor, proportional: bool, heads: int, packed: bool) -> TokenLayout:
        """How the blocks lay out these tokens until the next merge: packed real tokens for a ragged batch in
        inference (``packed``), else the padded batch with an additive (B, 1, 1, L) attention bias (-inf on padding,
        plus log(size) for proportional attention, ToMe's) or none. Made once per merge, reused by the blocks after
        it until sizes or mask change. A causal language model's forward lays out its tokens itself (`sequence`)."""
        if self.sequence is not None:
            return self.sequence.token_layout(self, x, proportional)
        key = (self.sizes, self.mask, proportional, packed, x.dtype)
        if self._layout_key is not None and all(a is b for a, b in zip(self._layout_key, key)):
            return self._layout
        sizes = self.sizes if proportional else None
        if self.mask is not None and packed:
            layout = packed_layout(self.mask, sizes, heads, x.dtype)
        elif self.mask is None and sizes is None:
            layout = PaddedTokens(None)
        else:
            layout = PaddedTokens(self.key_bias(proportional).to(x.dtype)[:, None, None, :])
        self._layout_key, self._layout = key, layout
        return layout

    def key_bias(self, proportional: bool = True) -> torch.Tensor | None:
        """(B, L) float32 additive attention bias on the keys: log(size) when ``proportional`` and sizes are known
        (-inf on padding, whose size is 0), else 0 on real tokens and -inf on padding; None when neither applies."""
        if proportional and self.sizes is not None:
            return self.sizes.log()
        if self.mask is None:
            return None
        return torch.zeros(self.mask.shape, device=self.mask.device).masked_fill(~self.mask, float("-inf"))

    def token_weights(self, x: torch.Tensor) -> torch.Tensor:
        """(B, L) float32: the original tokens each of ``x``'s tokens stands for (0 on padding)."""
        if self.sizes is not None:
            return self.sizes
        return self.ones_sizes(x) if self.mask is None else self.mask.float()

    def ones_sizes(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ones(x.shape[:2], device=x.device, dtype=torch.float32) if self.sizes is None else self.sizes

    def record(self, x: torch.Tensor) -> None:
        self.counts.append(x.shape[1] if self.mask is None else self.mask.sum(dim=1))


class Merger(Protocol):
    """A token-reduction step placed between attention and MLP (MaMe here, ToMe in `mame.baselines.tome`)."""

    needs_keys: bool

    def __call__(self, x: torch.Tensor, state: TokenState, keys: torch.Tensor | None) -> torch.Tensor: ...


METRICS = ("x", "keys", "keys_mean")
THRESHOLDS_FORMAT = "mame-thresholds/1"  # the JSON of `MergeRuntime.save_thresholds`


def _metric(name: str, keys: torch.Tensor | None) -> torch.Tensor | None:
    """The similarity features for ``metric=name`` from per-head keys (B, L, heads, head_dim); None = the tokens."""
    if name == "x":
        return None
    return keys.mean(2) if name == "keys_mean" else keys.flatten(2)


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
    check_finite: bool = False
    metric: str = "x"
    similarity: str = "cosine"  # eq 2, or a kind of the paper's ablation (`mame.core.similarity_matrix`)
    discard_preserved: bool = False  # drop preserved sources: every merge keeps exactly the destinations (2:1)
    share: float | None = None  # a budget instead of tau: each sample merges this share of its mergeable tokens

    @property
    def needs_keys(self) -> bool:
        return self.metric != "x"

    def merge_count(self, x: torch.Tensor, state: TokenState) -> int | torch.Tensor | None:
        """Sources each sample merges under ``share`` (of its real tokens other than the special ones): one int
        when no sample is padded, else (B,) counts; None for the threshold ``tau``. Rounded in double precision, as
        `mame.budget.geometric_counts` rounds when it turns a FLOP budget into this share."""
        if self.share is None:
            return None
        special = state.num_special
        if state.mask is None:
            return int(round((x.shape[1] - special) * self.share))
        return (state.mask[:, special:].sum(1).double() * self.share).round().long()

    def kept_tokens(self, x: torch.Tensor, state: TokenState, keys: torch.Tensor | None,
                    tau: float | None = None) -> torch.Tensor:
        """(B,) real tokens each sample would keep after this merge (at ``tau`` when given), without fusing any
        token: the plan is made on the same similarities, the fused values are left out (`mame.calibrate`)."""
        metric = _metric(self.metric, keys)
        stand_in = x.new_zeros(*x.shape[:2], 1)  # only the plan's lengths are read, not the merged tokens
        return merge(
            stand_in, self.tau if tau is None else tau, state.num_special, self.partition, self.prune,
            self.batch_rule, self.causal, self.eps, dst_ratio=self.dst_ratio, seed=self.seed, sizes=state.sizes,
            mask=state.mask, size_weighted=self.size_weighted, check=False, discard_preserved=self.discard_preserved,
            metric=x if metric is None else metric, merge_count=self.merge_count(x, state),
            similarity=self.similarity)[1].lengths

    def __call__(self, x: torch.Tensor, state: TokenState, keys: torch.Tensor | None) -> torch.Tensor:
        if self.check_finite and not bool(torch.isfinite(x if state.mask is None else x[state.mask]).all()):
            raise ValueError("the tokens reaching a merge contain NaN or Inf (check the input images)")
        y, plan = merge(
            x, self.tau, state.num_special, self.partition, self.prune, self.batch_rule, self.causal, self.eps,
            dst_ratio=self.dst_ratio, seed=self.seed, sizes=state.sizes, mask=state.mask,
            size_weighted=self.size_weighted, check=False, metric=_metric(self.metric, keys),
            discard_preserved=self.discard_preserved, merge_count=self.merge_count(x, state),
            similarity=self.similarity)
        # Samples of equal length need no padding mask: attention then runs without a bias, the MLP unpacked.
        state.sizes = plan.sizes.detach()  # bookkeeping, see `TokenState.sizes`
        state.mask = None if plan.mask is None or bool(plan.mask.all()) else plan.mask
        if state.keep_plans:
            state.plans.append(plan)
        return y


# The forwards running now, per thread (and per asyncio task): runtime id -> its TokenState. A ContextVar, not an
# attribute of the shared runtime, so concurrent forwards through one patched model never see each other's state.
_ACTIVE: ContextVar[dict[int, TokenState]] = ContextVar("mame_active_forwards", default={})


@dataclass(frozen=True)
class _ExitState:
    """Sizes and padding mask of the tokens a block handed on: what the next block needs to start from them."""

    sizes: torch.Tensor | None
    mask: torch.Tensor | None


# Exit state of block outputs that autograd may replay (activation checkpointing re-runs blocks during backward,
# after the forward has ended) or that a direct block call handed on. Keyed by the output's memory and version, which
# the detached copies that reentrant checkpointing makes share with it; an entry is dropped when its tensor dies.
_EXIT_STATES: dict[tuple, _ExitState] = {}


def _in_backward() -> bool:
    """True while autograd runs a backward pass (where activation checkpointing replays blocks). A private torch
    call: where it is missing, replays are simply recorded as the thread's last forward."""
    current_task = getattr(torch._C, "_current_graph_task_id", None)
    return current_task is not None and current_task() != -1


def _tensor_key(runtime: "MergeRuntime", x: torch.Tensor) -> tuple:
    version = -1 if x.is_inference() else x._version
    return (id(runtime), x.data_ptr(), x.device, x.dtype, tuple(x.shape), x.stride(), version)


def _remember_exit(runtime: "MergeRuntime", x: torch.Tensor, state: TokenState) -> None:
    key = _tensor_key(runtime, x)
    if key not in _EXIT_STATES:
        weakref.finalize(x, _EXIT_STATES.pop, key, None)
    _EXIT_STATES[key] = _ExitState(state.sizes, state.mask)


@dataclass
class MergeRuntime:
    """Lives at ``model.mame``: the frozen settings of the patch; per-forward state lives with each forward.

    A model-level forward (``forward``, ``forward_features``, ...) runs inside `scope`, which gives it a fresh
    `TokenState` of its own, visible only to its thread. The results of the last forward (``last_token_counts``,
    ``last_plans``, ``unmerge``, ``source_map``) are kept per thread. A block called outside a model forward starts
    clean, unless it is handed the output of a block of the same model that could be replayed (activation
    checkpointing) or was itself called directly: it then continues from that block's exit state.
    """

    settings: object
    layers: tuple[int, ...]
    num_special: int
    packed: bool = True
    undo: list[Callable[[], None]] = field(default_factory=list, repr=False)
    calibration: dict | None = None  # what `mame.calibrate` fitted these thresholds for (target, images, result)
    _last: threading.local = field(default_factory=threading.local, init=False, repr=False, compare=False)

    def __getstate__(self) -> dict:
        # Copies and pickles of a patched model start clean: the last forward's tensors belong to that forward.
        return {name: value for name, value in self.__dict__.items() if name != "_last"}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state, _last=threading.local())

    def thresholds(self) -> dict:
        """The patch as a JSON-ready dict: ``{"format", "settings", "calibration"}``, where ``settings`` are the
        keyword arguments of the patch function (``tau`` one per patched block, ``layers``, the options) and
        ``calibration`` says what `mame.calibrate` fitted them for (None for a hand-set τ). Re-apply it with
        `mame.calibrate.load_thresholds`."""
        if not isinstance(self.settings, dict) or self.settings.get("method") != "mame":
            raise ValueError("only a MaMe patch has thresholds to save")
        settings = {name: list(value) if isinstance(value, tuple) else value
                    for name, value in self.settings.items() if name != "method"}
        return {"format": THRESHOLDS_FORMAT, "settings": settings, "calibration": self.calibration}

    def save_thresholds(self, path: str | os.PathLike) -> Path:
        """Write `thresholds` to ``path`` as JSON (floats written exactly, so loading merges identically)."""
        path = Path(path)
        path.write_text(json.dumps(self.thresholds(), indent=2) + "\n")
        return path

    @contextlib.contextmanager
    def scope(self, training: bool) -> Iterator[TokenState]:
        """Run one model-level forward with its own `TokenState` (nested calls, e.g. ``forward`` calling
        ``forward_features``, share the outer one); on exit it becomes this thread's last forward."""
        active = _ACTIVE.get()
        if id(self) in active:
            yield active[id(self)]
            return
        state = self._fresh_state(training)
        token = _ACTIVE.set({**active, id(self): state})
        try:
            yield state
        finally:
            _ACTIVE.reset(token)
            self._last.state = state

    def block_state(self, x: torch.Tensor, training: bool) -> tuple[TokenState, bool]:
        """The state a block continues with, and whether it must remember its exit state for a later replay."""
        state = _ACTIVE.get().get(id(self))
        compiling = torch.compiler.is_compiling()
        if state is not None:
            return state, not compiling and (torch.is_grad_enabled() or x.requires_grad)
        # Outside a model forward: a replay during backward, a direct call or a hand-written loop over the blocks.
        handed_on = None if compiling else _EXIT_STATES.get(_tensor_key(self, x))
        state = self._fresh_state(training)
        if handed_on is not None:
            state.sizes, state.mask = handed_on.sizes, handed_on.mask
        if not _in_backward():  # a replay recomputes a past forward; it is not the caller's last forward
            self._last.state = state
        return state, not compiling

    def _fresh_state(self, training: bool) -> TokenState:
        return TokenState(num_special=self.num_special, keep_plans=not training)  # training keeps no plans

    @property
    def active_state(self) -> TokenState | None:
        """The `TokenState` of the model-level forward running now in this thread, None outside one."""
        return _ACTIVE.get().get(id(self))

    @property
    def state(self) -> TokenState | None:
        """The `TokenState` of this thread's running or last forward (None before the first)."""
        active = self.active_state
        return active if active is not None else getattr(self._last, "state", None)

    @property
    def last_token_counts(self) -> list[float]:
        """Tokens after every block of this thread's last forward (mean over the batch for per-sample merging)."""
        state = self.state
        if state is None:
            return []
        return [c if isinstance(c, int) else float(c.float().mean()) for c in state.counts]

    @property
    def last_token_masks(self) -> list[torch.Tensor | None]:
        """For every block of this thread's last forward, the (B, L) mask of real tokens in its padded output (each
        sample's real tokens come first), or None where no sample was padded: the masks of transformers'
        ``hidden_states[1:]``, whose ragged batches are padded to their longest sample."""
        state = self.state
        if state is None:
            return []
        return [None if isinstance(count, int) else
                torch.arange(int(count.max()), device=count.device) < count[:, None] for count in state.counts]

    @property
    def last_plans(self) -> list[FusionPlan]:
        """The `FusionPlan` of every merge of this thread's last forward (empty after a training forward)."""
        state = self.state
        return [] if state is None else list(state.plans)

    def mean_pool(self, features: torch.Tensor) -> torch.Tensor:
        """Each sample's mean over its original tokens, from per-token outputs (B, L', c) of this thread's last (or
        running) forward: a merged token weighs by the tokens it stands for, padding by nothing. Equal to the plain
        mean over the unmerged sequence's real tokens when no merge changed the tokens' values."""
        state = self.state
        if state is None:
            raise RuntimeError("run a forward pass before pooling its tokens")
        weights = state.token_weights(features)
        if tuple(weights.shape) != tuple(features.shape[:2]):
            raise ValueError(f"features must be (B, L', c) with (B, L') = {tuple(weights.shape)} as the forward's "
                             f"merged tokens, got {tuple(features.shape)}")
        weights = (weights / weights.sum(dim=1, keepdim=True)).to(features.dtype)
        return torch.einsum("bl,blc->bc", weights, features)

    def unmerge(self, features: torch.Tensor) -> torch.Tensor:
        """Map per-token outputs of this thread's last forward (B, L', c) back to the full token grid (B, L, c)."""
        state = self.state
        if state is None:
            raise RuntimeError("run a forward pass before unmerging")
        if not state.keep_plans:
            raise RuntimeError("the last forward ran in training mode and kept no fusion plans; call model.eval()")
        if len(state.plans) < state.merges:
            raise RuntimeError("the last forward's merges kept no fusion plans (only MaMe keeps them, not ToMe)")
        if state.plans and tuple(features.shape[:2]) != tuple(state.plans[-1].sizes.shape):
            raise ValueError(f"features must be (B, L', c) with (B, L') = {tuple(state.plans[-1].sizes.shape)} as "
                             f"the last forward's merged tokens, got {tuple(features.shape)}")
        for plan in reversed(state.plans):
            features = plan.unmerge(features)
        return features

    @property
    def source_map(self) -> torch.Tensor | None:
        """(B, L) for each original token, the index of the token that holds it after this thread's last forward
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
    state, remember = runtime.block_state(x, block.training)
    if remember and (state.mask is not None or state.sizes is not None):
        # The entry state too: the first block's input comes from outside (embeddings with a padding mask), and a
        # replay of that block must find the mask it started from.
        _remember_exit(runtime, x, state)
    x = _block_branches(block, x, layout, runtime, merger, proportional_attention, state)
    state.record(x)
    if remember:
        _remember_exit(runtime, x, state)
    return x


def _attention(block: nn.Module, layout: BlockLayout, tokens_layout: TokenLayout, tokens: torch.Tensor,
               want_keys: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The attention branch's output (before LayerScale and drop-path) and, if wanted, the raw keys in the padded
    layout. A function of its own so that q, k, v and the normed tokens are freed before the MLP runs (they would
    otherwise raise the block's peak memory by about a third)."""
    parts = layout.attention
    attn = operator.attrgetter(layout.attn)(block)
    normed = layout.branch_input(block, tokens, layout.norm1)
    q, k, v = parts.qkv(attn, normed)
    dropout, qk_norm = parts.dropout(attn) if block.training else 0.0, functools.partial(parts.qk_norm, attn)
    if parts.cache_index is None:
        out = tokens_layout.attend(q, k, v, parts.scale(attn), dropout, qk_norm)
    else:  # a causal language model's layer (`mame.causal.CausalTokens`): positions, causal mask, KV cache
        out = tokens_layout.attend_cached(q, k, v, parts.scale(attn), dropout, qk_norm, parts.rotary,
                                          parts.cache_index(attn))
    return parts.output(attn, out, normed), (tokens_layout.unpack(k) if want_keys else None)


def _block_branches(block: nn.Module, x: torch.Tensor, layout: BlockLayout, runtime: MergeRuntime,
                    merger: Merger | None, proportional_attention: bool, state: TokenState) -> torch.Tensor:
    heads = layout.attention.heads(operator.attrgetter(layout.attn)(block))
    # Training keeps the padded batch: drop-path and dropout draw per sample.
    packed = runtime.packed and not block.training
    tokens_layout = state.token_layout(x, proportional_attention, heads, packed)
    tokens = tokens_layout.pack(x)
    attended, keys = _attention(block, layout, tokens_layout, tokens, merger is not None and merger.needs_keys)
    tokens = layout.residual(block, tokens, attended, layout.norm1, layout.ls1, layout.drop_path1)
    del attended
    if merger is not None:
        x = merger(tokens_layout.unpack(tokens), state, keys)
        del keys
        state.merges += 1
        tokens_layout = state.token_layout(x, proportional_attention, heads, packed)
        tokens = tokens_layout.pack(x)
    del x  # the caller's tensor stays alive; this frame's reference to it need not
    hidden = layout.run_mlp(block, layout.branch_input(block, tokens, layout.norm2))
    tokens = layout.residual(block, tokens, hidden, layout.norm2, layout.ls2, layout.drop_path2)
    return tokens_layout.unpack(tokens)
