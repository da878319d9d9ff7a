"""Attention in pieces (`mame.attention`): the per-shape core, packing of ragged batches, attention groups."""

from __future__ import annotations

import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mame import attention
from mame.attention import PackedTokens, attend, attention_path, group_samples, packed_layout


def qkv(batch: int, length: int, heads: int = 3, head_dim: int = 8, seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, length, heads, head_dim, generator=gen) for _ in range(3)]


def reference(q, k, v, bias, scale):
    """Plain attention on (n, L, heads, head_dim) -> (n, L, heads * head_dim)."""
    scores = torch.einsum("nqhc,nkhc->nhqk", q, k) * scale
    if bias is not None:
        scores = scores + bias
    return torch.einsum("nhqk,nkhc->nqhc", scores.softmax(-1), v).flatten(2)


@pytest.mark.parametrize("path_limit", [0, 10**9])  # 0: always SDPA; huge: matmul-softmax wherever allowed
@pytest.mark.parametrize("with_bias", [False, True])
def test_both_attention_paths_are_exact(monkeypatch, path_limit, with_bias):
    monkeypatch.setitem(attention.MATMUL_MAX_SCORES, "cpu", path_limit)
    q, k, v = qkv(2, 64)
    bias = None
    if with_bias:
        bias = torch.randn(2, 1, 1, 64)
        bias[1, ..., 50:] = float("-inf")  # key padding
    expected = "matmul" if path_limit else "sdpa"
    assert attention_path(q.device, 2, 3, 64, 64) == expected
    torch.testing.assert_close(attend(q, k, v, bias, 0.3), reference(q, k, v, bias, 0.3), atol=1e-5, rtol=1e-5)


def test_path_rule_follows_the_measured_table():
    cpu = torch.device("cpu")
    assert attention_path(cpu, 1, 6, 100, 100) == "matmul"  # small score matrix: in cache
    assert attention_path(cpu, 1, 6, 257, 257) == "sdpa"  # the unmodified DINOv2-S/14 at 224 px keeps SDPA
    assert attention_path(cpu, 4, 6, 160, 160) == "sdpa"  # out of cache
    assert attention_path(cpu, 32, 6, 100, 100) == "sdpa"  # large batch: out of cache
    assert attention_path(cpu, 1, 6, 20, 20) == "sdpa"  # tiny: call overhead dominates
    assert attention_path(torch.device("meta"), 1, 6, 100, 100) == "sdpa"  # unmeasured devices: fused SDPA


def test_grouping_by_hand():
    # On CPU: 40 us per call, 2.5 ns per score element. 100 and 98 tokens together: a call's overhead
    # saved (40 us) for 6 * 2 * 100^2 - 6 * (100^2 + 98^2) = 2,376 padded scores (6 us): together. 30 with them
    # would pad 6 * (100^2 - 30^2) scores (137 us) to save 40 us: alone. Equal lengths always share a call.
    assert group_samples([100, 30, 98], heads=6, device_type="cpu") == [[0, 2], [1]]
    assert group_samples([64, 64, 64], heads=6, device_type="cpu") == [[0, 1, 2]]
    assert group_samples([257, 20], heads=6, device_type="cpu") == [[0], [1]]


def _cost(groups, lengths, heads):
    overhead, per_score = attention.GROUP_OVERHEAD_S["cpu"], attention.SCORE_ELEMENT_S["cpu"] * heads
    return sum(overhead + per_score * len(g) * max(lengths[i] for i in g) ** 2 for g in groups)


def _partitions(items):
    if not items:
        yield []
        return
    first, rest = items[0], items[1:]
    for partition in _partitions(rest):
        yield [[first]] + partition
        for i in range(len(partition)):
            yield partition[:i] + [[first] + partition[i]] + partition[i + 1:]


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(1, 300), min_size=1, max_size=6))
def test_grouping_is_optimal_over_every_partition(lengths):
    groups = group_samples(lengths, heads=6, device_type="cpu")
    assert sorted(itertools.chain(*groups)) == list(range(len(lengths)))
    best = min(_cost(p, lengths, 6) for p in _partitions(list(range(len(lengths)))))
    assert _cost(groups, lengths, 6) == pytest.approx(best, rel=1e-12)


@settings(max_examples=30, deadline=None)
@given(st.lists(st.integers(1, 40), min_size=1, max_size=6), st.booleans(), st.integers(0, 2**16))
def test_packed_attention_equals_each_sample_alone(lengths, proportional, seed):
    batch, length, heads = len(lengths), max(lengths), 3
    mask = torch.arange(length).unsqueeze(0) < torch.tensor(lengths).unsqueeze(1)
    gen = torch.Generator().manual_seed(seed)
    sizes = (1 + torch.rand(batch, length, generator=gen) * 4) * mask
    layout = packed_layout(mask, sizes if proportional else None, heads, torch.float32)
    q, k, v = qkv(batch, length, heads, seed=seed)
    packed = [layout.pack(t) for t in (q, k, v)]
    assert packed[0].shape == (sum(lengths), heads, 8)
    identity = lambda a, b: (a, b)  # noqa: E731
    out = layout.unpack(layout.attend(*packed, 0.5, 0.0, identity))
    for b, n in enumerate(lengths):
        bias = sizes[b : b + 1, :n].log()[:, None, None, :] if proportional else None
        alone = reference(q[b : b + 1, :n], k[b : b + 1, :n], v[b : b + 1, :n], bias, 0.5)
        torch.testing.assert_close(out[b : b + 1, :n], alone, atol=1e-5, rtol=1e-5)
        assert bool((out[b, n:] == 0).all())  # padding stays zero after unpacking


def test_pack_unpack_round_trip_and_contiguous_groups_need_no_gather():
    mask = torch.arange(200).unsqueeze(0) < torch.tensor([[60], [60], [200]])
    layout = packed_layout(mask, None, 6, torch.float32)
    assert isinstance(layout, PackedTokens)
    x = torch.randn(3, 200, 5) * mask.unsqueeze(-1)
    tokens = layout.pack(x)
    assert tokens.shape == (320, 5)
    torch.testing.assert_close(layout.unpack(tokens), x, atol=0, rtol=0)
    # Two samples of 60 share a call as a slice of the packed tokens (no gather, no scatter, no padding, no bias);
    # the long one runs alone, in place as well.
    shapes = [(g.count, g.length, g.start, g.rows, g.targets, g.key_bias) for g in layout.groups]
    assert shapes == [(2, 60, 0, None, None, None), (1, 200, 120, None, None, None)]
