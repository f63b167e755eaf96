"""`trim-select select | fingerprint | score` end to end on the tiny model."""

import json
import re

import numpy as np
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from trim_select.cli import app

ROWS = [
    {"id": f"math-{i}", "dataset": "math", "messages": [
        {"role": "user", "content": f"Natalia sold {i} clips in April and half as many in May. How many?"},
        {"role": "assistant", "content": f"{i} + {i}/2 = {i * 3 // 2}. #### {i * 3 // 2}"}]}
    for i in range(2, 14)
] + [
    {"id": f"misc-{i}", "dataset": "misc", "messages": [
        {"role": "user", "content": f"Translate to French number {i}: Good morning, how are you today?"},
        {"role": "assistant", "content": "Bonjour, comment allez-vous?"}]}
    for i in range(12)
]
TARGETS = [
    {"messages": [{"role": "user", "content": "Weng sold 48 clips in April and half as many in May. How many?"},
                  {"role": "assistant", "content": "48 + 24 = 72. #### 72"}]},
    {"messages": [{"role": "user", "content": "Tracy sold 12 clips in April and half as many in May. How many?"},
                  {"role": "assistant", "content": "12 + 6 = 18. #### 18"}]},
]


@pytest.fixture()
def files(tmp_path):
    pool = tmp_path / "pool.jsonl"
    # deliberately odd spacing: the coreset must copy lines byte for byte
    pool.write_text("".join(json.dumps(r, separators=(", ", ":  ")) + "\n" for r in ROWS))
    targets = tmp_path / "targets.jsonl"
    targets.write_text("".join(json.dumps(r) + "\n" for r in TARGETS))
    return pool, targets


def invoke(*args):
    res = CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)
    return res


def test_select_writes_every_output_and_a_verbatim_best_first_coreset(tiny_dir, files, tmp_path):
    pool, targets = files
    out = tmp_path / "out"
    res = invoke("select", "--pool", pool, "--targets", targets, "--budget", "25%", "--out", out,
                 "--model", tiny_dir, "--dtype", "float32", "--chunk-size", "5", "--quiet")
    assert res.exit_code == 0, res.output
    assert {p.name for p in out.iterdir()} >= {"coreset.jsonl", "scores.parquet", "fingerprints.safetensors",
                                              "run.json", "parts"}
    table = pq.read_table(out / "scores.parquet").to_pandas()
    assert list(table.columns) == ["index", "id", "score", "mean", "max", "coverage", "n_tokens", "n_scored",
                                   "n_unseen", "n_truncated", "selected", "rank"]
    assert table["index"].tolist() == list(range(len(ROWS)))
    assert table["selected"].sum() == 6  # 25% of 24
    lines = pool.read_bytes().splitlines()
    chosen = table[table.selected].sort_values("rank")
    assert (out / "coreset.jsonl").read_bytes().splitlines() == [lines[i] for i in chosen["index"]]
    assert (table.loc[table.selected, "score"].min() >= table.loc[~table.selected, "score"].max())
    run = json.loads((out / "run.json").read_text())
    assert run["counts"]["selected"] == 6 and run["counts"]["scored"] == 24
    assert run["model"]["sha256"] and run["versions"]["torch"]
    assert set(run["timings_s"]) >= {"load_model", "stage1_fingerprints", "stage2_scoring", "total"}
    assert run["config"]["scoring"]["coverage_weight"] == 0.05


def test_rerun_resumes_from_parts_with_identical_results(tiny_dir, files, tmp_path):
    pool, targets = files
    out = tmp_path / "out"
    args = ("select", "--pool", pool, "--targets", targets, "--budget", "5", "--out", out, "--model", tiny_dir,
            "--dtype", "float32", "--chunk-size", "5", "--quiet")
    assert invoke(*args).exit_code == 0
    first = pq.read_table(out / "scores.parquet")
    coreset = (out / "coreset.jsonl").read_bytes()
    parts = sorted((out / "parts").glob("part-*.parquet"))
    assert len(parts) == 5
    parts[2].unlink()
    parts[4].unlink()
    mtime = parts[0].stat().st_mtime_ns
    assert invoke(*args).exit_code == 0
    assert parts[0].stat().st_mtime_ns == mtime  # finished chunk not recomputed
    assert pq.read_table(out / "scores.parquet").equals(first)
    assert (out / "coreset.jsonl").read_bytes() == coreset


