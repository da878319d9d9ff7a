"""FLOP budgets beyond timm: ``mame.patch.hf(model, flops=…)`` (DINOv2, ViT, CLIP's and SigLIP's vision towers,
SigLIP2, VideoMAE) and ``mame.patch.open_clip(model, flops=…)``, each counted against `mame.bench.count_flops`; the
families whose token count is known only at run time (BERT, causal LMs, LLaVA) refuse a budget.

The models are tiny and random, built here at 64-px images in 8-px patches (64 patch tokens): merge counts are whole
tokens, and the 16-patch models of the other test files are too coarse to land within 3 % of a FLOP target.
"""

from __future__ import annotations

import copy
from typing import Callable

import pytest
import torch
import transformers
from open_clip.transformer import VisionTransformer

import mame
import mame.calibrate
from mame.bench import count_flops
from test_patch_hf_padded import tiny_bert
from test_patch_llava import tiny_llava

HIDDEN, HEADS, DEPTH, IMG, PATCH, FRAMES = 64, 4, 4, 64, 8, 4
GRID = (IMG // PATCH) ** 2
VISION = dict(hidden_size=HIDDEN, num_hidden_layers=DEPTH, num_attention_heads=HEADS, intermediate_size=4 * HIDDEN,
              image_size=IMG, patch_size=PATCH)


def _images(batch: int = 3) -> torch.Tensor:
    return torch.randn(batch, 3, IMG, IMG, generator=torch.Generator().manual_seed(5))


def _dinov2():
    config = {key: value for key, value in VISION.items() if key != "intermediate_size"}
    return transformers.Dinov2Model(transformers.Dinov2Config(**config, mlp_ratio=4)), _images()


def _vit():
    return transformers.ViTModel(transformers.ViTConfig(**VISION)), _images()


def _clip_vision():
    return transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**VISION)), _images()


def _siglip():
    return transformers.SiglipVisionModel(transformers.SiglipVisionConfig(**VISION)), _images()


def _siglip2():
    """SigLIP2 at its nominal size: every image fills all ``num_patches`` patches (no padding)."""
    config = {key: value for key, value in VISION.items() if key != "image_size"}
    model = transformers.Siglip2VisionModel(transformers.Siglip2VisionConfig(**config, num_patches=GRID))
    side = IMG // PATCH
    pixels = torch.randn(3, GRID, 3 * PATCH * PATCH, generator=torch.Generator().manual_seed(5))
    return model, dict(pixel_values=pixels, pixel_attention_mask=torch.ones(3, GRID, dtype=torch.long),
                       spatial_shapes=torch.tensor([[side, side]] * 3))


def _videomae():
    model = transformers.VideoMAEModel(transformers.VideoMAEConfig(**VISION, num_frames=FRAMES, tubelet_size=2))
    return model, torch.randn(3, FRAMES, 3, IMG, IMG, generator=torch.Generator().manual_seed(5))


def _open_clip():
    return VisionTransformer(image_size=IMG, patch_size=PATCH, width=HIDDEN, layers=DEPTH, heads=HEADS, mlp_ratio=4,
                             output_dim=32), _images()


# name -> (a fresh model and an input batch at its config's size, its patch function)
FAMILIES: dict[str, tuple[Callable[[], tuple[torch.nn.Module, object]], Callable[..., torch.nn.Module]]] = {
    "dinov2": (_dinov2, mame.patch.hf),
    "vit": (_vit, mame.patch.hf),
    "clip_vision": (_clip_vision, mame.patch.hf),
    "siglip": (_siglip, mame.patch.hf),
    "siglip2": (_siglip2, mame.patch.hf),
    "videomae": (_videomae, mame.patch.hf),
    "open_clip": (_open_clip, mame.patch.open_clip),
}


def _built(family: str) -> tuple[torch.nn.Module, object, Callable[..., torch.nn.Module]]:
    make, patch = FAMILIES[family]
    torch.manual_seed(0)
    model, inputs = make()
    return model.eval(), inputs, patch


def _call(model: torch.nn.Module, inputs) -> object:
    with torch.no_grad():
        return model(**inputs) if isinstance(inputs, dict) else model(inputs)


