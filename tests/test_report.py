"""`mame report`: one self-contained HTML page with inlined pictures and tables, and its headless-Chromium check."""

import base64
import importlib.util
import io
import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from mame import report
from mame.cli import app

CHECK_SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "check_report.py"


def _sweep_records() -> list[dict]:
    """A hand-made sweep: the unmodified model, two MaMe points, a random partition and two ToMe points."""
    base = {"model": "tiny", "data": "random", "n_train": 16, "n_test": 8, "pairs": 1, "timing_batch": 8,
            "threads": 1, "tokens_per_block": [17, 9], "speedup_low": 1.0, "speedup_high": 1.2}
    points = [("none", {}, "unmodified", 0.90, 1.0, 1.0), ("mame", {"tau": 0.8, "blocks": 2}, "MaMe τ=0.8", 0.88,
                                                          1.6, 1.4),
              ("mame", {"tau": 0.6, "blocks": 2}, "MaMe τ=0.6", 0.80, 2.3, 1.9),
              ("mame", {"tau": 0.8, "blocks": 2, "partition": "random", "seed": 1, "batch_rule": "any"},
               "MaMe τ=0.8 random", 0.87, 1.4, 1.2),
              ("tome", {"r": 4}, "ToMe r=4", 0.85, 1.7, 1.5), ("tome", {"r": 8}, "ToMe r=8", 0.70, 3.2, 2.4)]
    records = []
    for method, settings, label, knn, flop_ratio, speedup in points:
        if method == "mame":
            settings = {"partition": "alternating", "seed": 0, "batch_rule": "per_sample", **settings}
        records.append({**base, "key": json.dumps([method, settings]), "method": method, "label": label, **settings,
                        "knn": knn, "probe": knn - 0.01, "tokens": 9.0, "flop_ratio": flop_ratio,
                        "speedup": speedup})
    return records


@pytest.fixture
def inputs(tmp_path: Path) -> list[Path]:
    sweep_file = tmp_path / "sweep.jsonl"
    sweep_file.write_text("".join(json.dumps(record) + "\n" for record in _sweep_records()))
    bench_file = tmp_path / "bench.json"
    bench_file.write_text(json.dumps({"meta": {"model": "tiny", "batch": 4},
                                      "results": [{"name": "MaMe τ=0.8", "flop_ratio": 2.01,
                                                   "speedup": {"ratio": 1.73, "pairs": 3},
                                                   "tokens_per_block": [1.0] * 40}]}))
    maps = tmp_path / "maps"
    maps.mkdir()
    rng = np.random.default_rng(0)
    for name in ("a", "b"):
        Image.fromarray(rng.integers(0, 256, (40, 60, 3), dtype=np.uint8)).save(maps / f"{name}.png")
    return [sweep_file, bench_file, maps]


def _inlined(page: str) -> list[Image.Image]:
    return [Image.open(io.BytesIO(base64.b64decode(data)))
            for data in re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)]


def test_report_inlines_pictures_and_tables(inputs, tmp_path):
    out = report.build(inputs, tmp_path / "out" / "report.html", title="tiny run")
    page = out.read_text()
    pictures = _inlined(page)
    # three sweep plots (τ, Pareto, partitions) and the two pictures of the folder
    assert len(pictures) == 5 and {picture.size for picture in pictures[3:]} == {(60, 40)}
    assert page.count("<table") == 2 + 1 + 2  # best kNN, best probe, every point; bench meta and results
    assert "<title>tiny run</title>" in page
    assert not re.search(r'(src|href)="(?!data:)', page) and "<script" not in page  # nothing to fetch
    # the best point at 2x FLOP ratio is MaMe τ=0.6 (80 %, -10 points), ToMe r=8 the only one at 3x
    text = '<td class="text">'
    assert f"{text}2x</td>{text}mame</td>{text}MaMe τ=0.6</td><td>80</td><td>-10</td>" in page
    assert f"{text}3x</td>{text}tome</td>" in page
    assert "speedup.ratio" in page and "1.73" in page  # nested bench fields, one level deep
    assert "tokens_per_block" not in page  # long lists are left out of generic tables


def test_report_refuses_missing_and_unknown_inputs(tmp_path):
    with pytest.raises(FileNotFoundError):
        report.build([tmp_path / "nope.jsonl"], tmp_path / "r.html")
    other = tmp_path / "notes.txt"
    other.write_text("hello")
    with pytest.raises(ValueError):
        report.build([other], tmp_path / "r.html")


def test_report_command(inputs, tmp_path):
    out = tmp_path / "cli.html"
    result = CliRunner().invoke(app, ["report", *map(str, inputs), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert len(_inlined(out.read_text())) == 5
    result = CliRunner().invoke(app, ["report", str(tmp_path / "missing.json"), "--out", str(out)])
    assert result.exit_code == 2 and "missing.json" in result.output


def _check_module():
    spec = importlib.util.spec_from_file_location("check_report", CHECK_SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_blank_screenshots_are_caught(tmp_path):
    check = _check_module()
    white = tmp_path / "white.png"
    Image.new("RGB", (200, 100), (255, 255, 255)).save(white)
    assert "not white" in check.blank_reason(white)
    text_only = tmp_path / "text.png"
    picture = Image.new("RGB", (200, 100), (255, 255, 255))
    picture.paste((0, 0, 0), (0, 0, 200, 20))
    picture.save(text_only)
    assert "colours" in check.blank_reason(text_only)
    rich = tmp_path / "rich.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (100, 200, 3), dtype=np.uint8)).save(rich)
    assert check.blank_reason(rich) is None


# CI installs chromium (.ci/run), so there a missing browser must fail, not skip.
@pytest.mark.skipif(shutil.which("chromium") is None and not os.environ.get("CI"),
                    reason="needs Debian's chromium (apt-get install -y chromium)")
def test_chromium_shows_the_report(inputs, tmp_path):
    page = report.build(inputs, tmp_path / "report.html")
    assert _check_module().main([str(page), "--screenshot", str(tmp_path / "shot.png"), "--height", "1500"]) == 0
    empty = tmp_path / "empty.html"
    empty.write_text("<!DOCTYPE html><html><body></body></html>")
    assert _check_module().main([str(empty), "--screenshot", str(tmp_path / "empty.png"), "--height", "600"]) == 1
