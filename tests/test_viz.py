"""Merge-map figures (`mame viz`): the trace of which patch went where, the PNGs and the command."""

import copy

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

import mame
from mame import viz
from mame.baselines import tome
from mame.cli import app

pytestmark = pytest.mark.usefixtures("one_thread_for_module")



def _photo(width: int, height: int, seed: int) -> Image.Image:
    """A smooth random picture (large flat areas merge, as in photos), not square, so cropping matters."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, size=(3, 4, 3), dtype=np.uint8)
    return Image.fromarray(small).resize((width, height), Image.Resampling.BILINEAR)


def _groups(owners: torch.Tensor) -> set[frozenset[int]]:
    """The partition of the original tokens that ``owners`` describes, whatever the output tokens' order."""
    groups: dict[int, set[int]] = {}
    for token, owner in enumerate(owners.tolist()):
        groups.setdefault(owner, set()).add(token)
    return {frozenset(group) for group in groups.values()}


def test_trace_of_mame_equals_its_own_source_map(tiny_vit):
    x = torch.randn(2, 3, 32, 32)
    patched = mame.patch.timm(copy.deepcopy(tiny_vit), tau=0.2, layers=4, metric="x", prune=True)
    trace = viz.MergeTrace(patched)
    with torch.inference_mode():
        patched(x)
    owners = trace.owners_after(3)
    assert owners is not None and owners.shape == (2, 17)
    for sample in range(2):
        assert _groups(owners[sample]) == _groups(patched.mame.source_map[sample])
    assert patched.mame.last_token_counts[-1] < 17  # something merged: the comparison above means something


def test_trace_of_tome_has_one_group_per_token_after_every_block(tiny_vit):
    patched = tome.patch_timm(copy.deepcopy(tiny_vit), r=3)
    trace = viz.MergeTrace(patched)
    with torch.inference_mode():
        patched(torch.randn(1, 3, 32, 32))
    counts = patched.mame.last_token_counts
    assert counts == [14, 11, 8, 5]
    for block, count in enumerate(counts):
        owners = trace.owners_after(block)[0]
        assert len(_groups(owners)) == count
        assert owners[0] == 0  # the class token stays first and alone
        assert (owners[1:] != 0).all()


def test_single_patches_get_a_dot():
    image = Image.new("RGB", (32, 32), (0, 0, 0))
    owners = torch.tensor([0, 1, 1, 1, 2] + [1] * 11 + [3])  # class token, then 16 patches: two stand alone
    marked = np.asarray(viz.mark_single_patches(image, owners, 1, 4))
    assert marked[4, 28].tolist() == [255, 0, 0]  # patch (0, 3) holds token 2 alone: its centre is marked
    assert marked[28, 28].tolist() == [255, 0, 0]  # the last patch, token 3
    assert marked[4, 4].tolist() == [0, 0, 0]  # patch (0, 0) shares token 1


def test_figures_have_a_row_per_method_and_a_column_per_block(tiny_vit, tmp_path):
    photos = [("wide/photo", _photo(60, 40, 0)), ("tall", _photo(30, 50, 1))]
    written = viz.write_figures(tiny_vit, photos, tmp_path, tau=0.5, layers=4, after=(1, 2, 4), baselines=("tome",))
    assert [path.name for path, _ in written] == ["wide_photo.png", "tall.png"]
    for path, panels in written:
        assert len(panels) == 2 * 4  # MaMe and ToMe, each: the input then three blocks
        with Image.open(path) as png:
            assert png.size == (round(2.4 * 4 * 100), round((2.9 * 2 + 0.3) * 100))
        mame_row, tome_row = panels[:4], panels[4:]
        assert [panel.block for panel in mame_row] == [0, 1, 2, 4]
        assert mame_row[0].tokens == 17
        assert all(a.tokens >= b.tokens for a, b in zip(mame_row, mame_row[1:]))
        # ToMe is matched to MaMe's budget: its r is the one whose last count is closest
        assert abs(tome_row[-1].tokens - mame_row[-1].tokens) <= 2


def test_photos_are_centre_cropped_not_letterboxed(tiny_vit):
    photo = Image.new("RGB", (64, 32), (200, 200, 200))
    shown = np.asarray(mame.data.fit_image(photo, model=tiny_vit))
    assert shown.shape == (32, 32, 3) and shown.min() > 150  # no black bars


def test_viz_command_writes_one_png_per_image(tmp_path):
    image = tmp_path / "input.png"
    _photo(80, 60, 2).save(image)
    result = CliRunner().invoke(app, ["viz", str(image), "--model", "vit_tiny_patch16_224", "--after", "2,12",
                                      "--setting", "tome.r=8", "--threads", "1", "--out", str(tmp_path / "maps")])
    assert result.exit_code == 0, result.output
    with Image.open(tmp_path / "maps" / "input.png") as png:
        assert png.size == (round(2.4 * 3 * 100), round((2.9 * 2 + 0.3) * 100))
    assert "ToMe r=8: 101" in result.output  # 197 tokens, 8 merged in each of 12 blocks


def test_viz_command_refuses_unknown_methods_and_blocks(tmp_path):
    result = CliRunner().invoke(app, ["viz", "--methods", "mame,nope", "--out", str(tmp_path)])
    assert result.exit_code == 2 and "nope" in result.output
