"""Equal-token control (--match-tokens), fill-up to the budget and the A/A order control (evaluation/controls.py)."""

import numpy as np
import pytest

from trim_select.evaluation.controls import (
    fill_to_budget,
    match_tokens,
    matched_label,
    method_of,
    prefix_for_tokens,
    selectable_ranking,
    shuffled_label,
    shuffled_order,
)


def test_longer_coreset_is_trimmed_from_the_bottom_and_shorter_extended_with_next_ranked():
    tokens = np.array([10, 100, 10, 100, 10, 100, 10, 100, 10, 10])
    rankings = {
        "trim": np.array([0, 2, 4, 6, 8, 9, 1, 3, 5, 7]),   # short rows first
        "bm25": np.array([1, 3, 5, 7, 0, 2, 4, 6, 8, 9]),   # long rows first
    }
    out = match_tokens(rankings, tokens, budget=4, reference="bm25")
    assert out["bm25"].tolist() == [1, 3, 5, 7]          # 400 tokens, kept
    # trim's 4 rows hold 40 tokens: extended along its own ranking to 60 + 3x100 = 360 (next: 460):
    # 400 - 360 = 40 < 60 = 460 - 400, so the shorter prefix is closer
    assert out["trim"].tolist() == [0, 2, 4, 6, 8, 9, 1, 3, 5]
    assert int(tokens[out["trim"]].sum()) == 360
    back = match_tokens(rankings, tokens, budget=4, reference="trim")
    assert back["trim"].tolist() == [0, 2, 4, 6]          # 40 tokens
    assert back["bm25"].tolist() == [1]                  # trimmed to its best row (100 closest to 40)


def test_prefix_is_closest_to_target_with_ties_to_shorter():
    tokens = np.array([5, 5, 5, 5])
    order = np.arange(4)
    assert prefix_for_tokens(order, tokens, 10).tolist() == [0, 1]
    assert prefix_for_tokens(order, tokens, 12).tolist() == [0, 1]      # 10 is closer than 15
    assert prefix_for_tokens(order, tokens, 13).tolist() == [0, 1, 2]
    assert prefix_for_tokens(order, tokens, 12.5).tolist() == [0, 1]    # tie: shorter
    assert prefix_for_tokens(order, tokens, 999).tolist() == [0, 1, 2, 3]
    assert prefix_for_tokens(order, tokens, 1).tolist() == [0]


def test_matching_agrees_with_a_brute_force_search():
    rng = np.random.default_rng(0)
    tokens = rng.integers(1, 300, size=60)
    rankings = {m: rng.permutation(60) for m in ("a", "b", "c")}
    out = match_tokens(rankings, tokens, budget=6, reference="a")
    target = int(tokens[rankings["a"][:6]].sum())
    for m in ("b", "c"):
        cum = np.cumsum(tokens[rankings[m]])
        best = min(range(1, 61), key=lambda k: (abs(int(cum[k - 1]) - target), k))
        assert len(out[m]) == best
        assert out[m].tolist() == rankings[m][:best].tolist()


def test_unknown_reference_method_is_an_error():
    with pytest.raises(KeyError, match="match-tokens"):
        match_tokens({"a": np.arange(3)}, np.ones(3), 1, "bm25")


def test_rejected_rows_are_not_in_a_ranking_and_fill_up_reaches_the_budget():
    scores = np.array([0.5, -np.inf, 2.0, np.nan, 1.0])
    assert selectable_ranking(scores).tolist() == [2, 4, 0]
    # a filter left 2 of a budget of 4: filled with the next rows of the fallback ranking
    assert fill_to_budget(np.array([3, 2, 1, 0, 4]), np.array([2, 4]), 4).tolist() == [2, 4, 3, 1]


def test_shuffled_order_keeps_the_rows_changes_their_order_and_repeats_per_seed():
    positions = np.array([7, 3, 9, 1, 4, 8])
    a, again, other = shuffled_order(positions, 0), shuffled_order(positions, 0), shuffled_order(positions, 1)
    assert sorted(a.tolist()) == sorted(positions.tolist()) and not np.array_equal(a, positions)
    assert np.array_equal(a, again) and not np.array_equal(a, other)
    assert shuffled_order(np.array([5, 6]), 0).tolist() == [6, 5]  # two rows: the only other order
    assert shuffled_order(np.array([5]), 0).tolist() == [5]


def test_a_control_label_names_its_method():
    assert method_of(shuffled_label("bm25")) == "bm25" and method_of(matched_label("trim", "bm25")) == "trim"
    assert method_of("trim-layer-20") == "trim-layer-20"
