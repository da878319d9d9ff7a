"""Tests of the MaMe operator (`mame.core`) against the paper, section 3 (eqs 1-10) and section 5 (causal merging).

Expected values come from numbers worked out by hand (in the comments) or from `naive_merge`, an independent
reference written here with plain Python loops over destinations i and sources j. That reference never calls
`mame`: it follows the equations as printed in the paper.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import mame
from mame import fusion_weights, merge, partition_indices
from mame.core import PARTITIONS

EPS = 1e-6  # the library's default epsilon of eqs 4-8
PROPERTY = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# ----------------------------------------------------------------------------------------------------------------
# Independent reference (plain loops, Python floats = float64)
# ----------------------------------------------------------------------------------------------------------------

def naive_alternating(length: int, num_special: int) -> tuple[list[int], list[int]]:
    """Eq 1 with the paper's split: odd positions (0-based after the specials) are destinations."""
    dst = [p for p in range(num_special, length) if (p - num_special) % 2 == 1]
    src = [p for p in range(num_special, length) if (p - num_special) % 2 == 0]
    return dst, src


def naive_cos(a: list[float], b: list[float]) -> float:
    """Eq 2; a cosine lies in [-1, 1] (the 1e-12 guard mirrors F.normalize for zero vectors)."""
    dot = sum(ai * bi for ai, bi in zip(a, b))
    na = max(math.sqrt(sum(v * v for v in a)), 1e-12)
    nb = max(math.sqrt(sum(v * v for v in b)), 1e-12)
    return min(1.0, max(-1.0, dot / (na * nb)))


def naive_fusion(dst, src, tau, prune=True, eps=EPS, allowed=None) -> dict:
    """Eqs 2-8 with explicit loops; returns every intermediate as an M x N (or N) list."""
    m, n = len(dst), len(src)
    zeros = lambda: [[0.0] * n for _ in range(m)]  # noqa: E731
    S, S_t, W, W_t, W_f = zeros(), zeros(), zeros(), zeros(), zeros()
    C, zeta = [0.0] * n, [0.0] * n
    for j in range(n):
        for i in range(m):
            S[i][j] = naive_cos(dst[i], src[j])  # eq 2
            S_t[i][j] = max(0.0, S[i][j] - tau)  # eq 3
            if allowed is not None and not allowed[i][j]:
                S_t[i][j] = 0.0
        col = sum(S_t[i][j] for i in range(m))
        for i in range(m):
            W[i][j] = S_t[i][j] / (col + eps)  # eq 4
        C[j] = sum(W[i][j] / (W[i][j] + eps) for i in range(m))  # eq 6
        zeta[j] = sum(W[i][j] for i in range(m)) / (C[j] + eps)  # eq 5
        for i in range(m):
            W_t[i][j] = max(0.0, W[i][j] - zeta[j])  # eq 7
        col = sum(W_t[i][j] for i in range(m))
        for i in range(m):
            W_f[i][j] = W_t[i][j] / (col + eps) if prune else W[i][j]  # eq 8 (or W itself without pruning)
    return dict(S=S, S_t=S_t, W=W, C=C, zeta=zeta, W_t=W_t, W_f=W_f)


def naive_merge(x: torch.Tensor, tau: float, num_special: int, prune: bool = True, batch_rule: str = "any",
                causal=False, sizes: torch.Tensor | None = None, size_weighted: bool = False, eps: float = EPS,
                dst_pos: list[int] | None = None, src_pos: list[int] | None = None, metric=None) -> list[dict]:
    """Eqs 1-10 and section 3.3 / 5 for a (B, L, d) batch, one dict per sample: weights W^F (M x N), preserved
    (N bools), out (list of output vectors), sizes (output sizes), shares (M x N)."""
    batch, length, _ = x.shape
    xs = x.double().tolist()
    ms = xs if metric is None else metric.double().tolist()
    ns = [[1.0] * length for _ in range(batch)] if sizes is None else sizes.double().tolist()
    if dst_pos is None:
        dst_pos, src_pos = naive_alternating(length, num_special)
    m, n = len(dst_pos), len(src_pos)
    allowed = None
    if causal == "strict":  # each source may join only the first destination after it; no pruning
        allowed = [[False] * n for _ in range(m)]
        for j, pj in enumerate(src_pos):
            later = [i for i in range(m) if dst_pos[i] > pj]
            if later:
                allowed[later[0]][j] = True
        prune = False
    weights = []
    for b in range(batch):
        w = naive_fusion([ms[b][p] for p in dst_pos], [ms[b][p] for p in src_pos], tau, prune, eps, allowed)["W_f"]
        if causal in (True, "paper"):  # section 5: W^F * M with M_ij = 1 iff source position <= destination position
            w = [[w[i][j] if src_pos[j] <= dst_pos[i] else 0.0 for j in range(n)] for i in range(m)]
        weights.append(w)
    preserved = [[sum(weights[b][i][j] for i in range(m)) == 0.0 for j in range(n)] for b in range(batch)]
    if batch_rule == "any":  # section 3.3: preserved in any sample -> preserved (and its column zeroed) everywhere
        final = [any(preserved[b][j] for b in range(batch)) for j in range(n)]
        preserved = [list(final) for _ in range(batch)]
        weights = [[[0.0 if final[j] else weights[b][i][j] for j in range(n)] for i in range(m)]
                   for b in range(batch)]
    # A sample in which nothing merged keeps its own order (documented in FusionPlan); with batch_rule "any" the
    # preserved rows are identical, so this is all samples or none.
    results = []
    for b in range(batch):
        w, xb, nb = weights[b], xs[b], ns[b]
        fused, fused_sizes = [], []
        shares = [[0.0] * n for _ in range(m)]
        for i in range(m):
            di = dst_pos[i]
            if size_weighted:
                num = [nb[di] * v for v in xb[di]]
                den = nb[di]
            else:
                num = list(xb[di])
                den = 1.0
            size_i = nb[di]
            for j in range(n):
                pj = src_pos[j]
                scale = w[i][j] * (nb[pj] if size_weighted else 1.0)
                num = [a + scale * v for a, v in zip(num, xb[pj])]  # eq 9, numerator
                den += scale  # eq 9, denominator 1 + sum_j W^F_ij
                col = sum(w[k][j] for k in range(m))
                if col > 0:
                    shares[i][j] = w[i][j] / col
                    size_i += shares[i][j] * nb[pj]
            fused.append([v / den for v in num])
            fused_sizes.append(size_i)
        kept = [j for j in range(n) if preserved[b][j]]
        out = [xb[p] for p in range(num_special)] + fused + [xb[src_pos[j]] for j in kept]  # eq 10
        out_sizes = [nb[p] for p in range(num_special)] + fused_sizes + [nb[src_pos[j]] for j in kept]
        if all(preserved[b]):
            out, out_sizes = list(xb), list(nb)
        results.append(dict(weights=w, preserved=preserved[b], out=out, sizes=out_sizes, shares=shares,
                            dst_pos=dst_pos, src_pos=src_pos))
    return results


# ----------------------------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------------------------

def dst_slot(ref_sample: dict, num_special: int, i: int) -> int:
    """Output slot of destination i: eq 10's layout, or its own position when nothing merged in the sample."""
    return ref_sample["dst_pos"][i] if all(ref_sample["preserved"]) else num_special + i


