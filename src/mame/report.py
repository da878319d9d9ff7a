"""`mame report`: one self-contained HTML page of bench, eval, sweep and viz results, readable offline.

Every picture is inlined as a base64 PNG and the page has no scripts, fonts or links to fetch, so it can be mailed,
archived or opened from disk. What each input becomes:

- a ``.png`` (e.g. from `mame viz`): the picture, captioned with its file name;
- a sweep's JSON lines (`mame sweep`): the best point of each method at 1.5x, 2x and 3x FLOP ratio, every point in a
  table and the sweep's plots (drawn again from the records, `mame.sweep.plot`);
- any other JSON lines, or a ``{"meta": ..., "results": [...]}`` JSON (`mame bench --json`, `mame eval --json`):
  the metadata and a table of the results' numbers (nested values one level deep, e.g. ``speedup.ratio``);
- a folder: everything above that it holds, in name order.
"""

from __future__ import annotations

import base64
import html
import json
import tempfile
from pathlib import Path
from typing import Any, Iterable, Sequence

from mame import sweep

MAX_COLUMNS = 16  # a generic table shows the first columns only: wider tables do not fit a page

_STYLE = """
body { font-family: sans-serif; margin: 2em auto; max-width: 1250px; color: #222; }
h1 { border-bottom: 2px solid #444; } h2 { margin-top: 2em; border-bottom: 1px solid #bbb; }
table { border-collapse: collapse; margin: 0.8em 0; font-size: 13px; }
th, td { border: 1px solid #ccc; padding: 3px 7px; text-align: right; }
th { background: #eee; } td.text { text-align: left; }
figure { display: inline-block; margin: 0.5em; } img { max-width: 100%; border: 1px solid #ddd; }
figcaption { font-size: 12px; color: #555; } p.note { color: #555; font-size: 13px; }
"""


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (list, tuple)):
        return ", ".join(_cell(item) for item in value[:12]) + (" …" if len(value) > 12 else "")
    return "" if value is None else str(value)


