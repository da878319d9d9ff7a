"""MaMe as the downsampling layer (`mame.downsample`): shapes, the regular destination grid, eqs 2-9 against an
independent reference, per-sample merging, gradients through the merge, and the constant-width Swin builder."""

import pytest
import timm
import torch

from mame.core import fusion_weights
from mame.downsample import MaMeDownsample, compare_downsampling, swin_mame, swin_to_mame, to_mame_downsampling

TINY_SWIN = dict(img_size=28, patch_size=2, in_chans=1, num_classes=10, embed_dim=16, depths=(1, 1, 2, 1),
                 num_heads=(1, 2, 2, 4), window_size=7)


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


def reference(x: torch.Tensor, tau: float) -> torch.Tensor:
    """Eqs 2-9 written out: destinations are the top-left token of each 2x2 cell, every other token is a source
    that may join any destination; sources that join none are dropped."""
    batch, height, width, channels = x.shape
    out = []
    for image in x:
        is_dst = torch.zeros(height, width, dtype=torch.bool)
        is_dst[::2, ::2] = True
        dst, src = image[is_dst], image[~is_dst]  # raster order: dst = the H/2 x W/2 grid, row by row
        w = fusion_weights(dst[None], src[None], tau)[0]  # (M, N), eqs 2-8
        fused = (dst + w @ src) / (1 + w.sum(-1, keepdim=True))  # eq 9
        out.append(fused.reshape(height // 2, width // 2, channels))
    return torch.stack(out)


def test_shape_and_constant_width() -> None:
    down = MaMeDownsample(16, tau=0.5)
    assert down(torch.randn(2, 8, 8, 16)).shape == (2, 4, 4, 16)
    assert down(torch.randn(1, 7, 5, 16)).shape == (1, 4, 3, 16)  # odd sizes round up, as PatchMerging
    assert down.out_dim == 16 and not list(down.parameters())


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="keeps the width"):
        MaMeDownsample(16, out_dim=32)
    with pytest.raises(ValueError, match="tau"):
        MaMeDownsample(16, tau=1.5)
    with pytest.raises(ValueError, match=r"\(B, H, W, C=16\)"):
        MaMeDownsample(16)(torch.randn(2, 64, 16))
    with pytest.raises(ValueError, match="C=16"):
        MaMeDownsample(16)(torch.randn(2, 4, 4, 8))


def test_destinations_form_the_regular_grid() -> None:
    x = torch.randn(2, 6, 8, 16)
    # tau = 1: nothing fuses, every source is discarded, the output is the top-left token of each cell.
    assert torch.equal(MaMeDownsample(16, tau=1.0)(x), x[:, ::2, ::2])


@pytest.mark.parametrize("tau", [0.0, 0.3, 0.6])
def test_matches_equations(tau: float) -> None:
    torch.manual_seed(0)
    base = torch.randn(2, 1, 1, 8)
    # Correlated tokens, so that sources fuse into several destinations and some are preserved (dropped).
    x = base + 0.8 * torch.randn(2, 6, 6, 8)
    assert torch.allclose(MaMeDownsample(8, tau=tau)(x), reference(x, tau), atol=1e-5)


def test_each_image_merges_on_its_own() -> None:
    torch.manual_seed(1)
    x = torch.randn(3, 8, 8, 12) + torch.randn(3, 1, 1, 12)
    down = MaMeDownsample(12, tau=0.2)
    together = down(x)
    alone = torch.cat([down(x[i:i + 1]) for i in range(3)])
    assert torch.allclose(together, alone, atol=1e-6)


def test_merge_plan_fuses_sources() -> None:
    x = torch.randn(1, 4, 4, 8) + 3 * torch.randn(1, 1, 1, 8)  # all tokens alike: the sources fuse
    y, plan = MaMeDownsample(8, tau=0.3).merge(x)
    assert y.shape == (1, 2, 2, 8)
    assert float(plan.weights.sum()) > 0
    assert plan.sizes.shape == (1, 4)


def test_constant_width_swin() -> None:
    original = timm.create_model("swin_tiny_patch4_window7_224", **TINY_SWIN)
    model = swin_to_mame(timm.create_model("swin_tiny_patch4_window7_224", **TINY_SWIN), tau=0.5)
    assert model.num_features == 16
    for index, stage in enumerate(model.layers):
        assert all(block.norm1.normalized_shape == (16,) for block in stage.blocks)
        if index:
            assert isinstance(stage.downsample, MaMeDownsample)
            # Heads and windows are kept from the original stage.
            assert stage.blocks[0].attn.num_heads == original.layers[index].blocks[0].attn.num_heads
            assert stage.blocks[0].window_size == original.layers[index].blocks[0].window_size
    x = torch.randn(2, 1, 28, 28)
    assert model(x).shape == (2, 10)
    assert model.forward_features(x).shape == (2, 2, 2, 16)
    assert sum(p.numel() for p in model.parameters()) < sum(p.numel() for p in original.parameters()) / 4


def test_gradients_reach_every_parameter() -> None:
    torch.manual_seed(0)
    model = swin_mame("swin_tiny_patch4_window7_224", tau=0.0, **TINY_SWIN).train()
    x = torch.randn(4, 1, 28, 28)
    loss = torch.nn.functional.cross_entropy(model(x), torch.tensor([0, 1, 2, 3]))
    loss.backward()
    missing = [name for name, p in model.named_parameters() if p.grad is None or not bool(p.grad.abs().sum() > 0)]
    assert not missing
    # ... and the sources do reach the output through the merge (not only the destinations).
    tokens = torch.randn(1, 4, 4, 8, requires_grad=True)
    (MaMeDownsample(8, tau=-1.0)(tokens).sum()).backward()
    assert bool((tokens.grad[0, 1::2, 1::2].abs().sum(-1) > 0).all())


def test_registered_swin_variant_and_errors() -> None:
    model = timm.create_model("swin_tiny_patch4_window7_224_mame", **TINY_SWIN)
    assert isinstance(model.layers[1].downsample, MaMeDownsample)
    with pytest.raises(ValueError, match="no pretrained"):
        timm.create_model("swin_tiny_patch4_window7_224_mame", pretrained=True, **TINY_SWIN)
    with pytest.raises(ValueError, match="has none"):
        to_mame_downsampling(timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8))


def test_compare_sizes() -> None:
    original, converted = compare_downsampling("swin_tiny_patch4_window7_224", **TINY_SWIN)
    assert original.input_size == (1, 28, 28)
    assert converted.params < original.params and converted.flops < original.flops
    assert converted.flops > 0
