"""`mame.zeroshot` and `mame eval zeroshot`: zero-shot top-1 of an image-text model, unmodified and merged, on an
ImageFolder of real photos; the `mame eval` group keeps its plain Fashion-MNIST command.

The tiny CLIP has random weights, so the photos are filed into the class folders its own unmodified predictions
choose (computed here by brute force, independently of the module): the unmodified top-1 must then be exactly 1,
and one photo moved to another folder must cost exactly one image."""

from __future__ import annotations

import copy
import json
import re
import shutil
from pathlib import Path

import pytest
import torch
import typer
from PIL import Image
from transformers import (CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer,
                          CLIPVisionConfig, CLIPVisionModel, Siglip2Config, Siglip2ImageProcessor, Siglip2Model,
                          SiglipConfig, SiglipImageProcessor, SiglipModel)
from typer.testing import CliRunner

import mame
from mame import bench, zeroshot
from mame.cli import app

CANDIDATES = ("cat", "dog", "car", "tree", "boat", "house", "bird", "rocket")
TEMPLATES = ("a photo of a {}.", "a picture of the {}.")
TAU, DEPTH = 0.3, 3
README = (Path(__file__).parents[1] / "README.md").read_text(encoding="utf-8")


def tiny_tokenizer(max_length: int = 32) -> CLIPTokenizer:
    """A byte-level BPE tokenizer with one token per printable ASCII character (and its end-of-word form), no
    merges: built offline in memory, saved with the processor."""
    chars = [chr(code) for code in range(33, 127)]
    vocab = {char: index for index, char in enumerate(chars)}
    vocab |= {f"{char}</w>": len(chars) + index for index, char in enumerate(chars)}
    vocab |= {"<|startoftext|>": len(vocab), "<|endoftext|>": len(vocab) + 1}
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=max_length)


def text_config(tokenizer: CLIPTokenizer, max_positions: int = 32) -> dict:
    return dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                vocab_size=len(tokenizer), max_position_embeddings=max_positions,
                bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id)


VISION = dict(hidden_size=32, num_hidden_layers=DEPTH, num_attention_heads=2, intermediate_size=64, image_size=32,
              patch_size=8)


def tiny_clip(seed: int, tokenizer: CLIPTokenizer) -> CLIPModel:
    """Small position embeddings (so photos merge) and no post-norm bias (which would point every image the same
    way), so that random weights still tell photos apart."""
    torch.manual_seed(seed)
    model = CLIPModel(CLIPConfig(text_config=text_config(tokenizer), vision_config=VISION, projection_dim=16)).eval()
    with torch.no_grad():
        model.vision_model.embeddings.position_embedding.weight.normal_(0, 0.05)
        model.vision_model.post_layernorm.bias.zero_()
    return model


def class_embeddings(model, processor, names, templates=TEMPLATES) -> torch.Tensor:
    """CLIP's prompt ensemble, class by class: normalise each prompt's embedding, average, normalise."""
    rows = []
    with torch.no_grad():
        for name in names:
            tokens = processor(text=[template.format(name) for template in templates], padding=True,
                               return_tensors="pt")
            embedded = model.get_text_features(**tokens).pooler_output
            mean = (embedded / embedded.norm(dim=-1, keepdim=True)).mean(dim=0)
            rows.append(mean / mean.norm())
    return torch.stack(rows)


def brute_force(model, processor, paths, names, templates=TEMPLATES) -> tuple[list[int], list[float]]:
    """Each image alone: its predicted class among ``names`` and its tokens after the last block (patched model)."""
    text = class_embeddings(model, processor, names, templates)
    predictions, tokens = [], []
    with torch.no_grad():
        for path in paths:
            inputs = processor(images=[Image.open(path).convert("RGB")], return_tensors="pt")
            predictions.append(int((model.get_image_features(**inputs).pooler_output @ text.T).argmax()))
            if hasattr(model, "mame"):
                tokens.append(model.mame.last_token_counts[-1])
    return predictions, tokens


def image_paths(root: Path) -> list[Path]:
    return [path for folder in sorted(root.iterdir()) for path in sorted(folder.iterdir())]


