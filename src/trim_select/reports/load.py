"""Load: selection runs (``scores.parquet``, ``run.json``) and the pool rows their coresets hold."""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from ..config import RenderConfig
from ..data import Record, Renderer, read_records
from ..models import load_tokenizer, resolve_model_path
from .config import N_TOKENS, TOKENIZER, WHITESPACE, ReportConfig

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------------------------
# Loading runs and the pool
# --------------------------------------------------------------------------------------------


@dataclass
class RunData:
    """One selection output folder, read into arrays aligned with ``scores.parquet`` rows."""

    dir: Path
    label: str
    method: str
    info: dict[str, Any]
    columns: dict[str, np.ndarray]  # numeric columns of scores.parquet (index, score, selected, ...)
    ids: list[str]
    pool_path: Path | None
    fingerprints_path: Path | None
    pool_key: str = ""  # key of its pool in the report's pool table

    @property
    def index(self) -> np.ndarray:
        return self.columns["index"]

    @property
    def score(self) -> np.ndarray:
        return self.columns["score"]

    @property
    def selected(self) -> np.ndarray:
        return self.columns["selected"]

    def order(self) -> np.ndarray:
        """Row positions of the scores table, best first (rank, else score desc, ties to lower index)."""
        s = np.asarray(self.score, dtype=np.float64)
        key = np.where(np.isnan(s), np.inf, -s)
        return np.lexsort((self.index, key))

    def coreset_rows(self) -> np.ndarray:
        """Row positions of the selected examples, best first."""
        o = self.order()
        return o[self.selected[o]]

    def coreset(self) -> np.ndarray:
        """Pool indices of the coreset, best first."""
        return self.index[self.coreset_rows()]


def _pool_path(info: dict[str, Any]) -> Path | None:
    pool = info.get("pool")
    if isinstance(pool, dict):
        pool = pool.get("path")
    return Path(pool) if isinstance(pool, str) and pool else None


def run_folders(paths: Sequence[str | Path]) -> list[Path]:
    """The output folders behind ``paths``: a multi-target folder (``OUT/run.json`` listing its
    ``targets``, no ``scores.parquet`` of its own) stands for its per-target folders, in that order."""
    out: list[Path] = []
    for p in map(Path, paths):
        info_path = p / "run.json"
        if not (p / "scores.parquet").exists() and info_path.exists():
            targets = json.loads(info_path.read_text()).get("targets")
            if isinstance(targets, dict) and targets:
                out.extend(p / str(t.get("folder", name)) for name, t in targets.items())
                continue
        out.append(p)
    return out


def load_run(path: str | Path, pool: str | Path | None = None) -> RunData:
    """Read one output folder. Raises ``FileNotFoundError``/``ValueError`` naming what is missing."""
    d = Path(path)
    scores_path = d / "scores.parquet"
    if not scores_path.exists():
        raise FileNotFoundError(f"{d}: no scores.parquet (not an output folder of select/baseline)")
    info = json.loads((d / "run.json").read_text()) if (d / "run.json").exists() else {}
    table = pq.read_table(scores_path)
    names = table.column_names
    for col in ("index", "score", "selected"):
        if col not in names:
            hint = " (the run had no --budget)" if col == "selected" else ""
            raise ValueError(f"{scores_path} has no {col!r} column{hint}")
    cols: dict[str, np.ndarray] = {}
    for name in names:
        if name == "id":
            continue
        arr = table.column(name).to_numpy(zero_copy_only=False)
        if arr.dtype.kind in "biuf":
            cols[name] = arr
    cols["index"] = cols["index"].astype(np.int64)
    cols["score"] = cols["score"].astype(np.float64)
    cols["selected"] = cols["selected"].astype(bool)
    ids = [str(x) for x in table.column("id").to_pylist()] if "id" in names else [str(i) for i in cols["index"]]
    fp = d / "fingerprints.safetensors"
    method = str(
        info.get("method") or ("trim" if fp.exists() or info.get("command") in ("select", "score") else d.name)
    )
    return RunData(
        dir=d,
        label=method,
        method=method,
        info=info,
        columns=cols,
        ids=ids,
        pool_path=Path(pool) if pool is not None else _pool_path(info),
        fingerprints_path=fp if fp.exists() else None,
    )


def unique_labels(runs: Sequence[RunData]) -> None:
    counts = Counter(r.method for r in runs)
    seen: Counter[str] = Counter()
    for r in runs:
        if counts[r.method] == 1:
            r.label = r.method
            continue
        label = f"{r.method}:{r.dir.name}"
        seen[label] += 1
        r.label = label if seen[label] == 1 else f"{label}#{seen[label]}"


@dataclass
class PoolData:
    """What the report needs of a pool file: per-row source fields and lengths, records of a few."""

    key: str  # resolved path (or a placeholder when the pool file is not readable)
    path: Path | None
    n_rows: int
    dataset: dict[int, str] = field(default_factory=dict)
    task: dict[int, str] = field(default_factory=dict)
    lengths: dict[int, int] = field(default_factory=dict)
    length_source: str = WHITESPACE
    length_note: str = ""
    records: dict[int, Record] = field(default_factory=dict)
    note: str = ""


