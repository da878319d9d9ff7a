"""Training from scratch (`mame.train`, ``mame train``, ``torchrun -m mame.train``): loss goes down, the 2:1 rule,
exact resume, DDP equal to one process, the schedule, ImageFolder data, and clear errors for bad options."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
from PIL import Image
from typer.testing import CliRunner

import mame
from mame.data import fashion_mnist_available
from mame.train import TrainConfig, WarmupCosine, load_checkpoint, train

# CI installs dataset-fashion-mnist, so there a missing package must fail, not skip.
needs_fashion_mnist = pytest.mark.skipif(not fashion_mnist_available() and not os.environ.get("CI"),
                                         reason="needs `apt-get install -y dataset-fashion-mnist`")
TINY_VIT = {"depth": 3, "embed_dim": 32, "num_heads": 2}


def tiny(out_dir: Path, **overrides) -> TrainConfig:
    settings = dict(model="vit_tiny_patch16_224", model_kwargs=TINY_VIT, train_samples=64, eval_samples=32,
                    batch_size=16, epochs=2, lr=2e-3, warmup_epochs=0.25, progress=False, log_every=1, threads=1,
                    out_dir=out_dir, mame_blocks=(1,))
    settings.update(overrides)
    return TrainConfig(**settings)


def log_lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def run_in_own_group(command: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    """Run ``command`` in a process group of its own and kill the whole group (torchrun's workers too) if it
    outlives ``timeout``."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                               start_new_session=True)
    try:
        out, err = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        out, err = process.communicate()
        pytest.fail(f"{' '.join(command[:6])} ... timed out after {timeout} s\n{err[-3000:]}")
    return subprocess.CompletedProcess(command, process.returncode, out, err)


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


def test_two_to_one_rule_halves_the_tokens() -> None:
    model = timm.create_model("vit_tiny_patch16_224", img_size=28, patch_size=4, in_chans=1, **TINY_VIT)
    for training in (True, False):
        model.train(training)
        for tau in (0.5, 1.0):  # also when nothing would merge: preserved sources are dropped all the same
            mame.patch.timm(model, tau=tau, layers=[0, 1, 2], batch_rule="per_sample", discard_preserved=True)
            model(torch.randn(3, 1, 28, 28))
            assert model.mame.last_token_counts == [25, 13, 7]  # class token + 49 -> 24 -> 12 -> 6 patches
    unhalved = timm.create_model("vit_tiny_patch16_224", img_size=28, patch_size=4, in_chans=1, **TINY_VIT).eval()
    mame.patch.timm(unhalved, tau=1.0, layers=[0, 1, 2])
    unhalved(torch.randn(2, 1, 28, 28))
    assert unhalved.mame.last_token_counts == [50, 50, 50]  # eq 10 keeps preserved sources


def test_build_model_applies_the_merge_options(tmp_path: Path) -> None:
    from mame.train import build_model

    x = torch.randn(2, 1, 28, 28)
    for halve, counts in ((True, [50, 25, 25]), (False, [50, 50, 50])):
        model = build_model(tiny(tmp_path, tau=1.0, halve=halve), 10).eval()  # tau = 1: nothing fuses
        model(x)
        assert model.mame.last_token_counts == counts
        assert model.mame.settings["tau"] == (1.0,) and model.mame.settings["layers"] == (1,)


def test_augmentation_is_a_function_of_sample_and_epoch() -> None:
    from mame.train import Dist, TensorImages, _epoch_generator

    images = torch.randint(0, 256, (32, 1, 8, 8), dtype=torch.uint8)
    data = TensorImages(images, torch.arange(32) % 10, mean=[0.0], std=[1.0], num_classes=10, shift=0)

    def batches(epoch: int, dist: Dist = Dist()) -> list[torch.Tensor]:
        return [x for x, _ in data.train_batches(epoch, 16, seed=3, dist=dist, augment=True)]

    first = batches(0)
    assert all(torch.equal(a, b) for a, b in zip(first, batches(0)))  # same epoch, same images
    assert not all(torch.equal(a, b) for a, b in zip(first, batches(1)))  # another epoch, another draw
    # shift = 0: each image is its original or its mirror image, and both occur.
    order = torch.randperm(32, generator=_epoch_generator(3, 0, 0))
    originals = images[order[:16]].float() / 255
    same = [torch.equal(a, b) for a, b in zip(first[0], originals)]
    mirrored = [torch.equal(a, b.flip(-1)) for a, b in zip(first[0], originals)]
    assert all(s or m for s, m in zip(same, mirrored)) and any(mirrored) and not all(mirrored)
    # Two ranks' shares of a global batch are the one-process batch, split in two.
    shifted = TensorImages(images, torch.arange(32) % 10, mean=[0.0], std=[1.0], num_classes=10, shift=2)
    whole = [x for x, _ in shifted.train_batches(0, 16, 3, Dist(), True)]
    halves = [[x for x, _ in shifted.train_batches(0, 16, 3, Dist(rank, 2, rank), True)] for rank in (0, 1)]
    assert all(torch.equal(w, torch.cat([a, b])) for w, a, b in zip(whole, *halves))
    assert not torch.equal(whole[0], batches(0)[0])  # shifts move the images


def test_schedule() -> None:
    schedule = WarmupCosine(lr=1e-3, min_lr=1e-5, warmup_lr=1e-6, warmup=10, total=110)
    assert schedule(0) * 1e-3 == pytest.approx(1e-6)
    assert schedule(5) * 1e-3 == pytest.approx((1e-6 + 1e-3) / 2)
    assert schedule(10) == pytest.approx(1.0)
    assert schedule(60) * 1e-3 == pytest.approx((1e-3 + 1e-5) / 2)
    assert schedule(110) * 1e-3 == pytest.approx(1e-5)
    values = [schedule(step) for step in range(10, 111)]
    assert all(a >= b for a, b in zip(values, values[1:]))


@needs_fashion_mnist
def test_a_few_steps_lower_the_loss(tmp_path: Path) -> None:
    result = train(tiny(tmp_path, epochs=4, train_samples=128, batch_size=32, warmup_epochs=0.5))
    steps = [line for line in log_lines(tmp_path / "log.jsonl") if line["event"] == "step"]
    assert len(steps) == 16
    first, last = sum(s["loss"] for s in steps[:3]) / 3, sum(s["loss"] for s in steps[-3:]) / 3
    assert last < first - 0.1, (first, last)
    assert result.history[-1]["train_loss"] < result.history[0]["train_loss"]
    # The merged model keeps merging after training: eval-mode tokens per block of the trained model.
    result.model.eval()(torch.zeros(2, 1, 28, 28))
    assert result.model.mame.last_token_counts == [50, 25, 25]
    events = [line["event"] for line in log_lines(tmp_path / "log.jsonl")]
    assert events[0] == "start" and events[-1] == "end" and events.count("epoch") == 4
    epoch = next(line for line in log_lines(tmp_path / "log.jsonl") if line["event"] == "epoch")
    assert {"train_loss", "train_acc", "val_loss", "val_acc", "train_img_per_s", "eval_img_per_s"} <= set(epoch)


@needs_fashion_mnist
def test_resume_continues_exactly(tmp_path: Path) -> None:
    # Drop-path draws random numbers in every step: the RNG states must come back too.
    settings = dict(drop_path=0.2, epochs=2)
    straight = train(tiny(tmp_path / "straight", **settings))
    train(tiny(tmp_path / "resumed", stop_after=1, **settings))
    assert load_checkpoint(tmp_path / "resumed" / "last.pt")["epoch"] == 1
    resumed = train(tiny(tmp_path / "resumed", resume=True, **settings))
    a, b = straight.model.state_dict(), resumed.model.state_dict()
    assert all(torch.equal(a[name], b[name]) for name in a)
    losses = [[line["loss"] for line in log_lines(path / "log.jsonl") if line["event"] == "step"]
              for path in (tmp_path / "straight", tmp_path / "resumed")]
    assert losses[0] == losses[1]
    assert resumed.val_acc == straight.val_acc


@needs_fashion_mnist
def test_resume_refuses_other_settings(tmp_path: Path) -> None:
    train(tiny(tmp_path, epochs=1))
    with pytest.raises(ValueError, match="tau"):
        train(tiny(tmp_path, epochs=1, tau=0.7, resume=True))
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        train(tiny(tmp_path / "empty", epochs=1, resume=True))


@needs_fashion_mnist
def test_data_parallel_equals_one_process(tmp_path: Path) -> None:
    """torchrun with 2 processes (gloo) and the same global batch follows the one-process loss curve."""
    args = ["--model", "vit_tiny_patch16_224", "--model-kwargs", json.dumps(TINY_VIT), "--mame-blocks", "1",
            "--train-samples", "64", "--eval-samples", "32", "--batch-size", "16", "--epochs", "1", "--log-every",
            "1", "--no-progress", "--lr", "2e-3", "--warmup-epochs", "0", "--threads", "1"]
    # One process: the same settings through the Python API, in this process.
    train(tiny(tmp_path / "one", epochs=1, lr=2e-3, warmup_epochs=0.0))
    # torchrun --standalone: a free local port, so parallel test runs never meet.
    two = run_in_own_group([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                            "-m", "mame.train", *args, "--out-dir", str(tmp_path / "two")])
    assert two.returncode == 0, two.stderr
    runs = [log_lines(tmp_path / name / "log.jsonl") for name in ("one", "two")]
    assert runs[0][0]["world_size"] == 1 and runs[1][0]["world_size"] == 2
    losses = [[line["loss"] for line in run if line["event"] == "step"] for run in runs]
    assert len(losses[0]) == len(losses[1]) == 4
    assert losses[0] == pytest.approx(losses[1], abs=1e-5)
    weights = [load_checkpoint(tmp_path / name / "last.pt")["model"] for name in ("one", "two")]
    assert all(torch.allclose(weights[0][k], weights[1][k], atol=1e-5) for k in weights[0])


def test_image_folder_data(tmp_path: Path) -> None:
    generator = torch.Generator().manual_seed(0)
    for split, count in (("train", 8), ("val", 4)):
        for label, shade in (("dark", 40), ("light", 210)):
            folder = tmp_path / "data" / split / label
            folder.mkdir(parents=True)
            for index in range(count):
                pixels = (shade + torch.randint(-30, 30, (32, 32, 3), generator=generator)).clamp(0, 255)
                Image.fromarray(pixels.to(torch.uint8).numpy()).save(folder / f"{index}.png")
    result = train(TrainConfig(model="vit_tiny_patch16_224", model_kwargs=TINY_VIT, data=str(tmp_path / "data"),
                               img_size=32, patch_size=8, mame_blocks=(0,), batch_size=4, epochs=1, workers=0,
                               progress=False, out_dir=tmp_path / "run", threads=1))
    assert result.history[0]["train_img_per_s"] > 0 and 0 <= result.val_acc <= 100
    assert result.model.num_classes == 2
    with pytest.raises(ValueError, match="train/ and val/"):
        train(TrainConfig(data=str(tmp_path), progress=False, out_dir=tmp_path / "bad"))


@needs_fashion_mnist
@pytest.mark.parametrize("model, options", [
    ("swin_tiny_patch4_window7_224", dict(downsample="mame")),
    ("iwin_tiny_patch4_window7_224_mame", dict()),
])
def test_hierarchical_models_train(tmp_path: Path, model: str, options: dict) -> None:
    small = {"embed_dim": 16, "depths": [1, 1, 1, 1], "num_heads": [1, 2, 2, 4]}
    result = train(tiny(tmp_path, model=model, model_kwargs=small, mame_blocks=None, epochs=1, **options))
    assert result.model.num_features == 16
    assert result.history[0]["train_loss"] > 0
    start = log_lines(tmp_path / "log.jsonl")[0]  # sizes logged beside those of the original downsampling
    assert start["original"]["model"] == model.removesuffix("_mame")
    assert start["original"]["params"] > 4 * start["params"] and start["original"]["flops"] > start["flops"]


@needs_fashion_mnist
def test_mixed_precision_and_mixup_on_cpu(tmp_path: Path) -> None:
    result = train(tiny(tmp_path, epochs=1, amp="bf16", mixup=0.8, cutmix=1.0))
    assert torch.isfinite(torch.tensor(result.history[0]["train_loss"]))
    assert result.history[0]["train_acc"] is None  # no accuracy for mixed targets


@pytest.mark.parametrize("overrides, message", [
    (dict(tau=1.5), "tau"),
    (dict(mame_blocks=(5,)), r"mame_blocks=\[5\]: .*block indices in \[0, 3\)"),
    (dict(mame_blocks=()), "at least one block"),
    (dict(model="swin_tiny_patch4_window7_224", mame_blocks=(1,)), "hierarchical"),
    (dict(model="resnet18", model_kwargs={}, mame_blocks=(1,)), "has none"),
    (dict(model="vit_tiny_patch16_224", mame_blocks=None, downsample="mame"), "has none"),
    (dict(model="no_such_model"), "unknown model"),
    (dict(downsample="pool"), "downsample"),
    (dict(amp="fp16"), "CUDA"),
    (dict(batch_size=0), "batch_size"),
    (dict(train_samples=8, batch_size=16), "larger than the training set"),
])
def test_bad_options_are_refused(tmp_path: Path, overrides: dict, message: str) -> None:
    if overrides.get("train_samples") and not fashion_mnist_available() and not os.environ.get("CI"):
        pytest.skip("needs Fashion-MNIST")  # CI installs it: missing there fails below, not skips
    with pytest.raises(ValueError, match=message):
        train(tiny(tmp_path, **overrides))


def test_cli(tmp_path: Path) -> None:
    from mame.cli import app

    runner = CliRunner()
    bad = runner.invoke(app, ["train", "--tau", "2", "--out-dir", str(tmp_path), "--no-progress"])
    assert bad.exit_code == 2 and "tau" in bad.output
    bad = runner.invoke(app, ["train", "--mame-blocks", "a,b"])
    assert bad.exit_code == 2
    if not fashion_mnist_available():
        return
    ok = runner.invoke(app, ["train", "--model-kwargs", json.dumps(TINY_VIT), "--mame-blocks", "1", "--train-samples",
                             "32", "--eval-samples", "16", "--batch-size", "16", "--epochs", "1", "--no-progress",
                             "--threads", "1", "--out-dir", str(tmp_path / "run")])
    assert ok.exit_code == 0, ok.output
    assert (tmp_path / "run" / "last.pt").is_file()
    assert "val acc" in ok.output
