"""FLOP budgets (`mame.budget`, `mame.core.budget_threshold`, ``mame.patch.timm(model, flops=…)``, the default)."""

from __future__ import annotations

import copy

import pytest
import timm
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import mame
import mame.calibrate
from mame.bench import count_flops
from mame.core import budget_threshold, fusion_weights, token_split


def test_budget_threshold_hand_computed():
    # One sample, 2 destinations x 3 sources: best similarities per source 0.9, 0.5, 0.7.
    similarity = torch.tensor([[[0.9, 0.1, 0.7],
                                [0.2, 0.5, 0.3]]])
    tau, chosen = budget_threshold(similarity, torch.tensor([2]))
    # The two most similar sources are 0 and 2; τ halfway between the last chosen (0.7) and first left out (0.5).
    assert torch.equal(chosen, torch.tensor([[[1.0, 0.0, 1.0]]]))
    assert torch.allclose(tau.flatten(), torch.tensor([0.6]))
    # Count 0 merges nothing (τ = 1); a count past the sources merges them all (τ halfway to -1).
    tau, chosen = budget_threshold(similarity, torch.tensor([0]))
    assert tau.item() == 1.0 and chosen.sum() == 0
    tau, chosen = budget_threshold(similarity, torch.tensor([9]))
    assert chosen.sum() == 3 and torch.allclose(tau.flatten(), torch.tensor([-0.25]))


def test_budget_with_pruning_hand_computed():
    """Eqs 3-8 under a budget, by hand. 3 destinations x 3 sources, the budget picks 2 sources (best similarities
    0.9, 0.8, 0.4 -> sources 0 and 1, τ = 0.6):
    - source 0: eq 3 gives 0.3 / 0.2 / 0 -> eq 4 0.6 / 0.4; mean of the non-zero weights 0.5 (eqs 5-6), eq 7 keeps
      0.1 on destination 0 alone -> eq 8: all of it to destination 0;
    - source 1: only destination 2 passes (0.2 -> 1.0); eq 7 would empty the column (a lone weight equals its mean),
      and the budget keeps it whole: all of it to destination 2;
    - source 2 is not chosen: no weight."""
    similarity = torch.tensor([[[0.9, 0.1, 0.4],
                                [0.8, 0.5, 0.2],
                                [0.0, 0.8, 0.3]]])
    expected = torch.tensor([[[1.0, 0.0, 0.0],
                              [0.0, 0.0, 0.0],
                              [0.0, 1.0, 0.0]]])
    tau, chosen = budget_threshold(similarity, torch.tensor([2]))
    assert torch.allclose(tau.flatten(), torch.tensor([0.6])) and torch.equal(chosen, torch.tensor([[[1., 1., 0.]]]))
    # With "dot", S = x_dst @ x_src^T: unit source vectors make S the hand-written matrix (all below 1, so eq 3's
    # cosine ceiling would not change it either).
    for prune, weights in ((True, expected), (False, torch.tensor([[[0.6, 0.0, 0.0],
                                                                     [0.4, 0.0, 0.0],
                                                                     [0.0, 1.0, 0.0]]]))):
        got = fusion_weights(similarity, torch.eye(3)[None], 0.0, prune=prune, merge_count=torch.tensor([2]),
                             similarity="dot")
        torch.testing.assert_close(got, weights, atol=1e-4, rtol=0)  # eps 1e-6 against a weight of 0.1


@settings(max_examples=40, deadline=None)
@given(batch=st.integers(1, 3), dst=st.integers(1, 6), src=st.integers(1, 9), count=st.integers(0, 11),
       seed=st.integers(0, 1000), ties=st.booleans())
def test_budget_threshold_one_count_equals_per_sample_counts(batch, dst, src, count, seed, ties):
    """One int for every sample takes a shorter path than (B,) counts; both must choose the same sources at the same
    thresholds, ties included (ranked by position)."""
    similarity = torch.rand(batch, dst, src, generator=torch.Generator().manual_seed(seed)) * 2 - 1
    if ties:
        similarity = (similarity * 2).round() / 2  # a few distinct values: many equal best similarities
    tau, chosen = budget_threshold(similarity, count)
    expected_tau, expected_chosen = budget_threshold(similarity, torch.full((batch,), count))
    torch.testing.assert_close(tau, expected_tau)  # the one-count path computes τ in double precision, then rounds
    assert torch.equal(chosen, expected_chosen)
    assert chosen.sum(-1).flatten().tolist() == [float(min(count, src))] * batch


