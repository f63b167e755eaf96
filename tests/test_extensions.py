"""The extensions of docs/SPEC.md "Extensions" on the tiny model: an intermediate ``hidden_layer``
matches the naive float64 oracle at that layer, the generic correction is the score against the
targets minus the score against the generic rows computed separately, both equal
``benchmarks/ablations.py``'s variants, cache keys hold them, and ``--exact-spec`` is the paper."""

import dataclasses
import hashlib
import json
import sys
from pathlib import Path

import numpy as np
import oracle
import pyarrow.parquet as pq
import pytest
from test_core_matches_oracle import POOL, TARGETS, as_tuples, render
from typer.testing import CliRunner

from trim_select import build_fingerprints, score
from trim_select.cli import app
from trim_select.cli.common import build_configs
from trim_select.config import (
    FingerprintConfig,
    RenderConfig,
    RuntimeConfig,
    ScoreConfig,
    config_hash,
    exact_spec,
    paper_off,
    to_dict,
)
from trim_select.data import Renderer, load_records
from trim_select.generic import GENERIC_FILE, generic_positions
from trim_select.layers import hidden_at
from trim_select.models import base_model
from trim_select.scoring import Scorer
from trim_select.selector import TrimSelector

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
RUNTIME = RuntimeConfig(device="cpu", dtype="float32", batch_tokens=120, chunk_size=4)


def rows(convs, prefix):
    role = {"text": "user"}  # the oracle tests' plain-text row becomes a user turn in a file
    return [{"id": f"{prefix}/{i}", "dataset": prefix, "messages": [
        {"role": role.get(m.role, m.role), "content": m.content} for m in c]} for i, c in enumerate(convs)]


@pytest.fixture()
def files(tmp_path):
    pool = tmp_path / "pool.jsonl"
    pool.write_text("".join(json.dumps(r) + "\n" for r in rows(POOL * 2, "pool")))
    targets = tmp_path / "targets.jsonl"
    targets.write_text("".join(json.dumps(r) + "\n" for r in rows(TARGETS, "target")))
    return pool, targets


@pytest.fixture(scope="module")
def model64(tiny):
    return oracle.float64_eager(tiny.model)


def run_select(tiny, files, out, **configs):
    pool, targets = files
    sel = TrimSelector(tiny, runtime=RUNTIME, progress=False, **configs)
    sel.run(pool, out, "50%", targets=targets)
    return sel, pq.read_table(out / "scores.parquet").sort_by("index"), json.loads((out / "run.json").read_text())


# -- hidden layer -------------------------------------------------------------------------------


@pytest.mark.parametrize("layer", [1, 2])
@pytest.mark.parametrize("scope", ["all", "response"])
def test_hidden_layer_fingerprints_and_scores_match_the_float64_oracle_at_that_layer(tiny, model64, layer,
                                                                                       scope):
    targets = render(tiny.tokenizer, TARGETS, scope, score_template=False)
    pool = render(tiny.tokenizer, POOL, scope, score_template=False)
    fp = build_fingerprints(tiny.model, targets, layers=2, batch_tokens=64, hidden_layer=layer)
    ref_fp = oracle.fingerprints(model64, as_tuples(targets), layers=2, hidden_layer=layer)
    assert fp.token_ids.tolist() == sorted(ref_fp) and fp.meta["hidden_layer"] == layer
    np.testing.assert_allclose(fp.vectors, np.stack([ref_fp[t] for t in fp.token_ids]), atol=1e-4)

    got = Scorer(tiny.model, fp, batch_tokens=100, hidden_layer=layer).score_sequences(pool).score
    ref = oracle.scores(model64, as_tuples(pool), ref_fp, hidden_layer=layer)
    np.testing.assert_allclose(got, ref, atol=1e-4)
    last = oracle.scores(model64, as_tuples(pool), oracle.fingerprints(model64, as_tuples(targets), layers=2),
                         hidden_layer=-1)
    assert np.abs(ref - last).max() > 1e-3  # the layer changes the scores: the test can tell them apart


