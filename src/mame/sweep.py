"""`mame sweep`: accuracy, FLOP ratio, tokens and measured speed-up over a grid of settings (the paper's Figure 4).

A point is one method at one setting (`mame.methods.METHODS`: MaMe at τ on the first K blocks with a partition and
seed, ToMe at r, ...). Every point is written as one JSON line as soon as it is measured, keyed by its settings and
the data it was measured on, so an interrupted sweep resumes where it stopped and several sweeps (say, the τ grid,
then random partitions at one setting) can share one file. The model is frozen: each point extracts the features of
its patched copy once; the unmodified model's are extracted once per run and only when its point is not done yet.

Accuracy is a weighted k-NN (DINO's) and a logistic-regression probe on frozen features (`mame.evaluate`), or the
top-1 of a classifier on an image folder. FLOPs are counted and speed is timed on one batch of test images against
the unmodified model in this process (`mame.bench`): interleaved pairs, median ratio with its range.

    >>> points = grid(taus=[0.7, 0.8, 0.9], blocks=[4, 8, 12], baselines={"tome": [4, 8, 16]})
    >>> records = run(model, points, fashion_mnist_data(300, 300), "results.jsonl")
    >>> plot(records, "plots/")
"""

from __future__ import annotations

import copy
import functools
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from torch import nn

from mame.bench import BlockTokens, count_flops, load_average, paired_speedup
from mame.evaluate import knn_accuracy, probe_accuracy
from mame.methods import method

ACCURACY_KEYS = ("knn", "probe", "top1")  # what a point may report, fractions in [0, 1]


@dataclass(frozen=True)
class Point:
    """One method at one setting, e.g. ``Point("tome", {"r": 8})``."""

    method: str
    settings: dict[str, Any] = field(default_factory=dict)

    def key(self, context: dict[str, Any]) -> str:
        """The point's identity in a results file: method, settings and the data context, as sorted JSON."""
        return json.dumps({"method": self.method, **self.settings, **context}, sort_keys=True)

    @property
    def label(self) -> str:
        return method(self.method).describe(self.settings)


def parse_values(text: str) -> list[float]:
    """``"0.5:0.95:0.05"`` (start:stop:step, stop included) or ``"0.7,0.8,0.9"`` as a list of floats."""
    if ":" in text:
        start, stop, step = (float(part) for part in text.split(":"))
        if step <= 0 or stop < start:
            raise ValueError(f"a range is start:stop:step with step > 0 and stop >= start, got {text!r}")
        count = int(math.floor((stop - start) / step + 1e-9)) + 1
        return [round(start + i * step, 10) for i in range(count)]
    return [float(part) for part in text.split(",") if part.strip()]


def grid(*, taus: Sequence[float] = (), blocks: Sequence[int] = (), partitions: Sequence[str] = ("alternating",),
         seeds: int = 1, batch_rule: str = "per_sample",
         baselines: dict[str, Sequence[float]] | None = None) -> list[Point]:
    """The points of a sweep: the unmodified model first, then MaMe for every partition × blocks × τ (× seed for
    random partitions), then every baseline's values.

    A random or sequential partition merging in more than one block uses the paper's batch rule (``"any"``), which
    `mame.patch.timm` requires there; give ``batch_rule="any"`` to compare it with the alternating partition under
    the same rule.
    """
    points = [Point("none")]
    for partition in partitions:
        for count in blocks:
            for tau in taus:
                rule = "any" if partition != "alternating" and count > 1 else batch_rule
                for seed in range(seeds if partition == "random" else 1):
                    points.append(Point("mame", {"tau": float(tau), "blocks": int(count), "partition": partition,
                                                 "seed": seed, "batch_rule": rule}))
    for name, values in (baselines or {}).items():
        entry = method(name)
        points += [Point(name, {entry.param: value}) for value in values]
    return points


@dataclass
class SweepData:
    """Labelled images as model-ready batches, split into train (k-NN neighbours, probe fitting) and test.

    Attributes:
        name: shown in titles and recorded in every point's context.
        train_batches, test_batches: make a fresh iterator of float (B, 3, H, W) batches, in a fixed order.
        train_labels, test_labels: int64 labels of those images, in the same order.
        classifier: score the model's outputs as class logits (top-1) instead of features (k-NN and probe).
        timing: the batch that FLOPs and speed are measured on.
    """

    name: str
    train_batches: Callable[[], Iterator[torch.Tensor]]
    test_batches: Callable[[], Iterator[torch.Tensor]]
    train_labels: torch.Tensor
    test_labels: torch.Tensor
    timing: torch.Tensor
    classifier: bool = False