def test_fingerprint_then_score_equals_select(tiny_dir, files, tmp_path):
    pool, targets = files
    common = ("--model", tiny_dir, "--dtype", "float32")
    assert invoke("select", "--pool", pool, "--targets", targets, "--budget", "3", "--out", tmp_path / "a",
                  "--quiet", *common).exit_code == 0
    res = invoke("fingerprint", "--targets", targets, "--out", tmp_path / "fp.safetensors", *common)
    assert res.exit_code == 0, res.output
    res = invoke("score", "--pool", pool, "--fingerprints", tmp_path / "fp.safetensors", "--out", tmp_path / "b",
                 "--budget", "3", "--quiet", *common)
    assert res.exit_code == 0, res.output
    a = pq.read_table(tmp_path / "a" / "scores.parquet").column("score").to_numpy()
    b = pq.read_table(tmp_path / "b" / "scores.parquet").column("score").to_numpy()
    np.testing.assert_array_equal(a, b)
    assert (tmp_path / "a" / "coreset.jsonl").read_bytes() == (tmp_path / "b" / "coreset.jsonl").read_bytes()


def test_fingerprints_from_another_model_are_refused(tiny_dir, files, tmp_path):
    from trim_select.testing import make_model_dir

    pool, targets = files
    other = make_model_dir(tmp_path / "other", seed=1)
    assert invoke("fingerprint", "--targets", targets, "--out", tmp_path / "fp.safetensors", "--model", other,
                  "--dtype", "float32").exit_code == 0
    res = CliRunner().invoke(app, ["score", "--pool", str(pool), "--fingerprints", str(tmp_path / "fp.safetensors"),
                                   "--out", str(tmp_path / "b"), "--model", str(tiny_dir), "--dtype", "float32"])
    assert res.exit_code == 2
    assert "built with model" in res.output


@pytest.mark.parametrize("args, message", [
    (("--budget", "25"), "larger than the pool"),
    (("--scope", "middle"), "--scope must be one of"),
    (("--penalty", "2.0"), "penalty must be in"),
    (("--penalty", "abc"), "--penalty takes a number"),
])
def test_bad_settings_fail_with_a_clear_message(tiny_dir, files, tmp_path, args, message):
    pool, targets = files
    base = {"--budget": "3", "--scope": "all", "--penalty": "1.0"}
    base.update(dict(zip(args[::2], args[1::2], strict=True)))
    flat = [x for kv in base.items() for x in kv]
    res = CliRunner().invoke(app, ["select", "--pool", str(pool), "--targets", str(targets), "--out",
                                   str(tmp_path / "o"), "--model", str(tiny_dir), "--dtype", "float32", "--quiet",
                                   *flat])
    assert res.exit_code == 2
    assert message in res.output


def test_empty_target_file_is_a_clear_error(tiny_dir, files, tmp_path):
    pool, _ = files
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    res = CliRunner().invoke(app, ["select", "--pool", str(pool), "--targets", str(empty), "--budget", "3",
                                   "--out", str(tmp_path / "o"), "--model", str(tiny_dir), "--dtype", "float32"])
    assert res.exit_code == 2
    assert "target set is empty" in res.output


def _help_text(command: str) -> str:
    result = CliRunner().invoke(app, [command, "--help"], env={"COLUMNS": "400", "TERMINAL_WIDTH": "400"})
    assert result.exit_code == 0, result.output
    return " ".join(re.sub(r"[│╭╮╰╯─]", " ", result.output).split())


def test_every_option_built_from_a_config_field_shows_the_field_doc_in_help():
    import inspect
    import typing

    from trim_select.cli.options import FIELD_OPTIONS
    from trim_select.config import FingerprintConfig, ScoreConfig, field_doc
    from trim_select.training.lora import LoraRecipe

    seen: set[tuple[type, str]] = set()
    for command in app.registered_commands:
        name = command.name or command.callback.__name__
        text = _help_text(name)
        for param in inspect.signature(command.callback, eval_str=True).parameters.values():
            for info in typing.get_args(param.annotation)[1:]:
                if id(info) in FIELD_OPTIONS:
                    cls, field = FIELD_OPTIONS[id(info)]
                    doc = " ".join(field_doc(cls, field).split())
                    assert doc in text, f"`{name} --help` lacks the doc of {cls.__name__}.{field} ({param.name})"
                    seen.add((cls, field))
    # every Stage I/II field and the Table 7 recipe are options, so each was checked somewhere
    assert {(FingerprintConfig, "layers"), (ScoreConfig, "coverage_weight"), (LoraRecipe, "lora_r")} <= seen
    assert len(seen) >= 30


def test_options_read_their_default_from_the_config_dataclass():
    from trim_select.config import FingerprintConfig, ScoreConfig

    text = _help_text("select")
    assert re.search(rf"--coverage-weight \S+ eta \(Eq\. 15\)\. \[default: {ScoreConfig().coverage_weight}\]", text)
    assert re.search(rf"--layers \S+ L: attention .*? \[default: {FingerprintConfig().layers}\]", text)
