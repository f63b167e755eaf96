"""``TrimSelector``: loading -> rendering -> Stage I -> Stage II -> selection, with outputs on disk.

In the spirit of DSIR's ``fit`` / ``compute_importance_weights`` / ``resample``::

    sel = TrimSelector(model="default")
    sel.fit("targets.jsonl")                      # Stage I  -> sel.fingerprints
    table = sel.score_pool("pool.jsonl", "out/")  # Stage II -> out/scores.parquet (resumable)
    sel.select("out/", budget="5%")               # coreset.jsonl, run.json

``run`` does all three. Outputs in ``out_dir``: ``fingerprints.safetensors``, ``parts/`` (one
parquet per scored chunk; the resume unit), ``scores.parquet``, ``coreset.jsonl`` (selected rows
byte-for-byte, best first), ``rejected.jsonl`` (with ``skip_invalid``), ``run.json``.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .config import FingerprintConfig, RenderConfig, RuntimeConfig, ScoreConfig, config_hash, to_dict
from .data import DataError, Message, ReadStats, Record, Renderer, TokenSequence, read_records
from .fingerprints import Fingerprints, build_fingerprints
from .io import RejectWriter, ScoreWriter, atomic_path, package_versions, write_json, write_parquet
from .io import file_identity as _file_identity
from .models import LoadedModel, load_model
from .scoring import Scorer, token_idf
from .selection import rank, select_top

log = logging.getLogger(__name__)


@dataclass
class StageTimes:
    seconds: dict[str, float] = field(default_factory=dict)

    def add(self, name: str, t0: float) -> None:
        self.seconds[name] = round(self.seconds.get(name, 0.0) + time.perf_counter() - t0, 3)


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
        self.times = StageTimes()
        self.stats: dict[str, Any] = {}

    # -- model -------------------------------------------------------------------------------
    @property
    def lm(self) -> LoadedModel:
        if self._lm is None:
            t0 = time.perf_counter()
            rt = self.runtime
            self._lm = load_model(self.model_spec, device=rt.device, dtype=rt.dtype,
                                  trust_remote_code=rt.trust_remote_code)
            self.times.add("load_model", t0)
        return self._lm

    def renderer(self, scope: str | None = None) -> Renderer:
        cfg = self.render_config if scope is None else replace(self.render_config, scope=scope)
        return Renderer(self.lm.tokenizer, cfg)

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
                from .data import as_sequence

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
                                batch_tokens=self.runtime.batch_tokens)
        fp.meta.update({"model": self.model_identity(), "render": to_dict(self.render_config),
                        "fingerprint": to_dict(fc),
                        "n_truncated_targets": int(sum(s.n_truncated > 0 for s in seqs))})
        if isinstance(targets, (str, Path)):
            fp.meta["targets"] = _file_identity(targets)
            fp.meta["stage1_key"] = self.stage1_key(targets, format)
        self.fingerprints = fp
        self.times.add("stage1_fingerprints", t0)
        return self

    def stage1_key(self, targets: str | Path, format: str | None = None) -> str:
        """Identity of a Stage I result: targets file, render/fingerprint settings, model weights."""
        return config_hash(self.render_config, self.fingerprint_config,
                           {"targets": _file_identity(targets), "format": format, "model": self.lm.sha256})

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
    def _idf(self, pool: str | Path, renderer: Renderer, fmt: str | None, skip_invalid: bool) -> np.ndarray:
        recs = read_records(pool, fmt, skip_invalid=skip_invalid)
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
    ) -> pa.Table:
        """Stage II over a pool file into ``out_dir/parts``; returns the merged score table.

        Chunks already on disk are skipped, so rerunning after a crash continues where it stopped
        and gives identical results. ``shard=(i, n)`` scores only chunks ``k`` with ``k % n == i``
        (Slurm array jobs); the parts of all shards merge into the same table.
        """
        if self.fingerprints is None:
            raise RuntimeError("call fit() or load_fingerprints() first")
        out_dir = Path(out_dir)
        t0 = time.perf_counter()
        rt, sc = self.runtime, self.score_config
        renderer = self.renderer()
        writer = ScoreWriter(out_dir, self.scores_key(pool, format=format, skip_invalid=skip_invalid),
                             overwrite=overwrite, shard="" if shard is None else f"{shard[0]}/{shard[1]}")
        idf = None
        if sc.idf:
            t1 = time.perf_counter()
            idf = self._idf(pool, renderer, format, skip_invalid)
            self.times.add("idf", t1)
        scorer = Scorer(self.lm.model, self.fingerprints, penalty=sc.penalty, mean_weight=sc.mean_weight,
                        max_weight=sc.max_weight, coverage_weight=sc.coverage_weight, idf=idf,
                        batch_tokens=rt.batch_tokens, max_batch_size=rt.max_batch_size, compile=rt.compile)
        stats = ReadStats()
        rejects = RejectWriter(out_dir / "rejected.jsonl")
        records = read_records(pool, format, skip_invalid=skip_invalid, stats=stats, on_reject=rejects,
                               track_ids=False)
        total = _count_rows(pool)
        bar = _progress(total, "Stage II scoring", self.progress)

        def render_chunk(chunk: list[Record]) -> list[TokenSequence]:
            return [renderer(r) for r in chunk]

        chunks = _chunks(records, rt.chunk_size)
        with ThreadPoolExecutor(max_workers=1) as pool_ex:
            pending = None
            for k, chunk in enumerate(chunks):
                mine = shard is None or k % shard[1] == shard[0]
                fut = None if (writer.done(k) or not mine) else pool_ex.submit(render_chunk, chunk)
                if pending is not None:
                    self._finish_chunk(writer, scorer, *pending, bar)
                pending = (k, chunk, fut)
            if pending is not None:
                self._finish_chunk(writer, scorer, *pending, bar)
        bar.close()
        rejects.close()
        table = writer.read_all()
        stats.duplicate_ids, stats.duplicate_examples = duplicate_ids(table)
        self.stats["pool"] = stats.to_dict()
        self.stats["pool"]["truncated"] = int(pc_sum(table, "n_truncated", count_nonzero=True))
        self.stats["pool"]["tokens"] = int(pc_sum(table, "n_tokens"))
        self.times.add("stage2_scoring", t0)
        return table

    def scores_key(self, pool: str | Path, *, format: str | None = None, skip_invalid: bool = False) -> str:
        """The settings key pinned in ``parts/manifest.json``: parts with another key are not mixed in."""
        if self.fingerprints is None:
            raise RuntimeError("call fit() or load_fingerprints() first")
        return config_hash(self.render_config, self.score_config,
                           {"fp": _fp_hash(self.fingerprints), "model": self.lm.sha256,
                            "chunk": self.runtime.chunk_size, "pool": _file_identity(pool), "format": format,
                            "skip_invalid": skip_invalid})

    @staticmethod
    def _finish_chunk(writer: ScoreWriter, scorer: Scorer, k: int, chunk: list[Record], fut: Any, bar: Any) -> None:
        """Score a rendered chunk (``fut`` is None when its part file already exists) and write it."""
        if fut is None:
            bar.update(len(chunk))
        else:
            seqs = fut.result()
            det = scorer.score_sequences(seqs, on_batch=bar.update)
            cols = {"index": np.array([r.index for r in chunk], dtype=np.int64),
                    "id": [r.id for r in chunk], **det.columns(),
                    "n_truncated": np.array([s.n_truncated for s in seqs], dtype=np.int64)}
            writer.write(k, cols)

    # -- selection ---------------------------------------------------------------------------
    def select(self, table: pa.Table, budget: str | int | float) -> tuple[pa.Table, np.ndarray]:
        """Rank (ties to the lower pool index) and take the budget; adds ``selected`` and ``rank``."""
        scores = table.column("score").to_numpy(zero_copy_only=False)
        chosen = select_top(scores, budget)
        order = rank(scores)
        ranks = np.empty(len(scores), dtype=np.int64)
        ranks[order] = np.arange(1, len(scores) + 1)
        finite = np.isfinite(scores)
        selected = np.zeros(len(scores), dtype=bool)
        selected[chosen] = True
        table = table.append_column("selected", pa.array(selected))
        table = table.append_column("rank", pa.array(np.where(finite, ranks, 0), mask=~finite))
        return table, chosen

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
        """Stage I (or a saved fingerprints file) -> Stage II -> selection; writes all outputs."""
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        t_start = time.perf_counter()
        fp_path = out_dir / "fingerprints.safetensors"
        if fingerprints is not None:
            self.load_fingerprints(fingerprints)
        elif targets is not None:
            cached = Fingerprints.load(fp_path).meta.get("stage1_key") if fp_path.exists() else None
            if cached is not None and cached == self.stage1_key(targets, target_format):
                self.load_fingerprints(fp_path)  # resume: Stage I of this exact input is done
            else:
                self.fit(targets, format=target_format)
        elif fp_path.exists():
            self.load_fingerprints(fp_path)
        else:
            raise ValueError("give targets or a fingerprints file")
        if fingerprints is None or Path(fingerprints).resolve() != fp_path.resolve():
            self.fingerprints.save(fp_path)
        table = self.score_pool(pool, out_dir, format=format, skip_invalid=skip_invalid, overwrite=overwrite)
        sources = {"targets": _file_identity(targets) if targets is not None else None,
                   "fingerprints_file": str(fingerprints) if fingerprints is not None else None}
        report = self.finalize(pool, out_dir, table, budget, format=format, extra={**sources, **(extra or {})})
        report["timings_s"]["total"] = round(time.perf_counter() - t_start, 3)
        write_json(out_dir / "run.json", report)
        return report

    def finalize(self, pool: str | Path, out_dir: str | Path, table: pa.Table, budget: Any, *,
                 format: str | None = None, extra: dict[str, Any] | None = None) -> dict[str, Any]:
        out_dir = Path(out_dir)
        t0 = time.perf_counter()
        chosen = np.zeros(0, dtype=np.int64)
        if budget is not None:
            table, chosen = self.select(table, budget)
            order = table.column("index").to_numpy()[chosen].tolist()
            write_coreset(pool, order, out_dir / "coreset.jsonl", format=format)
        write_parquet(out_dir / "scores.parquet", table)
        self.times.add("selection", t0)
        scores = table.column("score").to_numpy(zero_copy_only=False)
        pool_stats = self.stats.get("pool", {})
        report = {
            "command": "select",
            "pool": _file_identity(pool),
            "budget": budget,
            "counts": {
                "pool_rows": pool_stats.get("rows"),
                "scored": int(len(scores)),
                "rejected": pool_stats.get("rejected", 0),
                "blank_lines": pool_stats.get("blank_lines", 0),
                "duplicate_ids": pool_stats.get("duplicate_ids", 0),
                "truncated": pool_stats.get("truncated", 0),
                "minus_inf": int(np.isneginf(scores).sum()),
                "selected": int(len(chosen)),
                "pool_tokens": pool_stats.get("tokens"),
            },
            "read_stats": self.stats,
            "config": {"render": to_dict(self.render_config), "fingerprint": to_dict(self.fingerprint_config),
                       "scoring": to_dict(self.score_config), "runtime": to_dict(self.runtime)},
            "model": self.model_identity(),
            "fingerprints": {"classes": len(self.fingerprints) if self.fingerprints else None,
                             **(self.fingerprints.meta if self.fingerprints else {})},
            "versions": package_versions(),
            "timings_s": dict(self.times.seconds),
        }
        if extra:
            report.update(extra)
        return report


def pc_sum(table: pa.Table, col: str, *, count_nonzero: bool = False) -> int:
    """Sum of a column (or the number of non-zero entries)."""
    if col not in table.column_names or table.num_rows == 0:
        return 0
    values = np.asarray(table.column(col).to_numpy(zero_copy_only=False))
    return int((values != 0).sum() if count_nonzero else values.sum())


def duplicate_ids(table: pa.Table) -> tuple[int, list[str]]:
    """Rows whose id repeats an earlier row's id, and up to 10 such ids."""
    import pyarrow.compute as pc

    counts = pc.value_counts(table.column("id")) if table.num_rows else pa.array([], pa.struct([]))
    if not len(counts):
        return 0, []
    values = counts.field("values").to_pylist()
    n = counts.field("counts").to_numpy()
    dup = n > 1
    return int((n[dup] - 1).sum()), [values[i] for i in np.flatnonzero(dup)[:10]]


