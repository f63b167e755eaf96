"""Resume and caches never reuse results of a changed file; output folders are locked (issue 14).

The rule: a rerun whose pool or targets file has another content digest (xxh3-128) than the one the
folder's results came from stops with InputChangedError naming the file and --overwrite."""

import gzip
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from trim_select.cli import app
from trim_select.io import InputChangedError, content_digest, file_identity
from trim_select.locking import LOCK_NAME, FolderLockedError, folder_lock, shard_lock_name
from trim_select.selector import TrimSelector

ROWS = [{"id": f"r{i}", "prompt": f"How many clips did Natalia sell {i} times?",
         "response": f"She sold {i * 7 % 90 + 10} clips. #### {i * 7 % 90 + 10}"} for i in range(12)]
TARGET = {"prompt": "How many clips did Natalia sell?", "response": "72 clips. #### 72"}


def _write(rows: list[dict], path: Path, fmt: str) -> Path:
    lines = "".join(json.dumps(r) + "\n" for r in rows).encode()
    if fmt == "jsonl":
        path = path.with_suffix(".jsonl")
        path.write_bytes(lines)
    elif fmt == "jsonl.gz":
        path = path.with_suffix(".jsonl.gz")
        path.write_bytes(gzip.compress(lines, mtime=0))
    elif fmt == "parquet":
        path = path.with_suffix(".parquet")
        pq.write_table(pa.Table.from_pylist(rows), path)
    else:
        import datasets

        datasets.Dataset.from_list(rows).save_to_disk(str(path))
    return path


def _edit(rows: list[dict], how: str) -> list[dict]:
    rows = [dict(r) for r in rows]
    if how == "swap":
        rows[2], rows[3] = rows[3], rows[2]
    else:  # same-size typo in one row
        rows[4]["response"] = rows[4]["response"].replace("clips", "clipz")
    return rows


def _selected(tmp: Path, model: Path) -> tuple[Path, Path, Path, list[str]]:
    """Pool, targets, OUT and the ``trim-select select`` arguments (tiny model, chunks of 4 rows, so
    several part files) after one successful run."""
    pool, targets = _files(tmp)
    out = tmp / "out"
    args = [str(a) for a in ["select", "--pool", pool, "--targets", targets, "--budget", "3", "--out", out,
                             "--model", model, "--dtype", "float32", "--chunk-size", "4", "--quiet"]]
    run = CliRunner().invoke(app, args)
    assert run.exit_code == 0, run.output
    return pool, targets, out, args


def _files(tmp: Path, fmt: str = "jsonl") -> tuple[Path, Path]:
    targets = tmp / "targets.jsonl"
    targets.write_text(json.dumps(TARGET) + "\n")
    return _write(ROWS, tmp / "pool", fmt), targets


def _sel(tiny) -> TrimSelector:
    from trim_select.config import RuntimeConfig

    return TrimSelector(tiny, runtime=RuntimeConfig(chunk_size=4, batch_tokens=256), progress=False)


def test_same_size_edit_changes_the_digest_and_the_digest_is_memoised(tmp_path):
    pool, _ = _files(tmp_path)
    before = file_identity(pool)
    pool.write_bytes(pool.read_bytes().replace(b"Natalia", b"Nata1ia", 1))
    after = file_identity(pool)
    assert after["bytes"] == before["bytes"] and after["xxh3_128"] != before["xxh3_128"]
    folder = _write(ROWS, tmp_path / "ds", "folder")
    d = content_digest(folder)
    assert content_digest(folder) == d
    (folder / "extra.txt").write_text("x")
    assert content_digest(folder) != d  # every file of a save_to_disk folder counts, names included


def test_worker_reuses_the_drivers_digest_only_while_the_file_is_unchanged(tmp_path):
    from trim_select.io import digest_entry, remember_digest

    pool = _write(ROWS, tmp_path / "pool", "jsonl")
    sig, digest = digest_entry(pool)
    assert digest == content_digest(pool)
    remember_digest((list(sig), "f" * 32))  # as a spawned worker gets it (pickled), here with a marker digest
    assert content_digest(pool) == "f" * 32  # taken from the driver: no second hash
    pool.write_text(pool.read_text().replace("clips", "clipz"))  # same size, new content and stat
    assert content_digest(pool) == file_identity(pool)["xxh3_128"] != "f" * 32


