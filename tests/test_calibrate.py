"""Automatic τ (mame.calibrate): deterministic, meets its target, clear errors."""

import pytest
import timm
import torch

import mame
from mame.bench import count_flops
from mame.calibrate import calibrate


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return timm.create_model("vit_small_patch16_224", pretrained=False, num_classes=0, depth=4, embed_dim=64,
                             num_heads=4, img_size=64, patch_size=8).eval()


def blocky_images(count: int, seed: int) -> torch.Tensor:
    """Smooth colour fields plus noise: neighbouring patches are similar to a degree that depends on τ."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(count, 3, 4, 4, generator=g)
    return torch.nn.functional.interpolate(coarse, size=64, mode="bilinear") + 0.05 * torch.randn(
        count, 3, 64, 64, generator=g)


def test_flop_target_is_met_and_deterministic(model):
    images = blocky_images(4, seed=0)
    first = calibrate(model, images, target_flops=1.5, layers=4, steps=8, apply=False, progress=False)
    second = calibrate(model, images, target_flops=1.5, layers=4, steps=8, apply=False, progress=False)
    assert first.taus == second.taus and first.history == second.history
    assert len(first.taus) == 4 and first.layers == (0, 1, 2, 3)
    assert abs(first.achieved - 1.5) / 1.5 < 0.05
    assert not hasattr(model, "mame")  # apply=False leaves the model alone

    # On held-out images of the same kind the FLOP ratio stays within 10 % of the target.
    held_out = blocky_images(8, seed=1)
    patched = mame.patch.timm(model, tau=first.taus[0], layers=4)
    try:
        with torch.inference_mode():
            patched_flops = count_flops(patched, held_out)
            mame.unpatch(model)
            ratio = count_flops(model, held_out) / patched_flops
    finally:
        mame.unpatch(model)
    assert abs(ratio - 1.5) / 1.5 < 0.10


def test_token_target_and_apply(model):
    import copy

    net = copy.deepcopy(model)
    images = blocky_images(4, seed=2)
    result = calibrate(net, images, target_tokens=0.3, block=2, layers=4, steps=8, progress=False)
    assert result.kind == "tokens" and abs(result.achieved - 0.3) < 0.05
    assert net.mame.settings["tau"] == result.taus  # apply=True leaves the model patched with the chosen τ
    with torch.inference_mode():
        net(images)
    assert abs(net.mame.last_token_counts[1] / 65 - result.achieved) < 1e-6


@pytest.mark.parametrize("kwargs, match", [
    ({}, "exactly one"),
    ({"target_flops": 2.0, "target_tokens": 0.5}, "exactly one"),
    ({"target_tokens": 1.5}, "target_tokens"),
    ({"target_flops": 0.5}, "target_flops"),
    ({"target_speedup": 1.0}, "target_speedup"),
    ({"target_tokens": 0.5, "block": 9}, "block"),
])
def test_bad_targets(model, kwargs, match):
    with pytest.raises(ValueError, match=match):
        calibrate(model, blocky_images(2, seed=0), layers=4, progress=False, **kwargs)


def test_rejects_patched_model(model):
    import copy

    net = mame.patch.timm(copy.deepcopy(model), tau=0.8, layers=2)
    with pytest.raises(ValueError, match="already patched"):
        calibrate(net, blocky_images(2, seed=0), target_flops=1.5, progress=False)
