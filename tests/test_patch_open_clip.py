"""mame.patch.open_clip: open_clip's VisionTransformer (bare, in CLIP, in CoCa) through the shared patched block."""

from __future__ import annotations

import copy

import open_clip
import pytest
import torch
import torch.nn.functional as F
from open_clip.transformer import VisionTransformer

import mame
from test_patch_hf import images  # a flat, a noise and a half/half image of the same 32-px size

WIDTH, HEADS, DEPTH, IMG, PATCH, EMBED = 64, 4, 4, 32, 8, 32
GRID = (IMG // PATCH) ** 2


def randomise(model: torch.nn.Module) -> None:
    """Give every LayerNorm its own affine map and every LayerScale its own gains, and shrink the position
    embeddings so that images merge: describing one norm as another, or misplacing LayerScale, shows."""
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.LayerNorm):
                module.weight.uniform_(0.5, 1.5)
                module.bias.normal_(0, 0.1)
            if hasattr(module, "gamma"):
                module.gamma.uniform_(0.2, 0.8)
            if getattr(module, "head_scale", None) is not None:
                module.head_scale.uniform_(0.5, 1.5)
            if isinstance(module, VisionTransformer):
                module.positional_embedding.normal_(0, 0.05)


def tiny_vit(seed: int = 0, **options) -> VisionTransformer:
    torch.manual_seed(seed)
    options = {"output_dim": EMBED, **options}
    model = VisionTransformer(image_size=IMG, patch_size=PATCH, width=WIDTH, layers=DEPTH, heads=HEADS, mlp_ratio=4,
                              **options).eval()
    randomise(model)
    return model


def tiny_clip(seed: int = 0, **vision) -> open_clip.CLIP:
    torch.manual_seed(seed)
    model = open_clip.CLIP(embed_dim=EMBED, vision_cfg=dict(layers=DEPTH, width=WIDTH, head_width=WIDTH // HEADS,
                                                            patch_size=PATCH, image_size=IMG, **vision),
                           text_cfg=dict(context_length=8, vocab_size=99, width=32, heads=4, layers=2)).eval()
    randomise(model)
    return model


TEXT = torch.tensor([[1, 5, 7, 2, 0, 0, 0, 0], [1, 9, 2, 0, 0, 0, 0, 0]])

# Every pool and block kind described: the class token, size-weighted average (LayerNorm before or after it),
# LayerScale, open_clip's own Attention with every option it can run, and the three attention pools.
CONFIGS = {
    "tok": {},
    "avg": {"pool_type": "avg"},
    "avg_ln_after_pool": {"pool_type": "avg", "final_ln_after_pool": True},
    "layer_scale": {"ls_init_value": 0.5},
    "custom_block": {"qk_norm": True, "scale_heads": True, "scale_attn_inner": True, "scale_attn": True,
                     "scale_fc": True, "ls_init_value": 0.5},
    "attn_pool": {"attentional_pool": True, "attn_pooler_queries": 6, "attn_pooler_heads": 4},
    "parallel_pool": {"attentional_pool": "parallel", "attn_pooler_queries": 6, "attn_pooler_heads": 4,
                      "output_dim": WIDTH},
    "cascade_pool": {"attentional_pool": "cascade", "attn_pooler_queries": 6, "attn_pooler_heads": 4,
                     "output_dim": WIDTH},
}


