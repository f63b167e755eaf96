"""``trim-select compare``: selection methods x seeds x tasks -> paired evidence (paper Table 1).

Each method selects ``budget`` of the pool per task (:mod:`.selections`: TRIM for all tasks in one
pool pass, ``trim-warmup`` on the shared warmup, baselines through ``run_baseline``), the controls
make the coresets comparable (fill-up, ``decontaminate``, ``match_tokens``, ``order_control``), and each coreset is
LoRA-fine-tuned with one recipe per seed and scored (:func:`trim_select.evaluation.train_and_evaluate`):
answer NLL and accuracy on ``config.limit`` test rows (seeded subset; all rows when ``None``),
lm-eval on the first ``lm_eval_limit`` of them. Per-row results of every (method, seed, row) go to
``OUT/rows/<task>.jsonl.gz``; :mod:`.tables` pairs the methods on them.

Output folder (resumable per (task, method, seed); ``compare.json``/``.md`` rewritten after each)::

    OUT/warmup/                               the warmup shared by trim-warmup and LESS
    OUT/select/trim[-warmup]/<task>/          TRIM for every task in one pool pass
    OUT/select/<task>/<method>[-seed-<s>]/    baselines (random: one selection per seed)
    OUT/train/<data>-seed-<s>/                fine-tunes, shared by identical coresets
    OUT/eval/<label>/<task>/seed-<s>.json     one (method, seed) result (+ predictions/, lm-eval-seed-<s>.json)
    OUT/rows/<task>.jsonl.gz, OUT/compare.json, OUT/compare.md
"""

from __future__ import annotations

import json
import sys
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from ..config import RenderConfig, RuntimeConfig, config_hash, to_dict
from ..data import Record, Renderer, read_records
from ..evaluation.controls import matched_label, method_of, shuffled_label, shuffled_order
from ..evaluation.decontamination import DecontaminationConfig, contaminated
from ..evaluation.harness import EvalConfig
from ..evaluation.lm_eval_tasks import lm_eval_correct, subset_task_folder
from ..evaluation.runner import evaluate_reference, evaluation_recipe, load_finetuned, train_and_evaluate
from ..evaluation.stats import write_rows
from ..evaluation.tasks import Task, load_task
from ..io import atomic_path, file_identity, write_json
from ..locking import folder_lock
from ..models import resolve_model_path
from ..pipeline import PipelineConfig
from .provenance import git_sha, machine, precision
from .rows import model_rows
from .selections import (
    TRIM_METHODS,
    TRIM_VARIANTS,
    WARMUP_METHODS,
    TrainingRows,
    external_selection,
    ranking_of,
    run_selection,
    selection_cost,
    shared_warmup,
    training_rows,
    trim_selections,
    trim_variant,
)
from .tables import BASE, compare_markdown, method_means, paired

STOCHASTIC_METHODS: frozenset[str] = frozenset({"random"})


def available_methods() -> list[str]:
    """``trim``, ``trim-warmup``, the TRIM variants (``trim-layer-N``: any layer N) and every registered
    baseline."""
    from ..baselines import BASELINES

    return [*TRIM_METHODS, *TRIM_VARIANTS, *sorted(BASELINES)]