def test_partial_fusion_reads_only_the_fused_columns():
    """A plan whose sources are partly preserved fuses from the fused columns alone (`FusionPlan._fused_src`); the
    result must be eq 9 (plain and size-weighted) computed densely from the plan's own weights."""
    x = torch.randn(1, 17, 8, generator=torch.Generator().manual_seed(4))
    sizes = torch.rand(1, 17, generator=torch.Generator().manual_seed(5)) * 3 + 1
    for size_weighted in (False, True):
        y, plan = mame.merge(x, num_special=1, merge_count=3, sizes=sizes, size_weighted=size_weighted)
        assert plan._fused_src is not None and plan._fused_src.numel() == 3
        w = plan.weights
        x_dst, x_src = x[:, plan.dst_idx], x[:, plan.src_idx]
        if size_weighted:
            s_dst, s_src = sizes[:, plan.dst_idx, None], sizes[:, plan.src_idx, None]
            fused = (s_dst * x_dst + w @ (s_src * x_src)) / (s_dst + w @ s_src)
        else:
            fused = (x_dst + w @ x_src) / (1 + w.sum(-1, keepdim=True))
        kept = x_src[:, plan.preserved[0]]
        torch.testing.assert_close(y, torch.cat([x[:, :1], fused, kept], 1))


@settings(max_examples=60, deadline=None)
@given(batch=st.sampled_from([1, 3]), length=st.integers(3, 20), count=st.integers(0, 12), prune=st.booleans(),
       size_weighted=st.booleans(), discard=st.booleans(), ties=st.booleans(), seed=st.integers(0, 1000))
