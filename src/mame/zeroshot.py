"""Zero-shot classification with a CLIP, SigLIP or SigLIP2 model, unmodified and merged by MaMe, in one process.

Every image of an ImageFolder (``DIR/<class folder>/*.jpg|png``) is classified by the cosine similarity of its image
embedding to one text embedding per class: the mean of the L2-normalised embeddings of the class name in every prompt
template ("a photo of a {}."), normalised again (CLIP's protocol). The text embeddings are computed once, with the
unmodified model (mame never patches a text tower); the image tower runs twice per batch, unmodified and merged
(`mame.patch.hf` on a ``copy.deepcopy``), on the same pixels. Reported per side: top-1, tokens after the last block
(mean per image), FLOPs of the image tower over the whole set (`mame.bench.flop_counter`: every matmul, attention
included), and for the merged side the FLOP ratio and the speed ratio of the image tower from interleaved pairs
(`mame.bench.paired_speedup`) on one batch.

    >>> from transformers import AutoModel, AutoProcessor
    >>> model = AutoModel.from_pretrained("openai/clip-vit-base-patch16")
    >>> processor = AutoProcessor.from_pretrained("openai/clip-vit-base-patch16")
    >>> report = zeroshot_eval(model, processor, "imagenette/val", tau=0.8, layers=8)
    >>> rich.print(results_table(report))
"""

from __future__ import annotations

import copy
import math
import platform
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from torch import nn

import mame
from mame.bench import SpeedResult, flop_counter, load_average, merge_runtime, paired_speedup

# A few of CLIP's ImageNet prompts: enough to average out the wording, few enough to embed in seconds.
DEFAULT_TEMPLATES: tuple[str, ...] = (
    "a photo of a {}.",
    "a photo of the {}.",
    "a photo of a small {}.",
    "a photo of a large {}.",
    "a close-up photo of a {}.",
    "a blurry photo of a {}.",
    "a bright photo of a {}.",
)
IMAGE_SUFFIXES: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp")
# transformers class names of the image-text models zero-shot runs on (their image towers are what mame.patch.hf
# merges; the text tower is left alone).
IMAGE_TEXT_MODELS: tuple[str, ...] = ("CLIPModel", "SiglipModel", "Siglip2Model")
_TEXT_BATCH = 256  # prompts per text forward


@dataclass(frozen=True)
class ImageFolder:
    """The labelled images of a class-per-folder directory.

    Attributes:
        root: the directory.
        folders: class folder names, in class order.
        class_names: the name of each class as it goes into the prompts (the folder name unless mapped).
        paths: every image, class by class, sorted by name within a class.
        labels: the class index of each image.
    """

    root: Path
    folders: tuple[str, ...]
    class_names: tuple[str, ...]
    paths: tuple[Path, ...]
    labels: tuple[int, ...]


def parse_classes(spec: str) -> list[str] | dict[str, str]:
    """``--classes``: a text file (one entry per line) or a comma-separated list.

    Entries are class names, or ``folder=name`` to map a folder to the name used in the prompts; either all entries
    map or none does. Blank lines and lines starting with ``#`` in a file are skipped.

    Returns:
        the names in order, or a ``{folder: name}`` mapping.
    """
    path = Path(spec)
    if path.is_file():
        entries = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
        entries = [entry for entry in entries if entry and not entry.startswith("#")]
    else:
        entries = [entry.strip() for entry in spec.split(",") if entry.strip()]
    if not entries:
        raise ValueError(f"no class names in {spec!r}")
    mapped = ["=" in entry for entry in entries]
    if any(mapped) and not all(mapped):
        raise ValueError("--classes: give either plain names or 'folder=name' for every class, not a mix")
    if not all(mapped):
        return entries
    mapping = {}
    for entry in entries:
        folder, name = (part.strip() for part in entry.split("=", 1))
        if not folder or not name:
            raise ValueError(f"--classes: {entry!r} is not 'folder=name'")
        if folder in mapping:
            raise ValueError(f"--classes: folder {folder!r} is mapped twice")
        mapping[folder] = name
    return mapping


