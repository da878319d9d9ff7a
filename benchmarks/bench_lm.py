"""Causal MaMe on the real SmolLM2-135M-Instruct: KV budgets of 75 / 50 / 25 % against StreamingLLM and KnormPress.

For each real English text shipped by installed packages (Debian's license texts in /usr/share/common-licenses, from
base-files, and Vim's user manual in /usr/share/vim, from vim-runtime, where present) and each prompt length, the
first ``length`` tokens are the prompt and the next 128 the continuation. Every method compresses the prompt's KV
cache to the budget (`mame.lm.evaluate_prompt`): causal MaMe on hidden states during prefill (``mame``, τ fitted per
prompt by bisection), causal MaMe as a press on the cache after prefill (``mame-kv`` strict, ``mame-kv-paper`` in the
paper's causal mode; per-layer quantile rule), StreamingLLM (4 sinks + recent window) and KnormPress. Measured:
perplexity of the continuation, greedy agreement with the uncompressed model over 32 tokens, prefill and decode time
ratios (single runs against one uncompressed prefill, or paired with one right before each with --paired-timing; the
load average is recorded with them: on a busy machine they are noise).

    python benchmarks/bench_lm.py                       # all lengths and budgets -> benchmarks/results/lm.{jsonl,md}
    python benchmarks/bench_lm.py --lengths 512 --texts 1 --out /tmp/lm   # a quick look
    python benchmarks/bench_lm.py --methods mame-kv-paper --merge        # add rows to the existing results

With ``--merge`` this run's rows join those already in ``<out>.jsonl`` (replacing rows of the same text, prompt
length, method and budget) and ``<out>.md`` is rewritten from all of them; without it both files hold this run only.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import time
from pathlib import Path

import torch
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from mame import lm

CONTINUATION = 128
LICENSES = Path("/usr/share/common-licenses")
VIM_DOCS = Path("/usr/share/vim")
TITLE = "# Causal MaMe on SmolLM2: KV budgets against StreamingLLM and KnormPress"
NOTES = """\
Runs behind the committed rows (`benchmarks/results/lm.md`), each with `nice -n 19`: `python benchmarks/bench_lm.py
--texts 2` (GPL-3 and Vim's manual at 512, 1024, 2048 tokens) and `python benchmarks/bench_lm.py --texts 4 --only GFDL
LGPL --lengths 1024`; GPL-3's `mame-kv` rows re-run after the press's tie-breaking fix, and `mame-kv-paper` added
later with `--methods mame-kv-paper --merge` on the same prompts (the other rows unchanged).
Methods: `mame` = causal MaMe on hidden states during prefill (strict, first layers, one τ per prompt by bisection;
a merging layer still caches its full input, so 50 % needs two merging layers and 25 % three); `mame-kv` = strict
causal MaMe as a press on each layer's cache after prefill (raw keys un-rotated, merged with the values, re-rotated at
the destination's position; per-layer quantile rule over 1 + 2 extra rounds); `mame-kv-paper` = the same press in the
paper's causal mode (section 5: a source may join any destination at or after its position, W^F masked, columns
normalised over all destinations, no pruning; exactly the budget per layer); `streaming-llm` = 4 sinks + recent
window; `knorm` = per head, the keys of smallest L2 norm. Greedy agreement is position by position over 32 tokens.
Texts: Debian's license texts (/usr/share/common-licenses, base-files) and Vim's user manual chapters 1-9
(/usr/share/vim, vim-runtime); continuation = the next 128 real tokens after the prompt."""


def texts(count: int) -> list[tuple[str, str]]:
    """Up to ``count`` (name, text) pairs of long real English prose found on this machine."""
    found = []
    for name in ("GPL-3", "GFDL-1.3", "LGPL-2.1", "MPL-2.0"):
        path = LICENSES / name
        if path.is_file():
            found.append((f"common-licenses/{name}", path.read_text()))
    manuals = sorted(VIM_DOCS.glob("vim*/doc/usr_0[1-9].txt")) if VIM_DOCS.is_dir() else []
    if manuals:  # Vim's user manual, chapters 1-9, as one text
        found.insert(1, ("vim user manual usr_01-09", "\n".join(path.read_text(errors="replace") for path in manuals)))
    if not found:
        raise SystemExit("no long English text found (looked in /usr/share/common-licenses and /usr/share/vim)")
    return found[:count]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[512, 1024, 2048])
    parser.add_argument("--budgets", type=float, nargs="+", default=[0.75, 0.5, 0.25])
    parser.add_argument("--texts", type=int, default=2, help="how many texts (each gives one prompt per length)")
    parser.add_argument("--methods", nargs="+", default=list(lm.METHODS))
    parser.add_argument("--only", nargs="+", help="only the texts whose names contain one of these")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "lm")
    parser.add_argument("--merge", action="store_true",
                        help="add this run's rows to <out>.jsonl (replacing rows of the same text, length, method "
                             "and budget) and write <out>.md from all of them")
    parser.add_argument("--paired-timing", action="store_true",
                        help="time an uncompressed prefill right before each method's (one more prefill each)")
    parser.add_argument("--timing-pairs", type=int, default=0,
                        help="instead of quality: time prefill and decoding of every method at each budget on one "
                             "prompt per length in this many interleaved pairs (written to <out>_timing.md)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    tokenizer, model = lm.load_lm()
    if args.timing_pairs:
        timing(args, tokenizer, model)
        return
    results, rows = [], []
    meta = {"model": lm.LM_DEFAULT, "dtype": "float32", "threads": args.threads, "batch": 1,
            "continuation": CONTINUATION, "greedy_tokens": 32, "machine": platform.processor() or platform.machine(),
            "torch": torch.__version__, "date": time.strftime("%Y-%m-%d %H:%M")}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    jsonl = args.out.with_suffix(".jsonl")
    earlier = []
    if args.merge and jsonl.is_file():
        earlier = [json.loads(line) for line in jsonl.read_text().splitlines() if line.strip()]
    chosen = [(name, text) for name, text in texts(args.texts) if not args.only or any(o in name for o in args.only)]
    jobs = [(name, text, length) for name, text in chosen for length in args.lengths]
    columns = (TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
               TimeElapsedColumn())
    with Progress(*columns) as progress:
        task = progress.add_task("prompts", total=len(jobs))
        for name, text, length in jobs:
            ids = tokenizer(text, return_tensors="pt").input_ids
            if ids.shape[1] < length + CONTINUATION:
                progress.console.print(f"[yellow]{name} has {ids.shape[1]} tokens: no {length}-token prompt[/]")
                progress.advance(task)
                continue
            prompt, continuation = ids[:, :length], ids[:, length : length + CONTINUATION]
            load = os.getloadavg()[0]
            found = lm.evaluate_prompt(model, prompt, continuation, args.budgets, args.methods,
                                       progress=lambda what: progress.update(task, description=f"{name}: {what}"),
                                       paired_timing=args.paired_timing)
            for result in found:
                result.source = name
                rows.append({**result.to_json(), "load_1min": load, **meta})
            results.extend(found)
            # Partial results survive (merged into the earlier rows at once, which are thus never lost).
            jsonl.write_text("".join(json.dumps(row) + "\n" for row in merge_rows(earlier, rows)))
            progress.console.print(f"{name}, {length} tokens: done ({time.strftime('%H:%M')}, load {load:.1f})")
            progress.advance(task)
    print(lm.markdown_table(results))
    report = markdown(merge_rows(earlier, rows))
    args.out.with_suffix(".md").write_text(report)
    print(f"wrote {jsonl} and {args.out.with_suffix('.md')}" + (" (merged with the earlier rows)" if earlier else ""))


def merge_rows(earlier: list[dict], new: list[dict]) -> list[dict]:
    """``earlier`` rows without those ``new`` replaces (same text, prompt length, method and budget), then ``new``."""
    def key(row: dict) -> tuple:
        return row["source"], row["prompt_tokens"], row["method"], row["budget"]

    replaced = {key(row) for row in new}
    return [row for row in earlier if key(row) not in replaced] + new


def markdown(rows: list[dict]) -> str:
    """The results file: notes, what the rows cover, the table over all prompts and one table per text."""
    fields = {f.name for f in dataclasses.fields(lm.LMResult)}
    results = [lm.LMResult(**{name: value for name, value in row.items() if name in fields}) for row in rows]
    sources = sorted({r.source for r in results})
    lengths = {source: sorted({r.prompt_tokens for r in results if r.source == source}) for source in sources}
    prompts = sum(len(found) for found in lengths.values())
    loads = [row["load_1min"] for row in rows]
    dates = sorted({row["date"] for row in rows})
    threads = sorted({row["threads"] for row in rows})
    covered = "; ".join(f"{source} ({', '.join(map(str, lengths[source]))})" for source in sources)
    header = (f"SmolLM2-135M-Instruct (float32, batch 1, {'/'.join(map(str, threads))} thread(s)): prompts = the first "
              f"N tokens of {covered}; continuation {CONTINUATION} tokens, greedy 32 tokens. Per-prompt relative "
              f"perplexity increases averaged over the {prompts} prompts; time ratios are medians of single runs. "
              f"Rows from runs started {dates[0]} to {dates[-1]}, load average {min(loads):.1f}-{max(loads):.1f} "
              "(time ratios at such loads are noise; `--timing-pairs` measures them in interleaved pairs).")
    parts = [TITLE, NOTES, header, lm.markdown_table(results)]
    for source in sources:
        parts += [f"### {source}", lm.markdown_table([r for r in results if r.source == source])]
    return "\n\n".join(parts) + "\n"


def timing(args: argparse.Namespace, tokenizer, model) -> None:
    """Prefill and decode time ratios (median and range of interleaved pairs) per method, budget and length."""
    name, text = texts(1)[0]
    ids = tokenizer(text, return_tensors="pt").input_ids
    lines = ["| prompt tokens | KV budget | method | prefill time ratio | decode time ratio (32 tokens) |",
             "|---|---|---|---|---|"]
    loads = []
    for length in args.lengths:
        for budget in args.budgets:
            loads.append(os.getloadavg()[0])
            found = lm.time_prompt(model, ids[:, :length], budget, args.methods, pairs=args.timing_pairs)
            for method, ratios in found.items():
                prefill, decode = ratios["prefill"], ratios["decode"]
                lines.append(f"| {length} | {budget:.0%} | {method} | {prefill['median']:.2f} "
                             f"({prefill['min']:.2f}-{prefill['max']:.2f}) | {decode['median']:.2f} "
                             f"({decode['min']:.2f}-{decode['max']:.2f}) |")
            print(lines[-len(found):], flush=True)
    loads.append(os.getloadavg()[0])
    header = (f"Time ratios on {name}, SmolLM2-135M-Instruct float32, batch 1, {args.threads} thread(s), median "
              f"(min-max) of {args.timing_pairs} interleaved pairs after a warm-up pair; load average "
              f"{min(loads):.1f}-{max(loads):.1f}.\n\n")
    out = args.out.with_name(args.out.name + "_timing.md")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(header + "\n".join(lines) + "\n")
    print(header + "\n".join(lines))


if __name__ == "__main__":
    main()
