"""Real videos through VideoMAE, unmodified and merged by MaMe, in one process.

`read_clip` decodes a video file with PyAV (``pip install 'mame[video]'``): ``frames`` frames sampled uniformly over
the whole clip (the centre of each of ``frames`` equal segments), each resized so its shorter side is ``size`` and
centre-cropped to ``size`` (bilinear, as VideoMAE's processor does), normalised with ImageNet's mean and std (what
VideoMAE was trained with). `video_eval` runs transformers' ``VideoMAEForVideoClassification`` unmodified and merged
(`mame.patch.hf` on a ``copy.deepcopy``) on the same clips and reports, per side, tokens after the last block, FLOPs
(`mame.bench.flop_counter`), the FLOP ratio, the paired speed ratio (`mame.bench.paired_speedup`) and, when the true
labels are given, top-1 accuracy.

    >>> clip = read_clip("clip.mp4")                     # (16, 3, 224, 224)
    >>> model = VideoMAEForVideoClassification.from_pretrained("MCG-NJU/videomae-base-finetuned-kinetics")
    >>> report = video_eval(model, ["clip.mp4"], labels=["riding a bike"], tau=0.9, layers=8)
    >>> rich.print(results_table(report))
"""

from __future__ import annotations

import copy
import platform
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from rich.table import Table
from torch import nn

import mame
from mame.bench import load_average, merge_runtime, paired_speedup
from mame.data import IMAGENET_MEAN, IMAGENET_STD, preprocess
from mame.zeroshot import SideTally, comparison_table, merged_tokens, progress_bar, variant_name


def _av():
    try:
        import av
    except ImportError as error:  # the optional extra
        raise ImportError("decoding videos needs PyAV: pip install 'mame[video]' (or av)") from error
    return av


def sample_indices(total: int, frames: int) -> list[int]:
    """``frames`` frame indices spread uniformly over a clip of ``total`` frames: the middle frame of each of
    ``frames`` equal segments (a clip shorter than ``frames`` repeats frames)."""
    if total < 1 or frames < 1:
        raise ValueError(f"need at least one frame in the clip and one to sample, got {total} and {frames}")
    return [min(total - 1, int((i + 0.5) * total / frames)) for i in range(frames)]


def _decode(path: Path, wanted: set[int]) -> tuple[dict[int, Image.Image], int]:
    """The wanted frames as RGB images, and how many frames were decoded (all of them when a wanted index lies
    beyond the end; decoding stops after the last wanted frame otherwise)."""
    av = _av()
    last = max(wanted) if wanted else -1
    picked: dict[int, Image.Image] = {}
    count = 0
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise ValueError(f"{path} has no video stream")
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            for frame in container.decode(stream):
                if count in wanted:
                    picked[count] = frame.to_image().convert("RGB")
                count += 1
                if count > last:
                    break
    except av.FFmpegError as error:
        raise ValueError(f"cannot decode {path}: {error}") from error
    return picked, count


def _frame_count(path: Path) -> int:
    """Frames in the first video stream: the container's count, or (when it does not say) a full decode."""
    av = _av()
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise ValueError(f"{path} has no video stream")
            known = int(container.streams.video[0].frames or 0)
    except av.FFmpegError as error:
        raise ValueError(f"cannot decode {path}: {error}") from error
    if known > 0:
        return known
    return _decode(path, {2**62})[1]  # an index past any end: decodes and counts every frame


