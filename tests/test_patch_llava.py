"""mame.patch.llava: MaMe on the vision tower of a tiny, random LlavaForConditionalGeneration (CLIP tower, Llama LM),
so that fewer image tokens reach the language model while the user's call stays the same."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import (CLIPVisionConfig, CLIPVisionModel, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration,
                          LlavaModel, SiglipVisionConfig)
from transformers.models.clip.modeling_clip import CLIPEncoder, CLIPEncoderLayer

import mame
from mame.blocks import MergeRuntime
from mame.patch.llava import LlavaRuntime, VisualTokens, patch_llava, shrink_image_runs

IMAGE, PAD = 99, 0  # the image placeholder token and the pad token of the tiny LM
PATCHES = 16  # a 32 x 32 image in 8 x 8 patches
DEPTH = 4  # vision blocks; LLaVA reads hidden_states[-2], the output of block 2, so blocks 0..2 may merge


def tiny_llava(seed: int = 0, tower: str = "clip", **config) -> LlavaForConditionalGeneration:
    """A small random LLaVA built locally: small position embeddings so that flat image regions merge, random norms
    so that a misplaced norm would show."""
    torch.manual_seed(seed)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=DEPTH, num_attention_heads=4, image_size=32,
                  patch_size=8)
    vision_config = CLIPVisionConfig(**vision) if tower == "clip" else SiglipVisionConfig(**vision)
    text_config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                              num_key_value_heads=4, vocab_size=100, pad_token_id=PAD, max_position_embeddings=128)
    model = LlavaForConditionalGeneration(LlavaConfig(vision_config=vision_config, text_config=text_config,
                                                      image_token_id=IMAGE, image_seq_length=PATCHES, **config))
    model.eval()
    with torch.no_grad():
        model.model.vision_tower.embeddings.position_embedding.weight.normal_(0, 0.05)
        for module in model.model.vision_tower.modules():
            if isinstance(module, torch.nn.LayerNorm):
                module.weight.uniform_(0.5, 1.5)
                module.bias.normal_(0, 0.1)
    return model


_PALETTE = torch.tensor([[1.0, -1.0, 0.5], [-1.0, 1.0, 1.0], [0.3, 0.3, -1.0], [1.0, 1.0, 1.0], [-1.0, -1.0, -1.0],
                         [0.5, -0.5, 0.0]])


def block_image(colours: list[list[int]]) -> torch.Tensor:
    """A 32 x 32 image made of flat 8 x 8 patches, ``colours[row][column]`` indexing a small palette."""
    image = torch.zeros(3, 32, 32)
    for r, row in enumerate(colours):
        for c, colour in enumerate(row):
            image[:, 8 * r:8 * (r + 1), 8 * c:8 * (c + 1)] = _PALETTE[colour].view(3, 1, 1)
    return image


# Two flat halves (merges a lot) and a busier picture (merges less): per-sample merging gives different counts.
HALVES = block_image([[0, 0, 0, 0], [0, 0, 0, 0], [1, 1, 1, 1], [1, 1, 1, 1]])
BUSY = block_image([[0, 1, 2, 3], [4, 5, 0, 1], [2, 3, 4, 5], [0, 0, 1, 1]])


def prompt(*text_after: int, before: tuple[int, ...] = (1, 5)) -> list[int]:
    """A prompt as the processor writes it: text, the full run of placeholders for one image, text."""
    return [*before, *[IMAGE] * PATCHES, *text_after]


def batch(*rows: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded ids and attention mask, as a processor pads prompts for generation."""
    width = max(len(row) for row in rows)
    ids = torch.tensor([[PAD] * (width - len(row)) + row for row in rows])
    mask = torch.tensor([[0] * (width - len(row)) + [1] * len(row) for row in rows])
    return ids, mask


def greedy(model, ids, mask, pixels, tokens: int = 5) -> torch.Tensor:
    return model.generate(input_ids=ids, attention_mask=mask, pixel_values=pixels, max_new_tokens=tokens,
                          do_sample=False)


@pytest.fixture
def counted_tower_calls():
    """A function that counts the forwards of a model's vision tower from now on."""
    handles = []

    def count(model) -> list[int]:
        calls = [0]
        handles.append(model.model.vision_tower.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1)))
        return calls

    yield count
    for handle in handles:
        handle.remove()


