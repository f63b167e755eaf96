"""Scoring one model on one task: accuracy (multiple choice), exact match (math), answer loss.

- Multiple choice: every choice is scored by ``log p(choice | k-shot prompt)``. ``acc`` takes the
  highest sum; ``acc_norm`` the highest sum divided by the choice's length in characters (the
  lm-evaluation-harness convention, comparable across tokenizers). Ties go to the first choice.
- Math: greedy decoding from the k-shot prompt by lm-eval (``generate_until`` on a local task of
  exactly these rows, :func:`.lm_eval_tasks.generate_rows`); ``exact_match`` is lm-eval's strict
  match of the ``#### N`` marker against the gold answer (commas ignored).
  ``generate=False`` skips decoding (exact match ``None``) when only the answer loss is wanted.
- ``answer_loss`` (both kinds): mean per-token negative log-likelihood of the gold answer given
  the prompt, pooled over all answer tokens of the evaluated rows (the correct choice's text; the
  worked solution for math). Lower is better; it moves even when accuracy does not.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..config import documented
from ..models import LoadedModel
from .inference import (
    ChatEncoder,
    Encoded,
    common_prompt_prefix,
    continuation_logprobs,
    prefix_cached_logprobs,
    shared_prefix_logprobs,
)
from .lm_eval_tasks import generate_rows
from .tasks import DEFAULT_SHOTS, Task, TaskRow, gold_text, prompt_messages

MIN_SHARED_PREFIX = 64  # tokens: below this the k-shot prefix is not worth a cached forward


@dataclass(frozen=True)
class EvalConfig:
    """How a task is scored (not how a model is trained)."""

    shots: int | None = documented(None, "Exemplars from dev.jsonl as chat turns (default: 5 multiple choice, "
                                         "4 math).")
    limit: int | None = documented(None, "Evaluate a seeded random subset of N test rows (the same rows for every "
                                         "model).")
    limit_seed: int = documented(0, "Seed of the --limit subset (the same rows for every model and method).")
    max_new_tokens: int = documented(256, "Math: greedy decoding budget per answer.")
    gen_batch_size: int = documented(16, "Math: prompts per generation batch.")
    batch_tokens: int = documented(8192, "Padded tokens per log-likelihood batch.")
    max_length: int = 2048  # prompt + answer; longer prompts lose their left end (oldest exemplars)
    share_prefix: bool = True  # the k-shot exemplars (else each question's prompt) run once, KV cache reused
    generate: bool = documented(True, "Math: greedy decoding for exact match (--no-generate: answer loss only, "
                                      "~3x cheaper).")
    # fine-tuned models keep the LoRA adapter unmerged: merging into bf16 weights rounds W + BA
    # element by element, noise of the order of the fine-tuning effect on the answer loss
    merge_adapter: bool = documented(False, "Evaluate fine-tuned models with the LoRA merged into the weights "
                                            "(faster; in bf16 the rounding of W + BA blurs small effects) or kept "
                                            "apart (default).")
    device: str = documented("auto", "auto|cpu|cuda|cuda:N (auto: cuda if available, else cpu).")
    dtype: str = documented("auto", "Evaluation dtype: auto (bf16 where supported, as TRIM scoring)|float32|"
                                    "bfloat16.")

    def __post_init__(self) -> None:
        if self.shots is not None and self.shots < 0:
            raise ValueError(f"shots must be >= 0, got {self.shots}")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"limit must be >= 1, got {self.limit}")
        if self.max_new_tokens < 1 or self.gen_batch_size < 1 or self.batch_tokens < 1:
            raise ValueError("max_new_tokens, gen_batch_size and batch_tokens must be positive")

    def shots_for(self, task: Task) -> int:
        """Exemplars used for ``task`` (never more than its dev set holds)."""
        want = DEFAULT_SHOTS[task.kind] if self.shots is None else self.shots
        return min(want, len(task.dev))


def _bar(total: int, desc: str, enabled: bool) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="ex", dynamic_ncols=True, disable=not enabled, leave=False)


def _nll(logprob_sum: np.ndarray, n_tokens: np.ndarray) -> float | None:
    total = int(n_tokens.sum())
    return float(-logprob_sum.sum() / total) if total else None


def evaluate_mc(lm: LoadedModel, rows: tuple[TaskRow, ...], exemplars: tuple[TaskRow, ...],
                config: EvalConfig, *, progress: bool = True) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Accuracy by summed and by length-normalised log-likelihood, and the correct choice's NLL."""
    enc = ChatEncoder(lm.tokenizer, max_length=config.max_length)
    prompts = [prompt_messages(row, "mc", exemplars) for row in rows]
    groups = [[enc.encode_answer(p, c) for c in row.choices] for p, row in zip(prompts, rows, strict=True)]
    items: list[Encoded] = [it for g in groups for it in g]
    if config.share_prefix and common_prompt_prefix(items) >= MIN_SHARED_PREFIX:  # k-shot exemplars
        bar = _bar(len(items), "choices", progress)
        sums, counts = prefix_cached_logprobs(lm.model, items, batch_tokens=config.batch_tokens,
                                              pad_id=_pad_id(lm.tokenizer), on_batch=bar.update)
    elif config.share_prefix:
        bar = _bar(len(rows), "questions", progress)
        g_sums, g_counts = shared_prefix_logprobs(lm.model, groups, pad_id=_pad_id(lm.tokenizer),
                                                  on_group=bar.update)
        sums, counts = np.concatenate(g_sums), np.concatenate(g_counts)
    else:
        bar = _bar(len(items), "choices", progress)
        sums, counts = continuation_logprobs(lm.model, items, batch_tokens=config.batch_tokens,
                                             pad_id=_pad_id(lm.tokenizer), on_batch=bar.update)
    bar.close()
    preds: list[dict[str, Any]] = []
    gold_lp, gold_n = [], []
    k = 0
    for row in rows:
        m = len(row.choices)
        lp = sums[k:k + m]
        chars = np.array([it.n_chars for it in items[k:k + m]], dtype=np.float64)
        pred, pred_norm = int(np.argmax(lp)), int(np.argmax(lp / np.maximum(chars, 1.0)))
        gold_lp.append(lp[row.answer_index])
        gold_n.append(counts[k + row.answer_index])
        preds.append({"id": row.id, "gold": row.answer_index, "pred": pred, "pred_norm": pred_norm,
                      "logprobs": [round(float(x), 4) for x in lp],
                      "n_tokens": [int(x) for x in counts[k:k + m]]})
        k += m
    n = len(rows)
    metrics = {
        "acc": sum(p["pred"] == p["gold"] for p in preds) / n if n else None,
        "acc_norm": sum(p["pred_norm"] == p["gold"] for p in preds) / n if n else None,
        "answer_loss": _nll(np.array(gold_lp), np.array(gold_n)),
        "answer_tokens": int(np.sum(gold_n)),
        "prompt_truncated": int(sum(it.n_truncated > 0 for it in items)),
        "scored_tokens": int(sum(len(it.input_ids) for it in items)),
    }
    return metrics, preds


