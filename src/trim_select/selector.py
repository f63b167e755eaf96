"""``TrimSelector``: loading -> rendering -> Stage I -> Stage II -> selection, with outputs on disk.

In the spirit of DSIR's ``fit`` / ``compute_importance_weights`` / ``resample``::

    sel = TrimSelector(model="default")
    sel.fit("targets.jsonl")                      # Stage I  -> sel.fingerprints
    table = sel.score_pool("pool.jsonl", "out/")  # Stage II -> out/scores.parquet (resumable)
    sel.select("out/", budget="5%")               # coreset.jsonl, run.json

``run`` does all three by handing off to the in-process engine
(:func:`trim_select.engines.base.run_in_process`; scale-out engines: :mod:`trim_select.engines`).
Outputs in ``out_dir``: ``fingerprints.safetensors``, ``parts/`` (one
parquet per scored chunk; the resume unit), ``scores.parquet``, ``coreset.jsonl`` (selected rows
byte-for-byte, best first), ``rejected.jsonl`` (with ``skip_invalid``), ``run.json``.
"""

from __future__ import annotations

import gc
import hashlib
import json
import logging
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from .config import FingerprintConfig, RenderConfig, RuntimeConfig, ScoreConfig, config_hash, to_dict
from .data import Message, ReadStats, Record, Renderer, TokenSequence, as_sequence, read_records
from .engines.base import column_sum, make_scorer, render_all, run_in_process, score_chunk
from .fingerprints import Fingerprints, build_fingerprints
from .generic import generic_summary, resolve_generic
from .interrupts import check_stop
from .io import RejectWriter, ScoreWriter, file_identity
from .locking import folder_lock
from .models import LoadedModel, load_model
from .outputs import RunReport, add_selection, duplicate_ids, select_report, write_selection
from .progress import StageTimes, count_rows, progress_bar
from .scoring import Scorer, token_idf

log = logging.getLogger(__name__)


