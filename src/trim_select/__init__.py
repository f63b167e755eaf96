"""trim-select: TRIM targeted instruction-data selection (arXiv 2510.07118).

Low-level API (docs/SPEC.md)::

    from trim_select import build_fingerprints, score
    fp = build_fingerprints(model, targets, layers=6, row_weight=0.5, col_weight=0.5)   # Stage I
    s = score(model, pool, fp, penalty=1.0, mean_weight=0.5, max_weight=0.5,
              coverage_weight=0.05)                                                      # Stage II

High-level: :class:`TrimSelector` composes loading, rendering, fingerprinting, scoring, selection.
"""

from .config import FingerprintConfig, RenderConfig, RuntimeConfig, ScoreConfig
from .data import DataError, Message, Record, Renderer, TokenSequence, load_records, read_records
from .fingerprints import Fingerprints, NoFingerprintError, build_fingerprints
from .scoring import ScoreDetails, score, score_details
from .selection import rank, select_top

__version__ = "0.1.0"

__all__ = [
    "DataError",
    "FingerprintConfig",
    "Fingerprints",
    "Message",
    "NoFingerprintError",
    "Record",
    "RenderConfig",
    "Renderer",
    "RuntimeConfig",
    "ScoreConfig",
    "ScoreDetails",
    "TokenSequence",
    "TrimSelector",
    "build_fingerprints",
    "load_records",
    "rank",
    "read_records",
    "score",
    "score_details",
    "select_top",
]


def __getattr__(name: str):
    if name == "TrimSelector":
        from .selector import TrimSelector

        return TrimSelector
    raise AttributeError(name)
