"""`trim-select report`: figures, the HTML page, the overlap numbers and the token view."""

from __future__ import annotations

import html
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from trim_select.reports import ReportConfig, build_report, jaccard_matrix
from trim_select.testing import CORPUS

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
DATASETS = ("cot", "flan", "dolly")


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny):
    """A TRIM select run on a 30-row pool (with `dataset`/`task` fields and HTML-special text) and a
    baseline-like copy with another selection and no fingerprints."""
    from trim_select.selector import TrimSelector

    root = tmp_path_factory.mktemp("report")
    rows = []
    for i in range(30):
        a, b = CORPUS[i % len(CORPUS)], CORPUS[(3 * i + 1) % len(CORPUS)]
        rows.append(
            {
                "id": f"ex{i}",
                "dataset": DATASETS[i % 3],
                "task": f"task{i % 5}",
                "messages": [
                    {"role": "user", "content": f'<b>Q{i}</b> & "{a}"'},
                    {"role": "assistant", "content": " ".join([b] * (1 + i % 4))},
                ],
            }
        )
    pool = _write_jsonl(root / "pool.jsonl", rows)
    targets = _write_jsonl(
        root / "targets.jsonl",
        [
            {
                "messages": [
                    {"role": "user", "content": CORPUS[k]},
                    {"role": "assistant", "content": CORPUS[k + 1]},
                ]
            }
            for k in (0, 2, 9)
        ],
    )
    trim = root / "trim"
    TrimSelector(tiny, progress=False).run(pool, trim, 6, targets=targets)
    other = root / "other"
    other.mkdir()
    table = pq.read_table(trim / "scores.parquet").select(["index", "id", "score"])
    chosen = np.zeros(30, dtype=bool)
    chosen[[0, 1, 2, 3, 4, 5]] = True
    table = table.append_column("selected", pa.array(chosen))
    table = table.append_column("rank", pa.array(np.where(chosen, np.arange(1, 31), 0)))
    pq.write_table(table, other / "scores.parquet")
    info = json.loads((trim / "run.json").read_text())
    (other / "run.json").write_text(
        json.dumps({"command": "baseline", "method": "fake", "pool": info["pool"], "budget": 6})
    )
    return {"root": root, "pool": pool, "targets": targets, "trim": trim, "other": other}


@pytest.fixture(scope="module")
def report(runs, tmp_path_factory):
    out = tmp_path_factory.mktemp("out")
    res = build_report(
        [runs["trim"], runs["other"]], out, ReportConfig(targets=runs["targets"], n_examples=2)
    )
    return res, (out / "index.html").read_text(encoding="utf-8")


def test_report_writes_every_figure_as_png_and_one_html_page(report):
    res, page = report
    assert set(res.figures) == {"lengths", "source_mix", "task_mix", "scores", "overlap"}
    for path in res.figures.values():
        assert path.read_bytes()[:8] == PNG_MAGIC and path.stat().st_size > 5000
    assert page.startswith("<!DOCTYPE html>") and page.count("data:image/png;base64,") == 5
    assert json.loads((res.html.parent / "summary.json").read_text())["figures"]["lengths"] == "lengths.png"


def test_page_shows_the_escaped_text_of_a_selected_row(runs, report):
    _, page = report
    best = json.loads((runs["trim"] / "coreset.jsonl").read_text().splitlines()[0])
    text = best["messages"][0]["content"]
    assert html.escape(text, quote=True) in page
    assert text not in page  # never the raw markup
    assert "<b>Q" not in page


def test_page_states_pool_and_coreset_sizes_beside_every_figure(report):
    _, page = report
    sizes = "pool pool.jsonl: 30 rows · coreset rows: trim 6, fake 6"
    assert page.count(sizes) >= 5


def test_token_view_colours_target_and_candidate_tokens_with_value_tooltips(report):
    res, page = report
    assert "title='α=" in page and "title='s_j=" in page
    assert re.search(r"class='tok[^']* max[^']*' style='background:rgba", page)  # the max term of Eq. 15
    assert "chat-template scaffolding (not message content)" in page and "mean s_j content" in page
    tv = res.summary["token_view"]
    assert [(v["run"], v["targets"], v["top"], v["bottom"]) for v in tv] == [("trim", 3, 2, 2)]


def test_overlap_matrix_is_the_jaccard_index_of_the_coresets(runs, report):
    res, _ = report
    trim = pq.read_table(runs["trim"] / "scores.parquet").to_pydict()
    a = {i for i, s in zip(trim["index"], trim["selected"], strict=True) if s}
    b = {0, 1, 2, 3, 4, 5}
    ov = res.summary["overlap"]
    assert ov["labels"] == ["trim", "fake"]
    assert ov["jaccard"][0][1] == pytest.approx(len(a & b) / len(a | b))
    assert ov["jaccard"][1][0] == ov["jaccard"][0][1] and ov["jaccard"][0][0] == 1.0
    assert ov["intersection"] == [[6, len(a & b)], [len(a & b), 6]]


def test_jaccard_matrix_on_known_sets():
    m = jaccard_matrix([{1, 2, 3}, {2, 3, 4, 5}, set()])
    assert m.tolist() == [[1.0, 0.4, 0.0], [0.4, 1.0, 0.0], [0.0, 0.0, 1.0]]


