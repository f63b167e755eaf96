"""Warmup: LoRA fine-tuning of ``M_0`` on a seeded random share of the pool (``docs/SPEC.md`` "Warmup").

TRIM scores with a warmed-up model ``M_warmup`` (paper Section 3, "Setup and Notation"; Algorithm 3,
line 1): ``M_0`` is LoRA-fine-tuned on a random ``gamma = 5%`` of the pool with the recipe the paper
shares with LESS (Table 7, :class:`~trim_select.training.lora.LoraRecipe`), and Stage I and II run on
the result. Table 8: scoring with the last checkpoint beats an early one, which beats the raw model.

Output: the layout of :mod:`trim_select.training.checkpoints` plus ``OUT/subset.json`` and
``OUT/warmup.json`` (completion marker: subset ids and indices, fraction, seed, training summary).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .config import WARMUP_FRACTION, config_hash
from .data import read_records
from .io import check_unchanged, file_identity, write_json
from .locking import folder_lock
from .models import resolve_model_path
from .selection import parse_budget
from .training import fine_tune
from .training.lora import TrainResult
from .training.recipe import LoraRecipe


@dataclass(frozen=True)
class WarmupResult:
    """The warmed model (``final``) and how it was made (``OUT/warmup.json``)."""

    train: TrainResult
    subset_ids: tuple[str, ...]
    subset_indices: tuple[int, ...]
    fraction: float
    seed: int
    pool_records: int

    @property
    def final(self) -> Path:
        return self.train.final

    def to_dict(self) -> dict[str, Any]:
        return {"fraction": self.fraction, "seed": self.seed, "pool_records": self.pool_records,
                "subset": {"n": len(self.subset_ids), "ids": list(self.subset_ids),
                           "indices": list(self.subset_indices)},
                **self.train.to_dict()}


def draw_subset(n_records: int, fraction: float, seed: int) -> np.ndarray:
    """Sorted positions of a seeded random ``round(fraction * n)`` share (at least 1) of ``n`` records."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    if n_records < 1:
        raise ValueError("the pool holds no valid record")
    k = max(1, parse_budget(float(fraction), n_records))
    return np.sort(np.random.default_rng(seed).choice(n_records, size=k, replace=False))


def warmup_key(pool: str | Path, model: str | os.PathLike, fraction: float, seed: int, recipe: LoraRecipe,
               format: str | None = None, skip_invalid: bool = False) -> str:
    """Identity of a warmup: pool file, base model folder, subset and recipe."""
    base = str(resolve_model_path(model).resolve())
    return config_hash(recipe.key_fields(), {"pool": file_identity(pool), "base": base, "fraction": fraction,
                                             "seed": seed, "format": format, "skip_invalid": skip_invalid})


def load_warmup(out_dir: str | Path) -> WarmupResult:
    """Read a finished warmup folder."""
    out = Path(out_dir)
    d = json.loads((out / "warmup.json").read_text())
    return WarmupResult(TrainResult.from_dict(out, d, cached=True), tuple(d["subset"]["ids"]),
                        tuple(d["subset"]["indices"]), float(d["fraction"]), int(d["seed"]),
                        int(d["pool_records"]))


def warmup(
    pool_path: str | Path,
    out_dir: str | Path,
    model: str | os.PathLike = "default",
    fraction: float = WARMUP_FRACTION,
    seed: int = 0,
    recipe: LoraRecipe = LoraRecipe(),
    *,
    format: str | None = None,
    skip_invalid: bool = False,
    progress: bool = True,
    overwrite: bool = False,
    trust_remote_code: bool = False,
    on_step: Callable[[int, dict[str, Any]], None] | None = None,
) -> WarmupResult:
    """Warmup of docs/SPEC.md: LoRA-fine-tune ``model`` on a seeded random ``fraction`` of the pool.

    ``seed`` draws the subset (``numpy.random.default_rng(seed)``); ``recipe.seed`` drives data order,
    LoRA init and dropout (the CLI sets both from ``--seed``). A finished warmup with the same
    settings in ``out_dir`` is returned without loading the model; an interrupted one resumes.
    ``out_dir`` is locked; a pool whose content changed since the warmup there is refused unless
    ``overwrite``.
    """
    with folder_lock(out_dir, "warmup"):
        return _warmup(pool_path, Path(out_dir), model, fraction, seed, recipe, format=format,
                       skip_invalid=skip_invalid, progress=progress, overwrite=overwrite,
                       trust_remote_code=trust_remote_code, on_step=on_step)


def _warmup(pool_path: str | Path, out: Path, model: str | os.PathLike, fraction: float, seed: int,
            recipe: LoraRecipe, *, format: str | None, skip_invalid: bool, progress: bool, overwrite: bool,
            trust_remote_code: bool, on_step: Callable[[int, dict[str, Any]], None] | None) -> WarmupResult:
    key = warmup_key(pool_path, model, fraction, seed, recipe, format, skip_invalid)
    done = out / "warmup.json"
    if done.exists() and (out / "final").is_dir():
        prev = json.loads(done.read_text())
        if prev.get("key") == key:
            return load_warmup(out)
        check_unchanged({"pool": prev.get("pool")}, {"pool": file_identity(pool_path)}, out, overwrite=overwrite)
        if not overwrite:
            raise RuntimeError(f"{out} holds a warmup with different settings (pool, model, fraction, seed "
                               "or recipe); rerun with --overwrite to redo it or choose another --out")
    n_records = sum(1 for _ in read_records(pool_path, format, skip_invalid=skip_invalid))
    chosen = draw_subset(n_records, fraction, seed)
    wanted = set(chosen.tolist())
    subset = [r for pos, r in enumerate(read_records(pool_path, format, skip_invalid=skip_invalid))
              if pos in wanted]
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "subset.json", {"ids": [r.id for r in subset], "indices": [r.index for r in subset]})
    t0 = time.perf_counter()
    train = fine_tune(model, subset, out, recipe, progress=progress, overwrite=overwrite,
                       trust_remote_code=trust_remote_code, on_step=on_step)
    result = WarmupResult(train, tuple(r.id for r in subset), tuple(r.index for r in subset), fraction, seed,
                          n_records)
    write_json(done, {"key": key, "pool": file_identity(pool_path),
                      "wall_s": round(time.perf_counter() - t0, 3), **result.to_dict()})
    return result

