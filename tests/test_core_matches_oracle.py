"""Batched, padded, vectorised Stage I + II agree with the naive float64 loop (tests/oracle.py)."""

import numpy as np
import oracle
import pytest
from samples import POOL

from trim_select import build_fingerprints, score
from trim_select.config import RenderConfig
from trim_select.data import Message, Renderer, TokenSequence
from trim_select.fingerprints import NoFingerprintError

TARGETS = [
    [Message("user", "How many clips did Natalia sell in April and May?"),
     Message("assistant", "Natalia sold 48 clips in April and 24 in May. #### 72")],
    [Message("user", "Weng earns $12 an hour. How much for 50 minutes?"),
     Message("assistant", "12 / 60 = 0.2 per minute, 0.2 * 50 = 10. #### 10")],
    [Message("user", "Compute 3 + 4 * 2."), Message("assistant", "3 + 8 = 11. #### 11")],
]
def render(tok, convs, scope="all", score_template=True):
    r = Renderer(tok, RenderConfig(scope=scope, score_template=score_template))
    return [r.render(c) for c in convs]


def as_tuples(seqs):
    return [(s.input_ids.tolist(), s.scope_mask.tolist(), s.special_mask.tolist()) for s in seqs]


@pytest.fixture(scope="module")
def model64(tiny):
    return oracle.float64_eager(tiny.model)


@pytest.mark.parametrize("scope", ["all", "prompt", "response"])
@pytest.mark.parametrize("penalty", [1.0, 0.7, None])
def test_scores_match_naive_float64_oracle(tiny, model64, scope, penalty):
    targets = render(tiny.tokenizer, TARGETS, scope)
    pool = render(tiny.tokenizer, POOL, scope)
    fp = build_fingerprints(tiny.model, targets, layers=2, batch_tokens=64)  # several padded batches
    ref_fp = oracle.fingerprints(model64, as_tuples(targets), layers=2)
    assert fp.token_ids.tolist() == sorted(ref_fp)
    np.testing.assert_allclose(fp.vectors, np.stack([ref_fp[t] for t in fp.token_ids]), atol=1e-4)

    got = score(tiny.model, pool, fp, penalty=penalty, batch_tokens=100)
    ref = oracle.scores(model64, as_tuples(pool), ref_fp, penalty=penalty)
    assert np.array_equal(np.isinf(got), np.isinf(ref))
    fin = np.isfinite(ref)
    np.testing.assert_allclose(got[fin], ref[fin], atol=1e-4)


def test_scores_do_not_depend_on_batch_size_or_padding(tiny):
    targets = render(tiny.tokenizer, TARGETS)
    pool = render(tiny.tokenizer, POOL * 3)
    fp_a = build_fingerprints(tiny.model, targets, layers=3, batch_tokens=10_000)
    fp_b = build_fingerprints(tiny.model, targets, layers=3, batch_tokens=1)
    np.testing.assert_allclose(fp_a.vectors, fp_b.vectors, atol=1e-5)
    one = score(tiny.model, pool, fp_a, batch_tokens=1, chunk_size=1)
    many = score(tiny.model, pool, fp_a, batch_tokens=100_000, chunk_size=7)
    np.testing.assert_allclose(one, many, atol=1e-5)


def test_layers_beyond_model_depth_use_all_layers(tiny, model64):
    targets = render(tiny.tokenizer, TARGETS[:1])
    fp = build_fingerprints(tiny.model, targets, layers=99)
    ref = oracle.fingerprints(model64, as_tuples(targets), layers=3)
    assert fp.meta["layers"] == 3
    np.testing.assert_allclose(fp.vectors, np.stack([ref[t] for t in fp.token_ids]), atol=1e-4)


def test_unseen_tokens_are_counted_and_skipped_without_penalty(tiny):
    targets = render(tiny.tokenizer, TARGETS)
    fp = build_fingerprints(tiny.model, targets, layers=2)
    from trim_select.scoring import score_details

    pool = render(tiny.tokenizer, POOL)
    with_pen = score_details(tiny.model, pool, fp, penalty=1.0)
    without = score_details(tiny.model, pool, fp, penalty=None)
    assert (with_pen.n_unseen > 0).any()
    assert (without.n_unseen == 0).all()
    assert (without.n_scored == with_pen.n_scored - with_pen.n_unseen).all()


def test_example_with_no_scored_token_gets_minus_inf(tiny):
    fp = build_fingerprints(tiny.model, render(tiny.tokenizer, TARGETS), layers=2)
    seq = TokenSequence(np.array([5, 6, 7]), np.zeros(3, bool), np.zeros(3, bool))
    assert score(tiny.model, [seq], fp)[0] == -np.inf


def test_low_level_api_accepts_plain_mappings_with_default_masks(tiny):
    ids = tiny.tokenizer("How many clips did Natalia sell?")["input_ids"]
    fp = build_fingerprints(tiny.model, [{"input_ids": ids}], layers=2)
    assert len(fp) == len(set(ids))
    s = score(tiny.model, [{"input_ids": ids}, {"input_ids": ids[:3]}], fp)
    assert s.shape == (2,) and np.isfinite(s).all()


def test_empty_or_out_of_scope_target_set_is_an_error(tiny):
    with pytest.raises(NoFingerprintError, match="empty"):
        build_fingerprints(tiny.model, [], layers=2)
    seq = {"input_ids": [5, 6, 7], "scope_mask": [False] * 3}
    with pytest.raises(NoFingerprintError, match="nothing to fingerprint"):
        build_fingerprints(tiny.model, [seq], layers=2)


def test_stage_one_captures_only_the_last_layers(tiny, monkeypatch):
    from trim_select import saliency

    seen = []
    orig = saliency.SaliencyRecorder._accumulate

    def spy(self, attn, visible):
        seen.append(attn.shape)
        return orig(self, attn, visible)

    monkeypatch.setattr(saliency.SaliencyRecorder, "_accumulate", spy)
    build_fingerprints(tiny.model, render(tiny.tokenizer, TARGETS[:1]), layers=2)
    assert len(seen) == 2
    assert tiny.model.config._attn_implementation == "sdpa"  # restored afterwards


def test_stage_two_requests_no_attentions_and_no_logits(tiny, monkeypatch):
    from trim_select import saliency

    fp = build_fingerprints(tiny.model, render(tiny.tokenizer, TARGETS), layers=2)
    calls = []
    monkeypatch.setattr(saliency.SaliencyRecorder, "_accumulate", lambda *a: calls.append("attn"))
    hook = tiny.model.lm_head.register_forward_hook(lambda *a: calls.append("lm_head"))
    try:
        s = score(tiny.model, render(tiny.tokenizer, POOL), fp)
    finally:
        hook.remove()
    assert calls == [] and np.isfinite(s).all()