def table(rows: Sequence[dict[str, Any]], columns: Sequence[str] | None = None) -> str:
    """An HTML table of ``rows`` (numbers right-aligned, text left); ``columns`` default to the keys in order of
    first appearance."""
    columns = list(columns or dict.fromkeys(key for row in rows for key in row))
    head = "".join(f"<th>{html.escape(column)}</th>" for column in columns)
    body = []
    for row in rows:
        cells = []
        for column in columns:
            value = row.get(column)
            kind = "" if isinstance(value, (int, float)) and not isinstance(value, bool) else ' class="text"'
            cells.append(f"<td{kind}>{html.escape(_cell(value))}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def flatten(record: dict[str, Any]) -> dict[str, Any]:
    """Scalars as they are, nested dicts one level deep as ``outer.inner`` (their scalars only), short lists kept."""
    flat: dict[str, Any] = {}
    for key, value in record.items():
        if isinstance(value, dict):
            flat.update({f"{key}.{inner}": item for inner, item in value.items()
                         if not isinstance(item, (dict, list, tuple))})
        elif not isinstance(value, (list, tuple)) or len(value) <= 12:
            flat[key] = value
    return flat


def image(path: Path | bytes, caption: str) -> str:
    """A ``<figure>`` with the PNG inlined as base64."""
    data = path if isinstance(path, bytes) else Path(path).read_bytes()
    encoded = base64.b64encode(data).decode("ascii")
    return (f'<figure><img alt="{html.escape(caption)}" src="data:image/png;base64,{encoded}">'
            f"<figcaption>{html.escape(caption)}</figcaption></figure>")


def _is_sweep(records: Sequence[dict[str, Any]]) -> bool:
    return bool(records) and all("key" in r and "method" in r and "flop_ratio" in r for r in records)


def sweep_section(records: Sequence[dict[str, Any]], name: str) -> str:
    """The best point per method at 1.5x / 2x / 3x FLOP ratio, every point, and the sweep's plots."""
    parts = [f"<h2>Sweep: {html.escape(name)}</h2>"]
    first = records[0]
    loads = [r["load_average_1min"] for r in records if r.get("load_average_1min") is not None]
    parts.append(f'<p class="note">{len(records)} points; model {html.escape(str(first.get("model", "?")))}, data '
                 f'{html.escape(str(first.get("data", "?")))} ({first.get("n_train", "?")} train, '
                 f'{first.get("n_test", "?")} test images); speed-up: median of {first.get("pairs", "?")} '
                 f'interleaved pairs on a batch of {first.get("timing_batch", "?")} at {first.get("threads", "?")} '
                 "thread(s), against the unmodified model in the same process"
                 + (f"; 1-minute load average {min(loads):.1f}–{max(loads):.1f} while measuring"
                    + ("" if len(loads) == len(records) else f" (recorded for {len(loads)} of the points)")
                    + " (above 0.5 per thread another process shared the CPU: speed-ups are rough)" if loads else "")
                 + ".</p>")
    metrics = sweep.accuracy_keys(records)
    reference = next((r for r in records if r["method"] == "none"), {})
    for metric in metrics:
        rows = [{"FLOP ratio ≥": f"{row['ratio']:g}x", "method": row["method"], "setting": row["label"],
                 f"{metric} %": round(100 * row[metric], 1),
                 "Δ vs unmodified": round(100 * (row[metric] - reference[metric]), 1) if metric in reference else None,
                 "FLOP ratio": round(row["flop_ratio"], 2), "speed-up": round(row["speedup"], 2)}
                for row in sweep.best_at(records, metric=metric)]
        parts.append(f"<h3>Best {html.escape(metric)} accuracy at a FLOP ratio of at least 1.5x, 2x, 3x</h3>")
        parts.append(table(rows))
    points = []
    for record in sorted(records, key=lambda r: (r["method"] != "none", r["method"], -r["flop_ratio"])):
        row = {"setting": record["label"], "batch rule": record.get("batch_rule", "")}
        row.update({f"{metric} %": round(100 * record[metric], 1) for metric in metrics if metric in record})
        row.update({"tokens": round(record["tokens"], 1), "FLOP ratio": round(record["flop_ratio"], 2),
                    "speed-up": round(record["speedup"], 2),
                    "speed-up range": f"{record['speedup_low']:.2f}–{record['speedup_high']:.2f}"})
        points.append(row)
    parts.append("<h3>Every point</h3>" + table(points))
    with tempfile.TemporaryDirectory() as folder:
        parts += [image(path.read_bytes(), path.name) for path in sweep.plot(records, folder)]
    return "\n".join(parts)


def results_section(payload: Any, name: str) -> str:
    """A JSON file: ``{"meta", "results"}`` as a metadata table and a results table, a list of records as a table,
    anything else as key / value rows."""
    parts = [f"<h2>{html.escape(name)}</h2>"]
    if isinstance(payload, dict) and isinstance(payload.get("results"), list):
        meta = flatten(payload.get("meta") or {})
        if meta:
            parts.append(table([{"setting": key, "value": _cell(value)} for key, value in meta.items()]))
        payload = payload["results"]
    if isinstance(payload, list) and payload and all(isinstance(row, dict) for row in payload):
        rows = [flatten(row) for row in payload]
        columns = list(dict.fromkeys(key for row in rows for key in row))[:MAX_COLUMNS]
        parts.append(table(rows, columns))
    elif isinstance(payload, dict):
        parts.append(table([{"key": key, "value": _cell(value)} for key, value in flatten(payload).items()]))
    else:
        parts.append(f"<pre>{html.escape(json.dumps(payload, indent=1)[:5000])}</pre>")
    return "\n".join(parts)


def _files(paths: Iterable[Path]) -> list[Path]:
    found = []
    for path in paths:
        path = Path(path)
        if path.is_dir():
            found += sorted(p for p in path.rglob("*") if p.suffix.lower() in (".png", ".json", ".jsonl"))
        elif path.is_file():
            found.append(path)
        else:
            raise FileNotFoundError(f"no such file or folder: {path}")
    return found


def section(path: Path) -> str:
    """The HTML of one input file (see the module docstring)."""
    suffix = path.suffix.lower()
    if suffix == ".png":
        return image(path, path.name)
    if suffix == ".jsonl":
        records = sweep.read_records(path)
        return sweep_section(records, path.name) if _is_sweep(records) else results_section(records, path.name)
    if suffix == ".json":
        return results_section(json.loads(path.read_text()), path.name)
    raise ValueError(f"{path}: a report takes .png, .json and .jsonl files (or folders of them)")


def build(paths: Sequence[str | Path], out: str | Path, title: str = "MaMe results") -> Path:
    """Write one self-contained HTML page with a section per input (pictures in a row share a section).

    Raises:
        FileNotFoundError: an input does not exist.
        ValueError: an input is not a PNG, JSON or JSON-lines file.
    """
    body, pictures = [], []
    for path in _files(Path(p) for p in paths):
        if path.suffix.lower() == ".png":
            pictures.append(section(path))
            continue
        if pictures:
            body.append("<h2>Pictures</h2>" + "".join(pictures))
            pictures = []
        body.append(section(path))
    if pictures:
        body.append("<h2>Pictures</h2>" + "".join(pictures))
    page = (f"<!DOCTYPE html><html><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>"
            f"<style>{_STYLE}</style></head><body><h1>{html.escape(title)}</h1>\n" + "\n".join(body)
            + "\n</body></html>\n")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(page, encoding="utf-8")
    return out
