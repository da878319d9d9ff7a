"""Tests of mame.evaluate: k-NN and probe on synthetic features, and evaluate_variants on a tiny ViT and real data."""

from __future__ import annotations

import json
import math
import os

import pytest
import timm
import torch
import torch.nn.functional as F
from fake_clock import charge_block_tokens, use_fake_clock

from mame import data, evaluate
from mame.bench import Variant

CLASSES, DIM = 10, 32


pytestmark = pytest.mark.usefixtures("one_thread")


def clustered(n: int, seed: int, noise: float = 0.05) -> tuple[torch.Tensor, torch.Tensor]:
    """Features around one fixed random centroid per class, so a good classifier is near 100 %."""
    centroids = torch.randn(CLASSES, DIM, generator=torch.Generator().manual_seed(123))
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, CLASSES, (n,), generator=generator)
    return centroids[labels] + noise * torch.randn(n, DIM, generator=generator), labels


def brute_force_knn(train: torch.Tensor, train_labels: torch.Tensor, test: torch.Tensor, test_labels: torch.Tensor,
                    k: int) -> float:
    """DINO's weighted k-NN written as plain loops over samples."""
    correct = 0
    for feature, label in zip(test, test_labels):
        sims = [float(F.cosine_similarity(feature, other, dim=0)) for other in train]
        nearest = sorted(range(len(train)), key=lambda i: -sims[i])[:k]
        votes = [0.0] * CLASSES
        for i in nearest:
            votes[int(train_labels[i])] += math.exp(sims[i] / 0.07)
        correct += int(max(range(CLASSES), key=lambda c: (votes[c], -c)) == int(label))
    return correct / len(test)


@pytest.mark.parametrize("score", [evaluate.knn_accuracy, evaluate.probe_accuracy])
def test_separable_features_are_classified_perfectly(score):
    train, train_labels = clustered(300, seed=0)
    test, test_labels = clustered(200, seed=1)
    assert score(train, train_labels, test, test_labels) >= 0.99


@pytest.mark.parametrize("score", [evaluate.knn_accuracy, evaluate.probe_accuracy])
def test_random_labels_give_chance(score):
    train, _ = clustered(500, seed=0)
    test, _ = clustered(500, seed=1)
    generator = torch.Generator().manual_seed(2)
    train_labels = torch.randint(0, CLASSES, (500,), generator=generator)
    test_labels = torch.randint(0, CLASSES, (500,), generator=generator)
    assert 0.03 <= score(train, train_labels, test, test_labels) <= 0.2


@pytest.mark.parametrize("k", [1, 3, 20, 50])
def test_knn_matches_brute_force(k):
    generator = torch.Generator().manual_seed(k)
    train, test = torch.randn(30, 8, generator=generator), torch.randn(15, 8, generator=generator)
    train_labels = torch.randint(0, CLASSES, (30,), generator=generator)
    test_labels = torch.randint(0, CLASSES, (15,), generator=generator)
    expected = brute_force_knn(train, train_labels, test, test_labels, min(k, 30))
    assert evaluate.knn_accuracy(train, train_labels, test, test_labels, k=k) == pytest.approx(expected)


def test_probe_predictions_are_the_probe_accuracy_per_image():
    """`probe_predictions` gives each test image's label, what paired comparisons of two models need; their share
    of correct ones is `probe_accuracy`, and a mismatched label count is refused by both."""
    train, train_labels = clustered(200, seed=3)
    test, test_labels = clustered(100, seed=4)
    test_labels[:25] = (test_labels[:25] + 1) % CLASSES  # some wrong, so the share is not trivially 1
    predicted = evaluate.probe_predictions(train, train_labels, test)
    assert predicted.shape == test_labels.shape and predicted.dtype == train_labels.dtype
    accuracy = evaluate.probe_accuracy(train, train_labels, test, test_labels)
    assert float((predicted == test_labels).double().mean()) == accuracy and 0.6 <= accuracy <= 0.8
    with pytest.raises(ValueError, match="same length"):
        evaluate.probe_predictions(train, train_labels[:-1], test)
    with pytest.raises(ValueError, match="same length"):
        evaluate.probe_accuracy(train, train_labels, test, test_labels[:-1])


