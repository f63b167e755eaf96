"""`trim-select select` with several target sets: one pool pass, per-target folders identical to
single-target runs, resume, folders of targets, per-target budgets, refusals (tiny model)."""

import json
import os
import subprocess
import sys

import pyarrow.parquet as pq
import pytest
from test_cli import ROWS, TARGETS
from typer.testing import CliRunner

from trim_select.cli import app
from trim_select.engines.faults import FAULT_AFTER_ENV, FAULT_EXIT_CODE
from trim_select.scoring import Scorer

OTHER = [
    {"messages": [{"role": "user", "content": "Translate to French number 3: Good morning, how are you?"},
                  {"role": "assistant", "content": "Bonjour, comment allez-vous?"}]},
]
OUTPUTS = ("scores.parquet", "coreset.jsonl", "fingerprints.safetensors", "run.json")


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture()
def sets(tmp_path):
    pool = tmp_path / "pool.jsonl"
    pool.write_text("".join(json.dumps(r, separators=(", ", ":  ")) + "\n" for r in ROWS))
    folder = tmp_path / "targets"
    folder.mkdir()
    (folder / "gsm.jsonl").write_text("".join(json.dumps(r) + "\n" for r in TARGETS))
    (folder / "french.jsonl").write_text("".join(json.dumps(r) + "\n" for r in OTHER))
    return pool, folder


def common(tiny_dir):
    return ("--model", tiny_dir, "--dtype", "float32", "--chunk-size", "5", "--quiet")


def single(tiny_dir, pool, targets, budget, out):
    res = invoke("select", "--pool", pool, "--targets", targets, "--budget", budget, "--out", out,
                 *common(tiny_dir))
    assert res.exit_code == 0, res.output


def assert_same_as_single(multi_dir, single_dir):
    assert (multi_dir / "coreset.jsonl").read_bytes() == (single_dir / "coreset.jsonl").read_bytes()
    assert pq.read_table(multi_dir / "scores.parquet").equals(pq.read_table(single_dir / "scores.parquet"))


def test_two_target_sets_give_each_target_its_single_target_outputs_from_one_forward_per_batch(
        tiny_dir, sets, tmp_path, monkeypatch):
    pool, folder = sets
    calls = []
    original = Scorer.forward_hidden
    monkeypatch.setattr(Scorer, "forward_hidden", lambda self, batch: calls.append(1) or original(self, batch))
    out = tmp_path / "multi"
    res = invoke("select", "--pool", pool, "--targets", folder / "gsm.jsonl", "--targets",
                 folder / "french.jsonl", "--budget", "25%", "--out", out, *common(tiny_dir))
    assert res.exit_code == 0, res.output
    multi_calls = len(calls)
    calls.clear()
    single(tiny_dir, pool, folder / "gsm.jsonl", "25%", tmp_path / "gsm")
    assert multi_calls == len(calls) > 0  # one pool pass for both targets, not two
    single(tiny_dir, pool, folder / "french.jsonl", "25%", tmp_path / "french")
    for name in ("gsm", "french"):
        assert all((out / name / f).exists() for f in OUTPUTS)
        assert_same_as_single(out / name, tmp_path / name)
    assert (out / "gsm" / "coreset.jsonl").read_bytes() != (out / "french" / "coreset.jsonl").read_bytes()
    top = json.loads((out / "run.json").read_text())
    assert set(top["targets"]) == {"gsm", "french"} and top["targets"]["gsm"]["folder"] == "gsm"
    assert top["cost"]["pool_passes"] == 1 and top["cost"]["forward_passes"] == len(ROWS) + len(TARGETS) + 1
    sub = json.loads((out / "french" / "run.json").read_text())
    assert sub["counts"]["selected"] == 6 and sub["targets"]["path"].endswith("french.jsonl")


