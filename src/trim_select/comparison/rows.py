"""Per-row results of one fine-tuned model on one task: the input of the paired statistics.

Every (method, seed, test row) gives one record ``{method, seed, id, answer_nll, correct,
lm_eval_correct}``:

- ``answer_nll``: mean per-token negative log-likelihood of the row's gold answer given the k-shot
  prompt (the correct choice's text; the worked solution for math), from
  :func:`trim_select.evaluation.harness.evaluate_model` on the NLL rows;
- ``correct``: multiple choice, the highest summed log-likelihood is the gold choice (the same
  forwards; ``tests/test_lm_eval_tasks.py`` shows it equals lm-eval's ``acc``); math, greedy exact
  match when decoding ran, else ``None``;
- ``lm_eval_correct``: lm-eval's per-row ``acc`` / ``exact_match`` on the first ``lm_eval_limit``
  NLL rows (written as a local task of exactly those rows, :func:`subset_task_folder`), else ``None``.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..evaluation.tasks import Task, TaskRow
from ..io import atomic_path


def model_rows(kind: str, predictions: Sequence[Mapping[str, Any]], *, method: str, seed: int | str,
               lm_eval: Mapping[str, float] | None = None) -> list[dict[str, Any]]:
    """The per-row records of one model from the harness's predictions (and lm-eval's per-row results)."""
    out = []
    for p in predictions:
        if kind == "mc":
            gold = int(p["gold"])
            n = int(p["n_tokens"][gold])
            nll = -float(p["logprobs"][gold]) / n if n else None
            correct: float | None = float(p["pred"] == gold)
        else:
            nll = p.get("answer_nll")
            correct = None if p.get("correct") is None else float(bool(p["correct"]))
        rid = str(p["id"])
        out.append({"method": method, "seed": seed, "id": rid, "answer_nll": nll, "correct": correct,
                    "lm_eval_correct": None if lm_eval is None else lm_eval.get(rid)})
    return out


def task_row_json(row: TaskRow, kind: str) -> dict[str, Any]:
    """A test row back in the benchmark layout."""
    if kind == "mc":
        return {"id": row.id, "question": row.question, "choices": list(row.choices),
                "answer_index": row.answer_index}
    return {"id": row.id, "question": row.question, "answer": row.answer, "solution": row.solution}


def subset_task_folder(task: Task, rows: Sequence[TaskRow], out_dir: str | Path) -> Path:
    """A task folder holding exactly ``rows`` as its test set (and the task's ``dev.jsonl``), so that
    lm-eval scores the same rows as the answer NLL; rewritten only when its content would change."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    text = "".join(json.dumps(task_row_json(r, task.kind), ensure_ascii=False) + "\n" for r in rows)
    test = out / "test.jsonl"
    if not test.exists() or test.read_text(encoding="utf-8") != text:
        with atomic_path(test) as tmp:
            tmp.write_text(text, encoding="utf-8")
    dev = Path(task.path) / "dev.jsonl"
    if dev.exists() and (not (out / "dev.jsonl").exists()
                         or (out / "dev.jsonl").read_bytes() != dev.read_bytes()):
        shutil.copyfile(dev, out / "dev.jsonl")
    return out


def lm_eval_correct(result: Mapping[str, Any]) -> dict[str, float]:
    """``{row id: 0/1}`` from :func:`trim_select.evaluation.lm_eval_tasks.run_lm_eval` on one task."""
    (samples,) = result["samples"].values()
    out = {}
    for s in samples:
        value = s.get("acc", s.get("exact_match"))
        if value is None:
            raise ValueError(f"lm-eval row {s.get('doc_id')} has neither acc nor exact_match")
        out[str(s["id"])] = float(value)
    return out