def labelled_data(model: nn.Module, dataset: str, n_train: int, n_test: int, *, seed: int = 0,
                  batch_size: int = 32) -> SweepData:
    """Fashion-MNIST, MNIST or digits (`mame.data.labelled_raw`) at the model's input size and normalisation: the same
    images and conversion as `mame.evaluate.evaluate_variants`."""
    from mame.data import labelled_raw, to_model_input
    from mame.evaluate import _input_size, _model_stats

    train, train_labels = labelled_raw(dataset, "train", n_train, seed)
    test, test_labels = labelled_raw(dataset, "test", n_test, seed)
    size, (mean, std) = _input_size(model), _model_stats(model)

    def batches(images: torch.Tensor) -> Callable[[], Iterator[torch.Tensor]]:
        # Converted one batch at a time: 300 images at 224 px are 180 MB as float32.
        return lambda: (to_model_input(chunk, size, mean, std) for chunk in images.split(batch_size))

    return SweepData(dataset, batches(train), batches(test), train_labels, test_labels,
                     to_model_input(test[:batch_size], size, mean, std))


def folder_data(model: nn.Module, root: str | Path, n_train: int, n_test: int, *, seed: int = 0,
                batch_size: int = 32, fit: str = "center_crop") -> SweepData:
    """An image folder ``root/<class>/*.jpg`` (`mame.zeroshot.image_folder`; label = the sorted folder's index),
    preprocessed by the model's data config. A model with a classifier head (``num_classes > 0``) is scored by top-1
    on ``n_test`` images; a backbone by k-NN and probe, fitted on ``n_train`` other images. The split is a seeded
    permutation of all images."""
    from PIL import Image

    from mame.data import preprocess
    from mame.zeroshot import image_folder

    folder = image_folder(root)
    order = torch.randperm(len(folder.paths), generator=torch.Generator().manual_seed(seed)).tolist()
    classifier = getattr(model, "num_classes", 0) > 0
    needed = n_test + (0 if classifier else n_train)
    if len(order) < needed:
        raise ValueError(f"{root} has {len(order)} images, fewer than the {n_test} test"
                         + ("" if classifier else f" and {n_train} train") + " images asked for")
    test_ids = order[:n_test]
    train_ids = [] if classifier else order[n_test:needed]

    def batches(ids: list[int]) -> Callable[[], Iterator[torch.Tensor]]:
        def make() -> Iterator[torch.Tensor]:
            for start in range(0, len(ids), batch_size):
                chunk = [Image.open(folder.paths[i]) for i in ids[start:start + batch_size]]
                yield preprocess(chunk, model=model, mode=fit)
        return make

    labels = torch.tensor(folder.labels)
    return SweepData(str(root), batches(train_ids), batches(test_ids), labels[train_ids], labels[test_ids],
                     next(batches(test_ids)()), classifier=classifier)


def _outputs(model: nn.Module, batches: Iterable[torch.Tensor], on_batch: Callable[[], None]
             ) -> tuple[torch.Tensor, list[float]]:
    """The model's outputs on every batch (float32, CPU) and its tokens after each block, mean over the images."""
    outputs, totals, seen = [], None, 0
    with BlockTokens(model) as counter, torch.inference_mode():
        for x in batches:
            outputs.append(model(x).float().cpu())
            counts = torch.tensor(counter.last or [math.nan]) * len(x)
            totals = counts if totals is None else totals + counts
            seen += len(x)
            on_batch()
    return torch.cat(outputs), (totals / seen).tolist()


def _accuracies(data: SweepData, train: torch.Tensor | None, test: torch.Tensor) -> dict[str, float]:
    if data.classifier:
        return {"top1": float((test.argmax(dim=1) == data.test_labels).float().mean())}
    return {"knn": knn_accuracy(train, data.train_labels, test, data.test_labels),
            "probe": probe_accuracy(train, data.train_labels, test, data.test_labels)}


def read_records(path: str | Path) -> list[dict[str, Any]]:
    """Every complete JSON line of a results file (a line cut short by an interruption is skipped)."""
    path = Path(path)
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def _append(path: Path, record: dict[str, Any]) -> None:
    text = path.read_text() if path.is_file() else ""
    with path.open("a") as handle:
        if text and not text.endswith("\n"):  # an interrupted write left half a line: start a fresh one
            handle.write("\n")
        handle.write(json.dumps(record) + "\n")
        handle.flush()


