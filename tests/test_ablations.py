"""The paper's ablation switches (section 4.3.1, Figure 2): similarity kind, metric and partition, each against a
case worked out by hand, and each reaching the patched model."""

from __future__ import annotations

import math

import pytest
import torch

import mame
from mame.blocks import MameMerge, TokenState
from mame.core import merge, partition_indices, similarity_matrix
from reference_vit import images, reference_features, tiny_vit

# Similarity hand case: destinations a = (1, 0), b = (0, 2); sources s0 = (2, 0), s1 = (1, 1), s2 = (0, -1).
#   cosine:    a: 1, 1/sqrt2, 0;                 b: 0, 1/sqrt2, -1
#   euclidean: 1 - |x - y| / (|x| + |y|):  a-s0 1 - 1/3, a-s1 1 - 1/(1 + sqrt2) = 2 - sqrt2, a-s2 1 - sqrt2/2;
#              b-s0 1 - 2 sqrt2/4, b-s1 1 - sqrt2/(2 + sqrt2) = 2 - sqrt2, b-s2 1 - 3/3 = 0
#   dot:       a: 2, 1, 0;                       b: 0, 2, -2
#   softmax over {a, b} of products / sqrt(2): s0 (sqrt2, 0) -> (sig(sqrt2), sig(-sqrt2)) = (.8044, .1956);
#              s1 (1, 2)/sqrt2 -> (sig(-1/sqrt2), sig(1/sqrt2)) = (.3302, .6698); s2 (0, -sqrt2) -> (.8044, .1956)
R2 = math.sqrt(2)


def sig(v: float) -> float:
    return 1 / (1 + math.exp(-v))


HAND_S = {
    "cosine": [[1.0, 1 / R2, 0.0], [0.0, 1 / R2, -1.0]],
    "euclidean": [[2 / 3, 2 - R2, 1 - R2 / 2], [1 - R2 / 2, 2 - R2, 0.0]],
    "dot": [[2.0, 1.0, 0.0], [0.0, 2.0, -2.0]],
    "softmax": [[sig(R2), sig(-1 / R2), sig(R2)], [sig(-R2), sig(1 / R2), sig(-R2)]],
}
# The same tokens in one sequence, alternating partition (destinations at odd positions after the class token c):
# [c, s0, a, s1, b, s2]. tau = .5, no pruning: S~ = relu(S - .5), W = S~ over its column sums, eq 9:
#   cosine    S~ a: .5, .2071, 0; b: 0, .2071, 0   -> W a: 1, .5, 0; b: 0, .5, 0;  s2 preserved
#             a'' = (a + s0 + .5 s1) / 2.5 = (1.4, .2);  b'' = (b + .5 s1) / 1.5 = (1/3, 5/3)
#   euclidean S~ a: 1/6, .0858, 0; b: 0, .0858, 0  -> the same W, the same tokens
#   dot       S~ a: 1.5, .5, 0; b: 0, 1.5, 0       -> W a: 1, .25, 0; b: 0, .75, 0 (no cap at 1 - tau: a cap
#             would give the cosine's W);  a'' = (a + s0 + .25 s1) / 2.25 = (13/9, 1/9);  b'' = (b + .75 s1) / 1.75
#             = (3/7, 11/7);  s2 preserved
#   softmax   S~ a: .3044, 0, .3044; b: 0, .1698, 0 -> W a: 1, 0, 1; b: 0, 1, 0;  a'' = (a + s0 + s2) / 3 = (1, -1/3);
#             b'' = (b + s1) / 2 = (.5, 1.5); nothing preserved
C = [9.0, 9.0]
HAND_X = torch.tensor([[C, [2.0, 0.0], [1.0, 0.0], [1.0, 1.0], [0.0, 2.0], [0.0, -1.0]]], dtype=torch.float64)
HAND_MERGED = {
    "cosine": [C, [1.4, 0.2], [1 / 3, 5 / 3], [0.0, -1.0]],
    "euclidean": [C, [1.4, 0.2], [1 / 3, 5 / 3], [0.0, -1.0]],
    "dot": [C, [13 / 9, 1 / 9], [3 / 7, 11 / 7], [0.0, -1.0]],
    "softmax": [C, [1.0, -1 / 3], [0.5, 1.5]],
}