@pytest.fixture(scope="module")
def setup(tmp_path_factory, bundled_photos, one_thread_for_module):
    """A tiny CLIP and processor saved to disk, and an ImageFolder of the 20 bundled photos filed by the model's
    own unmodified predictions among `CANDIDATES` (a seed whose predictions use at least three classes and whose
    merged predictions differ on some photo, so that mixing up the two sides shows)."""
    root = tmp_path_factory.mktemp("zeroshot")
    staging = root / "staging"
    staging.mkdir()
    for index, (_, photo) in enumerate(bundled_photos):
        photo.resize((48, 40)).save(staging / f"{index:02d}.png")
    paths = sorted(staging.iterdir())
    tokenizer = tiny_tokenizer()
    processor = CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 32},
                                                                 crop_size={"height": 32, "width": 32}),
                              tokenizer=tokenizer)
    for seed in range(30):
        model = tiny_clip(seed, tokenizer)
        predicted, _ = brute_force(model, processor, paths, CANDIDATES)
        labels = sorted(set(predicted))
        merged, _ = brute_force(mame.patch.hf(copy.deepcopy(model), tau=TAU, layers=DEPTH), processor, paths,
                                [CANDIDATES[label] for label in labels])
        if len(labels) >= 3 and merged != [labels.index(label) for label in predicted]:
            break
    else:
        pytest.fail("no seed gives a tiny CLIP that tells the photos apart and whose merged predictions differ")
    images = root / "images"
    for path, label in zip(paths, predicted):
        (images / CANDIDATES[label]).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, images / CANDIDATES[label] / path.name)
    model.save_pretrained(root / "model")
    processor.save_pretrained(root / "model")
    return {"root": root, "model": model, "processor": processor, "images": images,
            "classes": sorted(CANDIDATES[label] for label in set(predicted))}


def run(setup, image_dir=None, **kwargs) -> dict:
    options = dict(templates=TEMPLATES, tau=TAU, layers=DEPTH, batch_size=8, pairs=1, warmup=0, progress=False)
    return zeroshot.zeroshot_eval(setup["model"], setup["processor"], image_dir or setup["images"],
                                  **(options | kwargs))


def test_top1_tokens_and_flops_match_brute_force(setup):
    """Unmodified: top-1 exactly 1 (the photos are filed by its predictions), every token kept, the FLOPs of one
    image per image. Merged: the predictions and tokens of the patched model run image by image, fewer FLOPs."""
    model, processor = setup["model"], setup["processor"]
    report = run(setup)
    unmodified, merged = report["results"]
    paths = image_paths(setup["images"])
    assert report["meta"]["classes"] == setup["classes"] and report["meta"]["n_images"] == len(paths) == 20
    assert [setup["images"] / path for path in report["meta"]["paths"]] == paths
    expected, _ = brute_force(model, processor, paths, setup["classes"])
    assert unmodified["predictions"] == expected == report["meta"]["labels"]
    assert unmodified["top1"] == 1.0 and unmodified["correct"] == 20
    assert unmodified["final_tokens"] == 17  # 4 x 4 patches and the class token
    one_image = processor(images=[Image.open(paths[0]).convert("RGB")], return_tensors="pt")
    per_image = bench.count_flops(lambda **inputs: model.get_image_features(**inputs), dict(one_image))
    assert unmodified["flops_per_item"] == pytest.approx(per_image, rel=1e-9)

    patched = mame.patch.hf(copy.deepcopy(model), tau=TAU, layers=DEPTH)
    merged_expected, merged_tokens = brute_force(patched, processor, paths, setup["classes"])
    assert merged["predictions"] == merged_expected
    assert merged["top1"] == pytest.approx(sum(p == y for p, y in zip(merged_expected, expected)) / 20)
    assert merged["top1"] < 1
    assert merged["final_tokens"] == pytest.approx(sum(merged_tokens) / 20) and merged["final_tokens"] < 12
    assert merged["flop_ratio"] == pytest.approx(unmodified["flops"] / merged["flops"]) and merged["flop_ratio"] > 1.1
    assert merged["speedup"]["pairs"] == 1 and merged["speedup"]["ratio"] > 0 and unmodified["speedup"] is None
    assert (merged["tau"], merged["layers"]) == (TAU, DEPTH)
    assert not hasattr(model, "mame")  # the caller's model is left alone
    json.dumps(report)  # JSON-ready as it is


def test_a_misfiled_photo_costs_exactly_one_image(setup, tmp_path):
    images = tmp_path / "images"
    shutil.copytree(setup["images"], images)
    first, second = setup["classes"][:2]
    moved = sorted((images / first).iterdir())[0]
    moved.rename(images / second / moved.name)
    unmodified = run(setup, images)["results"][0]
    assert unmodified["correct"] == 19 and unmodified["top1"] == pytest.approx(19 / 20)


