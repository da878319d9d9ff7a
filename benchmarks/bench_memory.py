"""Long runs do not grow memory: 1000 forwards of a patched model keep peak memory flat.

Runs a MaMe-patched model (per-sample batches, the default) for ``--forwards`` inference forwards that alternate
between one image and a ragged batch (a different window of images each time, so the padded length varies), with a
training-mode forward and backward after every tenth forward. After 10 %, 50 % and 100 % of the forwards it
collects garbage and samples the process: current resident memory (/proc/self/statm), peak resident memory
(getrusage ru_maxrss) and the number of live torch tensors. Exits with status 1 if, after the first 10 %, the current
or the peak resident memory grows by more than max(20 MiB, 5 %) or the live tensor count grows at all.

The workload repeats itself (`workload_period`), and ``--forwards`` must be large enough for the first 10 % to run
every batch of it in both modes: until then new token counts still fill bounded caches (mame.core caches the token
split of every sequence length, up to 256) and allocator pools, which is warm-up, not growth.

    python benchmarks/bench_memory.py --forwards 1000 --model tiny --threads 2
"""

from __future__ import annotations

import argparse
import gc
import math
import os
import resource
import sys
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

import mame

MIB = 1 << 20
MARGIN_BYTES = 20 * MIB
MARGIN_FRACTION = 0.05
TRAIN_EVERY = 10  # forwards per training step
RAGGED_BATCH = 4


def tiny_model() -> nn.Module:
    """A random 4-block ViT on 64 px images (65 tokens), MaMe on every block."""
    import timm

    torch.manual_seed(0)
    model = timm.create_model("vit_small_patch16_224", pretrained=False, depth=4, img_size=64, patch_size=8,
                              num_classes=0)
    return mame.patch.timm(model.eval(), tau=0.8, layers=4)


def tiny_images(count: int = 8) -> torch.Tensor:
    """Flat 16x16-pixel colour blocks plus noise that grows from image to image: random weights merge the flat
    patches of the clean images and almost nothing of the noisy ones, so a batch of them is ragged."""
    generator = torch.Generator().manual_seed(0)
    blocks = F.interpolate(torch.randn(count, 3, 4, 4, generator=generator), size=64, mode="nearest")
    noise = torch.randn(count, 3, 64, 64, generator=generator)
    return blocks + torch.linspace(0, 1, count).view(count, 1, 1, 1) * noise


def real_model_and_images() -> tuple[nn.Module, torch.Tensor]:
    """The real DINOv2 ViT-S/14 with MaMe's defaults (τ = 0.8, first 8 blocks) and the 20 bundled photos."""
    from mame import data, models

    images = data.preprocess([image for _, image in data.sample_photos(20)])
    return mame.patch.timm(models.load(progress=False)), images


def resident_bytes() -> int:
    """Current resident set size of this process."""
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_resident_bytes() -> int:
    """Peak resident set size of this process so far (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def live_tensor_count() -> int:
    """Torch tensors (parameters included) still reachable after a full garbage collection."""
    gc.collect()
    # isinstance() on torch.distributed's deprecated `reduce_op` object warns; that object is no tensor anyway.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return sum(1 for obj in gc.get_objects() if torch.is_tensor(obj))


@dataclass(frozen=True)
class MemorySample:
    forwards: int
    training_steps: int
    resident: int
    peak_resident: int
    live_tensors: int


def workload_period(num_images: int, train_every: int = TRAIN_EVERY) -> int:
    """Forwards after which `run` repeats the same batches in the same modes."""
    return math.lcm(2 * num_images, train_every)


def run(model: nn.Module, images: torch.Tensor, forwards: int, *, train_every: int = TRAIN_EVERY,
        checkpoints: tuple[float, ...] = (0.1, 0.5, 1.0)) -> list[MemorySample]:
    """Run the workload and sample memory after each fraction ``checkpoints`` of the forwards.

    Forward ``i`` (counting from 1) takes image ``i`` alone when ``i`` is odd, else the `RAGGED_BATCH` images from
    ``i`` on (wrapping around ``images``); after every ``train_every``-th forward, one training-mode forward and
    backward of that batch follows. The model is left in eval mode.
    """
    sample_at = {max(1, round(fraction * forwards)) for fraction in checkpoints}
    samples, training_steps = [], 0
    for i in range(1, forwards + 1):
        window = [(i + k) % len(images) for k in range(RAGGED_BATCH)]
        with torch.inference_mode():
            model(images[i % len(images)].unsqueeze(0) if i % 2 else images[window])
        if i % train_every == 0:
            model.train()
            model(images[window]).square().mean().backward()
            model.zero_grad(set_to_none=True)
            model.eval()
            training_steps += 1
        if i in sample_at:
            live = live_tensor_count()  # collects garbage first, so the RSS below excludes collectable tensors
            samples.append(MemorySample(i, training_steps, resident_bytes(), peak_resident_bytes(), live))
    return samples


def growth_problems(samples: list[MemorySample]) -> list[str]:
    """What grew between the first and the last sample beyond the allowed margin (empty when memory stayed flat)."""
    first, last = samples[0], samples[-1]
    problems = []
    for label, before, after in (("current RSS", first.resident, last.resident),
                                 ("peak RSS", first.peak_resident, last.peak_resident)):
        allowed = max(MARGIN_BYTES, MARGIN_FRACTION * before)
        if after - before > allowed:
            problems.append(f"{label} grew by {(after - before) / MIB:.1f} MiB (allowed {allowed / MIB:.1f} MiB)")
    if last.live_tensors > first.live_tensors:
        problems.append(f"live tensors grew from {first.live_tensors} to {last.live_tensors}")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--forwards", type=int, default=1000, help="inference forwards (plus one training step "
                        f"per {TRAIN_EVERY})")
    parser.add_argument("--model", choices=("tiny", "real"), default="tiny",
                        help="tiny: random 4-block ViT at 64 px; real: DINOv2 ViT-S/14 on the 20 bundled photos")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    model, images = (tiny_model(), tiny_images()) if args.model == "tiny" else real_model_and_images()
    period = workload_period(len(images))
    if args.forwards < 10 * period:
        parser.error(f"--forwards must be at least {10 * period} for the {args.model} model: its workload repeats "
                     f"every {period} forwards, and the first 10 % must run all of it once")
    print(f"{args.model} model, MaMe with per-sample batches, {torch.get_num_threads()} threads: "
          f"{args.forwards} inference forwards (batch 1 and ragged batches of {RAGGED_BATCH}, repeating every "
          f"{period}), one training forward+backward per {TRAIN_EVERY}")
    samples = run(model, images, args.forwards)
    print(f"{'forwards':>8} {'training':>8} {'RSS MiB':>8} {'peak MiB':>8} {'tensors':>8}")
    for sample in samples:
        print(f"{sample.forwards:>8} {sample.training_steps:>8} {sample.resident / MIB:>8.1f} "
              f"{sample.peak_resident / MIB:>8.1f} {sample.live_tensors:>8}")
    problems = growth_problems(samples)
    for problem in problems:
        print(f"FAIL: {problem}")
    if not problems:
        print(f"flat: RSS and peak RSS within max({MARGIN_BYTES // MIB} MiB, {MARGIN_FRACTION:.0%}) of the "
              f"{samples[0].forwards}-forward sample, live tensors not growing")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
