"""The scored tokens are the answer's, even when the answer text also occurs in the template."""

import pytest

from trim_select.data import Message
from trim_select.evaluation.inference import ChatEncoder
from trim_select.testing import make_tokenizer


@pytest.mark.parametrize("answer", ["a", "start", "im", "assistant", "Yes"])
def test_short_answer_inside_template_tokens_is_located_by_offset(answer):
    tok = make_tokenizer()
    enc = ChatEncoder(tok)
    prompt = [Message("user", "Pick a or b."), Message("assistant", "a"), Message("user", "Again: a or b?")]
    item = enc.encode_answer(prompt, answer)
    scored = tok.decode(item.input_ids[item.target_mask].tolist())
    assert scored == answer
    head = tok(enc.text(prompt, add_generation_prompt=True), add_special_tokens=False)["input_ids"]
    assert item.input_ids[:len(head)].tolist() == head  # everything before is the prompt
    assert not item.target_mask[:len(head)].any()
