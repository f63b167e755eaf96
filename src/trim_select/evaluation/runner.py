"""``trim-select evaluate``: fine-tune the base model on a coreset (one recipe, several seeds) and
score every seed and the untuned base model on one or more task folders.

Output folder (every file written atomically; a rerun skips what is done)::

    OUT/train/<data>-seed-<s>/      train_lora folder (LoRA checkpoints, final/ adapter, train.json)
    OUT/<task>/base.json            reference rows: the untuned base model (and --baseline-model ones)
    OUT/<task>/seed-<s>.json        one fine-tuned seed: metrics, training summary, timings
    OUT/<task>/predictions/*.jsonl  per-row predictions of each of those
    OUT/evaluation.json             everything above, with mean and std over seeds
    OUT/evaluation.md               the same as Markdown tables

A result file carries a key (data, recipe, model, task, evaluation settings); a rerun with the same
key reuses it, a different key recomputes it. Training itself is :func:`trim_select.training.fine_tune`
(also resumable).
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from ..config import config_hash, to_dict
from ..data import Record, read_records
from ..io import atomic_path, write_json
from ..models import (
    LoadedModel,
    adapter_base_spec,
    cpu_supports_bf16,
    load_model,
    resolve_device,
    resolve_model_path,
    weights_sha256,
)
from .harness import METRICS, PRIMARY_METRIC, EvalConfig, evaluate_model
from .tasks import Task, load_task

CPU_RECIPE: dict[str, Any] = {"lr": 1e-4, "epochs": 2, "batch_size": 8, "lora_r": 16, "lora_alpha": 64,
                              "lora_dropout": 0.1, "warmup_ratio": 0.03, "schedule": "linear"}


def evaluation_recipe(device: str = "auto", **overrides: Any) -> Any:
    """The fine-tuning recipe of the evaluation: one for every method, CPU-sized by default.

    2 epochs, AdamW lr 1e-4 with linear decay after 3% warmup, effective batch 8, LoRA r=16,
    alpha=64 (alpha/r = 4 as in Table 7), dropout 0.1 on q,k,v,o, loss on response tokens; bf16
    autocast where the CPU or GPU supports it. The paper's Table 7 recipe (4 epochs, lr 2e-5,
    batch 64, r=128) is a GPU recipe: pass its values as ``overrides``.
    """
    from ..training.recipe import LoraRecipe

    fields = dict(CPU_RECIPE)
    dev = resolve_device(device)
    fields["dtype"] = "bf16" if dev.type == "cpu" and cpu_supports_bf16() else "auto"
    fields["device"] = device
    fields.update({k: v for k, v in overrides.items() if v is not None})
    return LoraRecipe(**fields)


def resolve_train_file(train: str | Path) -> Path:
    """A coreset file: the path itself, or ``DIR/coreset.jsonl`` for a selection output folder."""
    p = Path(train)
    if p.is_dir():
        p = p / "coreset.jsonl"
    if not p.exists():
        raise FileNotFoundError(f"training data {p} not found (give a jsonl file or a folder with "
                                "coreset.jsonl)")
    return p


def load_train_records(train: str | Path) -> tuple[Path, list[Record]]:
    """The coreset's records (any format ``trim_select.data`` reads)."""
    path = resolve_train_file(train)
    records = list(read_records(path))
    if not records:
        raise ValueError(f"{path} holds no records to fine-tune on")
    return path, records


def data_digest(records: Sequence[Record]) -> str:
    """Content hash of the training rows (order included): the identity of a coreset."""
    h = hashlib.sha256()
    for r in records:
        h.update(hashlib.sha256(r.raw).digest())
    return h.hexdigest()[:16]


def mean_std(values: Sequence[float]) -> dict[str, float | None]:
    """Mean and sample standard deviation (ddof=1; ``None`` for a single value)."""
    arr = np.asarray([v for v in values if v is not None and not math.isnan(v)], dtype=np.float64)
    if arr.size == 0:
        return {"mean": None, "std": None, "n": 0}
    return {"mean": float(arr.mean()), "std": float(arr.std(ddof=1)) if arr.size > 1 else None,
            "n": int(arr.size)}


def write_jsonl(path: str | Path, rows: Sequence[dict[str, Any]]) -> None:
    """Atomic JSON Lines file."""
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")


def _read_if_key(path: Path, key: str) -> dict[str, Any] | None:
    if not path.exists():
        return None
    try:
        d = json.loads(path.read_text())
    except json.JSONDecodeError:
        return None
    return d if d.get("key") == key else None