Predictions = list[dict[str, Any]]


def evaluate_math(lm: LoadedModel, rows: tuple[TaskRow, ...], exemplars: tuple[TaskRow, ...],
                  config: EvalConfig, *, progress: bool = True) -> tuple[dict[str, Any], Predictions]:
    """Exact match of greedy generations and the NLL of the worked solutions."""
    enc = ChatEncoder(lm.tokenizer, max_length=config.max_length)
    prompts = [prompt_messages(row, "math", exemplars) for row in rows]
    t0 = time.perf_counter()
    items = [enc.encode_answer(p, gold_text(row, "math")) for p, row in zip(prompts, rows, strict=True)]
    bar = _bar(len(items), "solution loss", progress)
    score = prefix_cached_logprobs if config.share_prefix else continuation_logprobs
    sums, counts = score(lm.model, items, batch_tokens=config.batch_tokens, pad_id=_pad_id(lm.tokenizer),
                         on_batch=bar.update)
    bar.close()
    t_loss = time.perf_counter() - t0
    n = len(rows)
    gold_nll = [round(float(-s / c), 4) if c else None for s, c in zip(sums, counts, strict=True)]
    if not config.generate:  # answer loss only
        preds = [{"id": row.id, "gold": row.answer, "answer_nll": g}
                 for row, g in zip(rows, gold_nll, strict=True)]
        return {"exact_match": None, "answer_loss": _nll(sums, counts), "answer_tokens": int(counts.sum()),
                "prompt_truncated": int(sum(it.n_truncated > 0 for it in items)),
                "seconds_loss": round(t_loss, 3)}, preds
    t0 = time.perf_counter()
    gen = generate_rows(lm.model, lm.tokenizer, rows, exemplars, max_gen_toks=config.max_new_tokens,
                        batch_size=config.gen_batch_size)
    t_gen = time.perf_counter() - t0
    preds = []
    for row, g in zip(rows, gold_nll, strict=True):
        out = gen[row.id]
        preds.append({"id": row.id, "gold": row.answer, "pred": out["pred"], "correct": out["correct"],
                      "generated_tokens": out["generated_tokens"],
                      "hit_limit": out["generated_tokens"] >= config.max_new_tokens, "answer_nll": g,
                      "generation": out["generation"]})
    n_new = [p["generated_tokens"] for p in preds]
    metrics = {
        "exact_match": sum(p["correct"] for p in preds) / n if n else None,
        "answer_loss": _nll(sums, counts),
        "answer_tokens": int(counts.sum()),
        "unparsed": int(sum(p["pred"] is None for p in preds)),
        "hit_token_limit": int(sum(p["hit_limit"] for p in preds)),
        "mean_generated_tokens": float(np.mean(n_new)) if n else None,
        "prompt_truncated": int(sum(it.n_truncated > 0 for it in items)),
        "seconds_loss": round(t_loss, 3),
        "seconds_generate": round(t_gen, 3),
    }
    return metrics, preds


def _pad_id(tokenizer: Any) -> int:
    for cand in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if cand is not None:
            return int(cand)
    return 0


def evaluate_model(lm: LoadedModel, task: Task, config: EvalConfig | None = None, *,
                   progress: bool = True) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Score ``lm`` on ``task``: ``(result, per-row predictions)``.

    ``result`` holds ``metrics`` plus what is needed to read them: the kind, the number of test
    rows used (``n`` of ``n_test``), the shots and the seconds taken.
    """
    config = config if config is not None else EvalConfig()
    rows = task.subset(config.limit, config.limit_seed)
    shots = config.shots_for(task)
    exemplars = task.dev[:shots]
    t0 = time.perf_counter()
    fn = evaluate_mc if task.kind == "mc" else evaluate_math
    metrics, preds = fn(lm, rows, exemplars, config, progress=progress)
    result = {
        "task": task.name,
        "task_path": task.path,
        "kind": task.kind,
        "n": len(rows),
        "n_test": len(task.test),
        "limit_seed": config.limit_seed if len(rows) < len(task.test) else None,
        "shots": shots,
        "metrics": metrics,
        "seconds": round(time.perf_counter() - t0, 3),
    }
    return result, preds


PRIMARY_METRIC: dict[str, str] = {"mc": "acc", "math": "exact_match"}
METRICS: dict[str, tuple[str, ...]] = {"mc": ("acc", "acc_norm", "answer_loss"),
                                       "math": ("exact_match", "answer_loss")}
