"""ToMe baseline (`mame.baselines.tome`) against brute-force references written with plain loops.

The references transcribe the official implementation's behaviour (facebookresearch/ToMe, `tome/merge.py` and
`tome/patch/timm.py`), written here from its description: A = even and B = odd positions of the whole sequence
(class token included), the class token's row of scores -inf (it never merges), the distillation token's column
-inf (it receives nothing) -- generalised to every prefix token by its parity --, each A token's best B by cosine
of the keys averaged over heads, the r best A tokens merged into their B by size-weighted averaging, at most
(T - protected) // 2 per block, proportional attention with log(size).

Scores in the random cases are continuous, so ties (where any order would be right) do not occur; each case also
checks the gap between the scores that decide the matching so a near-tie cannot make the comparison ambiguous.
"""

from __future__ import annotations

import pytest
import timm
import torch
from torch import nn

from mame.baselines import tome
from timm.models.vision_transformer import Block, VisionTransformer

EMBED = 64


def make_vit(*, depth: int = 3, img_size: int = 32, seed: int = 0, **kwargs) -> nn.Module:
    torch.manual_seed(seed)
    model = timm.create_model("vit_small_patch16_224", pretrained=False, depth=depth, embed_dim=EMBED, num_heads=4,
                              img_size=img_size, patch_size=8, num_classes=10, **kwargs)
    return model.eval()


def dinov2_like(**extra) -> nn.Module:
    """Registers + LayerScale with non-trivial gammas: what the original ToMe patch got wrong."""
    model = make_vit(reg_tokens=4, init_values=1e-1, no_embed_class=True, **extra)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for block in model.blocks:
            for ls in (block.ls1, block.ls2):
                ls.gamma.copy_(0.2 + 0.6 * torch.rand(ls.gamma.shape, generator=gen))
    return model


