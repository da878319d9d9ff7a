"""Shared fixtures."""

import pytest
import torch
from PIL import Image

import mame
from mame import data, models


def _one_torch_thread():
    """One torch thread while the fixture lives: shared CI machines oversubscribe cores, and one thread keeps small
    runs fast and predictable (two threads on two busy cores ran the real-model demo test 4x slower than one)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def one_thread():
    """One torch thread for the test."""
    yield from _one_torch_thread()


@pytest.fixture(scope="module")
def one_thread_for_module():
    """`one_thread` for a whole module, its module-scoped fixtures included."""
    yield from _one_torch_thread()


@pytest.fixture(scope="session")
def real_model() -> torch.nn.Module:
    """The real default model (DINOv2 ViT-S/14, eval mode), loaded once per session and shared by every test that
    does not test loading itself. Patch or train a ``copy.deepcopy`` of it, never the model itself:
    `_shared_real_model_stays_untouched` fails the test that does."""
    return models.load(progress=False)


@pytest.fixture(autouse=True)
def _shared_real_model_stays_untouched(request: pytest.FixtureRequest):
    yield
    if "real_model" in request.fixturenames:
        model = request.getfixturevalue("real_model")
        patched_or_trained = hasattr(model, "mame") or model.training
        mame.unpatch(model.eval())  # so that only the offending test fails, not every later one
        assert not patched_or_trained, "this test patched or trained the shared real_model; use copy.deepcopy"


@pytest.fixture(scope="session")
def bundled_photos() -> list[tuple[str, Image.Image]]:
    """All 20 bundled photos as ``(name, image)``, read once per session (the first read imports scikit-image,
    scikit-learn and matplotlib)."""
    return data.sample_photos(20)


@pytest.fixture(scope="session")
def real_photos(bundled_photos: list[tuple[str, Image.Image]]) -> torch.Tensor:
    """The bundled photos as model input, (20, 3, 224, 224) in `bundled_photos` order; read-only by convention.

    Letterboxed, not centre-cropped as `data.preprocess` does by default: the known per-photo token counts and
    fidelities in test_real_model.py were measured on letterboxed photos."""
    return data.preprocess([image for _, image in bundled_photos], mode="letterbox")


@pytest.fixture(scope="module")
def tiny_vit() -> torch.nn.Module:
    """A tiny random timm ViT (32 px, 8 px patches: 16 patches and a class token; 4 blocks; features out), for the
    fast tests of pictures and sweeps. Patch a ``copy.deepcopy`` of it, or unpatch it before the test ends."""
    import timm

    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=4,
                             num_classes=0).eval()
