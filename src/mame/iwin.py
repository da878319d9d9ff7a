"""Iwin Transformer on timm layers, with its own downsampling or with MaMe downsampling.

Iwin: S. Huo and N. Li, "Iwin Transformer: Hierarchical Vision Transformer using Interleaved Windows", 2025,
arXiv:2507.18405 (reference [13] of the MaMe paper). Written here from the description in the authors' public code
(github.com/Cominder/Iwin-Transformer, ``classification/models/iwin_transformer.py`` and the configs
``iwin_{tiny,small}_patch4_window7_224.yaml``); no code is copied. What that code builds, and this module too:

- patch embedding: 4x4 convolution, stride 4, then LayerNorm; no position embedding (``APE: False``);
- block: ``x + DropPath(IWA(LN(x)) + DWConv(LN(x)))`` then ``x + DropPath(MLP(LN(x)))``, where IWA is multi-head
  self-attention without relative position bias inside *interleaved* windows: with window size ``w`` on an
  ``H x W`` map, a window gathers the tokens whose row is ``g (mod H/w)`` and column ``h (mod W/w)``, i.e. ``w x w``
  tokens spaced ``H/w`` rows and ``W/w`` columns apart, so every window spans the whole map. DWConv is a 3x3
  depthwise convolution (with bias) that supplies the local mixing; it is left out when the window covers the whole
  map (``max(H, W) <= w``). When the map is not larger than the window, the window shrinks to ``min(H, W)``;
- downsampling between stages: LayerNorm, one row/column of zeros at the bottom/right, then a 3x3 convolution with
  stride 2 to twice the width (``Downsample2x``);
- head: LayerNorm, global average pooling, linear classifier; drop-path rates rise linearly over all blocks.

Layout differences (same computation, different module tree and state-dict names, so the upstream checkpoints do
not load without a key map, which this module does not provide): tensors stay (B, H, W, C) as in timm's Swin, and
each downsampling layer opens the next stage (timm's Swin layout) instead of closing the previous one (upstream's).
Beyond upstream: maps whose size is not a multiple of the window are zero-padded at the bottom/right with the
padded keys masked out of the attention (upstream requires multiples), and the convolutional downsampling of an odd
map rounds up (one more row/column of zeros), as Swin's ``PatchMerging`` and `MaMeDownsample` do.

``downsample="mame"`` builds the paper's variant (Table 2, Iwin†): every stage keeps the patch-embedding width and
the convolutional downsampling becomes `mame.downsample.MaMeDownsample` (no parameters); heads per stage are kept.

Registered in timm's registry (on ``import mame``, without importing timm before it is needed; see
`mame._timm_registry`): ``iwin_tiny_patch4_window7_224``, ``iwin_small_patch4_window7_224`` and their MaMe variants
``iwin_tiny_patch4_window7_224_mame`` and ``iwin_small_patch4_window7_224_mame``; there are no pretrained weights.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from timm.layers import ClassifierHead, DropPath, Mlp, PatchEmbed, trunc_normal_
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.vision_transformer import Attention

from mame.downsample import MaMeDownsample

__all__ = ["IwinTransformer", "IwinBlock", "IwinStage", "ConvDownsample", "interleaved_windows",
           "interleaved_windows_reverse"]


def interleaved_windows(x: torch.Tensor, window: tuple[int, int]) -> torch.Tensor:
    """(B, H, W, C) -> (B * nW, wh * ww, C): window (g, h) holds the tokens of rows ``g, g + H/wh, ...`` and columns
    ``h, h + W/ww, ...`` (H and W multiples of the window)."""
    batch, height, width, channels = x.shape
    wh, ww = window
    groups_h, groups_w = height // wh, width // ww
    x = x.view(batch, wh, groups_h, ww, groups_w, channels).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(batch * groups_h * groups_w, wh * ww, channels)


def interleaved_windows_reverse(windows: torch.Tensor, window: tuple[int, int], height: int,
                                width: int) -> torch.Tensor:
    """The inverse of `interleaved_windows`: (B * nW, wh * ww, C) -> (B, H, W, C)."""
    wh, ww = window
    groups_h, groups_w = height // wh, width // ww
    channels = windows.shape[-1]
    x = windows.view(-1, groups_h, groups_w, wh, ww, channels).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(-1, height, width, channels)


class IwinBlock(nn.Module):
    """One Iwin block on a (B, H, W, C) map: interleaved-window attention plus a depthwise 3x3 convolution on the
    same normed input, then the MLP (see the module docstring)."""

    def __init__(self, dim: int, input_resolution: tuple[int, int], num_heads: int, window_size: int = 7,
                 mlp_ratio: float = 4.0, qkv_bias: bool = True, proj_drop: float = 0.0, attn_drop: float = 0.0,
                 drop_path: float = 0.0, norm_layer: type[nn.Module] = nn.LayerNorm) -> None:
        super().__init__()
        self.dim = dim
        self.input_resolution = tuple(input_resolution)
        # As upstream: a map not larger than the window is one window of its shorter side.
        self.window_size = min(window_size, *self.input_resolution)
        self.mlp_ratio = mlp_ratio
        self.norm1 = norm_layer(dim)
        self.attn = Attention(dim, num_heads=num_heads, qkv_bias=qkv_bias, attn_drop=attn_drop, proj_drop=proj_drop)
        # Local mixing, only where the window does not already cover the whole map.
        self.dwconv = (nn.Conv2d(dim, dim, 3, padding=1, groups=dim)
                       if max(self.input_resolution) > self.window_size else None)
        self.drop_path1 = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=nn.GELU, drop=proj_drop)
        self.drop_path2 = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def _attention(self, h: torch.Tensor) -> torch.Tensor:
        batch, height, width, channels = h.shape
        size = self.window_size
        pad_h, pad_w = -height % size, -width % size
        mask = None
        if pad_h or pad_w:
            h = F.pad(h, (0, 0, 0, pad_w, 0, pad_h))
            valid = torch.zeros(1, height + pad_h, width + pad_w, 1, dtype=torch.bool, device=h.device)
            valid[:, :height, :width] = True
            keys = interleaved_windows(valid, (size, size)).squeeze(-1)  # (nW, w*w), True = a real token
            bias = torch.zeros(keys.shape, dtype=h.dtype, device=h.device).masked_fill(~keys, float("-inf"))
            mask = bias.repeat(batch, 1)[:, None, None, :]  # windows are batch-major
        windows = self.attn(interleaved_windows(h, (size, size)), attn_mask=mask)
        out = interleaved_windows_reverse(windows, (size, size), height + pad_h, width + pad_w)
        return out[:, :height, :width] if (pad_h or pad_w) else out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm1(x)
        branch = self._attention(h)
        if self.dwconv is not None:
            branch = branch + self.dwconv(h.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        x = x + self.drop_path1(branch)
        return x + self.drop_path2(self.mlp(self.norm2(x)))


class ConvDownsample(nn.Module):
    """Iwin's own downsampling: LayerNorm, zero padding at the bottom/right, 3x3 convolution with stride 2 (to
    ``out_dim``, twice the width in Iwin); (B, H, W, C) -> (B, ceil(H/2), ceil(W/2), out_dim)."""

    def __init__(self, dim: int, out_dim: int | None = None, norm_layer: type[nn.Module] = nn.LayerNorm) -> None:
        super().__init__()
        self.dim = dim
        self.out_dim = out_dim or 2 * dim
        self.norm = norm_layer(dim)
        self.conv = nn.Conv2d(dim, self.out_dim, kernel_size=3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        height, width = x.shape[1:3]
        x = self.norm(x).permute(0, 3, 1, 2)
        # Upstream pads one row and column (even maps); an odd map gets one more so the output rounds up.
        x = F.pad(x, (0, 1 + width % 2, 0, 1 + height % 2))
        return self.conv(x).permute(0, 2, 3, 1)


class IwinStage(nn.Module):
    """Optional downsampling (``"conv"``, ``"mame"`` or None for the first stage), then ``depth`` Iwin blocks."""

    def __init__(self, dim: int, out_dim: int, input_resolution: tuple[int, int], depth: int, num_heads: int,
                 window_size: int, downsample: str | None, mlp_ratio: float, qkv_bias: bool, proj_drop: float,
                 attn_drop: float, drop_path: Sequence[float], norm_layer: type[nn.Module], mame_tau: float,
                 mame_prune: bool) -> None:
        super().__init__()
        self.input_resolution = tuple(input_resolution)
        if downsample is None:
            if dim != out_dim:
                raise ValueError(f"a stage without downsampling keeps its width, got {dim} -> {out_dim}")
            self.downsample = nn.Identity()
            self.output_resolution = self.input_resolution
        else:
            if downsample == "conv":
                self.downsample = ConvDownsample(dim, out_dim, norm_layer)
            else:
                self.downsample = MaMeDownsample(dim, out_dim, tau=mame_tau, prune=mame_prune)
            self.output_resolution = tuple((size + 1) // 2 for size in self.input_resolution)
        self.blocks = nn.Sequential(*[
            IwinBlock(out_dim, self.output_resolution, num_heads, window_size, mlp_ratio, qkv_bias, proj_drop,
                      attn_drop, drop_path[i], norm_layer)
            for i in range(depth)])
        self.grad_checkpointing = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.downsample(x)
        if self.grad_checkpointing and not torch.jit.is_scripting():
            from timm.models._manipulate import checkpoint_seq

            return checkpoint_seq(self.blocks, x)
        return self.blocks(x)


DOWNSAMPLES = ("conv", "mame")


class IwinTransformer(nn.Module):
    """Iwin Transformer (Huo & Li 2025) for classification; see the module docstring for the architecture.

    Args:
        img_size: input size (the stage resolutions, windows and the depthwise convolutions depend on it).
        patch_size: patch-embedding stride and kernel.
        in_chans: input channels.
        num_classes: classifier outputs (0: no classifier).
        embed_dim: width of the first stage (doubled at each downsampling with ``downsample="conv"``).
        depths: blocks per stage.
        num_heads: attention heads per stage.
        window_size: window side (clamped per stage to the map's shorter side when the map is not larger).
        mlp_ratio: MLP hidden width / width.
        qkv_bias: bias of the q, k, v projection.
        drop_rate: dropout before the classifier.
        proj_drop_rate: dropout after the attention projection and in the MLP.
        attn_drop_rate: dropout on the attention weights.
        drop_path_rate: stochastic depth of the last block (linear from 0 over all blocks); the upstream recipes use
            0.2 (tiny) and 0.3 (small).
        downsample: ``"conv"`` (Iwin's own, width doubling) or ``"mame"`` (the MaMe paper's, constant width).
        mame_tau: τ of the MaMe downsampling (the paper's from-scratch setting: 0.5).
        mame_prune: adaptive weight pruning in the MaMe downsampling.
        global_pool: ``"avg"`` (Iwin's) or any pooling of timm's ``ClassifierHead``.
    """

    def __init__(self, img_size: int | tuple[int, int] = 224, patch_size: int = 4, in_chans: int = 3,
                 num_classes: int = 1000, embed_dim: int = 96, depths: Sequence[int] = (2, 2, 6, 2),
                 num_heads: Sequence[int] = (3, 6, 12, 24), window_size: int = 7, mlp_ratio: float = 4.0,
                 qkv_bias: bool = True, drop_rate: float = 0.0, proj_drop_rate: float = 0.0,
                 attn_drop_rate: float = 0.0, drop_path_rate: float = 0.1, downsample: str = "conv",
                 mame_tau: float = 0.5, mame_prune: bool = True, global_pool: str = "avg",
                 norm_layer: type[nn.Module] = nn.LayerNorm, **kwargs: Any) -> None:
        super().__init__()
        kwargs.pop("pretrained_cfg", None), kwargs.pop("pretrained_cfg_overlay", None)
        if kwargs:
            raise TypeError(f"IwinTransformer got unexpected arguments: {sorted(kwargs)}")
        if downsample not in DOWNSAMPLES:
            raise ValueError(f"downsample must be one of {DOWNSAMPLES}, got {downsample!r}")
        if len(depths) != len(num_heads):
            raise ValueError(f"depths and num_heads need one entry per stage, got {list(depths)} and "
                             f"{list(num_heads)}")
        self._settings = dict(
            img_size=img_size, patch_size=patch_size, in_chans=in_chans, num_classes=num_classes,
            embed_dim=embed_dim, depths=tuple(depths), num_heads=tuple(num_heads), window_size=window_size,
            mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, drop_rate=drop_rate, proj_drop_rate=proj_drop_rate,
            attn_drop_rate=attn_drop_rate, drop_path_rate=drop_path_rate, downsample=downsample, mame_tau=mame_tau,
            mame_prune=mame_prune, global_pool=global_pool, norm_layer=norm_layer)
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.embed_dim = embed_dim
        self.downsample_kind = downsample
        self.output_fmt = "NHWC"
        num_stages = len(depths)
        widths = [embed_dim * (2 ** i if downsample == "conv" else 1) for i in range(num_stages)]
        self.num_features = self.head_hidden_size = widths[-1]
        self.patch_embed = PatchEmbed(img_size=img_size, patch_size=patch_size, in_chans=in_chans,
                                      embed_dim=embed_dim, norm_layer=norm_layer, output_fmt="NHWC")
        resolution = tuple(self.patch_embed.grid_size)
        rates = torch.linspace(0, drop_path_rate, sum(depths)).tolist()
        stages, start, self.feature_info = [], 0, []
        reduction = self.patch_embed.patch_size[0]
        for index in range(num_stages):
            stage = IwinStage(
                dim=widths[max(index - 1, 0)], out_dim=widths[index], input_resolution=resolution,
                depth=depths[index], num_heads=num_heads[index], window_size=window_size,
                downsample=None if index == 0 else downsample, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias,
                proj_drop=proj_drop_rate, attn_drop=attn_drop_rate, drop_path=rates[start:start + depths[index]],
                norm_layer=norm_layer, mame_tau=mame_tau, mame_prune=mame_prune)
            stages.append(stage)
            start += depths[index]
            resolution = stage.output_resolution
            reduction *= 1 if index == 0 else 2
            self.feature_info.append(dict(num_chs=widths[index], reduction=reduction, module=f"layers.{index}"))
        self.layers = nn.Sequential(*stages)
        self.norm = norm_layer(self.num_features)
        self.head = ClassifierHead(self.num_features, num_classes, pool_type=global_pool, drop_rate=drop_rate,
                                   input_fmt="NHWC")
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        # As upstream: truncated normal (std 0.02) linear weights, zero biases, unit LayerNorms; convolutions keep
        # PyTorch's default initialisation.
        if isinstance(module, nn.Linear):
            trunc_normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)

    @property
    def settings(self) -> dict[str, Any]:
        """The constructor arguments this model was built with."""
        return dict(self._settings)

    def with_mame_downsampling(self, tau: float = 0.5, prune: bool = True) -> "IwinTransformer":
        """A new, freshly initialised Iwin with the same settings at constant width with MaMe downsampling."""
        return IwinTransformer(**{**self._settings, "downsample": "mame", "mame_tau": tau, "mame_prune": prune})

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return set()

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        return dict(stem=r"^patch_embed", blocks=r"^layers\.(\d+)" if coarse else [
            (r"^layers\.(\d+).downsample", (0,)), (r"^layers\.(\d+)\.\w+\.(\d+)", None), (r"^norm", (99999,))])

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        for stage in self.layers:
            stage.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head.fc

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        self.num_classes = num_classes
        self.head.reset(num_classes, pool_type=global_pool, in_features=self.num_features)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) images -> (B, h, w, num_features) final feature map, normed."""
        return self.norm(self.layers(self.patch_embed(x)))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return self.head(x, pre_logits=pre_logits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def _cfg(**kwargs: Any) -> dict[str, Any]:
    return dict(url="", num_classes=1000, input_size=(3, 224, 224), pool_size=None, crop_pct=0.9,
                interpolation="bicubic", mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225),
                first_conv="patch_embed.proj", classifier="head.fc", license="mit",
                paper_ids="arXiv:2507.18405", **kwargs)


default_cfgs = generate_default_cfgs({
    "iwin_tiny_patch4_window7_224": _cfg(),
    "iwin_small_patch4_window7_224": _cfg(),
    "iwin_tiny_patch4_window7_224_mame": _cfg(),
    "iwin_small_patch4_window7_224_mame": _cfg(),
})

# The upstream ImageNet-1k configs (classification/configs/iwin_{tiny,small}_patch4_window7_224.yaml).
IWIN_TINY = dict(patch_size=4, embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24), window_size=7)
IWIN_SMALL = dict(patch_size=4, embed_dim=96, depths=(2, 2, 18, 2), num_heads=(3, 4, 8, 16), window_size=7)


def _create(variant: str, pretrained: bool, **kwargs: Any) -> IwinTransformer:
    if pretrained:
        raise ValueError(f"{variant}: no pretrained weights are bundled (the upstream checkpoints use another module "
                         "layout); build it with pretrained=False and train it (`mame train`)")
    return build_model_with_cfg(IwinTransformer, variant, pretrained=False,
                                feature_cfg=dict(flatten_sequential=True, out_indices=(0, 1, 2, 3)), **kwargs)


@register_model
def iwin_tiny_patch4_window7_224(pretrained: bool = False, **kwargs: Any) -> IwinTransformer:
    """Iwin-T: 96 wide, depths (2, 2, 6, 2), heads (3, 6, 12, 24), window 7 (30.2 M parameters)."""
    return _create("iwin_tiny_patch4_window7_224", pretrained, **{**IWIN_TINY, **kwargs})


@register_model
def iwin_small_patch4_window7_224(pretrained: bool = False, **kwargs: Any) -> IwinTransformer:
    """Iwin-S: 96 wide, depths (2, 2, 18, 2), heads (3, 4, 8, 16) as in the upstream ImageNet-1k config, window 7."""
    return _create("iwin_small_patch4_window7_224", pretrained, **{**IWIN_SMALL, **kwargs})


@register_model
def iwin_tiny_patch4_window7_224_mame(pretrained: bool = False, **kwargs: Any) -> IwinTransformer:
    """Iwin-T† of the MaMe paper: Iwin-T at constant width 96 with MaMe downsampling (τ = 0.5)."""
    return _create("iwin_tiny_patch4_window7_224_mame", pretrained, **{**IWIN_TINY, "downsample": "mame", **kwargs})


@register_model
def iwin_small_patch4_window7_224_mame(pretrained: bool = False, **kwargs: Any) -> IwinTransformer:
    """Iwin-S† of the MaMe paper: Iwin-S at constant width 96 with MaMe downsampling (τ = 0.5)."""
    return _create("iwin_small_patch4_window7_224_mame", pretrained, **{**IWIN_SMALL, "downsample": "mame", **kwargs})


# Swin with MaMe downsampling under timm names of its own, so `timm.create_model` and `mame train` take it by name.
@register_model
def swin_tiny_patch4_window7_224_mame(pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """Swin-T† of the MaMe paper: Swin-T at constant width 96 with MaMe downsampling (``mame_tau``, default 0.5)."""
    from mame.downsample import swin_mame

    tau = kwargs.pop("mame_tau", 0.5)
    return swin_mame("swin_tiny_patch4_window7_224", tau=tau, pretrained=pretrained, **kwargs)


@register_model
def swin_small_patch4_window7_224_mame(pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """Swin-S† of the MaMe paper: Swin-S at constant width 96 with MaMe downsampling (``mame_tau``, default 0.5)."""
    from mame.downsample import swin_mame

    tau = kwargs.pop("mame_tau", 0.5)
    return swin_mame("swin_small_patch4_window7_224", tau=tau, pretrained=pretrained, **kwargs)
