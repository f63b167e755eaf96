"""Host pipeline: batch rendering and worker processes give exactly the per-record sequences."""

import numpy as np
import pytest

from trim_select.config import RenderConfig
from trim_select.data import Message, Renderer
from trim_select.host import RenderPool
from trim_select.testing import make_tokenizer

CONVS = [
    [Message("user", "How many clips did Natalia sell?"), Message("assistant", "  72 clips.\n")],
    [Message("system", "Be brief."), Message("user", "Why?"), Message("assistant", "Because."),
     Message("user", "And then?"), Message("assistant", "Done <|im_end|> here")],
    [Message("text", "def add(a, b):\n    return a + b")],
    [Message("user", "Write a story about a robot " * 40), Message("assistant", "Once upon a time " * 60)],
]


def _same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert np.array_equal(x.input_ids, y.input_ids)
        assert np.array_equal(x.scope_mask, y.scope_mask)
        assert np.array_equal(x.special_mask, y.special_mask)
        assert x.n_truncated == y.n_truncated


@pytest.mark.parametrize("scope", ["all", "prompt", "response"])
@pytest.mark.parametrize("max_length", [2048, 64])
def test_batch_rendering_equals_rendering_each_conversation(scope, max_length):
    r = Renderer(make_tokenizer(), RenderConfig(scope=scope, max_length=max_length))
    fresh = [Renderer(r.tokenizer, r.config).render(c) for c in CONVS]  # no skeleton cache shared
    _same(r.render_many(CONVS * 2), fresh * 2)
    assert r.render_many([]) == []


def test_render_pool_with_worker_processes_keeps_order_and_sequences():
    r = Renderer(make_tokenizer(), RenderConfig(scope="response"))
    records = [c[:1] + [Message("assistant", f"answer {k} " * (k % 7 + 1))] for k, c in enumerate(CONVS * 30)]
    want = [r.render(x) for x in records]
    with RenderPool(r, workers=2, chunk=16) as pool:
        _same(pool.render(records), want)
    with RenderPool(r, workers=0, chunk=16) as pool:
        _same(pool.render(records), want)
    with pytest.raises(ValueError, match="workers"):
        RenderPool(r, workers=-1)