def test_tau_one_is_the_unpatched_model_and_unpatch_restores_every_class():
    model = tiny_llava()
    pixels = torch.stack([HALVES, BUSY])
    ids, mask = batch(prompt(7, 8), prompt(9, 3, 4, before=(1,)))
    with torch.no_grad():
        reference = model(input_ids=ids, attention_mask=mask, pixel_values=pixels).logits
        generated = greedy(model, ids, mask, pixels)
        mame.patch.hf(model, tau=1.0, layers=3)  # dispatched to patch_llava
        assert isinstance(model.mame, LlavaRuntime) and model.mame is model.model.vision_tower.mame
        torch.testing.assert_close(model(input_ids=ids, attention_mask=mask, pixel_values=pixels).logits, reference,
                                   atol=1e-5, rtol=0)
        assert model.mame.last_visual_token_counts == [PATCHES, PATCHES]
        assert model.mame.last_token_counts == [PATCHES + 1] * DEPTH
        assert torch.equal(greedy(model, ids, mask, pixels), generated)
        mame.patch.hf(model, tau=0.5, layers=3)
        assert model(input_ids=ids, attention_mask=mask, pixel_values=pixels).logits.shape[1] < ids.shape[1]
        runtime = model.mame
        mame.unpatch(model)
        assert type(model) is LlavaForConditionalGeneration and type(model.model) is LlavaModel
        tower = model.model.vision_tower
        assert type(tower) is CLIPVisionModel and type(tower.encoder) is CLIPEncoder
        assert all(type(layer) is CLIPEncoderLayer for layer in tower.encoder.layers)
        assert type(runtime) is MergeRuntime
        assert not any("mame" in vars(module) for module in model.modules())
        assert torch.equal(model(input_ids=ids, attention_mask=mask, pixel_values=pixels).logits, reference)
        assert torch.equal(greedy(model, ids, mask, pixels), generated)


def test_each_image_keeps_its_own_count_and_generate_matches_each_prompt_alone(counted_tower_calls):
    """Per-sample merging: the flat image keeps fewer tokens than the busy one; each prompt's run shrinks to its
    image's count, the rows are re-padded on the left, and every row generates what it generates alone."""
    model = patch_llava(tiny_llava(), tau=0.6, layers=3)
    pixels = torch.stack([HALVES, BUSY])
    rows = [prompt(7, 8), prompt(9, 3)]
    ids, mask = batch(*rows)
    calls = counted_tower_calls(model)
    seen = {}

    def first_embeddings(module, args, kwargs):
        seen.setdefault("embeds", kwargs["inputs_embeds"])

    hook = model.model.language_model.register_forward_pre_hook(first_embeddings, with_kwargs=True)
    with torch.no_grad():
        generated = greedy(model, ids, mask, pixels)
    hook.remove()
    assert calls[0] == 1, "generate must encode the images once"
    record = model.mame.last_visual_tokens
    counts = record.counts
    assert counts[0] < counts[1] < PATCHES
    # The language model read the shrunk prompts: one placeholder per feature, each image's run cut to its count,
    # the shorter row padded on the left.
    shrunk, shrunk_mask = record.input_ids, record.attention_mask
    assert (shrunk == IMAGE).sum(1).tolist() == counts
    assert shrunk.shape[1] == ids.shape[1] - (PATCHES - counts[1])
    assert shrunk_mask[0, :counts[1] - counts[0]].eq(0).all() and shrunk_mask[0, counts[1] - counts[0]:].eq(1).all()
    assert torch.equal(shrunk[1], torch.tensor(prompt(9, 3)[:2 + counts[1]] + [9, 3]))
    assert seen["embeds"].shape[1] == shrunk.shape[1]
    features = torch.cat(model.get_image_features(pixel_values=pixels).pooler_output)
    assert features.shape[0] == sum(counts)
    torch.testing.assert_close(seen["embeds"][shrunk == IMAGE], features, atol=1e-6, rtol=0)
    # The prompts come back as given, followed by the new tokens.
    assert torch.equal(generated[:, :ids.shape[1]], ids) and generated.shape[1] == ids.shape[1] + 5
    for b, row in enumerate(rows):
        with torch.no_grad():
            alone = greedy(model, torch.tensor([row]), torch.ones(1, len(row), dtype=torch.long), pixels[b:b + 1])
        assert model.mame.last_visual_token_counts == [counts[b]]
        assert torch.equal(generated[b, ids.shape[1]:], alone[0, len(row):])


