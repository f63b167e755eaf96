"""Engines: executors of the selector's steps (Stage I -> Stage II per chunk -> selection), in the
spirit of datatrove's executors over pipeline steps (``docs/SPEC.md`` "Engines").

Every engine writes the layout of the single-process run: ``OUT/parts/part-NNNNNN.parquet``, one
file per chunk of ``chunk_size`` pool rows, written atomically, so the file is the completion
marker of its chunk; ``parts/manifest.json`` pins the settings key. Killing any worker or the
driver and rerunning the same command recomputes only the chunks without a file. Scores do not
depend on which process computed a chunk (a chunk is always batched the same way), and
selection breaks ties by pool index, so every engine gives the scores and coreset of an
uninterrupted single-process run.

Engines (one module each; :mod:`.base` holds what they share: resolving the fingerprints, scoring
one chunk through :class:`~trim_select.io.ScoreWriter`, the plan, merge)
  in-process :func:`.base.run_in_process`, what :meth:`TrimSelector.run` hands off to.
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
(How to run them on several nodes: :mod:`.dispatch`.)
"""


from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ..config import FingerprintConfig, RenderConfig, RuntimeConfig, ScoreConfig, config_hash, to_dict
from ..data import ReadStats, Record, Renderer, read_records
from ..fingerprints import Fingerprints
from ..generic import generic_section, prepare_extensions
from ..io import (
    SCORE_COLUMNS,
    InputChangedError,
    RejectWriter,
    ScoreWriter,
    atomic_path,
    check_unchanged,
    file_identity,
    write_json,
)
from ..locking import folder_lock
from ..models import embedding_matrix
from ..outputs import RunReport, select_report, write_selection
from ..scoring import Scorer

if TYPE_CHECKING:  # the selector sits above this module; engines receive one, never import it here
    from ..selector import TrimSelector

PLAN_FILE = "shards.json"
FP_FILE = "fingerprints.safetensors"

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
    pool_identity: dict[str, Any] | None = None  # path, bytes, xxh3_128 of the pool the shards score

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
        return (config_from_dict(RenderConfig, self.render), config_from_dict(FingerprintConfig, self.fingerprint),
                config_from_dict(ScoreConfig, self.scoring), config_from_dict(RuntimeConfig, self.runtime))

    def expected_chunks(self, stats: ReadStats) -> int:
        n = stats.rows if self.chunking == "rows" else stats.records
        return math.ceil(n / self.chunk_size)


def pool_bytes(pool: str | Path) -> int:
    p = Path(pool)
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) if p.is_dir() else p.stat().st_size


def config_from_dict(cls: Any, data: dict[str, Any]) -> Any:
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


# --------------------------------------------------------------------------------------------
# Steps every engine shares
# --------------------------------------------------------------------------------------------


def resolve_fingerprints(sel: TrimSelector, out_dir: str | Path, *, targets: str | Path | None = None,
                         fingerprints: str | Path | None = None, target_format: str | None = None,
                         overwrite: bool = False) -> Path:
    """Stage I, resolved one way for every engine: a given fingerprints file, else the cached
    ``OUT/fingerprints.safetensors`` when its Stage I key matches ``targets``, else a fit; a file from
    an older version gets its unseen-token map (Eq. 11) here, once. Saved to ``OUT`` (workers read it).
    Fingerprints of targets whose content changed at the same path are refused unless ``overwrite``."""
    fp_path = Path(out_dir) / FP_FILE
    if fingerprints is not None:
        sel.load_fingerprints(fingerprints)
    elif targets is not None:
        meta = Fingerprints.load(fp_path).meta if fp_path.exists() else {}
        check_unchanged({"targets": meta.get("targets")}, {"targets": file_identity(targets)}, out_dir,
                        overwrite=overwrite)
        cached = meta.get("stage1_key")
        if cached is not None and cached == sel.stage1_key(targets, target_format):
            sel.load_fingerprints(fp_path)  # resume: Stage I of this exact input is done
        else:
            sel.fit(targets, format=target_format)
    elif fp_path.exists():
        sel.load_fingerprints(fp_path)
    else:
        raise ValueError("give targets or a fingerprints file")
    completed = sel.fingerprints.nearest is None
    if completed:
        sel.fingerprints = sel.fingerprints.with_nearest(embedding_matrix(sel.lm.model))
    if completed or fingerprints is None or Path(fingerprints).resolve() != fp_path.resolve():
        sel.fingerprints.save(fp_path)
    return fp_path


