"""Eq. 1-7 on a small attention matrix worked out by hand."""

import math

import pytest
import torch

from trim_select.saliency import column_saliency, combine_saliency, row_saliency

A = torch.tensor([[1.0, 0.0, 0.0], [0.5, 0.5, 0.0], [0.2, 0.3, 0.5]])[None, None]  # [B=1, H=1, T, T]
CAUSAL = torch.ones(3, 3, dtype=torch.bool).tril()[None, None]
H2 = -(0.2 * math.log(0.2) + 0.3 * math.log(0.3) + 0.5 * math.log(0.5))


def test_row_saliency_by_hand():
    q = row_saliency(A, CAUSAL)[0, 0]
    assert q[0].item() == 0.0  # one visible key: no choice made
    assert q[1].item() == pytest.approx(0.0, abs=1e-6)  # uniform over 2 keys
    assert q[2].item() == pytest.approx(1 - H2 / math.log(3), abs=1e-6)


def test_row_counts_come_from_the_mask_not_from_nonzero_probabilities():
    underflow = torch.tensor([[1.0, 0.0], [1.0, 0.0]])[None, None]  # bf16 underflow: A_10 == 1, A_11 == 0
    q = row_saliency(underflow, torch.ones(2, 2, dtype=torch.bool).tril()[None, None])[0, 0]
    assert q[1].item() == pytest.approx(1.0, abs=1e-6)  # n_1 = 2 by the mask: a perfectly sharp choice


def test_column_saliency_by_hand():
    k = column_saliency(A, CAUSAL, torch.ones(1, 3, dtype=torch.bool))[0, 0]
    assert k.tolist() == pytest.approx([1.7 / 3, 0.8 / 2, 0.5 / 1])


def test_padding_queries_do_not_count_towards_column_saliency():
    padded = torch.zeros(1, 1, 4, 4)
    padded[0, 0, :3, :3] = A[0, 0]
    padded[0, 0, 3] = torch.tensor([0.1, 0.1, 0.1, 0.7])  # garbage row of a padding query
    visible = torch.ones(4, 4, dtype=torch.bool).tril()[None, None]
    valid = torch.tensor([[True, True, True, False]])
    k = column_saliency(padded, visible, valid)[0, 0]
    assert k[:3].tolist() == pytest.approx([1.7 / 3, 0.8 / 2, 0.5 / 1])


@pytest.mark.parametrize("special, expected_alpha_2", [
    ([True, False, False], 0.5 * (1 - H2 / math.log(3)) + 0.5 * 1.0),  # BOS excluded from min/max
    ([False, False, False], 0.5 * (1 - H2 / math.log(3)) + 0.5 * (0.5 - 0.4) / (1.7 / 3 - 0.4)),
])
def test_min_max_scaling_and_combination_by_hand(special, expected_alpha_2):
    q = row_saliency(A, CAUSAL)[:, 0]
    k = column_saliency(A, CAUSAL, torch.ones(1, 3, dtype=torch.bool))[:, 0]
    norm_mask = ~torch.tensor([special])
    alpha = combine_saliency(q, k, norm_mask, 0.5, 0.5)[0]
    assert alpha[2].item() == pytest.approx(expected_alpha_2, abs=1e-6)
    assert alpha[1].item() == pytest.approx(0.0, abs=1e-6)  # q_1 = 0 and K_1 is the minimum


def test_means_over_heads_and_layers_weight_every_head_equally(tiny):
    import numpy as np

    from trim_select.batching import collate
    from trim_select.data import TokenSequence
    from trim_select.saliency import SaliencyRecorder

    seq = TokenSequence(np.arange(5, 15), np.ones(10, bool), np.zeros(10, bool))
    batch = collate([seq], torch.device("cpu"))
    rec = SaliencyRecorder(tiny.model, layers=2)
    with rec.capture(batch["attention_mask"]):
        tiny.model.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"].long())
    q_mean, _ = rec.means()
    m = tiny.model
    m.set_attn_implementation("eager")
    try:
        attns = m(input_ids=batch["input_ids"], output_attentions=True).attentions[-2:]
    finally:
        m.set_attn_implementation("sdpa")
    causal = torch.ones(10, 10, dtype=torch.bool).tril()[None, None]
    want = torch.stack([row_saliency(a, causal) for a in attns]).mean(dim=(0, 2))
    torch.testing.assert_close(q_mean, want, atol=1e-5, rtol=1e-5)
