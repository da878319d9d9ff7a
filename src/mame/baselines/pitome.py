"""PiToMe (Tran et al., "Accelerating Transformers with Spectrum-Preserving Token Merging", NeurIPS 2024), training-
free, on the same patched block and harness as MaMe and ToMe.

Written from the paper (section 3): the n non-special tokens are the nodes of a graph whose edges are the cosine
similarities of their features v (the attention keys averaged over heads, as ToMe). Each token's *energy* is

    E_i = (1/n) sum_j f_m(cos(v_i, v_j)),   f_m(s) = s - m if s >= m, else alpha (exp(s - m) - 1)

(their energy score, eq 4, as their release computes it: the ELU of s - m): similarities above the margin m count
in full, dissimilar tokens push the energy down by at most alpha. A token inside a large cluster of similar tokens (background, sky) has high energy and is redundant; an
isolated one has low energy and is informative. Per block, the 2r tokens of highest energy are the merge candidates;
walking them in order of decreasing energy they alternate between set A (1st, 3rd, ...) and set B (2nd, 4th, ...).
Every A token merges into its most similar B token (ToMe's bipartite soft matching, with all of A merging) by
size-weighted averaging; the n - 2r lower-energy tokens are protected and stay as they are. The margin falls with
depth, m_l = 0.9 - 0.9 l / L for block l of L (the authors' schedule: deeper tokens are more alike, so a lower bar
still tells clusters apart); alpha = 1. Proportional attention (log(size) added to the logits) is on, as in their
off-the-shelf evaluation.

Differences from their release, none of which changes which tokens merge: the output keeps the protected tokens and
the B tokens each in original order (theirs: protected in energy order, then B), and the class token and registers
are all kept out of the graph (theirs: the class token).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from mame.baselines.tome import install_timm, parse_r, row_index, sized, take_rows, unsized
from mame.blocks import TokenState
from mame.patch.options import resolve_layers
from mame.patch.timm import check_model


def energy_scores(similarity: torch.Tensor, margin: float, alpha: float = 1.0) -> torch.Tensor:
    """(B, n) energy of every token from its (B, n, n) cosine similarities: mean over j of ELU_alpha(s_ij - m)."""
    return F.elu(similarity - margin, alpha=alpha).mean(dim=-1)


def pitome_merge(x: torch.Tensor, sizes: torch.Tensor, metric: torch.Tensor, r: int, num_special: int,
                 margin: float, alpha: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge ``r`` of the non-special tokens of (B, L, d) ``x`` as PiToMe does (see the module docstring).

    Args:
        x: tokens; the ``num_special`` leading ones never merge and take no part in the energies.
        sizes: (B, L) original patches per token (the weights of the averages).
        metric: (B, L, c) features whose cosine similarities give the energies and the matching.
        r: tokens removed; at most half of the non-special tokens.
        num_special: leading tokens left alone.
        margin: m of the energy score.
        alpha: the ELU's scale below the margin.

    Returns:
        ``(x', sizes')``: [specials, protected tokens, B tokens with the A tokens merged in], each group in original
        order, and their sizes.
    """
    count = x.shape[1] - num_special
    r = min(r, count // 2)
    if r <= 0:
        return x, sizes
    with torch.no_grad():  # the choice of what merges is discrete: no gradient flows through it
        unit = F.normalize(metric[:, num_special:].float(), dim=-1)
        similarity = unit @ unit.mT
        order = energy_scores(similarity, margin, alpha).argsort(dim=1, descending=True)
        set_a = order[:, : 2 * r : 2]
        set_b = order[:, 1 : 2 * r : 2].sort(dim=1).values
        protected = order[:, 2 * r :].sort(dim=1).values
        rows = take_rows(similarity, set_a)  # (B, r, n): each A token's similarities
        target = rows.gather(2, set_b.unsqueeze(1).expand(-1, r, -1)).argmax(dim=-1)  # (B, r) position in B
    weighted = sized(x, sizes)[:, num_special:]
    merged = take_rows(weighted, set_b).scatter_add(1, row_index(target, weighted.shape[-1]),
                                                    take_rows(weighted, set_a))
    return unsized(x, sizes, torch.cat([take_rows(weighted, protected), merged], dim=1), num_special)


@dataclass(frozen=True)
class PiToMeMerge:
    """The PiToMe step of one block: merge ``r`` tokens, protecting the low-energy ones (margin ``margin``)."""

    r: int
    margin: float
    alpha: float = 1.0
    needs_keys = True

    def __call__(self, x: torch.Tensor, state: TokenState, keys: torch.Tensor | None) -> torch.Tensor:
        if state.mask is not None:
            raise ValueError("PiToMe merges the same number of tokens in every sample and cannot follow padding")
        x, sizes = pitome_merge(x, state.ones_sizes(x), keys.mean(2), self.r, state.num_special, self.margin,
                                self.alpha)
        state.sizes = sizes.detach()  # bookkeeping, see `TokenState.sizes`
        return x


def margins(margin: float | Sequence[float] | None, depth: int) -> tuple[float, ...]:
    """One margin per block: the authors' schedule 0.9 - 0.9 l / depth (None), one value for all, or one per block."""
    if margin is None:
        return tuple(0.9 - 0.9 * block / depth for block in range(depth))
    values = (margin,) * depth if isinstance(margin, (int, float)) else tuple(margin)
    if len(values) != depth or any(isinstance(m, bool) or not isinstance(m, (int, float)) or not -1 <= m <= 1
                                   for m in values):
        raise ValueError(f"margin must be None, a number in [-1, 1] or one per block ({depth}), got {margin!r}")
    return tuple(float(m) for m in values)


def patch_timm(model: nn.Module, r: int | Sequence[int] = 16, *, margin: float | Sequence[float] | None = None,
               alpha: float = 1.0, proportional_attention: bool = True,
               layers: int | Sequence[int] | None = None) -> nn.Module:
    """Apply PiToMe in place to a timm VisionTransformer: ``r`` tokens merged in each block (all blocks by default).

    Args:
        model: a timm ``VisionTransformer``; its ``num_prefix_tokens`` special tokens never merge.
        r: tokens merged per block, an int or one per block of the model (as ToMe's ``r``).
        margin: the energy margin m: None = the authors' schedule 0.9 - 0.9 l / L for block l of L, one float for
            every block, or one per block.
        alpha: the energy's ELU scale below the margin (the authors' 1).
        proportional_attention: add log(size) to the attention logits (the authors' off-the-shelf setting).
        layers: restrict merging to these blocks (int = first K); default all.
    """
    check_model(model)
    depth = len(model.blocks)
    indices = resolve_layers(depth if layers is None else layers, depth)
    rs, ms = parse_r(r, depth), margins(margin, depth)
    mergers = {i: PiToMeMerge(rs[i], ms[i], alpha) for i in indices if rs[i] > 0}
    settings = dict(method="pitome", r=rs, margin=ms, alpha=alpha, layers=indices,
                    proportional_attention=proportional_attention)
    return install_timm(model, mergers, settings, proportional_attention)
