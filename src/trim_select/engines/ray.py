"""Engine ``ray``: Stage II as a Ray Data pipeline (``docs/SPEC.md`` "Engines").

The pool is read as a Ray dataset with one block per chunk (deterministic boundaries by row index,
only unfinished chunks are read), and ``map_batches`` runs an actor pool (one model copy per actor,
``num_gpus=1`` on GPU clusters) that scores each block with :func:`.base.score_chunk` and writes
its part through :class:`~trim_select.io.ScoreWriter`. Ray is imported only inside this module's
functions (an optional dependency), so importing trim-select never imports Ray.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from ..config import RenderConfig, RuntimeConfig, ScoreConfig
from ..data import DataError, ReadStats, Record, Renderer, parse_raw_row, read_records
from ..fingerprints import Fingerprints
from ..io import ScoreWriter
from ..models import load_model
from ..progress import progress_bar
from ..selector import TrimSelector
from .base import ShardPlan, config_from_dict, make_scorer, part_path, render_all, score_chunk
from .faults import FaultInjector

_BOM = b"\xef\xbb\xbf"


@dataclass(frozen=True)
class ChunkSpan:
    """Rows ``[start, start + rows)`` of the pool (row = non-blank line / table row), chunk ``chunk``.

    For JSON Lines files ``offset``/``end`` are the byte range and ``line`` the 1-based line of the
    first row, so a reader seeks straight to it.
    """

    chunk: int
    start: int
    rows: int
    line: int = 0
    offset: int = 0
    end: int = 0


def plan_chunks(pool: str | Path, chunk_size: int) -> list[ChunkSpan]:
    """Deterministic chunk boundaries by row index, from one pass over the bytes (no parsing)."""
    p = Path(pool)
    name = p.name.lower()
    spans: list[ChunkSpan] = []
    if p.is_file() and name.endswith((".jsonl", ".ndjson")):
        starts: list[tuple[int, int, int]] = []  # (row, line, offset)
        row = offset = 0
        with open(p, "rb") as fh:
            for lineno, raw in enumerate(fh, start=1):
                if raw[3:].strip() if lineno == 1 and raw.startswith(_BOM) else raw.strip():
                    if row % chunk_size == 0:
                        starts.append((row, lineno, offset))
                    row += 1
                offset += len(raw)
        for k, (r, line, off) in enumerate(starts):
            end = starts[k + 1][2] if k + 1 < len(starts) else offset
            spans.append(ChunkSpan(k, r, min(chunk_size, row - r), line, off, end))
    elif p.is_file() and name.endswith(".parquet"):
        n = pq.ParquetFile(p).metadata.num_rows
        spans = [ChunkSpan(k, s, min(chunk_size, n - s)) for k, s in enumerate(range(0, n, chunk_size))]
    else:
        raise DataError(p, None, None, "the ray engine reads .jsonl and .parquet pools (seekable by row); "
                        "convert this file, or use --engine local")
    return spans


def read_span_rows(pool: str | Path, span: ChunkSpan) -> Iterator[tuple[int, int, bytes]]:
    """``(index, line, raw bytes)`` of the rows of one chunk, as :func:`trim_select.data.read_records`
    numbers and serialises them."""
    p = Path(pool)
    if p.name.lower().endswith(".parquet"):
        pf = pq.ParquetFile(p)
        first, tables, seen = None, [], 0
        for g in range(pf.metadata.num_row_groups):
            n = pf.metadata.row_group(g).num_rows
            if seen + n > span.start and seen < span.start + span.rows:
                if first is None:
                    first = seen
                tables.append(pf.read_row_group(g))
            seen += n
        table = pa.concat_tables(tables).slice(span.start - (first or 0), span.rows)
        for k, row in enumerate(table.to_pylist()):
            raw = json.dumps(row, ensure_ascii=False, default=str).encode("utf-8")
            yield span.start + k, span.start + k + 1, raw
        return
    with open(p, "rb") as fh:
        fh.seek(span.offset)
        data = fh.read(span.end - span.offset)
    index, line = span.start, span.line
    for raw in data.split(b"\n"):
        stripped = raw.rstrip(b"\r\n")
        if line == 1 and stripped.startswith(_BOM):
            stripped = stripped[3:]  # as trim_select.data reads it
        if stripped.strip():
            if index >= span.start + span.rows:
                break
            yield index, line, stripped
            index += 1
        line += 1


def detect_pool_format(pool: str | Path, format: str | None) -> str:
    """The format every row is parsed with: ``format``, or that of the first readable row."""
    if format is not None:
        return format
    stats = ReadStats()
    for _ in read_records(pool, None, skip_invalid=True, stats=stats):
        return next(iter(stats.formats))
    raise DataError(pool, None, None, "no row of the pool is a readable record")


def parse_rows(pool: str, rows: list[tuple[int, int, bytes]], fmt: str, skip_invalid: bool) -> list[Record]:
    """The records of raw rows, validated as :func:`trim_select.data.read_records` does."""
    out = []
    for index, line, raw in rows:
        try:
            out.append(parse_raw_row(pool, index, line, raw, fmt))
        except DataError:
            if not skip_invalid:
                raise
    return out


def pool_datasource(pool: str, spans: list[ChunkSpan]) -> Any:
    """A Ray Datasource over the pool: one read task and one block per chunk in ``spans``
    (defined here so that importing this module does not import Ray)."""
    from ray.data import Datasource
    from ray.data.block import BlockMetadata
    from ray.data.datasource import ReadTask

    class PoolChunkDatasource(Datasource):
        def estimate_inmemory_data_size(self) -> int | None:
            return sum(s.end - s.offset for s in spans) or None

        def get_read_tasks(self, parallelism: int, per_task_row_limit: int | None = None,
                           data_context: Any = None) -> list[Any]:
            return [ReadTask(lambda s=s: [_span_block(pool, s)],
                             BlockMetadata(num_rows=s.rows, size_bytes=max(1, s.end - s.offset),
                                           input_files=(pool,), exec_stats=None))
                    for s in spans]

    return PoolChunkDatasource()


def _span_block(pool: str, span: ChunkSpan) -> pa.Table:
    rows = list(read_span_rows(pool, span))
    return pa.table({"chunk": pa.array([span.chunk] * len(rows), pa.int64()),
                     "expected": pa.array([span.rows] * len(rows), pa.int64()),
                     "index": pa.array([r[0] for r in rows], pa.int64()),
                     "line": pa.array([r[1] for r in rows], pa.int64()),
                     "raw": pa.array([r[2] for r in rows], pa.binary())})


class ChunkScorer:
    """Ray actor: loads the model once, scores whole chunks and writes their part files.

    Expected failures (a bad pool row, a model that differs from the driver's) come back as an
    ``error`` row instead of an exception: Ray would restart the actor and hide the message.
    """

    def __init__(self, spec: dict[str, Any], shared: Any):
        self.spec = spec
        self.fault = FaultInjector(**spec["fault"])
        self.error: str | None = None
        try:
            self._load(spec, shared)
        except (ValueError, RuntimeError, OSError) as exc:
            self.error = f"{type(exc).__name__}: {exc}"

    def _load(self, spec: dict[str, Any], shared: Any) -> None:
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        import ray

        if spec["threads"]:
            torch.set_num_threads(spec["threads"])
        arrays = ray.get(shared) if isinstance(shared, ray.ObjectRef) else shared
        render, scoring, runtime = (config_from_dict(RenderConfig, spec["render"]),
                                    config_from_dict(ScoreConfig, spec["scoring"]),
                                    config_from_dict(RuntimeConfig, spec["runtime"]))
        lm = load_model(spec["model"], device="cuda" if spec["gpu"] else "cpu", dtype=runtime.dtype,
                        trust_remote_code=runtime.trust_remote_code)
        if lm.sha256 != spec["model_sha256"]:
            raise RuntimeError(f"the model on this node ({lm.path}) is not the one the driver used "
                               "(weights differ): install the same model on every node")
        layer = spec["hidden_layer"]  # the layer the driver's fingerprints were built at (None: the last)
        fps = {name: Fingerprints(*(np.array(fp[k]) for k in ("token_ids", "vectors", "counts")),
                                  {"hidden_layer": layer},
                                  None if fp.get("nearest") is None else np.array(fp["nearest"]))
               for name, fp in arrays["fingerprints"].items()}
        idf = None if arrays.get("idf") is None else np.array(arrays["idf"])
        self.scorer = make_scorer(lm.model, fps, scoring, runtime, idf, hidden_layer=layer)
        self.renderer = Renderer(lm.tokenizer, render)
        # parts go through the one writer per target; a shard label keeps it off other actors' temporary files
        self.writers = {name: ScoreWriter(t["out"], t["key"], shard="ray") for name, t in spec["targets"].items()}

    def __call__(self, batch: pa.Table) -> pa.Table:
        done: dict[str, list[Any]] = {"chunk": [], "rows": [], "error": []}
        for k in np.unique(batch.column("chunk").to_numpy()):
            part = batch.filter(pc.equal(batch.column("chunk"), pa.scalar(int(k), pa.int64())))
            expected = int(part.column("expected")[0].as_py())
            error = self.error
            if error is None and part.num_rows != expected:
                error = f"chunk {k} arrived split ({part.num_rows} of {expected} rows): lower --chunk-size"
            if error is None:
                try:
                    self._score_chunk(int(k), part)
                except (ValueError, RuntimeError) as exc:  # DataError is a ValueError
                    error = str(exc)
            done["chunk"].append(int(k))
            done["rows"].append(part.num_rows if error is None else 0)
            done["error"].append(error)
        return pa.table({"chunk": pa.array(done["chunk"], pa.int64()), "rows": pa.array(done["rows"], pa.int64()),
                         "error": pa.array(done["error"], pa.string())})

    def _score_chunk(self, k: int, part: pa.Table) -> None:
        rows = list(zip(part.column("index").to_pylist(), part.column("line").to_pylist(),
                        part.column("raw").to_pylist(), strict=True))
        records = parse_rows(self.spec["pool"], rows, self.spec["fmt"], self.spec["skip_invalid"])
        todo = {name: w for name, w in self.writers.items() if not w.done(k)}
        score_chunk(todo, k, self.scorer, records, render_all(self.renderer, records),
                    on_part=lambda _k: self.fault.part_written())


_RAY_CONTEXT = ("target_max_block_size", "enable_progress_bars", "print_on_execution_start")


def import_ray() -> Any:
    try:
        import ray
    except ModuleNotFoundError:
        raise RuntimeError("--engine ray needs Ray: pip install 'trim-select[ray]'") from None
    return ray


def broadcast(sel: TrimSelector, plan: ShardPlan, fps: Mapping[str, Fingerprints]) -> dict[str, Any]:
    """What every actor gets through the object store: each target's fingerprint arrays (with the
    unseen-token map) and the pool's IDF table (``--idf``, computed here once)."""
    shared: dict[str, Any] = {"fingerprints": {name: {"token_ids": fp.token_ids, "vectors": fp.vectors,
                                                      "counts": fp.counts, "nearest": fp.nearest}
                                               for name, fp in fps.items()}}
    if sel.score_config.idf:
        shared["idf"] = sel.pool_idf(plan.pool, format=plan.format, skip_invalid=plan.skip_invalid)
    return shared


