"""``compare`` end to end on the tiny model: one TRIM pass for every task, controls, per-row
results, paired intervals, lm-eval rows, incremental and resumable outputs."""

import gzip
import json

import numpy as np
import pyarrow.parquet as pq
import pytest
from samples import MATH_ROWS, MC_ROWS

from trim_select.comparison import compare
from trim_select.comparison.selections import ranking_of, training_rows
from trim_select.comparison.tables import paired
from trim_select.config import RuntimeConfig
from trim_select.data import read_records
from trim_select.evaluation import EvalConfig, evaluation_recipe
from trim_select.evaluation.controls import shuffled_order
from trim_select.evaluation.runner import data_digest

POOL = [
    ("cot", "How many clips did Natalia sell?", "48 + 24 = 72\n#### 72"),
    ("ni", "Translate to French: Good morning.", "Bonjour"),
    ("cot", "Compute 3 + 4 * 2.", "4 * 2 = 8\n#### 11"),
    ("bigbench", "Is the statement true?\n\nOptions:\n- Yes\n- No", "Yes"),
    ("ni", "Write a short story about a robot that learns to paint landscapes at night.",
     "The robot learns to paint. It paints the sea, the hills and the town, and then it sleeps."),
    ("gym", "Compute 2 + 2.", "4"),
]
RECIPE = {"epochs": 1, "batch_size": 4, "lora_r": 4, "lora_alpha": 8, "dtype": "float32"}


def write_jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def setup(tmp_path, tiny_dir):
    root = tmp_path / "tasks"
    dirs = []
    for name, rows in (("quiz", MC_ROWS), ("arith", MATH_ROWS)):
        d = root / name
        write_jsonl(d / "test.jsonl", rows)
        write_jsonl(d / "dev.jsonl", rows[:1])
        write_jsonl(d / "val.jsonl", [{"id": r["id"], "messages": [
            {"role": "user", "content": r["question"]},
            {"role": "assistant", "content": r.get("solution") or r["choices"][r["answer_index"]]}]} for r in rows])
        dirs.append(d)
    pool = write_jsonl(tmp_path / "pool.jsonl", [
        {"id": f"p/{k}/{i}", "dataset": ds, "messages": [{"role": "user", "content": q},
                                                        {"role": "assistant", "content": a}]}
        for k in range(3) for i, (ds, q, a) in enumerate(POOL)])
    kw = dict(seeds=2, model=str(tiny_dir), recipe=evaluation_recipe("cpu", **RECIPE),
              config=EvalConfig(limit=None, max_new_tokens=8, device="cpu", dtype="float32", generate=False),
              runtime=RuntimeConfig(device="cpu", dtype="float32"), progress=False)
    return dirs, pool, kw


def read_rows(path):
    with gzip.open(path, "rt") as fh:
        return [json.loads(line) for line in fh]