def images(batch: int = 2, size: int = 32, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------------------------------------------
# brute-force references


def cosine(u: torch.Tensor, v: torch.Tensor) -> float:
    return float(torch.dot(u, v) / (u.norm() * v.norm()))


def brute_matching(metric: torch.Tensor, r: int, num_protected: int = 0) -> list[dict[int, int]]:
    """Per sample: {A index -> B index} for the r merged A tokens. A = even positions, B = odd positions of the
    whole sequence; protected A tokens propose nothing and protected B tokens accept nothing; each other A token
    picks its most similar unprotected B token, and the r A tokens with the highest such similarity merge."""
    result = []
    for sample in metric:
        proposals = []
        for i in range(0, len(sample), 2):
            if i < num_protected:
                continue
            candidates = [j for j in range(1, len(sample), 2) if j >= num_protected]
            best = max(candidates, key=lambda j: cosine(sample[i], sample[j]))
            proposals.append((cosine(sample[i], sample[best]), i // 2, best // 2))
        proposals.sort(key=lambda p: -p[0])
        result.append({i: j for _, i, j in proposals[:r]})
    return result


def decision_gap(metric: torch.Tensor, r: int, num_protected: int = 0) -> float:
    """Smallest margin in the decisions of the matching (best vs second-best B, r-th vs (r+1)-th A)."""
    gaps = []
    for sample in metric:
        best_scores = []
        for i in range(num_protected + (num_protected % 2), len(sample), 2):
            scores = sorted((cosine(sample[i], sample[j]) for j in range(1, len(sample), 2) if j >= num_protected),
                            reverse=True)
            if len(scores) > 1:
                gaps.append(scores[0] - scores[1])
            best_scores.append(scores[0])
        best_scores.sort(reverse=True)
        if 0 < r < len(best_scores):
            gaps.append(best_scores[r - 1] - best_scores[r])
    return min(gaps) if gaps else 1.0


def brute_merge(x: torch.Tensor, sizes: torch.Tensor, metric: torch.Tensor, r: int, num_special: int):
    """Size-weighted merge by loops: [specials, kept A tokens in order, B tokens in order], each B token the
    size-weighted mean of itself and the A tokens that joined it; sizes add up."""
    length = x.shape[1]
    r = min(r, (length - num_special) // 2)
    if r <= 0:
        return x, sizes  # nothing merges: ToMe leaves the sequence as it is (no reordering)
    matches = brute_matching(metric.double(), r, num_special)
    outs, out_sizes = [], []
    for b, match in enumerate(matches):
        rows = [x[b, i] for i in range(num_special)]
        row_sizes = [sizes[b, i] for i in range(num_special)]
        for pos in range(num_special + num_special % 2, length, 2):  # unprotected A tokens
            if pos // 2 not in match:
                rows.append(x[b, pos])
                row_sizes.append(sizes[b, pos])
        for pos in range(num_special + 1 - num_special % 2, length, 2):  # unprotected B tokens
            group = [pos] + [2 * i for i, target in match.items() if target == pos // 2]
            total = sum(sizes[b, p] for p in group)
            rows.append(sum(sizes[b, p] * x[b, p] for p in group) / total)
            row_sizes.append(total)
        outs.append(torch.stack(rows))
        out_sizes.append(torch.stack(row_sizes))
    return torch.stack(outs), torch.stack(out_sizes)


def manual_attention(attn: nn.Module, x: torch.Tensor, bias: torch.Tensor | None):
    """timm's `Attention` written out with an additive per-key bias; also returns ToMe's metric (keys, mean over
    heads, before any qk-norm)."""
    batch, length, dim = x.shape
    qkv = attn.qkv(x).reshape(batch, length, 3, attn.num_heads, attn.head_dim)
    keys = qkv[:, :, 1].mean(2)
    qkv = qkv.permute(2, 0, 3, 1, 4)
    q, k, v = attn.q_norm(qkv[0]), attn.k_norm(qkv[1]), qkv[2]
    logits = (q * attn.head_dim ** -0.5) @ k.transpose(-1, -2)
    if bias is not None:
        logits = logits + bias[:, None, None, :]
    out = (logits.softmax(-1) @ v).transpose(1, 2).reshape(batch, length, dim)
    return attn.proj(attn.norm(out)), keys


def official_merge(x: torch.Tensor, sizes: torch.Tensor, keys: torch.Tensor, r: int, num_special: int):
    """`brute_merge` vectorised per sample (fast enough for the real model), written independently of the product:
    each sample's token list is rebuilt from explicit position lists rather than gathered from A/B halves."""
    length = x.shape[1]
    r = min(r, (length - num_special) // 2)
    if r <= 0:
        return x, sizes
    a_pos = torch.arange(0, length, 2)
    b_pos = torch.arange(1, length, 2)
    unit = keys / keys.norm(dim=-1, keepdim=True)
    scores = unit[:, a_pos] @ unit[:, b_pos].transpose(1, 2)
    scores[:, a_pos < num_special] = float("-inf")
    scores[:, :, b_pos < num_special] = float("-inf")
    outs, out_sizes = [], []
    for b in range(x.shape[0]):
        best, target = scores[b].max(dim=1)
        merged = best.sort(descending=True).indices[:r]
        total_x, total_size = x[b] * sizes[b, :, None], sizes[b].clone()
        for i in merged.tolist():
            j = int(b_pos[target[i]])
            total_x[j] += total_x[a_pos[i]]
            total_size[j] += total_size[a_pos[i]]
        gone = set(a_pos[merged].tolist())
        order = (list(range(num_special)) + [int(p) for p in a_pos if p >= num_special and int(p) not in gone]
                 + [int(p) for p in b_pos if p >= num_special])
        outs.append(torch.cat([x[b, :num_special], total_x[order[num_special:]]
                               / total_size[order[num_special:], None]]))
        out_sizes.append(total_size[order])
    return torch.stack(outs), torch.stack(out_sizes)


def reference_tome_features(model: nn.Module, x: torch.Tensor, rs, proportional: bool = True, merge=brute_merge):
    """The official ToMe forward by hand, with the model's LayerScale: attention (+ log size), merge, MLP."""
    t = model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(x))))
    sizes = torch.ones(t.shape[:2])
    counts = []
    for block, r in zip(model.blocks, rs):
        attended, keys = manual_attention(block.attn, block.norm1(t), sizes.log() if proportional else None)
        t = t + block.ls1(attended)
        t, sizes = merge(t, sizes, keys, r, model.num_prefix_tokens)
        t = t + block.ls2(block.mlp(block.norm2(t)))
        counts.append(t.shape[1])
    return model.norm(t), sizes, counts


# ----------------------------------------------------------------------------------------------------------------
# bipartite_soft_matching and merge_weighted


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("tokens, r, protected", [(8, 1, 0), (8, 4, 0), (11, 3, 1), (16, 5, 1), (9, 4, 1),
                                                  (12, 0, 1), (13, 4, 2), (21, 8, 5)])
def test_bipartite_soft_matching_against_brute_force(tokens, r, protected, seed):
    gen = torch.Generator().manual_seed(seed)
    metric = torch.randn(2, tokens, 6, generator=gen, dtype=torch.float64)
    assert decision_gap(metric, r, protected) > 1e-9
    kept_a, merged_a, target_b = tome.bipartite_soft_matching(metric, r, protected)
    expected = brute_matching(metric, r, protected)
    num_a = (tokens + 1) // 2
    assert kept_a.shape == (2, num_a - r) and merged_a.shape == (2, r) and target_b.shape == (2, r)
    for b in range(2):
        got = dict(zip(merged_a[b].tolist(), target_b[b].tolist()))
        assert len(got) == r
        assert got == expected[b]
        assert kept_a[b].tolist() == sorted(set(range(num_a)) - set(expected[b]))


def test_class_token_takes_part_in_the_partition():
    """The official partition alternates over the whole sequence: with a class token at position 0, patch 1 is in
    B and patch 2 in A -- the reverse of alternating over the patches alone. Tokens: [cls, p1, p2, p3, p4] with
    p2 = p1 (up to scale) and p4 = p3: ToMe merges p2 into p1 (A -> B); the class token, though parallel to p1,
    is protected."""
    u, v = torch.tensor([1.0, 0.0, 0.0]), torch.tensor([0.0, 1.0, 0.0])
    metric = torch.stack([u, u, 2 * u, v + 0.1, v]).unsqueeze(0)
    kept_a, merged_a, target_b = tome.bipartite_soft_matching(metric, 1, num_protected=1)
    assert merged_a.tolist() == [[1]] and target_b.tolist() == [[0]]  # A index 1 = position 2 -> B index 0 = p1
    assert kept_a.tolist() == [[0, 2]]  # the class token (A index 0) stays
    x = torch.arange(5.0).view(1, 5, 1)
    merged, sizes = tome.merge_weighted(x, torch.ones(1, 5), metric, 1, 1)
    assert merged.flatten().tolist() == [0.0, 4.0, 1.5, 3.0]  # [cls, kept A (p4), B (p1 + p2, p3)]
    assert sizes.flatten().tolist() == [1.0, 1.0, 2.0, 1.0]


def test_bipartite_soft_matching_ignores_scale():
    gen = torch.Generator().manual_seed(0)
    metric = torch.randn(1, 10, 4, generator=gen, dtype=torch.float64)
    scaled = metric * torch.rand(1, 10, 1, generator=gen, dtype=torch.float64).add(0.1) * 7
    for u, v in zip(tome.bipartite_soft_matching(metric, 3), tome.bipartite_soft_matching(scaled, 3)):
        assert torch.equal(u, v)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("num_special, tokens, r", [(1, 16, 4), (5, 16, 8), (0, 11, 3), (2, 9, 20), (1, 10, 0)])
def test_merge_weighted_against_brute_force(num_special, tokens, r, seed):
    gen = torch.Generator().manual_seed(100 + seed)
    length = num_special + tokens
    x = torch.randn(2, length, 5, generator=gen, dtype=torch.float64)
    sizes = torch.randint(1, 5, (2, length), generator=gen).double()
    metric = torch.randn(2, length, 7, generator=gen, dtype=torch.float64)
    r_eff = min(r, tokens // 2)
    assert decision_gap(metric, r_eff, num_special) > 1e-9
    got_x, got_sizes = tome.merge_weighted(x, sizes, metric, r, num_special)
    ref_x, ref_sizes = brute_merge(x, sizes, metric, r, num_special)
    assert got_x.shape == (2, length - r_eff, 5)
    torch.testing.assert_close(got_x, ref_x)
    torch.testing.assert_close(got_sizes, ref_sizes)
    assert torch.equal(got_x[:, :num_special], x[:, :num_special])  # specials untouched
    assert torch.equal(got_sizes[:, :num_special], sizes[:, :num_special])
    torch.testing.assert_close(got_sizes.sum(1), sizes.sum(1))  # no size is lost or made up


def test_merge_weighted_sizes_matter():
    """Two tokens of sizes 3 and 1 merge to (3 a + b) / 4, not (a + b) / 2."""
    x = torch.tensor([[[0.0], [4.0], [8.0]]])  # special, A, B
    metric = torch.tensor([[[1.0, 0.0], [1.0, 0.1], [1.0, 0.2]]])
    sizes = torch.tensor([[1.0, 3.0, 1.0]])
    got_x, got_sizes = tome.merge_weighted(x, sizes, metric, 1, 1)
    torch.testing.assert_close(got_x, torch.tensor([[[0.0], [5.0]]]))
    torch.testing.assert_close(got_sizes, torch.tensor([[1.0, 4.0]]))


# ----------------------------------------------------------------------------------------------------------------
# the patched model


@pytest.mark.parametrize("config", ["deit", "dinov2_reg", "map", "avg"])
def test_r_zero_equals_unpatched(config):
    model = {"deit": make_vit, "dinov2_reg": dinov2_like, "map": lambda: make_vit(global_pool="map"),
             "avg": lambda: make_vit(class_token=False, global_pool="avg")}[config]()
    x = images()
    with torch.no_grad():
        ref, ref_feat = model(x), model.forward_features(x)
        tome.patch_timm(model, r=0)
        out, feat = model(x), model.forward_features(x)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(feat, ref_feat, atol=1e-5, rtol=0)
    assert model.mame.last_token_counts == [ref_feat.shape[1]] * 3


@pytest.mark.parametrize("proportional", [True, False])
def test_patched_model_matches_hand_written_tome_with_layerscale(proportional):
    model = dinov2_like()
    x = images()
    rs = (4, 3, 2)
    with torch.no_grad():
        ref_feat, ref_sizes, counts = reference_tome_features(model, x, rs, proportional)
        ref_out = model.head(model.fc_norm(ref_feat[:, 0]))
        tome.patch_timm(model, r=list(rs), proportional_attention=proportional)
        feat = model.forward_features(x)
        out = model(x)
    assert counts == [21 - 4, 21 - 7, 21 - 9]
    assert model.mame.last_token_counts == counts
    torch.testing.assert_close(feat, ref_feat, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(model.mame.state.sizes, ref_sizes)
    # The same forward without LayerScale (what the original ToMe patch computed) is far off.
    with torch.no_grad():
        for block in model.blocks:
            block.ls1.gamma.fill_(1.0)
            block.ls2.gamma.fill_(1.0)
        assert (model.forward_features(x) - ref_feat).abs().max() > 1e-2


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("r", [1, 3, 6, 20])
@pytest.mark.parametrize("config", ["deit", "dinov2_reg"])
def test_patched_model_matches_the_official_algorithm(config, r, batch):
    """The whole patched model against the transcription of the official algorithm, one image and batches, for r
    from one token per block up to the cap (20 > half of what is left)."""
    model = dinov2_like() if config == "dinov2_reg" else make_vit()
    x = images(batch, seed=10 + r)
    with torch.no_grad():
        ref_feat, ref_sizes, counts = reference_tome_features(model, x, (r,) * 3, proportional=True)
        tome.patch_timm(model, r=r)
        feat = model.forward_features(x)
    assert model.mame.last_token_counts == counts
    torch.testing.assert_close(feat, ref_feat, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(model.mame.state.sizes, ref_sizes)


def test_avg_pool_weighs_merged_tokens_by_size():
    model = make_vit(class_token=False, global_pool="avg")
    x = images()
    with torch.no_grad():
        tome.patch_timm(model, r=3)
        feat = model.forward_features(x)
        sizes = model.mame.state.sizes
        pooled = model.pool(feat)
    manual = (feat * sizes.unsqueeze(-1)).sum(1) / sizes.sum(1, keepdim=True)
    torch.testing.assert_close(pooled, manual, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(sizes.sum(1), torch.full((2,), 16.0))


def test_token_counts_drop_by_r_per_block():
    model = make_vit(depth=4, img_size=48)  # 36 patch tokens + class token
    with torch.no_grad():
        tome.patch_timm(model, r=4)
        model(images(size=48))
    assert model.mame.last_token_counts == [33, 29, 25, 21]


def test_token_counts_bounded_by_half():
    model = make_vit(depth=4)  # 16 patch tokens
    with torch.no_grad():
        tome.patch_timm(model, r=10)
        model(images())
    # At most half of the non-special tokens merge per block: 16 -> 8 -> 4 -> 2 -> 1.
    assert model.mame.last_token_counts == [9, 5, 3, 2]


def test_registers_never_merge():
    model = dinov2_like()
    x = images()
    with torch.no_grad():
        tome.patch_timm(model, r=8)
        feat = model.forward_features(x)
    sizes = model.mame.state.sizes
    assert model.mame.last_token_counts == [5 + 8, 5 + 4, 5 + 2]
    torch.testing.assert_close(sizes[:, :5], torch.ones(2, 5))
    torch.testing.assert_close(sizes[:, 5:].sum(1), torch.full((2,), 16.0))
    assert feat.shape == (2, 7, EMBED)


def test_layers_and_per_block_r():
    model = make_vit(depth=3)
    with torch.no_grad():
        tome.patch_timm(model, r=[2, 0, 3])
        model(images())
        assert model.mame.last_token_counts == [15, 15, 12]
        tome.patch_timm(model, r=4, layers=[1])
        model(images())
        assert model.mame.last_token_counts == [17, 13, 13]
    with pytest.raises(ValueError):
        tome.patch_timm(model, r=[1, 2])  # wrong length
    with pytest.raises(ValueError):
        tome.patch_timm(model, r=-1)
    with pytest.raises(ValueError):
        tome.patch_timm(nn.Linear(3, 3), r=1)


def test_unpatch_restores_bit_exact_and_adds_no_hooks():
    model = dinov2_like()
    x = images()
    with torch.no_grad():
        ref, ref_feat = model(x), model.forward_features(x)
        tome.patch_timm(model, r=4)
        merged = model(x)
        assert not torch.allclose(merged, ref, atol=1e-6)
        assert all(not block.attn.qkv._forward_hooks for block in model.blocks)  # keys come from the block itself
        tome.patch_timm(model, r=2)  # re-patching replaces the patch
        model(x)
        assert model.mame.last_token_counts == [19, 17, 15]
        import mame

        mame.unpatch(model)
        assert type(model) is VisionTransformer and not hasattr(model, "mame")
        for block in model.blocks:
            assert type(block) is Block
            assert len(block.attn.qkv._forward_hooks) == 0
            assert not [name for name in block.__dict__ if name.startswith("_mame")]
        assert torch.equal(model(x), ref)
        assert torch.equal(model.forward_features(x), ref_feat)


@pytest.mark.parametrize("config, r", [("deit", 3), ("dinov2_reg", 2), ("dinov2_reg", 20)])
def test_vectorised_reference_equals_brute_force(config, r):
    model = dinov2_like() if config == "dinov2_reg" else make_vit()
    x = images(3)
    with torch.no_grad():
        brute = reference_tome_features(model, x, (r,) * 3)
        fast = reference_tome_features(model, x, (r,) * 3, merge=official_merge)
    torch.testing.assert_close(fast[0], brute[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fast[1], brute[1], atol=0, rtol=0)
    assert fast[2] == brute[2]


@pytest.mark.real
@pytest.mark.parametrize("r", [4, 8, 13, 16])
def test_real_dinov2_equals_the_official_algorithm(real_model, bundled_photos, r):
    """On the real DINOv2-S/14 and centre-cropped bundled photos (6 of them, as one batch), the patched model's
    features equal the transcription of the official algorithm to 1e-4."""
    import copy

    from mame import data

    x = data.preprocess([image for _, image in bundled_photos[::4]], mode="center_crop")
    model = tome.patch_timm(copy.deepcopy(real_model), r=r)
    with torch.inference_mode():
        ref, ref_sizes, counts = reference_tome_features(real_model, x, (r,) * 12, merge=official_merge)
        feat = model.forward_features(x)
    assert model.mame.last_token_counts == counts
    assert (feat - ref).abs().max() <= 1e-4