@pytest.mark.parametrize("how", ["typo", "swap"])
@pytest.mark.parametrize("fmt", ["jsonl", "jsonl.gz", "parquet", "folder"])
def test_select_refuses_a_pool_edited_in_place_and_recomputes_with_overwrite(tiny, tmp_path, fmt, how):
    pool, targets = _files(tmp_path, fmt)
    out = tmp_path / "out"
    first = _sel(tiny).run(pool, out, 3, targets=targets)
    if pool.is_dir():
        import shutil

        shutil.rmtree(pool)
    pool = _write(_edit(ROWS, how), tmp_path / "pool", fmt)
    if fmt == "jsonl":
        assert pool.stat().st_size == first["pool"]["bytes"]
    with pytest.raises(InputChangedError, match=r"pool file .*pool.* changed .*--overwrite"):
        _sel(tiny).run(pool, out, 3, targets=targets)
    again = _sel(tiny).run(pool, out, 3, targets=targets, overwrite=True)
    assert again["digests"]["scores.parquet"]["pool"] == file_identity(pool)["xxh3_128"]
    assert again["read_stats"]["chunks_computed"] == 3  # every chunk rescored, none reused
    ids = pq.read_table(out / "scores.parquet").column("id").to_pylist()
    assert ids == [r["id"] for r in _edit(ROWS, how)]
    picked = [json.loads(line)["id"] for line in (out / "coreset.jsonl").read_text().splitlines()]
    table = pq.read_table(out / "scores.parquet").to_pandas()
    assert picked == table[table.selected].sort_values("rank")["id"].tolist()


def test_select_cli_refuses_targets_edited_in_place_naming_the_file(tiny_dir, tmp_path):
    _, targets, out, args = _selected(tmp_path, tiny_dir)
    targets.write_text(targets.read_text().replace("Natalia", "Nata1ia"))
    res = CliRunner().invoke(app, [str(a) for a in args])
    assert res.exit_code == 2 and "targets file" in res.output and "--overwrite" in res.output
    res = CliRunner().invoke(app, [str(a) for a in [*args, "--overwrite"]])
    assert res.exit_code == 0, res.output
    run_json = json.loads((out / "run.json").read_text())
    assert run_json["digests"]["fingerprints.safetensors"]["targets"] == file_identity(targets)["xxh3_128"]


def test_score_shards_and_merge_refuse_a_pool_that_changed(tiny_dir, tmp_path):
    pool, targets = _files(tmp_path)
    fp, out = tmp_path / "fp.safetensors", tmp_path / "out"
    common = ["--model", tiny_dir, "--dtype", "float32"]
    inv = CliRunner().invoke
    assert inv(app, [str(a) for a in ["fingerprint", "--targets", targets, "--out", fp, *common]]).exit_code == 0
    score = ["score", "--pool", pool, "--fingerprints", fp, "--out", out, "--chunk-size", "4", "--quiet", *common]
    for i in range(2):
        res = inv(app, [str(a) for a in [*score, "--shard", f"{i}/2"]])
        assert res.exit_code == 0, res.output
    pool.write_text("".join(json.dumps(r) + "\n" for r in _edit(ROWS, "swap")))
    res = inv(app, ["merge", str(out), "--budget", "3"])
    assert res.exit_code == 2 and "pool file" in res.output and "changed" in res.output
    assert not (out / "coreset.jsonl").exists()
    res = inv(app, [str(a) for a in [*score, "--shard", "0/2"]])
    assert res.exit_code == 2 and "pool file" in res.output and "--overwrite" in res.output