def score_chunk(writers: ScoreWriter | Mapping[str, ScoreWriter], k: int, scorer: Scorer,
                records: Sequence[Record], seqs: Sequence[Any], *, on_batch: Callable[[int], None] | None = None,
                on_part: Callable[[int], None] | None = None) -> None:
    """Stage II of one chunk (Eqs. 12-15 via :class:`~trim_select.scoring.Scorer`), written as part
    ``k`` through ``writers`` (each counts it in ``writer.computed``): one writer, or ``{target name:
    writer}`` of the target sets of a multi-target scorer whose part ``k`` is missing (one forward for
    all). ``on_part(k)`` runs after each part is on disk (the fault hook)."""
    if isinstance(writers, ScoreWriter):
        writers = {scorer.names[0]: writers}
    details = scorer.score_sequences_many(list(seqs), on_batch=on_batch)
    base = {"index": np.array([r.index for r in records], dtype=np.int64), "id": [r.id for r in records]}
    truncated = np.array([s.n_truncated for s in seqs], dtype=np.int64)
    for name, writer in writers.items():
        writer.write(k, {**base, **details[name].columns(), "n_truncated": truncated})
        writer.computed += 1
        if on_part is not None:
            on_part(k)


def make_scorer(model: Any, targets: Fingerprints | Mapping[str, Fingerprints], scoring: ScoreConfig,
                runtime: RuntimeConfig, idf: np.ndarray | None = None, *, hidden_layer: int | None = None,
                generic: Fingerprints | None = None) -> Scorer:
    """The Stage II scorer of one or several target sets with a run's settings (every engine's one constructor)."""
    return Scorer(model, targets, penalty=scoring.penalty, mean_weight=scoring.mean_weight,
                  max_weight=scoring.max_weight, coverage_weight=scoring.coverage_weight, idf=idf,
                  batch_tokens=runtime.batch_tokens, max_batch_size=runtime.max_batch_size,
                  compile=runtime.compile, mask_free=runtime.mask_free, hidden_layer=hidden_layer, generic=generic)


def render_all(renderer: Renderer, records: Sequence[Record]) -> list[Any]:
    return [renderer(r) for r in records]


