"""Evaluation through lm-eval (0.4.x): a task folder becomes a local lm-eval task, driven from Python.

A folder in the benchmark layout (``test.jsonl``, ``dev.jsonl``; rows as in :mod:`.tasks`) is
written as one lm-eval task YAML (:func:`task_config`, :func:`write_task`):

- ``dataset_path: json`` with ``data_files: {train: test.jsonl, dev: dev.jsonl}``, evaluated on
  ``test_split: train``; few-shot exemplars from ``dev`` in file order (``sampler: first_n``),
  shown as multi-turn chat (``apply_chat_template=True, fewshot_as_multiturn=True``).
- multiple choice: ``output_type: multiple_choice``, the user turn exactly as
  :func:`.tasks.question_text` builds it (question, blank line, ``Options:``, ``- choice`` lines),
  ``doc_to_choice: choices``, ``doc_to_target: answer_index``; accuracy = argmax of the summed
  log-likelihood of each choice's tokens after the rendered generation prompt.
- math: ``generate_until`` (greedy) stopped at the chat template's end-of-turn (the tokenizer's
  ``eos_token``, ``<|im_end|>`` for ChatML), the exemplar answers are the worked solutions
  (``fewshot_config.doc_to_target: solution``), a regex filter extracts ``#### N``, metric
  ``exact_match`` against ``answer`` (commas ignored).

:func:`run_lm_eval` runs one such folder, any lm-eval task name, or every task of an include
directory on an in-memory model (``HFLM(pretrained=model, tokenizer=tok)``) and returns the
metrics and the per-row results.

Offline notes (lm-eval 0.4.13): ``dataset_path: json`` with local ``data_files`` loads through
``datasets``' packaged json builder and needs no hub access when ``HF_DATASETS_OFFLINE=1`` and
``HF_HUB_OFFLINE=1`` are set before lm-eval is imported (done here with ``setdefault``). The
``data_files`` paths are written absolute, so the YAML works from any working directory. Two
details of lm-eval's chat path matter for matching :mod:`.tasks`' prompts: with a chat template
``construct_requests`` drops the ``target_delimiter`` in front of each choice (the choice is
scored right after ``<|im_start|>assistant\\n``), and ``Message.to_dict`` drops the
target/few-shot delimiters from the turns; we still set both delimiters to ``""`` so the plain
(non-chat) rendering has no stray spaces either. lm-eval's ``HFLM._encode_pair`` moves the
context's trailing whitespace into the continuation, so each choice is scored as
``log p("\\n" + choice | ...<|im_start|>assistant)``: our ``log p(choice | prompt)`` plus one
constant per row (argmax and ``acc`` unchanged; length-normalised ``acc_norm`` would shift, hence
only ``acc`` here). ``tests/test_lm_eval_tasks.py`` checks both against a direct computation.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..io import atomic_path
from .tasks import DEFAULT_SHOTS, Kind, Task, TaskRow, load_task

MC_TEXT = ("{{ question }}\n\nOptions:\n"
           "{% for c in choices %}- {{ c }}{% if not loop.last %}\n{% endif %}{% endfor %}")
ANSWER_REGEX = r"#### (\-?[0-9\.\,]+)"
DEFAULT_MAX_GEN_TOKS = 256


def task_name_for(folder: str | Path) -> str:
    """The lm-eval task name of a task folder: ``trim_<folder name>`` with non-word chars as ``_``."""
    return "trim_" + re.sub(r"\W", "_", Path(folder).resolve().name)


def task_config(folder: str | Path, *, end_of_turn: str = "<|im_end|>",
                max_gen_toks: int = DEFAULT_MAX_GEN_TOKS, name: str | None = None) -> dict[str, Any]:
    """The lm-eval task config (a YAML-able dict) of a task folder; rows are validated first."""
    task = load_task(folder)  # errors name the file, line and field
    root = Path(task.path)
    files = {"train": str(root / "test.jsonl")}
    if task.dev:
        files["dev"] = str(root / "dev.jsonl")
    cfg: dict[str, Any] = {
        "task": name or task_name_for(root),
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": files},
        "test_split": "train",
        "target_delimiter": "",
        "fewshot_delimiter": "",
        "metadata": {"version": 1.0, "kind": task.kind},
    }
    if task.dev:
        cfg["fewshot_split"] = "dev"
        cfg["fewshot_config"] = {"sampler": "first_n"}
    if task.kind == "mc":
        cfg.update({
            "output_type": "multiple_choice",
            "doc_to_text": MC_TEXT,
            "doc_to_choice": "choices",
            "doc_to_target": "answer_index",
            "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}],
        })
        return cfg
    if task.dev:
        cfg["fewshot_config"]["doc_to_target"] = "{{ solution }}"
    cfg.update({
        "output_type": "generate_until",
        "doc_to_text": "{{ question }}",
        "doc_to_target": "{{ answer }}",
        "generation_kwargs": {"until": [end_of_turn], "do_sample": False, "max_gen_toks": max_gen_toks},
        "filter_list": [{"name": "strict-match", "filter": [
            {"function": "regex", "regex_pattern": ANSWER_REGEX},
            {"function": "take_first"},
        ]}],
        "metric_list": [{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True,
                         "ignore_case": True, "regexes_to_ignore": [","]}],
    })
    return cfg


def write_task(folder: str | Path, out_dir: str | Path, **kwargs: Any) -> tuple[str, Path, Kind]:
    """Write ``<out_dir>/<task name>.yaml`` for a task folder; returns (name, yaml path, kind)."""
    import yaml

    cfg = task_config(folder, **kwargs)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{cfg['task']}.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False, allow_unicode=True), encoding="utf-8")
    return cfg["task"], path, cfg["metadata"]["kind"]


def is_task_folder(path: str | Path) -> bool:
    """A directory holding ``test.jsonl`` (the benchmark layout)."""
    return Path(path).is_dir() and (Path(path) / "test.jsonl").exists()


def include_task_names(include: str | Path) -> list[str]:
    """The ``task:`` names declared by the YAML files of an lm-eval include directory."""
    names: list[str] = []
    for yml in sorted(Path(include).rglob("*.yaml")):
        match = re.search(r"^task:\s*['\"]?([^\s'\"]+)", yml.read_text(encoding="utf-8"), re.M)
        if match:
            names.append(match.group(1))
    if not names:
        raise FileNotFoundError(f"{include}: no lm-eval task YAML (with a 'task:' key) found")
    return names


def sample_row(sample: dict[str, Any]) -> dict[str, Any]:
    """One per-row result: doc id, row id, target, rendered prompt, response(s), chosen index (mc), metrics."""
    resps = sample.get("filtered_resps", [])
    row: dict[str, Any] = {"doc_id": sample["doc_id"], "id": sample.get("doc", {}).get("id"),
                           "target": sample.get("target"),
                           "prompt": (sample.get("arguments") or [[None]])[0][0]}
    if resps and isinstance(resps[0], (tuple, list)):  # multiple choice: (loglik, is_greedy) per choice
        lls = [float(r[0]) for r in resps]
        row["logliks"] = lls
        row["chosen"] = max(range(len(lls)), key=lls.__getitem__)
    else:
        row["response"] = resps[0] if resps else None
        row["raw_response"] = (sample.get("resps") or [[None]])[0][0]
    for key in sample.get("metrics", []):
        row[key] = sample.get(key)
    return row


def _resolve_tasks(task: str | Path, include: str | Path | None, out_dir: str | Path,
                   end_of_turn: str, max_gen_toks: int) -> tuple[list[str], str | None, dict[str, str]]:
    """(task names, include path, kind per local task) for a task folder, include dir or name."""
    if is_task_folder(task):
        name, _, kind = write_task(task, out_dir, end_of_turn=end_of_turn, max_gen_toks=max_gen_toks)
        return [name], str(out_dir), {name: kind}
    if Path(task).is_dir():
        return include_task_names(task), str(task), {}
    return [str(task)], None if include is None else str(include), {}


def run_lm_eval(model: Any, tokenizer: Any, task: str | Path, *, limit: int | float | None = None,
                shots: int | None = None, include: str | Path | None = None, batch_size: int = 1,
                out_dir: str | Path | None = None, max_gen_toks: int = DEFAULT_MAX_GEN_TOKS,
                chat: bool = True, tasks_extra: Sequence[str] = ()) -> dict[str, Any]:
    """Evaluate ``model`` with lm-eval on a task folder, an include directory or a task name.

    ``task``: a folder with ``test.jsonl`` (written as a local task, see :func:`task_config`; its
    few-shot count defaults to :data:`.tasks.DEFAULT_SHOTS` of its kind), a directory of lm-eval
    YAMLs (all its tasks), or an lm-eval task name (with ``include`` for a custom directory).
    ``shots`` overrides the few-shot count, ``limit`` the number of test rows (first rows, as
    lm-eval does). Returns ``{"results": {task: {metric: value}}, "samples": {task: [row]},
    "n_shot": {...}, "include": path}``; a row is :func:`sample_row`.
    """
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    with tempfile.TemporaryDirectory(prefix="trim-lmeval-") as tmp:
        target = Path(out_dir) if out_dir is not None else Path(tmp)
        names, inc, kinds = _resolve_tasks(task, include, target, tokenizer.eos_token or "<|im_end|>",
                                           max_gen_toks)
        names += list(tasks_extra)
        if shots is None and len(set(kinds.values())) == 1 and len(kinds) == len(names):
            shots = DEFAULT_SHOTS[next(iter(kinds.values()))]
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
        out = lm_eval.simple_evaluate(
            model=lm, tasks=names, num_fewshot=shots, limit=limit, log_samples=True,
            apply_chat_template=chat, fewshot_as_multiturn=chat,
            # only local task folders: skip indexing lm-eval's thousands of built-in task YAMLs (minutes
            # on a small CPU, every call)
            task_manager=TaskManager(include_path=inc, include_defaults=not (kinds and len(kinds) == len(names))),
            bootstrap_iters=0,
        )
    results = {t: {k: v for k, v in m.items() if k != "alias"} for t, m in out["results"].items()}
    samples = {t: [sample_row(s) for s in rows] for t, rows in out.get("samples", {}).items()}
    return {"results": results, "samples": samples, "n_shot": out.get("n-shot", {}),
            "include": None if out_dir is None and kinds else inc}


# -- task folders of given rows, and lm-eval's per-row results ---------------------------------------
def task_row_json(row: TaskRow, kind: str) -> dict[str, Any]:
    """A test row back in the benchmark layout."""
    if kind == "mc":
        return {"id": row.id, "question": row.question, "choices": list(row.choices),
                "answer_index": row.answer_index}
    return {"id": row.id, "question": row.question, "answer": row.answer, "solution": row.solution}


def _write_if_changed(path: Path, text: str) -> None:
    if not path.exists() or path.read_text(encoding="utf-8") != text:
        with atomic_path(path) as tmp:
            tmp.write_text(text, encoding="utf-8")


def _rows_text(rows: Sequence[TaskRow], kind: str) -> str:
    return "".join(json.dumps(task_row_json(r, kind), ensure_ascii=False) + "\n" for r in rows)


def rows_task_folder(kind: str, rows: Sequence[TaskRow], exemplars: Sequence[TaskRow], out_dir: str | Path) -> Path:
    """A task folder of exactly ``rows`` (``test.jsonl``) with ``exemplars`` as its ``dev.jsonl``, in order:
    lm-eval's ``first_n`` few-shot sampler then shows the same exemplars as :func:`.tasks.prompt_messages`."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _write_if_changed(out / "test.jsonl", _rows_text(rows, kind))
    if exemplars:
        _write_if_changed(out / "dev.jsonl", _rows_text(exemplars, kind))
    return out