def run(model: nn.Module, points: Sequence[Point], data: SweepData, out: str | Path, *, context: dict | None = None,
        pairs: int = 3, progress: bool = True, console: Console | None = None) -> list[dict[str, Any]]:
    """Measure every point not yet in ``out`` and append each as a JSON line the moment it is done.

    Args:
        model: the unmodified model, eval mode (each point patches a deep copy).
        points: from `grid`.
        data: from `labelled_data` or `folder_data`.
        out: the JSON-lines file; points already in it (same key) are skipped.
        context: what else identifies the run (model name, data, sizes); part of every key.
        pairs: interleaved timing pairs per point.
    Returns:
        the records of ``points`` in order, old and new.
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    context = {"data": data.name, "n_train": len(data.train_labels), "n_test": len(data.test_labels),
               **(context or {})}
    done = {record["key"]: record for record in read_records(out) if "key" in record}
    todo = [point for point in points if point.key(context) not in done]
    baseline = copy.deepcopy(model).eval()
    batches_per_point = sum(1 for _ in data.test_batches()) + (0 if data.classifier else
                                                                sum(1 for _ in data.train_batches()))
    baseline_flops = count_flops(baseline, data.timing) if todo else 0
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console or Console(stderr=True), disable=not progress) as bar:
        overall = bar.add_task(f"sweep ({len(points) - len(todo)} of {len(points)} points done before)",
                               total=len(todo))
        for point in todo:
            task = bar.add_task(f"  {point.label}", total=batches_per_point)
            step = functools.partial(bar.advance, task)
            start = time.perf_counter()
            patched = method(point.method).apply(copy.deepcopy(baseline), point.settings)
            train = None if data.classifier else _outputs(patched, data.train_batches(), step)[0]
            test, tokens = _outputs(patched, data.test_batches(), step)
            record = {"key": point.key(context), "method": point.method, "label": point.label, **point.settings,
                      **context, **_accuracies(data, train, test), "tokens": tokens[-1], "tokens_per_block": tokens}
            if point.method == "none":
                record.update(flops=baseline_flops, flop_ratio=1.0, speedup=1.0, speedup_low=1.0, speedup_high=1.0)
            else:
                flops = count_flops(patched, data.timing)
                with torch.inference_mode():
                    speed = paired_speedup(lambda: baseline(data.timing), lambda: patched(data.timing), pairs=pairs,
                                           warmup=1)
                record.update(flops=flops, flop_ratio=baseline_flops / flops, speedup=speed.ratio,
                              speedup_low=speed.ratio_low, speedup_high=speed.ratio_high)
            # the load average at the end of the point: timings taken while other processes load the CPU mean little
            record.update(baseline_flops=baseline_flops, timing_batch=len(data.timing), pairs=pairs,
                          threads=torch.get_num_threads(), load_average_1min=load_average(),
                          seconds=time.perf_counter() - start)
            _append(out, record)
            done[record["key"]] = record
            bar.remove_task(task)
            bar.advance(overall)
    return [done[point.key(context)] for point in points]


def accuracy_keys(records: Sequence[dict[str, Any]]) -> list[str]:
    """The accuracy fields the records have (``knn``/``probe`` or ``top1``)."""
    return [key for key in ACCURACY_KEYS if any(key in record for record in records)]


def pareto_front(records: Sequence[dict[str, Any]], x: str, y: str) -> list[dict[str, Any]]:
    """The records no other record beats on both ``x`` and ``y`` (both larger is better), sorted by ``x``."""
    ordered = sorted(records, key=lambda r: (-r[x], -r[y]))
    front, best = [], -math.inf
    for record in ordered:
        if record[y] > best:
            front.append(record)
            best = record[y]
    return front[::-1]


def best_at(records: Sequence[dict[str, Any]], ratios: Sequence[float] = (1.5, 2.0, 3.0), metric: str = "knn"
            ) -> list[dict[str, Any]]:
    """For each FLOP ratio and method, the most accurate point that reaches at least that ratio.

    Returns:
        rows ``{"ratio", "method", "label", metric, "flop_ratio", "speedup"}``, best method first per ratio.
    """
    rows = []
    for ratio in ratios:
        found = []
        for name in dict.fromkeys(r["method"] for r in records if r["method"] != "none"):
            reaching = [r for r in records if r["method"] == name and r["flop_ratio"] >= ratio and metric in r]
            if reaching:
                best = max(reaching, key=lambda r: r[metric])
                found.append({"ratio": ratio, "method": name, "label": best["label"], metric: best[metric],
                              "flop_ratio": best["flop_ratio"], "speedup": best["speedup"]})
        rows += sorted(found, key=lambda row: -row[metric])
    return rows


def best_table(records: Sequence[dict[str, Any]], metric: str = "knn") -> Table:
    """`best_at` as a rich table (accuracies in %)."""
    reference = next((r[metric] for r in records if r["method"] == "none" and metric in r), None)
    table = Table(title=f"best {metric} accuracy at a FLOP ratio of at least ...")
    for header in ("FLOP ratio ≥", "method", "setting", f"{metric} %", "Δ vs unmodified", "FLOP ratio", "speed-up"):
        table.add_column(header, justify="left" if header in ("method", "setting") else "right")
    for row in best_at(records, metric=metric):
        delta = "" if reference is None else f"{100 * (row[metric] - reference):+.1f}"
        table.add_row(f"{row['ratio']:g}x", row["method"], row["label"], f"{100 * row[metric]:.1f}", delta,
                      f"{row['flop_ratio']:.2f}x", f"{row['speedup']:.2f}x")
    return table


def _alternating_series(records: Sequence[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """MaMe's alternating-partition points by (blocks, batch rule), each sorted by τ."""
    series: dict[str, list[dict[str, Any]]] = {}
    rules = {r.get("batch_rule") for r in records if r["method"] == "mame"}
    for record in records:
        if record["method"] == "mame" and record.get("partition") == "alternating":
            name = f"MaMe {record['blocks']} blocks" + (f" ({record['batch_rule']})" if len(rules) > 1 else "")
            series.setdefault(name, []).append(record)
    order = sorted(series, key=lambda name: (series[name][0]["blocks"], series[name][0]["batch_rule"]))
    return {name: sorted(series[name], key=lambda r: r["tau"]) for name in order}