def test_forward_feeds_exactly_the_merged_features_and_each_row_as_alone(counted_tower_calls):
    """forward on the processor's prompts: right padding (none was there), the LM gets sum(counts) features, and
    each row's last real position has the logits of the prompt alone."""
    model = patch_llava(tiny_llava(), tau=0.6, layers=3)
    pixels = torch.stack([BUSY, HALVES])
    rows = [prompt(7, 8), prompt(9, 3)]
    ids = torch.tensor(rows)
    calls = counted_tower_calls(model)
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=pixels)
    assert calls[0] == 1
    record = model.mame.last_visual_tokens
    assert record.counts[0] > record.counts[1]
    features = out.image_hidden_states  # one tensor (transformers 5.23), a tensor per image from 5.24
    per_image = list(features) if isinstance(features, (list, tuple)) else [features]
    assert sum(f.shape[0] for f in per_image) == sum(record.counts)
    lengths = record.attention_mask.sum(1)
    assert torch.equal(record.attention_mask, (torch.arange(out.logits.shape[1]) < lengths[:, None]).long())
    assert (record.input_ids[1, int(lengths[1]):] == PAD).all()
    for b, row in enumerate(rows):
        with torch.no_grad():
            alone = model(input_ids=torch.tensor([row]), pixel_values=pixels[b:b + 1]).logits
        assert alone.shape[1] == lengths[b]
        torch.testing.assert_close(out.logits[b, int(lengths[b]) - 1], alone[0, -1], atol=1e-5, rtol=1e-5)


def test_features_are_each_images_real_tokens_in_the_spatial_order_of_their_destinations():
    model = patch_llava(tiny_llava(), tau=0.6, layers=3)
    pixels = torch.stack([HALVES, BUSY])
    with torch.no_grad():
        features = model.get_image_features(pixel_values=pixels).pooler_output
        record = model.mame.last_visual_tokens
        # The same merge, read from the tower: padded tokens in the merge's own layout.
        tower = model.model.vision_tower(pixels, output_hidden_states=True)
        raw = model.model.multi_modal_projector(tower.hidden_states[-2])
    state = model.mame.state
    holder = model.mame.source_map  # (B, 1 + PATCHES): output token that holds each input token
    reordered = False
    for b in range(2):
        positions = record.positions[b]
        assert len(features[b]) == len(positions) == len(record.sizes[b]) == record.counts[b]
        assert bool((positions[1:] > positions[:-1]).all()), "features must follow their patches' raster order"
        rows = holder[b, positions + 1]  # the merged token each feature's anchor patch lives in
        real = state.mask[b] if state.mask is not None else torch.ones(raw.shape[1], dtype=torch.bool)
        # Every real token but the class token (row 0), once each: no padding, nothing lost, nothing doubled.
        assert sorted(rows.tolist()) == list(range(1, int(real.sum())))
        torch.testing.assert_close(features[b], raw[b, rows], atol=1e-6, rtol=0)
        assert torch.equal(record.sizes[b], state.sizes[b, rows])
        assert float(record.sizes[b].sum()) == pytest.approx(PATCHES)
        reordered |= bool((rows[1:] < rows[:-1]).any())
    assert reordered, "the merge's own layout must differ from the spatial order somewhere, or nothing is tested"
    # One merge keeps its destinations in their original order, ahead of the preserved sources (core's layout).
    for plan in model.mame.last_plans:
        for destinations in plan.source_map[:, plan.dst_idx]:
            destinations = destinations[destinations >= 0]  # padding holds none
            assert bool((destinations[1:] > destinations[:-1]).all())


