"""Formats, files, rendering and scope masks."""

import gzip
import json

import numpy as np
import pytest

from trim_select.config import RenderConfig
from trim_select.data import DataError, Message, ReadStats, Renderer, load_records, parse_budget, read_records

CONV = {"messages": [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "How many clips?"},
    {"role": "assistant", "content": "72 clips."},
    {"role": "user", "content": "And in May?"},
    {"role": "assistant", "content": "24 clips."},
]}


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.parametrize(
    "row, expected",
    [
        (CONV, [("system", "Be brief."), ("user", "How many clips?"), ("assistant", "72 clips."),
                ("user", "And in May?"), ("assistant", "24 clips.")]),
        ({"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]},
         [("user", "Hi"), ("assistant", "Hello")]),
        ({"instruction": "Add.", "input": "2 and 3", "output": "5"}, [("user", "Add.\n\n2 and 3"), ("assistant", "5")]),
        ({"instruction": "Say hi.", "input": "", "output": "hi"}, [("user", "Say hi."), ("assistant", "hi")]),
        ({"prompt": "Q?", "response": "A."}, [("user", "Q?"), ("assistant", "A.")]),
        ({"prompt": "Q?", "completion": "A."}, [("user", "Q?"), ("assistant", "A.")]),
        ({"text": "plain document"}, [("text", "plain document")]),
    ],
    ids=["messages", "sharegpt", "alpaca", "alpaca-no-input", "prompt-response", "prompt-completion", "text"],
)
def test_each_format_is_detected_and_parsed(tmp_path, row, expected):
    (rec,) = load_records(write_jsonl(tmp_path / "p.jsonl", [row]))
    assert [(m.role, m.content) for m in rec.messages] == expected


@pytest.mark.parametrize("suffix", [".jsonl", ".jsonl.gz", ".json", ".parquet", "datasets"])
def test_every_file_type_reads_the_same_records(tmp_path, suffix):
    rows = [{"id": f"r{i}", "prompt": f"question {i}", "response": f"answer {i}"} for i in range(3)]
    if suffix == ".jsonl":
        path = write_jsonl(tmp_path / "p.jsonl", rows)
    elif suffix == ".jsonl.gz":
        path = tmp_path / "p.jsonl.gz"
        with gzip.open(path, "wt") as fh:
            fh.writelines(json.dumps(r) + "\n" for r in rows)
    elif suffix == ".json":
        path = tmp_path / "p.json"
        path.write_text(json.dumps(rows))
    elif suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        path = tmp_path / "p.parquet"
        pq.write_table(pa.Table.from_pylist(rows), path)
    else:
        import datasets

        path = tmp_path / "ds"
        datasets.Dataset.from_list(rows).save_to_disk(str(path))
    recs = load_records(path)
    assert [r.id for r in recs] == ["r0", "r1", "r2"]
    assert [r.messages[1].content for r in recs] == ["answer 0", "answer 1", "answer 2"]
    assert all(json.loads(r.raw) == rows[k] for k, r in enumerate(recs))


def test_jsonl_records_keep_their_original_bytes(tmp_path):
    line = '{"prompt": "caf\u00e9  spaced",   "response": "x", "extra": [1, 2]}'
    path = tmp_path / "p.jsonl"
    path.write_bytes(line.encode() + b"\n")
    (rec,) = load_records(path)
    assert rec.raw == line.encode()


@pytest.mark.parametrize(
    "content, line, field, reason",
    [
        ('{"prompt": "a", "response": "b"}\n{"prompt": "a", "resp', 2, None, "malformed JSON"),
        ('{"messages": [{"role": "user", "content": 3}]}', 1, "messages[0].content", "expected a string"),
        ('{"messages": [{"role": "user", "content": "  "}]}', 1, "messages[0].content", "empty"),
        ('{"messages": []}', 1, "messages", "empty conversation"),
        ('{"messages": [{"role": "wizard", "content": "x"}]}', 1, "messages[0].role", "unknown role"),
        ('{"messages": [{"content": "x"}]}', 1, "messages[0].role", "missing"),
        ('{"instruction": "x", "output": null}', 1, "output", "missing"),
        ('{"foo": 1}', 1, None, "unknown record format"),
        ('[1, 2]', 1, None, "expected a JSON object"),
        ('{"prompt": "a", "response": "b"}\n{"text": "x"}', 2, "prompt", "missing"),
    ],
)
def test_bad_records_raise_with_file_line_and_field(tmp_path, content, line, field, reason):
    path = tmp_path / "bad.jsonl"
    path.write_text(content + "\n")
    with pytest.raises(DataError) as exc:
        load_records(path)
    err = exc.value
    assert (err.path, err.line, err.field) == (str(path), line, field)
    assert reason in err.reason
    assert str(path) in str(err) and f"line {line}" in str(err)


def test_non_utf8_line_is_reported_with_its_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b'{"text": "ok"}\n{"text": "\xff\xfe"}\n')
    with pytest.raises(DataError, match="line 2.*UTF-8"):
        load_records(path)