def make_tokens(seed: int, batch: int, length: int, dim: int, palette: int | None = None,
                dtype=torch.float64) -> torch.Tensor:
    """Tokens that partly merge: each one is a positive multiple of one of a few random directions, so exact
    direction duplicates (cosine 1, equal weights) mix with unrelated tokens (random cosines); for two seeds in three
    a little noise turns the duplicates into near-duplicates with distinct weights."""
    g = torch.Generator().manual_seed(seed)
    k = palette or int(torch.randint(1, length + 1, (1,), generator=g))
    directions = torch.randn(k, dim, generator=g, dtype=torch.float64)
    which = torch.randint(0, k, (batch, length), generator=g)
    scale = torch.rand(batch, length, 1, generator=g, dtype=torch.float64) * 1.5 + 0.5
    noise = (0.0, 0.03, 0.2)[seed % 3] * torch.randn(batch, length, dim, generator=g, dtype=torch.float64)
    return (directions[which] * scale + noise).to(dtype)


def real_part(y: torch.Tensor, plan, b: int) -> torch.Tensor:
    return y[b, : int(plan.lengths[b])]


def assert_matches_reference(y, plan, ref: list[dict], atol: float = 1e-9) -> None:
    """Compare a merge result with `naive_merge`: weights, preserved, tokens, sizes, lengths, padding."""
    for b, r in enumerate(ref):
        assert plan.preserved[b].tolist() == r["preserved"]
        torch.testing.assert_close(plan.weights[b].double(), torch.tensor(r["weights"], dtype=torch.float64)
                                   .reshape(plan.weights[b].shape), atol=atol, rtol=0)
        n_out = len(r["out"])
        assert int(plan.lengths[b]) == n_out
        torch.testing.assert_close(real_part(y, plan, b).double(),
                                   torch.tensor(r["out"], dtype=torch.float64).reshape(n_out, -1), atol=atol, rtol=0)
        torch.testing.assert_close(plan.sizes[b, :n_out].double(), torch.tensor(r["sizes"], dtype=torch.float64),
                                   atol=1e-5, rtol=1e-6)  # sizes are kept in float32
        if n_out < y.shape[1]:  # padding at the end: zero tokens, zero sizes, mask False
            assert plan.mask is not None
            assert not plan.mask[b, n_out:].any() and plan.mask[b, :n_out].all()
            assert (y[b, n_out:] == 0).all() and (plan.sizes[b, n_out:] == 0).all()
    if plan.mask is not None:
        assert plan.mask.shape == y.shape[:2]
        assert plan.mask.sum(1).tolist() == plan.lengths.tolist()


# ----------------------------------------------------------------------------------------------------------------
# Hand-computed case: 1 special, 2 destinations, 3 sources, d = 2
# ----------------------------------------------------------------------------------------------------------------
#
# Alternating partition over positions 1..5: destinations a = x[2], b = x[4]; sources s0 = x[1], s1 = x[3], s2 = x[5].
#   special (5, 5); s0 = (1, 1); a = (1, 0); s1 = (2, 0); b = (0, 1); s2 = (3, 4)
# Eq 2 (r = 1/sqrt 2):    S = [[r, 1, 0.6], [r, 0, 0.8]]          (rows a, b; columns s0, s1, s2)
# Eq 3, tau = 0.5:        S~ = [[r - .5, .5, .1], [r - .5, 0, .3]]
# Eq 4:                   W = [[.5, 1, .25], [.5, 0, .75]]
# Eq 6:                   C = [2, 1, 2]
# Eq 5:                   zeta = [.5, 1, .5]                     (plus O(eps): zeta_j > W_ij when all are equal)
# Eq 7:                   W~ = [[0, 0, 0], [0, 0, .25]]         s0: equal weights pruned; s1: its only weight pruned
# Eq 8:                   W^F = [[0, 0, 0], [0, 0, 1]]
# Eq 9:                   a'' = a = (1, 0);  b'' = (b + s2) / 2 = (1.5, 2.5)
# Eq 10:                  [special, a'', b'', s0, s1]
# Without pruning W^F = W, nothing is preserved:
#   a'' = (a + .5 s0 + s1 + .25 s2) / 2.75 = (4.25, 1.5) / 2.75;  b'' = (b + .5 s0 + .75 s2) / 2.25 = (2.75, 4.5) / 2.25

R = 1 / math.sqrt(2)
HAND_X = torch.tensor([[[5.0, 5.0], [1.0, 1.0], [1.0, 0.0], [2.0, 0.0], [0.0, 1.0], [3.0, 4.0]]], dtype=torch.float64)
HAND_S = [[R, 1.0, 0.6], [R, 0.0, 0.8]]
HAND_TAU = 0.5
HAND_W = [[0.5, 1.0, 0.25], [0.5, 0.0, 0.75]]
HAND_WF = [[0.0, 0.0, 0.0], [0.0, 0.0, 1.0]]


def hand_dst_src() -> tuple[torch.Tensor, torch.Tensor]:
    return HAND_X[:, [2, 4]], HAND_X[:, [1, 3, 5]]


def test_reference_intermediates_match_hand_numbers():
    """The naive reference itself reproduces every intermediate of eqs 2-8 worked out by hand."""
    dst, src = hand_dst_src()
    r = naive_fusion(dst[0].tolist(), src[0].tolist(), HAND_TAU)
    close = lambda a, b: torch.testing.assert_close(torch.tensor(a, dtype=torch.float64),  # noqa: E731
                                                    torch.tensor(b, dtype=torch.float64), atol=1e-5, rtol=0)
    close(r["S"], HAND_S)
    close(r["S_t"], [[R - 0.5, 0.5, 0.1], [R - 0.5, 0.0, 0.3]])
    close(r["W"], HAND_W)
    close(r["C"], [2.0, 1.0, 2.0])
    close(r["zeta"], [0.5, 1.0, 0.5])
    close(r["W_t"], [[0.0, 0.0, 0.0], [0.0, 0.0, 0.25]])
    close(r["W_f"], HAND_WF)
    # The pruned entries are exactly zero, not merely small: zeta exceeds the weights by O(eps).
    assert r["W_t"][0][0] == r["W_t"][1][0] == r["W_t"][0][1] == 0.0
    assert r["zeta"][0] > r["W"][0][0] and r["zeta"][1] > r["W"][0][1]


@pytest.mark.parametrize("tau", [-1.0, 0.0, 0.5])
def test_fusion_weights_eqs_2_to_4_by_hand(tau):
    """Without pruning W^F = W = ReLU(S - tau) normalised per column (eqs 2-4); three taus pin down S itself."""
    dst, src = hand_dst_src()
    s_tilde = torch.relu(torch.tensor(HAND_S, dtype=torch.float64) - tau)
    expected = s_tilde / s_tilde.sum(0, keepdim=True)
    w = fusion_weights(dst, src, tau, prune=False)
    assert w.shape == (1, 2, 3)
    torch.testing.assert_close(w[0], expected, atol=1e-5, rtol=0)