def test_forward_with_labels_and_left_padding_trains():
    model = patch_llava(tiny_llava(), tau=0.6, layers=3)
    pixels = torch.stack([HALVES, BUSY])
    ids, mask = batch(prompt(7, 8, 9), prompt(9, 3, before=(1,)))  # the second row is left-padded
    labels = ids.masked_fill((ids == IMAGE) | (mask == 0), -100)
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, pixel_values=pixels, labels=labels)
    record = model.mame.last_visual_tokens
    assert (record.attention_mask[:, 0] == 0).any(), "left padding stays on the left"
    shrunk = shrink_image_runs(ids, record.counts, PATCHES, IMAGE, padding_side="left", attention_mask=mask,
                               labels=labels)
    assert torch.equal(shrunk["input_ids"], record.input_ids)
    expected = torch.nn.functional.cross_entropy(out.logits[:, :-1].flatten(0, 1),
                                                 shrunk["labels"][:, 1:].flatten(), ignore_index=-100)
    torch.testing.assert_close(out.loss, expected)
    # Training mode: gradients flow, and the fusion plans kept for the order are not kept past the forward.
    model.train()
    loss = model(input_ids=ids, attention_mask=mask, pixel_values=pixels, labels=labels).loss
    loss.backward()
    assert model.model.vision_tower.embeddings.patch_embedding.weight.grad is not None
    assert model.mame.last_plans == [] and model.mame.last_visual_token_counts == record.counts


def test_shrink_image_runs_cuts_each_image_and_repads():
    # Row 0 holds two images back to back (4 placeholders each), row 1 one image (left-padded); counts 2, 3, 2.
    ids = torch.tensor([[5, IMAGE, IMAGE, IMAGE, IMAGE, IMAGE, IMAGE, IMAGE, IMAGE, 6],
                        [PAD, PAD, PAD, PAD, PAD, 7, IMAGE, IMAGE, IMAGE, IMAGE]])
    mask = (ids != PAD).long()
    types = torch.arange(10).expand(2, -1)
    out = shrink_image_runs(ids, [2, 3, 2], 4, IMAGE, padding_side="left", attention_mask=mask, labels=ids,
                            token_type_ids=types)
    assert out["input_ids"].tolist() == [[PAD, 5, IMAGE, IMAGE, IMAGE, IMAGE, IMAGE, 6],
                                         [PAD, PAD, PAD, PAD, PAD, 7, IMAGE, IMAGE]]
    assert out["attention_mask"].tolist() == [[0] + [1] * 7, [0] * 5 + [1] * 3]
    assert out["labels"].tolist() == [[-100, 5, IMAGE, IMAGE, IMAGE, IMAGE, IMAGE, 6], out["input_ids"][1].tolist()]
    assert out["token_type_ids"].tolist() == [[0, 0, 1, 2, 5, 6, 7, 9], [0, 1, 2, 3, 4, 5, 6, 7]]
    right = shrink_image_runs(ids[1:], [2], 4, IMAGE, padding_side="right", pad_token_id=3)
    assert right["input_ids"].tolist() == [[PAD] * 5 + [7, IMAGE, IMAGE]] and right["attention_mask"] is None
    two = shrink_image_runs(torch.tensor(prompt(1)).expand(2, -1), [3, 5], PATCHES, IMAGE, padding_side="right",
                            pad_token_id=3)
    assert two["input_ids"][0, -2:].tolist() == [3, 3] and two["attention_mask"][0].tolist() == [1] * 6 + [0, 0]
    # Prompts that already hold one placeholder per feature pass as they are; others are refused.
    again = shrink_image_runs(out["input_ids"], [2, 3, 2], 4, IMAGE, padding_side="left")
    assert again["input_ids"] is out["input_ids"]
    with pytest.raises(ValueError, match="Image features and image tokens do not match"):
        shrink_image_runs(ids[:, :-1], [2, 3, 2], 4, IMAGE, padding_side="left")


