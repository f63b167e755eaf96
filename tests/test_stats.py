"""Paired bootstrap over test rows (evaluation/stats.py)."""

import numpy as np
import pytest

from trim_select.evaluation.stats import (
    BootstrapConfig,
    paired_bootstrap,
    pairwise,
    pairwise_markdown,
    read_rows,
    seed_averaged,
    write_rows,
)


def _rows(method, values_by_seed, ids):
    return [{"method": method, "seed": s, "id": i, "answer_nll": float(v), "correct": int(v < 1.0)}
            for s, vals in enumerate(values_by_seed) for i, v in zip(ids, vals, strict=True)]


def test_method_against_itself_contains_zero():
    rng = np.random.default_rng(1)
    ids = [f"r{i}" for i in range(200)]
    vals = rng.normal(1.0, 0.5, size=(3, 200))
    rows = _rows("trim", vals, ids) + _rows("trim_copy", vals, ids)
    (res,) = pairwise(rows, "answer_nll", BootstrapConfig(resamples=2000))
    assert res["mean_diff"] == pytest.approx(0.0)
    assert res["low"] <= 0.0 <= res["high"] and not res["excludes_zero"]


def test_method_against_corrupted_copy_excludes_zero():
    rng = np.random.default_rng(2)
    ids = [f"r{i}" for i in range(200)]
    vals = rng.normal(1.0, 0.5, size=(3, 200))
    corrupted = vals + rng.normal(0.1, 0.05, size=vals.shape)  # small per-row shift, big row noise
    rows = _rows("clean", vals, ids) + _rows("corrupt", corrupted, ids)
    (res,) = pairwise(rows, "answer_nll", BootstrapConfig(resamples=2000))
    assert res["a"] == "clean" and res["b"] == "corrupt"
    assert res["high"] < 0.0 and res["excludes_zero"]
    # unpaired, the same shift is lost in the between-row spread: pairing is what makes it visible
    assert 0.1 < vals.mean(axis=0).std()


def test_bootstrap_agrees_with_naive_loop():
    rng = np.random.default_rng(3)
    a, b = rng.normal(size=57), rng.normal(size=57)
    cfg = BootstrapConfig(resamples=500, seed=7, chunk=64)
    got = paired_bootstrap(a, b, cfg)
    loop_rng = np.random.default_rng(7)
    means = []
    for _ in range(500):
        idx = loop_rng.integers(0, 57, size=57)
        means.append(sum(a[j] - b[j] for j in idx) / 57)
    lo, hi = np.quantile(means, [0.025, 0.975])
    assert got["low"] == pytest.approx(lo, abs=1e-12)
    assert got["high"] == pytest.approx(hi, abs=1e-12)
    assert got["mean_diff"] == pytest.approx(float(np.mean(a - b)))


def test_seeds_are_averaged_per_row_before_pairing():
    rows = _rows("m", [[1.0, 2.0], [3.0, 6.0]], ["x", "y"])
    assert seed_averaged(rows, "answer_nll") == {"m": {"x": 2.0, "y": 4.0}}


def test_methods_on_different_rows_are_an_error():
    rows = _rows("a", [[1.0, 2.0]], ["x", "y"]) + _rows("b", [[1.0, 2.0]], ["x", "z"])
    with pytest.raises(ValueError, match="different rows"):
        pairwise(rows, "answer_nll")


def test_missing_metric_is_an_error_not_a_drop():
    rows = _rows("a", [[1.0, 2.0]], ["x", "y"])
    rows[1]["answer_nll"] = None
    with pytest.raises(ValueError, match="answer_nll"):
        seed_averaged(rows, "answer_nll")


def test_rows_roundtrip_gzip_and_markdown_marks_significance(tmp_path):
    rows = _rows("a", [[0.5, 2.0, 1.5]], ["x", "y", "z"])
    write_rows(tmp_path / "rows.jsonl.gz", rows)
    assert read_rows(tmp_path / "rows.jsonl.gz") == rows
    md = pairwise_markdown([{"metric": "answer_nll", "a": "a", "b": "b", "mean_diff": -0.2, "low": -0.3,
                             "high": -0.1, "n": 3, "excludes_zero": True}], seeds=3)
    assert "| * |" in md and "3 seeds" in md


def test_per_seed_differences_show_a_seed_that_disagrees_with_the_interval():
    ids = [f"r{i}" for i in range(50)]
    base = np.linspace(1.0, 2.0, 50)
    # b is worse than a by 0.3 at seed 0 and better by 0.1 at seeds 1 and 2: the seed average says
    # a is better on every row (a tight interval), the seeds say the ranking is not stable
    a = _rows("a", [base, base, base], ids)
    b = _rows("b", [base + 0.3, base - 0.1, base - 0.1], ids)
    untuned = [{"method": "base", "seed": "-", "id": i, "answer_nll": 2.0, "correct": 0} for i in ids]
    by_pair = {(r["a"], r["b"]): r for r in pairwise(a + b + untuned, "answer_nll", BootstrapConfig(resamples=500))}
    ab = by_pair[("a", "b")]
    assert ab["excludes_zero"] and ab["mean_diff"] == pytest.approx(-1 / 30)
    assert ab["per_seed"] == pytest.approx({"0": -0.3, "1": 0.1, "2": 0.1}) and not ab["seeds_agree"]
    a_base = by_pair[("a", "base")]  # the seedless base is paired with each seed of the other method
    assert a_base["per_seed"] == pytest.approx({s: float(np.mean(base - 2.0)) for s in "012"})
    assert a_base["seeds_agree"]
