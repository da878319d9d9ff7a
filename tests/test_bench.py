"""Tests of mame.bench: the pair protocol, FLOPs with attention against the analytic count, memory, compare()."""

from __future__ import annotations

import io
import json
from dataclasses import dataclass

import pytest
import torch
from fake_clock import FakeClock, charge_block_tokens, use_fake_clock
from timm.models.vision_transformer import VisionTransformer

import mame
from mame import bench

DIM, DEPTH, HEADS, PATCH, IMG, CLASSES, BATCH = 64, 2, 4, 8, 32, 10, 2


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def tiny_vit() -> VisionTransformer:
    torch.manual_seed(0)
    return VisionTransformer(img_size=IMG, patch_size=PATCH, embed_dim=DIM, depth=DEPTH, num_heads=HEADS,
                             num_classes=CLASSES).eval()


@pytest.fixture
def images() -> torch.Tensor:
    return torch.randn(BATCH, 3, IMG, IMG, generator=torch.Generator().manual_seed(0))


def analytic_vit_flops(batch: int, tokens: int) -> int:
    """2 FLOPs per multiply-accumulate: per block 24·L·d² (qkv, proj, MLP ×4) + 4·L²·d (QK^T, AV), patch
    embedding as a (C·p²) × d matmul per patch, and the class head on one token."""
    patches = tokens - 1
    block = 24 * tokens * DIM**2 + 4 * tokens**2 * DIM
    embed = 2 * patches * (3 * PATCH**2) * DIM
    head = 2 * DIM * CLASSES
    return batch * (DEPTH * block + embed + head)


@pytest.fixture
def clock(monkeypatch) -> FakeClock:
    return use_fake_clock(monkeypatch)


@dataclass
class Task:
    """A callable whose k-th call takes ``durations[k]`` seconds of fake time (the last duration repeats)."""

    clock: FakeClock
    durations: tuple[float, ...]
    calls: int = 0

    def __call__(self) -> None:
        self.clock.advance(self.durations[min(self.calls, len(self.durations) - 1)])
        self.calls += 1


def test_paired_speedup_reports_median_and_range_of_pair_ratios(clock):
    # A slow first call of each side is warm-up, not timed; then the baseline's calls take 4, 6, 2, 8, 10 s.
    baseline = Task(clock, (100.0, 4.0, 6.0, 2.0, 8.0, 10.0))
    method = Task(clock, (100.0, 2.0))
    result = bench.paired_speedup(baseline, method, pairs=5, warmup=1)
    assert result.ratios == (2.0, 3.0, 1.0, 4.0, 5.0)  # in the order measured
    assert (result.ratio, result.ratio_low, result.ratio_high) == (3.0, 1.0, 5.0)
    assert (result.baseline_s, result.method_s, result.pairs) == (6.0, 2.0, 5)
    assert str(result) == "3.00x (1.00–5.00, 5 pairs)"


def test_paired_speedup_alternates_order_and_syncs():
    calls, syncs = [], []
    bench.paired_speedup(lambda: calls.append("b"), lambda: calls.append("m"), pairs=4, warmup=1,
                         sync=lambda: syncs.append(1))
    assert calls == ["b", "m"] + ["b", "m", "m", "b", "b", "m", "m", "b"]
    assert len(syncs) == 2 * 8  # before and after every timed sample


def test_paired_speedup_min_time_repeats_short_calls(clock):
    baseline, method = Task(clock, (0.25,)), Task(clock, (1.0,))
    result = bench.paired_speedup(baseline, method, pairs=3, warmup=0, min_time=2.0)
    # One calibration call each, then every sample repeats its call to fill 2 s: 8 and 2 calls.
    assert (baseline.calls, method.calls) == (1 + 3 * 8, 1 + 3 * 2)
    assert (result.baseline_s, result.method_s, result.ratio) == (0.25, 1.0, 0.25)  # seconds per call


def test_paired_speedup_rejects_bad_arguments():
    with pytest.raises(ValueError, match="pairs"):
        bench.paired_speedup(lambda: None, lambda: None, pairs=0)


