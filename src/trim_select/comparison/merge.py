"""``trim-select compare-merge``: join ``compare`` outputs of one experiment split by seed or method.

A long comparison (36 fine-tunes) outlives one machine or session: run it in parts
(``compare --seed 2``, another ``--methods``) and join the parts here. Parts are joined only when
they are provably the same experiment: the same pool content, budget, models, fine-tuning recipe,
evaluation settings and controls, the same resolved precision (``auto`` is bf16 on one CPU and float32
on another), the same task content (digest, where both parts recorded it)
and test rows, and for every method in several parts the same training data (per-seed digests,
where recorded; otherwise the training-row counts and coreset profile of a deterministic method).
A (task, method, seed) in several parts must give the same per-row values within ``tolerance``
(answer NLL; correctness exactly); the first part's rows are kept and the largest difference is
recorded. The joined ``compare.json`` lists its parts (path, git, machine, command) and is paired
afresh from the joined rows (:mod:`.tables`).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..evaluation.controls import method_of
from ..evaluation.stats import read_rows, write_rows
from ..io import atomic_path, write_json
from .tables import compare_markdown, method_means, paired

SAME_FIELDS: tuple[str, ...] = ("budget", "model", "selection_model", "lm_eval_limit", "controls", "pool_profile")
REQUIRED_PRECISION: tuple[str, ...] = ("train_device", "train_dtype", "eval_device", "eval_dtype")
MACHINE_FIELDS: tuple[str, ...] = ("dtype", "device")  # recorded as asked ("auto"); compared via "precision"
TASK_FIELDS: tuple[str, ...] = ("kind", "n_nll", "n_test", "n_lm_eval", "shots", "limit_seed")
STOCHASTIC_LABELS: tuple[str, ...] = ("random",)  # training data differs by seed: only digests compare


class MergeError(ValueError):
    """Two parts are not the same experiment (the message names the parts and the field)."""


def _load(folder: Path) -> tuple[dict[str, Any], dict[str, list[dict[str, Any]]]]:
    path = folder / "compare.json"
    if not path.exists():
        raise MergeError(f"{folder}: no compare.json (not a compare output folder)")
    summary = json.loads(path.read_text(encoding="utf-8"))
    rows = {}
    for task in summary["tasks"]:
        f = folder / "rows" / f"{task}.jsonl.gz"
        if not f.exists():
            raise MergeError(f"{folder}: compare.json names task {task!r} but {f} is missing")
        rows[task] = read_rows(f)
    return summary, rows


def _check_same(where: str, field: str, a: Any, b: Any) -> None:
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(set(a) | set(b), key=str):
            _check_same(where, f"{field}.{key}", a.get(key), b.get(key))
    elif a != b:
        raise MergeError(f"{where}: {field} differs ({json.dumps(a, default=str)[:200]} vs "
                         f"{json.dumps(b, default=str)[:200]}); not the same experiment")


def _settings(summary: dict[str, Any], folder: Path) -> dict[str, Any]:
    """The settings two parts must share: the recipe and evaluation settings without what ``auto``
    resolves per machine, and the resolved ``precision`` (required: without it a part's dtype is unknown)."""
    if any(k not in (summary.get("precision") or {}) for k in REQUIRED_PRECISION):
        raise MergeError(f"{folder}: compare.json records no 'precision' (what dtype 'auto' resolved to), so it "
                         "cannot be shown to match another part; rerun it with this version")
    strip = {k: v for k, v in summary.items() if k in ("recipe", "eval_config")}
    return {k: {f: x for f, x in v.items() if f not in MACHINE_FIELDS} for k, v in strip.items()}


def _check_method(where: str, label: str, a: dict[str, Any], b: dict[str, Any]) -> None:
    da, db = a.get("data_digests", {}), b.get("data_digests", {})
    for seed in set(da) & set(db):
        _check_same(where, f"method {label!r} seed {seed} training data digest", da[seed], db[seed])
    if method_of(label) not in STOCHASTIC_LABELS:
        _check_same(where, f"method {label!r} training rows", a["train"], b["train"])
        _check_same(where, f"method {label!r} coreset profile", a["profile"], b["profile"])
    if "scores" in a or "scores" in b:
        _check_same(where, f"method {label!r} external ranking digest", (a.get("scores") or {}).get("xxh3_128"),
                    (b.get("scores") or {}).get("xxh3_128"))


def _check_task(where: str, name: str, a: dict[str, Any], b: dict[str, Any]) -> None:
    for field in TASK_FIELDS:
        _check_same(where, f"task {name!r} {field}", a.get(field), b.get(field))
    if a.get("identity") and b.get("identity"):
        _check_same(where, f"task {name!r} content digest", a["identity"]["xxh3_128"], b["identity"]["xxh3_128"])
    _check_same(where, f"task {name!r} decontamination", a["decontamination"], b["decontamination"])
    for label in set(a["methods"]) & set(b["methods"]):
        _check_method(where, label, a["methods"][label], b["methods"][label])


def _join_rows(task: str, parts: Sequence[list[dict[str, Any]]], tolerance: float) -> tuple[list[dict], dict]:
    """Rows of every part, a (method, seed, id) kept once; duplicates checked against ``tolerance``."""
    kept: dict[tuple[str, str, str], dict[str, Any]] = {}
    dup, worst = 0, 0.0
    for rows in parts:
        for r in rows:
            key = (str(r["method"]), str(r["seed"]), str(r["id"]))
            first = kept.setdefault(key, r)
            if first is r:
                continue
            dup += 1
            for metric in ("correct", "lm_eval_correct"):
                if first.get(metric) != r.get(metric):
                    raise MergeError(f"task {task!r}: {key} has {metric} {first.get(metric)} in one part and "
                                     f"{r.get(metric)} in another")
            if (first.get("answer_nll") is None) != (r.get("answer_nll") is None):
                raise MergeError(f"task {task!r}: {key} has answer_nll in one part only")
            if first.get("answer_nll") is not None:
                diff = abs(float(first["answer_nll"]) - float(r["answer_nll"]))
                if diff > tolerance:
                    raise MergeError(f"task {task!r}: {key} answer_nll {first['answer_nll']} vs "
                                     f"{r['answer_nll']} (|diff| {diff:.2e} > tolerance {tolerance})")
                worst = max(worst, diff)
    return list(kept.values()), {"duplicate_rows": dup, "max_abs_answer_nll_diff": worst}


def _join_task(name: str, entries: Sequence[dict[str, Any]], rows: list[dict[str, Any]]) -> dict[str, Any]:
    first = entries[0]
    methods: dict[str, Any] = {}
    for e in entries:
        for label, m in e["methods"].items():
            have = methods.setdefault(label, {**m, "seeds_done": [], "data_digests": {}})
            have["seeds_done"] = sorted({*have["seeds_done"], *m["seeds_done"]})
            have["data_digests"] = {**m.get("data_digests", {}), **have["data_digests"]}
    identity = next((e["identity"] for e in entries if e.get("identity")), None)
    return {**first, "identity": identity, "methods": methods, "means": method_means(rows), "paired": paired(rows)}


def merge_compares(parts: Sequence[str | Path], out_dir: str | Path, *, tolerance: float = 1e-3) -> dict[str, Any]:
    """Join the ``compare`` output folders ``parts`` into ``out_dir`` (compare.json/.md, rows/); returns the
    joined summary. Raises :class:`MergeError` naming the parts and the field when they differ."""
    if len(parts) < 2:
        raise MergeError("compare-merge needs at least two compare output folders")
    folders = [Path(p) for p in parts]
    loaded = [_load(f) for f in folders]
    ref, ref_dir = loaded[0][0], folders[0]
    for (summary, _), folder in zip(loaded[1:], folders[1:], strict=True):
        where = f"{ref_dir} vs {folder}"
        _check_same(where, "pool content", ref["pool"]["xxh3_128"], summary["pool"]["xxh3_128"])
        _check_same(where, "settings", _settings(ref, ref_dir), _settings(summary, folder))
        pa, pb = ref["precision"], summary["precision"]  # select_*: recorded since session 21 (and by both here)
        _check_same(where, "precision", {k: pa[k] for k in set(pa) & set(pb)}, {k: pb[k] for k in set(pa) & set(pb)})
        for field in SAME_FIELDS:
            _check_same(where, field, ref.get(field), summary.get(field))
        for name in set(ref["tasks"]) & set(summary["tasks"]):
            _check_task(where, name, ref["tasks"][name], summary["tasks"][name])
    names = list(dict.fromkeys(n for s, _ in loaded for n in s["tasks"]))
    out = Path(out_dir)
    joined: dict[str, Any] = {**ref, "argv": None, "tasks": {}, "merge": {"parts": [], "tasks": {}}}
    joined["methods"] = list(dict.fromkeys(m for s, _ in loaded for m in s["methods"]))
    joined["labels"] = list(dict.fromkeys(lb for s, _ in loaded for lb in s["labels"]))
    joined["seeds"] = sorted({x for s, _ in loaded for x in s["seeds"]})
    joined["complete"] = all(s.get("complete") for s, _ in loaded)
    joined["git"] = ", ".join(dict.fromkeys(str(s.get("git")) for s, _ in loaded))
    joined["machine"] = "; ".join(dict.fromkeys(str(s.get("machine")) for s, _ in loaded))
    joined["merge"]["parts"] = [{"path": str(f), "git": s.get("git"), "machine": s.get("machine"),
                                 "argv": s.get("argv"), "seeds": s["seeds"], "complete": s.get("complete")}
                                for (s, _), f in zip(loaded, folders, strict=True)]
    for name in names:
        having = [(s, r) for s, r in loaded if name in s["tasks"]]
        rows, stats = _join_rows(name, [r[name] for _, r in having], tolerance)
        joined["tasks"][name] = _join_task(name, [s["tasks"][name] for s, _ in having], rows)
        joined["merge"]["tasks"][name] = stats
        write_rows(out / "rows" / f"{name}.jsonl.gz", rows)
    write_json(out / "compare.json", joined)
    with atomic_path(out / "compare.md") as tmp:
        tmp.write_text(compare_markdown(joined))
    return joined