def test_baseline_refuses_a_changed_pool(tmp_path):
    from trim_select.baselines import run_baseline

    pool, targets = _files(tmp_path)
    out = tmp_path / "bm25"
    run_baseline("bm25", pool, targets, out, 3, progress=False)
    pool.write_text("".join(json.dumps(r) + "\n" for r in _edit(ROWS, "typo")))
    with pytest.raises(InputChangedError, match="pool file"):
        run_baseline("bm25", pool, targets, out, 3, progress=False)
    report = run_baseline("bm25", pool, targets, out, 3, progress=False, overwrite=True)
    assert report["digests"]["coreset.jsonl"]["pool"] == file_identity(pool)["xxh3_128"]


def test_run_pipeline_refuses_changed_targets_and_pool(tiny_dir, tmp_path):
    from trim_select.config import RuntimeConfig
    from trim_select.pipeline import PipelineConfig, run_pipeline

    pool, targets = _files(tmp_path)
    out = tmp_path / "run"
    kw = {"model": str(tiny_dir), "pipeline": PipelineConfig(use_warmup=False),
          "runtime": RuntimeConfig(chunk_size=4, dtype="float32"), "progress": False}
    run_pipeline(pool, targets, out, 3, **kw)
    targets.write_text(targets.read_text().replace("72", "27"))
    with pytest.raises(InputChangedError, match="targets file"):
        run_pipeline(pool, targets, out, 3, **kw)
    run_pipeline(pool, targets, out, 3, overwrite=True, **kw)
    pool.write_text("".join(json.dumps(r) + "\n" for r in _edit(ROWS, "swap")))
    with pytest.raises(InputChangedError, match="pool file"):
        run_pipeline(pool, targets, out, 3, **kw)


def test_warmup_refuses_a_pool_edited_in_place_and_retrains_with_overwrite(tiny_dir, tmp_path):
    from trim_select.training.lora import LoraRecipe
    from trim_select.warmup import warmup

    pool, _ = _files(tmp_path)
    out = tmp_path / "warmup"
    recipe = LoraRecipe(lr=1e-3, epochs=1, batch_size=2, lora_r=2, lora_alpha=4, device="cpu")
    first = warmup(pool, out, str(tiny_dir), 0.25, 0, recipe, progress=False)
    assert not first.train.cached
    assert warmup(pool, out, str(tiny_dir), 0.25, 0, recipe, progress=False).train.cached  # same content: reused
    edited = [dict(r, response=r["response"].replace("clips", "clipz")) for r in ROWS]  # hits the subset too
    pool.write_text("".join(json.dumps(r) + "\n" for r in edited))
    with pytest.raises(InputChangedError, match="pool file .*pool.jsonl changed .*--overwrite"):
        warmup(pool, out, str(tiny_dir), 0.25, 0, recipe, progress=False)
    again = warmup(pool, out, str(tiny_dir), 0.25, 0, recipe, progress=False, overwrite=True)
    assert not again.train.cached  # retrained on the edited pool, and that warmup is now the cached one
    assert json.loads((out / "warmup.json").read_text())["pool"]["xxh3_128"] == file_identity(pool)["xxh3_128"]


def test_compare_selection_step_refuses_a_changed_pool(tmp_path):
    from trim_select.comparison.selections import run_selection
    from trim_select.config import RuntimeConfig
    from trim_select.evaluation.tasks import load_task

    pool, _ = _files(tmp_path)
    task_dir = tmp_path / "arith"
    task_dir.mkdir()
    rows = [{"id": "m/0", "question": "Natalia sold 48 clips and 24 more. How many?", "answer": "72",
             "solution": "48 + 24 = 72\n#### 72"}]
    (task_dir / "test.jsonl").write_text(json.dumps(rows[0]) + "\n")
    (task_dir / "val.jsonl").write_text(json.dumps(TARGET) + "\n")
    task = load_task(task_dir)
    kw = {"seed": 0, "selection_model": "default", "runtime": RuntimeConfig(), "progress": False}
    run_selection("bm25", task, pool, "3", tmp_path / "sel", **kw)
    assert run_selection("bm25", task, pool, "3", tmp_path / "sel", **kw)["pool"] == file_identity(pool)
    pool.write_text("".join(json.dumps(r) + "\n" for r in _edit(ROWS, "typo")))
    with pytest.raises(InputChangedError, match="pool file"):
        run_selection("bm25", task, pool, "3", tmp_path / "sel", **kw)
    report = run_selection("bm25", task, pool, "3", tmp_path / "sel", overwrite=True, **kw)
    assert report["pool"]["xxh3_128"] == file_identity(pool)["xxh3_128"]


