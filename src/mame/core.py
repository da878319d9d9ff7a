"""The MaMe operator: matrix-based token merging (Huo & Li, "MaMe: Matrix-Based Token Merging", section 3).

Everything here is a function of tensors. `merge` partitions the tokens (eq 1), builds the fusion weights (eqs 2-8),
fuses destinations and keeps preserved sources (eqs 9-10), and returns the merged tokens with a `FusionPlan` that can
apply the same merge to any aligned tensor, undo it for dense outputs, and tell which output token holds each input
token. No sort, no top-k: the only discrete step is the preservation test "column of W^F sums to zero", which the
paper defines as an indicator, so gradients flow through every weight that is used.

Shapes: ``x`` is (B, L, d); specials are the first ``num_special`` tokens (CLS, registers) and never merge.
"""

from __future__ import annotations

import functools
import math
import struct
from dataclasses import dataclass
from typing import Literal

import torch

PartitionName = Literal["alternating", "sequential", "random"]
BatchRule = Literal["any", "per_sample"]
CausalMode = Literal["paper", "strict"]
SimilarityName = Literal["cosine", "euclidean", "dot", "softmax"]

PARTITIONS = ("alternating", "sequential", "random")
BATCH_RULES = ("any", "per_sample")
CAUSAL_MODES = ("paper", "strict")
SIMILARITIES = ("cosine", "euclidean", "dot", "softmax")


@dataclass(frozen=True)
class TokenSplit:
    """Destination and source positions (eq 1), as index tensors and, when evenly spaced (the alternating and
    sequential partitions), as slices: slicing gives views, where ``index_select`` copies the rows every merge."""

    dst_idx: torch.Tensor
    src_idx: torch.Tensor
    dst_slice: slice | None
    src_slice: slice | None
    head_idx: torch.Tensor  # the specials' positions, then the destinations': the head of eq 10's layout

    def dst(self, t: torch.Tensor) -> torch.Tensor:
        """The destination rows of ``t`` (B, L, ...) along dim 1."""
        return t[:, self.dst_slice] if self.dst_slice is not None else t.index_select(1, self.dst_idx)

    def src(self, t: torch.Tensor) -> torch.Tensor:
        """The source rows of ``t`` (B, L, ...) along dim 1."""
        return t[:, self.src_slice] if self.src_slice is not None else t.index_select(1, self.src_idx)


def _as_slice(positions: torch.Tensor) -> slice | None:
    """``positions`` as a slice when they form an arithmetic progression, else None."""
    count = positions.numel()
    if count == 0:
        return slice(0, 0)
    start = int(positions[0])
    step = int(positions[1] - positions[0]) if count > 1 else 1
    if step <= 0 or not torch.equal(positions, torch.arange(start, start + step * count, step)):
        return None
    return slice(start, start + step * (count - 1) + 1, step)


@functools.lru_cache(maxsize=4096)
def token_split(
    num_tokens: int, num_special: int, partition: str, dst_ratio: float, seed: int, device: str = "cpu"
) -> TokenSplit:
    """The cached `TokenSplit` of `partition_indices` on ``device``."""
    # Cached across calls: build normal tensors even inside inference_mode, or a later autograd forward fails.
    with torch.inference_mode(False):
        dst, src = _build_partition(num_tokens, num_special, partition, dst_ratio, seed)
        head = torch.cat([torch.arange(num_special), dst])
        return TokenSplit(dst.to(device), src.to(device), _as_slice(dst), _as_slice(src), head.to(device))