def run_in_process(sel: TrimSelector, pool: str | Path, out_dir: str | Path, budget: Any, *,
                   targets: str | Path | None = None, fingerprints: str | Path | None = None,
                   format: str | None = None, target_format: str | None = None, skip_invalid: bool = False,
                   overwrite: bool = False, extra: dict[str, Any] | None = None) -> RunReport:
    """The single-process engine: Stage I -> Stage II -> selection; returns the report (unwritten)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    resolve_fingerprints(sel, out_dir, targets=targets, fingerprints=fingerprints, target_format=target_format,
                         overwrite=overwrite)
    table = sel.score_pool(pool, out_dir, format=format, skip_invalid=skip_invalid, overwrite=overwrite)
    sources = {"targets": sel.file_identity(targets) if targets is not None else None,
               "fingerprints_file": str(fingerprints) if fingerprints is not None else None}
    report = sel.finalize(pool, out_dir, table, budget, format=format, extra={**sources, **(extra or {})})
    report.timings["total"] = round(time.perf_counter() - t_start, 3)
    return report


def prepare(sel: TrimSelector, pool: str | Path, out_dir: str | Path, *, targets: str | Path | None = None,
            fingerprints: str | Path | None = None, format: str | None = None, target_format: str | None = None,
            skip_invalid: bool = False, overwrite: bool = False, engine: str = "local",
            shards: int | None = None, chunking: str = "records", save: bool = True) -> ShardPlan:
    """Driver side, once: Stage I (:func:`resolve_fingerprints`), the settings key (``overwrite`` is
    applied here, never by concurrent workers) and ``shards.json``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    resolve_fingerprints(sel, out_dir, targets=targets, fingerprints=fingerprints, target_format=target_format,
                         overwrite=overwrite)
    prepare_extensions(sel, pool, out_dir, engine, format=format, skip_invalid=skip_invalid)  # before the workers
    key = sel.scores_key(pool, format=format, skip_invalid=skip_invalid)
    if chunking == "rows" and skip_invalid:  # rows and records chunks differ: never mix them
        key = config_hash(key, "rows")
    if shards is None:  # concurrent shard jobs must not delete each other's parts
        ScoreWriter(out_dir, key, overwrite=overwrite, inputs=sel.score_inputs(pool))
    plan = ShardPlan(pool=str(Path(pool).resolve()), pool_bytes=pool_bytes(pool), format=format,
                     skip_invalid=skip_invalid, chunk_size=sel.runtime.chunk_size, key=key,
                     model_spec=sel.worker_model_spec(),
                     model=sel.model_identity(), render=to_dict(sel.render_config),
                     fingerprint=to_dict(sel.fingerprint_config), scoring=to_dict(sel.score_config),
                     runtime=to_dict(sel.runtime), engine=engine, shards=shards, chunking=chunking,
                     pool_identity=file_identity(pool))
    if save:
        plan.save(out_dir)
    return plan


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


# --------------------------------------------------------------------------------------------
# Merge: parts -> scores.parquet, coreset, run.json
# --------------------------------------------------------------------------------------------


def _read_pool_stats(out_dir: Path, pool: Path, plan: ShardPlan) -> ReadStats:
    """Re-read the pool once: its counts and ``rejected.jsonl`` (one writer, whatever the workers left)."""
    if not pool.exists():
        raise FileNotFoundError(f"pool {pool} not found (moved? give its new path with --pool)")
    if pool_bytes(pool) != plan.pool_bytes:
        raise RuntimeError(f"{pool} has {pool_bytes(pool)} bytes but the scored pool had {plan.pool_bytes}: "
                           "it is not the file the shards scored")
    now = file_identity(pool)
    scored = plan.pool_identity or {}
    if scored.get("xxh3_128") and scored["xxh3_128"] != now["xxh3_128"]:
        raise InputChangedError(
            f"pool file {now['path']} changed since the shards in {out_dir} scored it (xxh3-128 "
            f"{scored['xxh3_128'][:12]}… -> {now['xxh3_128'][:12]}…): rescore it (a `--overwrite` run "
            "without --shard, or delete OUT/parts and rerun every shard), then merge")
    manifest = out_dir / "parts" / "manifest.json"
    if not manifest.exists():
        raise FileNotFoundError(f"{manifest} not found: no chunk of {out_dir} was scored yet")
    key = json.loads(manifest.read_text()).get("key")
    if key != plan.key:
        raise RuntimeError(f"{out_dir}/parts holds scores from other settings than {PLAN_FILE} "
                           f"(key {key} != {plan.key}): rerun the scoring with the same settings")
    stats = ReadStats()
    reject_path = out_dir / "rejected.jsonl"
    with atomic_path(reject_path) as tmp:
        rejects = RejectWriter(tmp)
        for _ in read_records(pool, plan.format, skip_invalid=plan.skip_invalid, stats=stats,
                              on_reject=rejects):
            pass
        rejects.close()
    if not stats.rejected:
        reject_path.unlink()
    return stats


