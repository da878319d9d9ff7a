"""Merge maps: which patches ended up in the same token (the paper's Figures 1 and 3).

Each patch of the image is painted with the mean colour of all patches its token holds, and borders are drawn
between patches held by different tokens, so a large flat region merged into one token reads as one flat cell.
`merge_map` needs only numpy and Pillow; the figures of `mame viz` (`method_maps`, `write_figures`: MaMe and the
baselines side by side after chosen blocks) need matplotlib (``pip install 'mame[viz]'``).
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw


def merge_map(image: Image.Image, source_map: torch.Tensor, num_special: int, grid: int,
              border: tuple[int, int, int] = (255, 255, 255)) -> Image.Image:
    """Paint ``image`` (already resized to the model input) by the token that holds each patch.

    Args:
        image: the picture the model saw, square, ``grid * patch`` pixels wide.
        source_map: (L,) for each input token, the output token holding it (`FusionPlan.source_map` composed
            over the blocks; -1 = discarded).
        num_special: leading special tokens to skip.
        grid: patches per side.
        border: colour of the lines between different tokens.
    """
    pixels = np.asarray(image.convert("RGB"), dtype=np.float32)
    patch = pixels.shape[0] // grid
    owners = source_map[num_special:].reshape(grid, grid).cpu().numpy()
    cells = pixels[: grid * patch, : grid * patch].reshape(grid, patch, grid, patch, 3).mean(axis=(1, 3))
    painted = np.zeros_like(cells)
    for owner in np.unique(owners):
        where = owners == owner
        painted[where] = cells[where].mean(axis=0) if owner >= 0 else 0
    return _draw_borders(Image.fromarray(np.kron(painted, np.ones((patch, patch, 1))).astype(np.uint8)), owners,
                         grid, border)


def _draw_borders(out: Image.Image, owners: np.ndarray, grid: int, border: tuple[int, int, int]) -> Image.Image:
    """Draw lines on ``out`` (in place) between neighbouring patches held by different tokens; returns it."""
    patch = out.width // grid
    draw = ImageDraw.Draw(out)
    for r in range(grid):
        for c in range(grid):
            x0, y0 = c * patch, r * patch
            if c + 1 < grid and owners[r, c] != owners[r, c + 1]:
                draw.line([(x0 + patch, y0), (x0 + patch, y0 + patch)], fill=border)
            if r + 1 < grid and owners[r, c] != owners[r + 1, c]:
                draw.line([(x0, y0 + patch), (x0 + patch, y0 + patch)], fill=border)
    return out


def save_grid(rows: Sequence[Sequence[Image.Image]], labels: Sequence[str], path: str | Path,
              pad: int = 6) -> Path:
    """Save a table of equally sized pictures with column labels on top as one PNG."""
    height, width = rows[0][0].height, rows[0][0].width
    header = 18
    canvas = Image.new("RGB", (len(labels) * (width + pad) + pad, header + len(rows) * (height + pad) + pad),
                       (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for c, label in enumerate(labels):
        draw.text((pad + c * (width + pad), 3), label, fill=(0, 0, 0))
    for r, row in enumerate(rows):
        for c, picture in enumerate(row):
            canvas.paste(picture, (pad + c * (width + pad), header + pad + r * (height + pad)))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
    return path


def mark_single_patches(image: Image.Image, source_map: torch.Tensor, num_special: int, grid: int,
                        colour: tuple[int, int, int] = (255, 0, 0)) -> Image.Image:
    """Put a dot on every patch whose token holds that patch alone (never merged, or MaMe's preserved sources);
    returns a marked copy of ``image``."""
    owners = source_map[num_special:].reshape(grid, grid).cpu().numpy()
    held, counts = np.unique(owners, return_counts=True)
    single = set(held[(counts == 1) & (held >= 0)].tolist())
    out = image.copy()
    draw = ImageDraw.Draw(out)
    patch = image.width // grid
    radius = max(1, patch // 10)
    for r in range(grid):
        for c in range(grid):
            if owners[r, c] in single:
                x, y = c * patch + patch // 2, r * patch + patch // 2
                draw.ellipse([x - radius, y - radius, x + radius, y + radius], fill=colour)
    return out


class MergeTrace:
    """Records, for every merging block of a patched model, which output token holds each input token.

    It wraps each block's merger (MaMe, ToMe or any other `mame.blocks.Merger`) so that the tokens carry a scaled
    identity matrix as extra channels through the merge: every merger here outputs linear combinations of its input
    tokens, so those channels come out as each output token's shares of the input tokens, whatever the method's
    own bookkeeping (ToMe keeps no fusion plans). The channels are scaled to 1e-4 of the mean token norm, so a
    merger whose similarity is computed on the tokens themselves sees cosines changed by about 1e-8. Use it on a
    copy of a patched model, for pictures: `owners_after` then composes the maps up to a block.
    """

    def __init__(self, model: torch.nn.Module) -> None:
        self.blocks: dict[int, torch.Tensor] = {}  # block index -> (B, L_in) owner of each input token
        for index, block in enumerate(model.blocks):
            merger = getattr(block, "_mame_merger", None)
            if merger is not None:
                object.__setattr__(block, "_mame_merger", _TracedMerger(merger, index, self.blocks))

    def owners_after(self, block: int) -> torch.Tensor | None:
        """(B, L) for each original token the token holding it after the 0-based ``block`` (-1: dropped), or None
        when no block up to it merged."""
        result = None
        for index in sorted(self.blocks):
            if index > block:
                break
            step = self.blocks[index]
            result = step if result is None else torch.where(result >= 0, step.gather(1, result.clamp_min(0)), -1)
        return result


class _TracedMerger:
    """A merger that also writes the owner of every input token to ``record[block]`` (see `MergeTrace`)."""

    def __init__(self, merger, block: int, record: dict[int, torch.Tensor]) -> None:
        self.merger, self.block, self.record = merger, block, record
        self.needs_keys = merger.needs_keys

    def __call__(self, x: torch.Tensor, state, keys: torch.Tensor | None) -> torch.Tensor:
        batch, tokens, channels = x.shape
        scale = 1e-4 * float(x.detach().float().norm(dim=-1).mean())
        marker = torch.eye(tokens, dtype=x.dtype, device=x.device).expand(batch, -1, -1) * scale
        merged = self.merger(torch.cat([x, marker], dim=-1), state, keys)
        shares = merged[..., channels:]  # (B, L_out, L_in): each output token's share of each input token
        best, owner = shares.max(dim=1)
        self.record[self.block] = torch.where(best > 0, owner, -1)
        return merged[..., :channels].contiguous()


@dataclass(frozen=True)
class Panel:
    """One picture of a merge-map figure: ``method`` after 1-based ``block`` (0 = the input) with ``tokens``."""

    method: str
    block: int
    tokens: float


def method_maps(model: torch.nn.Module, image: Image.Image, variants: Sequence[tuple[str, torch.nn.Module]],
                after: Sequence[int], path: str | Path, *, title: str = "", fit: str = "center_crop",
                style: str = "mean") -> list[Panel]:
    """Draw one figure: a row per patched variant of ``model`` (the photo as the model sees it, then its merge map
    after each 1-based block of ``after``, the token count in every title), saved as a PNG at ``path``.

    Args:
        model: the unmodified model (its data config preprocesses the photo; ``fit`` as `mame.data.preprocess`).
        variants: ``(label, patched copy)`` pairs; each copy is traced (`MergeTrace`), so pass copies.
        style: ``"mean"`` paints every token's patches its mean colour, ``"distinct"`` one colour per token.
    Returns:
        the panels, row by row.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from mame import data

    grid = model.patch_embed.grid_size[0]
    num_special = model.num_prefix_tokens
    x = data.preprocess([image], model=model, mode=fit)
    shown = data.fit_image(image, model=model, mode=fit)
    full = grid * grid + num_special
    panels: list[Panel] = []
    figure, axes = plt.subplots(len(variants), len(after) + 1, squeeze=False,
                                figsize=(2.4 * (len(after) + 1), 2.9 * len(variants) + 0.3))
    for row, (label, patched) in enumerate(variants):
        trace = MergeTrace(patched)
        with torch.inference_mode():
            patched(x)
        counts = patched.mame.last_token_counts
        axes[row][0].imshow(shown)
        axes[row][0].set_title(f"{label}\ninput: {full} tokens", fontsize=8)
        panels.append(Panel(label, 0, float(full)))
        for column, block in enumerate(after, start=1):
            owners = trace.owners_after(block - 1)
            owners = torch.arange(full) if owners is None else owners[0]
            painted = (merge_map(shown, owners, num_special, grid) if style == "mean"
                       else _distinct(shown, owners, num_special, grid))
            axes[row][column].imshow(mark_single_patches(painted, owners, num_special, grid))
            tokens = counts[block - 1]
            axes[row][column].set_title(f"{label}\nafter block {block}: {tokens:.0f} tokens", fontsize=8)
            panels.append(Panel(label, block, float(tokens)))
    for axis in axes.flat:
        axis.set_axis_off()
    figure.suptitle(f"{title}  (dots: tokens holding a single patch)".strip(), fontsize=9)
    figure.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    plt.close(figure)
    # 256 adaptive colours: the flat merge maps lose nothing visible and the file shrinks about threefold
    Image.open(buffer).convert("RGB").quantize(256).save(path, optimize=True)
    return panels


def _distinct(image: Image.Image, source_map: torch.Tensor, num_special: int, grid: int) -> Image.Image:
    """Like `merge_map`, but each token of several patches gets a colour of its own (as the paper's Figure 1),
    half-blended with the photo so the scene stays readable; single patches keep their pixels."""
    owners = source_map[num_special:].reshape(grid, grid).cpu().numpy()
    pixels = np.asarray(image.convert("RGB"), dtype=np.float32)
    patch = pixels.shape[0] // grid
    held, counts = np.unique(owners, return_counts=True)
    palette = np.random.default_rng(0).integers(40, 256, size=(int(owners.max()) + 2, 3)).astype(np.float32)
    colours = np.zeros((grid, grid, 3), dtype=np.float32)
    blend = np.zeros((grid, grid, 1), dtype=np.float32)
    for owner in held[counts > 1]:
        where = owners == owner
        colours[where], blend[where] = palette[owner], 0.5
    layer = np.kron(colours, np.ones((patch, patch, 1)))
    alpha = np.kron(blend, np.ones((patch, patch, 1)))
    painted = pixels[: grid * patch, : grid * patch] * (1 - alpha) + layer * alpha
    return _draw_borders(Image.fromarray(painted.astype(np.uint8)), owners, grid, (255, 255, 255))


def _candidates(values: Sequence[float]) -> list[float]:
    """Settings to try when matching a baseline's token count: every integer in the range of an integer grid (ToMe's
    r), else 21 evenly spaced values."""
    low, high = min(values), max(values)
    if all(float(value).is_integer() for value in values):
        return list(range(int(low), int(high) + 1))
    return [float(value) for value in np.linspace(low, high, 21)]


def matched_setting(model: torch.nn.Module, x: torch.Tensor, name: str, tokens: float) -> dict:
    """The setting of baseline ``name`` whose tokens after the last block on ``x`` are closest to ``tokens`` (ties:
    the lighter reduction), so that merge maps compare methods at the same budget."""
    import copy

    from mame.methods import method

    entry = method(name)
    best, best_gap = {}, float("inf")
    for value in _candidates(entry.grid):
        patched = entry.apply(copy.deepcopy(model), {entry.param: value})
        with torch.inference_mode():
            patched(x)
        gap = abs(patched.mame.last_token_counts[-1] - tokens)
        if gap < best_gap:
            best, best_gap = {entry.param: value}, gap
    return best


def write_figures(model: torch.nn.Module, photos: Sequence[tuple[str, Image.Image]], out_dir: str | Path, *,
                  tau: float = 0.8, layers: int = 8, after: Sequence[int] = (3, 6, 12),
                  baselines: Sequence[str] = ("tome",), settings: dict[str, dict] | None = None,
                  fit: str = "center_crop", style: str = "mean") -> list[tuple[Path, list[Panel]]]:
    """One PNG per photo (``out_dir/<name>.png``): MaMe at ``tau`` on the first ``layers`` blocks, then each
    baseline, after each 1-based block of ``after``.

    Args:
        model: the unmodified timm ViT.
        photos: ``(name, image)`` pairs; slashes in names become ``_`` in file names.
        baselines: registered methods (`mame.methods.METHODS`) drawn below MaMe.
        settings: a fixed setting per baseline, e.g. ``{"tome": {"r": 8}}``; a baseline without one is matched to
            MaMe's tokens after the last block on that photo (`matched_setting`).
    Returns:
        ``(path, panels)`` per photo.
    """
    import copy

    from mame import data
    from mame.methods import method

    depth = len(model.blocks)
    bad = [block for block in after if not 1 <= block <= depth]
    if bad:
        raise ValueError(f"after must name blocks in 1..{depth}, got {bad}")
    settings = settings or {}
    written = []
    for name, image in photos:
        x = data.preprocess([image], model=model, mode=fit)
        mame_setting = {"tau": tau, "blocks": layers}
        variants = [(method("mame").describe(mame_setting), method("mame").apply(copy.deepcopy(model), mame_setting))]
        with torch.inference_mode():
            variants[0][1](x)
        target = variants[0][1].mame.last_token_counts[-1]
        for baseline in baselines:
            chosen = settings.get(baseline) or matched_setting(model, x, baseline, target)
            variants.append((method(baseline).describe(chosen), method(baseline).apply(copy.deepcopy(model), chosen)))
        path = Path(out_dir) / f"{name.replace('/', '_')}.png"
        panels = method_maps(model, image, variants, after, path, title=name, fit=fit, style=style)
        written.append((path, panels))
    return written