def test_class_names_in_another_order_or_mapped(setup):
    """Folder names in another order give the same classes in that order; mapping two folders to each other's
    names swaps their prompts, so exactly the photos of the other classes stay right."""
    classes = setup["classes"]
    reordered = run(setup, classes=classes[::-1])
    assert reordered["meta"]["folders"] == classes[::-1] and reordered["results"][0]["top1"] == 1.0
    swapped = {classes[0]: classes[1], classes[1]: classes[0], **{name: name for name in classes[2:]}}
    report = run(setup, classes=swapped)
    labels = report["meta"]["labels"]
    assert report["meta"]["classes"] == [classes[1], classes[0], *classes[2:]]
    assert report["results"][0]["correct"] == sum(label >= 2 for label in labels) < 20


def test_tau_one_merges_nothing(setup):
    unmodified, merged = run(setup, tau=1.0)["results"]
    assert merged["predictions"] == unmodified["predictions"] and merged["final_tokens"] == 17


def test_siglip_pads_prompts_to_full_length_and_keeps_no_class_token(setup):
    """SigLIP pools its text at the last position, so prompts are padded to the full length; its image tower has no
    class token (16 tokens unmodified)."""
    tokenizer = tiny_tokenizer(max_length=24)
    image_processor = SiglipImageProcessor(size={"height": 32, "width": 32})

    def processor(text=None, images=None, **kwargs):  # any callable with the processor's text=/images= interface
        return tokenizer(text, **kwargs) if text is not None else image_processor(images, **kwargs)

    torch.manual_seed(0)
    model = SiglipModel(SiglipConfig(text_config=text_config(tokenizer, 24), vision_config=VISION)).eval()
    text = zeroshot.text_embeddings(model, processor, setup["classes"], TEMPLATES)
    with torch.no_grad():
        full = tokenizer(TEMPLATES[0].format(setup["classes"][0]), padding="max_length", max_length=24,
                         return_tensors="pt")
        short = tokenizer(TEMPLATES[0].format(setup["classes"][0]), return_tensors="pt")
        assert short["input_ids"].shape[1] < 24
        padded = model.get_text_features(input_ids=full["input_ids"]).pooler_output
        unpadded = model.get_text_features(input_ids=short["input_ids"]).pooler_output
    assert not torch.allclose(padded, unpadded, atol=1e-3)  # so the padding rule matters
    ensemble = torch.nn.functional.normalize(torch.stack([
        torch.nn.functional.normalize(model.get_text_features(**tokenizer(
            [template.format(name) for template in TEMPLATES], padding="max_length", max_length=24,
            return_tensors="pt")).pooler_output.detach(), dim=-1).mean(0) for name in setup["classes"]]), dim=-1)
    torch.testing.assert_close(text, ensemble)
    report = zeroshot.zeroshot_eval(model, processor, setup["images"], templates=TEMPLATES, tau=TAU, layers=DEPTH,
                                    batch_size=8, pairs=1, warmup=0, progress=False)
    unmodified, merged = report["results"]
    assert unmodified["final_tokens"] == 16 and merged["final_tokens"] < 16
    assert len(unmodified["predictions"]) == len(merged["predictions"]) == 20


def test_siglip2_counts_real_patches_of_each_aspect_ratio(bundled_photos, tmp_path):
    """SigLIP2 (NaFlex) pads each image's patches to a fixed count: the unmodified tokens are the real patches
    (16 of a landscape photo, 12 of a tall one at 16 patches at most), predictions those of each image alone."""
    tokenizer = tiny_tokenizer(max_length=24)
    image_processor = Siglip2ImageProcessor(patch_size=8, max_num_patches=16)

    def processor(text=None, images=None, **kwargs):
        return tokenizer(text, **kwargs) if text is not None else image_processor(images, **kwargs)

    for folder, (name, photo), size in (("wide", bundled_photos[0], (48, 40)), ("tall", bundled_photos[1], (20, 60))):
        (tmp_path / folder).mkdir()
        photo.resize(size).save(tmp_path / folder / "photo.png")
    torch.manual_seed(0)
    vision = {key: value for key, value in VISION.items() if key != "image_size"} | {"num_patches": 16}
    model = Siglip2Model(Siglip2Config(text_config=text_config(tokenizer, 24), vision_config=vision)).eval()
    report = zeroshot.zeroshot_eval(model, processor, tmp_path, templates=TEMPLATES, tau=TAU, layers=DEPTH,
                                    batch_size=2, pairs=1, warmup=0, progress=False)
    unmodified, merged = report["results"]
    assert unmodified["final_tokens"] == (16 + 12) / 2 and merged["final_tokens"] < 14
    text = zeroshot.text_embeddings(model, processor, ["tall", "wide"], TEMPLATES)
    with torch.no_grad():
        alone = [int((model.get_image_features(**image_processor([Image.open(path)], return_tensors="pt"))
                      .pooler_output @ text.T).argmax()) for path in image_paths(tmp_path)]
    assert unmodified["predictions"] == alone


