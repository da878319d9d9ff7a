"""Iwin Transformer (`mame.iwin`): timm registration, forward shapes, interleaved windows, the upstream sizes, and
the MaMe-downsampling variant."""

import subprocess
import sys

import pytest
import timm
import torch

from mame.downsample import MaMeDownsample, to_mame_downsampling
from mame.iwin import ConvDownsample, IwinBlock, IwinTransformer, interleaved_windows, interleaved_windows_reverse

TINY = dict(img_size=28, patch_size=2, in_chans=1, num_classes=10, embed_dim=16, depths=(1, 1, 2, 1),
            num_heads=(1, 2, 2, 4), window_size=7)


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


def test_registered_once_mame_is_imported_without_importing_timm() -> None:
    code = ("import sys, mame; assert 'timm' not in sys.modules, 'import mame imported timm'; import timm; "
            "names = timm.list_models('iwin*'); print(names); "
            "m = timm.create_model('iwin_small_patch4_window7_224_mame', img_size=28, patch_size=2, num_classes=3); "
            "print(type(m).__name__, m.layers[1].downsample.__class__.__name__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    for name in ("iwin_tiny_patch4_window7_224", "iwin_small_patch4_window7_224",
                 "iwin_tiny_patch4_window7_224_mame", "iwin_small_patch4_window7_224_mame"):
        assert name in out.stdout
    assert "IwinTransformer MaMeDownsample" in out.stdout


@pytest.mark.parametrize("downsample, width", [("conv", 128), ("mame", 16)])
def test_forward_shapes(downsample: str, width: int) -> None:
    model = IwinTransformer(**TINY, downsample=downsample).eval()
    x = torch.randn(2, 1, 28, 28)
    assert model(x).shape == (2, 10)
    assert model.forward_features(x).shape == (2, 2, 2, width)  # maps 14 -> 7 -> 4 -> 2
    assert [stage.output_resolution for stage in model.layers] == [(14, 14), (7, 7), (4, 4), (2, 2)]
    kind = ConvDownsample if downsample == "conv" else MaMeDownsample
    assert all(isinstance(stage.downsample, kind) for stage in model.layers[1:])


def test_windows_interleave() -> None:
    x = torch.arange(2 * 6 * 6 * 1, dtype=torch.float32).view(2, 6, 6, 1)
    windows = interleaved_windows(x, (3, 3))  # 2 x 2 windows of 3 x 3 tokens each, per image
    assert windows.shape == (8, 9, 1)
    # Window (0, 0) of image 0 holds rows 0, 2, 4 and columns 0, 2, 4: tokens two rows/columns apart.
    assert windows[0, :, 0].tolist() == [r * 6 + c for r in (0, 2, 4) for c in (0, 2, 4)]
    assert windows[1, :, 0].tolist() == [r * 6 + c for r in (0, 2, 4) for c in (1, 3, 5)]
    assert torch.equal(interleaved_windows_reverse(windows, (3, 3), 6, 6), x)


def test_attention_mixes_only_within_interleaved_windows() -> None:
    torch.manual_seed(0)
    block = IwinBlock(8, (6, 6), num_heads=2, window_size=3).eval()
    block.dwconv = None  # attention alone: without the local convolution
    block.mlp = torch.nn.Identity()
    block.norm2 = torch.nn.Identity()
    x = torch.randn(1, 6, 6, 8)
    moved = x.clone()
    moved[0, 0, 0, 0] += 1.0  # one channel (a shift of all channels would vanish in the LayerNorm)
    change = (block(moved) - block(x)).abs().sum(-1)[0] > 1e-6
    expected = torch.zeros(6, 6, dtype=torch.bool)
    expected[0::2, 0::2] = True  # the tokens sharing token (0, 0)'s window: rows and columns 0, 2, 4
    assert torch.equal(change, expected)


