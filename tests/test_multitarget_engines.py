"""Several target sets in one pool pass on the local, shard and Ray engines (issue 13): each
``OUT/<name>/`` is byte-identical to the single-target run of ``name`` on the same engine, a killed
run resumes (a chunk missing in any target is rescored there only), and every ``run.json`` carries
its own Stage I seconds and the shared Stage II seconds (tiny model on CPU)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import test_distributed
from test_distributed import COMMON, EXAMPLES, cli, part_stamps, selector
from typer.testing import CliRunner

from trim_select.cli import app
from trim_select.engines import dispatch as dist
from trim_select.engines.multi import MULTI_PLAN_FILE, target_sets

NAMES = ("gsm", "social_iqa")
OUTPUTS = ("fingerprints.safetensors", "scores.parquet", "coreset.jsonl", "run.json")
pool, ray_session = test_distributed.pool, test_distributed.ray_session  # fixtures: 6 chunks of 8, one Ray session


@pytest.fixture(scope="module")
def sets(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("targets")
    for name in NAMES:
        shutil.copy(EXAMPLES / f"targets-{name}.jsonl", folder / f"{name}.jsonl")
    return folder


def select(pool: Path, targets: Path, out: Path, tiny_dir: Path, *extra: str) -> str:
    return cli("select", "--pool", pool, "--targets", targets, "--budget", "25%", "--out", out,
               "--model", tiny_dir, *COMMON, *extra)


def assert_byte_identical(multi: Path, single: Path) -> None:
    for name in ("coreset.jsonl", "scores.parquet"):
        assert (multi / name).read_bytes() == (single / name).read_bytes(), f"{multi / name} differs from {single}"
    got, want = (json.loads((d / "run.json").read_text()) for d in (multi, single))
    assert got["counts"] == want["counts"] and got["fingerprints"]["targets"] == want["fingerprints"]["targets"]


def assert_multi_layout(out: Path) -> dict:
    top = json.loads((out / "run.json").read_text())
    assert set(top["targets"]) == set(NAMES) and top["cost"]["pool_passes"] == 1
    for name in NAMES:
        assert all((out / name / f).exists() for f in OUTPUTS), name
        assert top["targets"][name]["folder"] == name
    return top


def assert_timings(out: Path, top: dict) -> None:
    """Each target: its own Stage I seconds, the shared Stage II seconds; the top: the pass once."""
    subs = {n: json.loads((out / n / "run.json").read_text()) for n in NAMES}
    stage1 = {n: r["timings_s"]["stage1_fingerprints"] for n, r in subs.items()}
    assert all(s > 0 for s in stage1.values())
    assert top["timings_s"]["stage1_fingerprints"] == pytest.approx(sum(stage1.values()), abs=2e-3)
    assert {n: top["targets"][n]["stage1_seconds"] for n in NAMES} == stage1
    stage2 = {r["timings_s"]["stage2_scoring"] for r in subs.values()}
    assert stage2 == {top["timings_s"]["stage2_scoring"]} and top["timings_s"]["stage2_scoring"] > 0
    for r in subs.values():
        assert r["cost"]["stage2_seconds_all_runs"] > 0 and r["cost"]["wall_seconds"] == r["timings_s"]["total"]
        own = sum(v for k, v in r["timings_s"].items() if k != "total")
        assert r["timings_s"]["total"] == pytest.approx(own, abs=2e-3)  # not the other target's Stage I
    assert top["cost"]["stage2_seconds_all_runs"] == max(r["cost"]["stage2_seconds_all_runs"] for r in subs.values())


def test_in_process_run_json_records_per_target_stage1_and_the_shared_stage2_once(tmp_path, tiny_dir, pool, sets):
    out = tmp_path / "multi"
    select(pool, sets, out, tiny_dir)
    assert_timings(out, assert_multi_layout(out))


def test_local_workers_give_each_target_its_single_target_local_run(tmp_path, tiny_dir, pool, sets):
    out = tmp_path / "multi"
    select(pool, sets, out, tiny_dir, "--workers", "2")
    top = assert_multi_layout(out)
    assert_timings(out, top)
    for name in NAMES:
        select(pool, sets / f"{name}.jsonl", tmp_path / name, tiny_dir, "--workers", "2")
        assert_byte_identical(out / name, tmp_path / name)
        assert json.loads((out / name / "run.json").read_text())["distributed"]["workers"] == 2
    assert (out / "gsm" / "coreset.jsonl").read_bytes() != (out / "social_iqa" / "coreset.jsonl").read_bytes()


def test_killed_local_workers_resume_scoring_only_chunks_missing_in_some_target(
        tmp_path, tiny_dir, pool, sets, monkeypatch):
    out, targets = tmp_path / "killed", target_sets([sets])
    budgets = dict.fromkeys(NAMES, "25%")
    monkeypatch.setenv(dist.FAULT_AFTER_ENV, "1")  # each worker dies after its first part (of the first target)
    with pytest.raises(RuntimeError, match="exit code 17.*rerun the same command"):
        dist.run_many(selector(tiny_dir), pool, out, budgets, targets, workers=2)
    before = {n: part_stamps(out / n) for n in NAMES}
    assert 1 <= len(before["gsm"]) <= 2 and not before["social_iqa"]  # chunks missing in one target only
    monkeypatch.delenv(dist.FAULT_AFTER_ENV)
    dist.run_many(selector(tiny_dir), pool, out, budgets, targets, workers=2)
    after = part_stamps(out / "gsm")
    assert {k: after[k] for k in before["gsm"]} == before["gsm"]  # not rewritten where present
    for name in NAMES:
        select(pool, sets / f"{name}.jsonl", tmp_path / name, tiny_dir)  # == the local engine (test_distributed)
        assert_byte_identical(out / name, tmp_path / name)


def test_shards_of_several_target_sets_then_merge_equal_single_target_shards(tmp_path, tiny_dir, pool, sets):
    out = tmp_path / "sharded"
    select(pool, sets, out, tiny_dir, "--shard", "0/2")
    assert sorted(part_stamps(out / "gsm")) == sorted(part_stamps(out / "social_iqa")) == [
        f"part-{k:06d}.parquet" for k in (0, 2, 4)]
    res = CliRunner().invoke(app, ["merge", str(out)])
    assert res.exit_code == 2 and "chunk 1, 3, 5" in res.output and "--shard 1/2" in res.output
    select(pool, sets, out, tiny_dir, "--shard", "1/2")
    cli("merge", out)  # the budgets recorded by the shard jobs (OUT/targets.json)
    assert json.loads((out / MULTI_PLAN_FILE).read_text())["budgets"] == dict.fromkeys(NAMES, "25%")
    assert_multi_layout(out)
    for name in NAMES:
        single = tmp_path / name
        for shard in ("0/2", "1/2"):
            select(pool, sets / f"{name}.jsonl", single, tiny_dir, "--shard", shard)
        cli("merge", single)
        assert_byte_identical(out / name, single)
    cli("merge", out, "--budget", "gsm=3,social_iqa=5")  # per-target budgets at merge time
    assert [len((out / n / "coreset.jsonl").read_text().splitlines()) for n in NAMES] == [3, 5]


def test_run_with_several_target_sets_takes_the_local_engine(tmp_path, tiny_dir, pool, sets):
    out = tmp_path / "run"
    cli("run", "--pool", pool, "--targets", sets, "--budget", "25%", "--out", out, "--model", tiny_dir,
        "--no-warmup", "--workers", "2", *COMMON)
    assert_multi_layout(out / "targets")
    for name in NAMES:
        sub = json.loads((out / "targets" / name / "run.json").read_text())
        assert sub["command"] == "run" and sub["distributed"]["workers"] == 2
        select(pool, sets / f"{name}.jsonl", tmp_path / name, tiny_dir, "--workers", "2")
        assert_byte_identical(out / "targets" / name, tmp_path / name)


def test_several_target_sets_refuse_a_shard_job_on_another_engine(tmp_path, tiny_dir, pool, sets):
    res = CliRunner().invoke(app, [str(a) for a in ("select", "--pool", pool, "--targets", sets, "--budget", "5",
                                                    "--out", tmp_path / "o", "--model", tiny_dir, *COMMON,
                                                    "--shard", "0/2", "--engine", "ray")])
    assert res.exit_code != 0 and "--shard runs one process" in res.output
    assert not (tmp_path / "o" / "gsm").exists()


# --------------------------------------------------------------------------------------------
# Ray (not niced: Ray starves when niced)
# --------------------------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_ray_gives_each_target_its_single_target_ray_run_and_resumes_chunks_missing_in_one_target(
        tmp_path, tiny_dir, pool, sets, ray_session, monkeypatch):
    out, targets = tmp_path / "ray", target_sets([sets])
    budgets = dict.fromkeys(NAMES, "25%")
    monkeypatch.setenv(dist.FAULT_AFTER_ENV, "1")  # an actor dies after its first part; Ray restarts it
    monkeypatch.setenv(dist.FAULT_ONCE_ENV, str(tmp_path / "fault-fired"))
    top = dist.run_many(selector(tiny_dir), pool, out, budgets, targets, engine="ray", workers=2)
    assert (tmp_path / "fault-fired").exists()
    monkeypatch.delenv(dist.FAULT_AFTER_ENV)
    assert_timings(out, assert_multi_layout(out))
    for name in NAMES:
        dist.run(selector(tiny_dir), pool, tmp_path / name, "25%", engine="ray", workers=2,
                 targets=targets[name])
        assert_byte_identical(out / name, tmp_path / name)
    # a driver killed mid-run: chunk 1 is missing in gsm only, chunk 4 in social_iqa only
    dist.part_path(out / "gsm", 1).unlink()
    dist.part_path(out / "social_iqa", 4).unlink()
    kept = {n: part_stamps(out / n) for n in NAMES}
    top = dist.run_many(selector(tiny_dir), pool, out, budgets, targets, engine="ray", workers=2)
    sub = json.loads((out / "gsm" / "run.json").read_text())
    assert sub["distributed"]["chunks_scored"] == 2 and sub["distributed"]["actors"] == 2
    for name in NAMES:
        assert {k: v for k, v in part_stamps(out / name).items() if k in kept[name]} == kept[name]
        assert_byte_identical(out / name, tmp_path / name)
    assert top["cost"]["pool_passes"] == 1


def test_local_workers_with_a_hidden_layer_and_generic_rows_match_single_target_runs(tmp_path, tiny_dir, pool,
                                                                                      sets):
    ext = ("--hidden-layer", "1", "--generic-rows", "3")
    out = tmp_path / "multi"
    select(pool, sets, out, tiny_dir, "--workers", "2", *ext)
    assert_multi_layout(out)
    for name in NAMES:
        single = tmp_path / name
        select(pool, sets / f"{name}.jsonl", single, tiny_dir, "--workers", "2", *ext)
        assert_byte_identical(out / name, single)
        assert json.loads((out / name / "run.json").read_text())["generic"]["rows"] == 3