def _say(progress: bool, text: str) -> None:
    if progress:
        from tqdm.auto import tqdm

        tqdm.write(text)


def load_finetuned(adapter: str | Path, config: EvalConfig) -> LoadedModel:
    """A LoRA adapter folder (``train_lora``'s ``final/``) on its base model, ready to evaluate.

    By default the adapter stays unmerged (peft keeps its weights in float32): base weights are the
    exact ones the untuned reference row used, so base-vs-tuned differences are not blurred by
    rounding ``W + BA`` into bf16. ``config.merge_adapter`` merges (``load_model``; a little faster).
    """
    if config.merge_adapter:
        return load_model(str(adapter), device=config.device, dtype=config.dtype)
    from peft import PeftModel

    base = load_model(adapter_base_spec(adapter), device=config.device, dtype=config.dtype)
    peft_model = PeftModel.from_pretrained(base.model, str(adapter))
    net = peft_model.base_model.model  # the causal LM with LoRA layers injected in place
    net.eval()
    net.requires_grad_(False)
    sha = hashlib.sha256((base.sha256 + weights_sha256(adapter)).encode()).hexdigest()
    return LoadedModel(model=net, tokenizer=base.tokenizer, name=str(adapter), path=str(adapter), sha256=sha)


def _model_id(spec: str) -> str:
    return str(resolve_model_path(spec).resolve())


def evaluate_reference(model: str, tasks: Sequence[Task], out_dir: str | Path, config: EvalConfig, *,
                       label: str = "base", progress: bool = True) -> dict[str, dict[str, Any]]:
    """Score an untrained model (the base model, or any ``--baseline-model``) on each task.

    Returns ``{task name: result}``; results are cached in ``OUT/<task>/<label>.json``.
    """
    out = Path(out_dir)
    results: dict[str, dict[str, Any]] = {}
    lm = None
    for task in tasks:
        key = config_hash(config, {"model": _model_id(model), "task": task.path, "n_test": len(task.test)})
        path = out / task.name / f"{label}.json"
        cached = _read_if_key(path, key)
        if cached is None:
            if lm is None:
                t0 = time.perf_counter()
                lm = load_model(model, device=config.device, dtype=config.dtype)
                load_s = time.perf_counter() - t0
            _say(progress, f"[{task.name}] evaluating {label} ({model})")
            res, preds = evaluate_model(lm, task, config, progress=progress)
            res.update({"key": key, "label": label, "model": model, "trained": False,
                        "load_seconds": round(load_s, 3)})
            write_jsonl(out / task.name / "predictions" / f"{label}.jsonl", preds)
            write_json(path, res)
            cached = res
        results[task.name] = cached
    return results


def train_and_evaluate(
    records: Sequence[Record],
    tasks: Sequence[Task],
    out_dir: str | Path,
    seed: int,
    *,
    model: str = "default",
    recipe: Any = None,
    config: EvalConfig | None = None,
    train_root: str | Path | None = None,
    progress: bool = True,
) -> dict[str, dict[str, Any]]:
    """One seed: LoRA-fine-tune ``model`` on ``records`` (``train_lora``), then score each task.

    ``train_root`` (default ``OUT/train``) holds the training folders, named by the data's content
    hash and the seed, so the same coreset is trained once whatever asks for it. Returns
    ``{task name: result}`` (cached in ``OUT/<task>/seed-<seed>.json``).
    """
    from ..training import fine_tune

    out = Path(out_dir)
    config = config if config is not None else EvalConfig()
    recipe = replace(recipe if recipe is not None else evaluation_recipe(config.device), seed=seed)
    digest = data_digest(records)
    keys = {t.name: config_hash(config, recipe.key_fields(), {"model": _model_id(model), "data": digest,
                                                              "task": t.path, "n_test": len(t.test)})
            for t in tasks}
    results = {t.name: _read_if_key(out / t.name / f"seed-{seed}.json", keys[t.name]) for t in tasks}
    todo = [t for t in tasks if results[t.name] is None]
    if not todo:
        return results  # type: ignore[return-value]
    train_dir = Path(train_root) if train_root is not None else out / "train"
    train_dir = train_dir / f"{digest}-seed-{seed}"
    _say(progress, f"fine-tuning {model} on {len(records)} rows (seed {seed}) -> {train_dir}")
    t0 = time.perf_counter()
    trained = fine_tune(model, records, train_dir, recipe, progress=progress)
    train_wall = time.perf_counter() - t0
    summary = {"dir": str(train_dir), "adapter": str(trained.final), "cached": trained.cached,
               "n_examples": trained.n_examples, "steps": len(trained.history), "tokens": trained.tokens,
               "label_tokens": trained.label_tokens, "seconds": round(trained.seconds, 3),
               "tokens_per_s": round(trained.tokens_per_s, 2), "wall_seconds": round(train_wall, 3),
               "first_loss": trained.losses[0] if trained.losses else None,
               "last_loss": trained.losses[-1] if trained.losses else None}
    t0 = time.perf_counter()
    lm = load_finetuned(trained.final, config)
    load_s = time.perf_counter() - t0
    for task in todo:
        _say(progress, f"[{task.name}] evaluating seed {seed}")
        res, preds = evaluate_model(lm, task, config, progress=progress)
        res.update({"key": keys[task.name], "label": f"seed-{seed}", "model": model, "trained": True,
                    "seed": seed, "train": summary, "recipe": to_dict(recipe), "data_digest": digest,
                    "load_seconds": round(load_s, 3)})
        write_jsonl(out / task.name / "predictions" / f"seed-{seed}.jsonl", preds)
        write_json(out / task.name / f"seed-{seed}.json", res)
        results[task.name] = res
    return results  # type: ignore[return-value]


