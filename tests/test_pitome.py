"""PiToMe baseline (`mame.baselines.pitome`): a hand-computed merge (energies, protected set, bipartite matching,
size-weighted values) and the patched tiny ViT against the paper's algorithm written out with loops."""

from __future__ import annotations

import math

import pytest
import torch

from mame.baselines import pitome
from reference_vit import images, reference_features, tiny_vit

# Hand case: a class token and six tokens whose features point at angles 0, 10, 30, 90, 200 and 40 degrees (cosines
# are cosines of angle differences). Margin m = .5, alpha = 1: f(s) = s - .5 for s >= .5, else exp(s - .5) - 1.
# Energy of t0 (0 deg): cosines 1, .9848, .8660, 0, -.9397, .7660 -> (.5 + .4848 + .3660 + (e^-.5 - 1)
#   + (e^-1.4397 - 1) + .2660) / 6 = .0767; likewise t1 .1231, t2 .1695, t3 -.0997, t4 -.5237, t5 .1661.
# Energy order t2, t5, t1, t0, t3, t4. r = 2: candidates t2, t5, t1, t0 -> A = (t2, t1), B = (t5, t0); the isolated
# t3 (90 deg) and t4 (200 deg) are protected. t2 (30 deg) joins t5 (40 deg; cos .9848 > .8660 to t0), t1 (10 deg)
# joins t0 (cos .9848 > .8660 to t5).
# Values (sizes): t0 (1, 0) (1), t1 (3, 0) (3), t2 (0, 2) (1), t3 (5, 5) (2), t4 (7, 7) (1), t5 (0, 4) (1):
#   t0' = (1 (1, 0) + 3 (3, 0)) / 4 = (2.5, 0), size 4;  t5' = ((0, 4) + (0, 2)) / 2 = (0, 3), size 2.
# Output [c, t3, t4, t0', t5'] with sizes [1, 2, 1, 4, 2].
ANGLES = [0.0, 10.0, 30.0, 90.0, 200.0, 40.0]
HAND_ENERGY = [0.0767, 0.1231, 0.1695, -0.0997, -0.5237, 0.1661]
HAND_X = torch.tensor([[[9.0, 9.0], [1.0, 0.0], [3.0, 0.0], [0.0, 2.0], [5.0, 5.0], [7.0, 7.0], [0.0, 4.0]]],
                      dtype=torch.float64)
HAND_SIZES = torch.tensor([[1.0, 1.0, 3.0, 1.0, 2.0, 1.0, 1.0]])


def hand_metric() -> torch.Tensor:
    """Unit vectors at ``ANGLES`` (scaled differently: cosines ignore length), after a class token that points
    along t3: were it part of the graph, it would change every energy."""
    radians = torch.tensor([90.0] + ANGLES, dtype=torch.float64).deg2rad()
    scale = torch.arange(1, 8, dtype=torch.float64).unsqueeze(-1)
    return (torch.stack([radians.cos(), radians.sin()], dim=-1) * scale).unsqueeze(0)


def test_energy_scores_by_hand():
    unit = torch.nn.functional.normalize(hand_metric()[:, 1:], dim=-1)
    energy = pitome.energy_scores(unit @ unit.mT, margin=0.5)
    torch.testing.assert_close(energy[0], torch.tensor(HAND_ENERGY, dtype=torch.float64), atol=1e-4, rtol=0)


def test_pitome_merge_by_hand():
    y, sizes = pitome.pitome_merge(HAND_X, HAND_SIZES, hand_metric(), r=2, num_special=1, margin=0.5)
    expected = torch.tensor([[9.0, 9.0], [5.0, 5.0], [7.0, 7.0], [2.5, 0.0], [0.0, 3.0]], dtype=torch.float64)
    torch.testing.assert_close(y[0], expected, atol=1e-12, rtol=0)
    torch.testing.assert_close(sizes, torch.tensor([[1.0, 2.0, 1.0, 4.0, 2.0]]))


def test_pitome_merge_caps_r_at_half_and_r_zero_is_identity():
    y, sizes = pitome.pitome_merge(HAND_X, HAND_SIZES, hand_metric(), r=9, num_special=1, margin=0.5)
    assert y.shape[1] == 1 + 3 and float(sizes.sum()) == float(HAND_SIZES.sum())  # 6 tokens: 3 merges at most
    y, sizes = pitome.pitome_merge(HAND_X, HAND_SIZES, hand_metric(), r=0, num_special=1, margin=0.5)
    assert y is HAND_X and sizes is HAND_SIZES


