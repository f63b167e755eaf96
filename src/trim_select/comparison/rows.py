"""Per-row results of one fine-tuned model on one task: the input of the paired statistics.

Every (method, seed, test row) gives one record ``{method, seed, id, answer_nll, correct,
lm_eval_correct}``:

- ``answer_nll``: mean per-token negative log-likelihood of the row's gold answer given the k-shot
  prompt (the correct choice's text; the worked solution for math), from
  :func:`trim_select.evaluation.harness.evaluate_model` on the NLL rows;
- ``correct``: multiple choice, the highest summed log-likelihood is the gold choice (the same
  forwards; ``tests/test_lm_eval_tasks.py`` shows it equals lm-eval's ``acc``); math, lm-eval's greedy exact
  match when decoding ran, else ``None``;
- ``lm_eval_correct``: lm-eval's per-row ``acc`` / ``exact_match`` on the first ``lm_eval_limit``
  NLL rows (written as a local task of exactly those rows,
  :func:`trim_select.evaluation.lm_eval_tasks.subset_task_folder`), else ``None``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any


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