def test_stage_two_stops_at_the_layer_and_equals_output_hidden_states(tiny):
    base = base_model(tiny.model)
    ids = np.array([[5, 17, 40, 99, 123, 7]])
    import torch

    t = torch.as_tensor(ids)
    full = base(input_ids=t, output_hidden_states=True).hidden_states
    calls = []
    hook = base.layers[2].register_forward_hook(lambda *a: calls.append(1))
    try:
        got = hidden_at(base, 2, t, None)
    finally:
        hook.remove()
    assert torch.equal(got, full[2]) and not calls  # layer 3 of 3 never ran


def test_fingerprints_of_one_layer_are_refused_by_a_scorer_reading_another(tiny):
    targets = render(tiny.tokenizer, TARGETS, score_template=False)
    fp = build_fingerprints(tiny.model, targets, hidden_layer=1)
    with pytest.raises(ValueError, match="hidden layer 1 but Stage II reads hidden layer None"):
        score(tiny.model, render(tiny.tokenizer, POOL), fp)
    with pytest.raises(ValueError, match="not an intermediate layer of this 3-layer model"):
        build_fingerprints(tiny.model, targets, hidden_layer=3)


# -- generic correction ---------------------------------------------------------------------------


def test_generic_score_is_target_score_minus_generic_score_computed_separately(tiny, files, tmp_path):
    last = FingerprintConfig(hidden_fraction=None)  # the reference below reads the last hidden state
    sel, table, report = run_select(tiny, files, tmp_path / "out", scoring=ScoreConfig(generic_rows=3),
                                    fingerprint=last)
    pool_recs = load_records(files[0])
    picked = generic_positions(len(pool_recs), 3, 0)
    assert report["generic"]["ids"] == [pool_recs[i].id for i in picked]
    assert report["generic"]["indices"] == picked.tolist()

    renderer = Renderer(tiny.tokenizer, RenderConfig())
    seqs = [renderer(r) for r in pool_recs]
    fp_t = build_fingerprints(tiny.model, [renderer(r) for r in load_records(files[1])])
    fp_g = build_fingerprints(tiny.model, [seqs[i] for i in picked])
    s_t, s_g = score(tiny.model, seqs, fp_t), score(tiny.model, seqs, fp_g)
    np.testing.assert_allclose(table.column("target_score").to_numpy(), s_t, atol=1e-5)
    np.testing.assert_allclose(table.column("generic_score").to_numpy(), s_g, atol=1e-5)
    np.testing.assert_allclose(table.column("score").to_numpy(), s_t - s_g, atol=1e-5)
    ranked = np.argsort(-(s_t - s_g), kind="stable")[: report["counts"]["selected"]]
    assert sorted(table.filter(table.column("selected")).column("index").to_pylist()) == sorted(ranked.tolist())


def test_generic_fingerprints_are_cached_and_a_changed_seed_is_not_mixed_into_old_parts(tiny, files, tmp_path):
    out = tmp_path / "out"
    run_select(tiny, files, out, scoring=ScoreConfig(generic_rows=3))
    first = (out / GENERIC_FILE).stat().st_mtime_ns
    sel, _, _ = run_select(tiny, files, out, scoring=ScoreConfig(generic_rows=3))
    assert (out / GENERIC_FILE).stat().st_mtime_ns == first and sel.stats["chunks_computed"] == 0
    with pytest.raises(RuntimeError, match="partial scores from different settings"):
        run_select(tiny, files, out, scoring=ScoreConfig(generic_rows=3, generic_seed=1))


def test_multi_target_pass_applies_one_generic_set_to_every_target(tiny, files, tmp_path):
    from trim_select.engines.multi import run_many_in_process

    pool, targets = files
    sel = TrimSelector(tiny, runtime=RUNTIME, progress=False, scoring=ScoreConfig(generic_rows=3))
    run_many_in_process(sel, pool, tmp_path / "many", {"a": "50%"}, {"a": targets})
    _, single, _ = run_select(tiny, files, tmp_path / "one", scoring=ScoreConfig(generic_rows=3))
    many = pq.read_table(tmp_path / "many" / "a" / "scores.parquet").sort_by("index")
    for col in ("score", "target_score", "generic_score"):
        np.testing.assert_array_equal(many.column(col).to_numpy(), single.column(col).to_numpy())
    assert json.loads((tmp_path / "many" / "a" / "run.json").read_text())["generic"]["rows"] == 3