def aggregate(kind: str, runs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Per-seed metric values and their mean and std (``METRICS[kind]``)."""
    out: dict[str, Any] = {}
    for m in METRICS[kind]:
        vals = [r["metrics"].get(m) for r in runs]
        out[m] = {"values": vals, **mean_std(vals)}
    return out


def fmt_metric(stat: dict[str, Any] | float | None, metric: str) -> str:
    """``0.412 ± 0.013`` (accuracies as percentages, losses with three decimals)."""
    if isinstance(stat, dict):
        mean, std = stat.get("mean"), stat.get("std")
    else:
        mean, std = stat, None
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return "–"
    scale, digits = (1.0, 3) if "loss" in metric else (100.0, 1)
    text = f"{mean * scale:.{digits}f}"
    return text + (f" ± {std * scale:.{digits}f}" if std is not None else "")


def decoding_note(task_entry: dict[str, Any]) -> str:
    """How a math task was scored, for the table captions."""
    if task_entry.get("generate", True):
        return f", greedy decoding up to {task_entry['max_new_tokens']} new tokens"
    return ", answer loss only (no decoding)"


RECIPE_SHOWN = ("epochs", "lr", "batch_size", "lora_r", "lora_alpha", "lora_dropout", "dtype", "max_length")
METRIC_LABELS = {"acc": "acc %", "acc_norm": "acc_norm %", "exact_match": "EM %", "answer_loss": "answer NLL"}


def evaluation_markdown(summary: dict[str, Any]) -> str:
    """Markdown tables (one per task) of an ``evaluation.json`` summary."""
    lines = ["# Evaluation", ""]
    tr = summary.get("train")
    if tr:
        lines.append(f"Fine-tuned on `{tr['file']}` ({tr['rows']} rows), seeds {tr['seeds']}; recipe: "
                     + ", ".join(f"{k}={v}" for k, v in tr["recipe"].items()
                                 if k in RECIPE_SHOWN) + ".")
    lines.append(f"Base model: `{summary['model']}`. Mean ± sample std over seeds.")
    for name, t in summary["tasks"].items():
        kind = t["kind"]
        metrics = METRICS[kind]
        lines += ["", f"## {name} ({'multiple choice' if kind == 'mc' else 'math'})", "",
                  f"{t['n']} of {t['n_test']} test rows"
                  + (f" (seeded subset, seed {t['limit_seed']})" if t.get("limit_seed") is not None else "")
                  + f", {t['shots']}-shot from dev.jsonl"
                  + (decoding_note(t) if kind == "math" else "")
                  + ".", ""]
        labels = " | ".join(METRIC_LABELS.get(m, m) for m in metrics)
        lines.append(f"| model | seeds | {labels} | train s | eval s |")
        lines.append("|---|---|" + "---|" * len(metrics) + "---|---|")
        for ref in t["references"]:
            cells = [fmt_metric(ref["metrics"].get(m), m) for m in metrics]
            lines.append(f"| {ref['label']} (`{ref['model']}`, no fine-tuning) | – | " + " | ".join(cells)
                         + f" | – | {ref['seconds']:.0f} |")
        if t.get("finetuned"):
            ft = t["finetuned"]
            cells = [fmt_metric(ft["metrics"][m], m) for m in metrics]
            lines.append(f"| fine-tuned | {len(ft['seeds'])} | " + " | ".join(cells)
                         + f" | {ft['train_seconds_mean']:.0f} | {ft['eval_seconds_mean']:.0f} |")
    return "\n".join(lines) + "\n"


def _task_entry(task: Task, refs: list[dict[str, Any]], runs: list[dict[str, Any]], config: EvalConfig
                ) -> dict[str, Any]:
    """One task of ``evaluation.json``: its rows, the reference rows and the fine-tuned seeds."""
    first = (refs + runs)[0] if refs or runs else None
    entry: dict[str, Any] = {
        "path": task.path, "kind": task.kind, "primary_metric": PRIMARY_METRIC[task.kind],
        "n": first["n"] if first else None, "n_test": len(task.test),
        "limit_seed": first.get("limit_seed") if first else None,
        "shots": config.shots_for(task), "max_new_tokens": config.max_new_tokens,
        "generate": config.generate,
        "references": [{k: r[k] for k in ("label", "model", "metrics", "seconds")} for r in refs],
    }
    if runs:
        entry["finetuned"] = {
            "seeds": [r["seed"] for r in runs],
            "metrics": aggregate(task.kind, runs),
            "per_seed": [{"seed": r["seed"], "metrics": r["metrics"], "train": r["train"],
                          "eval_seconds": r["seconds"]} for r in runs],
            "train_seconds_mean": float(np.mean([r["train"]["seconds"] for r in runs])),
            "eval_seconds_mean": float(np.mean([r["seconds"] for r in runs])),
        }
    return entry


def evaluate(
    tasks: Sequence[str | Path],
    out_dir: str | Path,
    *,
    train: str | Path | None = None,
    model: str = "default",
    seeds: int | Sequence[int] = 3,
    baseline: bool = True,
    baseline_models: Sequence[str] = (),
    recipe: Any = None,
    config: EvalConfig | None = None,
    train_root: str | Path | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """The ``evaluate`` command: references + fine-tuned seeds on each task -> JSON and Markdown.

    ``seeds``: a count (``3`` -> seeds 0, 1, 2; ``0`` -> references only) or explicit seeds.
    """
    t_start = time.perf_counter()
    config = config if config is not None else EvalConfig()
    seed_list = list(range(seeds)) if isinstance(seeds, int) else list(seeds)
    if not seed_list and not baseline and not baseline_models:
        raise ValueError("nothing to evaluate: no seeds, no base model row and no --baseline-model")
    loaded = [load_task(t) for t in tasks]
    if len({t.name for t in loaded}) != len(loaded):
        raise ValueError("two task folders share a name; their results would collide")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    refs: dict[str, list[dict[str, Any]]] = {t.name: [] for t in loaded}
    if baseline:
        for name, res in evaluate_reference(model, loaded, out, config, progress=progress).items():
            refs[name].append(res)
    for k, spec in enumerate(baseline_models):
        for name, res in evaluate_reference(spec, loaded, out, config, label=f"reference-{k + 1}",
                                            progress=progress).items():
            refs[name].append(res)
    runs: dict[str, list[dict[str, Any]]] = {t.name: [] for t in loaded}
    train_info = None
    if seed_list:
        if train is None:
            raise ValueError("--train is required unless --seeds 0 (reference rows only)")
        recipe = recipe if recipe is not None else evaluation_recipe(config.device)
        path, records = load_train_records(train)
        train_info = {"file": str(path), "rows": len(records), "digest": data_digest(records),
                      "seeds": seed_list, "recipe": to_dict(recipe)}
        for s in seed_list:
            for name, res in train_and_evaluate(records, loaded, out, s, model=model, recipe=recipe,
                                                config=config, train_root=train_root,
                                                progress=progress).items():
                runs[name].append(res)
    summary: dict[str, Any] = {"command": "evaluate", "model": model, "eval_config": to_dict(config),
                               "train": train_info,
                               "tasks": {t.name: _task_entry(t, refs[t.name], runs[t.name], config) for t in loaded}}
    summary["wall_seconds_this_run"] = round(time.perf_counter() - t_start, 3)
    write_json(out / "evaluation.json", summary)
    md = evaluation_markdown(summary)
    with atomic_path(out / "evaluation.md") as tmp:
        tmp.write_text(md)
    summary["markdown"] = md
    return summary