class TrimSelector:
    """The TRIM pipeline on one model. Configs are frozen dataclasses (``trim_select.config``)."""

    def __init__(
        self,
        model: str | LoadedModel = "default",
        *,
        render: RenderConfig = RenderConfig(),
        fingerprint: FingerprintConfig = FingerprintConfig(),
        scoring: ScoreConfig = ScoreConfig(),
        runtime: RuntimeConfig = RuntimeConfig(),
        progress: bool = True,
    ):
        self.model_spec = model if isinstance(model, str) else model.name
        self._lm = model if isinstance(model, LoadedModel) else None
        self.render_config = render
        self.fingerprint_config = fingerprint
        self.score_config = scoring
        self.runtime = runtime
        self.progress = progress
        self.fingerprints: Fingerprints | None = None
        self.generic: Fingerprints | None = None  # the generic correction's fingerprints (score_pool)
        self.times = StageTimes()
        self.stats: dict[str, Any] = {}
        self.scored_pool: dict[str, Any] | None = None  # identity of the pool Stage II scored

    # -- model -------------------------------------------------------------------------------
    @property
    def lm(self) -> LoadedModel:
        if self._lm is None:
            t0 = time.perf_counter()
            rt = self.runtime
            self._lm = load_model(self.model_spec, device=rt.device, dtype=rt.dtype,
                                  trust_remote_code=rt.trust_remote_code)
            self.times.timed("load_model", t0)
        return self._lm

    def worker_model_spec(self) -> str:
        """What a worker passes to ``load_model``: ``default`` (each node resolves its own copy) or the
        folder this selector's model came from."""
        if self.model_spec == "default" or self._lm is None:
            return self.model_spec
        return self._lm.path

    def release_model(self) -> None:
        """Drop this process's model copy (scale-out engines: the workers get every GPU)."""
        self._lm = None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    @staticmethod
    def file_identity(path: str | Path) -> dict[str, Any]:
        """How run.json and the settings keys name an input file."""
        return file_identity(path)

    def renderer(self, scope: str | None = None) -> Renderer:
        cfg = self.render_config if scope is None else replace(self.render_config, scope=scope)
        return Renderer(self.lm.tokenizer, cfg)

    @property
    def hidden_layer(self) -> int | None:
        """The layer fingerprints and pool states come from on this model (``FingerprintConfig.layer_for``)."""
        return self.fingerprint_config.layer_for(lambda: int(self.lm.model.config.num_hidden_layers))

    def model_identity(self) -> dict[str, Any]:
        lm = self.lm
        p = next(lm.model.parameters())
        return {"name": lm.name, "path": lm.path, "sha256": lm.sha256, "class": type(lm.model).__name__,
                "dtype": str(p.dtype).replace("torch.", ""), "device": str(p.device),
                "layers": int(lm.model.config.num_hidden_layers)}

    # -- Stage I -----------------------------------------------------------------------------
    def _sequences(self, items: Iterable[Any], renderer: Renderer) -> Iterator[TokenSequence]:
        for it in items:
            if isinstance(it, TokenSequence):
                yield it
            elif isinstance(it, Record):
                yield renderer(it)
            elif isinstance(it, (list, tuple)) and it and isinstance(it[0], Message):
                yield renderer.render(it)
            else:
                yield as_sequence(it)

    def fit(self, targets: str | Path | Iterable[Any], *, format: str | None = None) -> TrimSelector:
        """Stage I: fingerprints of the target set (a file, records, message lists or sequences)."""
        t0 = time.perf_counter()
        renderer = self.renderer()
        if isinstance(targets, (str, Path)):
            stats = ReadStats()
            records = list(read_records(targets, format, stats=stats))
            self.stats["targets"] = stats.to_dict()
            items: Iterable[Any] = records
        else:
            items = targets
        seqs = list(self._sequences(items, renderer))
        fc = self.fingerprint_config
        fp = build_fingerprints(self.lm.model, seqs, fc.layers, fc.row_weight, fc.col_weight,
                                batch_tokens=self.runtime.batch_tokens, hidden_layer=self.hidden_layer)
        fp.meta.update({"model": self.model_identity(), "render": to_dict(self.render_config),
                        "fingerprint": to_dict(fc),
                        "n_truncated_targets": int(sum(s.n_truncated > 0 for s in seqs))})
        if isinstance(targets, (str, Path)):
            fp.meta["targets"] = file_identity(targets)
            fp.meta["stage1_key"] = self.stage1_key(targets, format)
        self.fingerprints = fp
        self.times.timed("stage1_fingerprints", t0)
        return self

    def stage1_key(self, targets: str | Path, format: str | None = None) -> str:
        """Identity of a Stage I result: targets file, render/fingerprint settings, model weights."""
        return config_hash(self.render_config, self.fingerprint_config,
                           {"targets": file_identity(targets), "format": format, "model": self.lm.sha256})

    def load_fingerprints(self, path: str | Path, *, check_model: bool = True) -> TrimSelector:
        fp = Fingerprints.load(path)
        want = fp.meta.get("model", {}).get("sha256")
        if check_model and want and want != self.lm.sha256:
            raise ValueError(f"{path} was built with model {fp.meta['model'].get('name')} (sha256 {want[:12]}…) "
                             f"but the scoring model is {self.lm.name} (sha256 {self.lm.sha256[:12]}…); "
                             "fingerprints only match the hidden states of the model that built them")
        self.fingerprints = fp
        return self

    # -- Stage II ----------------------------------------------------------------------------
    def pool_idf(self, pool: str | Path, *, format: str | None = None, skip_invalid: bool = False) -> np.ndarray:
        """The IDF table of the pool (``--idf``), over its rendered token sequences."""
        renderer = self.renderer()
        recs = read_records(pool, format, skip_invalid=skip_invalid)
        return token_idf((renderer(r) for r in recs), int(self.lm.model.get_input_embeddings().weight.shape[0]))

    def score_pool(
        self,
        pool: str | Path,
        out_dir: str | Path,
        *,
        format: str | None = None,
        skip_invalid: bool = False,
        overwrite: bool = False,
        shard: tuple[int, int] | None = None,
        on_part: Callable[[int], None] | None = None,
    ) -> pa.Table:
        """Stage II over a pool file into ``out_dir/parts``; returns the merged score table.

        Chunks already on disk are skipped, so rerunning after a crash continues where it stopped
        and gives identical results. ``shard=(i, n)`` scores only chunks ``k`` with ``k % n == i``
        (Slurm array jobs); the parts of all shards merge into the same table. ``on_part(k)`` runs
        after part ``k`` is written (the engines' fault hook, :class:`~trim_select.engines.base.FaultInjector`).
        """
        if self.fingerprints is None:
            raise RuntimeError("call fit() or load_fingerprints() first")
        out_dir, t0 = Path(out_dir), time.perf_counter()
        rt, sc = self.runtime, self.score_config
        renderer = self.renderer()
        self.scored_pool = file_identity(pool)  # the digest coreset.jsonl must be written from
        resolve_generic(self, pool, out_dir, format=format, skip_invalid=skip_invalid)  # None unless asked
        writer = self.score_writer(pool, out_dir, format=format, skip_invalid=skip_invalid, overwrite=overwrite,
                                   shard=shard)
        idf = None
        if sc.idf:
            t1 = time.perf_counter()
            idf = self.pool_idf(pool, format=format, skip_invalid=skip_invalid)
            self.times.timed("idf", t1)
        scorer = self.make_scorer(idf)
        stats = ReadStats()
        rejects = RejectWriter(out_dir / "rejected.jsonl")
        records = read_records(pool, format, skip_invalid=skip_invalid, stats=stats, on_reject=rejects,
                               track_ids=False)
        bar = progress_bar(count_rows(pool), "Stage II scoring", self.progress)
        chunks = _chunks(records, rt.chunk_size)
        with ThreadPoolExecutor(max_workers=1) as pool_ex:
            pending = None
            for k, chunk in enumerate(chunks):
                mine = shard is None or k % shard[1] == shard[0]
                fut = None if (writer.done(k) or not mine) else pool_ex.submit(render_all, renderer, chunk)
                if pending is not None:
                    _finish_chunk(writer, scorer, *pending, bar, on_part)
                pending = (k, chunk, fut)
            if pending is not None:
                _finish_chunk(writer, scorer, *pending, bar, on_part)
        bar.close()
        rejects.close()
        table = writer.read_all()
        self.stats["chunks_computed"] = self.stats.get("chunks_computed", 0) + writer.computed
        stats.duplicate_ids, stats.duplicate_examples = duplicate_ids(table)
        self.stats["pool"] = stats.to_dict()
        self.stats["pool"]["truncated"] = column_sum(table, "n_truncated", count_nonzero=True)
        self.stats["pool"]["tokens"] = column_sum(table, "n_tokens")
        self.times.timed("stage2_scoring", t0)
        return table

    def generic_fingerprints(self) -> Fingerprints | None:
        """The generic correction's fingerprints, ``None`` while it is off; refuses when it is on but
        they were not resolved yet (``score_pool`` / :func:`trim_select.generic.resolve_generic` do it)."""
        if not self.score_config.generic_rows:
            return None
        if self.generic is None:
            raise RuntimeError("generic_rows is set but no generic fingerprints are resolved (score_pool does it)")
        return self.generic

    def make_scorer(self, idf: np.ndarray | None = None) -> Scorer:
        """The Stage II scorer for the fitted fingerprints, with this selector's score/runtime configs."""
        return make_scorer(self.lm.model, self.fingerprints, self.score_config, self.runtime, idf,
                           hidden_layer=self.hidden_layer, generic=self.generic_fingerprints())

    def scores_key(self, pool: str | Path, *, format: str | None = None, skip_invalid: bool = False) -> str:
        """The settings key pinned in ``parts/manifest.json``: parts with another key are not mixed in."""
        if self.fingerprints is None:
            raise RuntimeError("call fit() or load_fingerprints() first")
        return config_hash(self.render_config, self.score_config,
                           {"fp": _fp_hash(self.fingerprints), "model": self.lm.sha256,
                            "chunk": self.runtime.chunk_size, "pool": file_identity(pool), "format": format,
                            "skip_invalid": skip_invalid, **self.extension_key()})

    def extension_key(self) -> dict[str, Any]:
        """What the extensions add to the Stage II key (nothing while they are off, so earlier keys
        stay valid): the hidden layer, and the generic fingerprints' content."""
        out: dict[str, Any] = {}
        if self.hidden_layer is not None:
            out["hidden_layer"] = self.hidden_layer
        generic = self.generic_fingerprints()
        if generic is not None:
            out["generic"] = _fp_hash(generic)
        return out

    def score_writer(self, pool: str | Path, out_dir: Path, *, format: str | None, skip_invalid: bool,
                     overwrite: bool, shard: tuple[int, int] | None) -> ScoreWriter:
        """The part writer of ``out_dir`` pinned to this run's settings key and input files."""
        return ScoreWriter(out_dir, self.scores_key(pool, format=format, skip_invalid=skip_invalid),
                           overwrite=overwrite, shard="" if shard is None else f"{shard[0]}/{shard[1]}",
                           inputs=self.score_inputs(pool))

    def score_inputs(self, pool: str | Path) -> dict[str, Any]:
        """The input files Stage II results depend on (recorded in ``parts/manifest.json``)."""
        fp_meta = self.fingerprints.meta if self.fingerprints is not None else {}
        return {"pool": file_identity(pool), "targets": fp_meta.get("targets")}

    # -- selection ---------------------------------------------------------------------------
    def select(self, table: pa.Table, budget: str | int | float) -> tuple[pa.Table, np.ndarray]:
        """Rank (ties to the lower pool index) and take the budget; adds ``selected`` and ``rank``."""
        return add_selection(table, budget)

    # -- everything --------------------------------------------------------------------------
    def run(
        self,
        pool: str | Path,
        out_dir: str | Path,
        budget: str | int | float | None,
        *,
        targets: str | Path | None = None,
        fingerprints: str | Path | None = None,
        format: str | None = None,
        target_format: str | None = None,
        skip_invalid: bool = False,
        overwrite: bool = False,
        extra: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Stage I (or a saved fingerprints file) -> Stage II -> selection; writes all outputs, run.json
        last. Hands off to the in-process engine (:func:`trim_select.engines.base.run_in_process`).

        ``out_dir`` is locked for the call (:mod:`trim_select.locking`); a targets or pool file whose
        content changed since the results there were computed is refused unless ``overwrite``."""
        with folder_lock(out_dir, "select"):
            report = run_in_process(self, pool, out_dir, budget, targets=targets, fingerprints=fingerprints,
                                    format=format, target_format=target_format, skip_invalid=skip_invalid,
                                    overwrite=overwrite, extra=extra)
            report.write(out_dir)
        return report

    def finalize(self, pool: str | Path, out_dir: str | Path, table: pa.Table, budget: Any, *,
                 format: str | None = None, extra: dict[str, Any] | None = None) -> RunReport:
        """Selection, ``coreset.jsonl`` and ``scores.parquet``; returns the (unwritten) report."""
        t0 = time.perf_counter()
        table, chosen = write_selection(pool, out_dir, table, budget, format=format,
                                        digest=self.scored_pool["xxh3_128"] if self.scored_pool else None)
        self.times.timed("selection", t0)
        fp = self.fingerprints
        return select_report(
            pool=pool, budget=budget, table=table, chosen=chosen, stats=self.stats,
            config={"render": to_dict(self.render_config), "fingerprint": to_dict(self.fingerprint_config),
                    "scoring": to_dict(self.score_config), "runtime": to_dict(self.runtime)},
            model=self.model_identity(),
            fingerprints={"classes": len(fp) if fp else None, **(fp.meta if fp else {})},
            timings=self.times.seconds, extra={**self.generic_report(), **(extra or {})},
            scored_pool=self.scored_pool)

    def generic_report(self) -> dict[str, Any]:
        """run.json's ``generic`` section (the generic rows' indices and ids), when the correction is on."""
        if not self.score_config.generic_rows or self.generic is None:
            return {}
        return generic_summary(self.generic)


def _finish_chunk(writer: ScoreWriter, scorer: Scorer, k: int, chunk: list[Record], fut: Any, bar: Any,
                  on_part: Callable[[int], None] | None) -> None:
    """Score a rendered chunk (``fut`` is None when its part file already exists) and write it; then
    stop if SIGINT/SIGTERM came whose own KeyboardInterrupt a finalizer swallowed (:mod:`.interrupts`)."""
    if fut is None:
        bar.update(len(chunk))
    else:
        score_chunk(writer, k, scorer, chunk, fut.result(), on_batch=bar.update, on_part=on_part)
    check_stop()


def _fp_hash(fp: Fingerprints) -> str:
    h = hashlib.sha256(fp.token_ids.tobytes())
    h.update(np.ascontiguousarray(fp.vectors).tobytes())
    return h.hexdigest()[:16]


def _chunks(records: Iterable[Record], size: int) -> Iterator[list[Record]]:
    it = iter(records)
    while chunk := list(islice(it, size)):
        yield chunk


def read_scores(out_dir: str | Path) -> pa.Table:
    return pq.read_table(Path(out_dir) / "scores.parquet")


def load_run(out_dir: str | Path) -> dict[str, Any]:
    return json.loads((Path(out_dir) / "run.json").read_text())
