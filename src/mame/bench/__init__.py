"""Honest measurements: paired speed ratios, FLOPs that include attention, peak memory, tokens per block.

The rules every number here follows: speed is a ratio of baseline to method measured in one process, after
warm-up, over interleaved pairs that alternate which side runs first, reported as the median with its spread;
FLOPs count SDPA (which `FlopCounterMode` scores as zero on CPU unless a formula is registered) and the merge's own
matmuls; the FLOP ratio is the limit a speed-up should be compared with; the load average is printed and recorded,
because timings taken while another process loads the CPU are worthless.

One module per thing measured:

- `mame.bench.timing`: `paired_speedup` and its `SpeedResult`.
- `mame.bench.flops`: `count_flops`, `flop_counter` (SDPA scored).
- `mame.bench.memory`: `peak_memory`.
- `mame.bench.tokens`: `tokens_per_block`, `BlockTokens`, `OneAtATime` (the one place tokens are counted).
- `mame.bench.bound`: the merge-free bound, `merge_free_copy`.
- `mame.bench.load`: the system load average and the warning when it is high.
- `mame.bench.compare`: `Variant`, `VariantResult`, `compare`; `mame.bench.tables`: `results_table`,
  `results_to_json`, `run_meta`.

    >>> from mame import bench
    >>> results = bench.compare(model, images, [bench.Variant("MaMe τ=0.8", "mame", {"tau": 0.8, "layers": 8}),
    ...                                         bench.Variant("ToMe r=16", "tome", {"r": 16})])
    >>> rich.print(bench.results_table(results))
"""

from mame.bench.bound import BOUND_MIN_TIME, BOUND_PAIRS, bound_timing, merge_free_copy, merging_blocks
from mame.bench.compare import Variant, VariantKind, VariantResult, compare
from mame.bench.flops import count_flops, flop_counter
from mame.bench.load import LOAD_PER_THREAD, load_average, load_warning, report_load
from mame.bench.memory import peak_memory
from mame.bench.tables import results_table, results_to_json, run_meta
from mame.bench.timing import SpeedResult, default_sync, paired_speedup
from mame.bench.tokens import BlockTokens, OneAtATime, merge_runtime, tokens_per_block

__all__ = [
    "BOUND_MIN_TIME", "BOUND_PAIRS", "BlockTokens", "LOAD_PER_THREAD", "OneAtATime", "SpeedResult", "Variant",
    "VariantKind", "VariantResult", "bound_timing", "compare", "count_flops", "default_sync", "flop_counter",
    "load_average", "load_warning", "merge_free_copy", "merge_runtime", "merging_blocks", "paired_speedup",
    "peak_memory", "report_load", "results_table", "results_to_json", "run_meta", "tokens_per_block",
]
