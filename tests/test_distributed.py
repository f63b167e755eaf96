"""Scale-out (issue 5): every engine and the shard + merge path give the single-process result.

The tiny model on CPU; one single-process reference run per module; one Ray session per module.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from trim_select.cli import app
from trim_select.config import RenderConfig, RuntimeConfig
from trim_select.data import read_records
from trim_select.engines import dispatch as dist
from trim_select.selector import TrimSelector

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
N_ROWS, CHUNK = 48, 8  # 6 chunks
COMMON = ["--device", "cpu", "--dtype", "float32", "--chunk-size", str(CHUNK), "--max-length", "256",
          "--quiet"]


def cli(*args: str) -> str:
    res = CliRunner().invoke(app, [str(a) for a in args])
    if res.exit_code != 0:
        raise AssertionError(f"exit {res.exit_code}: {res.output}\n{res.exception!r}")
    return res.output


@pytest.fixture(scope="module")
def pool(tmp_path_factory) -> Path:
    lines = (EXAMPLES / "pool.jsonl").read_text().splitlines()[:N_ROWS]
    path = tmp_path_factory.mktemp("pool") / "pool.jsonl"
    path.write_text("\n".join(lines[:5]) + "\n\n" + "\n".join(lines[5:]) + "\n")  # a blank line too
    return path


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_dir, pool) -> Path:
    """The uninterrupted single-process run every engine must reproduce."""
    out = tmp_path_factory.mktemp("reference")
    cli("select", "--pool", pool, "--targets", EXAMPLES / "targets-gsm.jsonl", "--budget", "25%",
        "--out", out, "--model", tiny_dir, *COMMON)
    return out


def selector(tiny_dir: Path) -> TrimSelector:
    return TrimSelector(str(tiny_dir), render=RenderConfig(max_length=256),
                        runtime=RuntimeConfig(device="cpu", dtype="float32", chunk_size=CHUNK),
                        progress=False)


def assert_same_result(out: Path, reference: Path) -> None:
    got, want = pq.read_table(out / "scores.parquet"), pq.read_table(reference / "scores.parquet")
    assert got.equals(want), "scores.parquet differs from the single-process run"
    assert (out / "coreset.jsonl").read_bytes() == (reference / "coreset.jsonl").read_bytes()
    run = json.loads((out / "run.json").read_text())
    assert run["counts"] == json.loads((reference / "run.json").read_text())["counts"]


def part_stamps(out: Path) -> dict[str, tuple[int, int]]:
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in (out / "parts").glob("part-*.parquet")}


def test_importing_trim_select_does_not_import_ray():
    code = "import sys, trim_select, trim_select.engines.dispatch, trim_select.cli; print('ray' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True).stdout.strip() == "False"


@pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
def test_ray_chunk_reader_yields_the_rows_and_bytes_of_read_records(tmp_path, pool, suffix):
    path = pool
    if suffix == ".parquet":
        path = tmp_path / "pool.parquet"
        pq.write_table(pa.Table.from_pylist([json.loads(line) for line in pool.read_text().splitlines()
                                             if line.strip()]), path, row_group_size=5)
    spans = dist.plan_chunks(path, 7)
    assert [s.rows for s in spans] == [7] * 6 + [6] and [s.chunk for s in spans] == list(range(7))
    got = [row for s in spans for row in dist.read_span_rows(path, s)]
    want = [(r.index, r.line, r.raw) for r in read_records(path)]
    assert got == want


def test_local_engine_with_two_workers_matches_single_process_run(tmp_path, tiny_dir, pool, reference):
    out = tmp_path / "local"
    cli("score", "--pool", pool, "--fingerprints", reference / "fingerprints.safetensors", "--budget", "25%",
        "--out", out, "--model", tiny_dir, "--workers", "2", *COMMON)
    assert_same_result(out, reference)
    assert json.loads((out / "run.json").read_text())["distributed"]["workers"] == 2


def test_shards_then_merge_equal_single_run_and_merge_names_missing_chunks(
        tmp_path, tiny_dir, pool, reference):
    out = tmp_path / "sharded"
    args = ["score", "--pool", pool, "--fingerprints", reference / "fingerprints.safetensors",
            "--budget", "25%", "--out", out, "--model", tiny_dir, *COMMON]
    cli(*args, "--shard", "0/2")
    assert sorted(part_stamps(out)) == [f"part-{k:06d}.parquet" for k in (0, 2, 4)]
    res = CliRunner().invoke(app, ["merge", str(out)])
    assert res.exit_code == 2
    assert "3 of 6 chunks" in res.output and "chunk 1, 3, 5" in res.output and "--shard 1/2" in res.output
    cli(*args, "--shard", "1/2")
    cli("merge", out)  # the budget recorded by the shard jobs
    assert_same_result(out, reference)


def test_unseen_token_map_is_built_once_with_the_fingerprints_and_reused_by_every_shard(
        tmp_path, tiny_dir, pool, reference, monkeypatch):
    import numpy as np

    import trim_select.scoring as scoring
    from trim_select.fingerprints import Fingerprints, nearest_rows

    fp = Fingerprints.load(reference / "fingerprints.safetensors")
    emb = selector(tiny_dir).lm.model.get_input_embeddings().weight
    assert fp.nearest is not None and len(fp.nearest) == emb.shape[0]  # Stage I saved it beside F
    np.testing.assert_array_equal(fp.nearest, nearest_rows(fp.token_ids, emb))
    np.testing.assert_array_equal(fp.nearest[fp.token_ids], np.arange(len(fp)))  # seen ids: their own row

    def recompute(*a, **k):
        raise AssertionError("a Stage II worker recomputed the unseen-token map")

    monkeypatch.setattr(scoring, "nearest_rows", recompute)
    out = tmp_path / "sharded"
    for i in range(2):  # shards score in this process: the patch would catch a recomputation
        cli("score", "--pool", pool, "--fingerprints", reference / "fingerprints.safetensors", "--budget", "25%",
            "--out", out, "--model", tiny_dir, *COMMON, "--shard", f"{i}/2")
    cli("merge", out)
    assert_same_result(out, reference)


def test_fingerprints_without_a_map_get_one_from_the_driver(tmp_path, tiny_dir, pool, reference):
    from dataclasses import replace

    from trim_select.fingerprints import Fingerprints

    full = Fingerprints.load(reference / "fingerprints.safetensors")
    old = tmp_path / "old.safetensors"  # as written before the map was saved with the fingerprints
    replace(full, nearest=None).save(old)
    out = tmp_path / "out"
    dist.run(selector(tiny_dir), pool, out, "25%", workers=2, fingerprints=old)
    np_equal = Fingerprints.load(out / "fingerprints.safetensors").nearest == full.nearest
    assert bool(np_equal.all())
    assert_same_result(out, reference)


def test_killed_local_worker_is_recovered_by_rerun_without_redoing_finished_chunks(
        tmp_path, tiny_dir, pool, reference, monkeypatch):
    out = tmp_path / "killed"
    fp = reference / "fingerprints.safetensors"
    monkeypatch.setenv(dist.FAULT_AFTER_ENV, "1")  # every worker dies after its first part
    with pytest.raises(RuntimeError, match="exit code 17.*rerun the same command"):
        dist.run(selector(tiny_dir), pool, out, "25%", workers=2, fingerprints=fp)
    before = part_stamps(out)
    assert 1 <= len(before) <= 2 and not (out / "scores.parquet").exists()
    monkeypatch.delenv(dist.FAULT_AFTER_ENV)
    dist.run(selector(tiny_dir), pool, out, "25%", workers=2, fingerprints=fp)
    after = part_stamps(out)
    assert {k: after[k] for k in before} == before  # finished chunks were not recomputed
    assert_same_result(out, reference)


# --------------------------------------------------------------------------------------------
# Ray
# --------------------------------------------------------------------------------------------


RAY_NOISE = pytest.mark.filterwarnings("ignore::DeprecationWarning")


@pytest.fixture(scope="module")
def ray_session():
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    yield ray
    ray.shutdown()


@RAY_NOISE
def test_ray_pipeline_with_two_actors_matches_local_engine(tmp_path, tiny_dir, pool, reference, ray_session):
    out = tmp_path / "ray"
    dist.run(selector(tiny_dir), pool, out, "25%", engine="ray", workers=2,
             fingerprints=reference / "fingerprints.safetensors")
    assert_same_result(out, reference)  # == local engine == single process (tests above)
    assert json.loads((out / "run.json").read_text())["distributed"]["actors"] == 2


@RAY_NOISE
def test_ray_actor_killed_mid_run_is_restarted_and_rerun_recomputes_only_missing_chunks(
        tmp_path, tiny_dir, pool, reference, ray_session, monkeypatch):
    out = tmp_path / "ray-killed"
    fp = reference / "fingerprints.safetensors"
    monkeypatch.setenv(dist.FAULT_AFTER_ENV, "1")
    monkeypatch.setenv(dist.FAULT_ONCE_ENV, str(tmp_path / "fault-fired"))
    dist.run(selector(tiny_dir), pool, out, "25%", engine="ray", workers=2, fingerprints=fp)
    assert (tmp_path / "fault-fired").exists()  # an actor died after its first part; Ray restarted it
    assert_same_result(out, reference)
    # a driver killed mid-run leaves some parts: the rerun reads and scores only the others
    monkeypatch.delenv(dist.FAULT_AFTER_ENV)
    for k in (1, 4):
        dist.part_path(out, k).unlink()
    (out / "scores.parquet").unlink()
    kept = part_stamps(out)
    report = dist.run(selector(tiny_dir), pool, out, "25%", engine="ray", workers=2, fingerprints=fp)
    assert report["distributed"]["chunks_scored"] == 2
    assert {k: v for k, v in part_stamps(out).items() if k in kept} == kept
    assert_same_result(out, reference)
