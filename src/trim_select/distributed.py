"""Scale-out of Stage II: local data-parallel workers, Ray Data, Slurm-style shards, and merge.

Every engine writes the layout of the single-process run: ``OUT/parts/part-NNNNNN.parquet``, one
file per chunk of ``chunk_size`` pool rows, written atomically, so the file is the completion
marker of its chunk; ``parts/manifest.json`` pins the settings key. Killing any worker or the
driver and rerunning the same command recomputes only the chunks without a file. Scores do not
depend on which process computed a chunk (a chunk is always batched the same way), and
selection breaks ties by pool index, so every engine gives the scores and coreset of an
uninterrupted single-process run.

Engines
  ``local``  one process per visible GPU (or ``workers`` CPU processes, torch threads split);
             worker ``i`` of ``n`` runs :meth:`TrimSelector.score_pool` with ``shard=(i, n)``.
  ``ray``    a Ray Data pipeline: the pool is read as a Ray dataset with one block per chunk
             (deterministic boundaries by row index, only unfinished chunks are read), and
             ``map_batches`` runs an actor pool (one model copy per actor, ``num_gpus=1`` on
             GPU clusters) that scores each block and writes its part file.
  shards     ``trim-select score --shard i/n`` (e.g. Slurm array jobs) scores chunks
             ``k % n == i``; ``trim-select merge OUT`` checks that every chunk is there and writes
             ``scores.parquet``, the coreset and ``run.json``.

Stage I runs once, in the driver; its fingerprints go to ``OUT/fingerprints.safetensors`` and
reach the workers from there (local, shards) or through the Ray object store (ray, with the IDF
table of ``--idf``, computed once). Each worker builds the unseen-token map once, when it loads
its model (one vocabulary x fingerprints matmul). ``OUT/shards.json`` records what ``merge``
needs (pool, settings, model identity). Ray is imported only by the ray engine.

On several nodes the pool and OUT must be on a filesystem every node sees (actors write the parts
there), and every node needs trim-select and the model::

    ray start --head                       # on the head node; `ray start --address HEAD:6379` on the others
    trim-select select --engine ray --ray-address auto --pool /shared/pool.jsonl \
        --targets targets.jsonl --budget 5% --out /shared/run

    # Slurm arrays instead of Ray: Stage I once, one array task per shard, then merge
    trim-select fingerprint --targets targets.jsonl --out /shared/run/fingerprints.safetensors
    sbatch --array=0-15 --gres=gpu:1 --wrap 'trim-select score --pool /shared/pool.jsonl \
        --fingerprints /shared/run/fingerprints.safetensors --out /shared/run --budget 5% \
        --shard $SLURM_ARRAY_TASK_ID/16'
    trim-select merge /shared/run           # names the missing chunks if a task failed
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from .config import FingerprintConfig, RenderConfig, RuntimeConfig, ScoreConfig, config_hash, to_dict
from .data import DataError, ReadStats, Record, read_records
from .fingerprints import Fingerprints
from .io import SCORE_COLUMNS, RejectWriter, ScoreWriter, atomic_path, write_json
from .models import embedding_matrix
from .selector import TrimSelector, _progress

log = logging.getLogger(__name__)

ENGINES: tuple[str, ...] = ("local", "ray")
PLAN_FILE = "shards.json"
FP_FILE = "fingerprints.safetensors"
# Test hook: a worker dies (os._exit) right after writing this many parts, as a killed worker would.
FAULT_AFTER_ENV = "TRIM_SELECT_FAULT_AFTER_PARTS"
# With the hook: only the first worker to get there dies (it creates this file).
FAULT_ONCE_ENV = "TRIM_SELECT_FAULT_ONCE"
FAULT_EXIT_CODE = 17
_BOM = b"\xef\xbb\xbf"


# --------------------------------------------------------------------------------------------
# Plan: what every worker and merge agree on
# --------------------------------------------------------------------------------------------


@dataclass
class ShardPlan:
    """The settings of a sharded run, saved as ``OUT/shards.json`` (JSON, no pickle)."""

    pool: str
    pool_bytes: int
    format: str | None
    skip_invalid: bool
    chunk_size: int
    key: str  # the ScoreWriter key pinned in parts/manifest.json
    model_spec: str
    model: dict[str, Any]  # model identity (run.json) so that merge needs no model
    render: dict[str, Any]
    fingerprint: dict[str, Any]
    scoring: dict[str, Any]
    runtime: dict[str, Any]
    engine: str = "local"
    shards: int | None = None  # n of --shard i/n
    # "records": chunk k = valid records [kC, (k+1)C) (score_pool); "rows": rows incl. rejected
    # ones (ray engine). Identical unless --skip-invalid drops rows.
    chunking: str = "records"
    extra: dict[str, Any] = field(default_factory=dict)

    def save(self, out_dir: str | Path) -> None:
        write_json(Path(out_dir) / PLAN_FILE, asdict(self))

    @classmethod
    def load(cls, out_dir: str | Path) -> ShardPlan:
        path = Path(out_dir) / PLAN_FILE
        if not path.exists():
            raise FileNotFoundError(
                f"{path} not found: {out_dir} holds no sharded run (write one with `trim-select score "
                "--shard i/n` or `--engine local|ray`)")
        data = json.loads(path.read_text())
        return cls(**{k: v for k, v in data.items() if k in cls.__dataclass_fields__})

    def configs(self) -> tuple[RenderConfig, FingerprintConfig, ScoreConfig, RuntimeConfig]:
        return (_from_dict(RenderConfig, self.render), _from_dict(FingerprintConfig, self.fingerprint),
                _from_dict(ScoreConfig, self.scoring), _from_dict(RuntimeConfig, self.runtime))

    def expected_chunks(self, stats: ReadStats) -> int:
        n = stats.rows if self.chunking == "rows" else stats.records
        return math.ceil(n / self.chunk_size)


def _pool_bytes(pool: str | Path) -> int:
    p = Path(pool)
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) if p.is_dir() else p.stat().st_size


def _from_dict(cls: Any, data: dict[str, Any]) -> Any:
    return cls(**{k: v for k, v in data.items() if k in cls.__dataclass_fields__})


def parse_shard(text: str) -> tuple[int, int]:
    """``'i/n'`` -> ``(i, n)`` with ``0 <= i < n``."""
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise ValueError(f"--shard takes i/n (e.g. 0/4), got {text!r}") from None
    if n < 1 or not 0 <= i < n:
        raise ValueError(f"--shard i/n needs 0 <= i < n, got {text!r}")
    return i, n


def part_path(out_dir: str | Path, chunk: int) -> Path:
    """The part file of a chunk (the naming of :class:`trim_select.io.ScoreWriter`)."""
    return Path(out_dir) / "parts" / f"part-{chunk:06d}.parquet"


def _model_spec(sel: TrimSelector) -> str:
    """What a worker passes to ``load_model``: ``default`` (each node resolves its own copy) or the
    folder the driver's model came from."""
    if sel.model_spec == "default" or sel._lm is None:
        return sel.model_spec
    return sel._lm.path


