"""lm-eval local tasks built from a task folder agree with a direct log-likelihood computation."""

import json

import pytest
import torch

from trim_select.evaluation.lm_eval_tasks import run_lm_eval, task_config, write_task
from trim_select.evaluation.tasks import load_task, prompt_messages

MC_ROWS = [
    ("How would her friend feel afterwards?", ["grateful", "as", "im"], 1),
    ("Is the quick brown fox quick?", ["Yes", "No"], 0),
    ("Sasha helped her friend move the couch. Why?", ["start", "to help", "to sleep"], 2),
    ("Compute 3 + 4 * 2.", ["7", "11", "6"], 1),
    ("Translate to French: Good morning.", ["Bonjour", "Maybe"], 0),
]
MATH_ROWS = [
    ("Natalia sold 48 clips in April and half as many in May. How many altogether?", "72"),
    ("Weng earns $12 an hour. How much for 2 hours?", "24"),
    ("Tracy has 4 feet of wire and uses 1. How much is left?", "3"),
]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


@pytest.fixture
def mc_folder(tmp_path):
    rows = [{"id": f"mc{i}", "question": q, "choices": c, "answer_index": a}
            for i, (q, c, a) in enumerate(MC_ROWS)]
    folder = tmp_path / "mc_task"
    folder.mkdir()
    write_jsonl(folder / "test.jsonl", rows)
    write_jsonl(folder / "dev.jsonl", rows[::-1])  # exemplars differ from each test row's order
    return folder


@pytest.fixture
def math_folder(tmp_path):
    rows = [{"id": f"m{i}", "question": q, "answer": a, "solution": f"The answer is {a}.\n#### {a}"}
            for i, (q, a) in enumerate(MATH_ROWS)]
    folder = tmp_path / "math_task"
    folder.mkdir()
    write_jsonl(folder / "test.jsonl", rows)
    write_jsonl(folder / "dev.jsonl", rows[::-1])
    return folder


def oracle_logliks(model, tok, folder, shots):
    """Per row: sum log p(choice | chat prompt) per choice, and log p(prompt's trailing "\\n" | rest).

    One forward per (row, choice), naive loop. lm-eval's ``_encode_pair`` moves the context's trailing
    whitespace (the "\\n" after ``<|im_start|>assistant``) into every continuation, so its scores are
    ours plus that one per-row constant (same argmax, same accuracy).
    """
    task = load_task(folder)
    out = []
    for row in task.test:
        msgs = [{"role": m.role, "content": m.content} for m in prompt_messages(row, "mc", task.dev[:shots])]
        prompt = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        ctx = tok(prompt, add_special_tokens=False)["input_ids"]
        stripped = tok(prompt.rstrip(), add_special_tokens=False)["input_ids"]
        assert ctx[:len(stripped)] == stripped and len(ctx) == len(stripped) + 1
        lls, newline = [], None
        for choice in row.choices:
            full = tok(prompt + choice, add_special_tokens=False)["input_ids"]
            assert full[:len(ctx)] == ctx
            with torch.no_grad():
                logp = torch.log_softmax(model(torch.tensor([full])).logits[0].double(), dim=-1)
            lls.append(sum(float(logp[pos - 1, full[pos]]) for pos in range(len(ctx), len(full))))
            newline = float(logp[len(stripped) - 1, ctx[-1]])
        out.append((lls, newline))
    return task, out


def test_one_token_choice_is_in_the_chat_template(tiny):
    # the point of the 'im'/'start' choices: they occur in the rendered prompt ("as" is one token)
    rendered = tiny.tokenizer.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False,
                                                  add_generation_prompt=True)
    assert "as" in rendered and "im" in rendered and "start" in rendered
    assert len(tiny.tokenizer("as", add_special_tokens=False)["input_ids"]) == 1


