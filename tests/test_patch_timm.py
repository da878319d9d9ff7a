"""`mame.patch.timm` on tiny random timm ViTs, checked against the unpatched model and hand-written references.

The references below call timm's own submodules (norm1, attn, ls1, mlp, ...) and `mame.merge`; they never go
through the patched forward, so a mistake in the shared block forward, the state hand-over or the pooling shows up
as a mismatch.
"""

from __future__ import annotations

import copy

import pytest
import timm
import torch
from torch import nn

import mame
from timm.models.vision_transformer import Block, VisionTransformer

EMBED = 64
CONFIGS = {
    "deit": dict(),  # class token, token pool
    "dinov2_reg": dict(reg_tokens=4, init_values=1e-1, no_embed_class=True),  # registers + LayerScale
    "avg_no_cls": dict(class_token=False, global_pool="avg"),
    "map": dict(global_pool="map"),
    # every optional piece of timm's Attention that the patched block runs itself: qk-norm, the norm before the
    # output projection, the sigmoid gate
    "qknorm_gated": dict(qk_norm=True, scale_attn_norm=True, gated=True),
}


def make_vit(config: str | dict = "deit", *, depth: int = 3, img_size: int = 32, seed: int = 0, **extra) -> nn.Module:
    kwargs = dict(CONFIGS[config]) if isinstance(config, str) else dict(config)
    kwargs.update(extra)
    gated = kwargs.pop("gated", False)
    torch.manual_seed(seed)
    model = timm.create_model("vit_small_patch16_224", pretrained=False, depth=depth, embed_dim=EMBED, num_heads=4,
                              img_size=img_size, patch_size=8, num_classes=10, **kwargs)
    if gated:  # timm's Attention(gated=True): a sigmoid gate on the attention output, from the attention's input
        for block in model.blocks:
            block.attn.gate = nn.Linear(EMBED, EMBED)
    return model.eval()