# -- the ablation benchmark's variants --------------------------------------------------------------


def ablation_scores(tiny, files, cache, variant, generic_rows=3):
    """``benchmarks/ablations.py``'s score of one variant for the pool (its own code path)."""
    sys.path.insert(0, str(BENCHMARKS))
    try:
        import ablations
    finally:
        sys.path.remove(str(BENCHMARKS))
    pool = load_records(files[0])
    cont = Renderer(tiny.tokenizer, RenderConfig(scope="all", score_template=False))
    seqs = [cont(r) for r in pool]
    n, lengths = len(seqs), np.array([len(s) for s in seqs])
    states, _, _ = ablations.pool_states(tiny, seqs, [variant.layer], cache)
    special = np.concatenate([s.special_mask for s in seqs])
    content = np.concatenate([s.scope_mask for s in seqs]) & ~special
    seg = np.repeat(np.arange(n), lengths)
    ctx = {"seg": seg, "n": n, "ids": np.concatenate([s.input_ids for s in seqs]), "lengths": lengths,
           "nonspecial": ~special, "content": content, "runpos": ablations.content_run_position(content, seg),
           "vocab": len(tiny.tokenizer)}
    emb = tiny.model.get_input_embeddings().weight

    def variant_score(recs, v):
        fp = ablations.fingerprints_at(tiny, [cont(x) for x in recs], v.layer)
        return ablations.score_variant(v, ablations.token_sims(fp, emb, states[v.layer], ctx["ids"]), ctx)

    s = variant_score(load_records(files[1]), variant)
    if variant.norm == "generic":
        picked = np.sort(np.random.default_rng(0).choice(n, generic_rows, replace=False))
        s = s - variant_score([pool[i] for i in picked], dataclasses.replace(variant, norm="none"))
    return s


@pytest.mark.parametrize("name", ["generic", "layer-2"])
def test_product_options_give_the_ablation_benchmarks_variant_scores(tiny, files, tmp_path, name):
    sys.path.insert(0, str(BENCHMARKS))
    try:
        from ablations import Variant
    finally:
        sys.path.remove(str(BENCHMARKS))
    variant = Variant("generic", norm="generic") if name == "generic" else Variant("layer-2", layer=2)
    configs = ({"scoring": ScoreConfig(generic_rows=3), "fingerprint": FingerprintConfig(hidden_fraction=None)}
               if name == "generic"
               else {"fingerprint": FingerprintConfig(hidden_layer=2)})
    _, table, _ = run_select(tiny, files, tmp_path / "out", **configs)
    ref = ablation_scores(tiny, files, tmp_path / "cache", variant)
    np.testing.assert_allclose(table.column("score").to_numpy(), ref, atol=5e-4)  # the benchmark keeps float16
    plain = ablation_scores(tiny, files, tmp_path / "cache", Variant("content"))
    assert np.abs(ref - plain).max() > 5e-3  # the variant is not today's default under another name (~0.007+)


# -- cache keys --------------------------------------------------------------------------------------


def test_extensions_left_off_keep_every_earlier_key_and_switched_on_change_them(tiny, files):
    paper = paper_off(FingerprintConfig())  # every extension off: the key from before they existed
    old_fields = {k: v for k, v in to_dict(paper).items() if k not in {"hidden_layer", "hidden_fraction"}}
    payload = json.dumps([old_fields], sort_keys=True)
    assert config_hash(paper) == hashlib.sha256(payload.encode()).hexdigest()[:16]
    assert config_hash(FingerprintConfig()) != config_hash(paper)  # the default's layer fraction is in its key
    assert len({config_hash(ScoreConfig()), config_hash(ScoreConfig(generic_rows=2)),
                config_hash(ScoreConfig(generic_rows=2, generic_seed=1))}) == 3
    pool, targets = files
    keys = set()
    for fpc in (paper, FingerprintConfig(hidden_layer=1), FingerprintConfig(hidden_layer=2)):
        sel = TrimSelector(tiny, fingerprint=fpc, runtime=RUNTIME, progress=False)
        keys.add(sel.stage1_key(targets))
        sel.fit(targets)
        keys.add(sel.scores_key(pool))
    assert len(keys) == 6


