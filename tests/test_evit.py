"""EViT baseline (`mame.baselines.evit`): hand-computed reorganisations, the class token's attention by hand, and
the patched tiny ViT against the paper's algorithm written out with loops over an explicit attention matrix."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from timm.models.vision_transformer import Attention

import mame
from mame.baselines import evit
from mame.blocks import TokenState
from reference_vit import images, reference_features, tiny_vit

# Hand case: class token c and five tokens t0..t4 with attentiveness (.1, .4, .05, .3, .15) and sizes (2, 1, 4, 1, 1).
# keep_rate .5: ceil(2.5) = 3 kept, the most attended t1, t3, t4 (in original order); t0 and t2 fuse:
#   average (.1 t0 + .05 t2) / .15 = (2 t0 + t2) / 3 = (2, 1) for t0 = (3, 0), t2 = (0, 3);
#   EViT's plain sum .1 t0 + .05 t2 = (.3, .15); the fused token stands for 2 + 4 = 6 patches.
HAND_X = torch.tensor([[[9.0, 9.0], [3.0, 0.0], [1.0, 1.0], [0.0, 3.0], [2.0, 2.0], [5.0, 0.0]]], dtype=torch.float64)
HAND_A = torch.tensor([[0.1, 0.4, 0.05, 0.3, 0.15]], dtype=torch.float64)
HAND_SIZES = torch.tensor([[1.0, 2.0, 1.0, 4.0, 1.0, 1.0]])


@pytest.mark.parametrize("normalize, fused", [(True, [2.0, 1.0]), (False, [0.3, 0.15])])
def test_reorganise_by_hand(normalize, fused):
    y, sizes = evit.reorganise(HAND_X, HAND_A, HAND_SIZES, 0.5, num_special=1, normalize=normalize)
    expected = torch.tensor([[9.0, 9.0], [1.0, 1.0], [2.0, 2.0], [5.0, 0.0], fused], dtype=torch.float64)
    torch.testing.assert_close(y[0], expected, atol=1e-12, rtol=0)
    torch.testing.assert_close(sizes, torch.tensor([[1.0, 1.0, 1.0, 1.0, 6.0]]))


def test_reorganise_with_a_register_and_one_kept_token():
    """Two special tokens (class + register) stay; keep_rate .2 of the four others keeps ceil(.8) = 1: the most
    attended t1 = (0, 3) (attentiveness .4); t0, t2, t3 fuse: (.05 (1, 1) + .05 (2, 2) + .3 (5, 0)) / .4."""
    a = torch.tensor([[0.05, 0.4, 0.05, 0.3]], dtype=torch.float64)
    y, sizes = evit.reorganise(HAND_X, a, HAND_SIZES, 0.2, num_special=2)
    fused = (0.05 * torch.tensor([1.0, 1.0]) + 0.05 * torch.tensor([2.0, 2.0]) + 0.3 * torch.tensor([5.0, 0.0])) / 0.4
    torch.testing.assert_close(y[0], torch.stack([HAND_X[0, 0], HAND_X[0, 1], HAND_X[0, 3], fused.double()]),
                               atol=1e-12, rtol=0)
    torch.testing.assert_close(sizes, torch.tensor([[1.0, 2.0, 4.0, 3.0]]))


def test_reorganise_keeps_everything_when_the_rate_rounds_up():
    y, sizes = evit.reorganise(HAND_X, HAND_A, HAND_SIZES, 0.9, num_special=1)  # ceil(4.5) = 5 of 5
    assert y is HAND_X and sizes is HAND_SIZES


@pytest.mark.parametrize("proportional, expected", [(False, [1 / 4, 1 / 3, 5 / 12]), (True, [3 / 16, 1 / 2, 5 / 16])])
def test_class_attention_by_hand(proportional, expected):
    """Two heads of width 1 (scale 1). Class query (1, 0); keys per token (head 0, head 1) = (0, 5), (ln 2, -1),
    (ln 3, 2). Head 0's logits 0, ln 2, ln 3 give (1, 2, 3) / 6; head 1's are all 0 (query 0): 1/3 each; mean
    (1/4, 1/3, 5/12). With sizes (1, 2, 1) and proportional attention: head 0 (1, 4, 3) / 8, head 1 (1, 2, 1) / 4,
    mean (3/16, 1/2, 5/16)."""
    hook = evit._ClassQuery()
    merger = evit.EViTMerge(0.5, Attention(2, num_heads=2), hook, proportional_attention=proportional)
    qkv_output = torch.zeros(1, 3, 6)
    qkv_output[0, 0, :2] = torch.tensor([1.0, 0.0])  # the class token's query, the first third of its row
    hook(None, (), qkv_output)
    keys = torch.tensor([[[0.0, 5.0], [math.log(2), -1.0], [math.log(3), 2.0]]]).unsqueeze(-1)  # (1, 3, 2, 1)
    state = TokenState(num_special=1, sizes=torch.tensor([[1.0, 2.0, 1.0]]))
    torch.testing.assert_close(merger.class_attention(keys, state)[0], torch.tensor(expected), atol=1e-6, rtol=0)
    with pytest.raises(RuntimeError, match="no class-token query"):
        merger.class_attention(keys, state)  # used once: a later block never reads a stale query


def brute_evit(layers: tuple[int, ...], keep_rate: float, normalize: bool):
    """EViT's reorganisation by loops over each sample, from the explicit attention matrix: attentiveness = the
    class token's row, mean over heads; the ceil(keep_rate n) most attended kept in order, the rest fused."""
    def reduce(index, t, sizes, probs, keys):
        if index not in layers:
            return t, sizes
        attentiveness = probs[:, :, 0, 1:].mean(1)
        count = t.shape[1] - 1
        keep = math.ceil(keep_rate * count)
        outs, out_sizes = [], []
        for b in range(t.shape[0]):
            ranked = sorted(range(count), key=lambda i: -float(attentiveness[b, i]))
            assert float(attentiveness[b, ranked[keep - 1]] - attentiveness[b, ranked[keep]]) > 1e-6  # no near-tie
            kept, rest = sorted(ranked[:keep]), ranked[keep:]
            total = sum(float(attentiveness[b, i]) for i in rest) if normalize else 1.0
            fused = sum(float(attentiveness[b, i]) * t[b, 1 + i] for i in rest) / total
            outs.append(torch.stack([t[b, 0]] + [t[b, 1 + i] for i in kept] + [fused]))
            out_sizes.append(torch.stack([sizes[b, 0]] + [sizes[b, 1 + i] for i in kept]
                                         + [sum(sizes[b, 1 + i] for i in rest)]))
        return torch.stack(outs), torch.stack(out_sizes)
    return reduce


