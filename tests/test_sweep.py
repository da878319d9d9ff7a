"""`mame sweep`: the grid, one JSON line per point, resuming without redoing points, the plots and the summaries."""

import copy
import json

import pytest
import torch

import mame
from mame import sweep
from mame.methods import METHODS
from test_data import needs_fashion_mnist

pytestmark = pytest.mark.usefixtures("one_thread_for_module")



def _data(n_train: int = 16, n_test: int = 8) -> sweep.SweepData:
    """Random labelled 32 px images in batches of 8: enough for k-NN and the probe to run."""
    generator = torch.Generator().manual_seed(0)
    train = torch.randn(n_train, 3, 32, 32, generator=generator)
    test = torch.randn(n_test, 3, 32, 32, generator=generator)
    labels = torch.arange(n_train + n_test) % 2
    return sweep.SweepData("random", lambda: iter(train.split(8)), lambda: iter(test.split(8)), labels[:n_train],
                           labels[n_train:], test)


def test_parse_values_ranges_include_their_stop():
    assert sweep.parse_values("0.5:0.95:0.05") == pytest.approx([0.5 + 0.05 * i for i in range(10)])
    assert sweep.parse_values("0.7,0.9") == [0.7, 0.9]
    with pytest.raises(ValueError):
        sweep.parse_values("0.9:0.5:0.1")


def test_grid_counts_partitions_seeds_and_baselines():
    points = sweep.grid(taus=[0.7, 0.9], blocks=[1, 4], partitions=["alternating", "random"], seeds=3,
                        baselines={"tome": [2, 4]})
    assert len(points) == 1 + 2 * 2 + 2 * 2 * 3 + 2
    assert points[0].method == "none"
    random_rules = {p.settings["blocks"]: p.settings["batch_rule"] for p in points
                    if p.settings.get("partition") == "random"}
    assert random_rules == {1: "per_sample", 4: "any"}  # several merging blocks need the paper's rule
    assert [p.settings for p in points[-2:]] == [{"r": 2}, {"r": 4}]
    assert len({p.key({}) for p in points}) == len(points)


def test_sweep_writes_a_line_per_point_and_resumes(tiny_vit, tmp_path, monkeypatch):
    points = sweep.grid(taus=[0.2, 0.6], blocks=[4], partitions=["alternating", "random"], seeds=2,
                        baselines={"tome": [2], "evit": [0.5], "pitome": [2]})
    out = tmp_path / "results.jsonl"
    calls = []
    outputs = sweep._outputs
    monkeypatch.setattr(sweep, "_outputs", lambda *args: calls.append(1) or outputs(*args))
    data = _data()
    sweep.run(tiny_vit, points[:5], data, out, context={"model": "tiny"}, pairs=1, progress=False)
    assert len(out.read_text().splitlines()) == 5 and len(calls) == 10  # train and test of each point
    with out.open("a") as handle:
        handle.write('{"key": "cut short')  # an interrupted write
    records = sweep.run(tiny_vit, points, data, out, context={"model": "tiny"}, pairs=1, progress=False)
    assert len(calls) == 2 * len(points)  # only the points not done before
    assert len(sweep.read_records(out)) == len(points) == len(records)
    for record in records:
        assert 0 <= record["knn"] <= 1 and 0 <= record["probe"] <= 1
        assert record["flop_ratio"] > 0 and record["speedup"] > 0 and len(record["tokens_per_block"]) == 4
        assert "load_average_1min" in record
    by_label = {record["label"]: record for record in records}
    assert by_label["unmodified"]["tokens"] == 17 and by_label["unmodified"]["flop_ratio"] == 1
    assert by_label["ToMe r=2"]["tokens"] == 17 - 4 * 2
    assert by_label["MaMe τ=0.2, 4 blocks"]["flop_ratio"] > 1
    sweep.run(tiny_vit, points, data, out, context={"model": "tiny"}, pairs=1, progress=False)
    assert len(calls) == 2 * len(points)  # a finished sweep does nothing
    sweep.run(tiny_vit, points[:1], data, out, context={"model": "other"}, pairs=1, progress=False)
    assert len(calls) == 2 * len(points) + 2  # another context is another point

    written = sweep.plot(records, tmp_path / "plots", prefix="s")
    assert sorted(path.name for path in written) == ["s_pareto.png", "s_partitions.png", "s_tau.png"]
    assert all(path.stat().st_size > 10_000 for path in written)


