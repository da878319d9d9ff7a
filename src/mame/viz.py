"""Merge maps: which patches ended up in the same token (the paper's Figures 1 and 3).

Each patch of the image is painted with the mean colour of all patches its token holds, and borders are drawn
between patches held by different tokens, so a large flat region merged into one token reads as one flat cell.
Needs only numpy and Pillow.
"""

from __future__ import annotations

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
    out = Image.fromarray(np.kron(painted, np.ones((patch, patch, 1))).astype(np.uint8))
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
