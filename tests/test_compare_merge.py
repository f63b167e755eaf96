"""``compare-merge``: parts of one experiment split by seed join into the comparison a single run
gives; parts of different experiments, or that disagree on a shared result, are refused."""

import json

import pytest
from test_compare import setup  # noqa: F401  (fixture)

from trim_select.comparison import compare
from trim_select.comparison.merge import MergeError, merge_compares
from trim_select.evaluation import evaluation_recipe
from trim_select.evaluation.stats import read_rows, write_rows


def flat(means):
    return {(m, k): v for m, by in means.items() for k, v in by.items()}


def test_parts_split_by_seed_join_into_the_comparison_of_one_run(tmp_path, setup):  # noqa: F811
    dirs, pool, kw = setup
    kw = {k: v for k, v in kw.items() if k != "seeds"}  # steps enough for the fine-tunes to move the loss
    kw["recipe"] = evaluation_recipe("cpu", epochs=2, batch_size=1, lora_r=4, lora_alpha=8, lr=5e-3, dtype="float32")
    whole = compare(dirs[:1], pool, "4", ["bm25", "random"], tmp_path / "whole", seeds=[0, 1], **kw)
    compare(dirs[:1], pool, "4", ["bm25", "random"], tmp_path / "s0", seeds=[0], **kw)
    compare(dirs[:1], pool, "4", ["bm25", "random"], tmp_path / "s1", seeds=[1], baseline=False, **kw)
    joined = merge_compares([tmp_path / "s0", tmp_path / "s1"], tmp_path / "joined")
    a, b = whole["tasks"]["quiz"], joined["tasks"]["quiz"]
    assert joined["seeds"] == [0, 1] and b["methods"]["random"]["seeds_done"] == [0, 1]
    assert b["methods"]["random"]["data_digests"] == a["methods"]["random"]["data_digests"]
    assert flat(b["means"]) == pytest.approx(flat(a["means"]))
    pa, pb = a["paired"]["pairs"]["answer_nll"], b["paired"]["pairs"]["answer_nll"]
    assert [(p["a"], p["b"], p["seeds"]) for p in pa] == [(p["a"], p["b"], p["seeds"]) for p in pb]
    assert [p["mean_diff"] for p in pb] == pytest.approx([p["mean_diff"] for p in pa], abs=1e-12)
    assert any(p["mean_diff"] != 0 for p in pa)  # the fine-tunes moved the loss: the check has teeth
    assert [p["low"] for p in pb] == pytest.approx([p["low"] for p in pa])
    md = (tmp_path / "joined" / "compare.md").read_text()
    assert len(joined["merge"]["parts"]) == 2 and "| base | random | 0,1 |" in md
    again = merge_compares([tmp_path / "s0", tmp_path / "whole"], tmp_path / "again")  # seed 0 in both parts
    assert again["merge"]["tasks"]["quiz"]["duplicate_rows"] > 0
    assert flat(again["tasks"]["quiz"]["means"]) == pytest.approx(flat(a["means"]))


def test_parts_of_different_experiments_or_disagreeing_rows_are_refused(tmp_path, setup):  # noqa: F811
    dirs, pool, kw = setup
    kw = {k: v for k, v in kw.items() if k != "seeds"}
    compare(dirs[:1], pool, "4", ["bm25"], tmp_path / "s0", seeds=[0], **kw)
    compare(dirs[:1], pool, "3", ["bm25"], tmp_path / "b3", seeds=[1], **kw)
    with pytest.raises(MergeError, match="budget differs"):
        merge_compares([tmp_path / "s0", tmp_path / "b3"], tmp_path / "x")
    edited = tmp_path / "edited"  # same experiment, but one shared row's answer NLL disagrees
    (edited / "rows").mkdir(parents=True)
    (edited / "compare.json").write_text((tmp_path / "s0" / "compare.json").read_text())
    rows = read_rows(tmp_path / "s0" / "rows" / "quiz.jsonl.gz")
    rows[-1] = {**rows[-1], "answer_nll": rows[-1]["answer_nll"] + 0.01}
    write_rows(edited / "rows" / "quiz.jsonl.gz", rows)
    with pytest.raises(MergeError, match="answer_nll .* tolerance"):
        merge_compares([tmp_path / "s0", edited], tmp_path / "x")
    summary = json.loads((edited / "compare.json").read_text())
    summary["tasks"]["quiz"]["identity"]["xxh3_128"] = "0" * 32  # the task's content changed
    (edited / "compare.json").write_text(json.dumps(summary))
    with pytest.raises(MergeError, match="content digest"):
        merge_compares([tmp_path / "s0", edited], tmp_path / "x")
    summary["tasks"]["quiz"]["identity"] = None  # unrecorded: the other checks still apply
    summary["precision"]["eval_dtype"] = "torch.bfloat16"  # 'auto' resolved on a CPU with AVX512-BF16
    (edited / "compare.json").write_text(json.dumps(summary))
    with pytest.raises(MergeError, match="precision.eval_dtype differs"):
        merge_compares([tmp_path / "s0", edited], tmp_path / "x")
    del summary["precision"]
    (edited / "compare.json").write_text(json.dumps(summary))
    with pytest.raises(MergeError, match="records no 'precision'"):
        merge_compares([tmp_path / "s0", edited], tmp_path / "x")
    with pytest.raises(MergeError, match="at least two"):
        merge_compares([tmp_path / "s0"], tmp_path / "x")


def test_the_cli_runs_parts_by_seed_joins_them_and_names_a_folder_that_is_not_a_compare_output(
        tmp_path, setup, tiny_dir):  # noqa: F811
    from typer.testing import CliRunner

    from trim_select.cli import app

    dirs, pool, _ = setup
    common = ["compare", "--task", str(dirs[0]), "--pool", str(pool), "--budget", "4", "--methods", "bm25",
              "--model", str(tiny_dir), "--device", "cpu", "--dtype", "float32", "--train-dtype", "float32",
              "--epochs", "1", "--batch-size", "1", "--lora-r", "4", "--lora-alpha", "8", "--no-generate",
              "--max-new-tokens", "8", "--quiet"]
    for s, extra in ((0, []), (1, ["--no-baseline"]), (2, ["--seed", "0"])):
        res = CliRunner().invoke(app, [*common, "--out", str(tmp_path / f"s{s}"), "--seed", str(s % 2), *extra])
        assert res.exit_code == (0 if s < 2 else 2), res.output
    assert "distinct seeds" in res.output  # --seed 0 --seed 0
    assert json.loads((tmp_path / "s1" / "compare.json").read_text())["seeds"] == [1]
    res = CliRunner().invoke(app, ["compare-merge", str(tmp_path / "s0"), str(tmp_path / "s1"),
                                   "--out", str(tmp_path / "joined")])
    assert res.exit_code == 0, res.output
    assert "| bm25 | 2 |" in res.output and (tmp_path / "joined" / "rows" / "quiz.jsonl.gz").exists()
    res = CliRunner().invoke(app, ["compare-merge", str(tmp_path / "s0"), str(tmp_path), "--out", str(tmp_path / "x")])
    assert res.exit_code != 0 and "no compare.json" in res.output
