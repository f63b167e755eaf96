"""DSIR (Xie et al., 2023; Appendix C): hashed n-gram importance weights, via ``data-selection``.

``data_selection.HashedNgramDSIR`` fits two bag-of-hashed-n-grams distributions (pool = raw,
target set = target) and gives every pool example the log importance weight
``log p_target(x) - log p_raw(x)`` summed over its n-grams (``importance_estimator``). Its texts
are the rows' message contents, streamed from our validated records (no re-parsing, so rows line
up with ``--skip-invalid``). Its intermediate ``.npy`` files live in a temporary folder inside
``DIR`` that is removed afterwards; the fitted distributions are saved as ``DIR/dsir.npz``.

Selection: **top-k by log importance weight** by default (deterministic; ``data_selection``'s
``resample(top_k=True)``). ``resample=True`` reproduces its importance *resampling* (Gumbel top-k,
sampling without replacement with probability proportional to the weight) with a seeded
``numpy.random.default_rng(seed)`` instead of the package's global NumPy RNG. ``min_words`` is the
package's ``min_example_length`` filter with its default of 100 words: shorter examples are never
selected (score ``-inf``). It matters: the log weight is a *sum* over n-grams, and with a handful
of targets most n-grams are unseen in the target set, so without the filter the shortest examples
win (pool-small/gsm at 5%: mean 64 tokens, 8 in-domain rows vs 190 tokens, 57 with it).
"""

from __future__ import annotations

import functools
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..config import documented
from ..io import atomic_path
from .base import BaselineInputs, BaselineScores, SelectionCost, record_text, register


@dataclass(frozen=True)
class DSIRConfig:
    ngrams: int = documented(2, "n-gram order (2: unigrams and bigrams; package default).")
    num_buckets: int = documented(10000, "Hash buckets (package default).")
    tokenizer: str = "wordpunct"  # wordpunct | word_tokenize (package options)
    resample: bool = documented(False, "Seeded importance resampling (Gumbel top-k) instead of top-k by weight.")
    min_words: int = documented(100, "Never select examples with fewer words (the package's min_example_length "
                                     "and its default).")
    num_proc: int = documented(1, "Featurisation processes (joblib; results do not depend on it).")

    def __post_init__(self) -> None:
        if self.ngrams < 1 or self.num_buckets < 1 or self.num_proc < 1:
            raise ValueError("ngrams, num_buckets and num_proc must be positive")
        if self.tokenizer not in ("wordpunct", "word_tokenize"):
            raise ValueError(f"tokenizer must be wordpunct or word_tokenize, got {self.tokenizer!r}")


def wordpunct_tokenize(text: str) -> list[str]:
    """``nltk``'s ``WordPunctTokenizer().tokenize`` (the package's default), as a module-level function.

    ``data_selection`` ships its tokenizer to joblib worker processes; a pickled nltk tokenizer
    instance loses nltk's regex-timeout sentinel there and fails ("timeout not float or None"),
    while a module-level function is pickled by reference and rebuilt in the worker.
    """
    return _wordpunct().tokenize(text)


@functools.cache
def _wordpunct() -> Any:
    from nltk.tokenize import WordPunctTokenizer

    return WordPunctTokenizer()


def _shard_order(n: int, num_shards: int) -> np.ndarray:
    """Pool positions in the order ``data_selection`` concatenates its virtual shards.

    With one input file and ``S`` shards, shard ``j`` holds rows ``j, j+S, j+2S, ...`` and the
    weight files are concatenated shard by shard.
    """
    return np.concatenate([np.arange(j, n, num_shards) for j in range(num_shards)]) if n else np.zeros(0, int)


@register("dsir", DSIRConfig, uses_model=False,
          summary="data-selection HashedNgramDSIR importance weights, top-k (or seeded resampling)")
def score_dsir(inputs: BaselineInputs, config: DSIRConfig, cost: SelectionCost) -> BaselineScores:
    """Log importance weight of each pool text (plus seeded Gumbel noise when resampling)."""
    from data_selection import HashedNgramDSIR

    pool_texts = [record_text(r) for r in inputs.pool]
    target_texts = [record_text(r) for r in inputs.targets]
    texts = {"pool": pool_texts, "targets": target_texts}

    def load(name: str) -> Iterator[str]:  # data_selection calls it with the "path" we gave it
        yield from texts[name]

    out_dir = Path(inputs.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    n = len(pool_texts)
    with tempfile.TemporaryDirectory(prefix=".dsir-", dir=out_dir) as tmp:
        dsir = HashedNgramDSIR(
            raw_datasets=["pool"], target_datasets=["targets"], cache_dir=tmp,
            raw_load_dataset_fn=load, raw_parse_example_fn=None,
            target_load_dataset_fn=load, target_parse_example_fn=None,
            num_proc=config.num_proc, ngrams=config.ngrams, num_buckets=config.num_buckets,
            tokenizer=config.tokenizer, min_example_length=config.min_words,
        )
        if config.tokenizer == "wordpunct":
            dsir.tokenizer = wordpunct_tokenize
        t0 = time.perf_counter()
        dsir.fit_importance_estimator(num_tokens_to_fit="all")
        cost.timed("fit", t0)
        t0 = time.perf_counter()
        dsir.compute_importance_weights()
        shards = dsir._get_virtually_sharded_datasets(dsir.raw_datasets)
        files = [f"{s['overall_idx']}.npy" for s in shards]
        logw_parts = [np.load(Path(dsir.log_importance_weights_dir) / f) for f in files]
        meta_dir = Path(dsir.perexample_metadata_dir)
        words_parts = [np.load(meta_dir / f) for f in files] if meta_dir.exists() else None
        cost.timed("weights", t0)
    order = _shard_order(n, len(shards))
    logw = np.empty(n, dtype=np.float64)
    logw[order] = np.concatenate(logw_parts) if n else np.zeros(0)
    words = np.zeros(n, dtype=np.int64)
    if words_parts is not None and n:
        words[order] = np.concatenate(words_parts).astype(np.int64)
    cost.text_tokens += int(words.sum()) + int(
        sum(len(dsir.tokenizer(t.lower())) for t in target_texts))
    with atomic_path(out_dir / "dsir.npz") as tmp_path, open(tmp_path, "wb") as fh:
        np.savez(fh, raw_probs=dsir.raw_probs, target_probs=dsir.target_probs, log_diff=dsir.log_diff,
                 ngrams=config.ngrams, num_buckets=config.num_buckets)

    score = logw.copy()
    columns: dict[str, np.ndarray | list] = {"log_importance_weight": logw, "n_words": words}
    if config.resample:
        gumbel = np.random.default_rng(inputs.base.seed).gumbel(size=n)
        score = score + gumbel
        columns["gumbel"] = gumbel
    eligible = words >= config.min_words
    score = np.where(eligible, score, -np.inf)
    return BaselineScores(
        score=score, columns=columns,
        info={"selection": "importance resampling (seeded Gumbel top-k)" if config.resample
              else "top-k by log importance weight",
              "library": "data-selection HashedNgramDSIR", "too_short": int((~eligible).sum()),
              "estimator": "dsir.npz"},
    )