def test_skip_invalid_counts_and_hands_over_every_rejected_row(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"text": "a"}\n{"text": ""}\n\n{oops\n{"text": "b", "id": "x"}\n{"text": "c", "id": "x"}\n')
    stats, rejected = ReadStats(), []
    recs = list(read_records(path, skip_invalid=True, stats=stats,
                             on_reject=lambda e, raw, i: rejected.append((e.line, i, raw))))
    assert [r.messages[0].content for r in recs] == ["a", "b", "c"]
    assert [r.index for r in recs] == [0, 3, 4]
    assert (stats.rows, stats.records, stats.rejected, stats.blank_lines) == (5, 3, 2, 1)
    assert stats.duplicate_ids == 1 and stats.duplicate_examples == ["x"]
    assert [(line, i) for line, i, _ in rejected] == [(2, 1), (4, 2)]


def test_missing_file_and_unknown_format_are_clear_errors(tmp_path):
    with pytest.raises(DataError, match="file not found"):
        load_records(tmp_path / "nope.jsonl")
    path = write_jsonl(tmp_path / "p.jsonl", [{"text": "x"}])
    with pytest.raises(DataError, match="unknown format"):
        load_records(path, format="csv")
    (tmp_path / "p.csv").write_text("a,b\n")
    with pytest.raises(DataError, match="unsupported file type"):
        load_records(tmp_path / "p.csv")


# -- rendering and scope masks ------------------------------------------------------------------


def decoded(tok, seq, mask):
    return tok.decode(seq.input_ids[mask])


@pytest.fixture(scope="module")
def tok():
    from trim_select.testing import make_tokenizer

    return make_tokenizer()


def messages(row, fmt=None, tmp=None):
    from trim_select.data import parse_row

    return parse_row(row, fmt)


def test_response_scope_marks_every_assistant_turn_and_nothing_else(tok):
    r = Renderer(tok, RenderConfig(scope="response"))
    seq = r.render(messages(CONV, "messages"))
    assert decoded(tok, seq, seq.scope_mask) == "72 clips.24 clips."


def test_prompt_scope_marks_every_user_turn_and_nothing_else(tok):
    r = Renderer(tok, RenderConfig(scope="prompt"))
    seq = r.render(messages(CONV, "messages"))
    assert decoded(tok, seq, seq.scope_mask) == "How many clips?And in May?"


def test_all_scope_covers_the_template_only_with_score_template(tok):
    seq = Renderer(tok, RenderConfig(scope="all", score_template=True)).render(messages(CONV, "messages"))
    assert seq.scope_mask.all()
    content = Renderer(tok, RenderConfig(scope="all")).render(messages(CONV, "messages"))  # the default
    assert decoded(tok, content, content.scope_mask) == "Be brief.How many clips?72 clips.And in May?24 clips."


def test_special_mask_marks_the_tokenizers_special_tokens(tok):
    seq = Renderer(tok, RenderConfig()).render(messages(CONV, "messages"))
    special_ids = set(tok.all_special_ids)
    assert seq.special_mask.tolist() == [int(t) in special_ids for t in seq.input_ids]
    assert seq.special_mask.sum() == 2 * 5  # <|im_start|> and <|im_end|> around each of the 5 turns


@pytest.mark.parametrize("row, fmt, prompt, response", [
    ({"conversations": [{"from": "human", "value": "Hi there"}, {"from": "gpt", "value": "Hello you"}]},
     "sharegpt", "Hi there", "Hello you"),
    ({"instruction": "Add.", "input": "2 and 3", "output": "5"}, "alpaca", "Add.\n\n2 and 3", "5"),
    ({"prompt": "Q?", "response": "A."}, "prompt_response", "Q?", "A."),
    ({"text": "just text"}, "text", "", "just text"),
])
def test_scope_masks_for_each_format(tok, row, fmt, prompt, response):
    msgs = messages(row, fmt)
    p = Renderer(tok, RenderConfig(scope="prompt")).render(msgs)
    r = Renderer(tok, RenderConfig(scope="response")).render(msgs)
    assert decoded(tok, p, p.scope_mask) == prompt
    assert decoded(tok, r, r.scope_mask) == response


def test_plain_template_is_used_without_a_chat_template(tok):
    r = Renderer(tok, RenderConfig(scope="response", chat_template=False))
    seq = r.render([Message("user", "Hi"), Message("assistant", "Hello")])
    text = tok.decode(seq.input_ids)
    assert "<|user|>\nHi\n<|assistant|>\nHello" in text
    assert decoded(tok, seq, seq.scope_mask) == "Hello"


def test_truncation_keeps_the_scope_side_and_counts_cut_tokens(tok):
    long = [Message("user", "word " * 200), Message("assistant", "final answer 42")]
    full = Renderer(tok, RenderConfig(scope="response")).render(long)
    resp = Renderer(tok, RenderConfig(scope="response", max_length=32)).render(long)
    head = Renderer(tok, RenderConfig(scope="prompt", max_length=32)).render(long)
    assert len(resp) == len(head) == 32
    assert resp.n_truncated == head.n_truncated == len(full) - 32
    assert decoded(tok, resp, resp.scope_mask) == "final answer 42"
    np.testing.assert_array_equal(head.input_ids, full.input_ids[:32])


@pytest.mark.parametrize("budget, n, k", [("5%", 2000, 100), ("5%", 30, 2), ("2.5%", 20, 1), ("10", 50, 10),
                                          (7, 50, 7), (0.1, 45, 5), ("0%", 10, 0)])
def test_budget_parsing(budget, n, k):
    assert parse_budget(budget, n) == k


def test_budget_larger_than_the_pool_is_an_error():
    with pytest.raises(ValueError, match="larger than the pool"):
        parse_budget("11", 10)
