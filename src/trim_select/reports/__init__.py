"""Reports: figures and one HTML page that compare the coresets of several selection runs.

Each input folder is the output of ``trim-select select`` (or ``score --budget``, or ``baseline``):
``scores.parquet`` (``index``, ``id``, ``score``, ``selected``, ``rank`` and, for TRIM,
``n_tokens``, ``mean``, ``max``, ``coverage``, ...), ``coreset.jsonl``, ``run.json`` and, for TRIM,
``fingerprints.safetensors``. The report shows (paper Section 4.4 and H):

- the token-length distribution of each coreset against the pool (Fig. 3);
- the source mix of each coreset, by the pool rows' ``dataset`` field, and the top tasks (Fig. 4/5);
- score histograms, selected against not selected;
- the overlap between coresets (Jaccard matrix);
- a token view: saliency ``alpha`` (Eq. 7) over the target set and per-token matches ``s_j``
  (Eq. 10/12) over the top and bottom candidates, so a user can see why an example was chosen.

Usage::

    from trim_select.reports import ReportConfig, build_report
    summary = build_report(["runs/trim", "runs/bm25"], "report/", ReportConfig(targets="val.jsonl"))

Loading runs, computing the statistics, drawing figures, the token view and writing HTML are
separate steps; ``summary.json`` holds every number the figures show.
"""

from .build import ReportResult, build_report
from .config import ReportConfig
from .stats import jaccard_matrix

__all__ = ["ReportConfig", "ReportResult", "build_report", "jaccard_matrix"]