def _lock_of(path: Path, pid: int) -> None:
    path.write_text(json.dumps({"pid": pid, "host": socket.gethostname(), "command": "select (test)"}))


def test_second_command_into_a_locked_folder_stops_naming_the_pid(tiny_dir, tmp_path):
    pool, targets = _files(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        _lock_of(out / LOCK_NAME, holder.pid)
        res = CliRunner().invoke(app, [str(a) for a in [
            "select", "--pool", pool, "--targets", targets, "--budget", "3", "--out", out, "--model", tiny_dir,
            "--dtype", "float32", "--quiet"]])
        assert res.exit_code == 2 and f"pid {holder.pid}" in res.output and "in use" in res.output
        assert not (out / "parts").exists()
        res = CliRunner().invoke(app, [str(a) for a in [  # several target sets lock the folder too
            "select", "--pool", pool, "--targets", f"a={targets}", "--targets", f"b={targets}", "--budget", "3",
            "--out", out, "--model", tiny_dir, "--dtype", "float32", "--quiet"]])
        assert res.exit_code == 2 and f"pid {holder.pid}" in res.output and "in use" in res.output
        assert not (out / "a").exists()
    finally:
        holder.kill()
        holder.wait()


def test_stale_lock_of_a_dead_process_is_taken_over(tmp_path, caplog):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    _lock_of(tmp_path / LOCK_NAME, dead.pid)
    with caplog.at_level("WARNING"), folder_lock(tmp_path, "test") as lock:
        assert json.loads(lock.read_text())["pid"] == os.getpid()
    assert "stale lock" in caplog.text and not (tmp_path / LOCK_NAME).exists()


def test_shards_lock_separately_but_exclude_the_same_shard_and_whole_folder_commands(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        _lock_of(tmp_path / shard_lock_name((0, 2)), holder.pid)
        with folder_lock(tmp_path, "shard 1", shard=(1, 2)):  # another shard: runs side by side
            pass
        with pytest.raises(FolderLockedError, match=f"pid {holder.pid}"):
            with folder_lock(tmp_path, "shard 0 again", shard=(0, 2)):
                pass
        with pytest.raises(FolderLockedError, match=f"pid {holder.pid}"):
            with folder_lock(tmp_path, "merge"):
                pass
    finally:
        holder.kill()
        holder.wait()


def test_lock_is_released_on_exceptions(tmp_path):
    with pytest.raises(KeyboardInterrupt), folder_lock(tmp_path, "test"):
        raise KeyboardInterrupt
    assert not (tmp_path / LOCK_NAME).exists()


def test_resumed_run_reports_the_stage2_seconds_of_every_part_it_reused(tiny_dir, tmp_path):
    from trim_select.io import PART_SECONDS

    _, _, out, args = _selected(tmp_path, tiny_dir)
    parts = sorted((out / "parts").glob("part-*.parquet"))
    recorded = [float(pq.read_schema(p).metadata[PART_SECONDS.encode()]) for p in parts]
    assert len(parts) > 1 and all(s > 0 for s in recorded)
    first = json.loads((out / "run.json").read_text())["cost"]
    assert first["stage2_seconds_all_runs"] == pytest.approx(sum(recorded), abs=0.01)
    res = CliRunner().invoke(app, [str(a) for a in args])  # every part reused: nothing scored again
    assert res.exit_code == 0, res.output
    again = json.loads((out / "run.json").read_text())["cost"]
    assert again["stage2_seconds_all_runs"] == first["stage2_seconds_all_runs"]
    assert pq.read_table(out / "scores.parquet").schema.metadata is None or \
        PART_SECONDS.encode() not in pq.read_table(out / "scores.parquet").schema.metadata
