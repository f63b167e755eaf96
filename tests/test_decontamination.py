"""Word 13-gram overlap of pool rows with test rows (evaluation/decontamination.py)."""

from pathlib import Path

import pytest

from trim_select.data import Message, Record
from trim_select.evaluation.decontamination import (
    DecontaminationConfig,
    contaminated,
    drop_contaminated,
    ngrams,
    words,
)
from trim_select.evaluation.tasks import load_task

BENCH = next(p / "shared" / "bench" for p in Path(__file__).resolve().parents if (p / "shared" / "bench").is_dir())


def _rec(i, user, assistant="ok"):
    return Record(i, i + 1, f"p{i}", (Message("user", user), Message("assistant", assistant)), b"{}")


def test_words_are_normalised_before_ngrams():
    assert words("Hello, WORLD!  It's 4:30.") == ["hello", "world", "it", "s", "4", "30"]
    assert ngrams("a b c", 2) == {("a", "b"), ("b", "c")}
    assert ngrams("a b", 3) == set()


def test_planted_test_question_is_found_and_dropped():
    task = load_task(BENCH / "targets" / "gsm")
    planted = task.test[17].question.upper().replace(".", " . ")  # case and spacing changed
    records = [
        _rec(0, "Write a short story about a robot that learns to paint landscapes in the morning."),
        _rec(1, planted, "Let me think."),
        _rec(2, "What is 2 + 2? Answer with a number only please, no words at all."),
        _rec(3, "Summarise: " + " ".join(task.test[3].question.split()[:8])),  # 8 words < 13: no hit
    ]
    flagged = contaminated(records, [task])
    assert [f["index"] for f in flagged] == [1]
    assert flagged[0]["overlap"] >= 0.5
    kept = drop_contaminated(records, flagged)
    assert [r.index for r in kept] == [0, 2, 3]


def test_threshold_decides_partial_overlap():
    task = load_task(BENCH / "targets" / "social_iqa")
    q = task.test[0].question
    filler = " ".join(f"word{i}" for i in range(60))
    records = [_rec(0, filler + " " + q)]  # most of its 13-grams are filler
    assert contaminated(records, [task]) == []
    assert [f["index"] for f in contaminated(records, [task], DecontaminationConfig(threshold=0.01))] == [0]
    with pytest.raises(ValueError, match="threshold"):
        DecontaminationConfig(threshold=0.0)
