"""Several target sets from one pool forward (issue 13) and the mask-free right-padded forward."""

import numpy as np
import pytest
import torch
from samples import POOL as SHARED_POOL
from transformers import LlamaConfig, MistralConfig

from trim_select import build_fingerprints
from trim_select.batching import collate, padding_mask_free
from trim_select.config import RenderConfig
from trim_select.data import Message, Renderer
from trim_select.scoring import Scorer, score_details, score_details_many

GSM = [
    [Message("user", "How many clips did Natalia sell in April and May?"),
     Message("assistant", "Natalia sold 48 clips in April and 24 in May. #### 72")],
    [Message("user", "Compute 3 + 4 * 2."), Message("assistant", "3 + 8 = 11. #### 11")],
]
SOCIAL = [
    [Message("user", "Sasha helped her friend move the couch. How would her friend feel?"),
     Message("assistant", "grateful")],
]
CODE = [[Message("user", "def add(a, b):"), Message("assistant", "    return a + b")]]
POOL = [*SHARED_POOL, [Message("user", "Weng earns $12 an hour."), Message("assistant", "The quick brown fox jumps.")]]


def _render(tok, convs, scope="all"):
    r = Renderer(tok, RenderConfig(scope=scope))
    return [r.render(c) for c in convs]


@pytest.fixture(scope="module")
def targets(tiny):
    return {name: build_fingerprints(tiny.model, _render(tiny.tokenizer, convs), layers=2)
            for name, convs in (("gsm", GSM), ("social_iqa", SOCIAL), ("code", CODE))}


def _assert_identical(a, b):
    for k, v in a.columns().items():
        w = getattr(b, k)
        assert v.dtype == w.dtype, k
        assert np.array_equal(v, w, equal_nan=True), k


@pytest.mark.parametrize("penalty", [1.0, None])
@pytest.mark.parametrize("mask_free", [True, False])
def test_each_target_of_a_multi_target_pass_is_bit_identical_to_its_single_target_run(
        tiny, targets, penalty, mask_free):
    pool = _render(tiny.tokenizer, POOL)
    kw = dict(penalty=penalty, batch_tokens=120, chunk_size=4, mask_free=mask_free)  # padded batches, 2 chunks
    many = score_details_many(tiny.model, pool, targets, **kw)
    assert list(many) == ["gsm", "social_iqa", "code"]
    for name, fp in targets.items():
        _assert_identical(many[name], score_details(tiny.model, pool, fp, **kw))
    assert not np.array_equal(many["gsm"].score, many["social_iqa"].score)  # really different targets


def test_multi_target_scorer_forwards_each_batch_once(tiny, targets):
    pool = _render(tiny.tokenizer, POOL)
    scorer = Scorer(tiny.model, targets, batch_tokens=120)
    calls = []
    handle = scorer.base.register_forward_hook(lambda *a: calls.append(1))
    try:
        out = scorer.score_sequences_many(pool, on_batch=lambda n: None)
    finally:
        handle.remove()
    single = Scorer(tiny.model, targets["gsm"], batch_tokens=120)
    n_batches = []
    single.score_sequences(pool, on_batch=n_batches.append)
    assert len(calls) == len(n_batches) > 1
    assert set(out) == set(targets)


def test_single_target_scorer_refuses_many_targets_in_score_sequences(tiny, targets):
    scorer = Scorer(tiny.model, targets)
    with pytest.raises(ValueError, match="score_sequences_many"):
        scorer.score_sequences(_render(tiny.tokenizer, POOL))
    with pytest.raises(ValueError, match="no target set"):
        Scorer(tiny.model, {})


def test_right_padded_hidden_states_without_mask_equal_masked_ones_at_real_positions(tiny):
    pool = _render(tiny.tokenizer, POOL)
    batch = collate(pool, torch.device("cpu"), pad_id=0)
    assert not bool(batch["attention_mask"].all())  # there is padding
    base = tiny.model.model
    with torch.no_grad():
        masked = base(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"].long(),
                      use_cache=False).last_hidden_state
        free = base(input_ids=batch["input_ids"], attention_mask=None, use_cache=False).last_hidden_state
    real = batch["attention_mask"]
    assert torch.equal(masked[real], free[real])


def test_mask_free_forward_is_the_default_where_exact_and_scores_equal_the_masked_ones(tiny, targets):
    pool = _render(tiny.tokenizer, POOL)
    free = Scorer(tiny.model, targets, batch_tokens=120)
    masked = Scorer(tiny.model, targets, batch_tokens=120, mask_free=False)
    assert free.mask_free and not masked.mask_free
    a, b = free.score_sequences_many(pool), masked.score_sequences_many(pool)
    for name in targets:
        _assert_identical(a[name], b[name])


def _config(cls=LlamaConfig, **kw):
    cfg = cls(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, **kw)
    cfg._attn_implementation = "sdpa"
    return cfg


@pytest.mark.parametrize("cfg, why", [
    (_config(MistralConfig, sliding_window=8), "sliding window"),
    (_config(layer_types=["sliding_attention"]), "layer types"),
])
def test_padding_mask_is_kept_where_dropping_it_is_not_exact(cfg, why):
    exact, reason = padding_mask_free(cfg)
    assert not exact and why in reason


def test_padding_mask_is_kept_for_left_padding_unknown_families_and_implementations():
    assert padding_mask_free(_config())[0]
    assert not padding_mask_free(_config(), padding_side="left")[0]
    cfg = _config()
    cfg._attn_implementation = "flex_attention"
    assert "implementation" in padding_mask_free(cfg)[1]
    cfg = _config()
    cfg.model_type = "bloom"  # ALiBi biases come from the mask
    assert not padding_mask_free(cfg)[0]


def test_scorer_falls_back_to_the_mask_when_not_exact(tiny, targets, monkeypatch):
    monkeypatch.setattr(tiny.model.config, "sliding_window", 4, raising=False)
    scorer = Scorer(tiny.model, targets["gsm"])
    assert not scorer.mask_free and "sliding window" in scorer.mask_free_reason
