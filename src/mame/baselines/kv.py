"""KV-cache baselines for causal LMs, written here for side-by-side runs with causal MaMe at the same KV budget.

Both are presses in the sense of `mame.lm.KVPress`: after prefill, each layer's cached keys and values (B, kv_heads,
K, head_dim) are cut to ``keep`` per layer, keys staying rotated at their own positions:

* `StreamingLLMPress` (Xiao et al., "Efficient streaming language models with attention sinks"): the first ``sinks``
  tokens and a sliding window of the most recent ones.
* `KnormPress` (Devoto et al., "A simple and effective L2 norm-based strategy for KV cache compression", as
  NVIDIA's kvpress implements it): in every key/value head, keep the keys of the *smallest* L2 norm (the keys with
  the largest norm draw the least attention) and drop the rest.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def _check(keys: torch.Tensor, keep: int) -> None:
    if keys.dim() != 4:
        raise ValueError(f"keys must be (batch, kv_heads, tokens, head_dim), got shape {tuple(keys.shape)}")
    if isinstance(keep, bool) or not isinstance(keep, int) or keep < 1:
        raise ValueError(f"keep must be a positive int (tokens per layer), got {keep!r}")


@dataclass(frozen=True)
class StreamingLLMPress:
    """Keep the ``sinks`` first tokens (attention sinks) and the most recent ``keep - sinks``."""

    sinks: int = 4
    name: str = "streaming-llm"

    def compress(self, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor, keep: int,
                 rotary=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(keys, values, positions, sizes) of the ``keep`` kept tokens; ``rotary`` is unused (keys stay where
        they were)."""
        _check(keys, keep)
        length = keys.shape[2]
        if keep >= length:
            return keys, values, positions, torch.ones(positions.shape, device=keys.device)
        sinks = min(self.sinks, keep)
        index = torch.cat([torch.arange(sinks), torch.arange(length - (keep - sinks), length)]).to(keys.device)
        sizes = torch.ones(positions.shape[0], keep, device=keys.device)
        return keys[:, :, index], values[:, :, index], positions[:, index], sizes


@dataclass(frozen=True)
class KnormPress:
    """Keep, per key/value head, the ``keep`` keys of smallest L2 norm (in position order)."""

    name: str = "knorm"

    def compress(self, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor, keep: int,
                 rotary=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(keys, values, positions, sizes) of the kept tokens. Heads keep different tokens; ``positions`` are
        those of the first head's (every kept key precedes every later query, which is all decoding needs)."""
        _check(keys, keep)
        batch, heads, length, dim = keys.shape
        if keep >= length:
            return keys, values, positions, torch.ones(positions.shape, device=keys.device)
        norms = torch.linalg.vector_norm(keys.float(), dim=-1)  # (B, H, K)
        index = norms.topk(keep, dim=-1, largest=False).indices.sort(dim=-1).values  # (B, H, keep)
        gather = index.unsqueeze(-1).expand(-1, -1, -1, dim)
        kept_positions = positions.gather(1, index[:, 0])
        sizes = torch.ones(batch, keep, device=keys.device)
        return keys.gather(2, gather), values.gather(2, gather), kept_positions, sizes