def test_local_mc_task_matches_direct_loglikelihood(tiny, mc_folder):
    shots = 2
    res = run_lm_eval(tiny.model, tiny.tokenizer, mc_folder, shots=shots)
    task, oracle = oracle_logliks(tiny.model, tiny.tokenizer, mc_folder, shots)
    rows = res["samples"]["trim_mc_task"]
    assert [r["id"] for r in rows] == [t.id for t in task.test]
    for row, (lls, newline), trow in zip(rows, oracle, task.test, strict=True):
        assert row["logliks"] == pytest.approx([ll + newline for ll in lls], abs=1e-3)
        assert row["chosen"] == max(range(len(lls)), key=lls.__getitem__)
        assert row["acc"] == float(row["chosen"] == trow.answer_index)
    picks = [max(range(len(lls)), key=lls.__getitem__) for lls, _ in oracle]
    assert [r["chosen"] for r in rows] == picks
    acc = sum(p == t.answer_index for p, t in zip(picks, task.test, strict=True)) / len(picks)
    assert res["results"]["trim_mc_task"]["acc,none"] == pytest.approx(acc)
    assert res["n_shot"]["trim_mc_task"] == shots


def test_math_task_runs_generate_until_with_exact_match(tiny, math_folder):
    res = run_lm_eval(tiny.model, tiny.tokenizer, math_folder, shots=1, max_gen_toks=8)
    metrics = res["results"]["trim_math_task"]
    assert 0.0 <= metrics["exact_match,strict-match"] <= 1.0
    rows = res["samples"]["trim_math_task"]
    assert [r["target"] for r in rows] == [a for _, a in MATH_ROWS]
    assert all(isinstance(r["raw_response"], str) and r["exact_match"] in (0.0, 1.0) for r in rows)
    # the prompt is tasks.py's: one dev exemplar as a user/assistant pair (its worked solution), then the question
    task = load_task(math_folder)
    for row, trow in zip(rows, task.test, strict=True):
        msgs = [{"role": m.role, "content": m.content} for m in prompt_messages(trow, "math", task.dev[:1])]
        assert row["prompt"] == tiny.tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        assert "#### 3" in row["prompt"]  # the first dev row's solution


def test_generated_configs_follow_the_layout(mc_folder, math_folder, tmp_path):
    mc = task_config(mc_folder)
    assert mc["dataset_kwargs"]["data_files"]["train"].endswith("test.jsonl")
    assert (mc["test_split"], mc["fewshot_split"], mc["output_type"]) == ("train", "dev", "multiple_choice")
    assert mc["fewshot_config"]["sampler"] == "first_n"
    math = task_config(math_folder, end_of_turn="<|im_end|>")
    assert math["generation_kwargs"]["until"] == ["<|im_end|>"]
    assert math["fewshot_config"]["doc_to_target"] == "{{ solution }}"
    name, path, kind = write_task(math_folder, tmp_path / "yaml")
    assert (name, kind) == ("trim_math_task", "math") and path.exists()


def test_include_directory_runs_its_tasks(tiny, mc_folder, tmp_path):
    write_task(mc_folder, tmp_path / "inc")
    res = run_lm_eval(tiny.model, tiny.tokenizer, tmp_path / "inc", shots=0, limit=2)
    assert res["results"]["trim_mc_task"]["sample_len"] == 2
    named = run_lm_eval(tiny.model, tiny.tokenizer, "trim_mc_task", include=tmp_path / "inc", shots=0, limit=2)
    assert named["samples"]["trim_mc_task"][0]["logliks"] == res["samples"]["trim_mc_task"][0]["logliks"]


def test_cli_evaluate_writes_lm_eval_metrics_of_the_base_model(tmp_path, tiny_dir, mc_folder):
    from typer.testing import CliRunner

    from trim_select.cli import app

    out = tmp_path / "eval"
    args = ["evaluate", "--task", str(mc_folder), "--out", str(out), "--model", str(tiny_dir), "--seeds", "0",
            "--limit", "3", "--shots", "1", "--device", "cpu", "--dtype", "float32", "--quiet",
            "--lm-eval-task", str(mc_folder)]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    report = json.loads((out / "lm_eval.json").read_text())
    assert report["base"]["trim_mc_task"]["sample_len"] == 3
    assert 0.0 <= report["base"]["trim_mc_task"]["acc,none"] <= 1.0
    assert "lm-eval base trim_mc_task" in res.output