@pytest.mark.parametrize("proportional, normalize", [(False, True), (True, True), (False, False)])
def test_patched_tiny_vit_matches_the_algorithm_by_hand(proportional, normalize):
    model = tiny_vit()
    x = images(3)
    with torch.no_grad():
        ref, ref_sizes, counts = reference_features(model, x, brute_evit((1, 2), 0.5, normalize), proportional)
        evit.patch_timm(model, keep_rate=0.5, layers=(1, 2), proportional_attention=proportional,
                        normalize=normalize)
        feat = model.forward_features(x)
        out = model(x)
    # 16 patches: block 1 keeps ceil(8) = 8 + the fused token; block 2 keeps ceil(4.5) = 5 of those 9, + 1 fused.
    assert counts == [17, 10, 7, 7] and model.mame.last_token_counts == counts
    torch.testing.assert_close(feat, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(model.mame.state.sizes, ref_sizes)
    torch.testing.assert_close(model.mame.state.sizes.sum(1), torch.full((3,), 17.0))
    assert out.shape == (3, 1000) and bool(torch.isfinite(out).all())


def test_default_layers_are_evits_on_a_12_block_vit():
    """Blocks 3, 6, 9 at keep rate .7: 16 -> ceil(11.2) + 1 = 13 -> ceil(9.1) + 1 = 11 -> ceil(7.7) + 1 = 9."""
    model = tiny_vit(depth=12)
    with torch.no_grad():
        evit.patch_timm(model)
        out = model(images())
    assert model.mame.last_token_counts == [17] * 3 + [14] * 3 + [12] * 3 + [10] * 3
    assert bool(torch.isfinite(out).all())
    assert model.mame.settings["keep_rate"] == (0.7, 0.7, 0.7)


def test_unpatch_removes_the_hooks_and_copies_patch_their_own_blocks():
    model = tiny_vit()
    x = images()
    with torch.no_grad():
        ref = model(x)
        evit.patch_timm(model, keep_rate=0.6, layers=[1])
        merged = model(x)
        twin = copy.deepcopy(model)
        torch.testing.assert_close(twin(x), merged, atol=0, rtol=0)
        mame.unpatch(twin)  # undoes the copy only
        assert [len(b.attn.qkv._forward_hooks) for b in model.blocks] == [0, 1, 0, 0]
        assert model(x).shape == merged.shape and model.mame.last_token_counts == [17, 12, 12, 12]
        evit.patch_timm(model, keep_rate=0.6, layers=[2])  # re-patching replaces the hook too
        assert [len(b.attn.qkv._forward_hooks) for b in model.blocks] == [0, 0, 1, 0]
        mame.unpatch(model)
        assert all(not b.attn.qkv._forward_hooks for b in model.blocks + twin.blocks)
        assert torch.equal(model(x), ref) and torch.equal(twin(x), ref)


@pytest.mark.parametrize("kwargs, pattern", [
    (dict(keep_rate=0.0, layers=[1]), "keep_rate"),
    (dict(keep_rate=1.5, layers=[1]), "keep_rate"),
    (dict(keep_rate=[0.5, 0.5], layers=[1]), "keep_rate"),
    (dict(keep_rate=0.7), "layers"),  # EViT's blocks 3, 6, 9 do not exist in a 4-block model
])
def test_bad_arguments_name_themselves(kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        evit.patch_timm(tiny_vit(), **kwargs)


def test_refuses_a_model_without_class_token():
    with pytest.raises(ValueError, match="class token"):
        evit.patch_timm(tiny_vit(class_token=False, global_pool="avg"), layers=[1])
