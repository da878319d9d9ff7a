"""Patched models keep no memory from one forward to the next (the 1000-forward run is
``benchmarks/bench_memory.py``; these use its workload and counters, shortened)."""

from __future__ import annotations

import importlib.util
import statistics
import sys
import weakref
from pathlib import Path
from types import ModuleType

import pytest
import torch

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def bench_memory() -> ModuleType:
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_memory.py"
    spec = importlib.util.spec_from_file_location("bench_memory", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there while the file executes
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]


def test_fifty_forwards_keep_live_tensors_flat(bench_memory: ModuleType) -> None:
    """Batches of one and ragged batches in inference mode, a training step every five: once the workload has run
    all its batches in both modes (forward 10), later forwards leave no extra live tensor behind."""
    images = bench_memory.tiny_images(5)
    assert bench_memory.workload_period(len(images), train_every=5) == 10
    samples = bench_memory.run(bench_memory.tiny_model(), images, 50, train_every=5, checkpoints=(0.2, 1.0))
    assert [s.forwards for s in samples] == [10, 50] and samples[-1].training_steps == 10
    assert samples[-1].live_tensors <= samples[0].live_tensors


def test_a_forward_keeps_nothing_of_earlier_forwards(bench_memory: ModuleType) -> None:
    """After a ragged batch (in inference and in training mode), one more batch-of-one forward leaves no more live
    tensors than a batch-of-one forward left before: what the model keeps is the last forward's, not a history."""
    model, batch = bench_memory.tiny_model(), bench_memory.tiny_images()[:4]
    kept_alone = []
    # Each image alone first: the batch then needs no sequence length that mame's caches have not seen.
    with torch.inference_mode():
        for image in batch:
            model(image[None])
            kept_alone.append(model.mame.last_token_counts[-1])
    after_one = bench_memory.live_tensor_count()

    with torch.inference_mode():
        batch_output = model(batch)
    assert min(kept_alone) < max(kept_alone) < 65  # all four merged, each its own amount: a ragged batch
    assert model.mame.last_token_counts[-1] == pytest.approx(statistics.fmean(kept_alone))
    model.train()
    training_output = model(batch)
    training_output.sum().backward()
    model.zero_grad(set_to_none=True)
    model.eval()
    outputs = [weakref.ref(batch_output), weakref.ref(training_output)]
    del batch_output, training_output
    with torch.inference_mode():
        model(batch[-1:])

    assert bench_memory.live_tensor_count() <= after_one
    assert all(output() is None for output in outputs)  # neither output (nor the training graph) is held
