"""Method comparison: select with every method, fine-tune per seed, pair the methods on test rows.

    from trim_select.comparison import compare
    compare(["bench/targets/gsm"], "pool.jsonl", "5%", ["trim", "bm25", "random"], "out/cmp", seeds=3)

Modules: :mod:`.selections` (TRIM in one pool pass for every task, the shared warmup, baselines,
the fairness controls), :mod:`.rows` (per-row results), :mod:`.tables` (paired intervals,
``compare.md``), :mod:`.compare` (the run), :mod:`.merge` (parts of one run, split by seed or
method, joined).
"""

from .compare import available_methods, compare

__all__ = ["available_methods", "compare"]