def _build_partition(
    num_tokens: int, num_special: int, partition: str, dst_ratio: float, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    count = num_tokens - num_special
    if partition == "alternating":
        # Every k-th token is a destination; k = 2 gives the paper's odd positions (0-based after the specials).
        stride = round(1.0 / dst_ratio)
        is_dst = (torch.arange(count) % stride) == stride - 1
    else:
        num_dst = min(count, max(0, round(count * dst_ratio)))
        if partition == "sequential":
            is_dst = torch.arange(count) < num_dst
        else:  # random: own generator, so merging never shifts the user's RNG stream
            generator = torch.Generator().manual_seed(seed)
            is_dst = torch.zeros(count, dtype=torch.bool)
            is_dst[torch.randperm(count, generator=generator)[:num_dst]] = True
    positions = torch.arange(num_special, num_tokens)
    return positions[is_dst], positions[~is_dst]


def partition_indices(
    num_tokens: int,
    num_special: int,
    partition: PartitionName = "alternating",
    dst_ratio: float = 0.5,
    seed: int = 0,
    device: torch.device | str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq 1: split the non-special positions into destination and source index sets.

    Args:
        num_tokens: L, the sequence length including special tokens.
        num_special: leading tokens that never merge.
        partition: ``"alternating"`` (every ``1/dst_ratio``-th token is a destination: odd positions for 0.5),
            ``"sequential"`` (the first ``dst_ratio`` share), ``"random"`` (seeded, own generator).
        dst_ratio: share of the non-special tokens that become destinations (0.25 for Swin-style downsampling).
        seed: seed of the random partition.
        device: where to put the indices.

    Returns:
        ``(dst_idx, src_idx)``: sorted absolute positions (M,) and (N,).
    """
    check_partition(partition, dst_ratio)
    if not 0 <= num_special < num_tokens:
        raise ValueError(f"num_special must be in [0, num_tokens) = [0, {num_tokens}), got {num_special!r}")
    split = token_split(num_tokens, num_special, partition, float(dst_ratio), seed, str(torch.device(device or "cpu")))
    return split.dst_idx, split.src_idx


def similarity_matrix(x_dst: torch.Tensor, x_src: torch.Tensor, similarity: str = "cosine",
                      pair_mask: torch.Tensor | None = None) -> torch.Tensor:
    """S (B, M, N) between destinations (B, M, d) and sources (B, N, d): eq 2, or one of the alternatives the
    paper's ablation compares (section 4.3.1, Figure 2b). The paper names them without formulas; each is defined here
    so that τ keeps its role in eq 3 (a bar on a similarity of at most 1) wherever the kind allows:

    - ``"cosine"`` (eq 2, the default): x_i . x_j / (|x_i| |x_j|), in [-1, 1].
    - ``"euclidean"``: 1 - |x_i - x_j| / (|x_i| + |x_j|), in [0, 1]: the distance as a share of the largest it can
      be for tokens of these norms (triangle inequality); 1 for equal tokens, 0 for opposite ones. Scale-free like
      the cosine, so one τ means the same in every block and model (1 / (1 + d) or -d would depend on the tokens'
      norms, which range from about 1 to 100 in ViTs), and unlike the cosine it separates parallel tokens of
      different lengths (x and 2x: 2/3).
    - ``"dot"``: x_i . x_j, eq 2 without the norms, unbounded: for ViT tokens (norms >> 1) nearly every pair with a
      positive product passes a τ in [-1, 1], and long tokens draw the weight, which is why it merges more (faster,
      less accurate: the paper's finding). With pruning, a source whose single candidate has S - τ >= 1 - ε is not
      preserved: eqs 5-8 zero a lone weight only below 1 - ε and leave this one a weight of order ε, so the source
      is in effect dropped.
    - ``"softmax"``: softmax over the destinations of the scaled products x_i . x_j / sqrt(d), how attention would
      spread source j over the destinations: in (0, 1), each source's column sums to 1 over its allowed
      destinations (``pair_mask``). τ bars a destination's share of the source; for τ >= 0.5 at most one
      destination passes, and the pruning of eqs 5-8 then keeps every source (a single weight is pruned).

    The paper's numbers (Figure 2b, AugReg ViT-B/16, top-1 % / im/s): cosine 83.35 / 73.06, Euclidean 81.58 / 73.60,
    dot 80.43 / 81.14, softmax 61.90 / 80.33.
    """
    products = x_dst @ x_src.mT
    if similarity == "dot":
        return products
    if similarity == "softmax":
        logits = products / math.sqrt(x_dst.shape[-1])
        if pair_mask is not None:  # disallowed destinations take no share (a finite floor: no NaN in empty columns)
            logits = logits.masked_fill(pair_mask == 0, torch.finfo(logits.dtype).min)
        return logits.softmax(dim=-2)
    # With F.normalize's norm floor: dividing the (M, N) products by the norms writes less memory than normalising
    # the (M, d) and (N, d) tokens first (d > N for ViTs).
    norm_dst = torch.linalg.vector_norm(x_dst, dim=-1, keepdim=True).clamp_min(1e-12)
    norm_src = torch.linalg.vector_norm(x_src, dim=-1, keepdim=True).clamp_min(1e-12)
    if similarity == "cosine":
        return products / (norm_dst * norm_src.mT)
    # |a - b|^2 from the products already made; the floor keeps the square root's gradient finite for equal tokens.
    squared = (norm_dst.square() + norm_src.square().mT - 2 * products).clamp_min(1e-12)
    return 1 - squared.sqrt() / (norm_dst + norm_src.mT)


def fusion_weights(
    x_dst: torch.Tensor,
    x_src: torch.Tensor,
    tau: float,
    prune: bool = True,
    eps: float = 1e-6,
    pair_mask: torch.Tensor | None = None,
    merge_count: int | torch.Tensor | None = None,
    similarity: SimilarityName = "cosine",
) -> torch.Tensor:
    """Eqs 2-8: the fusion matrix W^F (B, M, N) from destination (B, M, d) and source (B, N, d) features.

    ``pair_mask`` (broadcastable to (B, M, N), 1 = allowed) zeroes pairs before normalisation (used for padding and
    for strictly causal merging). ``merge_count`` ((B,), or an int for every sample) replaces ``tau`` by a budget:
    each sample gets its own threshold so that exactly its ``merge_count`` most similar sources merge
    (`budget_threshold`). Computed in float32 when the input is half precision. ``similarity``: eq 2's cosine or an
    ablated kind (`similarity_matrix`).
    """
    weights, ranked = _fusion_weights(x_dst, x_src, tau, prune, eps, pair_mask, merge_count, similarity)
    return weights if ranked is None else _scatter_columns(weights, ranked[:, : weights.shape[-1]], x_src.shape[1])


def _fusion_weights(x_dst: torch.Tensor, x_src: torch.Tensor, tau: float, prune: bool, eps: float,
                    pair_mask: torch.Tensor | None, merge_count: int | torch.Tensor | None, similarity: str
                    ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`fusion_weights` as ``(weights, None)``, or, for one count k without a pair mask, ``(weights, ranked)``: the
    weights (B, M, k) of each sample's k chosen sources, and ``ranked`` (B, N), each sample's sources by rank, whose
    first k are the chosen ones (the columns of ``weights``, in that order); the other columns of W^F are zero."""
    if x_dst.dtype in (torch.float16, torch.bfloat16):
        x_dst, x_src = x_dst.float(), x_src.float()
    kind, similarity = similarity, similarity_matrix(x_dst, x_src, similarity, pair_mask)  # eq 2
    if merge_count is None:
        return _weights_from_similarity(similarity, tau, kind, pair_mask, prune, eps, budget=False), None
    sample_tau, chosen, ranked, count = _budget_cut(similarity, merge_count, pair_mask)
    if chosen is not None:
        pair_mask = chosen if pair_mask is None else pair_mask * chosen
        return _weights_from_similarity(similarity, sample_tau, kind, pair_mask, prune, eps, budget=True), None
    # One count, no pair mask: eqs 3-8 act column by column, so they run on the chosen sources' columns alone (about
    # one in eight per block).
    if similarity.shape[0] == 1:
        chosen_columns = similarity.index_select(2, ranked[0, :count])
    else:
        chosen_columns = similarity.gather(2, ranked[:, :count].unsqueeze(1).expand(-1, similarity.shape[1], -1))
    return _weights_from_similarity(chosen_columns, sample_tau, kind, None, prune, eps, budget=True), ranked


def _scatter_columns(weights: torch.Tensor, columns: torch.Tensor, num_src: int) -> torch.Tensor:
    """Dense (B, M, N) weights from those (B, M, k) of the sources ``columns`` (B, k); the other columns are zero."""
    index = columns.unsqueeze(1).expand(-1, weights.shape[1], -1)
    return weights.new_zeros(*weights.shape[:2], num_src).scatter_(2, index, weights)


def _weights_from_similarity(similarity: torch.Tensor, tau: float | torch.Tensor, kind: str,
                             pair_mask: torch.Tensor | None, prune: bool, eps: float, budget: bool) -> torch.Tensor:
    """Eqs 3-8 on the similarity (B, M, N') of some sources' columns, each column on its own, at one threshold
    ``tau`` or per-sample ones (B, 1, 1). ``budget``: a budget chose the threshold, and eq 7 never empties a column
    (see below)."""
    # Eq 3 with the similarity clamped to 1 first (rounding can push a cosine past 1, and tau = 1 would then still
    # merge): relu(min(s, 1) - tau) = clamp(s - tau, 0, 1 - tau); the unbounded dot product has no ceiling.
    # In-place steps below only touch fresh temporaries whose old values autograd does not need; they save a
    # buffer each, which counts at one image per call.
    ceiling = math.inf if kind == "dot" else 1.0
    if isinstance(tau, torch.Tensor):  # per-sample thresholds
        capped = similarity if kind == "dot" else similarity.clamp(max=ceiling)
        sparse = (capped - tau).clamp_(min=0.0)
    else:
        sparse = (similarity - tau).clamp_(0.0, ceiling - tau)
    if pair_mask is not None:
        sparse = sparse * pair_mask
    weights = sparse / sparse.sum(dim=-2, keepdim=True).add_(eps)  # eq 4
    if not prune:
        return weights
    weight_total = weights.sum(dim=-2, keepdim=True)
    count = (weights / (weights + eps)).sum(dim=-2, keepdim=True)  # eq 6
    zeta = weight_total / count.add_(eps)  # eq 5
    pruned = (weights - zeta).relu_()  # eq 7
    pruned_total = pruned.sum(dim=-2, keepdim=True)
    if budget:
        # Beyond the paper: a budget has chosen which sources merge, and pruning only decides where each goes. Eq 7
        # empties a column whose weights are all equal (a single destination above τ, most often); such a source
        # keeps its weights instead of being dropped from the budget.
        emptied = pruned_total == 0
        pruned = torch.where(emptied, weights, pruned)
        pruned_total = torch.where(emptied, weight_total, pruned_total)
    return pruned / pruned_total.add_(eps)  # eq 8


def budget_threshold(similarity: torch.Tensor, merge_count: int | torch.Tensor,
                     pair_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample thresholds that merge exactly ``merge_count`` sources of each sample ((B,) counts, or one int for
    every sample) (beyond the paper: its stated future work, a threshold set by a budget instead of by hand).

    A source merges when eq 3 leaves it a weight, that is when its best destination passes τ. Sources are ranked by
    that similarity (ties by position) and each sample's τ is set midway between its last chosen and first left-out
    source (at most 1e-3 below the last chosen one, so ties still merge), so eqs 3-4 weigh the chosen sources as a
    hand-set τ there would. With pruning, `fusion_weights` keeps every chosen source merging (eqs 5-8 then only
    decide among its destinations).

    Returns:
        ``(tau, chosen)``: (B, 1, 1) thresholds, and a (B, 1, N) 0/1 mask of the chosen sources (the columns of the
        others are zeroed, so ties past the budget never merge).
    """
    tau, chosen, ranked, count = _budget_cut(similarity, merge_count, pair_mask)
    if not isinstance(tau, torch.Tensor):
        tau = similarity.new_full((1, 1, 1), tau)
    if chosen is None:
        chosen = similarity.new_zeros(similarity.shape[0], 1, similarity.shape[2]).scatter_(
            2, ranked[:, :count].unsqueeze(1), 1.0)
    return tau, chosen


def _budget_cut(similarity: torch.Tensor, merge_count: int | torch.Tensor, pair_mask: torch.Tensor | None
                ) -> tuple[float | torch.Tensor, torch.Tensor | None, torch.Tensor | None, int]:
    """`budget_threshold` as ``(tau, chosen, None, 0)``, or, for one count without a pair mask, ``(tau, None,
    ranked, count)``: instead of the mask, each sample's sources ranked (B, N), whose first ``count`` are the chosen
    ones, and for one sample τ as a float."""
    batch, num_dst, num_src = similarity.shape
    allowed = similarity if pair_mask is None else similarity.masked_fill(pair_mask == 0, -math.inf)
    if num_dst == 0:  # no destination: nothing can merge
        key = allowed.new_full((batch, num_src), -math.inf)
    else:
        key = allowed.amax(dim=1)  # (B, N) what each source must pass to merge
    ordered, order = key.sort(dim=1, descending=True, stable=True)
    if isinstance(merge_count, int) and pair_mask is None and num_dst > 0:
        # One count, every source mergeable: the thresholds from the two similarities around each sample's cut, in
        # Python (a merge of one image is a few dozen small operations, each costing more overhead than arithmetic).
        count = min(merge_count, num_src)
        if count == 0:
            return 1.0 if batch == 1 else key.new_ones(batch, 1, 1), None, order, 0
        around = ordered[:, count - 1 : count + 1].tolist()
        tau = [_below(row[0], (row[0] + (row[1] if count < num_src else -1.0)) / 2, key.dtype) for row in around]
        if batch == 1:  # a float: eq 3 then clamps against it without a tensor
            return tau[0], None, order, count
        return torch.tensor(tau, dtype=key.dtype).to(key.device).view(-1, 1, 1), None, order, count
    if isinstance(merge_count, int):
        merge_count = torch.full((batch,), merge_count)
    mergeable = torch.isfinite(ordered).sum(1)
    count = torch.minimum(merge_count.to(mergeable.device).long(), mergeable)
    last_in = ordered.gather(1, (count - 1).clamp_min(0).unsqueeze(1)).squeeze(1)
    first_out = ordered.gather(1, count.clamp_max(ordered.shape[1] - 1).unsqueeze(1)).squeeze(1)
    first_out = torch.where(count < mergeable, first_out, torch.full_like(first_out, -1.0))
    tau = torch.minimum((last_in + first_out) / 2, last_in - (last_in.abs() * _MARGIN).clamp_min(1e-3))
    tau = torch.where(count > 0, tau, torch.ones_like(tau))  # with no source chosen, `chosen` zeroes every column
    # The first `count` places of the order, written back to the sources' own positions (no second sort).
    in_budget = torch.arange(order.shape[1], device=order.device) < count.unsqueeze(1)
    chosen = torch.zeros_like(key).scatter_(1, order, in_budget.to(key.dtype)).unsqueeze(1).to(similarity.dtype)
    return tau.view(-1, 1, 1), chosen, None, 0


# The least relative gap between the last chosen similarity and τ: eight float32 steps.
_MARGIN = 2.0**-20


def _below(last_in: float, midway: float, dtype: torch.dtype) -> float:
    """The threshold for a cut between the last chosen similarity ``last_in`` and the next (``midway`` between the
    two), rounded to ``dtype``: at most 1e-3 below ``last_in``, so ties still merge, and strictly below it even for a
    large dot product (float32 has no number 1e-3 below 1e5), so every chosen source keeps a weight in eq 3."""
    return _round_as(min(midway, last_in - max(1e-3, abs(last_in) * _MARGIN)), dtype)


def _round_as(value: float, dtype: torch.dtype) -> float:
    """``value`` rounded to ``dtype`` (float32 or float64, the similarity's), as a Python float."""
    return struct.unpack("f", struct.pack("f", value))[0] if dtype == torch.float32 else value


@dataclass
class FusionPlan:
    """Which input token went where in one merge; apply it to any tensor aligned with the same tokens.

    Output layout per sample: specials, fused destinations, preserved sources (eq 10), each in original order;
    when nothing merges in any sample (e.g. tau = 1) the output is the input itself, in its own order; with ``batch_rule="per_sample"`` (or padded input) shorter samples are padded at the end and ``mask`` says
    which output tokens are real.

    Attributes:
        num_special: leading tokens that never merge.
        split: the destination and source positions (``dst_idx`` (M,) and ``src_idx`` (N,) are shortcuts).
        weights: (B, M, N) the fusion weights W^F actually used (after causal masking and the batch rule).
        preserved: (B, N) bool, sources kept as tokens of their own (for ``"any"`` the same row in every sample).
        sizes_in: (B, L) how many original tokens each input token stands for.
        sizes: (B, L') the same for the output tokens (padding has size 0). A source absorbed by several destinations
            is shared among them in proportion to its weights, so sizes sum to the input total per sample.
        mask: (B, L') bool, True = real token, or None when every output token is real.
        lengths: (B,) number of real output tokens per sample.
        size_weighted: fusion weighs each token by its size (a token standing for 5 patches weighs 5).
    """

    num_special: int
    split: TokenSplit
    sizes_in: torch.Tensor
    sizes: torch.Tensor
    mask: torch.Tensor | None
    size_weighted: bool
    # (B, N) and (B,); None until first asked for when the plan was made from the fused columns alone.
    _preserved: torch.Tensor | None = None
    _lengths: torch.Tensor | None = None
    # The dense (B, M, N) W^F; None until first asked for when the plan was made from the fused columns alone.
    _weights: torch.Tensor | None = None
    # (B * L',) row of every output token in the candidates [specials, destinations, sources, one zero row] of all
    # samples stacked as (B * (S + M + N + 1), c); None for the uniform fast path.
    _gather_rows: torch.Tensor | None = None
    # Every sample keeps as many sources (no padding): the indices of the kept sources, (N',) when every sample keeps
    # the same ones (batch rule "any") or (B, N'), and the input rows of that output (specials, destinations, kept
    # sources), (S + M + N',) or (B, S + M + N') rows of the (B * L, c) flattened input (`_take_rows`).
    _kept_src: torch.Tensor | None = None
    _out_rows: torch.Tensor | None = None
    # Indices (among the sources), input rows and (B, M, N') weights of the sources fused (uniform layout), when
    # fewer than all: the other columns of ``weights`` are zero, so eq 9 reads only these (a budget fuses about one
    # source in eight per block). Shared (N',) or each sample's own (B, N'), as the kept sources.
    _fused_src: torch.Tensor | None = None
    _fused_rows: torch.Tensor | None = None
    _fused_weights: torch.Tensor | None = None
    # (B, M, N) or (B, M, N') of the fused sources: W^F times the sources' sizes, w_ij n_j (size-weighted fusion).
    _sized_weights: torch.Tensor | None = None
    # (B, S + M + N) output position of every candidate that is kept (-1 otherwise).
    _out_pos: torch.Tensor | None = None
    # Nothing merged in any sample: the output is the input, in its own order.
    _identity: bool = False

    @property
    def weights(self) -> torch.Tensor:
        """(B, M, N) the fusion weights W^F actually used (after causal masking and the batch rule)."""
        if self._weights is None:
            columns = self._fused_src.expand(self._fused_weights.shape[0], -1)
            self._weights = _scatter_columns(self._fused_weights, columns, self.split.src_idx.numel())
        return self._weights

    @property
    def preserved(self) -> torch.Tensor:
        """(B, N) bool: the sources kept as tokens of their own."""
        if self._preserved is None:
            batch, num_src = self.sizes_in.shape[0], self.split.src_idx.numel()
            fused = self._fused_src.expand(batch, -1)
            preserved = torch.ones(batch, num_src, dtype=torch.bool, device=fused.device)
            self._preserved = preserved.scatter_(1, fused, False)
        return self._preserved

    @property
    def lengths(self) -> torch.Tensor:
        """(B,) number of real output tokens per sample."""
        if self._lengths is None:
            self._lengths = torch.full((self.sizes.shape[0],), self.sizes.shape[1], device=self.sizes.device)
        return self._lengths

    @property
    def dst_idx(self) -> torch.Tensor:
        return self.split.dst_idx

    @property
    def src_idx(self) -> torch.Tensor:
        return self.split.src_idx

    @property
    def num_tokens_in(self) -> int:
        return self.sizes_in.shape[1]

    @property
    def num_tokens_out(self) -> int:
        return self.sizes.shape[1]

    @property
    def shares(self) -> torch.Tensor:
        """(B, M, N) share of each absorbed source held by each destination (columns sum to 1 or are 0)."""
        return _shares(self.weights)

    def merge(self, t: torch.Tensor) -> torch.Tensor:
        """Apply this merge (eqs 9-10) to ``t`` (B, L, c), aligned with the tokens the plan was made from."""
        if self._identity:
            return t
        if t.dim() == 2:
            return self.merge(t.unsqueeze(-1)).squeeze(-1)
        return self._merge_parts(t, self.split.dst(t), self.split.src(t))

    def _merge_parts(self, t: torch.Tensor, t_dst: torch.Tensor, t_src: torch.Tensor) -> torch.Tensor:
        """`merge` given the destination and source rows of ``t`` already selected."""
        s = self.num_special
        # Fused rows picked from ``t`` by position: several times faster than from the strided view of the sources.
        t_fused = t_src if self._fused_src is None else _take_rows(t, self._fused_rows)
        if self.size_weighted:  # each source's weight scaled by the tokens it stands for (made with the plan)
            size_dst = self.split.dst(self.sizes_in).to(t.dtype).unsqueeze(-1)
            w = self._sized_weights.to(t.dtype)
            total = size_dst + w.sum(dim=-1, keepdim=True)
            if self.mask is not None:  # padded destinations have size 0 and absorb nothing: 0, not 0/0
                total = total.clamp_min(1e-12)
            # Dividing the small factors before the product saves a pass over the (B, M, d) result.
            fused = torch.baddbmm(t_dst * (size_dst / total), w / total, t_fused)
        else:
            w = (self.weights if self._fused_src is None else self._fused_weights).to(t.dtype)
            fused = torch.baddbmm(t_dst, w, t_fused) / w.sum(dim=-1, keepdim=True).add_(1)  # eq 9
        if self._out_rows is not None:  # eq 10; one row selection and a copy cost less than a concatenation
            out = _take_rows(t, self._out_rows)
            out[:, s : s + fused.shape[1]] = fused
            return out
        # The last candidate is a zero row: padding slots take it, so no masking pass is needed afterwards. Whole rows
        # are picked with index_select (a row copy each), 5x faster than gather with an index per element.
        batch, channels = t.shape[0], t.shape[-1]
        candidates = torch.cat([t[:, :s], fused, t_src, t.new_zeros(batch, 1, channels)], dim=1)
        picked = candidates.view(-1, channels).index_select(0, self._gather_rows)
        return picked.view(batch, -1, channels)

    def unmerge(self, y: torch.Tensor) -> torch.Tensor:
        """Map (B, L', c) back to (B, L, c): each absorbed source receives its destinations' weighted value;
        specials, destinations and preserved sources receive their own (padded input positions receive 0)."""
        if y.dim() == 2:
            return self.unmerge(y.unsqueeze(-1)).squeeze(-1)
        batch, _, channels = y.shape
        out_pos = self._output_positions()
        s, m = self.num_special, self.dst_idx.numel()
        picked = y.gather(1, out_pos.clamp_min(0).unsqueeze(-1).expand(-1, -1, channels))
        picked = picked.masked_fill((out_pos < 0).unsqueeze(-1), 0)
        y_dst, y_src_own = picked[:, s : s + m], picked[:, s + m :]
        absorbed = self.shares.to(y.dtype).transpose(-1, -2) @ y_dst
        y_src = torch.where(self.preserved.unsqueeze(-1), y_src_own, absorbed)
        out = y.new_zeros(batch, self.num_tokens_in, channels)
        out[:, :s] = picked[:, :s]
        out[:, self.dst_idx] = y_dst
        out[:, self.src_idx] = y_src
        return out

    @property
    def source_map(self) -> torch.Tensor:
        """(B, L) long: for each input token, the output token that holds it (the largest share if split; -1 for
        padding and for discarded sources)."""
        out_pos = self._output_positions()
        s, m = self.num_special, self.dst_idx.numel()
        batch = out_pos.shape[0]
        result = torch.zeros(batch, self.num_tokens_in, dtype=torch.long, device=out_pos.device)
        result[:, :s] = out_pos[:, :s]
        result[:, self.dst_idx] = out_pos[:, s : s + m]
        absorbed_pos = torch.full_like(out_pos[:, s + m :], -1)
        if m > 0:
            best_dst = self.weights.argmax(dim=-2)  # (B, N)
            absorbed = self.weights.sum(dim=-2) > 0
            absorbed_pos = torch.where(absorbed, out_pos[:, s : s + m].gather(1, best_dst), -1)
        result[:, self.src_idx] = torch.where(self.preserved, out_pos[:, s + m :], absorbed_pos)
        return result

    def _output_positions(self) -> torch.Tensor:
        if self._out_pos is not None:
            return self._out_pos
        # Uniform layout: specials, destinations, then the kept sources in order (the same or each sample's own).
        batch, n = self.preserved.shape
        s, m = self.num_special, self.dst_idx.numel()
        device = self.preserved.device
        kept = self._kept_src.expand(batch, -1)
        slots = torch.arange(s + m, s + m + kept.shape[1], device=device).expand(batch, -1)
        src_pos = torch.full((batch, n), -1, dtype=torch.long, device=device).scatter_(1, kept, slots)
        return torch.cat([torch.arange(s + m, device=device).expand(batch, -1), src_pos], dim=1)


def check_options(partition: str, batch_rule: str, causal: bool | str, dst_ratio: float = 0.5,
                  similarity: str = "cosine") -> None:
    """Raise a ValueError naming the argument when a string option or ``dst_ratio`` is not one we know."""
    if similarity not in SIMILARITIES:
        raise ValueError(f"similarity must be one of {SIMILARITIES}, got {similarity!r}")
    if batch_rule not in BATCH_RULES:
        raise ValueError(f"batch_rule must be one of {BATCH_RULES}, got {batch_rule!r}")
    if causal not in (False, True) + CAUSAL_MODES:
        raise ValueError(f"causal must be False, True (= 'paper') or one of {CAUSAL_MODES}, got {causal!r}")
    check_partition(partition, dst_ratio)


def check_partition(partition: str, dst_ratio: float) -> None:
    """Raise a ValueError naming the argument for an unknown partition or a ``dst_ratio`` it cannot make."""
    if partition not in PARTITIONS:
        raise ValueError(f"partition must be one of {PARTITIONS}, got {partition!r}")
    if isinstance(dst_ratio, bool) or not isinstance(dst_ratio, (int, float)) or not 0.0 < dst_ratio < 1.0:
        raise ValueError(f"dst_ratio must be a number in (0, 1), got {dst_ratio!r}")
    if partition == "alternating":
        # Every k-th token is a destination, so only 1/k ratios exist; rounding 0.9 to k = 1 would make every token
        # a destination and silently merge nothing.
        stride = round(1.0 / dst_ratio)
        if stride < 2 or abs(1.0 / stride - dst_ratio) > 1e-3:
            raise ValueError(f"dst_ratio must be 1/k for an integer k >= 2 with partition='alternating' (every k-th "
                             f"token is a destination), got {dst_ratio!r}; use partition='sequential' or 'random' "
                             "for other ratios")


def check_tau(tau: float, name: str = "tau") -> float:
    """``tau`` as a float, refused with a TypeError/ValueError naming ``name`` unless it is a number in [-1, 1]."""
    if isinstance(tau, bool) or not isinstance(tau, (int, float)):
        raise TypeError(f"{name} must be a number in [-1, 1] (a cosine-similarity threshold), got {tau!r}")
    if math.isnan(tau) or not -1.0 <= tau <= 1.0:
        raise ValueError(f"{name} must lie in [-1, 1] (a cosine-similarity threshold), got {tau!r}")
    return float(tau)


def _check_aligned(x: torch.Tensor, num_special: int, partition: str, sizes: torch.Tensor | None,
                   mask: torch.Tensor | None, metric: torch.Tensor | None) -> None:
    if metric is not None:
        if not isinstance(metric, torch.Tensor) or metric.dim() != 3 or metric.shape[:2] != x.shape[:2]:
            raise ValueError(f"metric must be a (B, L, k) tensor with (B, L) = {tuple(x.shape[:2])}, got "
                             f"{tuple(getattr(metric, 'shape', ()))}")
        if not metric.is_floating_point():
            raise TypeError(f"metric must be a floating-point tensor, got {metric.dtype}")
    for name, value in (("sizes", sizes), ("mask", mask)):
        if value is not None and (not isinstance(value, torch.Tensor) or value.shape != x.shape[:2]):
            raise ValueError(f"{name} must be a tensor of shape (B, L) = {tuple(x.shape[:2])}, got "
                             f"{tuple(getattr(value, 'shape', ())) or type(value).__name__}")
    real = None
    if mask is not None:
        if mask.dtype != torch.bool:
            raise TypeError(f"mask must be a bool tensor (True = real token), got {mask.dtype}")
        lengths = mask.sum(dim=1)
        empty = (lengths == 0) | (lengths < num_special)
        if bool(empty.any()):
            raise ValueError(f"mask: every sample needs at least one real token and its {num_special} special tokens; "
                             f"rows {empty.nonzero().flatten().tolist()} have none")
        prefix = torch.arange(mask.shape[1], device=mask.device) < lengths.unsqueeze(1)
        if not torch.equal(mask, prefix):
            raise ValueError("mask: the real tokens of each sample must come first (True ... True False ... False); "
                             f"rows {(mask != prefix).any(1).nonzero().flatten().tolist()} are not a prefix")
        if partition != "alternating":
            # These partitions depend on the sample's length, so a padded sample would be split differently from
            # the same sample alone; the alternating partition of a prefix does not depend on what follows it.
            raise ValueError(f"partition={partition!r} cannot take a padding mask: it splits a padded sample "
                             "differently from the same sample alone; use partition='alternating'")
        real = mask
    if sizes is not None:
        if sizes.dtype == torch.bool or sizes.is_complex():
            raise TypeError(f"sizes must be a real-valued tensor, got {sizes.dtype}")
        sizes = sizes.float()
        if not bool(torch.isfinite(sizes).all()) or bool((sizes < 0).any()):
            raise ValueError("sizes must be finite and non-negative (how many original tokens each token stands for)")
        if bool(((sizes == 0) if real is None else (sizes == 0) & real).any()):
            raise ValueError("sizes must be positive on real tokens (size 0 is for padding only)")


def _check_inputs(x: torch.Tensor, tau: float, num_special: int, partition: str, batch_rule: str, causal,
                  dst_ratio: float, similarity: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor of shape (B, L, d), got {type(x).__name__}")
    if x.dim() != 3:
        raise ValueError(f"x must be 3-D (B, L, d), got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"x must be a floating-point tensor (float32, float16, bfloat16, float64), got {x.dtype}")
    if isinstance(num_special, bool) or not isinstance(num_special, int) or not 0 <= num_special < x.shape[1]:
        raise ValueError(f"num_special must be an int in [0, L) with L = {x.shape[1]}, got {num_special!r}")
    check_tau(tau)
    check_options(partition, batch_rule, causal, dst_ratio, similarity)
    if not bool(torch.isfinite(x).all()):
        raise ValueError("x contains NaN or Inf")


def merge(
    x: torch.Tensor,
    tau: float = 0.8,
    num_special: int = 1,
    partition: PartitionName = "alternating",
    prune: bool = True,
    batch_rule: BatchRule = "any",
    causal: bool | CausalMode = False,
    eps: float = 1e-6,
    *,
    dst_ratio: float = 0.5,
    seed: int = 0,
    sizes: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    metric: torch.Tensor | None = None,
    size_weighted: bool = False,
    discard_preserved: bool = False,
    merge_count: int | torch.Tensor | None = None,
    similarity: SimilarityName = "cosine",
    check: bool = True,
) -> tuple[torch.Tensor, FusionPlan]:
    """Merge redundant tokens with MaMe (eqs 1-10).

    Args:
        x: (B, L, d) tokens, floating point.
        tau: similarity threshold in [-1, 1] (eq 3); 1 merges nothing.
        num_special: leading tokens (CLS, registers) that never merge.
        partition: destination/source split, see `partition_indices`.
        prune: apply the adaptive weight pruning of eqs 5-8 (otherwise W^F = W of eq 4).
        batch_rule: ``"any"`` is the paper's rule (section 3.3): a source preserved in any sample is preserved, and
            not fused, in every sample, so all samples keep the same length. ``"per_sample"``: each sample keeps only
            its own preserved sources; the output is padded at the end and ``plan.mask`` marks real tokens.
        causal: ``True``/``"paper"``: section 5, W^F is multiplied by the mask "source position <= destination
            position", so no destination absorbs a later token (the columns are still normalised over all
            destinations, so the result is not prefix-causal). ``"strict"``: each source may only join the nearest
            destination after it; the output for a prefix then does not depend on later tokens. With a single
            candidate per source there is nothing to prune, so pruning is skipped in that mode.
        eps: the epsilon of eqs 4-8.
        dst_ratio: share of non-special tokens that are destinations (0.5 = the paper's 2:1 split).
        seed: seed for ``partition="random"``.
        sizes: (B, L) how many original tokens each input token stands for (default ones; finite, positive on real
            tokens); carried forward.
        mask: (B, L) bool, True = real token, for padded input (real tokens first in each sample, specials
            included, at least one other real token). Padding never merges and is dropped from the output. Only the
            alternating partition takes a mask: the others split a padded sample differently from the sample alone.
        metric: (B, L, k) features used for the similarity instead of ``x`` (the paper uses the tokens themselves).
        size_weighted: weigh each token by its size when fusing (beyond the paper; equal to eq 9 when sizes are 1).
        discard_preserved: drop preserved sources instead of keeping them (the downsampling layer of hierarchical
            models, section 4: "we had to discard the preserved source tokens").
        merge_count: (B,) a budget instead of ``tau`` (an int: the same for every sample): each sample merges
            exactly this many of its sources (fewer when it has fewer real ones), at its own threshold
            (`budget_threshold`). Not with ``causal``.
        similarity: how S is computed: ``"cosine"`` (eq 2, the paper's choice), or the kinds its ablation compares,
            ``"euclidean"``, ``"dot"`` and ``"softmax"`` (defined in `similarity_matrix`).
        check: validate the arguments and scan ``x`` for NaN and Inf; patched blocks check their settings once at patch
            time and pass False, since the NaN scan alone costs a pass over the tokens in every block.

    Returns:
        ``(y, plan)``: merged tokens (B, L', d) and the `FusionPlan`.
    """
    if check:
        _check_inputs(x, tau, num_special, partition, batch_rule, causal, dst_ratio, similarity)
        _check_aligned(x, num_special, partition, sizes, mask, metric)
        if merge_count is not None and (
                causal or (isinstance(merge_count, int) and (isinstance(merge_count, bool) or merge_count < 0))
                or (not isinstance(merge_count, int) and getattr(merge_count, "shape", None) != (x.shape[0],))):
            raise ValueError("merge_count must be a non-negative int or a (B,) tensor of counts, and cannot be "
                             "combined with causal")
    batch, length, _ = x.shape
    device = x.device
    split = token_split(length, num_special, partition, float(dst_ratio), seed, str(device))
    dst_idx, src_idx = split.dst_idx, split.src_idx
    if sizes is None:
        sizes_in = torch.ones(batch, length, device=device, dtype=torch.float32)
    else:
        sizes_in = sizes if sizes.dtype == torch.float32 else sizes.float()

    pair_mask = None
    if causal == "strict":
        # Source j may only join the first destination after it: the nearest later destination position.
        nearest = torch.searchsorted(dst_idx, src_idx)  # index of the first destination with position > source
        pair_mask = (torch.arange(dst_idx.numel(), device=device).unsqueeze(1) == nearest.unsqueeze(0)).float()
        prune = False
    src_real = None if mask is None else split.src(mask)
    if mask is not None:
        valid = split.dst(mask).unsqueeze(-1) & src_real.unsqueeze(-2)
        pair_mask = valid.float() if pair_mask is None else pair_mask * valid
    x_dst, x_src = split.dst(x), split.src(x)
    if metric is None:  # the paper's metric: the tokens themselves, so the selected rows serve twice
        metric_dst, metric_src = x_dst, x_src
    else:
        metric_dst, metric_src = split.dst(metric), split.src(metric)
    weights, ranked = _fusion_weights(metric_dst, metric_src, tau, prune, eps, pair_mask, merge_count, similarity)
    if ranked is not None and (batch == 1 or batch_rule == "per_sample"):
        plan = _chosen_columns_plan(split, num_special, weights, ranked, sizes_in, size_weighted, discard_preserved)
        return (x if plan._identity else plan._merge_parts(x, x_dst, x_src)), plan
    if ranked is not None:
        weights = _scatter_columns(weights, ranked[:, : weights.shape[-1]], src_idx.numel())
    if causal in (True, "paper"):
        weights = weights * (src_idx.unsqueeze(0) <= dst_idx.unsqueeze(1))  # section 5

    if batch == 1 and mask is None:
        batch_rule = "any"  # one sample: both rules agree, and the uniform layout needs no padding machinery
    fused_total = weights.sum(dim=-2)  # (B, N) the weight each source gives away in all; 0 = not fused
    not_fused = fused_total == 0
    preserved = not_fused  # m_j of section 3.3
    if src_real is not None:
        preserved = preserved & src_real  # padding is never "preserved"
    if batch_rule == "any" and batch > 1:
        # A source preserved in any sample is preserved in all (with one sample its column is zero already).
        preserved = preserved.any(dim=0, keepdim=True).expand(batch, -1)
        weights = weights * (~preserved[:1]).unsqueeze(1)  # fused_total keeps those columns: they have no weight
    kept_src = torch.zeros_like(preserved) if discard_preserved else preserved

    # Columns with total 0 have zero weights; dividing them by 1 keeps inf and NaN out of the sizes and their gradient.
    sized = weights * split.src(sizes_in).to(weights.dtype).unsqueeze(1)
    sizes_out_dst = _absorbed_sizes(split.dst(sizes_in), sized, fused_total.masked_fill(not_fused, 1.0))
    plan_kwargs = dict(num_special=num_special, split=split, _weights=weights, _preserved=preserved,
                       sizes_in=sizes_in, size_weighted=size_weighted, _sized_weights=sized if size_weighted else None)
    # The uniform layout's kept sources come with the one host synchronisation its output length needs; they also
    # tell whether anything merged at all.
    kept = kept_src[0].nonzero().squeeze(-1) if mask is None and batch_rule == "any" else None
    if kept is not None:
        nothing_merged_anywhere = kept.numel() == src_idx.numel()
        fused_src = (~preserved[0]).nonzero().squeeze(-1)
        if fused_src.numel() < src_idx.numel():
            plan_kwargs.update(_fused_src=fused_src, _fused_rows=src_idx.index_select(0, fused_src),
                               _fused_weights=weights.index_select(2, fused_src))
            if size_weighted:
                plan_kwargs.update(_sized_weights=sized.index_select(2, fused_src))
    else:
        nothing_merged_anywhere = mask is None and bool(preserved.all())
    if nothing_merged_anywhere and not discard_preserved:
        plan = _identity_plan(plan_kwargs, batch, length)
    elif kept is not None:
        plan = _uniform_plan(plan_kwargs, kept, sizes_out_dst)
    else:
        nothing_merged = (weights.flatten(1) == 0).all(dim=1) & (not discard_preserved)
        plan = _ragged_plan(plan_kwargs, mask, kept_src, sizes_in, sizes_out_dst, nothing_merged)
    return (x if plan._identity else plan._merge_parts(x, x_dst, x_src)), plan


def _absorbed_sizes(size_dst: torch.Tensor, sized: torch.Tensor, total: torch.Tensor) -> torch.Tensor:
    """(B, M) each destination's own size plus its shares of the sources it absorbs, from ``sized`` (B, M, N'),
    w_ij n_j, and the sources' column totals ``total`` (B, N'): n_i + sum_j n_j w_ij / total_j, in ``size_dst``'s
    dtype."""
    return (size_dst + (sized / total.unsqueeze(1)).sum(dim=-1)).to(size_dst.dtype)


def _identity_plan(plan_kwargs: dict, batch: int, length: int) -> FusionPlan:
    """Nothing merges (e.g. tau = 1): keep the input as it is, in its own order, rather than eq 10's layout."""
    split, sizes_in = plan_kwargs["split"], plan_kwargs["sizes_in"]
    device = sizes_in.device
    out_pos = torch.cat([torch.arange(plan_kwargs["num_special"], device=device), split.dst_idx, split.src_idx])
    return FusionPlan(**plan_kwargs, sizes=sizes_in, mask=None, _out_pos=out_pos.expand(batch, -1), _identity=True)


def _uniform_plan(plan_kwargs: dict, kept: torch.Tensor, sizes_out_dst: torch.Tensor) -> FusionPlan:
    """Every sample keeps as many sources, ``kept`` ((N',) the same for every sample, or (B, N') each its own):
    specials, destinations, then those sources (eq 10), with no padding."""
    split, sizes_in, s = plan_kwargs["split"], plan_kwargs["sizes_in"], plan_kwargs["num_special"]
    batch, length = sizes_in.shape
    if kept.dim() == 1:
        out_rows = torch.cat([split.head_idx, split.src_idx.index_select(0, kept)])
    else:
        out_rows = _sample_rows(torch.cat([split.head_idx.expand(batch, -1), split.src_idx[kept]], dim=1), length)
    sizes_out = _take_rows(sizes_in, out_rows)
    sizes_out[:, s : s + split.dst_idx.numel()] = sizes_out_dst
    return FusionPlan(**plan_kwargs, sizes=sizes_out, mask=None, _kept_src=kept, _out_rows=out_rows)


def _sample_rows(positions: torch.Tensor, length: int) -> torch.Tensor:
    """Each sample's token ``positions`` (B, n) as rows of the (B * L, ...) flattened batch (`_take_rows`)."""
    batch = positions.shape[0]
    return positions + torch.arange(0, batch * length, length, device=positions.device).unsqueeze(1)


def _take_rows(t: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Rows of ``t`` (B, L, ...) along dim 1: ``rows`` (n,) the same for every sample, or (B, n) rows of the
    (B * L, ...) flattened ``t``, each sample's own. Whole rows by index_select: a row copy each, several times
    faster than gather with an index per element."""
    if rows.dim() == 1:
        return t.index_select(1, rows)
    return t.reshape(-1, *t.shape[2:]).index_select(0, rows.flatten()).view(*rows.shape, *t.shape[2:])


def _chosen_columns_plan(split: TokenSplit, num_special: int, weights: torch.Tensor, ranked: torch.Tensor,
                         sizes_in: torch.Tensor, size_weighted: bool, discard_preserved: bool) -> FusionPlan:
    """The plan when each sample's budget chose k sources, the first k of ``ranked`` (B, N), with their weights
    (B, M, k), built from those columns alone: every sample fuses exactly them and keeps its other sources, so all
    keep as many tokens and need no padding (a merge of one image is a few dozen small operations, each costing more
    overhead than arithmetic; the dense (B, M, N) weights and the preserved mask are made only if asked for). Each
    chosen column has a weight: the budget's τ lies strictly below its best similarity (`_below`)."""
    batch, length = sizes_in.shape
    count = weights.shape[-1]
    if batch == 1:  # one sample: its indices serve as shared ones, which index the tensors' rows directly
        fused_src = ranked[0, :count]
        fused_rows = split.src_idx.index_select(0, fused_src)
    else:
        fused_src = ranked[:, :count]
        fused_rows = _sample_rows(split.src_idx[fused_src], length)
    plan_kwargs = dict(num_special=num_special, split=split, sizes_in=sizes_in, size_weighted=size_weighted,
                       _fused_src=fused_src, _fused_rows=fused_rows, _fused_weights=weights)
    if count == 0 and not discard_preserved:
        return _identity_plan(plan_kwargs, batch, length)
    sized = weights * _take_rows(sizes_in, fused_rows).to(weights.dtype).unsqueeze(1)  # (B, M, k) w_ij n_j
    sizes_out_dst = _absorbed_sizes(split.dst(sizes_in), sized, weights.sum(dim=-2))
    if discard_preserved:
        kept = ranked.new_zeros(batch, 0)
    else:  # the sources left out by the budget, back in their own order
        kept = ranked[:, count:].sort(dim=1).values
    if size_weighted:
        plan_kwargs.update(_sized_weights=sized)
    return _uniform_plan(plan_kwargs, kept[0] if batch == 1 else kept, sizes_out_dst)


def _shares(weights: torch.Tensor) -> torch.Tensor:
    total = weights.sum(dim=-2, keepdim=True)
    return torch.where(total > 0, weights / total.clamp_min(torch.finfo(total.dtype).tiny), 0.0)


def _ragged_plan(plan_kwargs: dict, mask: torch.Tensor | None, kept_src: torch.Tensor, sizes_in: torch.Tensor,
                 sizes_dst: torch.Tensor, nothing_merged: torch.Tensor) -> FusionPlan:
    """Per-sample layout: gather each sample's real tokens to the front and pad the rest."""
    s, split = plan_kwargs["num_special"], plan_kwargs["split"]
    dst_idx, src_idx = split.dst_idx, split.src_idx
    batch = kept_src.shape[0]
    if mask is None:
        head = torch.ones(batch, s + dst_idx.numel(), dtype=torch.bool, device=kept_src.device)
    else:
        head = torch.cat([mask[:, :s], split.dst(mask)], dim=1)
    keep = torch.cat([head, kept_src], dim=1)  # (B, S + M + N) over the candidates
    lengths = keep.sum(dim=1)
    out_len = int(lengths.max())
    # A sample in which nothing merged keeps its own token order (as a batch of one would); the others get eq 10's
    # layout. Real tokens are a prefix of each sample, so original positions are valid output slots.
    original = torch.cat([torch.arange(s, device=keep.device), dst_idx, src_idx])
    out_pos = torch.where(keep, torch.where(nothing_merged.unsqueeze(1), original, keep.cumsum(dim=1) - 1), -1)
    # Scatter candidate indices to their output slots; dropped candidates go to a spare column that is cut off.
    # Slots left empty (padding) point past the candidates, at the zero row `FusionPlan.merge` appends.
    num_candidates = keep.shape[1]
    gather = torch.full((batch, out_len + 1), num_candidates, dtype=torch.long, device=keep.device)
    candidate = torch.arange(num_candidates, device=keep.device).expand(batch, -1)
    gather.scatter_(1, torch.where(keep, out_pos, out_len), candidate)
    gather = gather[:, :out_len]
    out_mask = torch.arange(out_len, device=keep.device).unsqueeze(0) < lengths.unsqueeze(1)
    candidate_sizes = torch.cat([sizes_in[:, :s], sizes_dst, split.src(sizes_in), sizes_in.new_zeros(batch, 1)], 1)
    sizes = candidate_sizes.gather(1, gather)
    rows = (gather + torch.arange(batch, device=keep.device).unsqueeze(1) * (num_candidates + 1)).view(-1)
    return FusionPlan(**plan_kwargs, sizes=sizes, mask=out_mask, _lengths=lengths, _gather_rows=rows, _out_pos=out_pos)
