"""Rows, conversations and records several test files share (imported like ``oracle``)."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from trim_select.data import Message, Record
from trim_select.testing import CORPUS

# task rows (evaluation/tasks.py formats): multiple choice and math with a worked solution
MC_ROWS = [
    {"id": "mc/0", "question": "Sasha helped her friend move the couch. How would her friend feel?",
     "choices": ["grateful", "angry at the robot", "Yes"], "answer_index": 0},
    {"id": "mc/1", "question": "The quick brown fox jumps. What does the dog do?",
     "choices": ["sleeps on the mat", "paints landscapes"], "answer_index": 0},
    {"id": "mc/2", "question": "Translate to French: Good morning.",
     "choices": ["Bonjour", "No", "Maybe"], "answer_index": 0},
]
MATH_ROWS = [
    {"id": "m/0", "question": "Natalia sold 48 clips in April and half as many in May. How many in all?",
     "answer": "72", "solution": "In May she sold 48 / 2 = 24 clips.\n48 + 24 = 72\n#### 72"},
    {"id": "m/1", "question": "Compute 3 + 4 * 2.", "answer": "11", "solution": "4 * 2 = 8\n3 + 8 = 11\n#### 11"},
    {"id": "m/2", "question": "Weng earns 12 an hour for 5 hours. How much?", "answer": "60",
     "solution": "12 * 5 = 60\n#### 60"},
]

# conversations for Stage I/II: every role, a multi-turn one and a plain text row
POOL = [
    [Message("user", "Translate to French: Good morning"), Message("assistant", "Bonjour")],
    [Message("user", "Tracy used a piece of wire 4 feet long. How long in inches?"),
     Message("assistant", "4 * 12 = 48. #### 48")],
    [Message("user", "Write a short story about a robot that learns to paint."),
     Message("assistant", "Once upon a time a robot painted landscapes in the morning light, zebra qux.")],
    [Message("system", "Be brief."), Message("user", "Sasha helped her friend. How would her friend feel?"),
     Message("assistant", "grateful"), Message("user", "Why?"), Message("assistant", "Because of help.")],
    [Message("text", "def add(a, b):\n    return a + b  # xyzzy")],
]


def chat_record(i: int, user: str, assistant: str) -> Record:
    msgs = (Message("user", user), Message("assistant", assistant))
    row = {"id": f"r{i}", "messages": [{"role": m.role, "content": m.content} for m in msgs]}
    return Record(index=i, line=i + 1, id=f"r{i}", messages=msgs, raw=json.dumps(row).encode())


def chat_records(n: int) -> list[Record]:
    return [chat_record(i, CORPUS[i % 12], CORPUS[(i * 5 + 1) % 12]) for i in range(n)]


def adapter_tensors(path) -> dict[str, torch.Tensor]:
    return load_file(str(path / "adapter_model.safetensors"))


def train_interrupted(train: Callable[..., Any], *args: Any, at: int, **kw: Any) -> None:
    """``train(*args, **kw)`` killed right after optimizer step ``at`` (an exception from ``on_step``)."""

    class Crash(Exception):
        pass

    def crash(step: int, _rec: dict) -> None:
        if step == at:
            raise Crash

    with pytest.raises(Crash):
        train(*args, on_step=crash, **kw)
