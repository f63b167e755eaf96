"""Baselines of the paper (Appendix C) with the same inputs and output layout as ``select``.

    from trim_select.baselines import run_baseline
    report = run_baseline("bm25", "pool.jsonl", "targets.jsonl", "out/bm25", "5%")

Methods (``BASELINES``; one module each): ``random`` (seeded uniform sample), ``bm25``
(``bm25s``; targets as queries, best match per example), ``dsir`` (``data-selection`` hashed
n-gram importance weights), ``rds`` (last-token hidden state, cosine to the targets) and ``less``
(Adam-aware LoRA gradient features, random projection, LR-weighted over warmup checkpoints).

Outputs in ``out_dir``: ``scores.parquet`` (``index``, ``id``, ``score``, method columns,
``selected``, ``rank``), ``coreset.jsonl`` (selected rows byte-for-byte, best first),
``rejected.jsonl`` (with ``skip_invalid``) and ``run.json`` (method, configs, counts, versions and
the selection cost: wall seconds, forward/backward passes, tokens).
"""

from __future__ import annotations

from .base import (
    BASELINES,
    BaselineConfig,
    BaselineInputs,
    BaselineMethod,
    BaselineScores,
    SelectionCost,
    record_text,
    register,
)
from .bm25 import BM25Config
from .dsir import DSIRConfig
from .less import LESSConfig
from .random_sample import RandomConfig
from .rds import RDSConfig
from .runner import method_config, run_baseline, selection_table

__all__ = [
    "BASELINES",
    "BM25Config",
    "BaselineConfig",
    "BaselineInputs",
    "BaselineMethod",
    "BaselineScores",
    "DSIRConfig",
    "LESSConfig",
    "RDSConfig",
    "RandomConfig",
    "SelectionCost",
    "method_config",
    "record_text",
    "register",
    "run_baseline",
    "selection_table",
]