def actor_shape(ray: Any, plan: ShardPlan, workers: int | None) -> tuple[int, int, int]:
    """(actors, GPUs in the cluster used, torch threads per CPU actor)."""
    resources = ray.cluster_resources()
    runtime = config_from_dict(RuntimeConfig, plan.runtime)
    n_gpu = int(resources.get("GPU", 0)) if runtime.device in ("auto", "cuda") else 0
    size = workers or (n_gpu if n_gpu else 1)
    return size, n_gpu, 0 if n_gpu else max(1, int(resources.get("CPU", 1)) // size)


@contextmanager
def quiet_data_context(ray: Any) -> Iterator[None]:
    """Ray Data settings for one pipeline (a chunk is one block; no progress bars), restored after."""
    ctx = ray.data.DataContext.get_current()
    saved = {k: getattr(ctx, k) for k in _RAY_CONTEXT}
    ctx.target_max_block_size = max(ctx.target_max_block_size or 0, 1 << 32)
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    try:
        yield
    finally:
        for k, v in saved.items():
            setattr(ctx, k, v)


def drain(ray: Any, plan: ShardPlan, pending: list[ChunkSpan], spec: dict[str, Any], shared: Any,
          size: int, n_gpu: int, progress: bool) -> None:
    """Run the pipeline over ``pending``; the first error row an actor returns is raised here."""
    # reading a chunk is a seek and a few MB: the read tasks reserve no CPU, so that actors holding
    # every CPU cannot starve them (when Ray does not fuse the read into the actors)
    ds = ray.data.read_datasource(pool_datasource(plan.pool, pending), override_num_blocks=len(pending), num_cpus=0)
    ds = ds.map_batches(ChunkScorer, fn_constructor_kwargs={"spec": spec, "shared": ray.put(shared)},
                        batch_size=None, batch_format="pyarrow", compute=ray.data.ActorPoolStrategy(size=size),
                        num_gpus=1 if n_gpu else None, num_cpus=1 if n_gpu else spec["threads"])
    bar = progress_bar(sum(s.rows for s in pending), f"Stage II scoring (ray, {size} actors)", progress)
    try:
        for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
            errors = [e for e in batch.column("error").to_pylist() if e]
            if errors:  # e.g. a bad pool row: the message of the single-process run
                raise ValueError(errors[0])
            bar.update(int(pc.sum(batch.column("rows")).as_py() or 0))
    finally:
        bar.close()


def score_ray(sel: TrimSelector, plans: Mapping[str, ShardPlan], dirs: Mapping[str, Path],
              fps: Mapping[str, Fingerprints], *, workers: int | None = None, ray_address: str | None = None,
              progress: bool = True) -> dict[str, Any]:
    """Run Stage II as a Ray Data pipeline to completion: target set ``name`` (settings ``plans[name]``,
    fingerprints ``fps[name]``) into ``dirs[name]``, all from one forward per batch; only chunks
    missing in some folder are read. ``sel`` still holds the model (released here, after the IDF table)."""
    ray = import_ray()
    t0 = time.perf_counter()
    plan = next(iter(plans.values()))
    spans = plan_chunks(plan.pool, plan.chunk_size)
    pending = [s for s in spans if any(not part_path(d, s.chunk).exists() for d in dirs.values())]
    info: dict[str, Any] = {"engine": "ray", "chunks": len(spans), "chunks_scored": len(pending)}
    if not pending:
        return info
    spec = {"model": plan.model_spec, "model_sha256": sel.lm.sha256, "render": plan.render,
            "scoring": plan.scoring, "runtime": plan.runtime, "pool": plan.pool, "hidden_layer": sel.hidden_layer,
            "targets": {n: {"out": str(Path(d).resolve()), "key": plans[n].key} for n, d in dirs.items()},
            "fmt": detect_pool_format(plan.pool, plan.format), "skip_invalid": plan.skip_invalid,
            "fault": FaultInjector.settings()}
    shared = broadcast(sel, plan, fps)
    sel.release_model()
    started = not ray.is_initialized()
    if started:
        ray.init(address=ray_address, include_dashboard=False, logging_level=logging.WARNING, log_to_driver=True)
    try:
        size, n_gpu, threads = actor_shape(ray, plan, workers)
        spec.update(gpu=bool(n_gpu), threads=threads)
        with quiet_data_context(ray):
            drain(ray, plan, pending, spec, shared, size, n_gpu, progress)
        info.update({"actors": size, "gpus_per_actor": 1 if n_gpu else 0, "threads_per_actor": threads,
                     "ray_address": ray_address or "local", "scoring_s": round(time.perf_counter() - t0, 3)})
        return info
    finally:
        if started:
            ray.shutdown()