@pytest.mark.parametrize("config", CONFIGS)
def test_tau_one_equals_unpatched_and_unpatch_restores(config):
    """τ = 1 merges nothing: the description (norms, LayerScale, attention in pieces, pools) reproduces the model;
    τ = 0.5 merges and changes the features; unpatch is bit-identical."""
    model = tiny_vit(**CONFIGS[config])
    x = images()
    with torch.no_grad():
        reference = model(x)
        mame.patch.open_clip(model, tau=1.0, layers=DEPTH)
        torch.testing.assert_close(model(x), reference, atol=1e-5, rtol=0)
        mame.patch.open_clip(model, tau=0.5, layers=DEPTH)
        merged = model(x)
        assert model.mame.last_token_counts[-1] < GRID + 1
        assert not torch.allclose(merged, reference, atol=1e-4)
        mame.unpatch(model)
        assert type(model) is VisionTransformer and not hasattr(model, "mame")
        assert all(type(m).__name__[:4] != "Mame" for m in model.modules())
        assert torch.equal(model(x), reference)


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("packed", [True, False])
def test_per_sample_batch_equals_batch_of_one(config, packed):
    """Images merged differently are carried as a padded (or packed) batch with proportional attention; pools and
    blocks ignore the padding, so each image gets its batch-of-one features."""
    model = tiny_vit(**CONFIGS[config])
    x = images()
    with torch.no_grad():
        mame.patch.open_clip(model, tau=0.2, layers=DEPTH, packed=packed)
        batch = model(x)
        assert len(set(model.mame.state.counts[0].tolist())) > 1, "the images must merge differently"
        singles = torch.cat([model(x[b : b + 1]) for b in range(len(x))])
    torch.testing.assert_close(batch, singles, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("config", ["tok", "custom_block"])
def test_key_metric_reads_the_described_keys(config):
    """``metric="keys"`` merges on the keys of the packed projection (both attention kinds), per image."""
    model = tiny_vit(**CONFIGS[config])
    x = images()
    with torch.no_grad():
        mame.patch.open_clip(model, tau=0.2, layers=DEPTH, metric="keys")
        batch = model(x)
        assert len(set(model.mame.state.counts[0].tolist())) > 1
        singles = torch.cat([model(x[b : b + 1]) for b in range(len(x))])
    torch.testing.assert_close(batch, singles, atol=1e-4, rtol=1e-4)


def test_description_fails_when_a_norm_is_misdescribed(monkeypatch):
    """The τ = 1 check is sharp: describing ``ln_2`` as ``ln_1`` (a plausible slip) breaks it."""
    import dataclasses
    import importlib

    patch_module = importlib.import_module("mame.patch.open_clip")  # the module (mame.patch.open_clip: the function)
    wrong = dataclasses.replace(patch_module.RESIDUAL_LAYOUT, norm2="ln_1")
    monkeypatch.setattr(patch_module, "RESIDUAL_LAYOUT", wrong)
    model = tiny_vit()
    x = images()
    with torch.no_grad():
        reference = model(x)
        mame.patch.open_clip(model, tau=1.0, layers=DEPTH)
        assert not torch.allclose(model(x), reference, atol=1e-3)


def test_clip_image_features_merge_and_text_tower_stays_untouched():
    """CLIP: ``encode_image`` and ``model(image, text)`` run the merged tower (the tower opens each forward's
    state); the text tower is never patched and its features are bit-identical; unpatch restores the tower."""
    model = tiny_clip()
    x = images()
    with torch.no_grad():
        image_reference, text_reference = model.encode_image(x), model.encode_text(TEXT)
        mame.patch.open_clip(model, tau=1.0, layers=DEPTH)
        torch.testing.assert_close(model.encode_image(x), image_reference, atol=1e-5, rtol=0)
        mame.patch.open_clip(model, tau=0.5, layers=DEPTH)
        merged = model.encode_image(x)
        counts = model.mame.last_token_counts
        assert len(counts) == DEPTH and counts[-1] < GRID + 1 and model.visual.mame is model.mame
        assert not torch.allclose(merged, image_reference, atol=1e-4)
        singles = torch.cat([model.encode_image(x[b : b + 1]) for b in range(len(x))])
        torch.testing.assert_close(merged, singles, atol=1e-4, rtol=1e-4)
        image_features, text_features, _ = model(x, TEXT)
        torch.testing.assert_close(image_features, F.normalize(merged, dim=-1), atol=1e-5, rtol=1e-5)
        assert torch.equal(text_features, F.normalize(text_reference, dim=-1))
        assert torch.equal(model.encode_text(TEXT), text_reference)
        assert not any(hasattr(m, "_mame_layout") or hasattr(m, "mame") for m in model.transformer.modules())
        mame.unpatch(model)
        assert type(model.visual) is VisionTransformer and not hasattr(model.visual, "mame")
        assert torch.equal(model.encode_image(x), image_reference)


def test_coca_image_latents_merge_per_image():
    """CoCa: an attention-pooled tower; its latents and the caption logits that read the pooled image tokens."""
    torch.manual_seed(0)
    text_cfg = dict(context_length=8, vocab_size=99, width=32, heads=4, layers=1)
    model = open_clip.CoCa(embed_dim=EMBED, multimodal_cfg=text_cfg,
                           text_cfg=dict(text_cfg, embed_cls=True, output_tokens=True),
                           vision_cfg=dict(layers=DEPTH, width=WIDTH, head_width=WIDTH // HEADS, patch_size=PATCH,
                                           image_size=IMG, attentional_pool=True, attn_pooler_queries=6,
                                           attn_pooler_heads=4, output_tokens=True)).eval()
    with torch.no_grad():  # open_clip leaves the decoder's projection uninitialised (torch.empty)
        model.text_decoder.text_projection.normal_(0, 0.2)
    randomise(model)
    x = images()
    with torch.no_grad():
        reference = model(x, TEXT[:1].expand(3, -1))["logits"]
        mame.patch.open_clip(model, tau=1.0, layers=DEPTH)
        torch.testing.assert_close(model(x, TEXT[:1].expand(3, -1))["logits"], reference, atol=1e-4, rtol=0)
        mame.patch.open_clip(model, tau=0.2, layers=DEPTH)
        batch = model(x, TEXT[:1].expand(3, -1))
        assert len(set(model.mame.state.counts[0].tolist())) == 3
        for b in range(3):
            alone = model(x[b : b + 1], TEXT[:1])
            torch.testing.assert_close(batch["image_features"][b : b + 1], alone["image_features"], atol=1e-4,
                                       rtol=1e-4)
            torch.testing.assert_close(batch["logits"][b : b + 1], alone["logits"], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("pool_type", ["tok", "avg", "none"])
def test_output_tokens_are_the_merged_tokens_and_unmerge(pool_type):
    """``output_tokens=True`` returns the merged, padded tokens (class token dropped for 'tok'/'avg'); each
    image's real tokens equal its tokens alone, and ``unmerge`` with the class token in front gives the grid."""
    model = tiny_vit(output_tokens=True, pool_type=pool_type)
    x = images()
    special = 0 if pool_type == "none" else 1  # tokens that are not returned
    with torch.no_grad():
        mame.patch.open_clip(model, tau=0.2, layers=DEPTH)
        _, tokens = model(x)
        lengths = torch.as_tensor(model.mame.state.counts[-1]).expand(3)
        grid = model.mame.unmerge(F.pad(tokens, (0, 0, special, 0)))[:, special:]
        assert grid.shape == (3, GRID + 1 - special, WIDTH)
        for b in range(3):
            _, alone = model(x[b : b + 1])
            torch.testing.assert_close(tokens[b : b + 1, : int(lengths[b]) - special], alone, atol=1e-4, rtol=1e-4)


def test_patch_dropout_in_training_happens_before_the_blocks():
    """Training with patch dropout: the blocks merge the patches kept (the class token is kept and never merges);
    in eval nothing is dropped and τ = 1 gives the unpatched features."""
    model = tiny_vit(patch_dropout=0.5)
    x = images()
    with torch.no_grad():
        reference = model(x)
        mame.patch.open_clip(model, tau=1.0, layers=DEPTH)
        torch.testing.assert_close(model(x), reference, atol=1e-5, rtol=0)
        mame.patch.open_clip(model.train(), tau=0.2, layers=DEPTH)
        assert model(x).shape == (3, EMBED)
    counts = model.mame.last_token_counts
    assert counts[0] <= 1 + GRID // 2 and counts[-1] < counts[0]


def test_gradient_checkpointing_and_deepcopy():
    """open_clip's grad checkpointing replays each block in backward with the sizes and padding it saw: the same
    outputs and gradients; a deep copy of a patched tower merges as the original does."""
    x = images()

    def run(checkpointing: bool):
        model = tiny_vit(ls_init_value=0.5).train()
        mame.patch.open_clip(model, tau=0.2, layers=DEPTH)
        model.set_grad_checkpointing(checkpointing)
        out = model(x)
        out.square().mean().backward()
        return out.detach(), {name: p.grad for name, p in model.named_parameters() if p.grad is not None}

    plain, plain_grads = run(False)
    replayed, replayed_grads = run(True)
    torch.testing.assert_close(replayed, plain, atol=1e-6, rtol=1e-6)
    assert plain_grads.keys() == replayed_grads.keys() and len(plain_grads) > 10
    for name, grad in plain_grads.items():
        torch.testing.assert_close(replayed_grads[name], grad, atol=1e-5, rtol=1e-4, msg=name)
    model = mame.patch.open_clip(tiny_vit(), tau=0.2, layers=DEPTH)
    twin = copy.deepcopy(model)
    with torch.no_grad():
        assert torch.equal(twin(x), model(x))
        assert twin.mame.last_token_counts == model.mame.last_token_counts


def test_refusals():
    with pytest.raises(ValueError, match="CLIP, CustomTextCLIP, CoCa and VisionTransformer"):
        mame.patch.open_clip(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="scaled cosine"):
        mame.patch.open_clip(tiny_vit(scaled_cosine_attn=True))
    not_batch_first = tiny_vit()
    not_batch_first.transformer.batch_first = False
    with pytest.raises(ValueError, match="batch-first"):
        mame.patch.open_clip(not_batch_first)
    resnet = open_clip.CLIP(embed_dim=EMBED, vision_cfg=dict(layers=(1, 1, 1, 1), width=8, head_width=8,
                                                             image_size=64),
                            text_cfg=dict(context_length=8, vocab_size=99, width=32, heads=4, layers=1))
    with pytest.raises(ValueError, match="ModifiedResNet"):
        mame.patch.open_clip(resnet)
    with pytest.raises(ValueError, match="out of range"):
        mame.patch.open_clip(tiny_vit(), layers=DEPTH + 1)
    model = mame.patch.open_clip(tiny_clip(), tau=0.5, layers=DEPTH)
    with pytest.raises(ValueError, match="forward_intermediates"):
        model.forward_intermediates(image=images())