def test_count_flops_matches_analytic_vit_including_attention(tiny_vit, images):
    assert tiny_vit.blocks[0].attn.fused_attn  # the SDPA path, which torch scores as zero without our formula
    tokens = (IMG // PATCH) ** 2 + 1
    expected = analytic_vit_flops(BATCH, tokens)
    counted = bench.count_flops(tiny_vit, images)
    assert counted == pytest.approx(expected, rel=0.01)
    attention = BATCH * DEPTH * 4 * tokens**2 * DIM
    assert abs(counted - expected) < attention / 10  # attention is really in the count, not lost in the tolerance


def test_count_flops_same_for_every_sdpa_backend(tiny_vit, images):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.MATH):  # decomposes into bmm, which torch counts itself
        math_flops = bench.count_flops(tiny_vit, images)
    assert bench.count_flops(tiny_vit, images) == math_flops


def test_count_flops_includes_merge_matmuls():
    batch, length, dim = 2, 33, 16
    x = torch.randn(batch, length, dim)
    # tau = -1 merges every source, so the fusion matmul runs (a merge that merges nothing may skip it).
    flops = bench.count_flops(lambda t: mame.merge(t, tau=-1.0, num_special=1), x)
    m = n = (length - 1) // 2
    assert flops >= 2 * (2 * batch * m * n * dim)  # similarity S and W^F @ x_src


def test_peak_memory_sees_cpu_allocations():
    def allocate():
        big = torch.ones(1024, 1024)  # 4 MiB
        return big.sum()

    peak = bench.peak_memory(allocate)
    assert 4 * 2**20 <= peak < 8 * 2**20
    assert bench.peak_memory(lambda: None, "meta") is None