def test_pareto_front_and_best_at_on_hand_made_points():
    records = [
        {"method": "none", "label": "unmodified", "flop_ratio": 1.0, "speedup": 1.0, "knn": 0.90},
        {"method": "mame", "label": "a", "flop_ratio": 1.6, "speedup": 1.4, "knn": 0.88},
        {"method": "mame", "label": "b", "flop_ratio": 2.2, "speedup": 1.8, "knn": 0.80},
        {"method": "tome", "label": "c", "flop_ratio": 1.7, "speedup": 1.5, "knn": 0.85},  # beats a on FLOPs
        {"method": "tome", "label": "d", "flop_ratio": 1.5, "speedup": 1.3, "knn": 0.84},  # dominated by a
        {"method": "tome", "label": "e", "flop_ratio": 3.1, "speedup": 2.5, "knn": 0.60},
    ]
    assert [r["label"] for r in sweep.pareto_front(records, "flop_ratio", "knn")] == [
        "unmodified", "a", "c", "b", "e"]
    rows = sweep.best_at(records)
    assert [(row["ratio"], row["label"]) for row in rows] == [(1.5, "a"), (1.5, "c"), (2.0, "b"), (2.0, "e"),
                                                            (3.0, "e")]


def test_every_registered_method_patches_and_unpatches(tiny_vit):
    x = torch.randn(2, 3, 32, 32)
    with torch.inference_mode():
        reference = tiny_vit(x)
    for name, entry in METHODS.items():
        settings = {"tau": 0.5, "blocks": 2} if name == "mame" else ({entry.param: entry.grid[0]} if entry.param
                                                                      else {})
        patched = entry.apply(tiny_vit, settings)
        with torch.inference_mode():
            patched(x)
        mame.unpatch(tiny_vit)
        with torch.inference_mode():
            assert torch.equal(tiny_vit(x), reference), name


@needs_fashion_mnist
def test_fashion_mnist_data_at_the_model_size(tiny_vit):
    data = sweep.labelled_data(tiny_vit, "fashion_mnist", 20, 10, batch_size=8)
    batches = list(data.train_batches())
    assert [len(b) for b in batches] == [8, 8, 4] and batches[0].shape[1:] == (3, 32, 32)
    assert data.timing.shape == (8, 3, 32, 32) and len(data.test_labels) == 10


def test_folder_data_splits_a_class_folder(tiny_vit, tmp_path):
    from PIL import Image

    for label in ("cat", "dog"):
        (tmp_path / label).mkdir()
        for i in range(5):
            Image.new("RGB", (40, 30), (40 * i, 100 if label == "cat" else 200, 0)).save(tmp_path / label / f"{i}.png")
    data = sweep.folder_data(tiny_vit, tmp_path, 6, 4, batch_size=4)
    assert len(data.train_labels) == 6 and len(data.test_labels) == 4 and not data.classifier
    assert sum(len(b) for b in data.test_batches()) == 4
    with pytest.raises(ValueError):
        sweep.folder_data(tiny_vit, tmp_path, 20, 4)


def test_records_are_plain_json_keyed_by_their_settings(tiny_vit, tmp_path):
    out = tmp_path / "r.jsonl"
    sweep.run(tiny_vit, sweep.grid(taus=[0.5], blocks=[1], baselines={"tome": [1]}), _data(), out, pairs=1,
              progress=False)
    records = [json.loads(line) for line in out.read_text().splitlines()]
    keys = [json.loads(record["key"]) for record in records]
    assert [key["method"] for key in keys] == ["none", "mame", "tome"]
    assert keys[1]["tau"] == 0.5 and keys[1]["blocks"] == 1 and keys[2]["r"] == 1
    assert all(key["data"] == "random" and key["n_train"] == 16 for key in keys)


def test_random_partition_seeds_differ(tiny_vit):
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    outputs = []
    for seed in (0, 1, 0):
        settings = {"tau": -0.5, "blocks": 2, "partition": "random", "seed": seed, "batch_rule": "any"}
        patched = METHODS["mame"].apply(copy.deepcopy(tiny_vit), settings)
        with torch.inference_mode():
            outputs.append(patched(x))
    assert torch.equal(outputs[0], outputs[2]) and not torch.allclose(outputs[0], outputs[1])  # the seed is used
