"""BM25 (Robertson et al., 2009; Appendix C): lexical match of each pool example to the targets.

The pool texts (all message contents of a row) are indexed with ``bm25s``; every target text is a
query; an example's score is its best BM25 score over the target queries (``max``), so an example
that matches one target very well ranks high even if it matches the others poorly.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np

from ..config import documented
from .base import BaselineInputs, BaselineScores, SelectionCost, record_text, register


@dataclass(frozen=True)
class BM25Config:
    k1: float = documented(1.5, "Term-frequency saturation k1.")
    b: float = documented(0.75, "Length normalisation b.")
    variant: str = "lucene"  # bm25s method: robertson | lucene | atire | bm25l | bm25+
    stopwords: str | None = documented("en", "bm25s stopword list (en, ..., none: keep every word).")
    aggregate: str = documented("max", "Over the target queries: max|mean.")

    def __post_init__(self) -> None:
        if self.aggregate not in ("max", "mean"):
            raise ValueError(f"aggregate must be max or mean, got {self.aggregate!r}")


@register("bm25", BM25Config, uses_model=False,
          summary="bm25s index of the pool; each target is a query; best match per example")
def score_bm25(inputs: BaselineInputs, config: BM25Config, cost: SelectionCost) -> BaselineScores:
    """Best (or mean) BM25 score of each pool text over the target queries."""
    import bm25s

    logging.getLogger("bm25s").setLevel(logging.WARNING)  # bm25s sets its own logger to DEBUG
    t0 = time.perf_counter()
    corpus = [record_text(r) for r in inputs.pool]
    queries = [record_text(r) for r in inputs.targets]
    stop = config.stopwords if config.stopwords else None
    corpus_tok = bm25s.tokenize(corpus, stopwords=stop, show_progress=inputs.progress)
    retriever = bm25s.BM25(k1=config.k1, b=config.b, method=config.variant)
    retriever.index(corpus_tok, show_progress=inputs.progress)
    cost.timed("index", t0)
    cost.text_tokens += int(sum(len(d) for d in corpus_tok.ids))

    t0 = time.perf_counter()
    query_tok = bm25s.tokenize(queries, stopwords=stop, return_ids=False, show_progress=False)
    n = len(corpus)
    best_score = np.full(n, -np.inf)  # running max over queries (memory O(pool), not O(pool x targets))
    best = np.zeros(n, dtype=np.int64)
    total = np.zeros(n, dtype=np.float64)
    n_unknown = 0
    for q, toks in enumerate(query_tok):
        ids = retriever.get_tokens_ids(list(toks))
        n_unknown += len(toks) - len(ids)
        cost.text_tokens += len(toks)
        s = retriever.get_scores_from_ids(ids).astype(np.float64) if ids else np.zeros(n)
        better = s > best_score  # ties keep the earlier target
        best_score[better], best[better] = s[better], q
        total += s
    cost.timed("query", t0)
    agg = best_score if config.aggregate == "max" else total / max(len(queries), 1)
    target_ids = [r.id for r in inputs.targets]
    return BaselineScores(
        score=agg,
        columns={"best_target": [target_ids[b] for b in best]},
        info={"vocabulary": len(retriever.vocab_dict), "query_terms_not_in_pool": int(n_unknown),
              "library": "bm25s"},
    )
