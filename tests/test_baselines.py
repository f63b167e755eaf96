"""Baselines (Appendix C): random, BM25, DSIR, RDS, LESS with the output layout of ``select``."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from trim_select.baselines import (
    BASELINES,
    BaselineConfig,
    DSIRConfig,
    LESSConfig,
    RDSConfig,
    record_text,
    run_baseline,
)
from trim_select.baselines.less import adam_direction
from trim_select.baselines.projection import Projector
from trim_select.config import RuntimeConfig
from trim_select.data import load_records
from trim_select.testing import CORPUS

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

TARGET_AT = 5  # pool position of the row identical to the single target
LESS_FAST = LESSConfig(proj_dim=64, lora_r=4, lora_alpha=8, grad_batch=4, allow_no_warmup=True)


def _conv(k: int) -> dict:
    q = CORPUS[k % len(CORPUS)]
    a = CORPUS[(3 * k + 1) % len(CORPUS)] + (" " + CORPUS[(k + 5) % len(CORPUS)] if k % 3 == 0 else "")
    return {"id": f"p{k}", "dataset": "cot" if k % 4 == 0 else "ni",
            "messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}


TARGETS = [
    {"id": "t0", "messages": [{"role": "user", "content": "Natalia sold 48 clips in April and half as many "
                                                          "in May. How many clips did Natalia sell?"},
                              {"role": "assistant", "content": "48 / 2 = 24 clips in May. 48 + 24 = 72. #### 72"}]},
    {"id": "t1", "messages": [{"role": "user", "content": "Weng earns $12 an hour for babysitting."},
                              {"role": "assistant", "content": "12 / 60 = 0.2 per minute. #### 10"}]},
]


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """A 16-row pool (row TARGET_AT = the first target, varied JSON spacing and unicode), targets."""
    d = tmp_path_factory.mktemp("baseline-data")
    lines = []
    for k in range(15):
        row = _conv(k)
        if k == 7:
            row["messages"][1]["content"] += " naïve café ✓"
        text = json.dumps(row, ensure_ascii=k % 2 == 0)
        lines.append(text.replace(", ", ",  ") if k % 5 == 0 else text)
    lines.insert(TARGET_AT, json.dumps({**TARGETS[0], "id": "copy-of-t0"}, separators=(",", ":")))
    pool = d / "pool.jsonl"
    pool.write_bytes(("\n".join(lines) + "\n").encode())
    one = d / "target1.jsonl"
    one.write_text(json.dumps(TARGETS[0]) + "\n")
    two = d / "targets2.jsonl"
    two.write_text("".join(json.dumps(t) + "\n" for t in TARGETS))
    return {"pool": pool, "one": one, "two": two, "dir": d}


@pytest.fixture(scope="module")
def warmup_dir(tiny_dir, tmp_path_factory) -> Path:
    """A fake warmup folder following the checkpoint contract: two steps, Adam moments m=0, v=1
    (so the Adam direction is proportional to the gradient), non-zero LoRA B, different LRs."""
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("warm")
    for step, lr in ((2, 2e-5), (4, 1e-5)):
        base = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32)
        model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                                                target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
        g = torch.Generator().manual_seed(step)
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.copy_(0.05 * torch.randn(p.shape, generator=g))
        dest = root / "checkpoints" / f"step-{step:06d}"
        model.save_pretrained(dest)
        (dest / "trim_select_base.json").write_text(json.dumps({"base": str(tiny_dir)}))
        (dest / "state.json").write_text(json.dumps({"step": step, "epoch": step / 2, "learning_rate": lr,
                                                     "loss": 1.0, "tokens": 100}))
        tensors = {}
        for n, p in model.named_parameters():
            if p.requires_grad:
                key = n.replace(".default", "")
                tensors[f"exp_avg/{key}"] = torch.zeros(p.shape)
                tensors[f"exp_avg_sq/{key}"] = torch.ones(p.shape)
        save_file(tensors, str(dest / "optimizer.safetensors"), metadata={"adam_step": str(step)})
    return root


def _cfg(tiny_dir: Path, **kw) -> BaselineConfig:
    return BaselineConfig(model=str(tiny_dir), runtime=RuntimeConfig(device="cpu", dtype="float32"), **kw)


def _settings(method: str):
    return {"less": LESS_FAST, "dsir": DSIRConfig(min_words=0)}.get(method)  # test rows are short


def _run(method, files, tiny_dir, out, budget="25%", targets="one", **kw):
    return run_baseline(method, files["pool"], files[targets], out, budget, config=_cfg(tiny_dir, **kw),
                        method_settings=kw.pop("settings", None) or _settings(method), progress=False)


@pytest.mark.parametrize("method", sorted(BASELINES))
def test_every_method_writes_the_select_layout_deterministically(method, files, tiny_dir, tmp_path):
    report = _run(method, files, tiny_dir, tmp_path / "a")
    again = _run(method, files, tiny_dir, tmp_path / "b")
    table = pq.read_table(tmp_path / "a" / "scores.parquet")
    cols = table.column_names
    assert cols[:3] == ["index", "id", "score"] and cols[-2:] == ["selected", "rank"]
    scores = table.column("score").to_numpy()
    assert np.array_equal(scores, pq.read_table(tmp_path / "b" / "scores.parquet").column("score").to_numpy())
    assert table.num_rows == 16 and int(np.sum(table.column("selected").to_numpy())) == 4  # 25% of 16
    # coreset: the selected pool lines byte for byte, best first
    pool_lines = files["pool"].read_bytes().splitlines()
    ranks = table.column("rank").to_numpy()
    best_first = np.argsort(ranks, kind="stable")[:4]
    assert (tmp_path / "a" / "coreset.jsonl").read_bytes().splitlines() == [pool_lines[i] for i in best_first]
    assert report == {**report, "method": method, "command": "baseline"}
    cost = report["cost"]
    assert {"wall_seconds", "forward_passes", "backward_passes", "tokens"} <= set(cost)
    if method in ("rds", "less"):
        assert cost["forward_passes"] == 17 and cost["tokens"] > 0  # 16 pool rows + 1 target
    assert cost["backward_passes"] == (17 if method == "less" else 0)
    run = json.loads((tmp_path / "a" / "run.json").read_text())
    assert run["counts"]["selected"] == 4 and "torch" in run["versions"]
    assert again["counts"] == report["counts"]


@pytest.mark.parametrize("method", ["bm25", "rds", "less"])
def test_target_identical_pool_row_ranks_first(method, files, tiny_dir, tmp_path):
    _run(method, files, tiny_dir, tmp_path, budget=1, targets="two" if method == "bm25" else "one")
    assert (tmp_path / "coreset.jsonl").read_bytes().splitlines() == [
        files["pool"].read_bytes().splitlines()[TARGET_AT]]


def test_less_without_warmup_checkpoints_refuses_unless_allowed(files, tiny_dir, tmp_path):
    from dataclasses import replace

    cfg = BaselineConfig(model=str(tiny_dir), runtime=RuntimeConfig(device="cpu", dtype="float32"))
    with pytest.raises(ValueError, match="LESS needs warmup checkpoints"):
        run_baseline("less", files["pool"], files["one"], tmp_path / "plain", 1, config=cfg,
                     method_settings=replace(LESS_FAST, allow_no_warmup=False), progress=False)
    assert not (tmp_path / "plain" / "coreset.jsonl").exists()


def test_less_with_warmup_checkpoints_is_adam_aware_and_lr_weighted(files, tiny_dir, warmup_dir, tmp_path):
    cfg = BaselineConfig(model=str(warmup_dir), runtime=RuntimeConfig(device="cpu", dtype="float32"))
    report = run_baseline("less", files["pool"], files["one"], tmp_path / "all", 1, config=cfg,
                          method_settings=LESS_FAST, progress=False)
    info = report["method_info"]
    assert info["pool_gradient"] == ["adam"] and info["warmup"] is True
    assert np.allclose(info["checkpoint_weights"], [2 / 3, 1 / 3])
    assert report["cost"]["backward_passes"] == 2 * 17 and report["cost"]["model_loads"] == 2
    table = pq.read_table(tmp_path / "all" / "scores.parquet")
    per_step = [table.column(f"score_step_{s}").to_numpy() for s in (2, 4)]
    assert np.allclose(table.column("score").to_numpy(), 2 / 3 * per_step[0] + 1 / 3 * per_step[1], atol=1e-6)
    assert int(np.argmax(table.column("score").to_numpy())) == TARGET_AT  # m=0, v=1: Adam direction ~ gradient
    last = run_baseline("less", files["pool"], files["one"], tmp_path / "last", 1,
                        config=BaselineConfig(model=str(warmup_dir), checkpoints="last",
                                              runtime=RuntimeConfig(device="cpu", dtype="float32")),
                        method_settings=LESS_FAST, progress=False)
    assert [c["step"] for c in last["method_info"]["checkpoints"]] == [4]
    assert np.allclose(pq.read_table(tmp_path / "last" / "scores.parquet").column("score").to_numpy(), per_step[1],
                       atol=1e-6)


def test_less_without_checkpoints_says_it_used_a_fresh_lora_and_sgd(files, tiny_dir, tmp_path):
    report = _run("less", files, tiny_dir, tmp_path)
    info = report["method_info"]
    assert info["warmup"] is False and info["pool_gradient"] == ["sgd"] and "fresh" in info["note"]
    assert "fresh LoRA r=4" in report["model"]["adapter"]


def test_less_and_rds_run_on_real_warmup_checkpoints(files, tiny_dir, tmp_path):
    from trim_select.training.lora import LoraRecipe, train_lora

    recipe = LoraRecipe(lr=1e-3, epochs=2, batch_size=4, lora_r=4, lora_alpha=8, lora_dropout=0.0,
                        warmup_ratio=0.0)
    train_lora(str(tiny_dir), load_records(files["pool"])[:8], tmp_path / "w", recipe, progress=False)
    for method in ("less", "rds"):
        report = run_baseline(method, files["pool"], files["two"], tmp_path / method, 3,
                              config=BaselineConfig(model=str(tmp_path / "w"),
                                                    runtime=RuntimeConfig(device="cpu", dtype="float32")),
                              method_settings=LESS_FAST if method == "less" else RDSConfig(), progress=False)
        info = report["method_info"]
        assert info["warmup"] is True and len(info["checkpoints"]) == 2 and report["counts"]["selected"] == 3
        assert np.isclose(sum(info["checkpoint_weights"]), 1.0)
    assert report["cost"]["model_loads"] == 2
    final = run_baseline("less", files["pool"], files["two"], tmp_path / "final", 3,
                         config=BaselineConfig(model=str(tmp_path / "w" / "final"),
                                               runtime=RuntimeConfig(device="cpu", dtype="float32")),
                         method_settings=LESS_FAST, progress=False)
    assert final["method_info"]["pool_gradient"] == ["sgd"]  # a bare adapter has no optimizer state
    assert len(final["method_info"]["checkpoints"]) == 1


def test_adam_direction_is_less_formula_and_optionally_bias_corrected():
    g, m, v = torch.randn(3, 10), torch.randn(10), torch.rand(10)
    less = (0.9 * m + 0.1 * g) / torch.sqrt(0.999 * v + 0.001 * g**2 + 1e-8)  # LESS obtain_gradients_with_adam
    assert torch.allclose(adam_direction(g, m, v), less)
    t = 5
    mh, vh = (0.9 * m + 0.1 * g) / (1 - 0.9**t), (0.999 * v + 0.001 * g**2) / (1 - 0.999**t)
    assert torch.allclose(adam_direction(g, m, v, step=t), mh / (torch.sqrt(vh) + 1e-8))


@pytest.mark.parametrize("kind", ["rademacher", "gaussian", "sjlt"])
def test_projection_is_seeded_and_independent_of_grouping(kind):
    g = torch.randn(5, 3000)
    p = Projector(3000, 32, kind, seed=1)
    whole = p.project(g)
    assert torch.allclose(whole, torch.cat([p.project(g[i:i + 1]) for i in range(5)]), rtol=1e-4, atol=1e-3)
    assert torch.equal(whole, Projector(3000, 32, kind, seed=1).project(g))
    assert not torch.allclose(whole, Projector(3000, 32, kind, seed=2).project(g))


def test_random_depends_on_the_seed_only(files, tiny_dir, tmp_path):
    sel = {}
    for seed, out in ((0, "a"), (0, "b"), (1, "c")):
        _run("random", files, tiny_dir, tmp_path / out, budget="50%", seed=seed)
        sel[out] = (tmp_path / out / "coreset.jsonl").read_bytes()
    assert sel["a"] == sel["b"] != sel["c"]


def test_dsir_top_k_matches_the_data_selection_package(files, tmp_path):
    from data_selection import HashedNgramDSIR

    records = load_records(files["pool"])
    text_file = tmp_path / "raw.jsonl"
    text_file.write_text("".join(json.dumps({"text": record_text(r)}) + "\n" for r in records))
    tgt_file = tmp_path / "tgt.jsonl"
    tgt_file.write_text("".join(json.dumps({"text": record_text(r)}) + "\n" for r in load_records(files["two"])))
    ref = HashedNgramDSIR([str(text_file)], [str(tgt_file)], str(tmp_path / "cache"), num_proc=1,
                          min_example_length=0)
    ref.fit_importance_estimator(num_tokens_to_fit="all")
    ref.compute_importance_weights()
    ref.resample(str(tmp_path / "ref"), num_to_sample=5, top_k=True)
    want = {json.loads(line)["text"] for line in (tmp_path / "ref" / "0.jsonl").read_text().splitlines()}
    for num_proc in (1, 2):
        run_baseline("dsir", files["pool"], files["two"], tmp_path / f"ours{num_proc}", 5,
                     method_settings=DSIRConfig(num_proc=num_proc, min_words=0), progress=False)
        got = {record_text(r) for r in load_records(tmp_path / f"ours{num_proc}" / "coreset.jsonl")}
        assert got == want
    assert (tmp_path / "ours1" / "dsir.npz").exists()
    assert not any(p.name.startswith(".dsir-") for p in (tmp_path / "ours1").iterdir())  # temp files removed


def test_dsir_resampling_is_seeded(files, tmp_path):
    out = {}
    for seed, name in ((0, "a"), (0, "b"), (3, "c")):
        run_baseline("dsir", files["pool"], files["two"], tmp_path / name, "50%", config=BaselineConfig(seed=seed),
                     method_settings=DSIRConfig(resample=True, min_words=0), progress=False)
        out[name] = pq.read_table(tmp_path / name / "scores.parquet").column("score").to_numpy()
    assert np.array_equal(out["a"], out["b"]) and not np.array_equal(out["a"], out["c"])


def test_bad_rows_are_skipped_counted_and_never_selected(files, tmp_path):
    lines = files["pool"].read_bytes().splitlines()
    bad = tmp_path / "pool.jsonl"
    bad.write_bytes(b"\n".join(lines[:3] + [b'{"messages": [}'] + lines[3:]) + b"\n")
    report = run_baseline("bm25", bad, files["two"], tmp_path / "out", "100%", skip_invalid=True, progress=False)
    assert report["counts"]["rejected"] == 1 and report["counts"]["selected"] == 16
    table = pq.read_table(tmp_path / "out" / "scores.parquet")
    assert 3 not in table.column("index").to_pylist()
    assert sorted((tmp_path / "out" / "coreset.jsonl").read_bytes().splitlines()) == sorted(lines)
    assert (tmp_path / "out" / "rejected.jsonl").exists()
    with pytest.raises(ValueError, match="line 4"):
        run_baseline("bm25", bad, files["two"], tmp_path / "strict", 1, progress=False)


def test_budget_is_respected_and_checked_before_scoring(files, tmp_path):
    for budget, want in ((3, 3), ("10%", 2), ("0.5", 8)):
        report = run_baseline("random", files["pool"], files["one"], tmp_path / str(want), budget, progress=False)
        assert report["counts"]["selected"] == want
        assert len((tmp_path / str(want) / "coreset.jsonl").read_bytes().splitlines()) == want
    with pytest.raises(ValueError, match="larger than the pool"):
        run_baseline("random", files["pool"], files["one"], tmp_path / "x", 17, progress=False)


def test_cli_runs_baselines_end_to_end(files, tiny_dir, warmup_dir, tmp_path):
    from typer.testing import CliRunner

    from trim_select.cli import app

    runner = CliRunner()
    common = ["--pool", str(files["pool"]), "--budget", "2", "--quiet"]
    res = runner.invoke(app, ["baseline", "--method", "bm25", "--targets", str(files["two"]),
                              "--out", str(tmp_path / "bm25"), *common])
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "bm25" / "run.json").read_text())["method"] == "bm25"
    res = runner.invoke(app, ["baseline", "--method", "less", "--targets", str(files["one"]),
                              "--out", str(tmp_path / "less"), "--model", str(warmup_dir), "--proj-dim", "32",
                              "--checkpoints", "last", "--device", "cpu", *common])
    assert res.exit_code == 0, res.output
    run = json.loads((tmp_path / "less" / "run.json").read_text())
    assert run["config"]["method"]["proj_dim"] == 32 and run["method_info"]["pool_gradient"] == ["adam"]
    assert (tmp_path / "less" / "coreset.jsonl").read_bytes().splitlines()[0] == \
        files["pool"].read_bytes().splitlines()[TARGET_AT]
    res = runner.invoke(app, ["baseline", "--method", "nope", "--targets", str(files["one"]),
                              "--out", str(tmp_path / "nope"), *common])
    assert res.exit_code != 0 and "--method" in res.output


def test_dsir_never_selects_examples_shorter_than_min_words(files, tmp_path):
    report = run_baseline("dsir", files["pool"], files["two"], tmp_path, "100%",
                          method_settings=DSIRConfig(min_words=40), progress=False)
    table = pq.read_table(tmp_path / "scores.parquet").to_pandas()
    short = table["n_words"] < 40
    assert 0 < short.sum() < len(table) and report["counts"]["minus_inf"] == short.sum()
    assert not table.loc[short, "selected"].any() and table.loc[~short, "selected"].all()
    assert report["counts"]["selected"] == (~short).sum()  # fewer than the budget: nothing else is eligible


def test_baseline_run_json_has_the_counts_and_config_layout_of_select(files, tiny, tiny_dir, tmp_path):
    from trim_select.selector import TrimSelector

    TrimSelector(tiny, progress=False).run(files["pool"], tmp_path / "trim", 4, targets=files["one"])
    trim = json.loads((tmp_path / "trim" / "run.json").read_text())
    for method in ("bm25", "rds"):
        _run(method, files, tiny_dir, tmp_path / method)
        run = json.loads((tmp_path / method / "run.json").read_text())
        assert list(run["counts"]) == list(trim["counts"])
        for key in ("pool_rows", "scored", "rejected", "blank_lines", "duplicate_ids", "selected"):
            assert run["counts"][key] == trim["counts"][key], key
        assert run["counts"]["truncated"] is None and run["counts"]["pool_tokens"] is None  # not measured
        assert run["read_stats"]["targets"]["records"] == 1
    # a model-based baseline records render and runtime where select does, its own settings beside them
    assert {"method", "seed", "model", "render", "runtime"} <= set(run["config"])
    assert set(run["config"]["render"]) == set(trim["config"]["render"])
    assert set(run["config"]["runtime"]) == set(trim["config"]["runtime"])


def test_cli_baseline_flags_fill_the_method_config(files, tmp_path):
    from typer.testing import CliRunner

    from trim_select.cli import app

    common = ["--pool", str(files["pool"]), "--targets", str(files["two"]), "--budget", "2", "--quiet"]
    res = CliRunner().invoke(app, ["baseline", "--method", "bm25", "--out", str(tmp_path / "bm25"), *common,
                                   "--bm25-k1", "1.2", "--bm25-b", "0.5", "--bm25-stopwords", "none",
                                   "--bm25-aggregate", "mean"])
    assert res.exit_code == 0, res.output
    got = json.loads((tmp_path / "bm25" / "run.json").read_text())["config"]["method"]
    assert got == {**got, "k1": 1.2, "b": 0.5, "stopwords": None, "aggregate": "mean"}
    res = CliRunner().invoke(app, ["baseline", "--method", "dsir", "--out", str(tmp_path / "dsir"), *common,
                                   "--dsir-ngrams", "1", "--dsir-buckets", "77", "--dsir-resample",
                                   "--dsir-min-words", "1", "--seed", "3"])
    assert res.exit_code == 0, res.output
    run = json.loads((tmp_path / "dsir" / "run.json").read_text())
    assert run["config"]["method"] == {**run["config"]["method"], "ngrams": 1, "num_buckets": 77, "resample": True,
                                       "min_words": 1, "num_proc": 1}
    assert run["seed"] == 3 and run["config"]["seed"] == 3


def _bm25_oracle(docs: list[str], query: str, k1: float, b: float, stop: set[str]) -> np.ndarray:
    """Lucene BM25 written out from its definition (Robertson idf with +1; no (k1+1) factor), one
    term of the query at a time: sum_t idf(t) * tf / (tf + k1 * (1 - b + b * |d| / avgdl))."""
    import re

    def words(text: str) -> list[str]:
        return [w for w in re.findall(r"(?u)\b\w\w+\b", text.lower()) if w not in stop]

    toks = [words(d) for d in docs]
    n, avgdl = len(toks), sum(len(t) for t in toks) / len(toks)
    out = np.zeros(n)
    for term in words(query):
        df = sum(term in t for t in toks)
        if df == 0:
            continue
        idf = np.log(1 + (n - df + 0.5) / (df + 0.5))
        for i, t in enumerate(toks):
            tf = t.count(term)
            out[i] += idf * tf / (tf + k1 * (1 - b + b * len(t) / avgdl))
    return out


def test_bm25_scores_equal_the_lucene_formula_computed_by_hand(files, tiny_dir, tmp_path):
    from bm25s.stopwords import STOPWORDS_EN

    from trim_select.baselines import BM25Config

    _run("bm25", files, tiny_dir, tmp_path, targets="two")
    got = pq.read_table(tmp_path / "scores.parquet").column("score").to_numpy()
    pool = load_records(files["pool"])
    docs = [record_text(r) for r in pool]
    cfg = BM25Config()
    per_target = np.stack([_bm25_oracle(docs, record_text(t), cfg.k1, cfg.b, set(STOPWORDS_EN))
                           for t in load_records(files["two"])])
    want = per_target.max(0)  # aggregate "max" over the target queries
    assert np.ptp(want) > 1.0  # the rows are told apart, so a wrong formula cannot pass by accident
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_rds_scores_equal_an_unbatched_last_token_cosine(files, tiny_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from trim_select.config import RenderConfig
    from trim_select.data import Renderer

    _run("rds", files, tiny_dir, tmp_path, targets="two")
    got = pq.read_table(tmp_path / "scores.parquet").column("score").to_numpy()
    tok = AutoTokenizer.from_pretrained(tiny_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32).eval()
    render = Renderer(tok, RenderConfig())

    def rep(record) -> torch.Tensor:  # one sequence, no padding: the state of its final token
        ids = torch.as_tensor(np.asarray(render(record).input_ids))[None]
        with torch.no_grad():
            h = model(input_ids=ids, output_hidden_states=True).hidden_states[-1][0, -1]
        return h / h.norm()

    targets = torch.stack([rep(t) for t in load_records(files["two"])])
    pool = torch.stack([rep(r) for r in load_records(files["pool"])])
    want = (pool @ targets.T).mean(1).numpy()  # LESS's rule: mean cosine to the targets (one group)
    assert np.ptp(want) > 0.01
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_rds_reuses_a_pool_pass_only_for_the_same_tokens_and_gives_the_same_scores(files, tiny_dir, tmp_path):
    edited = tmp_path / "edited.jsonl"  # same rows and row count, one word changed: other token ids
    lines = files["pool"].read_text().splitlines()
    lines[0] = lines[0].replace('"content": "', '"content": "Changed ', 1)
    edited.write_text("\n".join(lines) + "\n")

    def rds(pool: Path, targets: str, out: str) -> tuple[dict, np.ndarray]:
        report = run_baseline("rds", pool, files[targets], tmp_path / out, 4, config=_cfg(tiny_dir),
                              progress=False)
        return report, pq.read_table(tmp_path / out / "scores.parquet").column("score").to_numpy()

    first, _ = rds(edited, "one", "first")  # the edited pool is this test's own: nothing to reuse
    assert first["method_info"]["pool_states"] == "computed"
    second, reused = rds(edited, "two", "second")  # another target set on the same pool: reused
    assert second["method_info"]["pool_states"] == "reused from this process's identical pass (its cost repeated)"
    assert second["cost"]["forward_passes"] == first["cost"]["forward_passes"] + 1  # 16 pool rows + 2 targets
    other, _ = rds(files["pool"], "two", "other")  # the original pool differs in row 0's tokens only
    assert other["method_info"]["pool_states"] == "computed"
    fresh, recomputed = rds(edited, "two", "fresh")  # the process keeps one pass: computed again
    assert fresh["method_info"]["pool_states"] == "computed"
    np.testing.assert_array_equal(reused, recomputed)


def test_rds_on_warmup_checkpoints_reuses_each_checkpoints_pool_pass(files, warmup_dir, tmp_path):
    cfg = BaselineConfig(model=str(warmup_dir), runtime=RuntimeConfig(device="cpu", dtype="float32"))
    edited = tmp_path / "edited.jsonl"  # this test's own pool, so no earlier test's pass is reused
    lines = files["pool"].read_text().splitlines()
    lines[1] = lines[1].replace('"content": "', '"content": "Warm ', 1)
    edited.write_text("\n".join(lines) + "\n")

    def rds(pool: Path, targets: str, out: str) -> tuple[dict, np.ndarray]:
        report = run_baseline("rds", pool, files[targets], tmp_path / out, 4, config=cfg, progress=False)
        return report, pq.read_table(tmp_path / out / "scores.parquet").column("score").to_numpy()

    first, _ = rds(edited, "one", "first")
    second, reused = rds(edited, "two", "second")  # both checkpoints' passes kept, not only the last one
    assert len(second["method_info"]["checkpoints"]) == 2
    assert first["method_info"]["pool_states"] == "computed"
    assert second["method_info"]["pool_states"] == "reused from this process's identical pass (its cost repeated)"
    assert second["cost"]["forward_passes"] == first["cost"]["forward_passes"] + 2  # 2 checkpoints x 1 target more
    rds(files["pool"], "two", "other")  # another pool drops the kept passes
    fresh, recomputed = rds(edited, "two", "fresh")
    assert fresh["method_info"]["pool_states"] == "computed"
    np.testing.assert_allclose(reused, recomputed, rtol=0, atol=0)