def test_refusals_leave_the_model_unpatched():
    model = tiny_llava()
    for layers in (DEPTH, [3], [0, 3]):  # block 3 runs after hidden_states[-2], the output of block 2
        with pytest.raises(ValueError, match=r"Merge only in blocks < 3"):
            mame.patch.hf(model, tau=0.5, layers=layers)
        assert type(model.model.vision_tower) is CLIPVisionModel and "mame" not in vars(model)
    with pytest.raises(ValueError, match="LlavaForConditionalGeneration"):
        patch_llava(model.model.vision_tower)
    last_layer = tiny_llava(vision_feature_layer=-1)
    mame.patch.hf(last_layer, tau=0.5, layers=DEPTH)  # every block comes before the last hidden state
    with pytest.raises(ValueError, match="'default' drops the class token"):
        patch_llava(tiny_llava(tower="siglip"), tau=0.5, layers=3)

    model = patch_llava(model, tau=0.6, layers=3)
    pixels = torch.stack([HALVES, BUSY])
    ids = torch.tensor([prompt(7), prompt(8)])
    with torch.no_grad(), pytest.raises(ValueError, match="vision_feature_select_strategy"):
        model(input_ids=ids, pixel_values=pixels, vision_feature_select_strategy="cls")
    with torch.no_grad(), pytest.raises(ValueError, match=r"Merge only in blocks < 1"):
        model(input_ids=ids, pixel_values=pixels, vision_feature_layer=1)
    with torch.no_grad(), pytest.raises(ValueError, match="image_sizes"):
        model(input_ids=ids, pixel_values=pixels, image_sizes=torch.tensor([[32, 32], [32, 32]]))
    with torch.no_grad(), pytest.raises(ValueError, match="position_ids"):
        model(input_ids=ids, pixel_values=pixels, position_ids=torch.arange(ids.shape[1]).expand(2, -1))
    with torch.no_grad(), pytest.raises(ValueError, match="needs input_ids"):
        model(inputs_embeds=torch.zeros(2, ids.shape[1], 32), pixel_values=pixels)
    with torch.no_grad(), pytest.raises(ValueError, match="do not match"):
        model(input_ids=ids[:, :-3], pixel_values=pixels)


def test_several_feature_layers_and_a_siglip_tower():
    """A list of feature layers works when every merge comes before the first; SigLIP (no class token) with the
    "full" strategy keeps every real token."""
    model = tiny_llava(vision_feature_layer=[-3, -2])
    pixels = torch.stack([HALVES, BUSY])
    ids = torch.tensor([prompt(7), prompt(8)])
    with torch.no_grad():
        reference = model(input_ids=ids, pixel_values=pixels).logits
        with pytest.raises(ValueError, match=r"Merge only in blocks < 2"):
            mame.patch.hf(model, tau=0.5, layers=3)
        mame.patch.hf(model, tau=1.0, layers=2)
        torch.testing.assert_close(model(input_ids=ids, pixel_values=pixels).logits, reference, atol=1e-5, rtol=0)
        mame.patch.hf(model, tau=0.3, layers=2)
        model(input_ids=ids, pixel_values=pixels)
        assert max(model.mame.last_visual_token_counts) < PATCHES

        siglip = tiny_llava(tower="siglip", vision_feature_select_strategy="full")
        generated = greedy(siglip, ids, torch.ones_like(ids), pixels)
        mame.patch.hf(siglip, tau=1.0, layers=3)
        assert torch.equal(greedy(siglip, ids, torch.ones_like(ids), pixels), generated)
        mame.patch.hf(siglip, tau=0.6, layers=3)
        out = greedy(siglip, ids, torch.ones_like(ids), pixels)
        counts = siglip.mame.last_visual_token_counts
        assert min(counts) < PATCHES and out.shape == generated.shape
        assert all(float(s.sum()) == pytest.approx(PATCHES) for s in siglip.mame.last_visual_tokens.sizes)


def test_copies_and_return_tuple():
    model = patch_llava(tiny_llava(), tau=0.6, layers=3)
    pixels = torch.stack([HALVES, BUSY])
    ids = torch.tensor([prompt(7), prompt(8)])
    with torch.no_grad():
        expected = model(input_ids=ids, pixel_values=pixels).logits
        twin = copy.deepcopy(model)
        assert twin.mame is not model.mame and twin.mame.last_visual_tokens is None
        torch.testing.assert_close(twin(input_ids=ids, pixel_values=pixels).logits, expected, atol=0, rtol=0)
        assert isinstance(twin.mame.last_visual_tokens, VisualTokens)
        as_tuple = model.model.get_image_features(pixel_values=pixels, return_dict=False)
        # (last_hidden_state, pooler_output, hidden_states): the features are the second
        assert isinstance(as_tuple, tuple) and [len(f) for f in as_tuple[1]] == model.mame.last_visual_token_counts
        mame.unpatch(twin)
        assert type(twin) is LlavaForConditionalGeneration and type(model) is not LlavaForConditionalGeneration