def test_a_folder_of_targets_with_per_target_budgets(tiny_dir, sets, tmp_path):
    pool, folder = sets
    out = tmp_path / "multi"
    res = invoke("select", "--pool", pool, "--targets", folder, "--budget", "gsm=3", "--budget", "french=50%",
                 "--out", out, *common(tiny_dir))
    assert res.exit_code == 0, res.output
    assert len((out / "gsm" / "coreset.jsonl").read_bytes().splitlines()) == 3
    assert len((out / "french" / "coreset.jsonl").read_bytes().splitlines()) == 12
    single(tiny_dir, pool, folder / "gsm.jsonl", "3", tmp_path / "gsm")
    assert_same_as_single(out / "gsm", tmp_path / "gsm")
    # `report OUT` of a several-targets folder reports each target's coreset
    res = invoke("report", out, "--out", tmp_path / "report", "--no-token-view")
    assert res.exit_code == 0, res.output
    summary = json.loads((tmp_path / "report" / "summary.json").read_text())
    assert sorted(r["dir"].rsplit("/", 1)[-1] for r in summary["runs"]) == ["french", "gsm"]


def test_resume_after_a_killed_run_gives_identical_outputs(tiny_dir, sets, tmp_path):
    pool, folder = sets
    args = [sys.executable, "-m", "trim_select.cli", "select", "--pool", str(pool), "--targets", str(folder),
            "--budget", "5", "--out", str(tmp_path / "multi"), *map(str, common(tiny_dir))]
    env = {**os.environ, FAULT_AFTER_ENV: "3"}  # dies after chunk 0 of both targets and chunk 1 of one
    died = subprocess.run(args, env=env, capture_output=True, text=True)
    assert died.returncode == FAULT_EXIT_CODE, died.stderr
    parts = {n: sorted(p.name for p in (tmp_path / "multi" / n / "parts").glob("part-*")) for n in ("french", "gsm")}
    assert sorted(map(len, parts.values())) == [1, 2]
    done = subprocess.run(args, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    for name in ("gsm", "french"):
        single(tiny_dir, pool, folder / f"{name}.jsonl", "5", tmp_path / name)
        assert_same_as_single(tmp_path / "multi" / name, tmp_path / name)


def test_two_target_files_with_one_name_are_refused(tiny_dir, sets, tmp_path):
    pool, folder = sets
    other = tmp_path / "elsewhere"
    other.mkdir()
    (other / "gsm.jsonl").write_text((folder / "gsm.jsonl").read_text())
    res = CliRunner().invoke(app, [str(a) for a in ("select", "--pool", pool, "--targets", folder / "gsm.jsonl",
                                                    "--targets", other / "gsm.jsonl", "--budget", "5",
                                                    "--out", tmp_path / "o", *common(tiny_dir))])
    assert res.exit_code != 0 and "two target sets are named 'gsm'" in res.output
    assert not (tmp_path / "o" / "gsm").exists()


def test_budgets_must_name_every_target_set(tiny_dir, sets, tmp_path):
    pool, folder = sets
    res = CliRunner().invoke(app, [str(a) for a in ("select", "--pool", pool, "--targets", folder, "--budget",
                                                    "gsm=5", "--out", tmp_path / "o", *common(tiny_dir))])
    assert res.exit_code != 0 and "no budget for target sets ['french']" in res.output


def test_target_sets_named_on_the_command_line_when_file_stems_collide(tiny_dir, sets, tmp_path):
    pool, folder = sets
    for task, rows in (("gsm", TARGETS), ("french", OTHER)):
        (tmp_path / task).mkdir()
        (tmp_path / task / "dev.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "multi"
    res = invoke("select", "--pool", pool, "--targets", f"gsm={tmp_path / 'gsm' / 'dev.jsonl'}", "--targets",
                 f"french={tmp_path / 'french' / 'dev.jsonl'}", "--budget", "4", "--out", out, *common(tiny_dir))
    assert res.exit_code == 0, res.output
    single(tiny_dir, pool, folder / "french.jsonl", "4", tmp_path / "single")
    assert_same_as_single(out / "french", tmp_path / "single")
    assert (out / "gsm" / "coreset.jsonl").exists()