def read_parts(out_dir: Path, plan: ShardPlan, stats: ReadStats) -> pa.Table:
    """Every chunk's part, checked complete and matching the pool, as one table by pool index."""
    n_chunks = plan.expected_chunks(stats)
    missing = missing_chunks(out_dir, n_chunks)
    if missing:
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
        table = pa.concat_tables([pq.read_table(part_path(out_dir, k)).replace_schema_metadata(None)
                                  for k in range(n_chunks)], promote_options="default").sort_by("index")
    else:
        table = pa.table({c: [] for c in SCORE_COLUMNS})
    index = table.column("index").to_numpy()
    if len(index) != stats.records or len(np.unique(index)) != len(index):
        raise RuntimeError(f"the parts hold {len(index)} rows but the pool has {stats.records} records: "
                           "the pool file changed since scoring; rerun with --overwrite")
    return table


def column_sum(table: pa.Table, col: str, *, count_nonzero: bool = False) -> int:
    """Sum of a column (or the number of non-zero entries)."""
    if col not in table.column_names or table.num_rows == 0:
        return 0
    values = np.asarray(table.column(col).to_numpy(zero_copy_only=False))
    return int((values != 0).sum() if count_nonzero else values.sum())


def merge_report(out_dir: str | Path, budget: str | int | float | None = None, *,
                 pool: str | Path | None = None, extra: dict[str, Any] | None = None,
                 times: dict[str, float] | None = None) -> RunReport:
    """Check that every chunk has its part, then write ``scores.parquet``, the coreset (with a
    budget) and ``rejected.jsonl`` exactly as the single-process run does; returns the report.
    Needs no model: the settings and model identity come from ``shards.json``."""
    out_dir = Path(out_dir)
    t0 = time.perf_counter()
    plan = ShardPlan.load(out_dir)
    pool = Path(pool) if pool is not None else Path(plan.pool)
    stats = _read_pool_stats(out_dir, pool, plan)
    table = read_parts(out_dir, plan, stats)
    pool_stats = stats.to_dict()
    pool_stats["truncated"] = column_sum(table, "n_truncated", count_nonzero=True)
    pool_stats["tokens"] = column_sum(table, "n_tokens")
    fp = Fingerprints.load(out_dir / FP_FILE)
    timings = dict(times or {})
    timings["merge_read"] = round(timings.get("merge_read", 0.0) + time.perf_counter() - t0, 3)
    t1 = time.perf_counter()
    scored = plan.pool_identity or {}
    table, chosen = write_selection(pool, out_dir, table, budget, format=plan.format,
                                    digest=scored.get("xxh3_128"))
    timings["selection"] = round(timings.get("selection", 0.0) + time.perf_counter() - t1, 3)
    configs = plan.configs()
    report = select_report(
        pool=pool, budget=budget, table=table, chosen=chosen, stats={"pool": pool_stats},
        config={k: to_dict(c) for k, c in zip(("render", "fingerprint", "scoring", "runtime"), configs, strict=True)},
        model=plan.model, fingerprints={"classes": len(fp) or None, **fp.meta}, timings=timings,
        extra={"distributed": {"engine": plan.engine, "chunks": plan.expected_chunks(stats),
                               "shards": plan.shards, **(extra or {})}, **generic_section(out_dir, configs[2])},
        scored_pool=plan.pool_identity)
    report.timings["total"] = round(sum(v for k, v in report.timings.items() if k != "total"), 3)
    return report


def merge(out_dir: str | Path, budget: str | int | float | None = None, *, pool: str | Path | None = None,
          extra: dict[str, Any] | None = None, times: dict[str, float] | None = None) -> RunReport:
    """``trim-select merge``: :func:`merge_report`, then ``run.json`` (written once, here). Holds the
    folder's lock (:mod:`trim_select.locking`); a pool whose content digest is not the one the shards
    scored is refused (:class:`~trim_select.io.InputChangedError`)."""
    with folder_lock(out_dir, "merge"):
        report = merge_report(out_dir, budget, pool=pool, extra=extra, times=times)
        report.write(out_dir)
    return report