def plot(records: Sequence[dict[str, Any]], out_dir: str | Path, prefix: str = "sweep") -> list[Path]:
    """Figure-4-style plots of sweep records, as PNGs in ``out_dir`` (needs matplotlib, ``mame[viz]``):

    - ``<prefix>_tau.png``: accuracy and speed-up against τ, one line per block count (alternating partition);
    - ``<prefix>_pareto.png``: accuracy against FLOP ratio and against measured speed-up, every method's points
      on the same axes, the Pareto front over all of them drawn and circled;
    - ``<prefix>_partitions.png`` (when there are random partitions): box plots of accuracy and speed-up over the
      seeds of each setting, the alternating partition at the same setting marked.

    Returns:
        the paths written.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    metrics = accuracy_keys(records)
    reference = next((r for r in records if r["method"] == "none"), None)
    series = _alternating_series(records)
    written = []
    # one colour per series across all figures; matplotlib's default cycle repeats after 10, a sweep has more
    palette = [*plt.get_cmap("tab10").colors, *plt.get_cmap("Dark2").colors]
    colours: dict[str, Any] = {}

    def colour(name: str) -> Any:
        return colours.setdefault(name, palette[len(colours) % len(palette)])

    if series:
        figure, axes = plt.subplots(1, len(metrics) + 1, figsize=(4.2 * (len(metrics) + 1), 3.6), squeeze=False)
        for name, points in series.items():
            taus = [r["tau"] for r in points]
            for axis, metric in zip(axes[0], metrics):
                axis.plot(taus, [100 * r[metric] for r in points], marker="o", label=name, color=colour(name))
            axes[0][-1].plot(taus, [r["speedup"] for r in points], marker="o", label=name, color=colour(name))
        for axis, metric in zip(axes[0], metrics):
            if reference is not None:
                axis.axhline(100 * reference[metric], color="grey", linestyle="--", label="unmodified")
            axis.set(xlabel="τ", ylabel=f"{metric} accuracy (%)", title=f"{metric} accuracy vs τ")
        axes[0][-1].axhline(1.0, color="grey", linestyle="--")
        axes[0][-1].set(xlabel="τ", ylabel="measured speed-up (x)", title="speed-up vs τ")
        axes[0][0].legend(fontsize=7)
        written.append(_save(figure, out_dir / f"{prefix}_tau.png", plt))

    scored = [r for r in records if all(m in r for m in metrics)]
    if scored:
        figure, axes = plt.subplots(len(metrics), 2, figsize=(10, 3.8 * len(metrics)), squeeze=False)
        groups: dict[str, list[dict[str, Any]]] = dict(series)
        for record in scored:
            if record["method"] not in ("mame",):
                groups.setdefault(method(record["method"]).label, []).append(record)
            elif record.get("partition") != "alternating":
                groups.setdefault(f"MaMe {record['partition']} partition", []).append(record)
        for row, metric in enumerate(metrics):
            for column, x in enumerate(("flop_ratio", "speedup")):
                axis = axes[row][column]
                for name, points in groups.items():
                    ordered = sorted(points, key=lambda r: r[x])
                    style = "o" if name == "unmodified" else ("x" if "partition" in name else "o-")
                    axis.plot([r[x] for r in ordered], [100 * r[metric] for r in ordered], style, label=name,
                              markersize=5, color=colour(name))
                if x == "flop_ratio":  # the budgets the summary table (`best_at`) reads the front at
                    for ratio in (1.5, 2.0, 3.0):
                        axis.axvline(ratio, color="grey", linewidth=0.6, linestyle=":")
                front = pareto_front(scored, x, metric)
                axis.step([r[x] for r in front], [100 * r[metric] for r in front], where="pre", color="black",
                          linewidth=1, alpha=0.6, label="Pareto front")
                axis.scatter([r[x] for r in front], [100 * r[metric] for r in front], s=90, facecolors="none",
                             edgecolors="black")
                axis.set(xlabel="FLOP ratio (x)" if x == "flop_ratio" else "measured speed-up (x)",
                         ylabel=f"{metric} accuracy (%)", title=f"{metric} accuracy vs "
                         f"{'FLOP ratio' if x == 'flop_ratio' else 'measured speed-up'}")
        axes[0][0].legend(fontsize=7)
        written.append(_save(figure, out_dir / f"{prefix}_pareto.png", plt))

    settings = _random_settings(records)
    if settings:
        figure, axes = plt.subplots(1, len(metrics) + 1, figsize=(4.2 * (len(metrics) + 1), 3.8), squeeze=False)
        for axis, field_name in zip(axes[0], [*metrics, "speedup"]):
            scale = 1 if field_name == "speedup" else 100
            axis.boxplot([[scale * r[field_name] for r in seeds] for seeds, _ in settings.values()])
            labelled = set()
            for position, (_, reference_point) in enumerate(settings.values(), start=1):
                if reference_point is not None:
                    label = f"alternating ({reference_point['batch_rule']})"
                    axis.plot(position, scale * reference_point[field_name], "r*", markersize=12,
                              label=None if label in labelled else label)
                    labelled.add(label)
            axis.set_xticks(range(1, len(settings) + 1), list(settings), fontsize=7)
            axis.set(ylabel="measured speed-up (x)" if field_name == "speedup" else f"{field_name} accuracy (%)",
                     title=f"random partitions: {field_name}")
        if any(reference_point is not None for _, reference_point in settings.values()):
            axes[0][0].legend(fontsize=7)
        written.append(_save(figure, out_dir / f"{prefix}_partitions.png", plt))
    return written


def _random_settings(records: Sequence[dict[str, Any]]) -> dict[str, tuple[list[dict], dict | None]]:
    """Random-partition records per (τ, blocks, batch rule), with the alternating record of the same setting (the
    same batch rule if there is one, else any)."""
    settings: dict[str, tuple[list[dict], dict | None]] = {}
    for record in records:
        if record["method"] == "mame" and record.get("partition") == "random":
            same = (record["tau"], record["blocks"], record["batch_rule"])
            name = f"τ={same[0]:g}, {same[1]} blocks\n({same[2]})"
            alternating = sorted((r for r in records if r["method"] == "mame" and r.get("partition") == "alternating"
                                  and (r["tau"], r["blocks"]) == same[:2]), key=lambda r: r["batch_rule"] != same[2])
            alternating = alternating[0] if alternating else None
            settings.setdefault(name, ([], alternating))[0].append(record)
    return settings


def _save(figure, path: Path, plt) -> Path:
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


__all__ = ["Point", "SweepData", "accuracy_keys", "best_at", "best_table", "folder_data", "grid",
           "labelled_data", "parse_values", "pareto_front", "plot", "read_records", "run"]