def test_compare_pairs_every_method_on_the_same_rows_and_resumes(tmp_path, setup):
    dirs, pool, kw = setup
    out = tmp_path / "cmp"
    summary = compare(dirs, pool, "4", ["trim", "bm25"], out, match_tokens="bm25", **kw)
    assert summary["complete"] and summary["labels"] == ["trim", "bm25", "trim@bm25-tokens"]
    top = json.loads((out / "select" / "trim" / "run.json").read_text())
    assert sorted(top["targets"]) == ["arith", "quiz"] and top["cost"]["pool_passes"] == 1  # one pass, two tasks
    for name, task in summary["tasks"].items():
        rows = read_rows(out / "rows" / f"{name}.jsonl.gz")
        n_test = 3
        for label in summary["labels"]:
            mine = [r for r in rows if r["method"] == label]
            assert sorted({r["seed"] for r in mine}) == [0, 1] and len(mine) == 2 * n_test
            assert all(r["answer_nll"] is not None and r["answer_nll"] > 0 for r in mine)
            assert task["methods"][label]["seeds_done"] == [0, 1]
        base = [r for r in rows if r["method"] == "base"]
        assert len(base) == n_test and {r["id"] for r in base} == {r["id"] for r in rows}
        pairs = {(p["a"], p["b"]): p for p in task["paired"]["pairs"]["answer_nll"]}
        assert len(pairs) == 4 * 3 // 2 and all(p["n"] == n_test for p in pairs.values())
        p = pairs[("bm25", "trim")]
        by = {m: np.mean([[r["answer_nll"] for r in rows if r["method"] == m and r["id"] == i]
                          for i in sorted({r["id"] for r in rows})], axis=1) for m in ("bm25", "trim")}
        assert p["mean_diff"] == pytest.approx(float(np.mean(by["bm25"] - by["trim"])), abs=1e-9)
        assert p["low"] <= p["mean_diff"] <= p["high"]
        assert ("correct" in task["paired"]["pairs"]) == (task["kind"] == "mc")  # math: no decoding here
        # equal tokens: trim's ranking cut where its token total is closest to bm25's coreset
        ref = task["methods"]["bm25"]["train"]["tokens"]
        info = task["methods"]["trim@bm25-tokens"]["train"]
        assert info["matched_tokens"] == ref and info["rows"] >= 1
        assert task["methods"]["trim"]["train"]["rows"] == 4
        assert task["methods"]["trim"]["profile"]["sources"]
    md = (out / "compare.md").read_text()
    assert "Paired differences, answer_nll" in md and "| trim@bm25-tokens |" in md and "Complete." in md

    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()
              and p.name not in {"compare.json", "compare.md"} and p.parent.name != "rows"}
    again = compare(dirs, pool, "4", ["trim", "bm25"], out, match_tokens="bm25", **kw)
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps  # nothing selected, trained or scored again
    assert again["tasks"]["quiz"]["paired"] == summary["tasks"]["quiz"]["paired"]


def test_compare_scores_the_first_nll_rows_through_lm_eval_and_redraws_random_per_seed(tmp_path, setup):
    dirs, pool, kw = setup
    out = tmp_path / "cmp"
    summary = compare(dirs[:1], pool, "4", ["random"], out, lm_eval_limit=2, **kw)
    rows = read_rows(out / "rows" / "quiz.jsonl.gz")
    assert len(rows) == 3 * 3  # base + 2 seeds, 3 test rows each
    assert all((r["lm_eval_correct"] is not None) == (r["id"] in {"mc/0", "mc/1"}) for r in rows)
    for r in rows:  # on rows both scored, lm-eval's accuracy is ours (argmax of the summed log-likelihood)
        if r["lm_eval_correct"] is not None:
            assert r["lm_eval_correct"] == r["correct"]
    quiz = summary["tasks"]["quiz"]
    assert quiz["n_lm_eval"] == 2 and "lm_eval_correct" in quiz["paired"]["pairs"]
    picks = [(out / "select" / "quiz" / f"random-seed-{s}" / "coreset.jsonl").read_text() for s in (0, 1)]
    assert picks[0] != picks[1] and len(quiz["methods"]["random"]["selections"]) == 2


