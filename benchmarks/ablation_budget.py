"""The paper's ablations (section 4.3.1) at equal FLOPs: each switch of the default patch varied alone.

A FLOP budget (`mame.patch.timm(model, flops=...)`) makes every variant cost exactly the same, so the choices are
compared on accuracy alone, without the τ of each similarity kind meaning something else. Real DINOv2-S/14, frozen,
Fashion-MNIST (`mame.evaluate.evaluate_variants`: weighted k-NN and a logistic-regression probe):

    python benchmarks/ablation_budget.py --flops 2 --n-train 500 --n-test 500 --threads 2

Writes ``benchmarks/results/ablation_budget.json`` and prints the table.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from mame import evaluate, models
from mame.bench import Variant, report_load
from rich.console import Console

# (label, the switch varied from the default patch: similarity on the keys of all heads, cosine, alternating)
SWITCHES = (
    ("default: keys, cosine", {}),
    ("metric x (the tokens, the paper's)", {"metric": "x"}),
    ("metric keys_mean (ToMe's)", {"metric": "keys_mean"}),
    ("similarity euclidean", {"similarity": "euclidean"}),
    ("similarity dot", {"similarity": "dot"}),
    ("similarity softmax", {"similarity": "softmax"}),
    ("partition sequential", {"partition": "sequential", "batch_rule": "any"}),
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--flops", type=float, default=2.0)
    parser.add_argument("--n-train", type=int, default=500)
    parser.add_argument("--n-test", type=int, default=500)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "ablation_budget.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    console = Console()
    load = report_load(console, args.threads)
    model = models.load(progress=False)
    model.reset_classifier(0)
    variants = [Variant("unmodified", "none")]
    variants += [Variant(label, "mame", {"flops": args.flops, **switch}) for label, switch in SWITCHES]
    results = evaluate.evaluate_variants(model, variants, n_train=args.n_train, n_test=args.n_test)
    console.print(evaluate.results_table(results, title=f"ablations at {args.flops}x FLOPs, Fashion-MNIST "
                                                        f"({args.n_train} train, {args.n_test} test)"))
    meta = {"flops": args.flops, "n_train": args.n_train, "n_test": args.n_test, "threads": args.threads,
            "load_average_1min": load}
    args.out.write_text(json.dumps(evaluate.results_to_json(results, meta), indent=2, default=str))
    console.print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
