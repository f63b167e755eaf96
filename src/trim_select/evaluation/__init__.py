"""Evaluation harness: does a coreset make a better model?

    from trim_select.evaluation import evaluate
    evaluate(["bench/targets/gsm"], "out/eval", train="out/trim", seeds=3)       # fine-tune + score

Modules: :mod:`.tasks` (task folders, prompts), :mod:`.answers` (final-number exact match),
:mod:`.inference` (chat encoding, continuation log-likelihood, greedy decoding), :mod:`.harness`
(metrics of one model on one task), :mod:`.runner` (fine-tune per seed, aggregate, tables),
:mod:`.lm_eval_tasks` (task folders as lm-eval tasks), :mod:`.stats` (paired bootstrap),
:mod:`.controls` (equal tokens, fill-up), :mod:`.decontamination`. Comparing selection methods
is :mod:`trim_select.comparison`.
"""

from .answers import exact_match, extract_number, numbers_match
from .harness import EvalConfig, evaluate_model
from .runner import evaluate, evaluation_recipe, train_and_evaluate
from .tasks import Task, TaskRow, detect_kind, load_task

__all__ = [
    "EvalConfig",
    "Task",
    "TaskRow",
    "detect_kind",
    "evaluate",
    "evaluate_model",
    "evaluation_recipe",
    "exact_match",
    "extract_number",
    "load_task",
    "numbers_match",
    "train_and_evaluate",
]