def test_fusion_weights_eqs_5_to_8_by_hand():
    dst, src = hand_dst_src()
    w = fusion_weights(dst, src, HAND_TAU)  # prune=True
    torch.testing.assert_close(w[0], torch.tensor(HAND_WF, dtype=torch.float64), atol=1e-5, rtol=0)
    assert (w[0, :, :2] == 0).all()  # exactly zero, so s0 and s1 count as preserved


def test_fusion_weights_three_destinations_by_hand():
    """d = 3, destinations e1, e2, e3, tau = 0.
    source u = (2, 2, 1): S = (2/3, 2/3, 1/3), W = (.4, .4, .2), C = 3, zeta = 1/3, W~ = (1/15, 1/15, 0),
        W^F = (.5, .5, 0): two surviving weights share the source.
    source v = (3, 1, 0): S = (3, 1, 0)/sqrt 10, W = (.75, .25, 0), C = 2, zeta = .5, W~ = (.25, 0, 0), W^F = (1, 0, 0).
    """
    dst = torch.eye(3, dtype=torch.float64).unsqueeze(0) * torch.tensor([1.0, 2.0, 3.0]).double().view(1, 3, 1)
    src = torch.tensor([[[2.0, 2.0, 1.0], [3.0, 1.0, 0.0]]], dtype=torch.float64)
    torch.testing.assert_close(fusion_weights(dst, src, 0.0, prune=False)[0],
                               torch.tensor([[0.4, 0.75], [0.4, 0.25], [0.2, 0.0]], dtype=torch.float64),
                               atol=1e-5, rtol=0)
    torch.testing.assert_close(fusion_weights(dst, src, 0.0)[0],
                               torch.tensor([[0.5, 1.0], [0.5, 0.0], [0.0, 0.0]], dtype=torch.float64),
                               atol=1e-5, rtol=0)


def test_merge_hand_case_pruned():
    y, plan = merge(HAND_X, tau=HAND_TAU, num_special=1)
    expected = torch.tensor([[[5.0, 5.0], [1.0, 0.0], [1.5, 2.5], [1.0, 1.0], [2.0, 0.0]]], dtype=torch.float64)
    torch.testing.assert_close(y, expected, atol=1e-5, rtol=0)
    assert y.dtype == torch.float64
    assert plan.dst_idx.tolist() == [2, 4] and plan.src_idx.tolist() == [1, 3, 5]
    torch.testing.assert_close(plan.weights[0], torch.tensor(HAND_WF, dtype=torch.float64), atol=1e-5, rtol=0)
    assert plan.preserved.tolist() == [[True, True, False]]  # s0: equal weights pruned; s1: single weight pruned
    torch.testing.assert_close(plan.sizes, torch.tensor([[1.0, 1.0, 2.0, 1.0, 1.0]]), atol=1e-5, rtol=0)
    assert plan.mask is None and plan.lengths.tolist() == [5]
    # source_map: special -> 0, s0 -> slot 3, a -> 1, s1 -> slot 4, b -> 2, s2 absorbed by b -> 2
    assert plan.source_map.tolist() == [[0, 3, 1, 4, 2, 2]]
    # unmerge: everyone gets its output token back, the absorbed s2 gets b''
    back = plan.unmerge(y)
    torch.testing.assert_close(back[0], torch.tensor([[5.0, 5.0], [1.0, 1.0], [1.0, 0.0], [2.0, 0.0], [1.5, 2.5],
                                                      [1.5, 2.5]], dtype=torch.float64), atol=1e-5, rtol=0)
    assert_matches_reference(y, plan, naive_merge(HAND_X, HAND_TAU, 1))


def test_merge_hand_case_without_pruning_merges_the_same_sources():
    y, plan = merge(HAND_X, tau=HAND_TAU, num_special=1, prune=False)
    a = torch.tensor([4.25, 1.5], dtype=torch.float64) / 2.75
    b = torch.tensor([2.75, 4.5], dtype=torch.float64) / 2.25
    torch.testing.assert_close(y[0], torch.stack([HAND_X[0, 0], a, b]), atol=1e-5, rtol=0)
    torch.testing.assert_close(plan.weights[0], torch.tensor(HAND_W, dtype=torch.float64), atol=1e-5, rtol=0)
    assert plan.preserved.tolist() == [[False, False, False]]
    # sizes: a = 1 + .5 + 1 + .25, b = 1 + .5 + 0 + .75
    torch.testing.assert_close(plan.sizes, torch.tensor([[1.0, 2.75, 2.25]]), atol=1e-5, rtol=0)
    sm = plan.source_map[0].tolist()
    assert sm[0] == 0 and sm[2] == 1 and sm[3] == 1 and sm[4] == 2 and sm[5] == 2
    assert sm[1] in (1, 2)  # s0 is split 50/50 between a and b
    assert_matches_reference(y, plan, naive_merge(HAND_X, HAND_TAU, 1, prune=False))