def coreset_profile(records: Sequence[Record], lengths: Sequence[int]) -> dict[str, Any]:
    """Rows, source shares (``dataset`` field) and mean rendered token length of a set of rows."""
    sources = Counter(str(r.fields.get("dataset")) for r in records if "dataset" in r.fields)
    n = len(records)
    return {"rows": n, "sources": {k: v / n for k, v in sorted(sources.items())} if sources else {},
            "mean_tokens": float(np.mean(lengths)) if len(lengths) else None}


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
    lm_eval_limit: int = 0,
    lm_eval_batch_size: int = 8,
    match_tokens: str | None = None,
    order_control: str | None = None,
    decontaminate: bool = False,
    selections: Mapping[str, str | Path] | None = None,
    runtime: RuntimeConfig | None = None,
    baseline: bool = True,
    progress: bool = True,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Select with every method, fine-tune and evaluate each x seeds; write compare.json/.md.

    ``lm_eval_batch_size``: requests per lm-eval forward (greedy decoding at 1 is ~10 s per ``gsm`` row on a
    2-core CPU). ``config.limit``: test rows for the answer NLL (a seeded subset; ``None``: all). ``match_tokens``:
    also train every other method on the prefix of its ranking with that method's token total
    (labelled ``<method>@<ref>-tokens``). ``order_control``: also train that method's rows in a shuffled order
    (``<method>~shuffled``, an A/A noise floor; :mod:`trim_select.evaluation.controls`). ``out_dir`` is
    locked; results keyed on the inputs' content digests are reused, and a changed pool or targets file is
    refused unless ``overwrite``."""
    with folder_lock(out_dir, "compare"):
        run = _Compare(tasks, pool, budget, methods, out_dir, seeds=seeds, model=model,
                       selection_model=selection_model, recipe=recipe, config=config,
                       lm_eval_limit=lm_eval_limit, lm_eval_batch_size=lm_eval_batch_size,
                       match_tokens=match_tokens, order_control=order_control, decontaminate=decontaminate,
                       selections=selections or {},
                       runtime=runtime, baseline=baseline, progress=progress, overwrite=overwrite)
        return run.execute()


class _Compare:
    """One compare run: the inputs, then selections -> training rows -> fine-tunes -> summary."""

    def __init__(self, tasks: Sequence[str | Path], pool: str | Path, budget: str, methods: Sequence[str],
                 out_dir: str | Path, **kw: Any):
        known = available_methods()
        unknown = [m for m in methods if trim_variant(m) is None and (m not in known or m in TRIM_VARIANTS)]
        self.external = {str(k): Path(v) for k, v in kw["selections"].items()}
        if unknown or not (methods or self.external):
            raise ValueError(f"unknown methods {unknown}; expected some of {known}" if unknown
                             else "give at least one method")
        clash = sorted(set(self.external) & {*known, *methods, BASE}
                       | {n for n in self.external if trim_variant(n) is not None or "@" in n})
        if clash:
            raise ValueError(f"external selection names {clash} clash with method names; rename them")
        seeds = kw["seeds"]
        self.seeds = list(range(seeds)) if isinstance(seeds, int) else list(seeds)
        if not self.seeds:
            raise ValueError("compare needs at least one seed")
        methods = [*methods, *self.external]
        for option in ("match_tokens", "order_control"):
            if kw[option] is not None and kw[option] not in methods:
                raise ValueError(f"--{option.replace('_', '-')} {kw[option]!r} is not among the methods {methods}")
        self.tasks = [load_task(t) for t in tasks]
        if len({t.name for t in self.tasks}) != len(self.tasks):
            raise ValueError("two task folders share a name; their results would collide")
        self.pool, self.budget, self.methods, self.out = pool, budget, list(methods), Path(out_dir)
        self.model = kw["model"]
        self.selection_model = kw["selection_model"] or self.model
        self.config = kw["config"] if kw["config"] is not None else EvalConfig()
        self.recipe = kw["recipe"] if kw["recipe"] is not None else evaluation_recipe(self.config.device)
        self.runtime = kw["runtime"] if kw["runtime"] is not None else RuntimeConfig()
        self.lm_eval_limit, self.lm_eval_batch = kw["lm_eval_limit"], kw["lm_eval_batch_size"]
        self.match, self.order = kw["match_tokens"], kw["order_control"]
        self.decontaminate = kw["decontaminate"]
        self.baseline, self.progress, self.overwrite = kw["baseline"], kw["progress"], kw["overwrite"]
        self.data_digests: dict[str, dict[str, dict[str, str]]] = {}  # task -> label -> seed -> training data
        self.t_start = time.perf_counter()
        self.git, self.machine = git_sha(), machine()  # recorded in every compare.json rewrite
        self.precision = precision(self.recipe, self.config, self.runtime)
        # the warmup keeps its Table 7 recipe but trains at the fine-tunes' dtype and device (--train-dtype)
        default = PipelineConfig()
        self.warmup_pipeline = replace(default, recipe=replace(default.recipe, dtype=self.recipe.dtype,
                                                               device=self.recipe.device))

    # -- inputs --------------------------------------------------------------------------------
    def _pool(self) -> None:
        from transformers import AutoTokenizer

        self.out.mkdir(parents=True, exist_ok=True)
        self.pool_identity = file_identity(self.pool)
        self.records = list(read_records(self.pool))
        tok = AutoTokenizer.from_pretrained(resolve_model_path(self.model), local_files_only=True)
        renderer = Renderer(tok, RenderConfig(max_length=1 << 30))
        self.tokens = np.array([len(renderer(r)) for r in self.records], dtype=np.int64)
        self.pool_profile = coreset_profile(self.records, self.tokens)
        self.task_ids = {t.name: file_identity(t.path) for t in self.tasks}
        self.flagged = {t.name: contaminated(self.records, [t], DecontaminationConfig()) for t in self.tasks}

    def _selections(self) -> dict[str, dict[str, list[Path]]]:
        """``{task: {method: [selection folder per seed]}}`` (one folder for deterministic methods)."""
        dirs: dict[str, dict[str, list[Path]]] = {t.name: {} for t in self.tasks}
        warm = None
        if WARMUP_METHODS & set(self.methods):
            warm = shared_warmup(self.pool, self.out / "warmup", self.selection_model, pipeline=self.warmup_pipeline,
                                 progress=self.progress, overwrite=self.overwrite)
        for method in self.methods:
            if method in self.external:
                for task in self.tasks:
                    dirs[task.name][method] = [external_selection(self.external[method], task.name,
                                                                  len(self.tasks))]
                continue
            if method in TRIM_METHODS:
                spec = self.selection_model if method == "trim" else str(warm / "final")  # type: ignore[operator]
                found = trim_selections(self.tasks, self.pool, self.budget, self.out / "select" / method,
                                        model=spec, runtime=self.runtime, progress=self.progress,
                                        overwrite=self.overwrite)
                for name, d in found.items():
                    dirs[name][method] = [d]
                continue
            variant = trim_variant(method)
            if variant is not None:  # a TRIM extension: every task in one pool pass, on the base model
                found = trim_selections(self.tasks, self.pool, self.budget, self.out / "select" / method,
                                        model=self.selection_model, runtime=self.runtime, progress=self.progress,
                                        overwrite=self.overwrite, fingerprint=variant[0], scoring=variant[1])
                for name, d in found.items():
                    dirs[name][method] = [d]
                continue
            spec = str(warm) if method == "less" else self.selection_model
            for task in self.tasks:
                seeds = self.seeds if method in STOCHASTIC_METHODS else [0]
                dirs[task.name][method] = []
                for s in seeds:
                    d = self.out / "select" / task.name / (f"{method}-seed-{s}" if method in STOCHASTIC_METHODS
                                                           else method)
                    run_selection(method, task, self.pool, self.budget, d, seed=s, selection_model=spec,
                                  runtime=self.runtime, progress=self.progress, overwrite=self.overwrite)
                    dirs[task.name][method].append(d)
        return dirs

    def _units(self, dirs: dict[str, dict[str, list[Path]]]) -> dict[str, dict[str, dict[int, Any]]]:
        """``{task: {label: {seed: TrainingRows}}}`` after the controls (random: its seed's selection)."""
        n = len(self.records)
        units: dict[str, dict[str, dict[int, Any]]] = {}
        for task in self.tasks:
            exclude = [int(f["index"]) for f in self.flagged[task.name]] if self.decontaminate else []
            ranked = {m: [ranking_of(d, n) for d in folders] for m, folders in dirs[task.name].items()}

            def rows_for(method: str, k: int, match: int | None = None, ranked: Any = ranked,
                         exclude: list[int] = exclude) -> Any:
                found = ranked[method][min(k, len(ranked[method]) - 1)]
                return training_rows(*found, self.budget, n, self.tokens, exclude=exclude, match_tokens=match)

            by_label = {m: {s: rows_for(m, k) for k, s in enumerate(self.seeds)} for m in ranked}
            if self.match is not None:
                for m in [m for m in self.methods if m != self.match]:
                    by_label[matched_label(m, self.match)] = {
                        s: rows_for(m, k, by_label[self.match][s].info["tokens"]) for k, s in enumerate(self.seeds)}
            if self.order is not None:  # the A/A control: the same rows, another order per seed
                by_label[shuffled_label(self.order)] = {
                    s: TrainingRows(shuffled_order(t.positions, s), {**t.info, "order": "shuffled per seed"})
                    for s, t in by_label[self.order].items()}
            units[task.name] = by_label
        return units

    # -- evaluation ----------------------------------------------------------------------------
    def _lm_eval(self, task: Task, adapter: str | None, path: Path, key: str) -> dict[str, float] | None:
        """lm-eval's per-row correctness on the first ``lm_eval_limit`` NLL rows (cached by key)."""
        if not self.lm_eval_limit:
            return None
        if path.exists() and json.loads(path.read_text()).get("key") == key:
            return json.loads(path.read_text())["rows"]
        from ..evaluation.lm_eval_tasks import run_lm_eval
        from ..models import load_model

        rows = task.subset(self.config.limit, self.config.limit_seed)[: self.lm_eval_limit]
        folder = subset_task_folder(task, rows, self.out / "lm-eval-tasks" / task.name)
        lm = load_finetuned(adapter, self.config) if adapter else load_model(self.model, device=self.config.device,
                                                                              dtype=self.config.dtype)
        res = run_lm_eval(lm.model, lm.tokenizer, folder, shots=self.config.shots_for(task),
                          max_gen_toks=self.config.max_new_tokens, batch_size=self.lm_eval_batch)
        per_row = lm_eval_correct(res)
        write_json(path, {"key": key, "results": res["results"], "rows": per_row})
        return per_row

    def _lm_key(self, result_key: str) -> str:
        return config_hash(self.config, {"lm_eval_limit": self.lm_eval_limit, "lm_eval_batch": self.lm_eval_batch,
                                         "result": result_key})

    def _evaluate(self, task: Task, label: str, seed: int, rows: Any) -> list[dict[str, Any]]:
        records = rows.records(self.records)
        res = train_and_evaluate(records, [task], self.out / "eval" / label, seed, model=self.model,
                                 recipe=self.recipe, config=self.config, train_root=self.out / "train",
                                 progress=self.progress)[task.name]
        base = self.out / "eval" / label / task.name
        lm = self._lm_eval(task, res["train"]["adapter"], base / f"lm-eval-seed-{seed}.json",
                           key=self._lm_key(res["key"]))
        preds = _read_jsonl(base / "predictions" / f"seed-{seed}.jsonl")
        self.data_digests.setdefault(task.name, {}).setdefault(label, {})[str(seed)] = res["data_digest"]
        return model_rows(task.kind, preds, method=label, seed=seed, lm_eval=lm)

    def _base_rows(self) -> dict[str, list[dict[str, Any]]]:
        if not self.baseline:
            return {t.name: [] for t in self.tasks}
        res = evaluate_reference(self.model, self.tasks, self.out / "eval" / BASE, self.config, progress=self.progress)
        out = {}
        for task in self.tasks:
            base = self.out / "eval" / BASE / task.name
            lm = self._lm_eval(task, None, base / "lm-eval-base.json",
                               key=self._lm_key(res[task.name]["key"]))
            preds = _read_jsonl(base / "predictions" / "base.jsonl")
            out[task.name] = model_rows(task.kind, preds, method=BASE, seed="-", lm_eval=lm)
        return out

    # -- the run -------------------------------------------------------------------------------
    def execute(self) -> dict[str, Any]:
        self._pool()
        dirs = self._selections()
        units = self._units(dirs)
        profiles = self._profiles(dirs, units)
        rows = self._base_rows()
        done: dict[str, dict[str, list[int]]] = {t.name: {lb: [] for lb in units[t.name]} for t in self.tasks}
        self._summary(profiles, rows, done, complete=False)
        for s in self.seeds:  # seed-major: a partial run has every method at the first seeds
            for task in self.tasks:
                for label, by_seed in units[task.name].items():
                    rows[task.name] += self._evaluate(task, label, s, by_seed[s])
                    done[task.name][label].append(s)
                    self._summary(profiles, rows, done, complete=False)
        return self._summary(profiles, rows, done, complete=True)

    def _summary(self, profiles: dict[str, dict[str, dict[str, Any]]], rows: dict[str, list[dict[str, Any]]],
                 done: dict[str, dict[str, list[int]]], *, complete: bool) -> dict[str, Any]:
        summary: dict[str, Any] = {
            "command": "compare", "argv": sys.argv, "git": self.git, "machine": self.machine,
            "pool": self.pool_identity, "budget": self.budget, "model": self.model,
            "selection_model": self.selection_model, "methods": self.methods,
            "labels": list(next(iter(profiles.values()))) if profiles else [], "seeds": self.seeds,
            "recipe": to_dict(replace(self.recipe, seed=0)), "eval_config": to_dict(self.config),
            "lm_eval_limit": self.lm_eval_limit, "precision": self.precision,
            "controls": {"fill_to_budget": True, "decontaminate": self.decontaminate, "match_tokens": self.match,
                         "order_control": self.order},
            "pool_profile": self.pool_profile, "complete": complete, "tasks": {},
            "wall_seconds_this_run": round(time.perf_counter() - self.t_start, 3)}
        for task in self.tasks:
            write_rows(self.out / "rows" / f"{task.name}.jsonl.gz", rows[task.name])
            summary["tasks"][task.name] = self._task_entry(task, profiles[task.name], rows[task.name], done[task.name])
        write_json(self.out / "compare.json", summary)
        with atomic_path(self.out / "compare.md") as tmp:
            tmp.write_text(compare_markdown(summary))
        return summary

    def _profiles(self, dirs: dict[str, dict[str, list[Path]]], units: dict[str, dict[str, dict[int, Any]]]
                  ) -> dict[str, dict[str, dict[str, Any]]]:
        """Per task and label, what does not change while the run goes on: the training rows (first
        seed), the selection cost from each run.json and the coreset's profile (computed once)."""
        out: dict[str, dict[str, dict[str, Any]]] = {}
        for name, by_label in units.items():
            out[name] = {}
            for label, by_seed in by_label.items():
                first = by_seed[self.seeds[0]]
                method = method_of(label)  # a matched-token label reads its method's selection
                folders = dirs[name][method]
                reports = [json.loads((d / "run.json").read_text()) for d in folders  # external: optional
                           if method not in self.external or (d / "run.json").exists()]
                cost = {k: float(np.mean([selection_cost(r)[k] or 0 for r in reports])) if reports else None
                        for k in ("seconds", "forward_passes", "backward_passes", "tokens")}
                out[name][label] = {"train": first.info, "cost": cost, "selections": [str(d) for d in folders],
                                    **({"scores": file_identity(folders[0] / "scores.parquet")}
                                       if method in self.external else {}),
                                    "profile": coreset_profile(first.records(self.records),
                                                               self.tokens[first.positions])}
        return out

    def _task_entry(self, task: Task, profiles: dict[str, dict[str, Any]], rows: list[dict[str, Any]],
                    done: dict[str, list[int]]) -> dict[str, Any]:
        n_nll = len(task.subset(self.config.limit, self.config.limit_seed))
        digests = self.data_digests.get(task.name, {})
        methods = {label: {"seeds_done": done[label], "data_digests": digests.get(label, {}), **p}
                   for label, p in profiles.items()}
        return {"path": task.path, "identity": self.task_ids[task.name], "kind": task.kind, "n_nll": n_nll,
                "n_test": len(task.test),
                "n_lm_eval": min(self.lm_eval_limit, n_nll), "shots": self.config.shots_for(task),
                "limit_seed": self.config.limit_seed, "decontamination": {"flagged": self.flagged[task.name]},
                "methods": methods, "means": method_means(rows), "paired": paired(rows)}

def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]