def test_source_mix_counts_the_dataset_field_of_selected_rows(report):
    res, _ = report
    fake = next(r for r in res.summary["runs"] if r["label"] == "fake")
    assert fake["dataset"] == {"cot": 2, "flan": 2, "dolly": 2}
    assert res.summary["pools"][next(iter(res.summary["pools"]))]["dataset"] == {
        "cot": 10,
        "flan": 10,
        "dolly": 10,
    }
    assert sum(fake["task"].values()) == 6


def test_lengths_come_from_n_tokens_of_a_trim_run_on_the_same_pool(runs, report):
    res, _ = report
    pool = next(iter(res.summary["pools"].values()))
    assert pool["length_source"] == "n_tokens"
    n_tok = pq.read_table(runs["trim"] / "scores.parquet").column("n_tokens").to_numpy()
    assert pool["lengths"]["mean"] == pytest.approx(n_tok.mean())


def test_without_fingerprints_or_model_the_report_skips_the_token_view_and_uses_whitespace_lengths(
    runs, tmp_path
):
    res = build_report([runs["other"]], tmp_path / "r", ReportConfig(targets=runs["targets"]))
    page = res.html.read_text(encoding="utf-8")
    assert "title='s_j=" not in page and "title='α=" not in page
    assert any("no fingerprints.safetensors" in n for n in res.notes)
    assert next(iter(res.summary["pools"].values()))["length_source"] == "whitespace"
    assert (tmp_path / "r" / "lengths.png").exists()


def test_missing_fingerprints_in_a_trim_run_gives_a_note_not_a_crash(runs, tmp_path):
    trim = tmp_path / "trim"
    shutil.copytree(runs["trim"], trim)
    (trim / "fingerprints.safetensors").unlink()
    res = build_report([trim], tmp_path / "r", ReportConfig(targets=runs["targets"]))
    assert "title='s_j=" not in res.html.read_text(encoding="utf-8")
    assert res.summary["token_view"] == [] and res.notes


def test_missing_targets_skip_only_the_target_saliency_view(runs, tmp_path):
    trim = tmp_path / "trim"
    shutil.copytree(runs["trim"], trim)
    info = json.loads((trim / "run.json").read_text())
    info.pop("targets", None)  # a run that does not record its target file
    (trim / "run.json").write_text(json.dumps(info))
    res = build_report([trim], tmp_path / "r", ReportConfig(n_examples=1))
    page = res.html.read_text(encoding="utf-8")
    assert "title='α=" not in page and "title='s_j=" in page
    assert "no --targets given" in page


def test_cli_report_runs_without_token_view(runs, tmp_path):
    from typer.testing import CliRunner

    from trim_select.cli import app

    out = tmp_path / "cli"
    result = CliRunner().invoke(
        app, ["report", str(runs["trim"]), str(runs["other"]), "--out", str(out), "--no-token-view"]
    )
    assert result.exit_code == 0, result.output
    assert (out / "index.html").exists() and (out / "overlap.png").exists()
    assert "Token view disabled" in (out / "index.html").read_text(encoding="utf-8")


def test_cli_report_on_a_folder_without_scores_is_a_clear_error(tmp_path):
    from typer.testing import CliRunner

    from trim_select.cli import app

    result = CliRunner().invoke(app, ["report", str(tmp_path), "--out", str(tmp_path / "o")])
    assert result.exit_code == 2
    assert "no scores.parquet" in result.output


SCRIPT = '<script>alert("pwned")</script>'


def test_pool_text_with_a_script_tag_is_escaped_in_previews_and_token_view(runs, tmp_path):
    rows = [json.loads(line) for line in runs["pool"].read_text(encoding="utf-8").splitlines()]
    for row in rows:
        row["messages"][0]["content"] = SCRIPT + " " + row["messages"][0]["content"]
        row["task"] = "<script>task</script>"
    pool = _write_jsonl(tmp_path / "pool.jsonl", rows)
    res = build_report([runs["trim"]], tmp_path / "r", ReportConfig(targets=runs["targets"], pool=pool,
                                                                    n_examples=1))
    page = res.html.read_text(encoding="utf-8")
    assert "<script" not in page  # the page itself has none: every one came from the pool
    assert html.escape(SCRIPT, quote=True) in page  # the preview shows it as text
    assert "&lt;script&gt;task&lt;/script&gt;" in page
    # the token view's own markup stays markup (coloured spans), the tokens inside are text
    assert "<span class='tok" in page and "&lt;span" not in page
    assert "title='s_j=" in page and re.search(r">[^<]*&lt;[^<]*</span>", page)


def test_report_templates_ship_as_package_data():
    import tomllib
    from fnmatch import fnmatch

    import trim_select.reports

    pyproject = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())
    patterns = pyproject["tool"]["setuptools"]["package-data"]["trim_select"]
    root = Path(trim_select.reports.__file__).parent
    shipped = sorted((root / "templates").iterdir())
    assert {p.name for p in shipped} >= {"report.html.j2", "token_view.html.j2", "macros.html.j2", "report.css"}
    for path in shipped:
        rel = path.relative_to(root.parent).as_posix()
        assert any(fnmatch(rel, pat) for pat in patterns), f"{rel} is not package data in pyproject.toml"
    assert "jinja2" in {d.split("==")[0].lower() for d in pyproject["project"]["dependencies"]}


def test_report_templates_escape_every_value():
    from trim_select.reports.html import ENV, Table

    macros = ENV.get_template("macros.html.j2").module
    out = str(macros.table(Table(["<h>"], [["<td>&'\""], [1234]], [False])))
    assert "<th>&lt;h&gt;</th>" in out and "<td>&lt;td&gt;&amp;&#x27;&quot;</td>" in out and "<td>1,234</td>" in out