def test_depthwise_convolution_only_where_windows_do_not_cover_the_map() -> None:
    model = IwinTransformer(**TINY)
    has_conv = [all(block.dwconv is not None for block in stage.blocks) for stage in model.layers]
    assert has_conv == [True, False, False, False]  # 14x14 with window 7; then the window covers 7, 4, 2
    assert [stage.blocks[0].window_size for stage in model.layers] == [7, 7, 4, 2]


def test_maps_not_a_multiple_of_the_window() -> None:
    model = IwinTransformer(**{**TINY, "img_size": 36}).eval()  # 18 x 18, windows of 7: padded to 21, masked
    out = model(torch.randn(2, 1, 36, 36))
    assert out.shape == (2, 10) and bool(torch.isfinite(out).all())
    # Padding is masked out of the attention: each real token attends to exactly the real tokens of its window.
    torch.manual_seed(0)
    block = IwinBlock(8, (9, 9), num_heads=2, window_size=5).eval()  # 9 x 9 padded to 10 x 10: 2 x 2 windows
    h = torch.randn(1, 9, 9, 8)
    expected = torch.zeros_like(h)
    with torch.no_grad():
        for r in range(9):
            for c in range(9):
                members = [(a, b) for a in range(9) for b in range(9) if a % 2 == r % 2 and b % 2 == c % 2]
                tokens = torch.stack([h[0, a, b] for a, b in members])[None]
                expected[0, r, c] = block.attn(tokens)[0, members.index((r, c))]
        assert torch.allclose(block._attention(h), expected, atol=1e-5)


def test_upstream_sizes() -> None:
    """Parameter counts of the published models: Iwin-T 30.2 M, Iwin-S 51.6 M (upstream README); with MaMe
    downsampling the paper's Table 2 gives 1.46 M and 2.82 M."""
    def millions(name: str) -> float:
        return sum(p.numel() for p in timm.create_model(name).parameters()) / 1e6

    assert millions("iwin_tiny_patch4_window7_224") == pytest.approx(30.2, abs=0.05)
    assert millions("iwin_small_patch4_window7_224") == pytest.approx(51.6, abs=0.05)
    assert millions("iwin_tiny_patch4_window7_224_mame") == pytest.approx(1.46, abs=0.02)
    assert millions("iwin_small_patch4_window7_224_mame") == pytest.approx(2.82, abs=0.02)


def test_conversion_and_errors() -> None:
    model = timm.create_model("iwin_tiny_patch4_window7_224", **TINY)
    converted = to_mame_downsampling(model, tau=0.3)
    assert converted.downsample_kind == "mame" and converted.num_features == 16
    assert converted.layers[1].downsample.tau == 0.3
    assert converted.settings["depths"] == TINY["depths"]
    with pytest.raises(ValueError, match="no pretrained"):
        timm.create_model("iwin_tiny_patch4_window7_224", pretrained=True)
    with pytest.raises(ValueError, match="downsample"):
        IwinTransformer(**TINY, downsample="pool")
    with pytest.raises(ValueError, match="one entry per stage"):
        IwinTransformer(**{**TINY, "num_heads": (1, 2)})


def test_odd_maps_downsample_rounding_up() -> None:
    down = ConvDownsample(8, 16)
    assert down(torch.randn(1, 7, 7, 8)).shape == (1, 4, 4, 16)
    assert down(torch.randn(1, 8, 8, 8)).shape == (1, 4, 4, 16)


def test_gradients_reach_every_parameter_through_mame_downsampling() -> None:
    torch.manual_seed(0)
    model = timm.create_model("iwin_tiny_patch4_window7_224_mame", **TINY).train()
    loss = torch.nn.functional.cross_entropy(model(torch.randn(4, 1, 28, 28)), torch.tensor([0, 1, 2, 3]))
    loss.backward()
    assert not [name for name, p in model.named_parameters() if p.grad is None or not bool(p.grad.abs().sum() > 0)]
