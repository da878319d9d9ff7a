"""mame.patch.hf on families that bring their own padding or pooling: BERT (post-norm, tokenizer padding mask),
SigLIP2 (variable resolution, patch padding mask, attention-pooling head) and VideoMAE (no class token, mean-pooling
classifier). Tiny random models, built here."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import (BertConfig, BertModel, Siglip2Config, Siglip2Model, Siglip2VisionConfig,
                          Siglip2VisionModel, VideoMAEConfig, VideoMAEForVideoClassification)

import mame
from test_patch_hf import DEPTH as HF_DEPTH, FAMILIES, images, randomise_norms

HIDDEN, HEADS, DEPTH = 64, 4, 4


def tiny_bert(seed: int = 0) -> BertModel:
    torch.manual_seed(seed)
    model = BertModel(BertConfig(vocab_size=100, hidden_size=HIDDEN, num_hidden_layers=DEPTH, num_attention_heads=HEADS,
                                 intermediate_size=2 * HIDDEN)).eval()
    randomise_norms(model)
    return model


def sentences() -> tuple[torch.Tensor, torch.Tensor]:
    """Three right-padded "sentences" of 12, 8 and 5 tokens, each a few repeated words so that tokens merge."""
    torch.manual_seed(1)
    ids = torch.randint(1, 100, (3, 12))
    ids[:, 2:] = ids[:, 2:].remainder(3) + 10  # three distinct words after [CLS] and the first word
    mask = torch.ones(3, 12, dtype=torch.long)
    mask[1, 8:] = 0
    mask[2, 5:] = 0
    return ids, mask


def masked_mean(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)


def test_bert_tau_one_with_padding_equals_unpatched_and_unpatch_restores():
    model, ids, mask = tiny_bert(), *sentences()
    reference = copy.deepcopy(model)
    expected = reference(input_ids=ids, attention_mask=mask)
    mame.patch.hf(model, tau=1.0, layers=DEPTH)
    got = model(ids, mask)  # the mask positionally, as users call it too
    real = mask.bool()
    assert torch.allclose(got.last_hidden_state[real], expected.last_hidden_state[real], atol=1e-5)
    assert torch.allclose(got.pooler_output, expected.pooler_output, atol=1e-5)
    assert torch.allclose(model.mame.mean_pool(got.last_hidden_state),
                          masked_mean(expected.last_hidden_state, mask), atol=1e-5)
    mame.unpatch(model)
    assert torch.equal(model(input_ids=ids, attention_mask=mask).last_hidden_state, expected.last_hidden_state)


def test_bert_padded_batch_merges_each_sentence_as_alone():
    model, ids, mask = tiny_bert(), *sentences()
    reference = copy.deepcopy(model)
    mame.patch.hf(model, tau=0.3, layers=2)
    out = model(input_ids=ids, attention_mask=mask)
    batch_counts = model.mame.state.counts[-1].tolist()
    pooled, cls = model.mame.mean_pool(out.last_hidden_state), out.pooler_output
    lengths = mask.sum(1).tolist()
    assert all(c < n for c, n in zip(batch_counts, lengths))  # every sentence merged
    for i, length in enumerate(lengths):
        alone = model(input_ids=ids[i:i + 1, :length])
        assert model.mame.last_token_counts[-1] == batch_counts[i]
        assert torch.allclose(model.mame.mean_pool(alone.last_hidden_state), pooled[i:i + 1], atol=1e-5)
        assert torch.allclose(alone.pooler_output, cls[i:i + 1], atol=1e-5)
    # Merging changed the embeddings, but not beyond recognition.
    plain = masked_mean(reference(input_ids=ids, attention_mask=mask).last_hidden_state, mask)
    assert torch.nn.functional.cosine_similarity(pooled, plain).min() > 0.8
    assert not torch.allclose(pooled, plain, atol=1e-4)


def test_bert_refusals():
    model, ids, mask = tiny_bert(), *sentences()
    mame.patch.hf(model, tau=0.5, layers=2)
    with pytest.raises(ValueError, match="right padding"):
        model(input_ids=ids, attention_mask=mask.flip(1))
    with pytest.raises(ValueError, match="position_ids"):
        model(input_ids=ids, position_ids=torch.arange(12)[None].expand(3, -1))
    decoder = BertModel(BertConfig(vocab_size=100, hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=HEADS,
                                   is_decoder=True))
    with pytest.raises(ValueError, match="decoder"):
        mame.patch.hf(decoder)


def tiny_siglip2_vision(seed: int = 0) -> Siglip2VisionModel:
    torch.manual_seed(seed)
    config = Siglip2VisionConfig(hidden_size=HIDDEN, intermediate_size=2 * HIDDEN, num_hidden_layers=DEPTH,
                                 num_attention_heads=HEADS, patch_size=4, num_patches=16)
    model = Siglip2VisionModel(config).eval()
    randomise_norms(model)
    return model


def patches() -> dict[str, torch.Tensor]:
    """Three images of 4x4, 3x4 and 2x3 patches (4-pixel patches as SigLIP2's processor flattens them), padded to
    16 patches with their pixel attention mask; smooth, so that patches merge."""
    torch.manual_seed(2)
    shapes = torch.tensor([[4, 4], [3, 4], [2, 3]])
    pixels = torch.randn(3, 1, 48).repeat(1, 16, 1) + 0.1 * torch.randn(3, 16, 48)
    mask = torch.zeros(3, 16, dtype=torch.long)
    for i, (h, w) in enumerate(shapes.tolist()):
        mask[i, :h * w] = 1
    return dict(pixel_values=pixels, pixel_attention_mask=mask, spatial_shapes=shapes)


def test_siglip2_variable_resolution_batch_merges_each_image_as_alone():
    model, inputs = tiny_siglip2_vision(), patches()
    reference = copy.deepcopy(model)
    expected = reference(**inputs).pooler_output
    mame.patch.hf(model, tau=1.0, layers=DEPTH)
    assert torch.allclose(model(**inputs).pooler_output, expected, atol=1e-5)
    mame.patch.hf(model, tau=0.5, layers=2)
    pooled = model(**inputs).pooler_output
    batch_counts = model.mame.state.counts[-1].tolist()
    for i, real in enumerate(inputs["pixel_attention_mask"].sum(1).tolist()):
        alone = model(pixel_values=inputs["pixel_values"][i:i + 1, :real],
                      pixel_attention_mask=inputs["pixel_attention_mask"][i:i + 1, :real],
                      spatial_shapes=inputs["spatial_shapes"][i:i + 1]).pooler_output
        assert model.mame.last_token_counts[-1] == batch_counts[i] < real
        assert torch.allclose(alone, pooled[i:i + 1], atol=1e-5)
    mame.unpatch(model)
    assert torch.equal(model(**inputs).pooler_output, expected)


def test_siglip2_model_merges_the_image_tower_only():
    vision = tiny_siglip2_vision().config.to_dict()
    torch.manual_seed(0)
    text = dict(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                bos_token_id=1, eos_token_id=2, pad_token_id=0)
    model = Siglip2Model(Siglip2Config(text_config=text, vision_config=vision)).eval()
    reference, inputs, ids = copy.deepcopy(model), patches(), torch.randint(3, 100, (2, 7))
    mame.patch.hf(model, tau=1.0, layers=DEPTH)
    assert torch.allclose(model.get_image_features(**inputs).pooler_output,
                          reference.get_image_features(**inputs).pooler_output, atol=1e-5)
    mame.patch.hf(model, tau=0.5, layers=2)
    model.get_image_features(**inputs)
    assert model.mame.last_token_counts[-1] < 12
    assert torch.equal(model.get_text_features(input_ids=ids).pooler_output,
                       reference.get_text_features(input_ids=ids).pooler_output)


def tiny_videomae(seed: int = 0, mean_pooling: bool = True) -> VideoMAEForVideoClassification:
    torch.manual_seed(seed)
    config = VideoMAEConfig(image_size=32, patch_size=8, num_frames=4, tubelet_size=2, hidden_size=HIDDEN,
                            num_hidden_layers=DEPTH, num_attention_heads=HEADS, intermediate_size=2 * HIDDEN,
                            num_labels=3, use_mean_pooling=mean_pooling)
    model = VideoMAEForVideoClassification(config).eval()
    randomise_norms(model)
    return model


def clips() -> torch.Tensor:
    """Three 4-frame clips, smooth to different degrees, so that they keep different token counts."""
    torch.manual_seed(3)
    base = torch.randn(3, 1, 3, 1, 1).expand(3, 4, 3, 32, 32)
    return base + torch.tensor([0.05, 0.5, 2.0]).view(3, 1, 1, 1, 1) * torch.randn(3, 4, 3, 32, 32)


def test_videomae_classifier_pools_by_size_and_merges_each_clip_as_alone():
    model, x = tiny_videomae(), clips()
    reference = copy.deepcopy(model)
    expected = reference(x).logits
    mame.patch.hf(model, tau=1.0, layers=DEPTH)
    assert torch.allclose(model(x).logits, expected, atol=1e-5)
    mame.patch.hf(model, tau=0.6, layers=2)
    logits = model(x).logits
    counts = model.mame.state.counts[-1].tolist()
    assert len(set(counts)) > 1 and max(counts) < 32  # ragged: the batch was padded
    for i in range(3):
        assert torch.allclose(model(x[i:i + 1]).logits, logits[i:i + 1], atol=1e-5)
    # The head's mean is the size-weighted mean over real tokens: the encoder called alone returns its tokens as
    # they are, and pooling them with the sizes gives the classifier's logits; their plain mean would not.
    tokens = model.videomae(x).last_hidden_state
    pooled = model.mame.mean_pool(tokens)
    assert torch.allclose(model.classifier(model.fc_norm(pooled)), logits, atol=1e-5)
    assert not torch.allclose(model.classifier(model.fc_norm(tokens.mean(1))), logits, atol=1e-3)
    mame.unpatch(model)
    assert torch.equal(model(x).logits, expected)


def test_videomae_without_mean_pooling_is_refused():
    with pytest.raises(ValueError, match="use_mean_pooling"):
        mame.patch.hf(tiny_videomae(mean_pooling=False))


def test_hidden_states_are_recorded_merged_and_attention_weights_refused():
    model, ids, mask = tiny_bert(), *sentences()
    reference = copy.deepcopy(model)
    expected = reference(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
    mame.patch.hf(model, tau=1.0, layers=DEPTH)
    got = model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
    real = mask.bool()
    assert len(got) == DEPTH + 1
    assert all(torch.allclose(g[real], e[real], atol=1e-5) for g, e in zip(got, expected))
    mame.patch.hf(model, tau=0.3, layers=2)
    states = model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
    lengths = [h.shape[1] for h in states]
    assert lengths[0] == 12 and lengths[2] < lengths[1] < 12  # padded to the longest sentence after each merge
    masks = model.mame.last_token_masks
    assert len(masks) == DEPTH and [m.shape[1] for m in masks] == lengths[1:]
    assert masks[-1].sum(1).tolist() == model.mame.state.counts[-1].tolist()
    assert torch.equal(masks[-1], model.mame.state.mask)
    with pytest.raises(ValueError, match="cannot honour output_attentions"):
        model(input_ids=ids, attention_mask=mask, output_attentions=True)


def test_patch_auto_picks_the_family():
    import timm

    bert = mame.patch.auto(tiny_bert(), tau=0.5, layers=2)
    assert bert.mame.layers == (0, 1) and type(bert).__name__ == "MameBertModel"
    vit = mame.patch.auto(timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, depth=2), tau=0.5,
                          layers=2)
    assert type(vit).__name__ == "MameVisionTransformer"
    mame.patch.auto(bert, tau=0.9, layers=1)  # an already patched model is re-patched by its own family
    assert bert.mame.layers == (0,)
    with pytest.raises(ValueError, match="timm, transformers and open_clip"):
        mame.patch.auto(torch.nn.Linear(2, 2))


@pytest.mark.parametrize("family", ["dinov2", "vit", "bert"])
def test_gradient_checkpointing_replays_give_the_same_gradients(family, monkeypatch):
    """transformers' GradientCheckpointingLayer replays each layer during backward; the replayed layers find the
    sizes and padding they saw the first time, so outputs and gradients equal the run without checkpointing."""
    import mame.patch.base

    depth = DEPTH if family == "bert" else HF_DEPTH
    calls = []
    real_block_forward = mame.patch.base.block_forward

    def counted_block_forward(block, *args):
        calls.append(block)
        return real_block_forward(block, *args)

    # transformers checkpoints a layer's `forward` (module hooks stay outside), so count the shared block forward.
    monkeypatch.setattr(mame.patch.base, "block_forward", counted_block_forward)

    def loss_and_grads(checkpointing: bool):
        if family == "bert":  # padded sentences: the first layer's replay must find the tokenizer's mask
            model, (ids, mask) = tiny_bert().train(), sentences()
            inputs = dict(input_ids=ids, attention_mask=mask)
        else:
            model, inputs = FAMILIES[family]().train(), dict(pixel_values=images())
        mame.patch.hf(model, tau=0.2, layers=depth)
        if checkpointing:
            enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
            enable()
        calls.clear()
        out = model(**inputs).last_hidden_state
        loss = out.square().mean()
        loss.backward()
        grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
        return out.detach(), grads, len(calls)

    plain, plain_grads, plain_calls = loss_and_grads(False)
    replayed, replayed_grads, replayed_calls = loss_and_grads(True)
    assert (plain_calls, replayed_calls) == (depth, 2 * depth)  # every layer replayed once during backward
    torch.testing.assert_close(replayed, plain, atol=1e-6, rtol=1e-6)
    assert plain_grads.keys() == replayed_grads.keys() and len(plain_grads) > 10
    for name, grad in plain_grads.items():
        torch.testing.assert_close(replayed_grads[name], grad, atol=1e-5, rtol=1e-4, msg=name)
