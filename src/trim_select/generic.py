"""The generic target set of the generic correction (docs/SPEC.md "Extensions": ``generic_rows``).

``N`` pool rows drawn with ``numpy.random.default_rng(seed).choice(n_records, N, replace=False)``
(sorted; the draw of ``benchmarks/ablations.py``) get their own fingerprints (Stage I, Eq. 1-9, the
same render, fingerprint settings and hidden layer as the targets). Stage II scores every pool row
against the targets and against this set from the same forward and keeps ``S_T(c) - S_G(c)``
(:func:`trim_select.scoring.generic_corrected`): a row that looks like *any* target, a "hub", scores
high against both and the difference cancels it.

The generic fingerprints are cached in ``OUT/generic-fingerprints.safetensors`` under a key of
everything they depend on (pool content, N, seed, render and fingerprint settings, model weights,
format, ``skip_invalid``); their rows' pool indices and ids are in its metadata and in ``run.json``.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .config import ScoreConfig, config_hash
from .data import Record, read_records
from .fingerprints import Fingerprints, build_fingerprints
from .io import file_identity

if TYPE_CHECKING:
    from .selector import TrimSelector

GENERIC_FILE = "generic-fingerprints.safetensors"


def generic_positions(n_records: int, rows: int, seed: int) -> np.ndarray:
    """Positions (among the pool's valid records) of the generic rows, ascending."""
    if rows > n_records:
        raise ValueError(f"generic_rows {rows} exceeds the pool's {n_records} records")
    return np.sort(np.random.default_rng(seed).choice(n_records, rows, replace=False))


def generic_records(pool: str | Path, rows: int, seed: int, *, format: str | None = None,
                    skip_invalid: bool = False) -> list[Record]:
    """The generic rows of ``pool`` (two reads: count the records, then take the drawn ones)."""
    n = sum(1 for _ in read_records(pool, format, skip_invalid=skip_invalid, track_ids=False))
    want = set(generic_positions(n, rows, seed).tolist())
    return [r for i, r in enumerate(read_records(pool, format, skip_invalid=skip_invalid, track_ids=False))
            if i in want]


def generic_key(sel: TrimSelector, pool: str | Path, *, format: str | None, skip_invalid: bool) -> str:
    """Identity of the generic fingerprints: every input they are computed from."""
    sc = sel.score_config
    return config_hash(sel.render_config, sel.fingerprint_config,
                       {"pool": file_identity(pool), "rows": sc.generic_rows, "seed": sc.generic_seed,
                        "format": format, "skip_invalid": skip_invalid, "model": sel.lm.sha256})


def resolve_generic(sel: TrimSelector, pool: str | Path, out_dir: str | Path, *, format: str | None = None,
                    skip_invalid: bool = False) -> Fingerprints | None:
    """``sel.generic``: the cached generic fingerprints of ``out_dir`` when their key matches, else
    built and saved there; ``None`` (and ``sel.generic = None``) when the correction is off."""
    sc = sel.score_config
    if not sc.generic_rows:
        sel.generic = None
        return None
    key = generic_key(sel, pool, format=format, skip_invalid=skip_invalid)
    path = Path(out_dir) / GENERIC_FILE
    if path.exists():
        fp = Fingerprints.load(path)
        if fp.meta.get("generic_key") == key:
            sel.generic = fp
            return fp
    recs = generic_records(pool, sc.generic_rows, sc.generic_seed, format=format, skip_invalid=skip_invalid)
    renderer = sel.renderer()
    fc = sel.fingerprint_config
    fp = build_fingerprints(sel.lm.model, [renderer(r) for r in recs], fc.layers, fc.row_weight, fc.col_weight,
                            batch_tokens=sel.runtime.batch_tokens, hidden_layer=sel.hidden_layer)
    fp.meta.update({"generic_key": key, "generic": generic_info(sc.generic_rows, sc.generic_seed, recs),
                    "pool": file_identity(pool), "model": sel.model_identity()})
    fp.save(path)
    sel.generic = fp
    return fp


def generic_info(rows: int, seed: int, recs: list[Record]) -> dict[str, Any]:
    """What ``run.json`` records of the generic set: its size, seed, and rows (pool index and id)."""
    return {"rows": rows, "seed": seed, "indices": [r.index for r in recs], "ids": [r.id for r in recs]}


def prepare_extensions(sel: TrimSelector, pool: str | Path, out_dir: str | Path, engine: str, *,
                       format: str | None = None, skip_invalid: bool = False) -> None:
    """Driver side of a scale-out run: the generic set resolved once, before any worker starts; the
    Ray engine, whose actors build their scorers from arrays, is refused for the generic correction."""
    if engine == "ray" and sel.score_config.generic_rows:
        raise ValueError("--generic-rows runs on the in-process and local engines for now, not on --engine ray")
    resolve_generic(sel, pool, out_dir, format=format, skip_invalid=skip_invalid)


def generic_section(out_dir: str | Path, scoring: ScoreConfig) -> dict[str, Any]:
    """``{"generic": ...}`` for ``run.json`` from ``out_dir``'s generic set (merge needs no model); ``{}`` when off."""
    path = Path(out_dir) / GENERIC_FILE
    if not scoring.generic_rows or not path.exists():
        return {}
    return generic_summary(Fingerprints.load(path))


def generic_summary(fp: Fingerprints) -> dict[str, Any]:
    """``run.json``'s ``generic`` section of a generic set: size, seed, rows (pool indices, ids), classes."""
    return {"generic": {**fp.meta.get("generic", {}), "classes": len(fp)}}