def subset_task_folder(task: Task, rows: Sequence[TaskRow], out_dir: str | Path) -> Path:
    """A task folder holding exactly ``rows`` as its test set (and the task's ``dev.jsonl``), so that
    lm-eval scores the same rows as the answer NLL; rewritten only when its content would change."""
    out = rows_task_folder(task.kind, rows, (), out_dir)  # dev.jsonl: the task's own file, byte for byte
    dev = Path(task.path) / "dev.jsonl"
    if dev.exists() and (not (out / "dev.jsonl").exists()
                         or (out / "dev.jsonl").read_bytes() != dev.read_bytes()):
        shutil.copyfile(dev, out / "dev.jsonl")
    return out


def lm_eval_correct(result: Mapping[str, Any]) -> dict[str, float]:
    """``{row id: 0/1}`` from :func:`run_lm_eval` on one task."""
    (samples,) = result["samples"].values()
    out = {}
    for s in samples:
        value = s.get("acc", s.get("exact_match"))
        if value is None:
            raise ValueError(f"lm-eval row {s.get('doc_id')} has neither acc nor exact_match")
        out[str(s["id"])] = float(value)
    return out


def generate_rows(model: Any, tokenizer: Any, rows: Sequence[TaskRow], exemplars: Sequence[TaskRow], *,
                  max_gen_toks: int, batch_size: int) -> dict[str, dict[str, Any]]:
    """Greedy decoding of math ``rows`` by lm-eval's ``generate_until`` (k-shot ``exemplars``):
    ``{row id: {"pred", "correct", "generation", "generated_tokens"}}``; ``pred`` is the ``#### N``
    the strict-match filter found (``None`` when there is none) and ``correct`` lm-eval's exact match."""
    with tempfile.TemporaryDirectory(prefix="trim-gen-") as tmp:
        folder = rows_task_folder("math", rows, exemplars, Path(tmp) / "rows")
        res = run_lm_eval(model, tokenizer, folder, shots=len(exemplars), max_gen_toks=max_gen_toks,
                          batch_size=batch_size)
    (samples,) = res["samples"].values()
    out = {}
    for s in samples:
        raw = s.get("raw_response") or ""
        pred = s.get("response")
        out[str(s["id"])] = {"pred": None if pred in (None, "[invalid]") else pred,
                             "correct": bool(s["exact_match"]), "generation": raw,
                             "generated_tokens": len(tokenizer(raw, add_special_tokens=False)["input_ids"])}
    return out
