"""``trim-select compare``: selection methods x seeds x tasks -> one table like the paper's Table 1.

For each task folder (``val.jsonl`` = the target set) and method, the pool is reduced to the budget
(TRIM through :class:`~trim_select.selector.TrimSelector`, the ``select`` code path; baselines
through :func:`trim_select.baselines.run_baseline`), the coreset is fine-tuned with one recipe per
seed and evaluated (:mod:`.runner`). Beside the metrics the table shows what each selection cost
(seconds, forward/backward passes, from its ``run.json``) and what it picked: the coreset's source
mix (the pool rows' ``dataset`` field) and mean token length.

Output folder (resumable: every step is skipped when its output is present with the same settings)::

    OUT/select/<task>/<method>[-seed-<s>]/   selection output (coreset.jsonl, run.json, ...)
    OUT/train/<data>-seed-<s>/               fine-tuning runs, shared by identical coresets
    OUT/eval/<method>/<task>/seed-<s>.json   one (method, seed) result; OUT/eval/base/<task>/base.json
    OUT/compare.json, OUT/compare.md         the table

Selections of ``random`` are drawn again for every seed (seed = training seed); deterministic methods
select once and only the fine-tuning seed varies.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from ..config import RenderConfig, RuntimeConfig, config_hash, to_dict
from ..data import Record, Renderer, read_records
from ..io import atomic_path, check_unchanged, write_json
from ..io import file_identity as _identity
from ..locking import folder_lock
from ..models import resolve_model_path
from .harness import METRICS, PRIMARY_METRIC, EvalConfig
from .runner import (
    METRIC_LABELS,
    aggregate,
    decoding_note,
    evaluate_reference,
    evaluation_recipe,
    fmt_metric,
    load_train_records,
    mean_std,
    train_and_evaluate,
)
from .tasks import Task, load_task

TRIM_METHODS: tuple[str, ...] = ("trim",)
STOCHASTIC_METHODS: frozenset[str] = frozenset({"random"})


def available_methods() -> list[str]:
    """``trim`` and every registered baseline."""
    try:
        from ..baselines import BASELINES
    except ImportError:  # baselines not part of this build
        return list(TRIM_METHODS)
    return [*TRIM_METHODS, *sorted(BASELINES)]


def _selection_models(selection_model: str) -> tuple[str, str]:
    """(model for TRIM/RDS, model for LESS): a warmup folder gives its ``final/`` adapter to TRIM and
    the folder itself (all checkpoints) to LESS; anything else is used as is by both."""
    p = Path(selection_model)
    if p.is_dir() and (p / "final").is_dir() and (p / "checkpoints").is_dir():
        return str(p / "final"), str(p)
    return selection_model, selection_model


def run_selection(method: str, task: Task, pool: str | Path, budget: str, out_dir: str | Path, *, seed: int,
                  selection_model: str, runtime: RuntimeConfig, progress: bool = True,
                  overwrite: bool = False) -> dict[str, Any]:
    """One selection (skipped when ``out_dir`` holds it with the same settings); returns its run.json.

    Its key holds the pool's and targets' content digests, so a changed file is never reused; an
    earlier selection there from a file that changed since is refused unless ``overwrite``."""
    out = Path(out_dir)
    targets = Path(task.path) / "val.jsonl"
    if not targets.exists():
        raise FileNotFoundError(f"{targets}: a task folder needs val.jsonl (the target set) for selection")
    key = config_hash(runtime, {"method": method, "pool": _identity(pool), "targets": _identity(targets),
                                "budget": budget, "seed": seed, "model": selection_model})
    marker = out / "selection.json"
    if marker.exists() and (out / "coreset.jsonl").exists() and (out / "run.json").exists():
        if json.loads(marker.read_text()).get("key") == key:
            return json.loads((out / "run.json").read_text())
        prev = json.loads((out / "run.json").read_text())
        check_unchanged({"pool": prev.get("pool"), "targets": prev.get("targets")},
                        {"pool": _identity(pool), "targets": _identity(targets)}, out, overwrite=overwrite)
    trim_model, less_model = _selection_models(selection_model)
    if method == "trim":
        from ..selector import TrimSelector

        sel = TrimSelector(trim_model, runtime=runtime, progress=progress)
        report = sel.run(pool, out, budget, targets=targets, overwrite=True)
    else:
        from ..baselines import BaselineConfig, run_baseline

        model = less_model if method == "less" else trim_model
        base_cfg = BaselineConfig(seed=seed, model=model, runtime=runtime)
        report = run_baseline(method, pool, targets, out, budget, config=base_cfg, progress=progress,
                              overwrite=True)
    write_json(marker, {"key": key, "method": method, "seed": seed})
    return report


def selection_cost(report: dict[str, Any]) -> dict[str, Any]:
    """Seconds and forward/backward passes of a selection, from the ``cost`` section every run.json
    has (:class:`trim_select.outputs.RunReport`)."""
    c = report["cost"]
    return {"seconds": c.get("wall_seconds"), "forward_passes": c.get("forward_passes"),
            "backward_passes": c.get("backward_passes"), "tokens": c.get("tokens")}


def coreset_profile(records: Sequence[Record], renderer: Renderer) -> dict[str, Any]:
    """Rows, source shares (``dataset`` field) and mean rendered token length of a set of rows."""
    sources = Counter(str(r.fields.get("dataset")) for r in records if "dataset" in r.fields)
    n = len(records)
    lengths = [len(renderer(r)) for r in records]
    return {"rows": n, "sources": {k: v / n for k, v in sorted(sources.items())} if sources else {},
            "mean_tokens": float(np.mean(lengths)) if lengths else None}


def _mix(shares: dict[str, float], key_source: str | None) -> str:
    if not shares:
        return "–"
    order = sorted(shares, key=lambda s: (s != key_source, -shares[s], s))
    return " · ".join(f"{'**' + s + '**' if s == key_source else s} {100 * shares[s]:.0f}%" for s in order)


KEY_SOURCE: dict[str, str] = {"gsm": "cot"}


def compare_markdown(summary: dict[str, Any]) -> str:
    """One table per task: methods as rows; metrics (mean ± std), selection cost, coreset profile."""
    recipe = summary["recipe"]
    lines = ["# Method comparison", "",
             f"Pool `{summary['pool']['path']}` ({summary['pool_profile']['rows']} rows), "
             f"budget {summary['budget']}, "
             f"base model `{summary['model']}`, selection model `{summary['selection_model']}`, "
             f"seeds {summary['seeds']}. Fine-tuning recipe (every method): "
             + ", ".join(f"{k}={recipe[k]}" for k in ("epochs", "lr", "batch_size", "lora_r", "lora_alpha",
                                                      "lora_dropout", "dtype"))
             + ". Mean ± sample std over seeds; selection cost from each run.json (TRIM: targets + pool "
               "forward passes; warmup not included)."]
    for name, t in summary["tasks"].items():
        kind = t["kind"]
        metrics = METRICS[kind]
        key_src = KEY_SOURCE.get(name)
        lines += ["", f"## {name}", "",
                  f"{t['n']} of {t['n_test']} test rows"
                  + (f" (seeded subset, seed {t['limit_seed']})" if t.get("limit_seed") is not None else "")
                  + f", {t['shots']}-shot"
                  + (decoding_note(t) if kind == "math" else "")
                  + ".", ""]
        head = ["method", "seeds", *(METRIC_LABELS.get(m, m) for m in metrics), "select s", "fwd passes",
                "bwd passes", "source mix", "mean tokens"]
        lines.append("| " + " | ".join(head) + " |")
        lines.append("|" + "---|" * len(head))
        pool = summary["pool_profile"]
        if t.get("base"):
            b = t["base"]
            lines.append("| base model (no fine-tuning) | – | "
                         + " | ".join(fmt_metric(b["metrics"].get(m), m) for m in metrics)
                         + " | – | – | – | – | – |")
        for method, row in t["methods"].items():
            cells = [fmt_metric(row["metrics"][m], m) for m in metrics]
            c = row["cost"]

            def num(x: Any, digits: int = 0) -> str:
                return "–" if x is None else f"{x:,.{digits}f}"

            prof = row["profile"]
            lines.append(f"| {method} | {len(row['seeds'])} | " + " | ".join(cells)
                         + f" | {num(c['seconds'], 1)} | {num(c['forward_passes'])} | "
                         + f"{num(c['backward_passes'])} | {_mix(prof['sources'], key_src)} | "
                         + f"{num(prof['mean_tokens'])} |")
        lines.append(f"| *pool* | | {' | '.join('' for _ in metrics)} | | | | "
                     f"{_mix(pool['sources'], key_src)} | {pool['mean_tokens']:.0f} |")
    return "\n".join(lines) + "\n"


def _avg_dicts(dicts: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Mean of numeric values key by key (selection cost / profile of per-seed selections)."""
    out: dict[str, Any] = {}
    for k in dicts[0]:
        vals = [d.get(k) for d in dicts]
        if all(isinstance(v, dict) for v in vals):
            keys = sorted(set().union(*vals))
            out[k] = {kk: float(np.mean([v.get(kk, 0.0) for v in vals])) for kk in keys}
        elif all(isinstance(v, (int, float)) for v in vals):
            out[k] = float(np.mean(vals))
        else:
            out[k] = vals[0]
    return out