def test_margin_schedule():
    assert pitome.margins(None, 4) == pytest.approx((0.9, 0.675, 0.45, 0.225))
    assert pitome.margins(0.3, 2) == (0.3, 0.3)
    assert pitome.margins([0.5, 0.1], 2) == (0.5, 0.1)
    for bad in ([0.5], 2.0, "0.5", True):
        with pytest.raises(ValueError, match="margin"):
            pitome.margins(bad, 2)


def cosine(u: torch.Tensor, v: torch.Tensor) -> float:
    return float(torch.dot(u, v) / (u.norm() * v.norm()))


def brute_pitome(r: int, depth: int, num_special: int = 1):
    """PiToMe by loops over each sample: energies from the keys' cosines (mean over heads), margin
    0.9 - 0.9 l / depth; the 2r highest alternate A, B; each A joins its most similar B (size-weighted)."""
    def reduce(index, t, sizes, probs, keys):
        metric = keys.mean(2)[:, num_special:]
        count = metric.shape[1]
        merges = min(r, count // 2)
        margin = 0.9 - 0.9 * index / depth
        outs, out_sizes = [], []
        for b in range(t.shape[0]):
            cos = [[cosine(metric[b, i], metric[b, j]) for j in range(count)] for i in range(count)]
            energy = [sum(s - margin if s >= margin else math.exp(s - margin) - 1 for s in row) / count for row in cos]
            order = sorted(range(count), key=lambda i: -energy[i])
            assert min(energy[order[k]] - energy[order[k + 1]] for k in range(2 * merges)) > 1e-6  # no near-tie
            set_a, set_b = order[0 : 2 * merges : 2], sorted(order[1 : 2 * merges : 2])
            groups = {j: [j] for j in set_b}
            for i in set_a:
                groups[max(set_b, key=lambda j: cos[i][j])].append(i)
            rows = [t[b, i] for i in range(num_special)] + [t[b, num_special + i] for i in sorted(order[2 * merges:])]
            row_sizes = [sizes[b, i] for i in range(num_special)]
            row_sizes += [sizes[b, num_special + i] for i in sorted(order[2 * merges:])]
            for j in set_b:
                total = sum(sizes[b, num_special + i] for i in groups[j])
                rows.append(sum(sizes[b, num_special + i] * t[b, num_special + i] for i in groups[j]) / total)
                row_sizes.append(total)
            outs.append(torch.stack(rows))
            out_sizes.append(torch.stack(row_sizes))
        return torch.stack(outs), torch.stack(out_sizes)
    return reduce


@pytest.mark.parametrize("proportional", [True, False])
def test_patched_tiny_vit_matches_the_algorithm_by_hand(proportional):
    model = tiny_vit()
    x = images(3)
    with torch.no_grad():
        ref, ref_sizes, counts = reference_features(model, x, brute_pitome(3, 4), proportional)
        pitome.patch_timm(model, r=3, proportional_attention=proportional)
        feat = model.forward_features(x)
        out = model(x)
    assert counts == [14, 11, 8, 5] and model.mame.last_token_counts == counts
    torch.testing.assert_close(feat, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(model.mame.state.sizes, ref_sizes)
    assert bool(torch.isfinite(out).all())


def test_registers_never_merge_and_layers_restrict():
    model = tiny_vit(reg_tokens=2)
    with torch.no_grad():
        pitome.patch_timm(model, r=4, layers=[0, 2])
        feat = model.forward_features(images())
    assert model.mame.last_token_counts == [3 + 12, 3 + 12, 3 + 8, 3 + 8]
    torch.testing.assert_close(model.mame.state.sizes[:, :3], torch.ones(2, 3))
    torch.testing.assert_close(model.mame.state.sizes[:, 3:].sum(1), torch.full((2,), 16.0))
    assert feat.shape == (2, 11, 192)


def test_r_zero_equals_unpatched():
    model = tiny_vit()
    x = images()
    with torch.no_grad():
        ref = model(x)
        pitome.patch_timm(model, r=0)
        torch.testing.assert_close(model(x), ref, atol=1e-5, rtol=0)