def _fp_hash(fp: Fingerprints) -> str:
    import hashlib

    h = hashlib.sha256(fp.token_ids.tobytes())
    h.update(np.ascontiguousarray(fp.vectors).tobytes())
    return h.hexdigest()[:16]


def _chunks(records: Iterable[Record], size: int) -> Iterator[list[Record]]:
    it = iter(records)
    while chunk := list(islice(it, size)):
        yield chunk


def _count_rows(path: str | Path) -> int | None:
    p = Path(path)
    if p.is_file() and p.name.endswith(".jsonl"):
        with open(p, "rb") as fh:
            return sum(1 for line in fh if line.strip())
    if p.is_file() and p.suffix == ".parquet":
        return pq.ParquetFile(p).metadata.num_rows
    return None


class _NoBar:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


def _progress(total: int | None, desc: str, enabled: bool):
    if not enabled:
        return _NoBar()
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="ex", dynamic_ncols=True, smoothing=0.1)


def write_coreset(pool: str | Path, order: list[int], path: str | Path, *, format: str | None = None) -> None:
    """Copy the selected rows (pool positions ``order``, best first) verbatim into ``path``."""
    wanted = set(order)
    raw: dict[int, bytes] = {}
    for rec in read_records(pool, format, skip_invalid=True):
        if rec.index in wanted:
            raw[rec.index] = rec.raw
    missing = wanted - set(raw)
    if missing:
        raise DataError(pool, None, None, f"{len(missing)} selected rows could not be re-read (file changed?)")
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        for i in order:
            fh.write(raw[i] + b"\n")


def read_scores(out_dir: str | Path) -> pa.Table:
    return pq.read_table(Path(out_dir) / "scores.parquet")


def load_run(out_dir: str | Path) -> dict[str, Any]:
    return json.loads((Path(out_dir) / "run.json").read_text())