def test_knn_rejects_mismatched_lengths():
    with pytest.raises(ValueError, match="same length"):
        evaluate.knn_accuracy(torch.randn(4, 2), torch.zeros(3, dtype=torch.long), torch.randn(2, 2),
                              torch.zeros(2, dtype=torch.long))


def tiny_backbone() -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model("vit_small_patch16_224", pretrained=False, num_classes=0, depth=2, embed_dim=64,
                             num_heads=2, img_size=32, patch_size=8).eval()


def test_extract_features_tensor_and_loader_agree():
    model = tiny_backbone()
    images = torch.randint(0, 256, (10, 28, 28), dtype=torch.uint8)
    from_tensor = evaluate.extract_features(model, images, batch_size=4, size=32, progress=False)
    loader = [(images[:6], torch.zeros(6)), (images[6:], torch.zeros(4))]
    from_loader = evaluate.extract_features(model, loader, size=32, progress=False)
    assert from_tensor.shape == (10, 64) and from_tensor.dtype == torch.float32
    torch.testing.assert_close(from_tensor, from_loader)


@pytest.fixture
def fashion_mnist():
    if not data.fashion_mnist_available():
        message = "Fashion-MNIST is not installed: apt-get install -y dataset-fashion-mnist"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)


def test_evaluate_variants_on_tiny_vit(fashion_mnist, tmp_path, monkeypatch):
    model = tiny_backbone()
    charge_block_tokens(model, use_fake_clock(monkeypatch))
    variants = [Variant("unmodified", "none"), Variant("MaMe τ=1", "mame", {"tau": 1.0, "layers": 2}),
                Variant("ToMe r=2", "tome", {"r": 2})]
    results = evaluate.evaluate_variants(model, variants, n_train=40, n_test=20, size=32, batch_size=16,
                                         progress=False)
    assert not hasattr(model, "mame")  # the caller's model is left alone
    assert [r.name for r in results] == [v.name for v in variants]
    base, identity, tome = results
    grid_tokens = 1 + (32 // 8) ** 2
    for result in results:
        # Chance is 0.1: even random weights keep enough of each image for k-NN and the probe to beat it clearly.
        assert result.knn_accuracy >= 0.25 and result.probe_accuracy >= 0.25
        assert result.baseline_flops == base.flops and result.n_train == 40 and result.n_test == 20
    # A block's fake time is its input token count, so each speed-up is exact: 3 pairs of the unmodified model
    # against the variant; ToMe's second block gets the 15 tokens its first one left.
    assert base.speedup.ratios == identity.speedup.ratios == (1.0,) * 3
    assert tome.speedup.ratios == (2 * grid_tokens / (grid_tokens + grid_tokens - 2),) * 3
    assert base.final_tokens == identity.final_tokens == grid_tokens
    assert base.flop_ratio == 1.0
    # τ = 1 merges nothing, so the features and both accuracies are the baseline's exactly.
    assert (identity.knn_accuracy, identity.probe_accuracy) == (base.knn_accuracy, base.probe_accuracy)
    assert tome.final_tokens == grid_tokens - 2 * 2 and tome.flop_ratio > 1.0
    table = evaluate.results_table(results)
    assert [column.header for column in table.columns][-1] == "Δ kNN" and table.row_count == 3
    document = evaluate.results_to_json(results, {"model": "tiny"})
    path = tmp_path / "eval.json"
    path.write_text(json.dumps(document))
    loaded = json.loads(path.read_text())
    assert loaded["meta"] == {"model": "tiny"} and loaded["results"][0]["knn_delta"] == 0.0
    assert loaded["results"][2]["speedup"]["pairs"] == 3


def test_evaluate_variants_rejects_patched_model():
    import mame

    model = mame.patch.timm(tiny_backbone(), tau=0.8, layers=1)
    with pytest.raises(ValueError, match="patched"):
        evaluate.evaluate_variants(model, [Variant("unmodified", "none")], n_train=4, n_test=2, progress=False)


def test_missing_fashion_mnist_names_apt_command(monkeypatch, tmp_path):
    monkeypatch.setenv("MAME_FASHION_MNIST_DIR", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="apt-get install -y dataset-fashion-mnist"):
        evaluate.evaluate_variants(tiny_backbone(), [Variant("unmodified", "none")], n_train=4, n_test=2,
                                   progress=False)