def _ws_len(rec: Record) -> int:
    return sum(len(m.content.split()) for m in rec.messages)


def _field_str(value: Any) -> str | None:
    if value is None:
        return None
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False, default=str)


def scan_pool(path: Path, wanted: set[int], *, format: str | None = None, renderer: Any = None) -> PoolData:
    """One pass over the pool: ``dataset``/``task`` per row, lengths (whitespace tokens, or the
    renderer's token count when given), and the full records of the ``wanted`` indices."""
    pd = PoolData(key=str(path.resolve()), path=path, n_rows=0)
    for rec in read_records(path, format, skip_invalid=True):
        pd.n_rows += 1
        ds = _field_str(rec.fields.get("dataset")) if hasattr(rec.fields, "get") else None
        task = _field_str(rec.fields.get("task")) if hasattr(rec.fields, "get") else None
        if ds is not None:
            pd.dataset[rec.index] = ds
        if task is not None:
            pd.task[rec.index] = task
        pd.lengths[rec.index] = len(renderer(rec)) if renderer is not None else _ws_len(rec)
        if rec.index in wanted:
            pd.records[rec.index] = rec
    pd.length_source = TOKENIZER if renderer is not None else WHITESPACE
    return pd


def _load_tokenizer(spec: str | None) -> Any:
    if not spec:
        return None
    try:
        return load_tokenizer(resolve_model_path(spec))
    except Exception as exc:  # noqa: BLE001 - any failure means "no tokenizer": fall back, say so
        log.warning("could not load a tokenizer from %s (%s); lengths fall back to whitespace tokens", spec, exc)
        return None


def render_config(info: dict[str, Any]) -> RenderConfig:
    raw = dict(info.get("config", {}).get("render", {}) or {})
    known = RenderConfig.__dataclass_fields__
    try:
        return RenderConfig(**{k: v for k, v in raw.items() if k in known})
    except (TypeError, ValueError):
        return RenderConfig()


def model_spec(run: RunData, cfg: ReportConfig) -> str | None:
    if cfg.model:
        return cfg.model
    model = run.info.get("model")
    if isinstance(model, dict):
        return model.get("path") or model.get("name")
    return model if isinstance(model, str) else None


def load_pools(runs: Sequence[RunData], cfg: ReportConfig) -> dict[str, PoolData]:
    """Read every distinct pool once; lengths from ``n_tokens`` when a run on that pool has them,
    else by rendering with the model's tokenizer, else whitespace tokens (``length_source`` says)."""
    groups: dict[str, list[RunData]] = {}
    for r in runs:
        key = (
            str(r.pool_path.resolve())
            if r.pool_path is not None and r.pool_path.exists()
            else (f"unreadable:{r.pool_path}")
        )
        groups.setdefault(key, []).append(r)
    pools: dict[str, PoolData] = {}
    for key, members in groups.items():
        wanted: set[int] = set()
        for r in members:
            rows = r.coreset_rows()
            wanted.update(r.index[rows[: max(cfg.n_preview, cfg.n_examples)]].tolist())
            o = r.order()
            finite = o[np.isfinite(r.score[o])]
            wanted.update(r.index[finite[len(finite) - cfg.n_examples :]].tolist() if cfg.n_examples else [])
        with_len = next((r for r in members if "n_tokens" in r.columns), None)
        if key.startswith("unreadable:"):
            first = members[0]
            pd = PoolData(
                key=key,
                path=first.pool_path,
                n_rows=len(first.index),
                note=f"pool file {first.pool_path} not found: source mix and text previews "
                "are not available; pool size taken from scores.parquet",
            )
        else:
            renderer = None
            if with_len is None:
                tok = None
                for r in members:
                    tok = _load_tokenizer(model_spec(r, cfg))
                    if tok is not None:
                        try:
                            renderer = Renderer(tok, render_config(r.info))
                            break
                        except (TypeError, ValueError) as exc:
                            log.warning("tokenizer unusable for rendering (%s)", exc)
            fmt = render_config(members[0].info).format
            pd = scan_pool(Path(key), wanted, format=fmt, renderer=renderer)
            if renderer is not None:
                pd.length_note = (
                    "model tokens, rendered with the chat template of "
                    f"{getattr(renderer.tokenizer, 'name_or_path', 'the model')}"
                )
            else:
                pd.length_note = "whitespace-separated words of all messages (no model tokenizer available)"
        if with_len is not None:
            pd.lengths = dict(
                zip(with_len.index.tolist(), with_len.columns["n_tokens"].astype(int).tolist(), strict=True)
            )
            pd.length_source = N_TOKENS
            trunc = with_len.info.get("config", {}).get("render", {}).get("max_length")
            pd.length_note = (
                f"model tokens (n_tokens of scores.parquet in {with_len.dir.name}, chat template "
                "included" + (f", truncated at {trunc}" if trunc else "") + ")"
            )
        pools[key] = pd
        for r in members:
            r.pool_key = key
    return pools