def compare(
    tasks: Sequence[str | Path],
    pool: str | Path,
    budget: str,
    methods: Sequence[str],
    out_dir: str | Path,
    *,
    seeds: int | Sequence[int] = 3,
    model: str = "default",
    selection_model: str | None = None,
    recipe: Any = None,
    config: EvalConfig | None = None,
    runtime: RuntimeConfig | None = None,
    baseline: bool = True,
    progress: bool = True,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Select with every method, fine-tune and evaluate each x seeds; write compare.json/.md.

    ``out_dir`` is locked; per-step results keyed on the inputs' content digests are reused, and a
    selection from a pool or targets file that changed since is refused unless ``overwrite``."""
    with folder_lock(out_dir, "compare"):
        return _compare(tasks, pool, budget, methods, out_dir, seeds=seeds, model=model,
                        selection_model=selection_model, recipe=recipe, config=config, runtime=runtime,
                        baseline=baseline, progress=progress, overwrite=overwrite)


def _compare(tasks: Sequence[str | Path], pool: str | Path, budget: str, methods: Sequence[str],
             out_dir: str | Path, *, seeds: int | Sequence[int], model: str, selection_model: str | None,
             recipe: Any, config: EvalConfig | None, runtime: RuntimeConfig | None, baseline: bool,
             progress: bool, overwrite: bool) -> dict[str, Any]:
    from transformers import AutoTokenizer

    t_start = time.perf_counter()
    config = config if config is not None else EvalConfig()
    runtime = runtime if runtime is not None else RuntimeConfig()
    known = available_methods()
    unknown = [m for m in methods if m not in known]
    if unknown:
        raise ValueError(f"unknown methods {unknown}; expected some of {known}")
    if not methods:
        raise ValueError("give at least one method")
    seed_list = list(range(seeds)) if isinstance(seeds, int) else list(seeds)
    if not seed_list:
        raise ValueError("compare needs at least one seed")
    loaded = [load_task(t) for t in tasks]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    selection_model = selection_model or model
    recipe = recipe if recipe is not None else evaluation_recipe(config.device)
    train_root = out / "train"
    tok = AutoTokenizer.from_pretrained(resolve_model_path(model), local_files_only=True)
    renderer = Renderer(tok, RenderConfig(max_length=1 << 30))
    pool_profile = coreset_profile(list(read_records(pool)), renderer)

    summary: dict[str, Any] = {
        "command": "compare", "pool": _identity(pool), "budget": budget, "model": model,
        "selection_model": selection_model, "methods": list(methods), "seeds": seed_list,
        "recipe": to_dict(replace(recipe, seed=0)), "eval_config": to_dict(config),
        "pool_profile": pool_profile, "tasks": {}}
    base = (evaluate_reference(model, loaded, out / "eval" / "base", config, progress=progress)
            if baseline else {})
    for task in loaded:
        rows: dict[str, Any] = {}
        for method in methods:
            per_seed, costs, profiles = [], [], []
            selections: dict[str, list[Record]] = {}
            for s in seed_list:
                stochastic = method in STOCHASTIC_METHODS
                sel_dir = out / "select" / task.name / (f"{method}-seed-{s}" if stochastic else method)
                if str(sel_dir) not in selections:
                    report = run_selection(method, task, pool, budget, sel_dir,
                                           seed=s if stochastic else 0, selection_model=selection_model,
                                           runtime=runtime, progress=progress, overwrite=overwrite)
                    _, records = load_train_records(sel_dir)
                    selections[str(sel_dir)] = records
                    costs.append(selection_cost(report))
                    profiles.append(coreset_profile(records, renderer))
                res = train_and_evaluate(selections[str(sel_dir)], [task], out / "eval" / method, s,
                                         model=model, recipe=recipe, config=config, train_root=train_root,
                                         progress=progress)[task.name]
                per_seed.append(res)
            rows[method] = {
                "seeds": seed_list, "selections": list(selections),
                "metrics": aggregate(task.kind, per_seed),
                "per_seed": [{"seed": r["seed"], "metrics": r["metrics"],
                              "train_seconds": r["train"]["seconds"], "eval_seconds": r["seconds"]}
                             for r in per_seed],
                "cost": _avg_dicts(costs), "profile": _avg_dicts(profiles),
                "train_seconds": mean_std([r["train"]["seconds"] for r in per_seed]),
                "eval_seconds": mean_std([r["seconds"] for r in per_seed]),
            }
        ref = base.get(task.name)
        any_res = ref or (per_seed[0] if per_seed else None)
        summary["tasks"][task.name] = {
            "path": task.path, "kind": task.kind, "primary_metric": PRIMARY_METRIC[task.kind],
            "n": any_res["n"] if any_res else None, "n_test": len(task.test),
            "limit_seed": any_res.get("limit_seed") if any_res else None, "shots": config.shots_for(task),
            "max_new_tokens": config.max_new_tokens, "generate": config.generate,
            "base": {"metrics": ref["metrics"], "seconds": ref["seconds"]} if ref else None,
            "methods": rows,
        }
    summary["wall_seconds_this_run"] = round(time.perf_counter() - t_start, 3)
    write_json(out / "compare.json", summary)
    md = compare_markdown(summary)
    with atomic_path(out / "compare.md") as tmp:
        tmp.write_text(md)
    summary["markdown"] = md
    return summary