def test_a_depth_fraction_names_the_layer_at_that_fraction_of_each_model():
    two_thirds = FingerprintConfig(hidden_fraction=2 / 3)
    assert [two_thirds.layer_for(n) for n in (30, 18, 3, 2)] == [20, 12, 2, 1]  # SmolLM2-135M, Gemma-3-270M
    assert FingerprintConfig(hidden_fraction=0.9).layer_for(3) is None  # rounds to the last layer: the last state
    assert FingerprintConfig(hidden_fraction=1.0).layer_for(30) is None  # 1: the paper's last hidden state
    assert FingerprintConfig(hidden_fraction=0.5, hidden_layer=1).layer_for(30) == 1  # an explicit layer wins
    assert FingerprintConfig(hidden_fraction=None).layer_for(30) is None
    assert FingerprintConfig().layer_for(30) == 20  # the default (docs/SPEC.md "Extensions")
    for bad in (0.0, 1.5, -0.2):
        with pytest.raises(ValueError, match="hidden_fraction must be in"):
            FingerprintConfig(hidden_fraction=bad)


def test_the_depth_is_asked_only_when_a_fraction_needs_it():
    def no_depth() -> int:
        raise AssertionError("the depth was asked")

    assert FingerprintConfig(hidden_layer=4).layer_for(no_depth) == 4  # so no model needs loading
    assert FingerprintConfig(hidden_fraction=None).layer_for(no_depth) is None
    assert FingerprintConfig().layer_for(lambda: 30) == 20


def test_a_depth_fraction_selects_exactly_as_the_layer_it_resolves_to(tiny, files, tmp_path):
    n = int(tiny.model.config.num_hidden_layers)
    frac = FingerprintConfig(hidden_fraction=1.4 / n)  # rounds to layer 1
    sel, a, report = run_select(tiny, files, tmp_path / "frac", fingerprint=frac)
    assert sel.hidden_layer == 1 and report["fingerprints"]["hidden_layer"] == 1
    _, b, _ = run_select(tiny, files, tmp_path / "layer", fingerprint=FingerprintConfig(hidden_layer=1))
    np.testing.assert_array_equal(a.column("score").to_numpy(), b.column("score").to_numpy())
    _, c, _ = run_select(tiny, files, tmp_path / "last")
    assert not np.array_equal(a.column("score").to_numpy(), c.column("score").to_numpy())


def test_hidden_layer_runs_resume_from_their_own_fingerprints_only(tiny, files, tmp_path):
    out = tmp_path / "out"
    _, a, report = run_select(tiny, files, out, fingerprint=FingerprintConfig(hidden_layer=1))
    assert report["fingerprints"]["hidden_layer"] == 1 and report["config"]["fingerprint"]["hidden_layer"] == 1
    with pytest.raises(RuntimeError, match="partial scores from different settings"):
        run_select(tiny, files, out, fingerprint=FingerprintConfig(hidden_layer=2))
    _, b, _ = run_select(tiny, files, tmp_path / "other", fingerprint=FingerprintConfig(hidden_layer=1))
    np.testing.assert_array_equal(a.column("score").to_numpy(), b.column("score").to_numpy())


# -- --exact-spec ---------------------------------------------------------------------------------------