def images(batch: int = 2, size: int = 32, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def randomise_layerscale(model: nn.Module, seed: int = 3) -> None:
    """Give every LayerScale a non-trivial gamma, so dropping or misplacing it changes the output."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for block in model.blocks:
            for ls in (block.ls1, block.ls2):
                assert hasattr(ls, "gamma"), "config expected to have LayerScale"
                ls.gamma.copy_(0.2 + 0.6 * torch.rand(ls.gamma.shape, generator=gen))


def layerscale_vit() -> nn.Module:
    """DINOv2-like (registers, LayerScale) with non-trivial LayerScale gammas."""
    model = make_vit("dinov2_reg")
    randomise_layerscale(model)
    return model


# ----------------------------------------------------------------------------------------------------------------
# tau = 1: nothing merges


@pytest.mark.parametrize("batch_rule", ["any", "per_sample"])
@pytest.mark.parametrize("config", list(CONFIGS))
def test_tau_one_equals_unpatched(config, batch_rule):
    model = make_vit(config)
    if config == "dinov2_reg":
        randomise_layerscale(model)
    x = images()
    with torch.no_grad():
        ref_out = model(x)
        ref_pre = model.forward_head(model.forward_features(x), pre_logits=True)
        ref_feat = model.forward_features(x)
        mame.patch.timm(model, tau=1.0, layers=3, batch_rule=batch_rule)
        out = model(x)
        feat = model.forward_features(x)
        pre = model.forward_head(feat, pre_logits=True)
    length = ref_feat.shape[1]
    assert model.mame.last_token_counts == [length] * 3
    torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=0)
    torch.testing.assert_close(pre, ref_pre, atol=1e-5, rtol=0)
    # Nothing merged, so the tokens keep their own order and forward_features is unchanged too.
    assert feat.shape == ref_feat.shape
    torch.testing.assert_close(feat, ref_feat, atol=1e-5, rtol=0)
    torch.testing.assert_close(model.mame.unmerge(feat), ref_feat, atol=1e-5, rtol=0)


def test_tau_one_layer_subset_equals_unpatched():
    model = make_vit("dinov2_reg", depth=4)
    randomise_layerscale(model)
    x = images()
    with torch.no_grad():
        ref_out, ref_feat = model(x), model.forward_features(x)
        mame.patch.timm(model, tau=1.0, layers=[1, 3])
        out, feat = model(x), model.forward_features(x)
    torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=0)
    torch.testing.assert_close(feat, ref_feat, atol=1e-5, rtol=0)


def test_proportional_attention_with_unit_sizes_is_plain_attention():
    model = layerscale_vit()
    x = images()
    with torch.no_grad():
        ref = model(x)
        mame.patch.timm(model, tau=1.0, layers=3, proportional_attention=True)
        out = model(x)
        assert model.mame.state.sizes is not None and bool((model.mame.state.sizes == 1).all())
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
        # With merges the bias is live: proportional attention must then change the output.
        mame.patch.timm(model, tau=-1.0, layers=3, proportional_attention=True)
        prop = model.forward_head(model.forward_features(x), pre_logits=True)
        mame.patch.timm(model, tau=-1.0, layers=3, proportional_attention=False)
        plain = model.forward_head(model.forward_features(x), pre_logits=True)
    assert (prop - plain).abs().max() > 1e-4


# ----------------------------------------------------------------------------------------------------------------
# unpatch / re-patch


def _assert_pristine(model: nn.Module) -> None:
    assert type(model) is VisionTransformer
    assert "mame" not in model.__dict__ and not hasattr(model, "mame")
    for block in model.blocks:
        assert type(block) is Block
        assert not [name for name in block.__dict__ if name.startswith("_mame")]
        assert not block.attn.qkv._forward_hooks  # ToMe's key capture is gone too


@pytest.mark.parametrize("config", ["deit", "dinov2_reg", "map"])
def test_unpatch_restores_bit_identical_outputs(config):
    model = make_vit(config)
    x = images()
    keys = set(model.state_dict())
    with torch.no_grad():
        ref = model(x)
        ref_feat = model.forward_features(x)
        mame.patch.timm(model, tau=-0.5, layers=3, batch_rule="per_sample")
        assert type(model) is not VisionTransformer and isinstance(model, VisionTransformer)
        assert set(model.state_dict()) == keys  # patching adds no parameters or buffers
        merged = model(x)
        assert not torch.allclose(merged, ref, atol=1e-6)  # it really did something
        assert mame.unpatch(model) is model
        _assert_pristine(model)
        assert torch.equal(model(x), ref)
        assert torch.equal(model.forward_features(x), ref_feat)
        mame.unpatch(model)  # unpatching an unpatched model is a no-op
        _assert_pristine(model)


@pytest.mark.parametrize("method", ["mame", "tome"])
def test_deep_copy_of_patched_model_is_independent(method):
    from mame.baselines import tome

    model = make_vit("dinov2_reg", depth=3)
    x = images()
    ref = model(x).detach()
    patched = mame.patch.timm(model, tau=-0.5, layers=3) if method == "mame" else tome.patch_timm(model, r=4)
    merged = patched(x)  # with autograd on: the runtime then holds non-leaf tensors, which must not be copied
    twin = copy.deepcopy(patched)
    assert twin.mame.state is None
    with torch.no_grad():
        torch.testing.assert_close(twin(x), merged.detach())
        assert twin.mame.last_token_counts == patched.mame.last_token_counts
        mame.unpatch(twin)  # undoes the copy's own classes and hooks, not the original's
        _assert_pristine(twin)
        assert torch.equal(twin(x), ref)
        torch.testing.assert_close(patched(x), merged.detach())


def test_patching_twice_second_settings_win_and_one_unpatch_restores():
    model = layerscale_vit()
    x = images()
    with torch.no_grad():
        ref = model(x)
        mame.patch.timm(model, tau=-1.0, layers=3, batch_rule="per_sample")
        model(x)
        assert model.mame.last_token_counts[-1] < 21
        mame.patch.timm(model, tau=1.0, layers=2, batch_rule="any")
        # One level of subclassing, not a subclass of a subclass.
        assert type(model).__mro__[1:].count(VisionTransformer) == 1
        assert type(model).__bases__[-1] is VisionTransformer
        for block in model.blocks:
            assert type(block).__bases__[-1] is Block
        assert model.mame.settings["tau"] == (1.0, 1.0)
        assert model.mame.settings["batch_rule"] == "any"
        assert model.mame.layers == (0, 1)
        out = model(x)
        assert model.mame.last_token_counts == [21, 21, 21]
        assert all(isinstance(c, int) for c in model.mame.last_token_counts)  # "any": no ragged state
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
        mame.unpatch(model)
        _assert_pristine(model)
        assert torch.equal(model(x), ref)


# ----------------------------------------------------------------------------------------------------------------
# eqs 11-13 by hand


def manual_attention(attn: nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """timm's `Attention` written out (softmax of scaled logits plus an additive per-key bias), without SDPA."""
    batch, length, dim = x.shape
    qkv = attn.qkv(x).reshape(batch, length, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = attn.q_norm(qkv[0]), attn.k_norm(qkv[1]), qkv[2]
    logits = (q * attn.head_dim ** -0.5) @ k.transpose(-1, -2)
    if bias is not None:
        logits = logits + bias[:, None, None, :]
    out = (logits.softmax(-1) @ v).transpose(1, 2).reshape(batch, length, dim)
    return attn.proj(attn.norm(out))


def reference_block(block: nn.Module, x: torch.Tensor, tau: float, num_special: int, sizes=None,
                    batch_rule: str = "any", proportional: bool = False):
    """Eqs 11-13 with LayerScale, written against timm's submodules (no padding in the input).
    ``proportional``: ToMe's proportional attention, log(size) added to the logits of each key."""
    if proportional:
        bias = None if sizes is None else sizes.log()
        x1 = x + block.ls1(manual_attention(block.attn, block.norm1(x), bias))  # eq 11
    else:
        x1 = x + block.ls1(block.attn(block.norm1(x)))  # eq 11
    y, plan = mame.merge(x1, tau, num_special, batch_rule=batch_rule, sizes=sizes)  # eq 12
    x2 = y + block.ls2(block.mlp(block.norm2(y)))  # eq 13
    if plan.mask is not None:
        x2 = x2 * plan.mask.unsqueeze(-1)  # padding carries no value
    return x2, plan


def duplicated_tokens(batch: int, length: int, num_special: int, seed: int = 5) -> torch.Tensor:
    """Random tokens where some sources (even offsets after the specials) copy their right-hand destination and the
    destination on their left is a noisy copy too. (A source similar to a single destination never merges under
    eqs 5-8 at tau >= 0: its one weight equals the column mean zeta and is pruned; two unequal candidates survive.)"""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, length, EMBED, generator=gen)
    for b, offsets in enumerate([(2, 6, 10), (2, 6, 10, 14)]):  # the second sample has one more duplicate
        for offset in offsets:
            dst = x[b, num_special + offset + 1]
            x[b, num_special + offset] = dst
            x[b, num_special + offset - 1] = dst + 0.25 * torch.randn(EMBED, generator=gen)
    return x


@pytest.mark.parametrize("batch_rule", ["any", "per_sample"])
@pytest.mark.parametrize("tau, crafted", [(0.9, True), (0.0, False), (-0.5, False)])
def test_patched_block_matches_eqs_11_to_13(tau, crafted, batch_rule):
    model = layerscale_vit()
    num_special, length = model.num_prefix_tokens, 5 + 16
    x = duplicated_tokens(2, length, num_special) if crafted \
        else torch.randn(2, length, EMBED, generator=torch.Generator().manual_seed(7))
    block = model.blocks[0]
    with torch.no_grad():
        expected, plan = reference_block(block, x, tau, num_special, batch_rule=batch_rule)
        assert plan.num_tokens_out < length, "the case must merge tokens"
        mame.patch.timm(model, tau=tau, layers=3, batch_rule=batch_rule, preset="paper")
        got = model.blocks[0](x)
    assert got.shape == expected.shape
    state = model.mame.state
    if batch_rule == "per_sample" and not bool(plan.mask.all()):
        assert state.mask is not None and torch.equal(state.mask, plan.mask)
        got = got * state.mask.unsqueeze(-1)  # compare real tokens only
        assert model.mame.last_token_counts == [float(plan.lengths.float().mean())]
    else:  # the paper's rule, or samples that kept equal lengths: no padding mask is carried
        assert state.mask is None
        assert model.mame.last_token_counts == [plan.num_tokens_out]
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(state.sizes, plan.sizes)
    if crafted:
        # Only the crafted duplicates merge: 3 in the first sample, 4 in the second.
        assert plan.lengths.tolist() == ([length - 3, length - 4] if batch_rule == "per_sample" else [length - 3] * 2)
    # The LayerScale gammas matter here: without them the block gives something else.
    with torch.no_grad():
        y = plan.merge(x + block.attn(block.norm1(x)))
        no_ls = y + block.mlp(block.norm2(y))
    if no_ls.shape == got.shape:
        assert (no_ls - got).abs().max() > 1e-3


@pytest.mark.parametrize("batch_rule, batch, proportional", [("any", 2, False), ("per_sample", 1, False),
                                                            ("any", 2, True)])
def test_whole_model_matches_hand_written_forward_with_sizes(batch_rule, batch, proportional):
    """A full forward by hand (eqs 11-13 in every block, sizes carried) against the patched model (token pool)."""
    model = make_vit("dinov2_reg", depth=3)
    randomise_layerscale(model)
    x = images(batch)
    taus = (0.0, -0.3, 0.2)
    with torch.no_grad():
        t = model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(x))))
        sizes, counts = None, []
        for block, tau in zip(model.blocks, taus):
            t, plan = reference_block(block, t, tau, model.num_prefix_tokens, sizes, batch_rule, proportional)
            sizes = plan.sizes
            counts.append(t.shape[1])
        feat_ref = model.norm(t)
        out_ref = model.head(model.fc_norm(feat_ref[:, 0]))
        mame.patch.timm(model, tau=list(taus), layers=3, batch_rule=batch_rule,
                        proportional_attention=proportional, preset="paper")
        out = model(x)
        assert model.mame.last_token_counts == counts
        feat = model.forward_features(x)
    assert counts[-1] < 21
    torch.testing.assert_close(feat, feat_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out, out_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(model.mame.state.sizes, sizes)


# ----------------------------------------------------------------------------------------------------------------
# token counts, per-sample merging, pooling


def test_last_token_counts_one_per_block_and_decreasing():
    model = make_vit("deit", depth=4)
    x = images()
    with torch.no_grad():
        mame.patch.timm(model, tau=1.0, layers=4, batch_rule="any")
        model(x)
        assert model.mame.last_token_counts == [17, 17, 17, 17]
        mame.patch.timm(model, tau=-1.0, layers=[1, 2], batch_rule="any")
        model(x)
        counts = model.mame.last_token_counts
    assert len(counts) == 4
    assert counts[0] == 17  # block 0 does not merge
    assert counts[1] < counts[0] and counts[2] < counts[1]
    assert counts[3] == counts[2]  # block 3 does not merge
    # tau = -1: every source joins some destination, so each merge keeps specials + destinations only.
    assert counts[1] == 1 + 8 and counts[2] == 1 + 4


@pytest.mark.parametrize("batch_rule", ["any", "per_sample"])
def test_model_state_sizes_sum_to_patch_count(batch_rule):
    model = make_vit("dinov2_reg")
    with torch.no_grad():
        mame.patch.timm(model, tau=0.0, layers=3, batch_rule=batch_rule)
        feat = model.forward_features(images())
    sizes = model.mame.state.sizes
    assert sizes.shape == feat.shape[:2]
    torch.testing.assert_close(sizes[:, 5:].sum(1), torch.full((2,), 16.0))
    torch.testing.assert_close(sizes[:, :5], torch.ones(2, 5))


def mixed_images() -> torch.Tensor:
    """A flat-colour image, a noise image and a half/half one: they merge very differently."""
    gen = torch.Generator().manual_seed(11)
    flat = torch.empty(3, 32, 32)
    flat[0], flat[1], flat[2] = 0.3, -0.5, 0.1
    noise = torch.randn(3, 32, 32, generator=gen)
    half = noise.clone()
    half[:, :16] = flat[:, :16]
    return torch.stack([flat, noise, half])


@pytest.mark.parametrize("config", ["deit", "avg_no_cls", "dinov2_reg", "map", "qknorm_gated"])
def test_per_sample_batch_equals_batch_of_one(config):
    model = make_vit(config)
    x = mixed_images()
    with torch.no_grad():
        mame.patch.timm(model, tau=0.7, layers=3, batch_rule="per_sample")
        feat = model.forward_features(x)
        pre = model.forward_head(feat, pre_logits=True)
        out = model(x)
        mask, lengths = model.mame.state.mask, model.mame.state.counts[-1]
        assert mask is not None
        assert len(set(lengths.tolist())) == 3, f"the images must merge differently, got lengths {lengths}"
        for b in range(3):
            single_feat = model.forward_features(x[b:b + 1])
            single_pre = model.forward_head(single_feat, pre_logits=True)
            assert single_feat.shape[1] == int(lengths[b])
            torch.testing.assert_close(feat[b:b + 1, :int(lengths[b])], single_feat, atol=1e-4, rtol=1e-4)
            torch.testing.assert_close(pre[b:b + 1], single_pre, atol=1e-4, rtol=1e-4)
            torch.testing.assert_close(out[b:b + 1], model(x[b:b + 1]), atol=1e-4, rtol=1e-4)
        assert bool(mask.sum(1).eq(lengths).all())
        # The paper's batch rule makes every image keep the union of preserved tokens, so the flat image changes.
        mame.patch.timm(model, tau=0.7, layers=3, batch_rule="any")
        pre_any = model.forward_head(model.forward_features(x), pre_logits=True)
        single = model.forward_head(model.forward_features(x[:1]), pre_logits=True)
    assert (pre_any[:1] - single).abs().max() > 1e-4


@pytest.mark.parametrize("options", [dict(size_weighted=True), dict(proportional_attention=False),
                                     dict(packed=False), dict(prune=False), dict(tau=[0.9, 0.4, 0.6]),
                                     dict(metric="keys"), dict(metric="keys_mean")])
def test_per_sample_batch_equals_batch_of_one_for_every_option(options):
    model = layerscale_vit()
    x = mixed_images()
    with torch.no_grad():
        mame.patch.timm(model, **{"tau": 0.7, "layers": 3, **options})
        out = model(x)
        lengths = model.mame.state.counts[-1]
        assert len(set(lengths.tolist())) > 1, "the images must merge differently"
        singles = torch.cat([model(x[b : b + 1]) for b in range(len(x))])
    torch.testing.assert_close(out, singles, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("metric", ["keys", "keys_mean"])
def test_metric_on_attention_keys_matches_hand_written_block(metric):
    """metric="keys" / "keys_mean": the similarity (eq 2) is computed on the block's attention keys (all heads side
    by side, or their mean over heads as ToMe does), and the tokens x' are fused with those weights."""
    model = layerscale_vit()
    block = model.blocks[0]
    x = torch.randn(2, 21, EMBED, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        normed = block.norm1(x)
        keys = block.attn.qkv(normed).view(2, 21, 3, 4, EMBED // 4)[:, :, 1]
        features = keys.mean(2) if metric == "keys_mean" else keys.reshape(2, 21, EMBED)
        x1 = x + block.ls1(block.attn(normed))
        y, plan = mame.merge(x1, 0.2, model.num_prefix_tokens, metric=features)
        expected = y + block.ls2(block.mlp(block.norm2(y)))
        on_tokens, _ = mame.merge(x1, 0.2, model.num_prefix_tokens)
        assert plan.num_tokens_out < 21 and on_tokens.shape != y.shape  # the metric changes what merges
        mame.patch.timm(model, tau=0.2, layers=3, batch_rule="any", metric=metric, preset="paper")
        got = model.blocks[0](x)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert model.mame.settings["metric"] == metric


def test_rejects_unknown_metric():
    model = make_vit("deit")
    with pytest.raises(ValueError, match="metric must be one of"):
        mame.patch.timm(model, tau=0.5, layers=3, metric="values")
    _assert_pristine(model)


def patched_avg_pool(x: torch.Tensor, tau: float, batch_rule: str):
    """An avg-pool ViT patched on 3 blocks: (model, features, token state, pooled features) for ``x``."""
    model = make_vit("avg_no_cls")
    with torch.no_grad():
        mame.patch.timm(model, tau=tau, layers=3, batch_rule=batch_rule)
        feat = model.forward_features(x)
        return model, feat, model.mame.state, model.pool(feat)


def test_avg_pool_is_size_weighted():
    x = images()
    model, feat, state, pooled = patched_avg_pool(x, tau=0.0, batch_rule="any")
    sizes = state.sizes
    assert feat.shape[1] < 16 and sizes.shape == feat.shape[:2]
    assert not bool((sizes == sizes[:, :1]).all()), "sizes must differ for the check to mean anything"
    with torch.no_grad():
        pre = model.forward_head(feat, pre_logits=True)
        out = model(x)
    manual = (feat * sizes.unsqueeze(-1)).sum(1) / sizes.sum(1, keepdim=True)
    torch.testing.assert_close(pooled, manual, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(pre, model.fc_norm(manual), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out, model.head(model.fc_norm(manual)), atol=1e-5, rtol=1e-5)
    assert (pooled - feat.mean(1)).abs().max() > 1e-4  # the unweighted mean is different


def test_avg_pool_per_sample_ignores_padding():
    _, feat, state, pooled = patched_avg_pool(mixed_images(), tau=0.7, batch_rule="per_sample")
    assert state.mask is not None and not bool(state.mask.all())
    w = state.sizes * state.mask
    manual = (feat * w.unsqueeze(-1)).sum(1) / w.sum(1, keepdim=True)
    torch.testing.assert_close(pooled, manual, atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------------------------------------------
# errors


def test_rejects_non_vit_models():
    with pytest.raises(ValueError, match="ResNet"):
        mame.patch.timm(timm.create_model("resnet18", pretrained=False))
    with pytest.raises(ValueError, match="Linear"):
        mame.patch.timm(nn.Linear(4, 4))


@pytest.mark.parametrize("layers", [4, -1, [3], [0, 0], [-1]])
def test_rejects_layers_out_of_range(layers):
    with pytest.raises(ValueError, match="layers"):
        mame.patch.timm(make_vit("deit", depth=3), tau=0.5, layers=layers)


@pytest.mark.parametrize("layers", [True, 2.5, "3", (1.0, 2.0)])
def test_rejects_layers_of_the_wrong_type(layers):
    with pytest.raises(TypeError, match="layers"):
        mame.patch.timm(make_vit("deit", depth=3), tau=0.5, layers=layers)


@pytest.mark.parametrize("tau, error", [(1.5, ValueError), (-1.01, ValueError), (float("nan"), ValueError),
                                        ([0.5, 2.0, 0.5], ValueError), ([0.5, 0.5], ValueError),
                                        (True, TypeError), ("0.8", TypeError), ([0.5, None, 0.5], TypeError)])
def test_rejects_bad_tau(tau, error):
    model = make_vit("deit")
    with pytest.raises(error, match="tau"):
        mame.patch.timm(model, tau=tau, layers=3)
    _assert_pristine(model)


def test_rejects_length_dependent_partition_with_per_sample_merging_in_several_blocks():
    """sequential/random split a padded sample differently from the sample alone, so only one merging block (whose
    input is never ragged) or the paper's batch rule can keep the per-sample promise."""
    with pytest.raises(ValueError, match="partition='sequential' with batch_rule='per_sample'"):
        mame.patch.timm(make_vit("deit"), tau=0.5, layers=2, partition="sequential")
    for options in (dict(layers=[1], batch_rule="per_sample"), dict(layers=3, batch_rule="any")):
        model = mame.patch.timm(make_vit("deit"), tau=0.0, partition="random", **options)
        x = images(3)
        with torch.no_grad():
            batch = model(x)
            singles = torch.cat([model(x[i : i + 1]) for i in range(3)])
        if options["batch_rule"] == "per_sample":
            torch.testing.assert_close(batch, singles, atol=1e-5, rtol=0)


def test_check_refuses_non_finite_images_and_is_off_by_default():
    bad = images()
    bad[1, 0, 3, 3] = float("nan")
    with torch.no_grad():
        out = mame.patch.timm(make_vit("deit"), tau=0.5, layers=3)(bad)  # documented: NaN in, NaN out
        assert out[1].isnan().all() and not out[0].isnan().any()
        with pytest.raises(ValueError, match="NaN or Inf"):
            mame.patch.timm(make_vit("deit"), tau=0.5, layers=3, check=True)(bad)


def test_rejects_bad_batch_rule_and_leaves_model_untouched():
    model = make_vit("deit")
    with pytest.raises(ValueError, match="batch_rule"):
        mame.patch.timm(model, tau=0.5, layers=3, batch_rule="all")
    _assert_pristine(model)


def test_rejects_attention_mask():
    model = make_vit("deit")
    x = images()
    mame.patch.timm(model, tau=0.5, layers=3)
    with pytest.raises(ValueError, match="mame-patched Block cannot honour attn_mask"):
        model(x, attn_mask=torch.zeros(2, 1, 17, 17))
    with pytest.raises(ValueError):
        model.blocks[0](torch.randn(2, 17, EMBED), attn_mask=torch.zeros(2, 1, 17, 17))


# ----------------------------------------------------------------------------------------------------------------
# gradients and unmerging


@pytest.mark.parametrize("config, batch_rule", [("dinov2_reg", "any"), ("avg_no_cls", "per_sample"),
                                                 ("map", "any")])
def test_gradients_reach_every_parameter(config, batch_rule):
    model = make_vit(config)
    model.train()
    mame.patch.timm(model, tau=0.0, layers=3, batch_rule=batch_rule)
    x = images()
    out = model(x)
    assert model.mame.last_token_counts[-1] < 16 + model.num_prefix_tokens  # tokens really merged
    (out.sum() + model.forward_features(x).sum()).backward()
    missing = [name for name, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, f"no gradient for {missing}"
    for name, p in model.named_parameters():
        assert torch.isfinite(p.grad).all(), name
    if config == "dinov2_reg":
        assert model.blocks[0].ls1.gamma.grad.abs().sum() > 0 and model.blocks[2].ls2.gamma.grad.abs().sum() > 0
        assert model.reg_token.grad.abs().sum() > 0


@pytest.mark.parametrize("batch_rule", ["any", "per_sample"])
def test_unmerge_through_model(batch_rule):
    model = make_vit("dinov2_reg")
    x = images()
    with torch.no_grad():
        ref_feat = model.forward_features(x)
        mame.patch.timm(model, tau=1.0, layers=3, batch_rule=batch_rule)
        feat = model.forward_features(x)
        torch.testing.assert_close(model.mame.unmerge(feat), ref_feat, atol=1e-5, rtol=0)
        mame.patch.timm(model, tau=-0.2, layers=3, batch_rule=batch_rule)
        feat = model.forward_features(x)
        assert feat.shape[1] < ref_feat.shape[1]
        full = model.mame.unmerge(feat)
        assert full.shape == ref_feat.shape
        torch.testing.assert_close(full[:, :5], feat[:, :5])  # specials stay in place
        # A value that is the same on every real output token comes back the same on every input token.
        const = torch.arange(EMBED, dtype=torch.float32).expand(2, feat.shape[1], EMBED).clone()
        torch.testing.assert_close(model.mame.unmerge(const), torch.arange(EMBED, dtype=torch.float32).expand(2, 21, EMBED))


@pytest.mark.parametrize("batch_rule", ["any", "per_sample"])
def test_unmerge_single_merge_by_hand(batch_rule):
    """One merging block: each input token gets its own output token, or for an absorbed source the
    share-weighted sum of the destinations that absorbed it."""
    model = make_vit("deit")
    x = mixed_images()[[0, 2]]  # flat and half/half: some sources absorbed, some kept
    with torch.no_grad():
        mame.patch.timm(model, tau=0.5, layers=1, batch_rule=batch_rule)
        feat = model.forward_features(x)
        (plan,) = model.mame.last_plans
        full = model.mame.unmerge(feat)
    s, dst, src = plan.num_special, plan.dst_idx.tolist(), plan.src_idx.tolist()
    weights = plan.weights
    expected = torch.zeros(2, 17, EMBED)
    for b in range(2):
        if batch_rule == "per_sample" and not bool((weights[b] > 0).any()):
            expected[b] = feat[b]  # nothing merged in this image: it keeps its own token order
            continue
        kept = [j for j in range(len(src)) if bool(plan.preserved[b, j])]
        absorbed = [j for j in range(len(src)) if weights[b, :, j].sum() > 0]
        assert sorted(kept + absorbed) == list(range(len(src)))
        expected[b, :s] = feat[b, :s]
        for i, pos in enumerate(dst):
            expected[b, pos] = feat[b, s + i]
        for rank, j in enumerate(kept):
            expected[b, src[j]] = feat[b, s + len(dst) + rank]
        for j in absorbed:
            column = weights[b, :, j] / weights[b, :, j].sum()
            expected[b, src[j]] = sum(column[i] * feat[b, s + i] for i in range(len(dst)))
    assert bool((weights.sum(1) > 0).any()) and bool(plan.preserved.any()), "need absorbed and kept sources"
    torch.testing.assert_close(full, expected, atol=1e-5, rtol=1e-5)


def test_unmerge_after_training_forward_raises():
    model = make_vit("deit")
    mame.patch.timm(model, tau=0.0, layers=3)
    model.train()
    feat = model.forward_features(images())
    with pytest.raises(RuntimeError):
        model.mame.unmerge(feat)