def read_frames(path: str | Path, frames: int = 16) -> list[Image.Image]:
    """``frames`` RGB frames of the video at ``path``, sampled uniformly over the whole clip (`sample_indices`).

    Raises:
        FileNotFoundError: no such file.
        ValueError: not a decodable video, no video stream, or no frames.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"video {path} does not exist")
    if frames < 1:
        raise ValueError(f"frames must be >= 1, got {frames}")
    total = _frame_count(path)
    if total < 1:
        raise ValueError(f"{path} has no frames")
    indices = sample_indices(total, frames)
    picked, decoded = _decode(path, set(indices))
    if len(picked) < len(set(indices)):  # the container counted frames that do not decode: sample what exists
        if decoded < 1:
            raise ValueError(f"{path} has no decodable frames")
        indices = sample_indices(decoded, frames)
        picked, _ = _decode(path, set(indices))
    return [picked[i] for i in indices]


def read_clip(
    path: str | Path,
    frames: int = 16,
    size: int = 224,
    mean: Sequence[float] | None = IMAGENET_MEAN,
    std: Sequence[float] | None = IMAGENET_STD,
) -> torch.Tensor:
    """A video file as model input: ``frames`` frames sampled uniformly over the clip, shorter side resized to
    ``size`` (bilinear), centre-cropped to ``size`` x ``size``, normalised.

    Args:
        path: any file FFmpeg (through PyAV) decodes: mp4, avi, webm, mkv, ...
        frames: frames to sample (VideoMAE: 16).
        size: output side in pixels (VideoMAE: 224).
        mean: per-channel mean on the 0..1 scale (default ImageNet's, as VideoMAE's processor); None, with
            ``std=None``, keeps the 0..1 values.
        std: per-channel standard deviation on the 0..1 scale.

    Returns:
        float32 (frames, 3, size, size), frames in time order.

    Raises:
        FileNotFoundError: no such file.
        ValueError: not a decodable video, no video stream, or no frames.
        ImportError: PyAV is not installed.
    """
    if size < 1:
        raise ValueError(f"size must be >= 1, got {size}")
    if (mean is None) != (std is None):
        raise ValueError("give both mean and std, or neither (0..1 values)")
    images = read_frames(path, frames)
    return preprocess(images, size=size, mean=(0.0, 0.0, 0.0) if mean is None else mean,
                      std=(1.0, 1.0, 1.0) if std is None else std, crop_pct=1.0, interpolation="bilinear")


def check_video_model(model: nn.Module) -> None:
    """A ValueError unless ``model`` is transformers' ``VideoMAEForVideoClassification``."""
    from transformers import VideoMAEForVideoClassification

    if not isinstance(model, VideoMAEForVideoClassification):
        raise ValueError(f"video evaluation needs a transformers VideoMAEForVideoClassification (e.g. "
                         f"MCG-NJU/videomae-base-finetuned-kinetics), got {type(model).__name__}")


def resolve_labels(id2label: Mapping[int, str], labels: Sequence[str | int]) -> list[int]:
    """Class indices of ``labels``: each a class name of ``id2label`` (exact, else case-insensitive) or an index.

    Raises:
        ValueError: a label that is neither (the message shows a few of the model's names).
    """
    by_name = {name: int(index) for index, name in id2label.items()}
    by_lower = {name.lower(): index for name, index in by_name.items()}
    resolved = []
    for label in labels:
        text = str(label).strip()
        if text in by_name:
            resolved.append(by_name[text])
        elif text.lower() in by_lower:
            resolved.append(by_lower[text.lower()])
        elif text.lstrip("-").isdigit() and int(text) in {int(index) for index in id2label}:
            resolved.append(int(text))
        else:
            examples = ", ".join(repr(name) for name in list(by_name)[:5])
            raise ValueError(f"unknown label {label!r}: not a class name of the model ({len(by_name)} classes, e.g. "
                             f"{examples}) nor an index 0..{len(by_name) - 1}")
    return resolved


def model_input_shape(model: nn.Module, frames: int | None, size: int | None) -> tuple[int, int]:
    """``(frames, size)`` of the clips a VideoMAE takes: its config's, the only ones its position embeddings fit;
    a ValueError when ``frames`` or ``size`` (None: the model's) differ."""
    config = model.config
    native_size = config.image_size if isinstance(config.image_size, int) else config.image_size[0]
    frames = config.num_frames if frames is None else frames
    size = native_size if size is None else size
    if frames != config.num_frames:
        raise ValueError(f"the model takes {config.num_frames} frames per clip (config.num_frames), got {frames}")
    if size != native_size:
        raise ValueError(f"the model takes {native_size} px frames (config.image_size), got {size}")
    return frames, size