def test_exact_spec_scores_template_tokens_and_matches_the_float64_oracle(tiny, model64):
    render_c, fpc, scoring, runtime = build_configs(exact_spec=True, device="cpu", dtype="float32")
    assert render_c.score_template and render_c.scope == "all" and not scoring.idf
    assert (fpc, scoring) == (paper_off(FingerprintConfig()), paper_off(ScoreConfig()))
    assert fpc.layer_for(30) is None  # the default's intermediate layer is switched off, not refused
    sel = TrimSelector(tiny, render=render_c, fingerprint=dataclasses.replace(fpc, layers=2), scoring=scoring,
                       runtime=runtime, progress=False)
    sel.fit(TARGETS)
    pool = [sel.renderer().render(c) for c in POOL]
    got = sel.make_scorer().score_sequences(pool).score
    spec_targets, spec_pool = render(tiny.tokenizer, TARGETS), render(tiny.tokenizer, POOL)  # template scored
    ref = oracle.scores(model64, as_tuples(spec_pool), oracle.fingerprints(model64, as_tuples(spec_targets), 2))
    np.testing.assert_allclose(got, ref, atol=1e-4)


@pytest.mark.parametrize("bad", [{"idf": True}, {"hidden_layer": 2}, {"hidden_fraction": 0.5}, {"generic_rows": 4}])
def test_exact_spec_refuses_any_extension(bad):
    with pytest.raises(ValueError, match="--exact-spec reproduces the paper"):
        fp_fields = {"hidden_layer", "hidden_fraction"}
        exact_spec(RenderConfig(), FingerprintConfig(**{k: v for k, v in bad.items() if k in fp_fields}),
                   ScoreConfig(**{k: v for k, v in bad.items() if k not in fp_fields}))


def test_exact_spec_flag_on_the_cli(tiny_dir, files, tmp_path):
    pool, targets = files
    args = ["select", "--pool", pool, "--targets", targets, "--budget", "2", "--model", tiny_dir, "--device", "cpu",
            "--dtype", "float32", "--quiet"]
    res = CliRunner().invoke(app, [str(a) for a in [*args, "--out", tmp_path / "a", "--exact-spec"]])
    assert res.exit_code == 0, res.output
    report = json.loads((tmp_path / "a" / "run.json").read_text())
    assert report["config"]["render"]["score_template"] is True
    res = CliRunner().invoke(app, [str(a) for a in [*args, "--out", tmp_path / "b", "--exact-spec", "--idf"]])
    assert res.exit_code == 2 and "--exact-spec reproduces the paper" in res.output


# -- engines ---------------------------------------------------------------------------------------------


def test_local_workers_and_shards_give_the_in_process_result_with_both_extensions(tiny_dir, files, tmp_path):
    pool, targets = files
    common = ["--device", "cpu", "--dtype", "float32", "--chunk-size", "3", "--quiet", "--model", tiny_dir]
    ext = ["--generic-rows", "3", "--generic-seed", "1"]

    def cli(*args):
        res = CliRunner().invoke(app, [str(a) for a in args])
        assert res.exit_code == 0, f"{res.output}\n{res.exception!r}"

    ref = tmp_path / "ref"
    cli("select", "--pool", pool, "--targets", targets, "--budget", "4", "--out", ref, "--hidden-layer", "2",
        *ext, *common)
    fp = ref / "fingerprints.safetensors"
    want = pq.read_table(ref / "scores.parquet")
    assert json.loads((ref / "run.json").read_text())["config"]["scoring"]["generic_rows"] == 3
    local = tmp_path / "local"
    cli("score", "--pool", pool, "--fingerprints", fp, "--budget", "4", "--out", local, "--workers", "2", *ext,
        *common)
    shards = tmp_path / "shards"
    for i in range(2):
        cli("score", "--pool", pool, "--fingerprints", fp, "--budget", "4", "--out", shards, "--shard", f"{i}/2",
            *ext, *common)
    cli("merge", shards)
    for out in (local, shards):
        got = pq.read_table(out / "scores.parquet")
        for col in ("index", "score", "target_score", "generic_score", "selected"):
            assert got.column(col).equals(want.column(col)), (out.name, col)
        report = json.loads((out / "run.json").read_text())
        assert report["generic"]["ids"] == json.loads((ref / "run.json").read_text())["generic"]["ids"]
        assert report["fingerprints"]["hidden_layer"] == 2
    res = CliRunner().invoke(app, [str(a) for a in ["score", "--pool", pool, "--fingerprints", fp, "--out",
                                                     tmp_path / "ray", "--engine", "ray", *ext, *common]])
    assert res.exit_code == 2 and "not on --engine ray" in res.output