def test_bad_inputs_get_clear_errors(setup, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        zeroshot.image_folder(tmp_path / "missing")
    with pytest.raises(ValueError, match="no class folders"):
        zeroshot.image_folder(tmp_path)
    (tmp_path / "cat").mkdir()
    (tmp_path / "cat" / "notes.txt").write_text("not an image")
    with pytest.raises(ValueError, match="cat has no images"):
        zeroshot.image_folder(tmp_path)
    with pytest.raises(ValueError, match="2 class names for 3 class folders"):
        zeroshot.image_folder(setup["images"], ["a", "b"])
    with pytest.raises(FileNotFoundError, match="zebra"):
        zeroshot.image_folder(setup["images"], {"zebra": "zebra"})
    with pytest.raises(ValueError, match="CLIP, SigLIP or SigLIP2"):
        zeroshot.zeroshot_eval(CLIPVisionModel(CLIPVisionConfig(**VISION)), setup["processor"], setup["images"],
                               progress=False)
    patched = mame.patch.hf(copy.deepcopy(setup["model"]), tau=TAU, layers=DEPTH)
    with pytest.raises(ValueError, match="patched"):
        zeroshot.zeroshot_eval(patched, setup["processor"], setup["images"], progress=False)
    with pytest.raises(ValueError, match="out of range"):
        run(setup, layers=DEPTH + 1)
    with pytest.raises(ValueError, match="exactly one"):
        run(setup, templates=["a photo"])


def test_class_and_template_specs(tmp_path):
    assert zeroshot.parse_classes("cat, dog ,bird") == ["cat", "dog", "bird"]
    assert zeroshot.parse_classes("n01=tench, n02 = goldfish") == {"n01": "tench", "n02": "goldfish"}
    names = tmp_path / "names.txt"
    names.write_text("# ImageNet\ngreat white shark\n\ntiger shark\n")
    assert zeroshot.parse_classes(str(names)) == ["great white shark", "tiger shark"]
    with pytest.raises(ValueError, match="not a mix"):
        zeroshot.parse_classes("a=b,c")
    templates = tmp_path / "templates.txt"
    templates.write_text("a photo of a {}.\nart of the {}.\n")
    assert zeroshot.parse_templates(str(templates)) == ["a photo of a {}.", "art of the {}."]
    assert zeroshot.parse_templates("itap of a {}.") == ["itap of a {}."]
    with pytest.raises(ValueError, match="neither a file nor a template"):
        zeroshot.parse_templates("no-such-file.txt")
    assert zeroshot.spread(4, 20) == [0, 6, 13, 19] and zeroshot.spread(8, 3) == [0, 1, 2]


def invoke(*args: str):
    return CliRunner().invoke(app, list(args), env={"COLUMNS": "200"})


def test_cli_end_to_end_from_a_saved_model(setup, tmp_path):
    out = tmp_path / "zeroshot.json"
    templates = tmp_path / "templates.txt"
    templates.write_text("\n".join(TEMPLATES))
    result = invoke("eval", "zeroshot", str(setup["root"] / "model"), "--images", str(setup["images"]),
                    "--templates", str(templates), "--tau", str(TAU), "--layers", str(DEPTH), "--batch", "8",
                    "--pairs", "1", "--json-out", str(out))
    assert result.exit_code == 0, result.output
    assert "MaMe τ=0.3" in result.output and "top-1 %" in result.output
    report = json.loads(out.read_text())
    unmodified, merged = report["results"]
    assert unmodified["top1"] == 1.0 and merged["final_tokens"] < 17 and merged["flop_ratio"] > 1
    assert report["meta"]["model"] == str(setup["root"] / "model") and report["meta"]["templates"] == list(TEMPLATES)
    assert re.search(r"unmodified\s*│\s*17\.0 .*│\s*100\.0 │", result.output)

    classes = tmp_path / "classes.txt"
    first, second, *rest = setup["classes"]
    classes.write_text("\n".join([f"{first}={second}", f"{second}={first}", *(f"{name}={name}" for name in rest)]))
    result = invoke("eval", "zeroshot", str(setup["root"] / "model"), "--images", str(setup["images"]),
                    "--templates", str(templates), "--classes", str(classes), "--layers", str(DEPTH), "--pairs", "1",
                    "--json-out", str(out))
    assert result.exit_code == 0, result.output
    assert json.loads(out.read_text())["results"][0]["top1"] < 1.0


def test_cli_errors(setup, tmp_path):
    model_dir = str(setup["root"] / "model")
    result = invoke("eval", "zeroshot", model_dir, "--images", str(tmp_path / "missing"))
    assert result.exit_code == 2 and "does not exist" in result.output
    (tmp_path / "empty" / "cat").mkdir(parents=True)
    result = invoke("eval", "zeroshot", model_dir, "--images", str(tmp_path / "empty"))
    assert result.exit_code == 2 and "has no images" in result.output
    vision_only = tmp_path / "vision"
    CLIPVisionModel(CLIPVisionConfig(**VISION)).save_pretrained(vision_only)
    result = invoke("eval", "zeroshot", str(vision_only), "--images", str(setup["images"]))
    assert result.exit_code == 2 and "CLIP, SigLIP or SigLIP2" in result.output
    result = invoke("eval", "zeroshot", str(tmp_path / "no-model"), "--images", str(setup["images"]))
    assert result.exit_code == 2 and "cannot load" in result.output


def test_eval_is_still_the_fashion_mnist_command(monkeypatch):
    """`mame eval [MODEL] [OPTIONS]` runs as before the group existed (options before or after MODEL), and
    `mame eval --help` lists and explains the sub-commands."""
    from mame import cli, evaluate

    class Backbone(torch.nn.Identity):
        def reset_classifier(self, num_classes: int) -> None:
            pass

    calls = []
    monkeypatch.setattr(cli, "_load_model", lambda name: calls.append(name) or Backbone())
    monkeypatch.setattr(evaluate, "evaluate_variants", lambda net, variants, **kwargs: calls.append(
        ([variant.name for variant in variants], kwargs)) or [])
    for args in (["vit_tiny_patch16_224", "--n-train", "3", "--n-test", "2", "--tau", "0.5", "--options", "plain",
                  "--tome-r", "0", "--flops", "0"],
                 ["--n-train", "3", "--n-test", "2", "vit_tiny_patch16_224", "--tau", "0.5", "--options", "plain",
                  "--tome-r", "0", "--flops", "0"]):
        calls.clear()
        result = invoke("eval", *args)
        assert result.exit_code == 0, result.output
        assert calls == ["vit_tiny_patch16_224", (["unmodified", "MaMe paper τ=0.5"],
                                                  {"n_train": 3, "n_test": 2, "seed": 0, "batch_size": 32,
                                                   "dataset": "fashion_mnist"})]
    calls.clear()
    assert invoke("eval", "--tome-r", "0", "--tau", "0.5", "--options", "plain").exit_code == 0
    assert calls[0] == "dinov2_vits14_imgfocus"
    result = invoke("eval", "vit_tiny_patch16_224", "--no-such-option")
    assert result.exit_code == 2 and "No such option" in result.output
    help_text = invoke("eval", "--help").output
    assert "zeroshot" in help_text and "video" in help_text and "--n-train" in help_text
    assert "mame eval zeroshot MODEL --images DIR" in help_text and "mame eval video VIDEO... --model ID" in help_text
    assert re.search(r"Usage: \S+ eval zeroshot \[OPTIONS\]", invoke("eval", "zeroshot", "--help").output)


@pytest.mark.parametrize("sub", ["zeroshot", "video"])
def test_readme_commands_use_existing_options(sub):
    """test_readme.py checks options per first word (`mame eval`); here each sub-command's own help."""
    shown = re.findall(rf"mame eval {sub} [^`\n]*", README)
    assert shown, f"the README shows no `mame eval {sub}` command"
    help_options = set(re.findall(r"--[a-z][a-z-]*", invoke("eval", sub, "--help").output))
    for command in shown:
        assert set(re.findall(r"--[a-z][a-z-]*", command)) <= help_options, command


def test_sub_commands_registered():
    group = typer.main.get_command(app).commands["eval"]
    assert set(group.commands) == {"zeroshot", "video"}