def video_eval(
    model: nn.Module,
    videos: Sequence[str | Path],
    labels: Sequence[str | int] | None = None,
    *,
    tau: float = 0.9,
    layers: int | Sequence[int] = 8,
    frames: int | None = None,
    size: int | None = None,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    batch_size: int = 1,
    pairs: int = 5,
    warmup: int = 1,
    device: str | torch.device | None = None,
    progress: bool = True,
    model_name: str | None = None,
) -> dict[str, Any]:
    """Classify real videos with VideoMAE unmodified and merged by MaMe, with tokens, FLOPs and paired speed.

    Each video becomes one clip (`read_clip`); batches of ``batch_size`` clips run through an eval-mode copy of
    ``model`` and a copy patched by ``mame.patch.hf(copy, tau=tau, layers=layers)``. The caller's model is not
    changed. The speed ratio is `mame.bench.paired_speedup` of the two on the first batch (``pairs`` interleaved
    pairs after ``warmup`` calls of each side), in this process.

    Args:
        model: an unpatched ``VideoMAEForVideoClassification``.
        videos: video files.
        labels: the true class of each video, a name of ``model.config.id2label`` or an index; None reports
            predictions without accuracy.
        tau: MaMe threshold.
        layers: MaMe on the first K blocks, or a list of block indices.
        frames: frames per clip; default (and the only value the model takes) ``config.num_frames``.
        size: frame side; default (and the only value the model takes) ``config.image_size``.
        mean: normalisation mean (default ImageNet's; pass the model's processor's ``image_mean`` if it differs).
        std: normalisation standard deviation.
        batch_size: clips per forward, also the timing batch.
        pairs: interleaved timing pairs.
        warmup: untimed calls of each side before timing.
        device: where to run (default: where the model is).
        progress: show a rich progress bar on stderr.
        model_name: the model's name in ``meta`` (default its ``name_or_path``).

    Returns:
        ``{"meta": {...}, "results": [unmodified, merged]}``, JSON-ready (``meta["label_names"]``: the classes the
        labels resolved to). The results have the fields of `mame.zeroshot`'s: ``top1`` (accuracy, None without
        labels), ``final_tokens`` (after the last block, mean per clip), ``flops`` (all clips), ``flops_per_item``,
        ``flop_ratio``, ``speedup`` (merged side), ``predictions`` (class index per video), and
        ``predicted_labels`` (their names).

    Raises:
        FileNotFoundError: a video does not exist.
        ValueError: not a VideoMAE classifier, already patched, an unknown label, a label count that differs
            from the video count, frames or size the model does not take, or a file that does not decode.
    """
    check_video_model(model)
    if merge_runtime(model) is not None:
        raise ValueError("model is patched by mame: pass the unmodified model (call mame.unpatch first)")
    videos = [Path(video) for video in videos]
    if not videos:
        raise ValueError("no videos given")
    missing = [str(video) for video in videos if not video.is_file()]
    if missing:
        raise FileNotFoundError(f"no such video file: {', '.join(missing)}")
    if batch_size < 1 or pairs < 1:
        raise ValueError(f"batch_size and pairs must be >= 1, got {batch_size} and {pairs}")
    frames, size = model_input_shape(model, frames, size)
    id2label = {int(index): name for index, name in model.config.id2label.items()}
    targets = None
    if labels is not None:
        if len(labels) != len(videos):
            raise ValueError(f"{len(labels)} labels for {len(videos)} videos: give one label per video, in order")
        targets = resolve_labels(id2label, labels)
    baseline = copy.deepcopy(model).eval()
    if device is not None:
        baseline.to(device)
    merged = mame.patch.hf(copy.deepcopy(baseline), tau=tau, layers=layers)
    param = next(baseline.parameters())
    config = model.config
    unmodified_tokens = float((frames // config.tubelet_size) * (size // config.patch_size) ** 2)
    sides = [SideTally("unmodified"), SideTally(variant_name(tau))]
    timing = None
    with progress_bar(progress) as bar, torch.inference_mode():
        task = bar.add_task(f"videos ({sides[0].name} and {sides[1].name})", total=len(videos))
        for start in range(0, len(videos), batch_size):
            paths = videos[start:start + batch_size]
            clips = torch.stack([read_clip(path, frames, size, mean, std) for path in paths])
            clips = clips.to(device=param.device, dtype=param.dtype)
            timing = clips if timing is None else timing
            out = sides[0].run(lambda: baseline(pixel_values=clips), len(paths), lambda _: unmodified_tokens)
            sides[0].predictions += out.logits.argmax(dim=-1).tolist()
            out = sides[1].run(lambda: merged(pixel_values=clips), len(paths), lambda _: merged_tokens(merged))
            sides[1].predictions += out.logits.argmax(dim=-1).tolist()
            bar.advance(task, len(paths))
        timing_task = bar.add_task("timing pairs", total=pairs)
        speed = paired_speedup(lambda: baseline(pixel_values=timing), lambda: merged(pixel_values=timing),
                               pairs=pairs, warmup=warmup, on_pair=lambda _: bar.advance(timing_task))
    import transformers

    meta = {"model": model_name or getattr(model, "name_or_path", "") or type(model).__name__,
            "architecture": type(model).__name__, "videos": [str(video) for video in videos],
            "labels": None if labels is None else [str(label) for label in labels], "label_indices": targets,
            "label_names": None if targets is None else [id2label[index] for index in targets],
            "frames": frames, "size": size, "mean": list(mean), "std": list(std), "tau": tau,
            "layers": layers if isinstance(layers, int) else list(layers), "batch": batch_size,
            "timing_batch": int(timing.shape[0]), "pairs": pairs, "device": str(param.device),
            "dtype": str(param.dtype).removeprefix("torch."), "threads": torch.get_num_threads(),
            "load_average_1min": load_average(), "torch": torch.__version__, "transformers": transformers.__version__,
            "mame": mame.__version__, "python": platform.python_version()}
    baseline_flops = sides[0].flops
    results = [sides[0].to_json(targets, baseline_flops=baseline_flops, speedup=None),
               sides[1].to_json(targets, baseline_flops=baseline_flops, speedup=speed, tau=tau,
                                layers=meta["layers"])]
    for result in results:
        result["predicted_labels"] = [id2label.get(index, str(index)) for index in result["predictions"]]
    return {"meta": meta, "results": results}


def results_table(report: Mapping[str, Any], title: str | None = None) -> Table:
    """The rich table of a `video_eval` report (accuracy shows – without labels)."""
    meta = report["meta"]
    if title is None:
        title = (f"{meta['model']} on {len(meta['videos'])} video(s), {meta['frames']} frames at {meta['size']} px, "
                 f"MaMe on {meta['layers']} blocks, batch {meta['batch']}, {meta['device']}, "
                 f"{meta['threads']} threads")
    return comparison_table(report["results"], title=title, accuracy_header="accuracy %", item="clip")


def predictions_table(report: Mapping[str, Any]) -> Table:
    """One row per video: its true class (when labels were given) and each side's predicted class."""
    meta, results = report["meta"], report["results"]
    names = meta["label_names"]
    table = Table(title="predictions")
    table.add_column("video")
    if names is not None:
        table.add_column("label")
    for result in results:
        table.add_column(result["name"])
    for index, video in enumerate(meta["videos"]):
        row = [Path(video).name] + ([names[index]] if names is not None else [])
        table.add_row(*row, *(result["predicted_labels"][index] for result in results))
    return table
