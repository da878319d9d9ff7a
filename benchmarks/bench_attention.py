"""The measurements behind `mame.attention`'s choices: which exact attention core is faster per shape, and what one
attention group costs (its fixed overhead and its cost per score element).

For (samples, tokens) pairs at DINOv2-S/14's 6 heads of 64 channels it times fused SDPA and matmul-softmax-matmul on
(n, L, heads, head_dim) views of a packed qkv (as the patched block hands them over), with and without an additive
bias, and writes a markdown table; then it fits ``time = overhead + per_score * samples * heads * L^2`` on SDPA for
the attention-group cost model. The rule in `mame.attention.attention_path` (MATMUL_MIN_SCORES, MATMUL_MAX_SCORES, MATMUL_MAX_TOKENS)
and the constants GROUP_OVERHEAD_S / SCORE_ELEMENT_S (plus the group's row gathers) are set from this table.

    python benchmarks/bench_attention.py --threads 2 --out benchmarks/attention_paths.md
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from mame.attention import attention_path


def seconds(fn, repeats: int) -> float:
    """Median of 5 samples of ``repeats`` calls each, per call."""
    for _ in range(3):
        fn()
    samples = []
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(repeats):
            fn()
        samples.append((time.perf_counter() - start) / repeats)
    return sorted(samples)[2]


def sdpa(q, k, v, bias):
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias).transpose(1, 2)


def matmul_softmax(q, k, v, bias):
    scores = (q.transpose(1, 2) * q.shape[-1] ** -0.5) @ k.permute(0, 2, 3, 1)
    if bias is not None:
        scores = scores + bias
    return (scores.softmax(-1) @ v.transpose(1, 2)).transpose(1, 2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--heads", type=int, default=6)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--out", type=Path, default=None, help="write the markdown table here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    heads, head_dim = args.heads, args.head_dim
    lines = [f"Attention core per shape: CPU fp32, {args.threads} threads, {heads} heads x {head_dim}, "
             f"load average {os.getloadavg()[0]:.2f} at the start. Times in µs (median of 5 samples); "
             "ratio = SDPA / matmul-softmax (> 1: matmul-softmax faster); rule = what `attention_path` picks.", "",
             "| samples | tokens | scores | SDPA | matmul | ratio | SDPA + bias | matmul + bias | ratio | rule |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    fit = []
    with torch.inference_mode():
        for samples in (1, 2, 4, 8, 20, 32):
            for tokens in (24, 48, 64, 96, 128, 160, 200, 257):
                q, k, v = torch.randn(samples, tokens, 3, heads, head_dim).unbind(2)
                bias = torch.randn(samples, 1, 1, tokens)
                repeats = max(3, int(2e5 / (samples * tokens * tokens)))
                times = [seconds(lambda b=b, f=f: f(q, k, v, b), repeats)
                         for b in (None, bias) for f in (sdpa, matmul_softmax)]
                scores = samples * heads * tokens * tokens
                fit.append((scores, times[2]))
                rule = attention_path(torch.device("cpu"), samples, heads, tokens, tokens)
                lines.append(f"| {samples} | {tokens} | {scores:,} | {times[0] * 1e6:.0f} | {times[1] * 1e6:.0f} | "
                             f"{times[0] / times[1]:.2f} | {times[2] * 1e6:.0f} | {times[3] * 1e6:.0f} | "
                             f"{times[2] / times[3]:.2f} | {rule} |")
                print(lines[-1], flush=True)
    # Least squares of SDPA-with-bias time on score elements, in relative error (each row divided by its time, so
    # the small calls where grouping decisions are made weigh as much as the large ones): the group cost model.
    xs = torch.tensor([s for s, _ in fit], dtype=torch.float64)
    ys = torch.tensor([t for _, t in fit], dtype=torch.float64)
    design = torch.stack([torch.ones_like(xs), xs], 1) / ys.unsqueeze(1)
    overhead, per_score = torch.linalg.lstsq(design, torch.ones_like(ys).unsqueeze(1)).solution.squeeze(1).tolist()
    lines += ["", f"Group cost fit (SDPA with bias): overhead {overhead * 1e6:.1f} µs per call, "
                  f"{per_score * 1e9:.2f} ns per score element."]
    print(lines[-1])
    if args.out is not None:
        args.out.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