@pytest.mark.parametrize("family", FAMILIES)
def test_flop_budget_is_met_as_counted_and_the_batch_stays_rectangular(family):
    model, inputs, patch = _built(family)
    base = count_flops(model, inputs)
    patched = patch(copy.deepcopy(model), flops=2.0)
    assert base / count_flops(patched, inputs) == pytest.approx(2.0, rel=0.03)
    _call(patched, inputs)
    assert patched.mame.state.mask is None  # every image kept the same count: no padding
    counts = patched.mame.last_token_counts
    assert len(counts) == DEPTH and counts[-1] < counts[0]  # every block merged
    # The family's defaults besides τ and layers: the tokens as metric, pruning; every block merges.
    settings = patched.mame.settings
    assert settings["flops"] == 2.0 and "tau" not in settings
    assert settings["layers"] == tuple(range(DEPTH)) and settings["metric"] == "x" and settings["prune"] is True


@pytest.mark.parametrize("family, flops", [("dinov2", 1.5), ("videomae", 1.4), ("open_clip", 1.6)])
def test_flop_budget_with_other_targets_and_options(family, flops):
    """Other targets, the keys as metric (a narrower merge cost) and no pruning, and fewer merging blocks."""
    model, inputs, patch = _built(family)
    patched = patch(copy.deepcopy(model), flops=flops, layers=[1, 2, 3], metric="keys_mean", prune=False)
    assert count_flops(model, inputs) / count_flops(patched, inputs) == pytest.approx(flops, rel=0.03)
    _call(patched, inputs)
    tokens = {"dinov2": GRID + 1, "videomae": FRAMES // 2 * GRID, "open_clip": GRID + 1}[family]
    counts = patched.mame.last_token_counts
    assert counts[0] == tokens > counts[1]  # block 0 does not merge
    assert patched.mame.settings["layers"] == (1, 2, 3) and patched.mame.settings["metric"] == "keys_mean"


def test_tau_default_stays_the_papers():
    model, _, _ = _built("clip_vision")
    settings = mame.patch.hf(model, layers=3).mame.settings
    assert settings["tau"] == (0.8,) * 3 and "flops" not in settings
    assert settings["metric"] == "x" and settings["prune"] is True
    model, _, _ = _built("open_clip")
    with pytest.raises(ValueError, match="out of range"):  # the paper's first 8 blocks, of only 4
        mame.patch.open_clip(model)


def test_budget_thresholds_round_trip(tmp_path):
    model, inputs, _ = _built("siglip")
    patched = mame.patch.hf(copy.deepcopy(model), flops=1.8)
    again = mame.calibrate.load_thresholds(model, patched.mame.save_thresholds(tmp_path / "budget.json"))
    assert again.mame.settings == patched.mame.settings
    torch.testing.assert_close(_call(again, inputs).pooler_output, _call(patched, inputs).pooler_output)


def test_mha_fast_path_is_counted():
    """`nn.MultiheadAttention` runs a fused kernel in eval mode (open_clip's blocks): counted as its slow path is."""
    model, inputs, _ = _built("open_clip")
    fused = count_flops(model, inputs)
    enabled = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        assert count_flops(model, inputs) == fused
    finally:
        torch.backends.mha.set_fastpath_enabled(enabled)


def test_refusals():
    for family in ("dinov2", "open_clip"):
        model, _, patch = _built(family)
        with pytest.raises(ValueError, match="not both"):
            patch(model, tau=0.8, flops=2.0)
    with pytest.raises(ValueError, match="BertModel takes a similarity threshold.*sequence length"):
        mame.patch.hf(tiny_bert(), flops=2.0)
    torch.manual_seed(0)
    lm = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=50))
    with pytest.raises(ValueError, match="GPT2LMHeadModel takes a similarity threshold.*prompt length"):
        mame.patch.hf(lm, flops=2.0)
    llava = tiny_llava()
    with pytest.raises(ValueError, match="LLaVA takes a similarity threshold.*language model"):
        mame.patch.hf(llava, flops=2.0)
    assert not any(hasattr(module, "mame") for module in (lm, llava, llava.model.vision_tower))
    with pytest.raises(ValueError, match="out of reach"):
        mame.patch.hf(_built("vit")[0], flops=20.0)
