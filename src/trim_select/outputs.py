"""Outputs: the one owner of what a run leaves on disk (``docs/SPEC.md`` "Outputs").

- :func:`add_selection` builds the ``selected`` / ``rank`` columns (ties to the lower pool index,
  Eq. 16's top-k) for TRIM and every baseline;
- :func:`write_coreset` copies the selected pool rows byte-for-byte, best first;
- :func:`write_selection` writes ``coreset.jsonl`` and ``scores.parquet`` for a score table;
- :class:`RunReport` is the ``run.json`` report; :func:`select_report` builds it for ``select``,
  ``score``, ``merge`` and ``run`` (same layout whichever engine scored), and the top-level caller
  writes it once with :meth:`RunReport.write`.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from .data import DataError, read_records
from .io import (
    InputChangedError,
    atomic_path,
    file_identity,
    package_versions,
    part_seconds,
    write_json,
    write_parquet,
)
from .selection import rank, select_top

RUN_FILE = "run.json"


class RunReport(dict):
    """The ``run.json`` report of a run (a plain JSON object). Every command's report has the same
    two cost sections: ``timings_s`` (seconds per stage and ``total``) and ``cost``
    (``wall_seconds``, ``forward_passes``, ``backward_passes``, ``tokens``), so readers such as
    ``compare`` need no per-command layout."""

    @property
    def timings(self) -> dict[str, float]:
        return self.setdefault("timings_s", {})

    def write(self, out_dir: str | Path) -> Path:
        """Write ``OUT/run.json`` (atomic); called once, by the top-level caller of a run. A TRIM
        report gets its ``cost`` here, from the final ``timings_s`` and counts."""
        if "cost" not in self:
            self["cost"] = trim_cost(self)
            if (Path(out_dir) / "parts").is_dir():  # Stage II over every process that scored a part
                self["cost"]["stage2_seconds_all_runs"] = part_seconds(out_dir)
        path = Path(out_dir) / RUN_FILE
        write_json(path, dict(self))
        return path


def trim_cost(report: Mapping[str, Any]) -> dict[str, Any]:
    """TRIM's selection cost: one forward pass per target (Stage I) and per scored pool example
    (Stage II), no backward pass; tokens of both; wall seconds = ``timings_s["total"]``."""
    counts = report.get("counts", {})
    fp = report.get("fingerprints", {})
    return {"wall_seconds": report.get("timings_s", {}).get("total"),
            "forward_passes": int(fp.get("n_targets") or 0) + int(counts.get("scored") or 0),
            "backward_passes": 0,
            "tokens": int(counts.get("pool_tokens") or 0) + int(fp.get("n_target_tokens") or 0)}


def add_selection(table: pa.Table, budget: str | int | float) -> tuple[pa.Table, np.ndarray]:
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


def write_coreset(pool: str | Path, order: list[int], path: str | Path, *, format: str | None = None,
                  ids: list[str] | None = None, digest: str | None = None) -> None:
    """Copy the selected rows (pool positions ``order``, best first) verbatim into ``path``.

    ``digest``: the pool content the scores were computed on (refused if the file now differs);
    ``ids``: the scores table's id of each selected row, checked against the row read back.
    """
    if digest is not None and file_identity(pool)["xxh3_128"] != digest:
        raise InputChangedError(f"pool file {Path(pool).resolve()} changed while it was being scored "
                                f"(xxh3-128 {digest[:12]}… -> {file_identity(pool)['xxh3_128'][:12]}…): "
                                "coreset.jsonl is not written from another pool; rerun")
    wanted = set(order)
    want_id = dict(zip(order, ids, strict=True)) if ids is not None else {}
    raw: dict[int, bytes] = {}
    for rec in read_records(pool, format, skip_invalid=True):
        if rec.index in wanted:
            if want_id and rec.id != want_id[rec.index]:
                raise DataError(pool, rec.line, "id", f"row {rec.index} has id {rec.id!r} but the scores "
                                f"table has {want_id[rec.index]!r} there: the pool is not the scored file")
            raw[rec.index] = rec.raw
    missing = wanted - set(raw)
    if missing:
        raise DataError(pool, None, None, f"{len(missing)} selected rows could not be re-read (file changed?)")
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        for i in order:
            fh.write(raw[i] + b"\n")


def write_selection(pool: str | Path, out_dir: str | Path, table: pa.Table, budget: Any, *,
                    format: str | None = None, digest: str | None = None) -> tuple[pa.Table, np.ndarray]:
    """With a budget: selection columns and ``coreset.jsonl`` (from the pool whose content is ``digest``,
    each row's id checked against the table); always ``scores.parquet``."""
    out_dir = Path(out_dir)
    chosen = np.zeros(0, dtype=np.int64)
    if budget is not None:
        table, chosen = add_selection(table, budget)
        order = table.column("index").to_numpy()[chosen].tolist()
        ids = table.column("id").to_pylist()
        write_coreset(pool, order, out_dir / "coreset.jsonl", format=format,
                      ids=[ids[i] for i in chosen.tolist()], digest=digest)
    write_parquet(out_dir / "scores.parquet", table)
    return table, chosen


def _digest_of(identity: Any) -> str | None:
    return identity.get("xxh3_128") if isinstance(identity, Mapping) else None


def output_digests(pool: str | Path, fingerprints: Mapping[str, Any], scored_pool: Mapping[str, Any] | None, *,
                   coreset: bool) -> dict[str, Any]:
    """run.json: the xxh3-128 of the input content each output was computed from."""
    fp_targets = _digest_of(fingerprints.get("targets"))
    scored = _digest_of(scored_pool or file_identity(pool))
    return {"fingerprints.safetensors": {"targets": fp_targets},
            "scores.parquet": {"pool": scored, "targets": fp_targets},
            "coreset.jsonl": {"pool": _digest_of(file_identity(pool))} if coreset else None}


def selection_counts(pool_stats: Mapping[str, Any], scores: np.ndarray, chosen: np.ndarray) -> dict[str, Any]:
    """``run.json`` ``counts``, one layout for TRIM and every baseline: pool rows read, scored, rejected,
    blank lines, duplicate ids, truncated, unscorable (−inf), selected, pool tokens. A count the run
    did not measure (``truncated``/``tokens`` given as None in ``pool_stats``) is null."""
    return {
        "pool_rows": pool_stats.get("rows"),
        "scored": int(len(scores)),
        "rejected": pool_stats.get("rejected", 0),
        "blank_lines": pool_stats.get("blank_lines", 0),
        "duplicate_ids": pool_stats.get("duplicate_ids", 0),
        "truncated": pool_stats.get("truncated", 0),
        "minus_inf": int(np.isneginf(scores).sum()),
        "selected": int(len(chosen)),
        "pool_tokens": pool_stats.get("tokens"),
    }


def select_report(*, pool: str | Path, budget: Any, table: pa.Table, chosen: np.ndarray,
                  stats: Mapping[str, Any], config: Mapping[str, Any], model: Mapping[str, Any],
                  fingerprints: Mapping[str, Any], timings: Mapping[str, float],
                  extra: Mapping[str, Any] | None = None,
                  scored_pool: Mapping[str, Any] | None = None) -> RunReport:
    """The ``run.json`` of a TRIM selection (select, score + merge, run): one layout for every engine."""
    scores = table.column("score").to_numpy(zero_copy_only=False)
    pool_stats = stats.get("pool", {})
    report = RunReport({
        "command": "select",
        "pool": file_identity(pool),
        "digests": output_digests(pool, fingerprints, scored_pool, coreset=budget is not None),
        "budget": budget,
        "counts": selection_counts(pool_stats, scores, chosen),
        "read_stats": dict(stats),
        "config": dict(config),
        "model": dict(model),
        "fingerprints": dict(fingerprints),
        "versions": package_versions(),
        "timings_s": dict(timings),
    })
    if extra:
        report.update(extra)
    return report


def duplicate_ids(table: pa.Table) -> tuple[int, list[str]]:
    """Rows whose id repeats an earlier row's id, and up to 10 such ids."""
    counts = pc.value_counts(table.column("id")) if table.num_rows else pa.array([], pa.struct([]))
    if not len(counts):
        return 0, []
    values = counts.field("values").to_pylist()
    n = counts.field("counts").to_numpy()
    dup = n > 1
    return int((n[dup] - 1).sum()), [values[i] for i in np.flatnonzero(dup)[:10]]