def test_tokens_per_block(tiny_vit, images):
    full = (IMG // PATCH) ** 2 + 1
    assert bench.tokens_per_block(tiny_vit) == [full] * DEPTH
    assert bench.tokens_per_block(tiny_vit, images) == [full] * DEPTH
    mame.patch.timm(tiny_vit, tau=-1.0, layers=DEPTH)
    counts = bench.tokens_per_block(tiny_vit, images)
    assert len(counts) == DEPTH and counts[0] < full and counts == sorted(counts, reverse=True)
    mame.unpatch(tiny_vit)


def test_block_tokens_counts_every_forward_and_unhooks(tiny_vit, images):
    full = (IMG // PATCH) ** 2 + 1
    with bench.BlockTokens(tiny_vit) as counter:
        assert counter.countable and counter.last == []  # nothing ran yet
        with torch.inference_mode():
            tiny_vit(images)
        assert counter.last == [full] * DEPTH
    assert all(not block._forward_hooks for block in tiny_vit.blocks)  # closed: timed forwards run unhooked
    patched = mame.patch.timm(tiny_vit, tau=-1.0, layers=DEPTH)
    with bench.BlockTokens(patched) as counter, torch.inference_mode():
        patched(images)
        assert counter.last == patched.mame.last_token_counts and counter.last[0] < full
    assert not bench.BlockTokens(torch.nn.Linear(2, 2)).countable
    with pytest.raises(ValueError, match="blocks"):
        bench.tokens_per_block(torch.nn.Linear(2, 2))
    mame.unpatch(tiny_vit)


def test_compare_returns_sane_fields(tiny_vit, images, clock):
    charge_block_tokens(tiny_vit, clock)
    variants = [bench.Variant("none", "none"), bench.Variant("MaMe τ=-1", "mame", {"tau": -1.0, "layers": DEPTH}),
                bench.Variant("MaMe τ=1", "mame", {"tau": 1.0, "layers": DEPTH}),
                bench.Variant("ToMe r=4", "tome", {"r": 4})]
    results = bench.compare(tiny_vit, images, variants, pairs=3, warmup=1, progress=False)
    assert not hasattr(tiny_vit, "mame")  # the caller's model is left as it was
    full = (IMG // PATCH) ** 2 + 1
    none, low, high, tome = results
    assert [r.name for r in results] == [v.name for v in variants]
    assert none.flop_ratio == 1.0 and none.tokens_per_block == [full] * DEPTH
    assert low.flop_ratio > 1 and low.final_tokens < full
    # tau = 1 merges nothing, but the merge's own matmuls are still counted: slightly below 1.
    assert high.final_tokens == full and 0.9 < high.flop_ratio <= 1.0
    assert tome.flop_ratio > 1 and tome.tokens_per_block == [full - 4, full - 8]
    for result in results:
        assert result.baseline_flops == none.flops
        # A block's fake time is its input token count: the unmodified model against this variant on the same batch.
        block_inputs = full + sum(result.tokens_per_block[:-1])
        assert result.speedup.ratios == (DEPTH * full / block_inputs,) * 3
        assert result.efficiency == pytest.approx(result.speedup.ratio / result.flop_ratio)
        assert result.peak_memory is not None and result.peak_memory > 0
    report = bench.results_to_json(results, bench.run_meta("tiny", images, load=0.25))
    meta = json.loads(json.dumps(report))["meta"]
    assert meta["batch"] == BATCH and meta["load_average_1min"] == 0.25
    assert report["results"][1]["speedup"]["pairs"] == 3
    assert bench.results_table(results).row_count == len(results)


def test_compare_rejects_patched_model_and_unknown_kind(tiny_vit, images):
    with pytest.raises(ValueError, match="kind"):
        bench.Variant("x", "nope")
    mame.patch.timm(tiny_vit, tau=0.8, layers=1)
    with pytest.raises(ValueError, match="unpatch"):
        bench.compare(tiny_vit, images, [bench.Variant("none", "none")], progress=False)


# ------------------------------------------------------------------------------------------------ merge-free bound
def _smooth_images(count: int) -> torch.Tensor:
    """Images that merge differently from one another: constant patches with a little noise, varied amounts."""
    gen = torch.Generator().manual_seed(3)
    base = torch.rand(count, 3, 1, 1, generator=gen).expand(count, 3, IMG, IMG)
    noise = torch.randn(count, 3, IMG, IMG, generator=gen) * torch.linspace(0.01, 2.0, count).view(-1, 1, 1, 1)
    return base + noise


@pytest.mark.parametrize("method", ["mame", "tome"])
def test_merge_free_copy_replays_every_forward_without_merging(tiny_vit, method, monkeypatch):
    from mame.baselines import tome

    x = _smooth_images(3)
    patched = mame.patch.timm(tiny_vit, tau=0.5, layers=DEPTH) if method == "mame" else tome.patch_timm(tiny_vit, r=3)
    run = bench.OneAtATime(patched)
    with torch.inference_mode():
        run(x)
        real_counts = run.counts
        free = bench.OneAtATime(bench.merge_free_copy(patched, lambda: run(x)))

        def no_merging(*args, **kwargs):
            raise AssertionError("the merge-free copy must not merge")

        monkeypatch.setattr("mame.blocks.merge", no_merging)
        monkeypatch.setattr("mame.baselines.tome.merge_weighted", no_merging)
        for _ in range(2):  # replays in call order, again and again
            out = free(x)
            assert free.counts == real_counts
            assert out.shape == (3, CLASSES)
        with pytest.raises(AssertionError, match="must not merge"):
            run(x)  # the original still merges for real
    if method == "mame":
        assert len({tuple(c) for c in real_counts}) > 1, "test images should merge differently"


def test_bound_timing_raises_pairs_and_sample_time_to_the_minimum():
    assert bench.bound_timing(3, 0.0) == {"pairs": bench.BOUND_PAIRS, "min_time": bench.BOUND_MIN_TIME}
    assert bench.bound_timing(21, 1.5) == {"pairs": 21, "min_time": 1.5}  # more careful settings are kept
    assert bench.BOUND_PAIRS >= 9 and bench.BOUND_MIN_TIME >= 0.2


def test_merge_free_copy_rejects_unpatched_model(tiny_vit):
    with pytest.raises(ValueError, match="no merging blocks"):
        bench.merge_free_copy(tiny_vit, lambda: None)


def test_compare_one_at_a_time_with_bound(tiny_vit, clock):
    charge_block_tokens(tiny_vit, clock)
    x = _smooth_images(3)
    variants = [bench.Variant("none", "none"), bench.Variant("MaMe", "mame", {"tau": 0.5, "layers": DEPTH}),
                bench.Variant("no merging blocks", "mame", {"tau": 0.5, "layers": 0})]
    none, mame_result, no_blocks = bench.compare(tiny_vit, x, variants, pairs=3, warmup=1, progress=False,
                                                 bound=True, one_at_a_time=True)
    assert none.bound is None and none.of_bound is None and no_blocks.bound is None
    # The bound is the denominator of "of bound": timed with at least BOUND_PAIRS pairs, the speed-up with the 3 asked.
    assert mame_result.bound is not None and mame_result.bound.pairs == bench.BOUND_PAIRS > 3
    assert mame_result.speedup.pairs == 3
    # "of bound" is timed directly, merge-free copy against the variant, in pairs of its own.
    assert mame_result.of_bound_pairs is not None and mame_result.of_bound_pairs.pairs == bench.BOUND_PAIRS
    assert mame_result.of_bound == mame_result.of_bound_pairs.ratio
    single_flops = bench.count_flops(tiny_vit, x[:1])
    assert none.flops == 3 * single_flops  # one forward per image
    patched = mame.patch.timm(tiny_vit, tau=0.5, layers=DEPTH)
    with torch.inference_mode():
        counts = []
        for i in range(3):
            patched(x[i : i + 1])
            counts.append(patched.mame.last_token_counts)
    assert mame_result.tokens_per_block == pytest.approx([sum(c) / 3 for c in zip(*counts)])
    # Fake time counts block input tokens, image by image; the merge-free copy runs the blocks on the same counts.
    full = (IMG // PATCH) ** 2 + 1
    block_inputs = sum(full + sum(c[:-1]) for c in counts)
    assert mame_result.speedup.ratio == mame_result.bound.ratio == 3 * DEPTH * full / block_inputs
    assert mame_result.of_bound == 1.0
    assert bench.results_table([none, mame_result]).columns[6].header == "merge-free bound"
    mame.unpatch(tiny_vit)


# ---------------------------------------------------------------------------------------------------------- load
def test_load_average_is_read_and_guarded(monkeypatch):
    monkeypatch.setattr(bench.load.os, "getloadavg", lambda: (1.5, 1.0, 0.5))
    assert bench.load_average() == 1.5
    assert bench.run_meta("tiny", torch.zeros(1, 3))["load_average_1min"] == 1.5

    def unavailable():
        raise OSError("no load average here")

    monkeypatch.setattr(bench.load.os, "getloadavg", unavailable)
    assert bench.load_average() is None
    monkeypatch.delattr(bench.load.os, "getloadavg")  # Windows has none at all
    assert bench.load_average() is None
    assert bench.run_meta("tiny", torch.zeros(1, 3))["load_average_1min"] is None


def test_high_load_warns_in_yellow(monkeypatch):
    from rich.console import Console

    assert bench.load_warning(None, 2) is None and bench.load_warning(1.0, 2) is None  # 0.5 x 2 threads = 1.0
    assert "load average 1.10" in bench.load_warning(1.1, 2)
    monkeypatch.setattr(bench.load.os, "getloadavg", lambda: (3.0, 0.0, 0.0))
    console = Console(record=True, width=300, file=io.StringIO(), force_terminal=True, color_system="standard")
    assert bench.report_load(console, threads=2) == 3.0
    styled = console.export_text(styles=True, clear=False)
    assert "load average (1 min): 3.00" in console.export_text() and "warning: load average 3.00" in styled.replace(
        "\x1b[0m", "").replace("\x1b[1;33m", "").replace("\x1b[33m", "")
    assert "\x1b[33m" in styled  # yellow
    quiet = Console(record=True, width=300, file=io.StringIO())
    monkeypatch.setattr(bench.load.os, "getloadavg", lambda: (0.2, 0.0, 0.0))
    bench.report_load(quiet, threads=2)
    assert "0.20" in quiet.export_text() and "warning" not in quiet.export_text()


def test_of_bound_is_the_merge_free_time_over_the_variant_time(tiny_vit, clock, monkeypatch):
    """With blocks charged by their tokens and every merge charged 50 fake seconds, "of bound" is exactly the
    merge-free time over the time with merges, measured in its own pairs."""
    from mame.blocks import MameMerge

    charge_block_tokens(tiny_vit, clock)
    real_merge = MameMerge.__call__

    def costly_merge(self, *args):
        clock.advance(50)
        return real_merge(self, *args)

    monkeypatch.setattr(MameMerge, "__call__", costly_merge)
    x = _smooth_images(1)  # one image: block inputs are its token counts, with no padding
    [result] = bench.compare(tiny_vit, x, [bench.Variant("MaMe", "mame", {"tau": 0.5, "layers": DEPTH})], pairs=3,
                             warmup=1, progress=False, bound=True, memory=False)
    patched = mame.patch.timm(tiny_vit, tau=0.5, layers=DEPTH)
    with torch.inference_mode():
        patched(x)
    full = (IMG // PATCH) ** 2 + 1
    counts = patched.mame.last_token_counts
    free_time = full + sum(counts[:-1])  # the blocks' input tokens
    assert result.of_bound == pytest.approx(free_time / (free_time + 50 * DEPTH))
    assert result.bound.ratio == pytest.approx(DEPTH * full / free_time)


def test_ragged_batch_reports_the_real_token_flop_ratio(tiny_vit, clock):
    """A per-sample batch that ends ragged is compared with the FLOP ratio of its images run alone (no padding);
    a batch that stays uniform (the paper's batch rule) reports none."""
    charge_block_tokens(tiny_vit, clock)
    x = _smooth_images(4)
    ragged, uniform = bench.compare(
        tiny_vit, x, [bench.Variant("per-sample", "mame", {"tau": 0.5, "layers": DEPTH}),
                      bench.Variant("any", "mame", {"tau": 0.5, "layers": DEPTH, "batch_rule": "any"})],
        pairs=1, warmup=0, progress=False, memory=False)
    alone = bench.count_flops(bench.OneAtATime(tiny_vit), x)
    patched = mame.patch.timm(tiny_vit, tau=0.5, layers=DEPTH)
    assert ragged.real_token_flop_ratio == pytest.approx(alone / bench.count_flops(bench.OneAtATime(patched), x))
    assert ragged.real_token_flop_ratio > ragged.flop_ratio  # the batch's own count includes its padding
    assert uniform.real_token_flop_ratio is None
    headers = [column.header for column in bench.results_table([ragged, uniform]).columns]
    assert "real-token FLOP ratio" in headers


def test_one_at_a_time_runs_each_padded_sample_without_its_padding():
    seen = []

    def model(input_ids, attention_mask, spatial_shapes):
        seen.append((tuple(input_ids.shape), tuple(attention_mask.shape), tuple(spatial_shapes.shape)))
        return input_ids.float().sum(1)

    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 1, 0]])
    inputs = {"input_ids": torch.arange(12).view(3, 4), "attention_mask": mask, "spatial_shapes": torch.ones(3, 2)}
    out = bench.OneAtATime(model)(**inputs)
    assert seen == [((1, 4), (1, 4), (1, 2)), ((1, 2), (1, 2), (1, 2)), ((1, 3), (1, 3), (1, 2))]
    assert out.tolist() == [6.0, 9.0, 27.0]
    rows = []
    bench.OneAtATime(lambda x: rows.append(x.shape) or x)(torch.zeros(2, 5))  # a batch tensor: row by row
    assert rows == [(1, 5), (1, 5)]