def _release_model(sel: TrimSelector) -> None:
    """Drop the driver's model copy so that workers have every GPU to themselves."""
    sel._lm = None
    import gc

    gc.collect()
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def prepare(
    sel: TrimSelector,
    pool: str | Path,
    out_dir: str | Path,
    *,
    targets: str | Path | None = None,
    fingerprints: str | Path | None = None,
    format: str | None = None,
    target_format: str | None = None,
    skip_invalid: bool = False,
    overwrite: bool = False,
    engine: str = "local",
    shards: int | None = None,
    chunking: str = "records",
    save: bool = True,
) -> ShardPlan:
    """Driver side, once: Stage I (or saved fingerprints) -> ``OUT/fingerprints.safetensors``,
    the settings key (``overwrite`` is applied here, never by concurrent workers) and ``shards.json``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    fp_path = out_dir / FP_FILE
    if fingerprints is not None:
        sel.load_fingerprints(fingerprints)
    elif targets is not None:
        sel.fit(targets, format=target_format)
    elif fp_path.exists():
        sel.load_fingerprints(fp_path)
    else:
        raise ValueError("give targets or a fingerprints file")
    completed = sel.fingerprints.nearest is None  # a file from an older version: add the map here, once
    if completed:
        sel.fingerprints = sel.fingerprints.with_nearest(embedding_matrix(sel.lm.model))
    if completed or fingerprints is None or Path(fingerprints).resolve() != fp_path.resolve():
        sel.fingerprints.save(fp_path)  # the workers read it from here
    key = sel.scores_key(pool, format=format, skip_invalid=skip_invalid)
    if chunking == "rows" and skip_invalid:  # rows and records chunks differ: never mix them
        key = config_hash(key, "rows")
    if shards is None:  # concurrent shard jobs must not delete each other's parts
        ScoreWriter(out_dir, key, overwrite=overwrite)
    plan = ShardPlan(pool=str(Path(pool).resolve()), pool_bytes=_pool_bytes(pool), format=format,
                     skip_invalid=skip_invalid, chunk_size=sel.runtime.chunk_size, key=key,
                     model_spec=_model_spec(sel),
                     model=sel.model_identity(), render=to_dict(sel.render_config),
                     fingerprint=to_dict(sel.fingerprint_config), scoring=to_dict(sel.score_config),
                     runtime=to_dict(sel.runtime), engine=engine, shards=shards, chunking=chunking)
    if save:
        plan.save(out_dir)
    return plan


# --------------------------------------------------------------------------------------------
# Fault injection (tests)
# --------------------------------------------------------------------------------------------


class _FaultInjector:
    """With ``TRIM_SELECT_FAULT_AFTER_PARTS=N`` in the driver's environment a worker dies (exit code
    17, no clean-up) right after writing its N-th part; with ``TRIM_SELECT_FAULT_ONCE=FILE`` only
    the first worker to get there does (it creates FILE). Off unless the variable is set."""

    def __init__(self, after: int = 0, once: str | None = None) -> None:
        self.after, self.once = after, once
        self.count = 0

    @staticmethod
    def settings() -> dict[str, Any]:
        """The driver's settings, passed on to its workers."""
        return {"after": int(os.environ.get(FAULT_AFTER_ENV, "0") or 0),
                "once": os.environ.get(FAULT_ONCE_ENV)}

    def part_written(self) -> None:
        if self.after <= 0:
            return
        self.count += 1
        if self.count < self.after:
            return
        if self.once:
            try:
                os.close(os.open(self.once, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            except FileExistsError:
                return
        os._exit(FAULT_EXIT_CODE)


# --------------------------------------------------------------------------------------------
# Engine "local": one process per GPU (or N CPU processes)
# --------------------------------------------------------------------------------------------


def local_devices(runtime: RuntimeConfig, workers: int | None) -> list[str]:
    """The device of each local worker: every visible GPU (round-robin if ``workers`` exceeds
    them), or ``workers`` CPU processes."""
    import torch

    want_gpu = runtime.device in ("auto", "cuda") and torch.cuda.is_available()
    if runtime.device.startswith("cuda:"):
        return [runtime.device] * (workers or 1)
    if want_gpu:
        n_gpu = torch.cuda.device_count()
        return [f"cuda:{i % n_gpu}" for i in range(workers or n_gpu)]
    return ["cpu"] * (workers or 1)


def _local_worker(spec: dict[str, Any]) -> None:
    """Entry point of a spawned local worker: score chunks ``k % n == i`` into ``OUT/parts``."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch

    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    if spec["device"].startswith("cuda"):
        torch.cuda.set_device(torch.device(spec["device"]))
    fault = _FaultInjector(**spec["fault"])
    if fault.after > 0:  # test hook: die after writing N parts, as a killed worker would
        original = ScoreWriter.write

        def write(self: ScoreWriter, chunk: int, columns: dict[str, Any]) -> None:
            original(self, chunk, columns)
            fault.part_written()

        ScoreWriter.write = write  # type: ignore[method-assign]
    render, fpc, scoring, runtime = (_from_dict(c, spec[k]) for c, k in (
        (RenderConfig, "render"), (FingerprintConfig, "fingerprint"), (ScoreConfig, "scoring"),
        (RuntimeConfig, "runtime")))
    sel = TrimSelector(spec["model"], render=render, fingerprint=fpc, scoring=scoring,
                       runtime=replace(runtime, device=spec["device"]), progress=False)
    sel.load_fingerprints(spec["fingerprints"])
    sel.score_pool(spec["pool"], spec["out"], format=spec["format"], skip_invalid=spec["skip_invalid"],
                   shard=tuple(spec["shard"]))


def score_local(plan: ShardPlan, out_dir: str | Path, *, workers: int | None = None,
                progress: bool = True) -> dict[str, Any]:
    """Run the local engine to completion; raises naming the workers that failed (rerun resumes)."""
    import torch.multiprocessing as mp

    out_dir = Path(out_dir)
    render, fpc, scoring, runtime = plan.configs()
    devices = local_devices(runtime, workers)
    n = len(devices)
    threads = max(1, len(os.sched_getaffinity(0)) // n) if devices[0] == "cpu" else 0
    ctx = mp.get_context("spawn")
    procs = []
    t0 = time.perf_counter()
    for i, dev in enumerate(devices):
        spec = {"model": plan.model_spec, "render": plan.render, "fingerprint": plan.fingerprint,
                "scoring": plan.scoring, "runtime": plan.runtime, "fingerprints": str((out_dir / FP_FILE).resolve()),
                "pool": plan.pool, "out": str(out_dir.resolve()), "format": plan.format,
                "skip_invalid": plan.skip_invalid, "shard": [i, n], "device": dev, "threads": threads,
                "fault": _FaultInjector.settings()}
        p = ctx.Process(target=_local_worker, args=(spec,), name=f"trim-select-worker-{i}", daemon=False)
        p.start()
        procs.append(p)
    total = _approx_chunks(plan)
    bar = _progress(total, f"Stage II scoring ({n} workers, chunks)", progress)
    done = _count_parts(out_dir)
    bar.update(done)
    try:
        while any(p.is_alive() for p in procs):
            for p in procs:
                p.join(timeout=1.0 / len(procs))
            now = _count_parts(out_dir)
            bar.update(now - done)
            done = now
    except BaseException:
        for p in procs:
            if p.is_alive():
                p.terminate()
        raise
    finally:
        bar.close()
    failed = [(i, p.exitcode) for i, p in enumerate(procs) if p.exitcode != 0]
    if failed:
        what = ", ".join(f"worker {i}/{n} (exit code {code})" for i, code in failed)
        raise RuntimeError(f"{what} stopped before finishing; the chunks they completed are kept in "
                           f"{out_dir / 'parts'}: rerun the same command to score only the rest")
    return {"engine": "local", "workers": n, "devices": devices, "threads_per_worker": threads,
            "scoring_s": round(time.perf_counter() - t0, 3)}


def _count_parts(out_dir: Path) -> int:
    return sum(1 for _ in (out_dir / "parts").glob("part-*.parquet"))


def _approx_chunks(plan: ShardPlan) -> int | None:
    from .selector import _count_rows

    rows = _count_rows(plan.pool)
    return None if rows is None else math.ceil(rows / plan.chunk_size)


# --------------------------------------------------------------------------------------------
# Engine "ray": Ray Data pipeline with an actor pool
# --------------------------------------------------------------------------------------------


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
    from .data import _FieldError, parse_row

    out = []
    for index, line, raw in rows:
        try:
            try:
                row = json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError as exc:
                raise _FieldError("<line>", f"not valid UTF-8 at byte {exc.start}") from None
            except json.JSONDecodeError as exc:
                raise _FieldError("<line>", f"malformed JSON ({exc.msg} at column {exc.colno})") from None
            messages = parse_row(row, fmt)
        except _FieldError as exc:
            if skip_invalid:
                continue
            where = None if exc.field.startswith("<") else exc.field
            raise DataError(pool, line, where, exc.reason) from None
        rid = row.get("id")
        out.append(Record(index=index, line=line, id=str(index) if rid is None else str(rid),
                          messages=messages, raw=raw, fields=row))
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
        self.fault = _FaultInjector(**spec["fault"])
        self.error: str | None = None
        try:
            self._load(spec, shared)
        except (ValueError, RuntimeError, OSError) as exc:
            self.error = f"{type(exc).__name__}: {exc}"

    def _load(self, spec: dict[str, Any], shared: Any) -> None:
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        import ray
        import torch

        from .data import Renderer
        from .models import load_model
        from .scoring import Scorer

        if spec["threads"]:
            torch.set_num_threads(spec["threads"])
        arrays = ray.get(shared) if isinstance(shared, ray.ObjectRef) else shared
        render, scoring, runtime = (_from_dict(RenderConfig, spec["render"]),
                                    _from_dict(ScoreConfig, spec["scoring"]),
                                    _from_dict(RuntimeConfig, spec["runtime"]))
        lm = load_model(spec["model"], device="cuda" if spec["gpu"] else "cpu", dtype=runtime.dtype,
                        trust_remote_code=runtime.trust_remote_code)
        if lm.sha256 != spec["model_sha256"]:
            raise RuntimeError(f"the model on this node ({lm.path}) is not the one the driver used "
                               "(weights differ): install the same model on every node")
        fp = Fingerprints(*(np.array(arrays[k]) for k in ("token_ids", "vectors", "counts")), {},
                          None if arrays.get("nearest") is None else np.array(arrays["nearest"]))
        kw = {"compile": True} if runtime.compile else {}
        self.scorer = Scorer(lm.model, fp, penalty=scoring.penalty, mean_weight=scoring.mean_weight,
                             max_weight=scoring.max_weight, coverage_weight=scoring.coverage_weight,
                             idf=None if arrays.get("idf") is None else np.array(arrays["idf"]),
                             batch_tokens=runtime.batch_tokens, max_batch_size=runtime.max_batch_size, **kw)
        self.renderer = Renderer(lm.tokenizer, render)

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
        seqs = [self.renderer(r) for r in records]
        det = self.scorer.score_sequences(seqs)
        cols = {"index": np.array([r.index for r in records], dtype=np.int64),
                "id": pa.array([r.id for r in records], pa.string()), **det.columns(),
                "n_truncated": np.array([s.n_truncated for s in seqs], dtype=np.int64)}
        with atomic_path(part_path(self.spec["out"], k)) as tmp:
            pq.write_table(pa.table(cols), tmp)
        self.fault.part_written()


_RAY_CONTEXT = ("target_max_block_size", "enable_progress_bars", "print_on_execution_start")


def score_ray(sel: TrimSelector, plan: ShardPlan, out_dir: str | Path, *, workers: int | None = None,
              ray_address: str | None = None, progress: bool = True) -> dict[str, Any]:
    """Run Stage II as a Ray Data pipeline to completion (only unfinished chunks are read).

    ``sel`` still holds the model and fingerprints: the unseen-token map and IDF table are
    computed here once and broadcast with the fingerprints through the object store.
    """
    try:
        import ray
    except ModuleNotFoundError:
        raise RuntimeError("--engine ray needs Ray: pip install 'trim-select[ray]'") from None
    out_dir = Path(out_dir)
    t0 = time.perf_counter()
    spans = plan_chunks(plan.pool, plan.chunk_size)
    pending = [s for s in spans if not part_path(out_dir, s.chunk).exists()]
    info: dict[str, Any] = {"engine": "ray", "chunks": len(spans), "chunks_scored": len(pending)}
    if not pending:
        return info
    fmt = detect_pool_format(plan.pool, plan.format)
    fp = sel.fingerprints
    shared: dict[str, Any] = {"token_ids": fp.token_ids, "vectors": fp.vectors, "counts": fp.counts,
                              "nearest": fp.nearest}
    if sel.score_config.idf:
        from .data import Renderer

        shared["idf"] = sel._idf(plan.pool, Renderer(sel.lm.tokenizer, sel.render_config), plan.format,
                                 plan.skip_invalid)
    model_sha = sel.lm.sha256
    _release_model(sel)

    started = False
    if not ray.is_initialized():
        ray.init(address=ray_address, include_dashboard=False, logging_level=logging.WARNING,
                 log_to_driver=True)
        started = True
    try:
        resources = ray.cluster_resources()
        runtime = _from_dict(RuntimeConfig, plan.runtime)
        n_gpu = int(resources.get("GPU", 0)) if runtime.device in ("auto", "cuda") else 0
        n_cpu = int(resources.get("CPU", 1))
        size = workers or (n_gpu if n_gpu else 1)
        threads = 0 if n_gpu else max(1, n_cpu // size)
        spec = {"model": plan.model_spec, "model_sha256": model_sha, "render": plan.render,
                "scoring": plan.scoring, "runtime": plan.runtime, "pool": plan.pool, "out": str(out_dir.resolve()),
                "fmt": fmt, "skip_invalid": plan.skip_invalid, "gpu": bool(n_gpu), "threads": threads,
                "fault": _FaultInjector.settings()}
        ctx = ray.data.DataContext.get_current()
        saved = {k: getattr(ctx, k) for k in _RAY_CONTEXT}
        ctx.target_max_block_size = max(ctx.target_max_block_size or 0, 1 << 32)  # a chunk is one block
        ctx.enable_progress_bars = False
        ctx.print_on_execution_start = False
        # reading a chunk is a seek and a few MB: the read tasks reserve no CPU, so that actors holding
        # every CPU cannot starve them (when Ray does not fuse the read into the actors)
        ds = ray.data.read_datasource(pool_datasource(plan.pool, pending), override_num_blocks=len(pending),
                                      num_cpus=0)
        ds = ds.map_batches(ChunkScorer, fn_constructor_kwargs={"spec": spec, "shared": ray.put(shared)},
                            batch_size=None, batch_format="pyarrow",
                            compute=ray.data.ActorPoolStrategy(size=size),
                            num_gpus=1 if n_gpu else None, num_cpus=1 if n_gpu else threads)
        bar = _progress(sum(s.rows for s in pending), f"Stage II scoring (ray, {size} actors)", progress)
        try:
            for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
                errors = [e for e in batch.column("error").to_pylist() if e]
                if errors:  # e.g. a bad pool row: the message of the single-process run
                    raise ValueError(errors[0])
                bar.update(int(pc.sum(batch.column("rows")).as_py() or 0))
        finally:
            bar.close()
            for k, v in saved.items():
                setattr(ctx, k, v)
        info.update({"actors": size, "gpus_per_actor": 1 if n_gpu else 0, "threads_per_actor": threads,
                     "ray_address": ray_address or "local", "scoring_s": round(time.perf_counter() - t0, 3)})
        return info
    finally:
        if started:
            ray.shutdown()


# --------------------------------------------------------------------------------------------
# Merge: parts -> scores.parquet, coreset, run.json
# --------------------------------------------------------------------------------------------


class _PlannedSelector(TrimSelector):
    """A selector rebuilt from ``shards.json``: merging needs the settings, not the model."""

    def __init__(self, plan: ShardPlan, progress: bool = False):
        render, fpc, scoring, runtime = plan.configs()
        super().__init__(plan.model_spec, render=render, fingerprint=fpc, scoring=scoring, runtime=runtime,
                         progress=progress)
        self._identity = dict(plan.model)

    def model_identity(self) -> dict[str, Any]:
        return dict(self._identity)


def missing_chunks(out_dir: str | Path, n_chunks: int) -> list[int]:
    """Chunks in ``range(n_chunks)`` without a part file."""
    return [k for k in range(n_chunks) if not part_path(out_dir, k).exists()]


def _ranges(ks: list[int], limit: int = 12) -> str:
    groups: list[list[int]] = []
    for k in ks:
        if groups and k == groups[-1][-1] + 1:
            groups[-1].append(k)
        else:
            groups.append([k])
    text = ", ".join(str(g[0]) if len(g) == 1 else f"{g[0]}-{g[-1]}" for g in groups[:limit])
    return text + (", ..." if len(groups) > limit else "")


def merge(
    out_dir: str | Path,
    budget: str | int | float | None = None,
    *,
    pool: str | Path | None = None,
    extra: dict[str, Any] | None = None,
    times: dict[str, float] | None = None,
) -> dict[str, Any]:
    """Check that every chunk has its part, then write ``scores.parquet``, the coreset (with a
    budget), ``rejected.jsonl`` and ``run.json`` exactly as the single-process run does."""
    out_dir = Path(out_dir)
    t0 = time.perf_counter()
    plan = ShardPlan.load(out_dir)
    pool = Path(pool) if pool is not None else Path(plan.pool)
    if not pool.exists():
        raise FileNotFoundError(f"pool {pool} not found (moved? give its new path with --pool)")
    if _pool_bytes(pool) != plan.pool_bytes:
        raise RuntimeError(f"{pool} has {_pool_bytes(pool)} bytes but the scored pool had {plan.pool_bytes}: "
                           "it is not the file the shards scored")
    manifest = out_dir / "parts" / "manifest.json"
    if not manifest.exists():
        raise FileNotFoundError(f"{manifest} not found: no chunk of {out_dir} was scored yet")
    key = json.loads(manifest.read_text()).get("key")
    if key != plan.key:
        raise RuntimeError(f"{out_dir}/parts holds scores from other settings than {PLAN_FILE} "
                           f"(key {key} != {plan.key}): rerun the scoring with the same settings")
    stats = ReadStats()
    reject_path = out_dir / "rejected.jsonl"
    with atomic_path(reject_path) as tmp:  # one writer, whatever the workers left there
        rejects = RejectWriter(tmp)
        for _ in read_records(pool, plan.format, skip_invalid=plan.skip_invalid, stats=stats,
                              on_reject=rejects):
            pass
        rejects.close()
    if not stats.rejected:
        reject_path.unlink()
    n_chunks = plan.expected_chunks(stats)
    missing = missing_chunks(out_dir, n_chunks)
    if missing:
        who = ""
        if plan.shards:
            owners = sorted({k % plan.shards for k in missing})
            who = (" They belong to " + ", ".join(f"--shard {i}/{plan.shards}" for i in owners)
                   + " (chunk k belongs to shard k % n): rerun those jobs, then merge again.")
        else:
            who = " Rerun the scoring command: it scores only the missing chunks."
        raise RuntimeError(f"{len(missing)} of {n_chunks} chunks have no scores yet: chunk "
                           f"{_ranges(missing)} (part-NNNNNN.parquet in {out_dir / 'parts'}).{who}")
    extra_parts = sorted(p.name for p in (out_dir / "parts").glob("part-*.parquet")
                         if int(p.stem.split("-")[1]) >= n_chunks)
    if extra_parts:
        raise RuntimeError(f"{out_dir / 'parts'} has parts beyond the pool's {n_chunks} chunks "
                           f"({', '.join(extra_parts[:5])}): the pool file changed since scoring")
    if n_chunks:
        table = pa.concat_tables([pq.read_table(part_path(out_dir, k)) for k in range(n_chunks)],
                                 promote_options="default").sort_by("index")
    else:
        table = pa.table({c: [] for c in SCORE_COLUMNS})
    index = table.column("index").to_numpy()
    if len(index) != stats.records or len(np.unique(index)) != len(index):
        raise RuntimeError(f"the parts hold {len(index)} rows but the pool has {stats.records} records: "
                           "the pool file changed since scoring; rerun with --overwrite")
    sel = _PlannedSelector(plan)
    sel.load_fingerprints(out_dir / FP_FILE, check_model=False)
    from .selector import pc_sum

    sel.stats["pool"] = stats.to_dict()
    sel.stats["pool"]["truncated"] = pc_sum(table, "n_truncated", count_nonzero=True)
    sel.stats["pool"]["tokens"] = pc_sum(table, "n_tokens")
    for name, sec in (times or {}).items():
        sel.times.seconds[name] = sec
    sel.times.add("merge_read", t0)
    report = sel.finalize(pool, out_dir, table, budget, format=plan.format,
                          extra={"distributed": {"engine": plan.engine, "chunks": n_chunks,
                                                 "shards": plan.shards, **(extra or {})}})
    report["timings_s"]["total"] = round(sum(v for k, v in report["timings_s"].items() if k != "total"), 3)
    write_json(out_dir / "run.json", report)
    return report


# --------------------------------------------------------------------------------------------
# Entry points used by the CLI
# --------------------------------------------------------------------------------------------


def run_shard(sel: TrimSelector, pool: str | Path, out_dir: str | Path, shard: tuple[int, int], *,
              budget: str | int | float | None = None, targets: str | Path | None = None,
              fingerprints: str | Path | None = None, format: str | None = None,
              target_format: str | None = None, skip_invalid: bool = False) -> dict[str, Any]:
    """One ``--shard i/n`` job: score chunks ``k % n == i`` into ``OUT/parts``; :func:`merge` comes
    later (``budget`` is recorded in ``shards.json`` as merge's default)."""
    t0 = time.perf_counter()
    plan = prepare(sel, pool, out_dir, targets=targets, fingerprints=fingerprints, format=format,
                   target_format=target_format, skip_invalid=skip_invalid, engine="shards", shards=shard[1],
                   save=False)
    plan.extra["budget"] = budget
    plan.save(out_dir)
    sel.score_pool(pool, out_dir, format=format, skip_invalid=skip_invalid, shard=shard)
    n_chunks = math.ceil(int(sel.stats["pool"]["records"]) / sel.runtime.chunk_size)
    mine = [k for k in range(n_chunks) if k % shard[1] == shard[0]]
    return {"shard": list(shard), "chunks": len(mine), "missing_overall": missing_chunks(out_dir, n_chunks),
            "seconds": round(time.perf_counter() - t0, 3)}


def run(
    sel: TrimSelector,
    pool: str | Path,
    out_dir: str | Path,
    budget: str | int | float | None,
    *,
    engine: str = "local",
    workers: int | None = None,
    ray_address: str | None = None,
    targets: str | Path | None = None,
    fingerprints: str | Path | None = None,
    format: str | None = None,
    target_format: str | None = None,
    skip_invalid: bool = False,
    overwrite: bool = False,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """:meth:`TrimSelector.run` on an engine. ``local`` with a single device is exactly
    ``sel.run``; otherwise Stage I in this process, Stage II on the workers, then :func:`merge`."""
    if engine not in ENGINES:
        raise ValueError(f"--engine must be one of {', '.join(ENGINES)}, got {engine!r}")
    if workers is not None and workers < 1:
        raise ValueError(f"--workers must be >= 1, got {workers}")
    if ray_address is not None and engine != "ray":
        raise ValueError("--ray-address needs --engine ray")
    if engine == "local" and len(local_devices(sel.runtime, workers)) == 1:
        return sel.run(pool, out_dir, budget, targets=targets, fingerprints=fingerprints, format=format,
                       target_format=target_format, skip_invalid=skip_invalid, overwrite=overwrite,
                       extra=extra)
    t0 = time.perf_counter()
    plan = prepare(sel, pool, out_dir, targets=targets, fingerprints=fingerprints, format=format,
                   target_format=target_format, skip_invalid=skip_invalid, overwrite=overwrite, engine=engine,
                   chunking="rows" if engine == "ray" else "records")
    if engine == "ray":
        info = score_ray(sel, plan, out_dir, workers=workers, ray_address=ray_address, progress=sel.progress)
    else:
        _release_model(sel)
        info = score_local(plan, out_dir, workers=workers, progress=sel.progress)
    times = dict(sel.times.seconds)
    times["stage2_scoring"] = info.get("scoring_s", 0.0)
    report = merge(out_dir, budget, pool=pool, extra=info, times=times)
    report.update(extra or {})  # the caller's top-level run.json fields, as sel.run records them
    report["timings_s"]["total"] = round(time.perf_counter() - t0, 3)
    write_json(Path(out_dir) / "run.json", report)
    return report