def test_merge_hand_case_size_weighted():
    """With sizes n = (1, 1, 1, 1, 3, 1), b'' = (3 b + 1 s2) / (3 + 1) = (0.75, 1.75); other tokens unchanged."""
    sizes = torch.tensor([[1.0, 1.0, 1.0, 1.0, 3.0, 1.0]])
    y, plan = merge(HAND_X, tau=HAND_TAU, num_special=1, sizes=sizes, size_weighted=True)
    expected = torch.tensor([[5.0, 5.0], [1.0, 0.0], [0.75, 1.75], [1.0, 1.0], [2.0, 0.0]], dtype=torch.float64)
    torch.testing.assert_close(y[0], expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(plan.sizes, torch.tensor([[1.0, 1.0, 4.0, 1.0, 1.0]]), atol=1e-5, rtol=0)
    # Without size weighting the same sizes are only carried forward: b'' = (b + s2) / 2 as in eq 9.
    y_plain, plan_plain = merge(HAND_X, tau=HAND_TAU, num_special=1, sizes=sizes)
    torch.testing.assert_close(y_plain[0, 2], torch.tensor([1.5, 2.5], dtype=torch.float64), atol=1e-5, rtol=0)
    torch.testing.assert_close(plan_plain.sizes, plan.sizes)


def test_merge_hand_case_discard_preserved():
    y, plan = merge(HAND_X, tau=HAND_TAU, num_special=1, discard_preserved=True)
    torch.testing.assert_close(y[0], torch.tensor([[5.0, 5.0], [1.0, 0.0], [1.5, 2.5]], dtype=torch.float64),
                               atol=1e-5, rtol=0)
    assert plan.source_map[0].tolist() == [0, -1, 1, -1, 2, 2]


def test_merge_uses_metric_for_similarity_and_x_for_values():
    """metric= decides the weights; the fused values are still made of x."""
    values = torch.randn(1, 6, 5, dtype=torch.float64)
    y, plan = merge(values, tau=HAND_TAU, num_special=1, metric=HAND_X)
    assert_matches_reference(y, plan, naive_merge(values, HAND_TAU, 1, metric=HAND_X))
    torch.testing.assert_close(y[0, 2], (values[0, 4] + values[0, 5]) / 2, atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------------------------------------------
# tau = 1 and tau = -1
# ----------------------------------------------------------------------------------------------------------------

def _multiples_of_one_direction(batch=4, length=65, dim=16, seed=0, dtype=torch.float32):
    """Positive multiples of one vector: every cosine is 1 mathematically, but float32 rounding of normalize + dot
    lands a little above 1 for some pairs."""
    g = torch.Generator().manual_seed(seed)
    v = torch.randn(batch, 1, dim, generator=g)
    return (v * (torch.rand(batch, length, 1, generator=g) + 0.5)).to(dtype)


@pytest.mark.parametrize("batch_rule", ["any", "per_sample"])
@pytest.mark.parametrize("prune", [True, False])
@pytest.mark.parametrize("partition", ["alternating", "sequential", "random"])
def test_tau_one_merges_nothing(partition, prune, batch_rule):
    """tau = 1: S~ = ReLU(S - 1) = 0 because a cosine never exceeds 1, so nothing merges, even among parallel tokens.
    When nothing merges in any sample the output is x itself, exactly and in its own order (not eq 10's layout);
    unmerge restores x and the source map is the identity."""
    x = _multiples_of_one_direction()
    y, plan = merge(x, tau=1.0, num_special=1, partition=partition, prune=prune, batch_rule=batch_rule)
    assert (plan.weights == 0).all()
    assert plan.preserved.all()
    assert torch.equal(y, x)
    assert torch.equal(plan.merge(x * 2), x * 2)
    assert torch.equal(plan.unmerge(y), x)
    assert plan.lengths.tolist() == [x.shape[1]] * x.shape[0]
    assert torch.equal(plan.sizes, torch.ones_like(plan.sizes))
    assert torch.equal(plan.source_map, torch.arange(x.shape[1]).expand(x.shape[0], -1))


def test_tau_minus_one_identical_tokens():
    """tau = -1, identical tokens: S = 1, S~ = 2 everywhere, W_ij = 2 / (2M + eps) for every i.
    prune=False: every source is absorbed, the output has num_special + M tokens, all equal to the token, and each
      destination stands for 1 + N/M tokens.
    prune=True: each column holds M equal non-zero weights, zeta_j exceeds them by O(eps), eqs 5-7 prune them all,
      so the paper's equations preserve every source and nothing merges (output = x permuted as in eq 10)."""
    token = torch.tensor([0.3, -1.2, 2.0], dtype=torch.float64)
    x = token.expand(2, 1 + 8, 3).clone()  # 1 special, M = 4 destinations, N = 4 sources
    y, plan = merge(x, tau=-1.0, num_special=1, prune=False)
    assert y.shape == (2, 1 + 4, 3)
    assert not plan.preserved.any()
    torch.testing.assert_close(y, token.expand(2, 5, 3), atol=1e-12, rtol=0)
    torch.testing.assert_close(plan.weights, torch.full((2, 4, 4), 0.25, dtype=torch.float64), atol=1e-6, rtol=0)
    torch.testing.assert_close(plan.sizes, torch.tensor([[1.0, 2.0, 2.0, 2.0, 2.0]] * 2), atol=1e-6, rtol=0)

    y, plan = merge(x, tau=-1.0, num_special=1, prune=True)
    assert y.shape == x.shape and plan.preserved.all() and (plan.weights == 0).all()
    assert torch.equal(plan.unmerge(y), x)


# ----------------------------------------------------------------------------------------------------------------
# Partition (eq 1)
# ----------------------------------------------------------------------------------------------------------------

def test_partition_alternating_odd_positions_are_destinations():
    dst, src = partition_indices(2 + 7, num_special=2)
    assert dst.tolist() == [3, 5, 7]  # 0-based positions 1, 3, 5 after the two specials
    assert src.tolist() == [2, 4, 6, 8]
    assert dst.dtype == torch.long and src.dtype == torch.long


def test_partition_sequential():
    dst, src = partition_indices(1 + 6, num_special=1, partition="sequential")
    assert dst.tolist() == [1, 2, 3] and src.tolist() == [4, 5, 6]


@pytest.mark.parametrize("partition, expected_dst", [
    ("alternating", [4, 8]),  # every 4th token (0-based 3, 7 after the special)
    ("sequential", [1, 2]),  # the first quarter
])
def test_partition_dst_ratio_quarter(partition, expected_dst):
    dst, src = partition_indices(1 + 8, num_special=1, partition=partition, dst_ratio=0.25)
    assert dst.tolist() == expected_dst
    assert sorted(dst.tolist() + src.tolist()) == list(range(1, 9))


def test_partition_random_seeded_deterministic_and_rng_neutral():
    length, special = 1 + 37, 1  # an unusual length so that nothing is cached yet
    torch.manual_seed(123)
    state = torch.get_rng_state()
    dst, src = partition_indices(length, special, "random", seed=2024)
    assert torch.equal(torch.get_rng_state(), state)  # the global RNG stream is untouched
    dst2, src2 = partition_indices(length, special, "random", seed=2024)
    assert torch.equal(dst, dst2) and torch.equal(src, src2)
    assert dst.numel() == round(37 * 0.5) and src.numel() == 37 - dst.numel()
    assert sorted(dst.tolist() + src.tolist()) == list(range(1, length))
    assert dst.tolist() == sorted(dst.tolist()) and src.tolist() == sorted(src.tolist())
    others = {tuple(partition_indices(length, special, "random", seed=s)[0].tolist()) for s in range(5)}
    assert len(others) > 1  # the seed matters
    quarter, _ = partition_indices(length, special, "random", dst_ratio=0.25, seed=7)
    assert quarter.numel() == round(37 * 0.25)
    # merge() uses the same partition and leaves the RNG alone as well
    x = make_tokens(1, 2, length, 4)
    state = torch.get_rng_state()
    _, plan = merge(x, tau=0.5, partition="random", seed=2024)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(plan.dst_idx, dst) and torch.equal(plan.src_idx, src)


# ----------------------------------------------------------------------------------------------------------------
# Batch rules (section 3.3)
# ----------------------------------------------------------------------------------------------------------------

def test_batch_rule_any_preserves_everywhere():
    """Sample 0 is the hand case (s1 preserved); in sample 1, s1 = (1, 1) is close to both destinations with
    different cosines, so alone it would merge. The rule "any" keeps s1 in both samples and zeroes its column."""
    other = HAND_X.clone()
    other[0, 3] = torch.tensor([1.0, 0.6], dtype=torch.float64)  # cos with a = .857, with b = .514: W = (.92, .08)
    x = torch.cat([HAND_X, other])
    _, alone = merge(other, tau=HAND_TAU, num_special=1)
    assert not alone.preserved[0, 1]  # merged when on its own
    y, plan = merge(x, tau=HAND_TAU, num_special=1, batch_rule="any")
    assert plan.preserved[:, 1].all()
    assert (plan.weights[:, :, 1] == 0).all()
    assert (plan.preserved[0] == plan.preserved[1]).all()
    assert y.shape[1] == plan.sizes.shape[1] and plan.lengths.tolist() == [y.shape[1]] * 2
    torch.testing.assert_close(y[1, 4], other[0, 3])  # the preserved s1 kept as it is
    assert_matches_reference(y, plan, naive_merge(x, HAND_TAU, 1, batch_rule="any"))
    # per_sample keeps each sample's own decision
    y2, plan2 = merge(x, tau=HAND_TAU, num_special=1, batch_rule="per_sample")
    assert plan2.preserved[:, 1].tolist() == [True, False]
    assert_matches_reference(y2, plan2, naive_merge(x, HAND_TAU, 1, batch_rule="per_sample"))


token_setup = dict(
    seed=st.integers(0, 2**31 - 1),
    batch=st.integers(1, 4),
    length=st.integers(2, 14),
    dim=st.integers(2, 4),
    tau=st.floats(0.05, 0.95),
    num_special=st.integers(0, 2),
)


@PROPERTY
@given(**token_setup, prune=st.booleans(), batch_rule=st.sampled_from(["any", "per_sample"]))
def test_merge_matches_naive_reference(seed, batch, length, dim, tau, num_special, prune, batch_rule):
    num_special = min(num_special, length - 1)
    x = make_tokens(seed, batch, length, dim)
    y, plan = merge(x, tau=tau, num_special=num_special, prune=prune, batch_rule=batch_rule)
    assert_matches_reference(y, plan, naive_merge(x, tau, num_special, prune, batch_rule))
    if batch_rule == "any":
        assert plan.mask is None and (plan.preserved == plan.preserved[:1]).all()
        assert (plan.weights * plan.preserved.unsqueeze(1) == 0).all()


@PROPERTY
@given(**token_setup, partition=st.sampled_from(["alternating", "sequential", "random"]))
def test_per_sample_equals_batch_of_one(seed, batch, length, dim, tau, num_special, partition):
    num_special = min(num_special, length - 1)
    x = make_tokens(seed, batch, length, dim)
    y, plan = merge(x, tau=tau, num_special=num_special, partition=partition, batch_rule="per_sample")
    assert y.shape[0] == batch and y.shape[1] == int(plan.lengths.max())
    for b in range(batch):
        yb, pb = merge(x[b : b + 1], tau=tau, num_special=num_special, partition=partition)
        n = yb.shape[1]
        assert int(plan.lengths[b]) == n
        torch.testing.assert_close(y[b, :n], yb[0], atol=1e-12, rtol=0)
        assert (y[b, n:] == 0).all() and (plan.sizes[b, n:] == 0).all()
        torch.testing.assert_close(plan.sizes[b, :n], pb.sizes[0])
        torch.testing.assert_close(plan.weights[b], pb.weights[0], atol=1e-12, rtol=0)
        assert torch.equal(plan.preserved[b], pb.preserved[0])
        assert torch.equal(plan.source_map[b], pb.source_map[0])
        if plan.mask is not None:
            assert plan.mask[b].tolist() == [True] * n + [False] * (y.shape[1] - n)
    if plan.mask is None:  # every sample kept the same number of tokens
        assert len(set(plan.lengths.tolist())) == 1


# ----------------------------------------------------------------------------------------------------------------
# FusionPlan: merge, unmerge, sizes, source map
# ----------------------------------------------------------------------------------------------------------------

@PROPERTY
@given(**token_setup, batch_rule=st.sampled_from(["any", "per_sample"]), with_sizes=st.booleans())
def test_plan_sizes_source_map_and_unmerge(seed, batch, length, dim, tau, num_special, batch_rule, with_sizes):
    num_special = min(num_special, length - 1)
    x = make_tokens(seed, batch, length, dim)
    g = torch.Generator().manual_seed(seed)
    sizes = torch.randint(1, 6, (batch, length), generator=g).float() if with_sizes else None
    y, plan = merge(x, tau=tau, num_special=num_special, batch_rule=batch_rule, sizes=sizes)
    ref = naive_merge(x, tau, num_special, batch_rule=batch_rule, sizes=sizes)

    assert torch.equal(plan.merge(x), y)
    total_in = torch.ones(batch, length).sum(1) if sizes is None else sizes.sum(1)
    torch.testing.assert_close(plan.sizes.sum(1), total_in, atol=1e-4, rtol=1e-5)  # nothing lost, nothing made
    assert torch.equal(plan.sizes_in, torch.ones(batch, length) if sizes is None else sizes)
    for b, r in enumerate(ref):
        torch.testing.assert_close(plan.sizes[b, : len(r["sizes"])], torch.tensor(r["sizes"], dtype=torch.float32),
                                   atol=1e-5, rtol=1e-5)

    # source_map: specials to themselves, destinations to their fused token, preserved sources to their own slot,
    # absorbed sources to the destination holding the largest share.
    sm = plan.source_map
    m = len(ref[0]["dst_pos"])
    for b, r in enumerate(ref):
        for p in range(num_special):
            assert sm[b, p] == p
        for i, p in enumerate(r["dst_pos"]):
            assert sm[b, p] == dst_slot(r, num_special, i)
        for j, p in enumerate(r["src_pos"]):
            if r["preserved"][j]:
                assert torch.equal(y[b, sm[b, p]], x[b, p])
            else:
                col = [r["weights"][i][j] for i in range(m)]
                chosen = int(sm[b, p]) - num_special
                assert 0 <= chosen < m and col[chosen] >= max(col) - 1e-12

    # unmerge: every input position receives its own output token, absorbed sources the share-weighted
    # average of their destinations (naive loops over i, j).
    t = torch.randn(batch, y.shape[1], 3, generator=g, dtype=torch.float64)
    back = plan.unmerge(t)
    assert back.shape == (batch, length, 3)
    for b, r in enumerate(ref):
        for p in range(num_special):
            torch.testing.assert_close(back[b, p], t[b, p])
        for i, p in enumerate(r["dst_pos"]):
            torch.testing.assert_close(back[b, p], t[b, dst_slot(r, num_special, i)])
        for j, p in enumerate(r["src_pos"]):
            if r["preserved"][j]:
                expected = t[b, sm[b, p]]
            else:
                expected = sum(r["shares"][i][j] * t[b, num_special + i] for i in range(m))
            torch.testing.assert_close(back[b, p], expected, atol=1e-9, rtol=0)


@PROPERTY
@given(**token_setup, batch_rule=st.sampled_from(["any", "per_sample"]))
def test_unmerge_inverts_merge_when_nothing_merges(seed, batch, length, dim, tau, num_special, batch_rule):
    num_special = min(num_special, length - 1)
    x = make_tokens(seed, batch, length, dim)
    t = torch.randn(batch, length, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    _, plan = merge(x, tau=1.0, num_special=num_special, batch_rule=batch_rule)
    assert torch.equal(plan.unmerge(plan.merge(t)), t)
    assert torch.equal(plan.unmerge(plan.merge(t[..., 0])), t[..., 0])  # (B, L) tensors too


def test_size_weighted_with_unit_sizes_equals_default():
    x = make_tokens(2, 3, 15, 3)
    y0, p0 = merge(x, tau=0.4)
    y1, p1 = merge(x, tau=0.4, size_weighted=True)
    y2, _ = merge(x, tau=0.4, size_weighted=True, sizes=torch.ones(3, 15))
    assert (~p0.preserved).any() and p0.preserved.any()  # the example does merge something
    torch.testing.assert_close(y1, y0, atol=1e-12, rtol=0)
    torch.testing.assert_close(y2, y0, atol=1e-12, rtol=0)


@PROPERTY
@given(**token_setup)
def test_size_weighted_matches_reference(seed, batch, length, dim, tau, num_special):
    """fused_i = (n_i x_i + sum_j W^F_ij n_j x_j) / (n_i + sum_j W^F_ij n_j)."""
    num_special = min(num_special, length - 1)
    x = make_tokens(seed, batch, length, dim)
    sizes = torch.randint(1, 9, (batch, length), generator=torch.Generator().manual_seed(seed)).double()
    y, plan = merge(x, tau=tau, num_special=num_special, sizes=sizes, size_weighted=True, batch_rule="per_sample")
    assert_matches_reference(y, plan, naive_merge(x, tau, num_special, batch_rule="per_sample", sizes=sizes,
                                                  size_weighted=True))


# ----------------------------------------------------------------------------------------------------------------
# Causal merging (section 5)
# ----------------------------------------------------------------------------------------------------------------

@PROPERTY
@given(**token_setup, batch_rule=st.sampled_from(["any", "per_sample"]), cut=st.integers(0, 13),
       causal=st.sampled_from([True, "paper"]))
def test_causal_paper_never_absorbs_a_later_source(seed, batch, length, dim, tau, num_special, batch_rule, cut,
                                                   causal):
    num_special = min(num_special, length - 1)
    x = make_tokens(seed, batch, length, dim)
    y, plan = merge(x, tau=tau, num_special=num_special, batch_rule=batch_rule, causal=causal)
    assert_matches_reference(y, plan, naive_merge(x, tau, num_special, batch_rule=batch_rule, causal="paper"))
    later = plan.src_idx.view(1, 1, -1) > plan.dst_idx.view(1, -1, 1)
    assert (plan.weights * later == 0).all()  # every non-zero W^F[b, i, j] has src position <= dst position

    # Fused destination i only depends on sources at or before it: perturb every source after `cut` and the
    # destinations at or before `cut` (and the columns of sources at or before it) stay the same.
    perturbed = x.clone()
    late_src = plan.src_idx[plan.src_idx > cut]
    perturbed[:, late_src] = torch.randn(batch, late_src.numel(), dim, dtype=x.dtype,
                                         generator=torch.Generator().manual_seed(seed + 1))
    y2, plan2 = merge(perturbed, tau=tau, num_special=num_special, batch_rule=batch_rule, causal=causal)
    early_dst = (plan.dst_idx <= cut).nonzero().squeeze(-1)
    early_src = (plan.src_idx <= cut).nonzero().squeeze(-1)
    for b in range(batch):  # compare each early destination's output token, wherever the layout puts it
        for p in plan.dst_idx[early_dst].tolist():
            torch.testing.assert_close(y2[b, plan2.source_map[b, p]], y[b, plan.source_map[b, p]], atol=1e-12, rtol=0)
    torch.testing.assert_close(plan2.weights[:, early_dst], plan.weights[:, early_dst], atol=1e-12, rtol=0)
    torch.testing.assert_close(plan2.weights[:, :, early_src], plan.weights[:, :, early_src], atol=1e-12, rtol=0)


def test_causal_paper_keeps_sources_and_is_not_prefix_causal():
    """[special, s0, a, s1, b], tau = .6, no pruning. s0 (position 1) resembles both later destinations a (2) and
    b (4) and is split between them. s1 (3) resembles only the earlier a (cos .89; with b .54 < tau), which may not
    absorb it: it is preserved, not lost. The paper's variant normalises s0's column over all destinations, so the
    later b changes a'' (documented: not prefix-causal), while "strict" gives s0 to a alone in both runs."""
    x = torch.tensor([[[0.0, 1.0], [1.0, 0.3], [1.0, 0.0], [1.0, -0.5], [1.0, 0.6]]], dtype=torch.float64)
    y, plan = merge(x, tau=0.6, num_special=1, causal=True, prune=False)
    assert plan.preserved[0].tolist() == [False, True]
    assert y.shape[1] == 1 + 2 + 1 and torch.equal(y[0, 3], x[0, 3])
    assert (plan.weights[0, :, 0] > 0.4).all()  # s0 split between a and b
    assert_matches_reference(y, plan, naive_merge(x, 0.6, 1, prune=False, causal="paper"))
    y_prefix, _ = merge(x[:, :3], tau=0.6, num_special=1, causal=True, prune=False)
    torch.testing.assert_close(y_prefix[0, 1], (x[0, 2] + x[0, 1]) / 2, atol=1e-5, rtol=0)
    assert not torch.allclose(y_prefix[0, 1], y[0, 1], atol=1e-3)
    y_strict, _ = merge(x, tau=0.6, num_special=1, causal="strict")
    y_strict_prefix, _ = merge(x[:, :3], tau=0.6, num_special=1, causal="strict")
    torch.testing.assert_close(y_strict[0, 1], y_strict_prefix[0, 1], atol=1e-12, rtol=0)


@PROPERTY
@given(**token_setup, batch_rule=st.sampled_from(["any", "per_sample"]), prefix=st.integers(1, 13))
def test_causal_strict_prefix_property(seed, batch, length, dim, tau, num_special, batch_rule, prefix):
    num_special = min(num_special, length - 1)
    prefix = min(max(prefix, num_special + 1), length)
    x = make_tokens(seed, batch, length, dim)
    y, plan = merge(x, tau=tau, num_special=num_special, batch_rule=batch_rule, causal="strict")
    assert_matches_reference(y, plan, naive_merge(x, tau, num_special, batch_rule=batch_rule, causal="strict"))
    # each source has at most one candidate: the nearest destination after it
    nearest = torch.searchsorted(plan.dst_idx, plan.src_idx)
    allowed = torch.arange(plan.dst_idx.numel()).unsqueeze(1) == nearest.unsqueeze(0)
    assert (plan.weights * ~allowed == 0).all()

    yp, planp = merge(x[:, :prefix], tau=tau, num_special=num_special, batch_rule=batch_rule, causal="strict")
    mp = planp.dst_idx.numel()
    assert torch.equal(planp.dst_idx, plan.dst_idx[:mp])
    # Tokens fully inside the prefix: specials, destinations before `prefix`, and sources whose destination is
    # before `prefix`. They have the same weights, the same preserved flag and the same output token.
    inside = [j for j in range(planp.src_idx.numel()) if int(nearest[j]) < mp]
    torch.testing.assert_close(planp.weights[:, :, inside], plan.weights[:, :mp, inside], atol=1e-12, rtol=0)
    assert torch.equal(planp.preserved[:, inside], plan.preserved[:, inside])
    full_positions = list(range(num_special)) + plan.dst_idx[:mp].tolist() + plan.src_idx[inside].tolist()
    for b in range(batch):
        for p in full_positions:
            sp, sf = int(planp.source_map[b, p]), int(plan.source_map[b, p])
            assert (sp < 0) == (sf < 0)
            if sp >= 0:
                torch.testing.assert_close(yp[b, sp], y[b, sf], atol=1e-12, rtol=0)


# ----------------------------------------------------------------------------------------------------------------
# Padded input (mask=)
# ----------------------------------------------------------------------------------------------------------------

@PROPERTY
@given(**token_setup, data=st.data())
def test_padded_input_equals_unpadded_runs(seed, batch, length, dim, tau, num_special, data):
    num_special = min(num_special, length - 1)
    real = [data.draw(st.integers(num_special + 1, length)) for _ in range(batch)]
    x = make_tokens(seed, batch, length, dim)
    mask = torch.tensor([[p < n for p in range(length)] for n in real])
    padded = x.masked_fill(~mask.unsqueeze(-1), 1e3)  # loud padding that would merge with nothing sensible
    y, plan = merge(padded, tau=tau, num_special=num_special, batch_rule="per_sample", mask=mask)
    assert plan.mask is not None and plan.mask.shape == y.shape[:2]
    for b in range(batch):
        yb, pb = merge(x[b : b + 1, : real[b]], tau=tau, num_special=num_special)
        n = yb.shape[1]
        assert int(plan.lengths[b]) == n and plan.mask[b].sum() == n
        torch.testing.assert_close(y[b, :n], yb[0], atol=1e-12, rtol=0)
        assert (y[b, n:] == 0).all()
        torch.testing.assert_close(plan.sizes[b, :n], pb.sizes[0])
        assert (plan.sizes[b, n:] == 0).all()
        torch.testing.assert_close(plan.sizes[b].sum(), torch.tensor(float(real[b])))
        assert (plan.source_map[b, real[b]:] == -1).all()
        assert torch.equal(plan.source_map[b, : real[b]], pb.source_map[0])
    back = plan.unmerge(y)
    assert (back[~mask] == 0).all()
    if batch == 1:  # with a single sample the paper's rule gives the same result
        y_any, _ = merge(padded, tau=tau, num_special=num_special, mask=mask)
        torch.testing.assert_close(y_any, y, atol=0, rtol=0)


@PROPERTY
@given(**token_setup, data=st.data(), partition=st.sampled_from(PARTITIONS), stride=st.integers(2, 4),
       prune=st.booleans(), size_weighted=st.booleans(), causal=st.sampled_from([False, "paper", "strict"]),
       discard_preserved=st.booleans(), padded=st.booleans(), with_sizes=st.booleans())
def test_per_sample_equals_batch_of_one_over_two_merges(seed, batch, length, dim, tau, num_special, data, partition,
                                                        stride, prune, size_weighted, causal, discard_preserved,
                                                        padded, with_sizes):
    """Two merges in a row, as in a patched model: the second one sees the ragged output of the first. Every
    sample's tokens, sizes and source map equal those it gets alone, for every option; a partition that cannot
    promise this (it depends on the padded length) is refused with a ValueError instead."""
    num_special = min(num_special, length - 1)
    x = make_tokens(seed, batch, length, dim)
    real = [data.draw(st.integers(num_special + 1, length)) if padded else length for _ in range(batch)]
    mask = torch.tensor([[p < n for p in range(length)] for n in real]) if padded else None
    sizes = None
    if with_sizes:
        sizes = 1 + torch.rand(batch, length, dtype=x.dtype, generator=torch.Generator().manual_seed(seed))
        sizes = sizes if mask is None else sizes * mask
    options = dict(tau=tau, num_special=num_special, partition=partition, prune=prune, causal=causal,
                   dst_ratio=1 / stride, size_weighted=size_weighted, discard_preserved=discard_preserved)
    if partition != "alternating":
        if mask is not None:
            with pytest.raises(ValueError, match="cannot take a padding mask"):
                merge(x, mask=mask, sizes=sizes, batch_rule="per_sample", **options)
            return
        options["dst_ratio"] = 0.5
    y1, plan1 = merge(x, mask=mask, sizes=sizes, batch_rule="per_sample", **options)
    assume(bool((plan1.lengths > num_special).all()))  # discard_preserved can leave nothing to merge a second time
    if plan1.mask is not None and partition != "alternating":
        with pytest.raises(ValueError, match="cannot take a padding mask"):
            merge(y1, mask=plan1.mask, sizes=plan1.sizes, batch_rule="per_sample", **options)
        return
    y2, plan2 = merge(y1, mask=plan1.mask, sizes=plan1.sizes, batch_rule="per_sample", **options)
    for b in range(batch):
        alone_sizes = None if sizes is None else sizes[b : b + 1, : real[b]]
        a1, p1 = merge(x[b : b + 1, : real[b]], sizes=alone_sizes, **options)
        a2, p2 = merge(a1, sizes=p1.sizes, **options)
        n = a2.shape[1]
        assert int(plan2.lengths[b]) == n
        torch.testing.assert_close(y2[b, :n], a2[0], atol=1e-12, rtol=0)
        torch.testing.assert_close(plan2.sizes[b, :n], p2.sizes[0], atol=1e-12, rtol=0)
        assert torch.equal(plan2.source_map[b, : p1.num_tokens_out], p2.source_map[0])


# ----------------------------------------------------------------------------------------------------------------
# Gradients and low precision
# ----------------------------------------------------------------------------------------------------------------

# 1 special + 3 destinations (x[2], x[4], x[6]) + 3 sources (x[1], x[3], x[5]), d = 3, tau = 0.3. Chosen so that every
# |S - tau| and every |W - zeta| (for non-zero W) is at least 1e-2: far from the ReLU kinks at finite-difference
# scale. Sample 0: s0 merges, s2 is split between two destinations (W^F = .52 / .48), s1 is preserved (its single
# non-zero weight is pruned). Sample 1: every source merges (s1 split .71 / .29), so "any" preserves s1 in both
# samples while "per_sample" keeps it in sample 0 only.
GRAD_X = torch.tensor([
    [[0.3, 0.2, 0.9], [1.0, 0.7, 0.0], [1.0, 0.1, 0.2], [-1.0, 1.0, -1.0], [0.1, 1.0, 0.1], [1.0, 1.0, 0.3],
     [0.2, 0.1, 1.0]],
    [[0.5, -0.2, 0.4], [0.1, 0.2, 1.0], [1.1, 0.0, 0.3], [0.9, 0.8, 0.1], [0.0, 1.2, -0.1], [1.0, 0.2, 0.8],
     [0.3, 0.2, 1.1]],
], dtype=torch.float64)


def _assert_away_from_kinks(x: torch.Tensor, tau: float, margin: float = 1e-2) -> None:
    dst_pos, src_pos = naive_alternating(x.shape[1], 1)
    for b in range(x.shape[0]):
        r = naive_fusion([x[b, p].tolist() for p in dst_pos], [x[b, p].tolist() for p in src_pos], tau)
        for j in range(len(src_pos)):
            nonzero = [i for i in range(len(dst_pos)) if r["W"][i][j] > 0]
            for i in range(len(dst_pos)):
                assert abs(r["S"][i][j] - tau) > margin
            if len(nonzero) == 1:  # W - zeta ~ -eps^2 (1 - S~) / S~: its sign is safe while S~ < 1 - eps
                assert r["S_t"][nonzero[0]][j] < 1 - margin
            else:
                assert all(abs(r["W"][i][j] - r["zeta"][j]) > margin for i in nonzero)


@pytest.mark.parametrize("batch_rule", ["any", "per_sample"])
def test_gradcheck(batch_rule):
    tau = 0.3
    _assert_away_from_kinks(GRAD_X, tau)
    _, plan = merge(GRAD_X, tau=tau, num_special=1, batch_rule=batch_rule)
    assert plan.preserved.any() and (~plan.preserved).any()  # both kinds of sources present
    assert ((plan.weights > 0.05).sum(1) >= 2).any()  # some source is split between destinations
    if batch_rule == "per_sample":
        assert not torch.equal(plan.preserved[0], plan.preserved[1])
    x = GRAD_X.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda t: merge(t, tau=tau, num_special=1, batch_rule=batch_rule)[0], (x,),
                                    eps=1e-6, atol=1e-5)


@pytest.mark.parametrize("dtype, atol", [(torch.float16, 1e-2), (torch.bfloat16, 5e-2)])
@pytest.mark.parametrize("batch_rule", ["any", "per_sample"])
def test_half_precision(dtype, atol, batch_rule):
    x = make_tokens(2, 3, 33, 8, palette=6, dtype=torch.float32)
    x_low = x.to(dtype)
    y, plan = merge(x_low, tau=0.6, batch_rule=batch_rule)
    y_ref, plan_ref = merge(x_low.float(), tau=0.6, batch_rule=batch_rule)  # same inputs, float32 arithmetic
    assert y.dtype == dtype
    assert not torch.isnan(y).any() and not torch.isnan(plan.weights).any()
    assert (~plan.preserved).any()  # something merged
    assert y.shape == y_ref.shape and torch.equal(plan.preserved, plan_ref.preserved)
    torch.testing.assert_close(y.float(), y_ref, atol=atol, rtol=atol)
    y_hand, _ = merge(HAND_X.to(dtype), tau=HAND_TAU)
    torch.testing.assert_close(y_hand.double(), torch.tensor([[[5.0, 5.0], [1.0, 0.0], [1.5, 2.5], [1.0, 1.0],
                                                               [2.0, 0.0]]], dtype=torch.float64), atol=atol, rtol=0)


# ----------------------------------------------------------------------------------------------------------------
# Bad input
# ----------------------------------------------------------------------------------------------------------------

X_OK = torch.randn(2, 5, 3)


def _with_inf(x: torch.Tensor) -> torch.Tensor:
    x = x.clone()
    x[0, 1, 2] = float("-inf")
    return x


def _with_nan(x: torch.Tensor) -> torch.Tensor:
    x = x.clone()
    x[1, 2, 0] = float("nan")
    return x


@pytest.mark.parametrize("kwargs, error, pattern", [
    (dict(x=torch.randn(5, 3)), ValueError, r"\bx\b.*3-D"),
    (dict(x=torch.randn(1, 2, 5, 3)), ValueError, r"\bx\b.*3-D"),
    (dict(x=[[[1.0]]]), TypeError, r"\bx\b"),
    (dict(x=torch.ones(2, 5, 3, dtype=torch.long)), TypeError, r"\bx\b.*floating"),
    (dict(x=torch.ones(2, 5, 3, dtype=torch.int32)), TypeError, r"\bx\b.*floating"),
    (dict(x=_with_nan(X_OK)), ValueError, r"\bx\b.*NaN"),
    (dict(num_special=5), ValueError, "num_special"),
    (dict(num_special=7), ValueError, "num_special"),
    (dict(num_special=-1), ValueError, "num_special"),
    (dict(tau=1.01), ValueError, "tau"),
    (dict(tau=-1.5), ValueError, "tau"),
    (dict(tau=float("nan")), ValueError, "tau"),
    (dict(partition="checkerboard"), ValueError, "partition"),
    (dict(batch_rule="all"), ValueError, "batch_rule"),
    (dict(causal="future"), ValueError, "causal"),
    (dict(dst_ratio=0.0), ValueError, "dst_ratio"),
    (dict(mask=torch.ones(2, 5)), TypeError, "mask"),
    (dict(mask=torch.ones(2, 4, dtype=torch.bool)), ValueError, "mask"),
    (dict(sizes=torch.ones(2, 6)), ValueError, "sizes"),
    (dict(x=_with_inf(X_OK)), ValueError, r"\bx\b.*Inf"),
    (dict(tau=True), TypeError, "tau"),
    (dict(tau="0.8"), TypeError, "tau"),
    (dict(num_special=True), ValueError, "num_special"),
    (dict(dst_ratio=0.9), ValueError, r"dst_ratio.*1/k"),
    (dict(dst_ratio=0.3), ValueError, r"dst_ratio.*1/k"),
    (dict(dst_ratio=True, partition="sequential"), ValueError, "dst_ratio"),
    (dict(mask=torch.tensor([[True] * 5, [True, False, False, False, False]]), num_special=2), ValueError,
     r"mask.*rows \[1\] have none"),
    (dict(mask=torch.tensor([[True] * 5, [False] * 5])), ValueError, r"mask.*rows \[1\] have none"),
    (dict(mask=torch.tensor([[True] * 5, [True, False, True, True, False]])), ValueError,
     r"mask.*rows \[1\] are not a prefix"),
    (dict(mask=torch.tensor([[True] * 5, [True] * 3 + [False] * 2]), partition="sequential"), ValueError,
     r"partition='sequential' cannot take a padding mask"),
    (dict(sizes=torch.tensor([[1.0, -1.0, 1, 1, 1], [1.0] * 5])), ValueError, r"sizes.*non-negative"),
    (dict(sizes=torch.tensor([[1.0, float("nan"), 1, 1, 1], [1.0] * 5])), ValueError, r"sizes.*finite"),
    (dict(sizes=torch.tensor([[1.0, 0.0, 1, 1, 1], [1.0] * 5])), ValueError, r"sizes.*positive on real tokens"),
    (dict(sizes=torch.ones(2, 5, dtype=torch.bool)), TypeError, "sizes"),
    (dict(metric=torch.ones(2, 5, 3, dtype=torch.long)), TypeError, "metric"),
    (dict(metric=torch.ones(2, 4, 3)), ValueError, "metric"),
])
def test_bad_input_names_the_argument(kwargs, error, pattern):
    kwargs = dict(kwargs)
    x = kwargs.pop("x", X_OK)
    with pytest.raises(error, match=pattern):
        merge(x, **kwargs)


def test_padding_may_have_size_zero():
    mask = torch.tensor([[True] * 5, [True] * 3 + [False] * 2])
    sizes = mask.float()
    _, plan = merge(X_OK, tau=0.0, mask=mask, sizes=sizes, batch_rule="per_sample")
    torch.testing.assert_close(plan.sizes.sum(1), sizes.sum(1))


@pytest.mark.parametrize("kwargs, error, pattern", [
    (dict(partition="spiral"), ValueError, "partition"),
    (dict(dst_ratio=0.9), ValueError, "dst_ratio"),
    (dict(num_special=10), ValueError, "num_special"),
])
def test_partition_indices_refuses_bad_arguments(kwargs, error, pattern):
    with pytest.raises(error, match=pattern):
        partition_indices(**{"num_tokens": 10, "num_special": 1, **kwargs})


def test_public_api_exports():
    assert mame.merge is merge and mame.fusion_weights is fusion_weights
    assert mame.FusionPlan is type(merge(X_OK, tau=0.5)[1])


def test_partition_cache_made_in_inference_mode_serves_autograd():
    """Partition indices are cached; the first call inside inference_mode must not poison later autograd calls."""
    x = torch.randn(1, 23, 4)  # a length no other test uses, so this test creates the cache entry
    with torch.inference_mode():
        merge(x, tau=0.0, num_special=1)
    leaf = x.clone().requires_grad_()
    y, _ = merge(leaf, tau=0.0, num_special=1)
    y.sum().backward()
    assert leaf.grad is not None
