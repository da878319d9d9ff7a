"""MaMe as the downsampling layer of hierarchical vision transformers (paper section 4, "Training From Scratch").

Swin and Iwin halve their feature map between stages with a learned 2x2 patch merge that doubles the width
(timm's `PatchMerging`: LayerNorm + Linear 4C -> 2C). The paper replaces it with MaMe: 25 % of the tokens are
destinations (here the top-left token of every 2x2 cell, so they form a regular H/2 x W/2 grid), the other three
quarters are sources fused into them by eqs 2-9 (cosine similarity over *all* destinations, threshold τ, adaptive
pruning), and the preserved sources are discarded so the grid shape stays and windows still tile it. No parameters,
no width doubling: every stage keeps the patch-embedding width, which is where the large cut in parameters and FLOPs
of Table 2 comes from (Swin-T 29.0 M -> 1.45 M parameters).

    >>> down = MaMeDownsample(96, tau=0.5)            # drop-in for timm's PatchMerging(96), width kept
    >>> y = down(torch.randn(2, 56, 56, 96))          # (2, 28, 28, 96)
    >>> model = swin_mame("swin_tiny_patch4_window7_224", num_classes=10)   # constant width, MaMe downsampling
    >>> print_comparison("swin_tiny_patch4_window7_224")                    # parameters and FLOPs side by side
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from mame.core import FusionPlan, check_tau, merge


def _cells_first_corner(x: torch.Tensor) -> tuple[torch.Tensor, int, int]:
    """(B, H, W, C) -> (B, 4 * M, C) with M = ceil(H/2) * ceil(W/2): the top-left token of every 2x2 cell first (in
    raster order of the cells), then the top-right, bottom-left and bottom-right ones. Odd sizes are zero-padded at
    the bottom/right, as `PatchMerging` does; the padding is never a destination."""
    batch, height, width, channels = x.shape
    if height % 2 or width % 2:
        x = nn.functional.pad(x, (0, 0, 0, width % 2, 0, height % 2))
    half_h, half_w = (height + 1) // 2, (width + 1) // 2
    cells = x.reshape(batch, half_h, 2, half_w, 2, channels).permute(0, 2, 4, 1, 3, 5)
    return cells.reshape(batch, 4 * half_h * half_w, channels), half_h, half_w


class MaMeDownsample(nn.Module):
    """MaMe downsampling, a drop-in for timm Swin's ``PatchMerging``: (B, H, W, C) -> (B, ceil(H/2), ceil(W/2), C).

    The destinations are the top-left tokens of the 2x2 cells; every other token is a source that may fuse into any
    destination of the same image whose cosine similarity exceeds ``tau`` (eqs 2-8, adaptive pruning included), and
    destinations absorb their sources by eq 9. Sources that fuse nowhere (the preserved tokens of eq 10) are
    discarded, as the paper does to keep a regular grid. Each image is merged on its own (no batch-wide rule), so a
    sample's output never depends on the rest of its batch, which keeps data-parallel training equal to one process.

    Args:
        dim: channels C of the input.
        out_dim: must be None or ``dim``: the width is kept (MaMe has no parameters to change it).
        norm_layer: accepted for ``PatchMerging``'s signature and ignored (no parameters).
        tau: similarity threshold in [-1, 1] (the paper's training-from-scratch setting is 0.5). Zero padding of odd
            sizes has cosine 0 with every token, so for τ >= 0 it never fuses.
        prune: the adaptive weight pruning of eqs 5-8.
        eps: the ε of eqs 4-8.
    """

    def __init__(self, dim: int, out_dim: int | None = None, norm_layer: Any = None, *, tau: float = 0.5,
                 prune: bool = True, eps: float = 1e-6, device=None, dtype=None) -> None:
        super().__init__()
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
            raise ValueError(f"dim must be a positive int, got {dim!r}")
        if out_dim not in (None, dim):
            raise ValueError(f"MaMeDownsample keeps the width (it has no parameters): out_dim must be None or "
                             f"dim={dim}, got {out_dim!r}; build the model with a constant width (`swin_mame`)")
        self.dim = dim
        self.out_dim = dim
        self.tau = check_tau(tau)
        self.prune = bool(prune)
        self.eps = float(eps)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, tau={self.tau}, prune={self.prune}"

    def merge(self, x: torch.Tensor) -> tuple[torch.Tensor, FusionPlan]:
        """The downsampled map and the `FusionPlan` of the merge; the plan's tokens are in the cell order of
        ``_cells_first_corner`` (destinations = its first ``M`` tokens)."""
        if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.shape[-1] != self.dim:
            raise ValueError(f"MaMeDownsample expects (B, H, W, C={self.dim}) input, got "
                             f"{tuple(getattr(x, 'shape', ())) or type(x).__name__}")
        batch = x.shape[0]
        tokens, half_h, half_w = _cells_first_corner(x)
        y, plan = merge(tokens, self.tau, num_special=0, partition="sequential", prune=self.prune,
                        batch_rule="per_sample", eps=self.eps, dst_ratio=0.25, discard_preserved=True, check=False)
        return y.reshape(batch, half_h, half_w, self.dim), plan

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.merge(x)[0]


# ---------------------------------------------------------------------------------------------------- Swin builder


def _stage_settings(stage: nn.Module) -> dict[str, Any]:
    """The constructor arguments of a timm ``SwinTransformerStage`` read back from its first block."""
    from timm.layers import DropPath

    block = stage.blocks[0]
    attn = block.attn
    return dict(
        input_resolution=stage.input_resolution,
        depth=len(stage.blocks),
        num_heads=attn.num_heads,
        window_size=block.window_size,
        always_partition=block.always_partition,
        dynamic_mask=block.dynamic_mask,
        mlp_ratio=block.mlp_ratio,
        qkv_bias=attn.qkv.bias is not None,
        proj_drop=attn.proj_drop.p,
        attn_drop=attn.attn_drop.p,
        drop_path=[b.drop_path1.drop_prob if isinstance(b.drop_path1, DropPath) else 0.0 for b in stage.blocks],
        norm_layer=type(block.norm1),
    )


def swin_to_mame(model: nn.Module, tau: float = 0.5, prune: bool = True) -> nn.Module:
    """Rebuild a timm ``SwinTransformer`` in place at constant width with `MaMeDownsample` between stages.

    Every stage after the first is rebuilt at the patch-embedding width (its blocks get fresh weights: the widths
    change, so nothing can be kept), its ``PatchMerging`` becomes a `MaMeDownsample`, the final norm and the
    classifier shrink to that width, and the whole model is re-initialised with timm's Swin initialisation. Heads
    per stage, window sizes, depths, MLP ratio, dropout and drop-path rates are kept.

    Raises:
        ValueError: when ``model`` is not a timm ``SwinTransformer`` (or has per-stage widths of its own).
    """
    from timm.models.swin_transformer import SwinTransformer, SwinTransformerStage

    if not isinstance(model, SwinTransformer):
        raise ValueError(f"swin_to_mame needs a timm SwinTransformer, got {type(model).__name__}")
    width = model.embed_dim
    if not isinstance(width, int):
        raise ValueError(f"swin_to_mame needs a Swin built with an int embed_dim, got {width!r}")
    check_tau(tau)
    for index in range(1, len(model.layers)):
        settings = _stage_settings(model.layers[index])
        stage = SwinTransformerStage(dim=width, out_dim=width, downsample=True, **settings)
        stage.downsample = MaMeDownsample(width, tau=tau, prune=prune)
        stage.grad_checkpointing = model.layers[index].grad_checkpointing
        model.layers[index] = stage
    model.norm = type(model.norm)(width)
    model.head.reset(model.num_classes, in_features=width)
    model.num_features = model.head_hidden_size = width
    for info in model.feature_info:
        info["num_chs"] = width
    model.init_weights(needs_reset=False)
    model.mame_downsample = dict(tau=float(tau), prune=bool(prune))
    return model


def swin_mame(name: str = "swin_tiny_patch4_window7_224", tau: float = 0.5, prune: bool = True,
              **timm_kwargs: Any) -> nn.Module:
    """A timm Swin (by name, with timm's keyword arguments: ``num_classes``, ``img_size``, ``in_chans``,
    ``embed_dim``, ``depths``, ``num_heads``, ``window_size``, ...) at constant width with MaMe downsampling
    (`swin_to_mame`); random weights (there are no pretrained ones for this architecture)."""
    import timm

    if timm_kwargs.get("pretrained"):
        raise ValueError("a Swin with MaMe downsampling has no pretrained weights: train it (`mame train`)")
    timm_kwargs.pop("pretrained", None)
    return swin_to_mame(timm.create_model(name, pretrained=False, **timm_kwargs), tau=tau, prune=prune)


def to_mame_downsampling(model: nn.Module, tau: float = 0.5, prune: bool = True) -> nn.Module:
    """Swap the downsampling of a hierarchical model for MaMe at constant width: a timm ``SwinTransformer``
    (`swin_to_mame`) or a `mame.iwin.IwinTransformer` (rebuilt from its own settings). Returns the new model (for
    Swin the same object)."""
    from mame.iwin import IwinTransformer

    if isinstance(model, IwinTransformer):
        return model.with_mame_downsampling(tau=tau, prune=prune)
    from timm.models.swin_transformer import SwinTransformer

    if isinstance(model, SwinTransformer):
        return swin_to_mame(model, tau=tau, prune=prune)
    raise ValueError(f"MaMe downsampling replaces the patch merging of Swin (timm SwinTransformer) and Iwin "
                     f"(mame.iwin.IwinTransformer) models; {type(model).__name__} has none")


# ---------------------------------------------------------------------------------------------- size comparisons


@dataclass(frozen=True)
class ModelSize:
    """Parameters and FLOPs of one model at one input size (FLOPs: 2 per multiply-accumulate, attention and the
    merge's own matmuls included, `mame.bench.count_flops`; Table 2 of the paper counts multiply-accumulates, half
    of these)."""

    name: str
    params: int
    flops: int
    input_size: tuple[int, int, int]

    @property
    def params_m(self) -> float:
        return self.params / 1e6

    @property
    def gflops(self) -> float:
        return self.flops / 1e9

    @property
    def gmacs(self) -> float:
        return self.flops / 2e9


def model_size(model: nn.Module, input_size: tuple[int, int, int], name: str = "") -> ModelSize:
    """Parameters and FLOPs of one forward of a single image of ``input_size`` (C, H, W) in eval mode."""
    from mame.bench import count_flops

    was_training = model.training
    model.eval()
    try:
        param = next(model.parameters())
        flops = count_flops(model, torch.zeros(1, *input_size, device=param.device, dtype=param.dtype))
    finally:
        model.train(was_training)
    return ModelSize(name or type(model).__name__, sum(p.numel() for p in model.parameters()), flops,
                     tuple(input_size))


def compare_downsampling(name: str, tau: float = 0.5, input_size: tuple[int, int, int] | None = None,
                         **timm_kwargs: Any) -> tuple[ModelSize, ModelSize]:
    """Sizes of a Swin or Iwin model (timm name) with its own downsampling and with MaMe downsampling at constant
    width, at the model's input size (or ``input_size``)."""
    import timm

    original = timm.create_model(name, pretrained=False, **timm_kwargs)
    if input_size is None:
        input_size = tuple(original.pretrained_cfg.get("input_size", (3, 224, 224)))
        if "img_size" in timm_kwargs:
            size = timm_kwargs["img_size"]
            size = (size, size) if isinstance(size, int) else tuple(size)
            input_size = (timm_kwargs.get("in_chans", input_size[0]), *size)
    first = model_size(original, input_size, name)
    converted = to_mame_downsampling(original, tau=tau)
    return first, model_size(converted, input_size, f"{name} + MaMe downsampling")


def print_comparison(name: str, tau: float = 0.5, console: Any = None, **timm_kwargs: Any) -> tuple[ModelSize,
                                                                                                     ModelSize]:
    """Print parameters and FLOPs of ``name`` with its own and with MaMe downsampling side by side (rich table)."""
    from rich.console import Console
    from rich.table import Table

    sizes = compare_downsampling(name, tau=tau, **timm_kwargs)
    table = Table(title=f"{name}: own downsampling vs MaMe downsampling (τ={tau}, constant width)")
    for column in ("model", "params (M)", "GFLOPs", "GMACs", "input"):
        table.add_column(column, justify="left" if column == "model" else "right")
    for size in sizes:
        table.add_row(size.name, f"{size.params_m:.2f}", f"{size.gflops:.2f}", f"{size.gmacs:.2f}",
                      "x".join(map(str, size.input_size)))
    table.add_row("ratio", f"{sizes[1].params / sizes[0].params:.3f}", f"{sizes[1].flops / sizes[0].flops:.3f}",
                  f"{sizes[1].flops / sizes[0].flops:.3f}", "")
    (console or Console()).print(table)
    return sizes