def close(actual: torch.Tensor, expected) -> None:
    # eps = 1e-6 in eqs 4-8 moves the weights by O(eps), hence the tolerance.
    torch.testing.assert_close(actual, torch.tensor(expected, dtype=actual.dtype), atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind", list(HAND_S))
def test_similarity_kinds_by_hand(kind):
    x_dst, x_src = HAND_X[:, [2, 4]], HAND_X[:, [1, 3, 5]]
    close(similarity_matrix(x_dst, x_src, kind)[0], HAND_S[kind])


@pytest.mark.parametrize("kind", list(HAND_MERGED))
def test_merge_with_each_similarity_by_hand(kind):
    y, plan = merge(HAND_X, tau=0.5, num_special=1, prune=False, similarity=kind)
    close(y[0], HAND_MERGED[kind])


def test_dot_with_pruning_by_hand():
    """dot, tau = .5, pruning. s1: W = (.25, .75), zeta = .5, W~ = (0, .25), W^F = (0, 1): s1 joins b alone; s2 has
    no candidate and is preserved. s0 has a single candidate, a, with S~ = 1.5: eqs 5-8 zero a single weight only
    when S~ < 1 - eps (zeta then exceeds W by O(eps)); above that zeta falls just short of W, and W^F keeps a weight
    of order eps. So s0 is neither preserved nor really fused: it is in effect dropped, a'' = a to 1e-6. (A cosine's
    S~ = S - tau stays below 1 - eps for tau > eps.) Output [c, a, (b + s1) / 2, s2]."""
    eps = 1e-6
    w = 1.5 / (1.5 + eps)  # eq 4
    count = w / (w + eps)  # eq 6
    zeta = w / (count + eps)  # eq 5
    w_f = (w - zeta) / (w - zeta + eps)  # eqs 7-8
    y, plan = merge(HAND_X, tau=0.5, num_special=1, similarity="dot")
    close(y[0], [C, [1.0, 0.0], [0.5, 1.5], [0.0, -1.0]])
    assert plan.preserved.tolist() == [[False, False, True]]
    assert 0 < w_f < 1e-6
    torch.testing.assert_close(plan.weights[0, :, 0], torch.tensor([w_f, 0.0], dtype=torch.float64), atol=0,
                               rtol=1e-3)


def test_softmax_with_pruning_keeps_everything():
    """For tau >= .5 at most one destination passes per source (shares sum to 1), and pruning empties a column with
    a single weight: nothing merges, the output is the input."""
    y, plan = merge(HAND_X, tau=0.5, num_special=1, similarity="softmax")
    assert y is HAND_X and plan.preserved.all()


def test_unknown_similarity_names_the_argument():
    with pytest.raises(ValueError, match="similarity"):
        merge(HAND_X, tau=0.5, similarity="manhattan")
    with pytest.raises(ValueError, match="similarity"):
        mame.patch.timm(tiny_vit(), tau=0.5, layers=2, similarity="manhattan")


@pytest.mark.parametrize("kind", list(HAND_S))
def test_padded_input_equals_unpadded_runs(kind):
    """Padding takes no part in any kind (the softmax's shares are over real destinations only)."""
    g = torch.Generator().manual_seed(0)
    long, short = torch.randn(1, 9, 4, generator=g, dtype=torch.float64), torch.randn(1, 6, 4, generator=g,
                                                                                     dtype=torch.float64)
    padded = torch.cat([long, torch.cat([short, torch.zeros(1, 3, 4, dtype=torch.float64)], 1)])
    mask = torch.arange(9) < torch.tensor([[9], [6]])
    tau = {"dot": 0.5, "softmax": 0.2}.get(kind, 0.1)
    y, plan = merge(padded, tau, 1, batch_rule="per_sample", mask=mask, prune=False, similarity=kind)
    for b, alone in enumerate((long, short)):
        ref, _ = merge(alone, tau, 1, prune=False, similarity=kind)
        torch.testing.assert_close(y[b, : int(plan.lengths[b])], ref[0])


@pytest.mark.parametrize("kind", list(HAND_S))
def test_strict_causal_prefix_property_for_every_kind(kind):
    """Strict causal merging: the merged prefix does not depend on later tokens, whatever the similarity."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 12, 4, generator=g, dtype=torch.float64)
    tau = {"dot": 0.5, "softmax": 0.5}.get(kind, 0.1)
    full, plan_full = merge(x, tau, 1, causal="strict", similarity=kind)
    head, plan_head = merge(x[:, :9], tau, 1, causal="strict", similarity=kind)
    # Tokens up to position 8 that the prefix merged land on the same output rows in both runs.
    rows = plan_head.source_map[0, :8]
    torch.testing.assert_close(full[0, plan_full.source_map[0, :8]], head[0, rows])


# Metric hand case: tokens [c, s0, a, s1, b] (alternating), tau = .5, no pruning. Values a = (1, 0), b = (0, 1),
# s0 = (0, 2), s1 = (1, -1); keys, two heads of width 1: c (1, 1), s0 (1, 0), a (1, 1), s1 (-1, 2), b (1, -3).
#   "x":         s0 ~ b (cos 1), s1 ~ a (cos .7071): a'' = (a + s1) / 2 = (1, -.5), b'' = (b + s0) / 2 = (0, 1.5)
#   "keys":      s0 ~ a (cos .7071; b: .3162), s1: cos a .3162, b < 0 -> preserved:  [c, (a + s0) / 2, b, s1]
#   "keys_mean": one number per token (s0 .5, a 1, s1 .5, b -1), cosines +-1: s0 and s1 both join a:
#                a'' = (a + s0 + s1) / 3 = (2/3, 1/3), b'' = b
METRIC_X = torch.tensor([[C, [0.0, 2.0], [1.0, 0.0], [1.0, -1.0], [0.0, 1.0]]])
METRIC_KEYS = torch.tensor([[[1.0, 1.0], [1.0, 0.0], [1.0, 1.0], [-1.0, 2.0], [1.0, -3.0]]]).unsqueeze(-1)
METRIC_MERGED = {
    "x": [C, [1.0, -0.5], [0.0, 1.5]],
    "keys": [C, [0.5, 1.0], [0.0, 1.0], [1.0, -1.0]],
    "keys_mean": [C, [2 / 3, 1 / 3], [0.0, 1.0]],
}


@pytest.mark.parametrize("metric", list(METRIC_MERGED))
def test_metric_by_hand(metric):
    merger = MameMerge(tau=0.5, prune=False, batch_rule="any", metric=metric)
    close(merger(METRIC_X, TokenState(num_special=1), METRIC_KEYS)[0], METRIC_MERGED[metric])


# Partition hand case: [c, t0, t1, t2, t3] with t0 = (1, 0), t1 = (0, 1), t2 = (1, .2), t3 = (.1, 1), tau = .9.
#   alternating: destinations t1, t3, sources t0, t2: best cosines .0995 and .2929 -> nothing merges, x unchanged.
#   sequential:  destinations t0, t1, sources t2, t3: t2 ~ t0 (.9806), t3 ~ t1 (.9950):
#                [c, (t0 + t2) / 2, (t1 + t3) / 2] = [c, (1, .1), (.05, 1)]
PARTITION_X = torch.tensor([[C, [1.0, 0.0], [0.0, 1.0], [1.0, 0.2], [0.1, 1.0]]], dtype=torch.float64)


def test_partitions_by_hand():
    y, _ = merge(PARTITION_X, tau=0.9, num_special=1, prune=False)
    assert y is PARTITION_X
    y, _ = merge(PARTITION_X, tau=0.9, num_special=1, prune=False, partition="sequential")
    close(y[0], [C, [1.0, 0.1], [0.05, 1.0]])


@pytest.mark.parametrize("kind", list(HAND_S))
def test_patched_vit_uses_the_similarity(kind):
    """The patch carries the kind to every merge: the patched forward equals the hand-written one that merges with
    `mame.merge(similarity=kind)` after the attention of blocks 0 and 1."""
    model = tiny_vit()
    x = images(1)
    # Thresholds that merge some of the sources of block 0, not all (the random ViT's tokens are far apart),
    # except the dot product, whose products (3 to 17 here) pass any tau in [-1, 1].
    tau = {"cosine": 0.1, "euclidean": 0.33, "dot": 0.9, "softmax": 0.2}[kind]

    def reduce(index, t, sizes, probs, keys):
        if index > 1:
            return t, sizes
        y, plan = merge(t, tau, 1, prune=False, sizes=sizes, similarity=kind)
        return y, plan.sizes

    with torch.no_grad():
        ref, ref_sizes, counts = reference_features(model, x, reduce, proportional=True)
        mame.patch.timm(model, tau=tau, layers=2, metric="x", prune=False, size_weighted=False, similarity=kind)
        feat = model.forward_features(x)
    assert model.mame.settings["similarity"] == kind
    assert model.mame.last_token_counts == counts and counts[1] < 17
    torch.testing.assert_close(feat, ref, atol=1e-5, rtol=1e-5)


def test_random_partition_seed_reaches_the_merges():
    model = tiny_vit()
    with torch.no_grad():
        mame.patch.timm(model, tau=0.5, layers=1, metric="x", prune=False, partition="random", seed=3,
                        batch_rule="any")
        model(images())
    dst, src = partition_indices(17, 1, "random", seed=3)
    assert model.mame.settings["seed"] == 3
    assert torch.equal(model.mame.last_plans[0].dst_idx, dst) and torch.equal(model.mame.last_plans[0].src_idx, src)
    assert not torch.equal(dst, partition_indices(17, 1, "random", seed=0)[0])


def test_every_family_takes_the_switches():
    """hf encoders, open_clip towers and causal LMs take ``similarity`` and ``seed`` as timm does, carry them into
    every merge and into their settings (so saved thresholds re-apply them)."""
    from test_causal_lm import _llama
    from test_patch_hf import hf_vit
    from test_patch_open_clip import tiny_vit as clip_vit

    for patch, model in ((mame.patch.hf, hf_vit()), (mame.patch.open_clip, clip_vit()), (mame.patch.hf, _llama())):
        patch(model, tau=0.5, layers=1, partition="random", seed=4, similarity="euclidean", batch_rule="any")
        assert model.mame.settings["similarity"] == "euclidean" and model.mame.settings["seed"] == 4
        mergers = [vars(module)["_mame_merger"] for module in model.modules()
                   if vars(module).get("_mame_merger") is not None]
        mergers = [getattr(merger, "mame", merger) for merger in mergers]  # a causal LM wraps its MameMerge
        assert len(mergers) == 1 and (mergers[0].similarity, mergers[0].seed) == ("euclidean", 4)