def parse_templates(spec: str) -> list[str]:
    """``--templates``: a text file with one prompt template per line, or a single template; each holds ``{}``
    where the class name goes. Blank lines and lines starting with ``#`` are skipped."""
    path = Path(spec)
    if path.is_file():
        templates = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
        templates = [line for line in templates if line and not line.startswith("#")]
    elif "{}" in spec:
        templates = [spec]
    else:
        raise ValueError(f"--templates: {spec!r} is neither a file nor a template with {{}} for the class name")
    return check_templates(templates)


def check_templates(templates: Sequence[str]) -> list[str]:
    """The templates as a list; a ValueError when there are none or one lacks its single ``{}``."""
    templates = list(templates)
    if not templates:
        raise ValueError("no prompt templates")
    bad = [template for template in templates if template.count("{}") != 1]
    if bad:
        raise ValueError(f"every prompt template needs exactly one {{}} for the class name, these do not: {bad}")
    return templates


def _images_in(folder: Path) -> list[Path]:
    return sorted(path for path in folder.iterdir() if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES)


def image_folder(root: str | Path, classes: Sequence[str] | Mapping[str, str] | None = None) -> ImageFolder:
    """Read ``root/<class folder>/*`` (jpg, jpeg, png, bmp, gif, webp; any case).

    Args:
        root: the directory.
        classes: None: every sub-folder is a class named after it, in sorted order. A sequence with the same set
            of names as the folders selects that class order; any other sequence names the sorted folders in turn
            (one name per folder, e.g. ImageNet's readable names for its ``n01440764`` folders). A mapping
            ``{folder: name}`` evaluates only those folders, in its order.

    Raises:
        FileNotFoundError: ``root`` or a mapped folder does not exist.
        ValueError: no class folders, an empty class folder, or names that do not fit the folders.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {root} does not exist (expected {root}/<class name>/*.jpg|png)")
    found = sorted(path.name for path in root.iterdir() if path.is_dir() and not path.name.startswith("."))
    if classes is None:
        folders, names = found, found
    elif isinstance(classes, Mapping):
        missing = [folder for folder in classes if folder not in found]
        if missing:
            raise FileNotFoundError(f"--classes maps folders that {root} does not have: {missing}")
        folders, names = list(classes), list(classes.values())
    elif sorted(classes) == found:
        folders, names = list(classes), list(classes)
    elif len(classes) != len(found):
        raise ValueError(f"{len(classes)} class names for {len(found)} class folders in {root}: give one name per "
                         "folder (in the sorted order of the folders), or 'folder=name' entries")
    else:
        folders, names = found, list(classes)
    if len(set(names)) != len(names):
        raise ValueError(f"class names must be distinct, got {names}")
    if not folders:
        raise ValueError(f"{root} has no class folders (expected {root}/<class name>/*.jpg|png)")
    paths, labels = [], []
    for label, folder in enumerate(folders):
        images = _images_in(root / folder)
        if not images:
            raise ValueError(f"class folder {root / folder} has no images ({', '.join(IMAGE_SUFFIXES)})")
        paths += images
        labels += [label] * len(images)
    return ImageFolder(root=root, folders=tuple(folders), class_names=tuple(names), paths=tuple(paths),
                       labels=tuple(labels))


def check_image_text_model(model: nn.Module) -> None:
    """A ValueError unless ``model`` is one of transformers' `IMAGE_TEXT_MODELS` (the whole two-tower model: a
    vision tower alone cannot embed class names)."""
    import transformers

    known = tuple(getattr(transformers, name) for name in IMAGE_TEXT_MODELS if hasattr(transformers, name))
    if not isinstance(model, known):
        raise ValueError(f"zero-shot classification needs a CLIP, SigLIP or SigLIP2 image-text model "
                         f"(transformers {', '.join(IMAGE_TEXT_MODELS)}), got {type(model).__name__}")


def _embedding(output: Any) -> torch.Tensor:
    """The embedding from ``get_image_features``/``get_text_features``: a tensor (transformers 4) or the
    ``pooler_output`` of a model output (transformers 5)."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


def _text_padding(model: nn.Module) -> dict[str, Any]:
    # SigLIP's text tower was trained on prompts padded to its full length (it pools the last token); CLIP's reads
    # the end-of-text token, so the shortest padding is exact and cheaper.
    if model.config.model_type in ("siglip", "siglip2"):
        return {"padding": "max_length", "max_length": model.config.text_config.max_position_embeddings,
                "truncation": True}
    return {"padding": True, "truncation": True}


