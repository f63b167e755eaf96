"""Rendering: messages -> :class:`TokenSequence` (``input_ids`` with scope and special masks) with
the model's chat template, and :func:`as_sequence` for the low-level API's mappings."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..config import RenderConfig
from .records import Message, Record

PLAIN_TEMPLATE_HEADERS = {"system": "<|system|>\n", "user": "<|user|>\n", "assistant": "<|assistant|>\n"}


@dataclass(frozen=True)
class TokenSequence:
    """A rendered example: what Stage I and II consume."""

    input_ids: np.ndarray  # int64 [T]
    scope_mask: np.ndarray  # bool [T]
    special_mask: np.ndarray  # bool [T]
    n_truncated: int = 0  # tokens cut by max_length

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    # mapping protocol, so a TokenSequence is accepted wherever the low-level API takes a mapping
    def keys(self) -> tuple[str, ...]:
        return ("input_ids", "scope_mask", "special_mask")

    def __getitem__(self, key: str) -> np.ndarray:
        return getattr(self, key)


class Renderer:
    """Turns messages into a :class:`TokenSequence` with the model's chat template.

    Scope masks are computed from character spans of each message's content inside the rendered
    text, mapped to tokens through the tokenizer's offsets, so multi-turn conversations mark every
    user and every assistant turn correctly whatever the template looks like.
    """

    def __init__(self, tokenizer: Any, config: RenderConfig = RenderConfig()):
        if not getattr(tokenizer, "is_fast", False):
            raise TypeError("trim-select needs a fast (Rust) tokenizer for offset mapping")
        self.tokenizer = tokenizer
        self.config = config
        has_template = bool(getattr(tokenizer, "chat_template", None))
        self.use_chat_template = has_template if config.chat_template is None else config.chat_template
        if self.use_chat_template and not has_template:
            raise ValueError("chat_template=True but the tokenizer has no chat template")
        self.special_ids = np.array(sorted(set(tokenizer.all_special_ids)), dtype=np.int64)
        self._skeletons: dict[tuple[str, ...], str] = {}  # placeholder rendering per role sequence

    # -- text with content spans ---------------------------------------------------------------
    def _template_text(self, messages: Sequence[Message]) -> str:
        if len(messages) == 1 and messages[0].role == "text":
            return messages[0].content
        if self.use_chat_template:
            conv = [{"role": m.role, "content": m.content} for m in messages]
            return self.tokenizer.apply_chat_template(conv, tokenize=False)
        bos = self.tokenizer.bos_token or ""
        eos = self.tokenizer.eos_token or ""
        return bos + "".join(PLAIN_TEMPLATE_HEADERS[m.role] + m.content + "\n" for m in messages) + eos

    def _text_and_spans(self, messages: Sequence[Message]) -> tuple[str, list[tuple[int, int, str]]]:
        """The rendered text and the character span of every message's content in it.

        The template is rendered once with a unique placeholder per message, so content is located
        exactly (never inside the template's own tokens, e.g. an ``i`` inside ``<|im_start|>``);
        templates that trim content are handled by matching the stripped content.
        """
        text = self._template_text(messages)
        if len(messages) == 1 and messages[0].role == "text":
            return text, [(0, len(text), "text")]
        marks = [f"\ue000{k}\ue001" for k in range(len(messages))]
        roles = tuple(m.role for m in messages)
        skeleton = self._skeletons.get(roles)
        if skeleton is None:  # depends on the roles only; a content-dependent template fails the check below
            skeleton = self._template_text([Message(m.role, mark) for m, mark in zip(messages, marks, strict=True)])
            if len(self._skeletons) < 4096:
                self._skeletons[roles] = skeleton
        for strip in (False, True):
            spans, out, pos, length = [], [], 0, 0
            for m, mark in zip(messages, marks, strict=True):
                at = skeleton.find(mark, pos)
                if at < 0:
                    break
                out.append(skeleton[pos:at])
                length += at - pos
                content = m.content.strip() if strip else m.content
                spans.append((length, length + len(content), m.role))
                out.append(content)
                length += len(content)
                pos = at + len(mark)
            else:
                out.append(skeleton[pos:])
                if "".join(out) == text:
                    return text, spans
        # a template that rewrites content: fall back to locating it in order
        spans, cursor = [], 0
        for k, m in enumerate(messages):
            content = m.content if text.find(m.content, cursor) >= 0 else m.content.strip()
            start = text.find(content, cursor)
            if start < 0:
                raise ValueError(f"message {k} ({m.role}) not found verbatim in the rendered template")
            spans.append((start, start + len(content), m.role))
            cursor = start + len(content)
        return text, spans

    def render(self, messages: Sequence[Message]) -> TokenSequence:
        text, spans = self._text_and_spans(messages)
        enc = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        return self._sequence(enc["input_ids"], enc["offset_mapping"], spans)

    def render_many(self, conversations: Sequence[Sequence[Message]]) -> list[TokenSequence]:
        """:meth:`render` of many conversations with one batch call of the (Rust) tokenizer."""
        if not conversations:
            return []
        rendered = [self._text_and_spans(m) for m in conversations]
        enc = self.tokenizer([t for t, _ in rendered], add_special_tokens=False, return_offsets_mapping=True)
        return [self._sequence(ids, offs, spans) for ids, offs, (_, spans)
                in zip(enc["input_ids"], enc["offset_mapping"], rendered, strict=True)]

    def _sequence(self, input_ids: Sequence[int], offset_mapping: Sequence[Any],
                  spans: list[tuple[int, int, str]]) -> TokenSequence:
        cfg = self.config
        ids = np.asarray(input_ids, dtype=np.int64)
        offsets = np.asarray(offset_mapping, dtype=np.int64).reshape(-1, 2)
        starts, ends = offsets[:, 0], offsets[:, 1]
        scope = np.zeros(len(ids), dtype=bool)
        for a, b, role in spans:
            if (
                cfg.scope == "all"
                or (cfg.scope == "prompt" and role == "user")
                or (cfg.scope == "response" and role in ("assistant", "text"))
            ):
                scope |= (starts < b) & (ends > a) & (ends > starts)
        if cfg.scope == "all" and cfg.score_template:
            scope[:] = True
        special = np.isin(ids, self.special_ids)
        n_trunc = max(0, len(ids) - cfg.max_length)
        if n_trunc:
            # scope-aware: a response-scope run keeps the end (the response), others the start
            keep = slice(n_trunc, None) if cfg.scope == "response" else slice(0, cfg.max_length)
            ids, scope, special = ids[keep], scope[keep], special[keep]
        return TokenSequence(ids, scope, special, n_trunc)

    def __call__(self, record: Record) -> TokenSequence:
        return self.render(record.messages)


def as_sequence(item: Mapping[str, Any] | TokenSequence) -> TokenSequence:
    """Normalise a low-level API input (mapping with ``input_ids`` and optional masks)."""
    if isinstance(item, TokenSequence):
        return item
    if "input_ids" not in item:
        raise KeyError("each example needs 'input_ids'")
    ids = np.asarray(item["input_ids"], dtype=np.int64).reshape(-1)
    n = ids.shape[0]
    scope = item.get("scope_mask")
    special = item.get("special_mask")
    scope = np.ones(n, dtype=bool) if scope is None else np.asarray(scope, dtype=bool).reshape(-1)
    special = np.zeros(n, dtype=bool) if special is None else np.asarray(special, dtype=bool).reshape(-1)
    if scope.shape[0] != n or special.shape[0] != n:
        raise ValueError(f"masks must have the length of input_ids ({n}); got {scope.shape[0]}, "
                         f"{special.shape[0]}")
    return TokenSequence(ids, scope, special)