def test_plan_from_the_chosen_columns_equals_the_general_plan(batch, length, count, prune, size_weighted, discard,
                                                               ties, seed):
    """One count for every sample builds the plan from the chosen columns alone, never the dense (B, M, N) weights,
    with each sample's own kept sources and no padding (`mame.core._chosen_columns_plan`); (B,) tensor counts take
    the general path (padded per-sample layout). Both must give the same tokens, sizes, preserved sources, weights,
    source map and unmerge, ties and discarded sources included."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, length, 5, dtype=torch.float64, generator=generator)
    if ties:
        x = x.round()  # coarse tokens: equal similarities around the cut
    sizes = torch.rand(batch, length, dtype=torch.float64, generator=generator) * 3 + 1
    options = dict(num_special=1, prune=prune, sizes=sizes, size_weighted=size_weighted, discard_preserved=discard,
                   batch_rule="per_sample")
    y, plan = mame.merge(x, merge_count=count, **options)
    expected, expected_plan = mame.merge(x, merge_count=torch.full((batch,), count), **options)
    assert plan._weights is None or plan._identity  # the chosen-columns path was taken
    assert plan.mask is None and (expected_plan.mask is None or bool(expected_plan.mask.all()))
    torch.testing.assert_close(y, expected, atol=1e-12, rtol=0)
    torch.testing.assert_close(plan.sizes, expected_plan.sizes)  # sizes are float32: summed in another order
    assert torch.equal(plan.preserved, expected_plan.preserved) and torch.equal(plan.lengths, expected_plan.lengths)
    torch.testing.assert_close(plan.weights, expected_plan.weights, atol=1e-12, rtol=0)
    assert torch.equal(plan.source_map, expected_plan.source_map)
    torch.testing.assert_close(plan.unmerge(y), expected_plan.unmerge(expected), atol=1e-12, rtol=0)
    torch.testing.assert_close(plan.merge(sizes), expected_plan.merge(sizes), atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("batch", [1, 3])
def test_budget_merges_every_chosen_source_of_large_dot_products(batch):
    """Dot products of long float32 tokens (about 1e6) have no float32 number 1e-3 below them: with ties at the cut,
    the budget's τ must still lie strictly below the last chosen source's similarity, or that source gets no weight
    in eq 3 and is lost (neither fused nor kept). Each sample then merges exactly its count, as the general path
    does."""
    x = torch.randn(batch, 33, 4, generator=torch.Generator().manual_seed(3)).round() * 1000  # ties at the cut
    count = 9
    options = dict(num_special=1, similarity="dot", size_weighted=True, batch_rule="per_sample")
    y, plan = mame.merge(x, merge_count=count, **options)
    expected, expected_plan = mame.merge(x, merge_count=torch.full((batch,), count), **options)
    assert y.shape[1] == 33 - count and torch.equal((~plan.preserved).sum(1), torch.full((batch,), count))
    torch.testing.assert_close(plan.sizes.sum(1), torch.full((batch,), 33.0))
    torch.testing.assert_close(y, expected)
    torch.testing.assert_close(plan.sizes, expected_plan.sizes)


@pytest.mark.parametrize("batch_rule", ["any", "per_sample"])
def test_budget_gradcheck_one_count(batch_rule):
    """The one-count path (eqs 3-8 on the chosen columns, scattered back; output rows selected by position and the
    fused ones written in place) must stay differentiable, size-weighted and pruned as the default runs."""
    generator = torch.Generator().manual_seed(7)
    x = torch.randn(2, 11, 4, dtype=torch.float64, generator=generator).requires_grad_(True)
    sizes = torch.rand(2, 11, dtype=torch.float64, generator=generator) + 1
    _, plan = mame.merge(x, num_special=1, merge_count=3, sizes=sizes, size_weighted=True, batch_rule=batch_rule)
    assert int(plan.lengths.min()) < 11 and plan.preserved.any()  # something merged, something kept
    assert torch.autograd.gradcheck(
        lambda t: mame.merge(t, num_special=1, merge_count=3, sizes=sizes, size_weighted=True,
                             batch_rule=batch_rule)[0], (x,), eps=1e-6, atol=1e-5)


def test_budget_merges_exactly_the_count_with_ties():
    # Every token identical: every similarity is 1, a hand-set τ merges all or nothing; a budget merges the count.
    x = torch.ones(2, 9, 4)
    for count in (0, 1, 3, 4):
        y, plan = mame.merge(x, num_special=1, prune=False, batch_rule="per_sample",
                             merge_count=torch.tensor([count, count]))
        assert plan.lengths.tolist() == [9 - count] * 2
        torch.testing.assert_close(y, torch.ones_like(y))
        torch.testing.assert_close(plan.sizes.sum(1), torch.full((2,), 9.0))


def test_budget_equals_the_hand_set_threshold_it_chose():
    x = torch.randn(3, 17, 8, generator=torch.Generator().manual_seed(0))
    counts = torch.tensor([2, 5, 7])
    y, plan = mame.merge(x, num_special=1, prune=False, batch_rule="per_sample", merge_count=counts)
    assert (17 - plan.lengths).tolist() == counts.tolist()
    split = token_split(17, 1, "alternating", 0.5, 0, "cpu")
    unit = torch.nn.functional.normalize(x, dim=-1)
    similarity = split.dst(unit) @ split.src(unit).mT
    taus, _ = budget_threshold(similarity, counts)
    for b in range(3):
        alone, alone_plan = mame.merge(x[b:b + 1], float(taus[b]), num_special=1, prune=False)
        assert alone_plan.num_tokens_out == int(plan.lengths[b])
        torch.testing.assert_close(y[b, :alone_plan.num_tokens_out], alone[0], atol=1e-5, rtol=1e-5)


@settings(max_examples=40, deadline=None)
@given(length=st.integers(4, 20), count=st.integers(0, 12), prune=st.booleans(), seed=st.integers(0, 1000),
       pad=st.integers(0, 3))
def test_budget_count_property(length, count, prune, seed, pad):
    x = torch.randn(2, length, 6, generator=torch.Generator().manual_seed(seed))
    mask = torch.ones(2, length, dtype=torch.bool)
    real = max(length - pad, 3)
    mask[1, real:] = False
    y, plan = mame.merge(x, num_special=1, prune=prune, batch_rule="per_sample", mask=mask,
                         merge_count=torch.tensor([count, count]))
    for b, tokens in enumerate((length, real)):
        sources = tokens // 2  # the alternating split makes the first of the tokens - 1 mergeable ones a source
        destinations = (tokens - 1) // 2
        assert destinations >= 1
        # With pruning too: a chosen source whose weights eq 7 would all remove keeps them.
        assert tokens - int(plan.lengths[b]) == min(count, sources)
    assert bool(torch.isfinite(y).all())


def make_vit(depth: int = 6) -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model("vit_small_patch16_224", pretrained=False, depth=depth, embed_dim=96, num_heads=4,
                             img_size=64, patch_size=8, num_classes=10).eval()


@pytest.mark.parametrize("flops", [1.5, 2.0, 2.5])
def test_flop_budget_is_met_as_counted(flops):
    model = make_vit()
    x = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    base = count_flops(model, x)
    patched = mame.patch.timm(copy.deepcopy(model), flops=flops)
    assert base / count_flops(patched, x) == pytest.approx(flops, rel=0.03)


def test_default_is_a_two_times_budget_on_keys_pruned_size_weighted():
    model = mame.patch.timm(make_vit())
    settings_ = model.mame.settings
    assert settings_["flops"] == 2.0 and "tau" not in settings_
    assert settings_["metric"] == "keys" and settings_["prune"] is True and settings_["size_weighted"] is True
    # A hand-set τ under the default preset keeps pruning off (a fitted τ would have to drop further with it).
    assert mame.patch.timm(make_vit(), tau=0.9).mame.settings["prune"] is False
    assert settings_["layers"] == tuple(range(6))
    paper = mame.patch.timm(make_vit(), preset="paper", layers=3)
    assert paper.mame.settings["tau"] == (0.8,) * 3 and paper.mame.settings["metric"] == "x"
    assert paper.mame.settings["prune"] is True and paper.mame.settings["size_weighted"] is False


def test_default_fuses_weighted_by_size():
    """From the second merging block on tokens stand for several patches, so the weighted and the plain average
    differ; the default must be the weighted one, and saying so explicitly must not change it."""
    model = make_vit()
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(5))
    outputs = {}
    with torch.no_grad():
        for name, options in {"default": {}, "weighted": {"size_weighted": True},
                              "plain": {"size_weighted": False}}.items():
            outputs[name] = mame.patch.timm(copy.deepcopy(model), **options)(x)
    torch.testing.assert_close(outputs["default"], outputs["weighted"])
    assert not torch.allclose(outputs["default"], outputs["plain"], atol=1e-4)


def test_budget_batch_is_rectangular_and_each_image_merges_as_alone():
    model = mame.patch.timm(make_vit(), flops=2.0)
    x = torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        batched = model(x)
        counts = model.mame.last_token_counts
        assert model.mame.state.mask is None  # equal counts: no padding anywhere
        alone = torch.cat([model(x[i:i + 1]) for i in range(4)])
    assert model.mame.last_token_counts == counts
    torch.testing.assert_close(batched, alone, atol=1e-4, rtol=1e-4)
    # The counts do not depend on the pixels.
    with torch.no_grad():
        model(torch.zeros(2, 3, 64, 64))
    assert model.mame.last_token_counts == counts


def test_budget_thresholds_round_trip(tmp_path):
    model = mame.patch.timm(make_vit(), flops=1.7)
    path = model.mame.save_thresholds(tmp_path / "budget.json")
    again = mame.calibrate.load_thresholds(make_vit(), path)
    assert again.mame.settings == model.mame.settings
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(again(x), model(x))


def test_budget_errors():
    with pytest.raises(ValueError, match="not both"):
        mame.patch.timm(make_vit(), tau=0.8, flops=2.0)
    with pytest.raises(ValueError, match="out of reach"):
        mame.patch.timm(make_vit(), flops=50.0)
    with pytest.raises(ValueError, match="flops must be"):
        mame.patch.timm(make_vit(), flops=0.5)
    with pytest.raises(ValueError, match="preset"):
        mame.patch.timm(make_vit(), preset="fast")
    with pytest.raises(ValueError, match="merge_count"):
        mame.merge(torch.randn(1, 5, 4), causal="strict", merge_count=torch.tensor([1]))
    for bad in (-1, True, torch.tensor([1, 1])):  # negative, a bool, or one count per sample for a batch of one
        with pytest.raises(ValueError, match="merge_count"):
            mame.merge(torch.randn(1, 5, 4), merge_count=bad)