def _device_of(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    param = next(model.parameters())
    return param.device, param.dtype


def _to(inputs: Mapping[str, Any], device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    return {key: value.to(device=device, dtype=dtype if value.is_floating_point() else None)
            if isinstance(value, torch.Tensor) else value for key, value in inputs.items()}


def progress_bar(enabled: bool) -> Progress:
    """A transient rich progress bar on stderr (disabled: nothing shown)."""
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    return Progress(*columns, console=Console(stderr=True), disable=not enabled, transient=True)


def text_embeddings(
    model: nn.Module, processor: Any, class_names: Sequence[str], templates: Sequence[str] = DEFAULT_TEMPLATES, *,
    progress: bool = False,
) -> torch.Tensor:
    """One L2-normalised text embedding per class: the mean over templates of the normalised embeddings of
    ``template.format(name)``, normalised again.

    Returns:
        float32 (classes, dim) on the CPU.
    """
    templates = check_templates(templates)
    prompts = [template.format(name) for name in class_names for template in templates]
    device, _ = _device_of(model)
    chunks = []
    with progress_bar(progress) as bar, torch.inference_mode():
        task = bar.add_task("text embeddings", total=math.ceil(len(prompts) / _TEXT_BATCH))
        for start in range(0, len(prompts), _TEXT_BATCH):
            tokens = processor(text=prompts[start:start + _TEXT_BATCH], return_tensors="pt", **_text_padding(model))
            tokens = {key: value.to(device) for key, value in tokens.items() if key in ("input_ids", "attention_mask")}
            chunks.append(F.normalize(_embedding(model.get_text_features(**tokens)).float(), dim=-1).cpu())
            bar.advance(task)
    per_prompt = torch.cat(chunks).view(len(class_names), len(templates), -1)
    return F.normalize(per_prompt.mean(dim=1), dim=-1)


@dataclass
class SideTally:
    """What one side (unmodified or merged) has run so far: FLOPs, tokens after the last block, predictions.

    `run` calls the model under `mame.bench.flop_counter`, so the FLOPs are those of exactly the forwards that
    produced the predictions (merge matmuls and attention included; padding of a ragged batch too, since it runs).
    """

    name: str
    flops: int = 0
    token_sum: float = 0.0
    items: int = 0
    predictions: list[int] = field(default_factory=list)

    def run(self, forward: Callable[[], Any], count: int, tokens: Callable[[Any], float]) -> Any:
        """Run ``forward()`` on ``count`` items; ``tokens(output)`` gives their mean tokens after the last block."""
        counter = flop_counter()
        with counter:
            output = forward()
        self.flops += int(counter.get_total_flops())
        self.token_sum += tokens(output) * count
        self.items += count
        return output

    @property
    def final_tokens(self) -> float:
        """Tokens after the last block, mean per item."""
        return self.token_sum / self.items if self.items else math.nan

    def to_json(self, labels: Sequence[int] | None, *, baseline_flops: int, speedup: SpeedResult | None,
                **extra: Any) -> dict[str, Any]:
        """The side's row: ``top1`` (None without labels), ``correct``, ``final_tokens``, ``flops`` (total),
        ``flops_per_item``, ``flop_ratio`` (baseline FLOPs / these), ``speedup`` and the ``predictions``."""
        correct = None if labels is None else sum(int(p == y) for p, y in zip(self.predictions, labels))
        return {"name": self.name, **extra,
                "top1": None if correct is None else correct / len(self.predictions), "correct": correct,
                "items": self.items, "final_tokens": self.final_tokens, "flops": self.flops,
                "flops_per_item": self.flops / self.items if self.items else math.nan,
                "flop_ratio": baseline_flops / self.flops if self.flops else math.nan,
                "speedup": None if speedup is None else asdict(speedup), "predictions": list(self.predictions)}


def merged_tokens(model: nn.Module) -> float:
    """Tokens after the last block of the last forward of a model patched by mame (mean over the batch)."""
    runtime = merge_runtime(model)
    if runtime is None:
        raise ValueError(f"{type(model).__name__} is not patched by mame")
    counts = runtime.last_token_counts
    return float(counts[-1]) if counts else math.nan


def _unmodified_tokens(inputs: Mapping[str, Any]) -> Callable[[Any], float]:
    # The unmodified tower keeps every token: the length of its last hidden state, less padding patches
    # (SigLIP2's NaFlex inputs mark real patches in pixel_attention_mask).
    def count(output: Any) -> float:
        hidden = getattr(output, "last_hidden_state", None)
        if hidden is None:
            return math.nan
        mask = inputs.get("pixel_attention_mask")
        if mask is not None and mask.shape[-1] == hidden.shape[1]:
            return float(mask.sum(dim=-1).float().mean())
        return float(hidden.shape[1])

    return count


def _load_images(paths: Sequence[Path]) -> list[Image.Image]:
    images = []
    for path in paths:
        try:
            with Image.open(path) as image:
                images.append(image.convert("RGB"))
        except OSError as error:
            raise ValueError(f"cannot read image {path}: {error}") from error
    return images


def _batches(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


def spread(count: int, total: int) -> list[int]:
    """``count`` indices spread evenly over ``range(total)`` (a timing batch that spans every class)."""
    count = min(count, total)
    return sorted({round(i * (total - 1) / max(count - 1, 1)) for i in range(count)})


def variant_name(tau: float) -> str:
    return f"MaMe τ={tau:g}"


def zeroshot_eval(
    model: nn.Module,
    processor: Any,
    image_dir: str | Path,
    classes: Sequence[str] | Mapping[str, str] | None = None,
    templates: Sequence[str] = DEFAULT_TEMPLATES,
    tau: float = 0.8,
    layers: int | Sequence[int] = 8,
    *,
    batch_size: int = 16,
    pairs: int = 5,
    warmup: int = 1,
    device: str | torch.device | None = None,
    progress: bool = True,
    model_name: str | None = None,
) -> dict[str, Any]:
    """Zero-shot top-1 of ``model`` unmodified and merged by MaMe on an ImageFolder, with their cost.

    The caller's model is not changed: an eval-mode copy is the baseline (and embeds the prompts once), another copy
    is patched by ``mame.patch.hf(copy, tau=tau, layers=layers)``. Each batch is preprocessed once by ``processor``
    and run through both image towers. The speed ratio is `mame.bench.paired_speedup` of the two image towers on one
    batch of ``batch_size`` images spread over the classes (``pairs`` interleaved pairs after ``warmup`` calls of
    each side), in this process.

    Args:
        model: transformers ``CLIPModel``, ``SiglipModel`` or ``Siglip2Model``, unpatched.
        processor: its processor (``AutoProcessor``: tokenizer and image processor).
        image_dir: ``DIR/<class folder>/*.jpg|png``.
        classes: class names or a ``{folder: name}`` mapping, see `image_folder`; default the folder names.
        templates: prompt templates, each with one ``{}`` for the class name.
        tau: MaMe threshold.
        layers: MaMe on the first K blocks, or a list of block indices.
        batch_size: images per forward, also the timing batch.
        pairs: interleaved timing pairs.
        warmup: untimed calls of each side before timing.
        device: where to run (default: where the model is).
        progress: show rich progress bars on stderr.
        model_name: the model's name in ``meta`` (default its ``name_or_path``).

    Returns:
        ``{"meta": {...}, "results": [unmodified, merged]}``, JSON-ready: each result has ``name``, ``top1`` (a
        fraction), ``correct``, ``final_tokens`` (after the last block, mean per image), ``flops`` (image tower,
        whole set), ``flops_per_item``, ``flop_ratio`` (unmodified / this), ``speedup`` (the merged side's
        `SpeedResult` as a dict; None for the unmodified side) and ``predictions`` (class index per image, in
        ``meta["paths"]`` order); the merged one also ``tau`` and ``layers``.

    Raises:
        FileNotFoundError: ``image_dir`` (or a mapped folder) does not exist.
        ValueError: not an image-text model, already patched, no or empty class folders, bad class names or
            templates, an unreadable image, or ``layers`` beyond the model's depth.
    """
    check_image_text_model(model)
    if merge_runtime(model) is not None:
        raise ValueError("model is patched by mame: pass the unmodified model (call mame.unpatch first)")
    if batch_size < 1 or pairs < 1:
        raise ValueError(f"batch_size and pairs must be >= 1, got {batch_size} and {pairs}")
    templates = check_templates(templates)
    folder = image_folder(image_dir, classes)
    baseline = copy.deepcopy(model).eval()
    if device is not None:
        baseline.to(device)
    merged = mame.patch.hf(copy.deepcopy(baseline), tau=tau, layers=layers)
    run_device, dtype = _device_of(baseline)
    text = text_embeddings(baseline, processor, folder.class_names, templates, progress=progress).to(run_device)

    def preprocess(paths: Sequence[Path]) -> dict[str, Any]:
        return _to(processor(images=_load_images(paths), return_tensors="pt"), run_device, dtype)

    def classify(output: Any) -> list[int]:
        return (_embedding(output).float() @ text.T).argmax(dim=-1).tolist()

    sides = [SideTally("unmodified"), SideTally(variant_name(tau))]
    with progress_bar(progress) as bar, torch.inference_mode():
        task = bar.add_task(f"images ({sides[0].name} and {sides[1].name})", total=len(folder.paths))
        for paths in _batches(folder.paths, batch_size):
            inputs = preprocess(paths)
            out = sides[0].run(lambda: baseline.get_image_features(**inputs), len(paths), _unmodified_tokens(inputs))
            sides[0].predictions += classify(out)
            out = sides[1].run(lambda: merged.get_image_features(**inputs), len(paths),
                               lambda _: merged_tokens(merged))
            sides[1].predictions += classify(out)
            bar.advance(task, len(paths))
        timing = preprocess([folder.paths[i] for i in spread(batch_size, len(folder.paths))])
        timing_task = bar.add_task("timing pairs (image tower)", total=pairs)
        speed = paired_speedup(lambda: baseline.get_image_features(**timing),
                               lambda: merged.get_image_features(**timing), pairs=pairs, warmup=warmup,
                               on_pair=lambda _: bar.advance(timing_task))
    import transformers

    meta = {"model": model_name or getattr(model, "name_or_path", "") or type(model).__name__,
            "architecture": type(model).__name__, "images": str(folder.root), "n_images": len(folder.paths),
            "folders": list(folder.folders), "classes": list(folder.class_names), "templates": templates,
            "tau": tau, "layers": layers if isinstance(layers, int) else list(layers), "batch": batch_size,
            "timing_batch": int(next(iter(timing.values())).shape[0]), "pairs": pairs, "device": str(run_device),
            "dtype": str(dtype).removeprefix("torch."), "threads": torch.get_num_threads(),
            "load_average_1min": load_average(), "torch": torch.__version__, "transformers": transformers.__version__,
            "mame": mame.__version__, "python": platform.python_version(),
            "paths": [str(path.relative_to(folder.root)) for path in folder.paths],
            "labels": list(folder.labels)}
    baseline_flops = sides[0].flops
    results = [sides[0].to_json(folder.labels, baseline_flops=baseline_flops, speedup=None),
               sides[1].to_json(folder.labels, baseline_flops=baseline_flops, speedup=speed, tau=tau,
                                layers=meta["layers"])]
    return {"meta": meta, "results": results}


def comparison_table(results: Sequence[Mapping[str, Any]], title: str | None = None,
                     accuracy_header: str = "top-1 %", item: str = "image") -> Table:
    """A rich table of result rows as `SideTally.to_json` makes them (zero-shot and video): tokens, GFLOPs per
    item, FLOP ratio, paired speed-up and accuracy (– where there are no labels)."""
    table = Table(title=title)
    table.add_column("variant")
    for header in (f"tokens out (mean per {item})", f"GFLOPs per {item}", "FLOP ratio", "speed-up (min–max)",
                   accuracy_header):
        table.add_column(header, justify="right")
    for result in results:
        speed = result["speedup"]
        table.add_row(result["name"], f"{result['final_tokens']:.1f}", f"{result['flops_per_item'] / 1e9:.3g}",
                      f"{result['flop_ratio']:.2f}x", "–" if speed is None else str(SpeedResult(**speed)),
                      "–" if result["top1"] is None else f"{100 * result['top1']:.1f}")
    return table


def results_table(report: Mapping[str, Any], title: str | None = None) -> Table:
    """The rich table of a `zeroshot_eval` report."""
    meta = report["meta"]
    if title is None:
        title = (f"{meta['model']} zero-shot on {meta['images']} ({meta['n_images']} images, {len(meta['classes'])} "
                 f"classes, {len(meta['templates'])} templates), MaMe on {meta['layers']} blocks, batch "
                 f"{meta['batch']}, {meta['device']}, {meta['threads']} threads")
    return comparison_table(report["results"], title=title)
