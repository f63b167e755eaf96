"""Evaluation: answer parsing, multiple-choice log-likelihood, answer loss, generation, and the
``evaluate`` / ``compare`` commands end to end on the tiny model."""

import json
from dataclasses import replace

import numpy as np
import pytest
import torch
from samples import MATH_ROWS, MC_ROWS

from trim_select.data import Message
from trim_select.evaluation.answers import exact_match, extract_number, numbers_match
from trim_select.evaluation.harness import EvalConfig, evaluate_math, evaluate_mc
from trim_select.evaluation.inference import (
    ChatEncoder,
    common_prompt_prefix,
    continuation_logprobs,
    prefix_cached_logprobs,
)
from trim_select.evaluation.tasks import (
    detect_kind,
    load_task,
    parse_task_row,
    prompt_messages,
    question_text,
    subset_rows,
)

TRAIN_ROWS = [
    {"id": f"t/{i}", "dataset": ds,
     "messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
    for i, (ds, q, a) in enumerate([
        ("cot", "How many clips did Natalia sell?", "48 + 24 = 72\n#### 72"),
        ("ni", "Translate to French: Good morning.", "Bonjour"),
        ("cot", "Compute 3 + 4 * 2.", "4 * 2 = 8\n#### 11"),
        ("bigbench", "Is the statement true?\n\nOptions:\n- Yes\n- No", "Yes"),
        ("ni", "Write a short story about a robot.", "The robot learns to paint."),
        ("gym", "Compute 2 + 2.", "4"),
    ])
]


def write_jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def make_task(root, name, rows):
    d = root / name
    write_jsonl(d / "test.jsonl", rows)
    write_jsonl(d / "dev.jsonl", rows[:2])
    return d


def rows_of(rows, kind):
    return tuple(parse_task_row(r, kind) for r in rows)


def direct_logprob(model, ids, target_mask):
    """Naive oracle: one unpadded forward, full logits, sum of log p over the answer tokens."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0].float()
    logp = torch.log_softmax(logits, dim=-1)
    pos = np.flatnonzero(target_mask)
    return float(sum(logp[p - 1, ids[p]] for p in pos)), len(pos)


# -- answer parsing ------------------------------------------------------------------------------


@pytest.mark.parametrize("text, expected", [
    ("so the answer is 72\n#### 72", "72"),
    ("#### 24.0", "24.0"),
    ("#### 1,715", "1715"),
    ("They make 1,234,567 in total. #### $1,234,567.", "1234567"),
    ("The temperature drops to -5 degrees", "-5"),
    ("#### −7", "-7"),
    ("10-5 = 5", "5"),
    ("half of it is .5", "0.5"),
    ("It costs £8832.0 every week\n#### 8832", "8832"),
    ("first #### 7 then a new question: 9 apples", "7"),
    ("step 1: 3.25 + 1 = 4.25", "4.25"),
    ("no number here", None),
])
def test_extract_number_reads_marker_first_then_last_number(text, expected):
    assert extract_number(text) == expected


@pytest.mark.parametrize("pred, gold, same", [
    ("24.0", "24", True), ("1715", "1,715", True), ("-3", "−3", True), ("8.50", "8.5", True),
    ("72", "27", False), (None, "0", False), ("0.5", ".5", True), ("1e3", "1000", True),
])
def test_numbers_match_compares_by_value(pred, gold, same):
    assert numbers_match(pred, gold) is same


def test_exact_match_on_generations():
    assert exact_match("48 / 2 = 24\n48 + 24 = 72\n#### 72", "72")
    assert exact_match("The answer is 1,715 orders.", "1715")
    assert not exact_match("#### 71", "72")


# -- tasks and prompts ---------------------------------------------------------------------------


def test_task_kind_is_detected_from_test_rows(tmp_path):
    assert load_task(make_task(tmp_path, "mc", MC_ROWS)).kind == "mc"
    assert load_task(make_task(tmp_path, "math", MATH_ROWS)).kind == "math"
    with pytest.raises(KeyError, match="choices"):
        detect_kind({"id": "x", "question": "q", "label": 1})


def test_math_rows_without_answer_take_the_solution_marker(tmp_path):
    row = {"id": "a", "question": "q?", "solution": "2 + 2 = 4\n#### 4"}
    task = load_task(make_task(tmp_path, "m", [row]))
    assert task.test[0].answer == "4"


def test_mc_prompt_is_the_val_format_with_dev_exemplars_as_chat_turns():
    rows = rows_of(MC_ROWS, "mc")
    assert question_text(rows[1], "mc") == (
        "The quick brown fox jumps. What does the dog do?\n\nOptions:\n"
        "- sleeps on the mat\n- paints landscapes")
    msgs = prompt_messages(rows[2], "mc", rows[:2])
    assert [m.role for m in msgs] == ["user", "assistant", "user", "assistant", "user"]
    assert msgs[1].content == "grateful" and msgs[4].content == question_text(rows[2], "mc")


def test_limit_draws_the_same_seeded_subset_in_file_order():
    rows = rows_of([dict(MATH_ROWS[0], id=f"m/{i}") for i in range(20)], "math")
    a, b = subset_rows(rows, 5, seed=3), subset_rows(rows, 5, seed=3)
    assert a == b and len(a) == 5
    ids = [int(r.id.split("/")[1]) for r in a]
    assert ids == sorted(ids)
    assert subset_rows(rows, 5, seed=4) != a
    assert subset_rows(rows, None) == rows


# -- log-likelihood ------------------------------------------------------------------------------


def test_answer_tokens_are_exactly_the_answer_text(tiny):
    enc = ChatEncoder(tiny.tokenizer)
    prompt = [Message("user", "Compute 3 + 4 * 2.")]
    item = enc.encode_answer(prompt, "4 * 2 = 8\n#### 11")
    assert tiny.tokenizer.decode(item.input_ids[item.target_mask]) == "4 * 2 = 8\n#### 11"
    assert item.target_mask[-1]  # the end-of-turn token after the answer is not scored
    assert np.array_equal(item.input_ids[:int(np.argmax(item.target_mask))], enc.encode_prompt(prompt))


def test_continuation_logprobs_match_a_direct_computation_whatever_the_batching(tiny):
    enc = ChatEncoder(tiny.tokenizer)
    items = [enc.encode_answer([Message("user", q)], a) for q, a in
             [("Hi", "The quick brown fox"), ("Compute 3 + 4.", "7"), ("Say yes", "Options: Yes")]]
    together, n1 = continuation_logprobs(tiny.model, items, batch_tokens=10_000)
    alone, n2 = continuation_logprobs(tiny.model, items, batch_tokens=1)
    np.testing.assert_allclose(together, alone, rtol=0, atol=1e-4)
    for it, lp, n in zip(items, together, n1, strict=True):
        ref, ref_n = direct_logprob(tiny.model, it.input_ids.tolist(), it.target_mask)
        assert n == ref_n and lp == pytest.approx(ref, abs=1e-4)
    assert np.array_equal(n1, n2)


def test_few_shot_prefix_run_once_gives_the_whole_sequence_logprobs(tiny):
    enc = ChatEncoder(tiny.tokenizer)
    shots = rows_of(MATH_ROWS, "math")[:2]
    questions = rows_of(MATH_ROWS, "math")
    items = [enc.encode_answer(prompt_messages(r, "math", shots), r.solution) for r in questions]
    same_prompt = prompt_messages(questions[0], "math", shots)
    items += [enc.encode_answer(same_prompt, a) for a in ("72", "#### 72 clips")]  # remainder starts scored
    p = common_prompt_prefix(items)
    assert 0 < p <= min(int(np.argmax(it.target_mask)) for it in items)
    assert all(np.array_equal(it.input_ids[:p], items[0].input_ids[:p]) for it in items)
    cached, n1 = prefix_cached_logprobs(tiny.model, items, batch_tokens=64, min_prefix=1)
    whole, n2 = continuation_logprobs(tiny.model, items)
    np.testing.assert_allclose(cached, whole, rtol=0, atol=1e-4)
    assert np.array_equal(n1, n2)
    for it, lp in zip(items, cached, strict=True):
        assert lp == pytest.approx(direct_logprob(tiny.model, it.input_ids.tolist(), it.target_mask)[0], abs=1e-4)
    fallback, _ = prefix_cached_logprobs(tiny.model, items, min_prefix=p + 1)  # too short: whole sequences
    np.testing.assert_array_equal(fallback, whole)


@pytest.mark.parametrize("share_prefix", [True, False], ids=["kv-cache-shared-prompt", "whole-sequences"])
def test_multiple_choice_picks_the_choice_the_model_prefers(tiny, share_prefix):
    rows = rows_of(MC_ROWS, "mc")
    cfg = EvalConfig(device="cpu", dtype="float32", share_prefix=share_prefix)
    metrics, preds = evaluate_mc(tiny, rows, rows[:1], cfg, progress=False)
    enc = ChatEncoder(tiny.tokenizer)
    hits = hits_norm = 0
    for row, p in zip(rows, preds, strict=True):
        prompt = prompt_messages(row, "mc", rows[:1])
        direct = []
        for c in row.choices:
            it = enc.encode_answer(prompt, c)
            direct.append(direct_logprob(tiny.model, it.input_ids.tolist(), it.target_mask)[0])
        direct = np.array(direct)
        np.testing.assert_allclose(p["logprobs"], direct, atol=1e-3)
        assert p["pred"] == int(np.argmax(direct))
        assert p["pred_norm"] == int(np.argmax(direct / np.array([len(c) for c in row.choices])))
        hits += p["pred"] == row.answer_index
        hits_norm += p["pred_norm"] == row.answer_index
    assert metrics["acc"] == pytest.approx(hits / len(rows))
    assert metrics["acc_norm"] == pytest.approx(hits_norm / len(rows))
    assert all(0 <= p["pred"] < len(r.choices) for p, r in zip(preds, rows, strict=True))


def test_answer_loss_is_the_pooled_per_token_nll_of_the_gold_answer(tiny):
    rows = rows_of(MATH_ROWS, "math")
    cfg = EvalConfig(device="cpu", dtype="float32", max_new_tokens=4)
    metrics, _ = evaluate_math(tiny, rows, rows[:1], cfg, progress=False)
    enc = ChatEncoder(tiny.tokenizer)
    total, count = 0.0, 0
    for row in rows:
        it = enc.encode_answer(prompt_messages(row, "math", rows[:1]), row.solution)
        lp, n = direct_logprob(tiny.model, it.input_ids.tolist(), it.target_mask)
        total, count = total - lp, count + n
    assert metrics["answer_tokens"] == count
    assert metrics["answer_loss"] == pytest.approx(total / count, abs=1e-4)
    loss_only, preds = evaluate_math(tiny, rows, rows[:1], replace(cfg, generate=False), progress=False)
    assert loss_only["answer_loss"] == metrics["answer_loss"] and loss_only["exact_match"] is None
    assert "generation" not in preds[0]
    mc_metrics, preds = evaluate_mc(tiny, rows_of(MC_ROWS, "mc"), (), cfg, progress=False)
    gold_lp = sum(p["logprobs"][p["gold"]] for p in preds)
    gold_n = sum(p["n_tokens"][p["gold"]] for p in preds)
    assert mc_metrics["answer_loss"] == pytest.approx(-gold_lp / gold_n, abs=1e-3)


def test_math_exact_match_is_lm_evals_generate_until_on_the_same_rows(tiny, tmp_path):
    from trim_select.evaluation.lm_eval_tasks import rows_task_folder, run_lm_eval

    rows = rows_of(MATH_ROWS, "math")
    cfg = EvalConfig(device="cpu", dtype="float32", max_new_tokens=6, gen_batch_size=2)
    metrics, preds = evaluate_math(tiny, rows[1:], rows[:1], cfg, progress=False)
    # lm-eval run directly on a folder of the same rows and exemplar, one prompt at a time
    res = run_lm_eval(tiny.model, tiny.tokenizer, rows_task_folder("math", rows[1:], rows[:1], tmp_path),
                      shots=1, max_gen_toks=6, batch_size=1)
    (samples,) = res["samples"].values()
    assert [p["id"] for p in preds] == [s["id"] for s in samples] == [r.id for r in rows[1:]]
    assert [p["generation"] for p in preds] == [s["raw_response"] for s in samples]  # batching changes nothing
    assert [p["correct"] for p in preds] == [bool(s["exact_match"]) for s in samples]
    assert "#### 72" in samples[0]["prompt"]  # the exemplar's worked solution is the first assistant turn
    assert metrics["exact_match"] == pytest.approx(np.mean([s["exact_match"] for s in samples]))
    assert all(0 <= p["generated_tokens"] <= 6 and p["hit_limit"] == (p["generated_tokens"] >= 6) for p in preds)


# -- evaluate / compare end to end ---------------------------------------------------------------

TINY_RECIPE = {"epochs": 1, "batch_size": 4, "lora_r": 4, "lora_alpha": 8, "dtype": "float32"}
TINY_EVAL = {"limit": 2, "max_new_tokens": 8, "device": "cpu", "dtype": "float32"}


@pytest.fixture
def tasks(tmp_path):
    root = tmp_path / "tasks"
    mc, math = make_task(root, "quiz", MC_ROWS), make_task(root, "arith", MATH_ROWS)
    for d, rows in ((mc, MC_ROWS), (math, MATH_ROWS)):  # val.jsonl: the target set (messages format)
        write_jsonl(d / "val.jsonl", [{"id": r["id"], "messages": [
            {"role": "user", "content": r["question"]},
            {"role": "assistant", "content": r.get("solution") or r["choices"][r["answer_index"]]}]}
            for r in rows])
    return mc, math


def test_evaluate_reports_seeds_mean_std_base_row_and_resumes(tmp_path, tiny_dir, tasks):
    from typer.testing import CliRunner

    from trim_select.cli import app
    from trim_select.evaluation import evaluate, evaluation_recipe
    from trim_select.evaluation.runner import load_finetuned

    train = write_jsonl(tmp_path / "coreset.jsonl", TRAIN_ROWS)
    out = tmp_path / "eval"
    summary = evaluate(list(tasks), out, train=train, model=str(tiny_dir), seeds=2, progress=False,
                       recipe=evaluation_recipe("cpu", **TINY_RECIPE), config=EvalConfig(**TINY_EVAL))
    quiz, arith = summary["tasks"]["quiz"], summary["tasks"]["arith"]
    assert (quiz["kind"], arith["kind"]) == ("mc", "math")
    assert quiz["n"] == 2 and quiz["n_test"] == 3 and quiz["limit_seed"] == 0 and quiz["shots"] == 2
    expected = ((quiz, ("acc", "acc_norm", "answer_loss")), (arith, ("exact_match", "answer_loss")))
    for task, metrics in expected:
        ft = task["finetuned"]["metrics"]
        assert set(ft) == set(metrics)
        for m in metrics:
            vals = ft[m]["values"]
            assert len(vals) == 2
            assert ft[m]["mean"] == pytest.approx(np.mean(vals))
            assert ft[m]["std"] == pytest.approx(np.std(vals, ddof=1))
        base = task["references"][0]
        assert base["label"] == "base" and set(base["metrics"]) >= set(metrics)
        # the adapter really was trained and loaded: the answer loss moved
        assert all(v != pytest.approx(base["metrics"]["answer_loss"], abs=1e-6)
                   for v in ft["answer_loss"]["values"])
    table = (out / "evaluation.md").read_text()
    assert "| fine-tuned | 2 |" in table and "2 of 3 test rows" in table and "answer NLL" in table
    assert json.loads((out / "evaluation.json").read_text())["tasks"]["arith"]["finetuned"]["seeds"] == [0, 1]
    preds = (out / "arith" / "predictions" / "seed-1.jsonl").read_text().splitlines()
    assert len(preds) == 2 and "generation" in json.loads(preds[0])

    # the unmerged adapter (default) computes what the merged model computes
    adapter = json.loads((out / "arith" / "seed-0.json").read_text())["train"]["adapter"]
    cfg = EvalConfig(**TINY_EVAL)
    unmerged, merged = load_finetuned(adapter, cfg), load_finetuned(adapter, replace(cfg, merge_adapter=True))
    item = ChatEncoder(unmerged.tokenizer).encode_answer([Message("user", "Compute 3 + 4.")], "7 #### 7")
    np.testing.assert_allclose(continuation_logprobs(unmerged.model, [item])[0],
                               continuation_logprobs(merged.model, [item])[0], atol=1e-4)

    # the CLI with the same settings reuses every result (no training, no scoring)
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("seed-*.json")}
    stamps |= {p: p.stat().st_mtime_ns for p in out.rglob("base.json")}
    args = ["evaluate", "--task", str(tasks[0]), "--task", str(tasks[1]), "--train", str(train),
            "--out", str(out), "--model", str(tiny_dir), "--seeds", "2", "--limit", "2",
            "--max-new-tokens", "8", "--device", "cpu", "--dtype", "float32", "--epochs", "1",
            "--batch-size", "4", "--lora-r", "4", "--lora-alpha", "8", "--train-dtype", "float32", "--quiet"]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    assert "| fine-tuned | 2 |" in res.output
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps


def test_evaluate_with_zero_seeds_scores_only_the_reference_models(tmp_path, tiny_dir, tasks):
    from trim_select.evaluation import evaluate

    summary = evaluate([tasks[0]], tmp_path / "ref", model=str(tiny_dir), seeds=0, progress=False,
                       baseline_models=[str(tiny_dir)], config=EvalConfig(**TINY_EVAL))
    quiz = summary["tasks"]["quiz"]
    assert "finetuned" not in quiz and [r["label"] for r in quiz["references"]] == ["base", "reference-1"]
    assert quiz["references"][0]["metrics"] == quiz["references"][1]["metrics"]  # same weights, same numbers