def test_fill_up_gives_a_filtered_method_the_full_budget_from_its_next_rows(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    d = tmp_path / "sel"
    d.mkdir()
    score = np.array([0.5, -np.inf, 2.0, -np.inf, 1.0])
    weight = np.array([0.5, 9.0, 2.0, 3.0, 1.0])  # DSIR's importance weight before min_words
    pq.write_table(pa.table({"index": np.arange(5), "id": [f"r{i}" for i in range(5)], "score": score,
                             "log_importance_weight": weight}), d / "scores.parquet")
    ranking, own = ranking_of(d, 5)
    assert own.tolist() == [2, 4, 0] and ranking.tolist() == [2, 4, 0, 1, 3]
    tokens = np.array([10, 20, 30, 40, 50])
    rows = training_rows(ranking, own, "4", 5, tokens)
    assert rows.positions.tolist() == [2, 4, 0, 1] and rows.info["filled"] == 1 and rows.info["tokens"] == 110
    clean = training_rows(ranking, own, "3", 5, tokens, exclude=[4])  # decontaminated row leaves the ranking
    assert clean.positions.tolist() == [2, 0, 1] and clean.info["excluded"] == 1
    matched = training_rows(ranking, own, "3", 5, tokens, match_tokens=35)
    assert matched.positions.tolist() == [2]  # 30 tokens is closer to 35 than 30 + 50


def test_each_pair_is_paired_over_the_seeds_both_of_its_methods_finished():
    rows = [{"method": m, "seed": s, "id": f"r{i}", "answer_nll": 1.0 + i + (0.5 if m == "b" else 0.0) + s,
             "correct": None, "lm_eval_correct": None}
            for m, seeds in (("a", [0, 1]), ("b", [0]), ("c", [0, 1])) for s in seeds for i in range(5)]
    out = paired(rows)
    assert out["seeds"] == [0]  # finished by every method
    pairs = {(p["a"], p["b"]): p for p in out["pairs"]["answer_nll"]}
    assert pairs[("a", "b")]["seeds"] == [0] and pairs[("a", "b")]["mean_diff"] == pytest.approx(-0.5)
    assert pairs[("a", "c")]["seeds"] == [0, 1] and list(pairs[("a", "c")]["per_seed"]) == ["0", "1"]
    assert pairs[("a", "b")]["excludes_zero"] and "correct" not in out["pairs"]


def test_trim_variants_get_one_pool_pass_each_and_paired_rows_against_trim(tmp_path, setup):
    dirs, pool, kw = setup
    out = tmp_path / "cmp"
    methods = ["trim", "trim-generic", "trim-layer-2"]
    summary = compare(dirs, pool, "4", methods, out, **{**kw, "seeds": 1})
    assert summary["complete"] and summary["labels"] == methods
    for method in methods[1:]:
        top = json.loads((out / "select" / method / "run.json").read_text())
        assert sorted(top["targets"]) == ["arith", "quiz"] and top["cost"]["pool_passes"] == 1
    quiz = out / "select" / "trim-generic" / "quiz"
    generic = json.loads((quiz / "run.json").read_text())["generic"]
    assert generic["rows"] == 10 and len(generic["ids"]) == 10
    table = pq.read_table(quiz / "scores.parquet")
    np.testing.assert_allclose(table.column("score").to_numpy(),
                               table.column("target_score").to_numpy() - table.column("generic_score").to_numpy())
    layer = json.loads((out / "select" / "trim-layer-2" / "arith" / "run.json").read_text())
    assert layer["config"]["fingerprint"]["hidden_layer"] == 2 and layer["fingerprints"]["hidden_layer"] == 2
    for task in summary["tasks"].values():
        pairs = {frozenset((p["a"], p["b"])) for p in task["paired"]["pairs"]["answer_nll"]}
        assert {frozenset(("trim", m)) for m in methods[1:]} <= pairs


@pytest.mark.parametrize("bad", ["trim-layer-N", "trim-layer-x", "trim-generic-layer-2"])
def test_compare_refuses_a_trim_variant_it_cannot_parse(tmp_path, setup, bad):
    dirs, pool, kw = setup
    with pytest.raises(ValueError, match="unknown methods"):
        compare(dirs, pool, "4", ["trim", bad], tmp_path / "cmp", **kw)


def test_an_external_selection_trains_on_the_rows_of_the_ranking_it_holds(tmp_path, setup):
    import shutil

    dirs, pool, kw = setup
    kw = {**kw, "seeds": 1}
    out = tmp_path / "cmp"
    compare(dirs, pool, "4", ["bm25"], out, **kw)
    ext = tmp_path / "ext"
    for d in dirs:  # bm25's own rankings, handed back as an external selection
        (ext / d.name).mkdir(parents=True)
        shutil.copy(out / "select" / d.name / "bm25" / "scores.parquet", ext / d.name / "scores.parquet")
    summary = compare(dirs, pool, "4", ["bm25"], out, selections={"mine": ext}, **kw)
    assert summary["labels"] == ["bm25", "mine"]
    for task in summary["tasks"].values():
        mine, bm25 = task["methods"]["mine"], task["methods"]["bm25"]
        assert mine["train"] == bm25["train"] and mine["cost"]["seconds"] is None and "xxh3_128" in mine["scores"]
        (pair,) = [p for p in task["paired"]["pairs"]["answer_nll"] if {p["a"], p["b"]} == {"bm25", "mine"}]
        assert pair["mean_diff"] == 0.0 and not pair["excludes_zero"]
    with pytest.raises(ValueError, match="clash"):
        compare(dirs, pool, "4", ["bm25"], tmp_path / "c2", selections={"bm25": ext}, **kw)
    with pytest.raises(FileNotFoundError, match="scores.parquet"):
        compare(dirs, pool, "4", [], tmp_path / "c3", selections={"none": tmp_path / "nowhere"}, **kw)


def test_an_external_selection_without_run_json_gets_its_equal_token_row(tmp_path, setup):
    import shutil

    dirs, pool, kw = setup
    kw = {**kw, "seeds": 1}
    out = tmp_path / "cmp"
    compare(dirs, pool, "4", ["bm25"], out, **kw)
    ext = tmp_path / "ext"  # scores.parquet only: a ranking made elsewhere has no run.json
    for d in dirs:
        (ext / d.name).mkdir(parents=True)
        shutil.copy(out / "select" / d.name / "bm25" / "scores.parquet", ext / d.name / "scores.parquet")
    summary = compare(dirs, pool, "4", ["bm25"], tmp_path / "matched", selections={"mine": ext},
                      match_tokens="bm25", **kw)
    assert "mine@bm25-tokens" in summary["labels"]
    for task in summary["tasks"].values():
        matched, bm25 = task["methods"]["mine@bm25-tokens"], task["methods"]["bm25"]
        assert matched["train"]["tokens"] == bm25["train"]["tokens"] and matched["cost"]["seconds"] is None
        assert "xxh3_128" in matched["scores"]  # the identity of the ranking it was cut from


def test_order_control_trains_the_same_rows_in_another_order_and_reports_the_floor(tmp_path, setup):
    dirs, pool, kw = setup
    out = tmp_path / "aa"
    summary = compare(dirs[:1], pool, "4", ["bm25"], out, order_control="bm25", **kw)
    assert summary["labels"] == ["bm25", "bm25~shuffled"] and summary["controls"]["order_control"] == "bm25"
    quiz = summary["tasks"]["quiz"]
    own, aa = quiz["methods"]["bm25"], quiz["methods"]["bm25~shuffled"]
    assert aa["profile"] == own["profile"] and aa["train"]["tokens"] == own["train"]["tokens"]
    assert aa["train"]["order"] == "shuffled per seed" and aa["seeds_done"] == [0, 1]
    records = list(read_records(pool))
    rows = training_rows(*ranking_of(out / "select" / "quiz" / "bm25", len(records)), "4", len(records),
                         np.ones(len(records), dtype=np.int64))
    for s in (0, 1):  # each seed trains bm25's rows in that seed's shuffled order, and only that
        order = shuffled_order(rows.positions, s)
        assert sorted(order.tolist()) == sorted(rows.positions.tolist()) and order.tolist() != rows.positions.tolist()
        assert own["data_digests"][str(s)] == data_digest([records[i] for i in rows.positions])
        assert aa["data_digests"][str(s)] == data_digest([records[i] for i in order])
    floor = next(r for r in quiz["paired"]["pairs"]["answer_nll"] if {r["a"], r["b"]} == {"bm25", "bm25~shuffled"})
    assert abs(floor["mean_diff"]) < 1e-4  # 4 rows, batch 4, one epoch: one batch, so the order cannot matter
    assert "Order noise floor (A/A): `bm25` − `bm25~shuffled`" in (out / "compare.md").read_text()
    with pytest.raises(ValueError, match="--order-control 'trim' is not among the methods"):
        compare(dirs[:1], pool, "4", ["bm25"], tmp_path / "bad", order_control="trim", **kw)
