"""``trim-select warmup`` and ``trim-select run`` end to end on the tiny model (Algorithm 3 of the paper)."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

import trim_select.training.lora as lora
import trim_select.training.trl_sft as trl_sft
import trim_select.warmup as wu
from trim_select.cli import app
from trim_select.testing import CORPUS

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

WARM = ["--fraction", "0.5", "--epochs", "2", "--batch-size", "4", "--lora-r", "4", "--lora-alpha", "8",
        "--lr", "1e-2", "--quiet"]


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _conv(rid, user, assistant):
    msgs = [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
    return {"id": rid, "messages": msgs}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("pipe")
    rows = [_conv(f"p{i}", CORPUS[i % 12], CORPUS[(i * 5 + 1) % 12]) for i in range(24)]
    pool = _write(d / "pool.jsonl", rows)
    t1 = _write(d / "t1.jsonl", [_conv(f"a{i}", CORPUS[i], CORPUS[i + 3]) for i in range(3)])
    t2 = _write(d / "t2.jsonl", [_conv(f"b{i}", CORPUS[i + 6], CORPUS[i + 8]) for i in range(3)])
    return pool, t1, t2


def _invoke(*args):
    res = CliRunner().invoke(app, [str(a) for a in args])
    assert res.exit_code == 0, res.output + repr(res.exception)
    return res


def test_run_end_to_end_warms_up_scores_with_the_adapter_and_records_the_warmup(tiny_dir, data, tmp_path):
    pool, t1, _ = data
    out = tmp_path / "out"
    _invoke("run", "--pool", pool, "--targets", t1, "--budget", "25%", "--out", out, "--model", tiny_dir,
            *WARM)
    assert len((out / "coreset.jsonl").read_text().splitlines()) == 6
    report = json.loads((out / "run.json").read_text())
    warm = json.loads((out / "warmup" / "warmup.json").read_text())
    assert report["command"] == "run"
    assert report["model"]["path"] == str(out / "warmup" / "final")  # scored with the warmed adapter
    w = report["warmup"]
    assert w["subset_ids"] == warm["subset"]["ids"] and len(w["subset_ids"]) == 12
    assert w["recipe"]["lr"] == 1e-2 and w["recipe"]["lora_r"] == 4
    assert len(w["losses"]) == 6 and w["seconds"] > 0 and w["tokens_per_s"] > 0
    run_dir = out / "runs"
    assert [p.name for p in run_dir.iterdir()] == [report["run_dir"].rsplit("/", 1)[-1]]
    assert (out / "coreset.jsonl").read_bytes() == (run_dir / report["run_dir"].rsplit("/", 1)[-1] /
                                                    "coreset.jsonl").read_bytes()


def test_rerun_with_new_targets_or_budget_skips_the_warmup(tiny_dir, data, tmp_path, monkeypatch):
    pool, t1, t2 = data
    out = tmp_path / "out"
    _invoke("run", "--pool", pool, "--targets", t1, "--budget", "4", "--out", out, "--model", tiny_dir, *WARM)
    first = json.loads((out / "run.json").read_text())
    adapter = out / "warmup" / "final" / "adapter_model.safetensors"
    mtime = adapter.stat().st_mtime_ns

    def no_training(*a, **k):
        raise AssertionError("warmup retrained")

    monkeypatch.setattr(wu, "fine_tune", no_training)
    _invoke("run", "--pool", pool, "--targets", t2, "--budget", "4", "--out", out, "--model", tiny_dir, *WARM)
    second = json.loads((out / "run.json").read_text())
    assert second["warmup"]["cached"] and not first["warmup"]["cached"]
    assert second["run_dir"] != first["run_dir"]  # per-target-set outputs side by side
    assert adapter.stat().st_mtime_ns == mtime
    assert second["warmup"]["subset_ids"] == first["warmup"]["subset_ids"]

    # a new budget for the first targets reuses its Stage II parts and only reselects
    parts = sorted((out / "runs").glob("*/parts/part-*.parquet"))
    stamps = {p: p.stat().st_mtime_ns for p in parts}
    _invoke("run", "--pool", pool, "--targets", t1, "--budget", "2", "--out", out, "--model", tiny_dir, *WARM)
    third = json.loads((out / "run.json").read_text())
    assert third["run_dir"] == first["run_dir"] and third["counts"]["selected"] == 2
    assert {p: p.stat().st_mtime_ns for p in parts} == stamps
    assert len((out / "coreset.jsonl").read_text().splitlines()) == 2


def test_run_continues_an_interrupted_warmup(tiny_dir, data, tmp_path, monkeypatch):
    pool, t1, _ = data
    out = tmp_path / "out"
    recipe = lora.LoraRecipe(lr=1e-2, epochs=2, batch_size=4, lora_r=4, lora_alpha=8)

    class Crash(Exception):
        pass

    def crash(step, _rec):
        if step == 4:
            raise Crash

    with pytest.raises(Crash):  # what `run` would have trained, killed after step 4 (checkpoint at 3)
        wu.warmup(pool, out / "warmup", str(tiny_dir), 0.5, 0, recipe, progress=False, on_step=crash)
    saved: list[str] = []
    real = lora.save_checkpoint
    for trainer in (lora, trl_sft):  # whichever trainer the recipe names
        monkeypatch.setattr(trainer, "save_checkpoint", lambda dest, *a: (saved.append(dest.name), real(dest, *a)))
    _invoke("run", "--pool", pool, "--targets", t1, "--budget", "4", "--out", out, "--model", tiny_dir, *WARM)
    assert saved == ["step-000006"]  # resumed from step-000003: only the second epoch was trained
    report = json.loads((out / "run.json").read_text())
    assert len(report["warmup"]["losses"]) == 6


def test_checkpoints_all_combines_scores_weighted_by_learning_rate(tiny_dir, data, tmp_path):
    pool, t1, _ = data
    out = tmp_path / "out"
    _invoke("run", "--pool", pool, "--targets", t1, "--budget", "4", "--out", out, "--model", tiny_dir,
            "--checkpoints", "all", *WARM)
    report = json.loads((out / "run.json").read_text())
    ckpts = report["checkpoints"]
    assert [c["name"] for c in ckpts] == ["step-000003", "step-000006"]
    lrs = np.array([json.loads((out / "warmup" / "checkpoints" / c["name"] / "state.json").read_text())
                    ["learning_rate"] for c in ckpts])
    weights = np.array([c["weight"] for c in ckpts])
    np.testing.assert_allclose(weights, lrs / lrs.sum())
    assert weights[0] > weights[1]  # linear decay: the earlier epoch had the higher learning rate
    run_dir = out / "runs" / report["run_dir"].rsplit("/", 1)[-1]
    per = [pq.read_table(run_dir / "ckpt" / c["name"] / "scores.parquet").column("score").to_numpy()
           for c in ckpts]
    assert not np.allclose(per[0], per[1])  # the checkpoints really differ
    combined = pq.read_table(out / "scores.parquet").column("score").to_numpy()
    np.testing.assert_allclose(combined, weights[0] * per[0] + weights[1] * per[1], rtol=1e-12)
    chosen = [json.loads(line)["id"] for line in (out / "coreset.jsonl").read_text().splitlines()]
    order = np.lexsort((np.arange(len(combined)), -combined))[:4]
    assert chosen == [f"p{i}" for i in order]


def test_no_warmup_scores_with_the_base_model_like_select(tiny_dir, data, tmp_path):
    pool, t1, _ = data
    _invoke("run", "--pool", pool, "--targets", t1, "--budget", "4", "--out", tmp_path / "run", "--model",
            tiny_dir, "--no-warmup", "--quiet")
    _invoke("select", "--pool", pool, "--targets", t1, "--budget", "4", "--out", tmp_path / "sel", "--model",
            tiny_dir, "--quiet")
    assert not (tmp_path / "run" / "warmup").exists()
    coreset = (tmp_path / "run" / "coreset.jsonl").read_bytes()
    assert coreset == (tmp_path / "sel" / "coreset.jsonl").read_bytes()
    assert json.loads((tmp_path / "run" / "run.json").read_text())["warmup"] is None


def test_run_on_two_local_workers_equals_one_process(tiny_dir, data, tmp_path):
    pool, t1, _ = data
    args = ("run", "--pool", pool, "--targets", t1, "--budget", "25%", "--model", tiny_dir, "--chunk-size", "5",
            *WARM)
    _invoke(*args, "--out", tmp_path / "one")
    _invoke(*args, "--out", tmp_path / "two", "--workers", "2")
    assert (tmp_path / "two" / "coreset.jsonl").read_bytes() == (tmp_path / "one" / "coreset.jsonl").read_bytes()
    one, two = (pq.read_table(tmp_path / d / "scores.parquet").to_pandas() for d in ("one", "two"))
    np.testing.assert_array_equal(one["score"].to_numpy(), two["score"].to_numpy())
    report = json.loads((tmp_path / "two" / "run.json").read_text())
    assert report["distributed"]["workers"] == 2 and report["warmup"] is not None


def test_warmup_command_writes_final_adapter_and_reports_cache(tiny_dir, data, tmp_path):
    pool, _, _ = data
    args = ["warmup", "--pool", pool, "--out", tmp_path / "w", "--model", tiny_dir, *WARM]
    first = _invoke(*args)
    assert "warmup done" in first.output
    assert (tmp_path / "w" / "final" / "adapter_config.json").exists()
    assert "already complete" in _invoke(*args).output
    bad = CliRunner().invoke(app, [str(a) for a in args[:-1]] + ["--lr", "5e-3", "--quiet"])
    assert bad.exit_code == 2 and "different settings" in bad.output


def test_bad_checkpoint_name_is_a_clear_error(tiny_dir, data, tmp_path):
    pool, t1, _ = data
    args = ("run", "--pool", pool, "--targets", t1, "--budget", "4", "--out", tmp_path / "o", "--model",
            tiny_dir, "--checkpoints", "step-42", *WARM)
    res = CliRunner().invoke(app, [str(a) for a in args])
    assert res.exit_code == 2 and "no checkpoint 'step-42'" in res.output


def test_run_with_several_target_sets_warms_up_once_and_equals_select_per_target(tiny_dir, data, tmp_path):
    pool, t1, t2 = data
    out = tmp_path / "out"
    _invoke("run", "--pool", pool, "--targets", f"a={t1}", "--targets", f"b={t2}", "--budget", "a=25%",
            "--budget", "b=3", "--out", out, "--model", tiny_dir, "--dtype", "float32", *WARM)
    assert (out / "warmup" / "warmup.json").exists() and not (out / "runs").exists()
    top = json.loads((out / "targets" / "run.json").read_text())
    assert sorted(top["targets"]) == ["a", "b"] and top["cost"]["pool_passes"] == 1
    for name, targets, budget in (("a", t1, "25%"), ("b", t2, "3")):
        one = tmp_path / f"one-{name}"
        _invoke("select", "--pool", pool, "--targets", targets, "--budget", budget, "--out", one,
                "--model", out / "warmup" / "final", "--dtype", "float32", "--quiet")
        assert (out / "targets" / name / "coreset.jsonl").read_bytes() == (one / "coreset.jsonl").read_bytes()
        got = pq.read_table(out / "targets" / name / "scores.parquet").column("score").to_numpy()
        np.testing.assert_array_equal(got, pq.read_table(one / "scores.parquet").column("score").to_numpy())
        run = json.loads((out / "targets" / name / "run.json").read_text())
        assert run["command"] == "run" and run["warmup"]["dir"] == str(out / "warmup")
    stamp = (out / "warmup" / "warmup.json").stat().st_mtime_ns
    _invoke("run", "--pool", pool, "--targets", f"a={t1}", "--targets", f"b={t2}", "--budget", "a=25%",
            "--budget", "b=3", "--out", out, "--model", tiny_dir, "--dtype", "float32", *WARM)
    assert (out / "warmup" / "warmup.json").stat().st_mtime_ns == stamp  # the warmup is reused
