"""Model-facing evaluation primitives: chat rendering and continuation log-likelihood (lm-eval decodes).

- :class:`ChatEncoder` renders ``prompt messages + assistant answer`` with the tokenizer's chat
  template (or the plain ``<|user|>`` template of ``trim_select.data`` when it has none) and marks
  the answer's tokens by character offsets, so the scored tokens are exactly the ones the model
  reads in that position in training.
- :func:`continuation_logprobs` sums ``log p(answer token | everything before it)`` per sequence.
  Batches are right-padded and causal, so padding never changes a result; the LM head is applied
  only at the positions that predict answer tokens.
- :func:`shared_prefix_logprobs` does the same for the choices of one question with a single
  forward pass of their shared prompt (its key/value cache is reused for every choice).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..batching import plan_batches
from ..data import PLAIN_TEMPLATE_HEADERS, Message
from ..models import base_model


@dataclass(frozen=True)
class Encoded:
    """A tokenised prompt + answer. ``target_mask[i]``: token ``i`` belongs to the answer."""

    input_ids: np.ndarray
    target_mask: np.ndarray
    n_chars: int  # length of the answer text in characters (length normalisation)
    n_truncated: int = 0  # prompt tokens dropped from the left to fit ``max_length``

    @property
    def n_targets(self) -> int:
        return int(self.target_mask.sum())


class ChatEncoder:
    """Turns chat messages into token ids the way training renders them.

    ``use_chat_template=None`` uses the tokenizer's chat template when it has one.
    """

    def __init__(self, tokenizer: Any, *, use_chat_template: bool | None = None, max_length: int = 2048):
        if not getattr(tokenizer, "is_fast", False):
            raise TypeError("evaluation needs a fast (Rust) tokenizer for offset mapping")
        self.tokenizer = tokenizer
        has_template = bool(getattr(tokenizer, "chat_template", None))
        self.use_chat_template = has_template if use_chat_template is None else use_chat_template
        self.max_length = max_length

    def text(self, messages: Sequence[Message], *, add_generation_prompt: bool = False) -> str:
        """The rendered conversation (with the assistant header at the end if asked)."""
        if self.use_chat_template:
            conv = [{"role": m.role, "content": m.content} for m in messages]
            return self.tokenizer.apply_chat_template(conv, tokenize=False,
                                                      add_generation_prompt=add_generation_prompt)
        tok = self.tokenizer
        turns = "".join(PLAIN_TEMPLATE_HEADERS[m.role] + m.content + "\n" for m in messages)
        text = (tok.bos_token or "") + turns
        return text + (PLAIN_TEMPLATE_HEADERS["assistant"] if add_generation_prompt else tok.eos_token or "")

    def answer_span(self, prompt: Sequence[Message], answer: str) -> tuple[str, int, int]:
        """The rendered ``prompt + answer`` and the answer's character span in it.

        The span is located by offsets, never by searching for the answer's text (a short answer
        such as ``a`` also occurs inside ``<|im_start|>assistant``): the conversation rendered up
        to the assistant header must be a prefix of the full rendering, and the answer starts
        right after it.
        """
        text = self.text([*prompt, Message("assistant", answer)])
        head = self.text(prompt, add_generation_prompt=True)
        if not text.startswith(head) or not text.startswith(answer, len(head)):
            raise ValueError("the chat template does not render the assistant answer right after the "
                             "generation prompt; cannot locate the answer's tokens")
        return text, len(head), len(head) + len(answer)

    def encode_prompt(self, prompt: Sequence[Message]) -> np.ndarray:
        """Token ids of ``prompt`` followed by the assistant header (what a generation starts from)."""
        enc = self.tokenizer(self.text(prompt, add_generation_prompt=True), add_special_tokens=False)
        ids = np.asarray(enc["input_ids"], dtype=np.int64)
        return ids[-self.max_length:]

    def encode_answer(self, prompt: Sequence[Message], answer: str) -> Encoded:
        """Token ids of ``prompt`` + assistant ``answer`` and the mask of the answer's tokens."""
        text, a, b = self.answer_span(prompt, answer)
        enc = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids = np.asarray(enc["input_ids"], dtype=np.int64)
        offsets = np.asarray(enc["offset_mapping"], dtype=np.int64).reshape(-1, 2)
        starts, ends = offsets[:, 0], offsets[:, 1]
        target = (starts < b) & (ends > a) & (ends > starts)
        if not target.any():
            raise ValueError(f"answer {answer[:40]!r} has no tokens")
        first = int(np.argmax(target))
        if first == 0:
            raise ValueError("the answer starts the sequence: nothing to condition on")
        last = len(ids) - int(np.argmax(target[::-1]))  # one past the last answer token
        ids, target = ids[:last], target[:last]  # the template's end-of-turn tokens are not scored
        n_trunc = max(0, len(ids) - self.max_length)
        if n_trunc:
            if n_trunc >= first:
                raise ValueError(f"the answer alone is longer than max_length={self.max_length}")
            ids, target = ids[n_trunc:], target[n_trunc:]
        return Encoded(ids, target, len(answer), n_trunc)


def _logit_head(model: Any) -> Callable[[torch.Tensor], torch.Tensor]:
    """hidden states -> float32 logits, with the model's final scaling / soft-capping when it has one
    (Cohere ``logit_scale``, Granite ``logits_scaling``, Gemma 2 ``final_logit_softcapping``)."""
    head = model.get_output_embeddings()
    cap = getattr(model.config, "final_logit_softcapping", None)
    scale = getattr(model.config, "logit_scale", None)
    divide = getattr(model.config, "logits_scaling", None)

    def apply(h: torch.Tensor) -> torch.Tensor:
        logits = head(h).float()
        if scale is not None:
            logits = logits * scale
        if divide:
            logits = logits / divide
        if cap:
            logits = torch.tanh(logits / cap) * cap
        return logits

    return apply


def next_token_logprobs(head: Callable[[torch.Tensor], torch.Tensor], hidden: torch.Tensor, ids: torch.Tensor,
                        rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """``log p(ids[r, c + 1] | hidden[r, c])`` for each (row, col) pair: the LM head only where needed."""
    rows_t = torch.from_numpy(rows).to(hidden.device)
    cols_t = torch.from_numpy(cols).to(hidden.device)
    logp = torch.log_softmax(head(hidden[rows_t, cols_t]), dim=-1)
    return logp.gather(1, ids[rows_t, cols_t + 1].unsqueeze(1)).squeeze(1).double().cpu().numpy()


@torch.inference_mode()
def continuation_logprobs(
    model: Any,
    items: Sequence[Encoded],
    *,
    batch_tokens: int = 8192,
    max_batch_size: int = 64,
    pad_id: int = 0,
    on_batch: Callable[[int], None] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Per item: the summed log-probability of its answer tokens and their number.

    Returns ``(logprob_sum float64[n], n_tokens int64[n])``.
    """
    n = len(items)
    sums = np.zeros(n, dtype=np.float64)
    counts = np.array([it.n_targets for it in items], dtype=np.int64)
    if n == 0:
        return sums, counts
    device = next(model.parameters()).device
    decoder, head = base_model(model), _logit_head(model)
    for batch in plan_batches([len(it.input_ids) for it in items], batch_tokens, max_batch_size):
        t = max(len(items[i].input_ids) for i in batch)
        ids = np.full((len(batch), t), pad_id, dtype=np.int64)
        attn = np.zeros((len(batch), t), dtype=np.int64)
        target = np.zeros((len(batch), t), dtype=bool)
        for r, i in enumerate(batch):
            it = items[i]
            ids[r, :len(it.input_ids)] = it.input_ids
            attn[r, :len(it.input_ids)] = 1
            target[r, :len(it.input_ids)] = it.target_mask
        ids_t = torch.from_numpy(ids).to(device)
        hidden = decoder(input_ids=ids_t, attention_mask=torch.from_numpy(attn).to(device)).last_hidden_state
        # position p predicts token p + 1
        rows, cols = np.nonzero(target[:, 1:])
        tok_lp = next_token_logprobs(head, hidden, ids_t, rows, cols)
        np.add.at(sums, np.asarray(batch)[rows], tok_lp)
        if on_batch is not None:
            on_batch(len(batch))
    return sums, counts


def _common_prefix(group: Sequence[Encoded]) -> int:
    """Length of the prompt shared by every item of ``group`` (0 when their prompts differ)."""
    first = [int(np.argmax(it.target_mask)) for it in group]
    p = first[0]
    same = all(np.array_equal(it.input_ids[:p], group[0].input_ids[:p]) for it in group)
    return p if same and all(f == p for f in first) else 0


@torch.inference_mode()
def shared_prefix_logprobs(
    model: Any,
    groups: Sequence[Sequence[Encoded]],
    *,
    pad_id: int = 0,
    on_group: Callable[[int], None] | None = None,
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """:func:`continuation_logprobs` for groups that share their prompt (the choices of one question).

    The prompt goes through the model once; its key/value cache is repeated for every answer,
    which is then scored in one right-padded batch. Same numbers as scoring each sequence whole (up
    to float rounding); a group whose prompts differ is scored whole. Returns per-group arrays.
    """
    from transformers import DynamicCache

    device = next(model.parameters()).device
    decoder, head = base_model(model), _logit_head(model)
    sums_out, counts_out = [], []
    for group in groups:
        p = _common_prefix(group)
        if p == 0 or any(not it.target_mask[p:].all() for it in group):
            s, c = continuation_logprobs(model, group, pad_id=pad_id)
            sums_out.append(s)
            counts_out.append(c)
            if on_group is not None:
                on_group(1)
            continue
        prefix = torch.from_numpy(group[0].input_ids[:p]).unsqueeze(0).to(device)
        cache = DynamicCache()
        pre = decoder(input_ids=prefix, past_key_values=cache, use_cache=True)
        first_lp = torch.log_softmax(head(pre.last_hidden_state[0, -1]), dim=-1)
        m = len(group)
        conts = [it.input_ids[p:] for it in group]
        t = max(len(c) for c in conts)
        ids = np.full((m, t), pad_id, dtype=np.int64)
        attn = np.zeros((m, p + t), dtype=np.int64)
        attn[:, :p] = 1
        for r, c in enumerate(conts):
            ids[r, :len(c)] = c
            attn[r, p:p + len(c)] = 1
        ids_t = torch.from_numpy(ids).to(device)
        sums = np.array([float(first_lp[int(c[0])]) for c in conts], dtype=np.float64)
        if t > 1:
            pre.past_key_values.batch_repeat_interleave(m)
            pos = torch.arange(p, p + t, device=device).unsqueeze(0).expand(m, t)
            hidden = decoder(input_ids=ids_t, attention_mask=torch.from_numpy(attn).to(device),
                             position_ids=pos, past_key_values=pre.past_key_values,
                             use_cache=True).last_hidden_state
            valid = np.zeros((m, t), dtype=bool)  # cont position j predicts cont token j + 1
            for r, c in enumerate(conts):
                valid[r, :len(c) - 1] = True
            rows, cols = np.nonzero(valid)
            tok_lp = next_token_logprobs(head, hidden, ids_t, rows, cols)
            np.add.at(sums, rows, tok_lp)
        sums_out.append(sums)
        counts_out.append(np.array([len(c) for c in conts], dtype=np.int64))
        if on_group is not None:
            on_group(1)
    return sums_out, counts_out


def common_prompt_prefix(items: Sequence[Encoded]) -> int:
    """Tokens every item starts with, never reaching into any item's answer (the few-shot prefix)."""
    if not items:
        return 0
    ref = items[0].input_ids
    p = min(int(np.argmax(it.target_mask)) for it in items)
    for it in items[1:]:
        a, b = ref[:p], it.input_ids[:p]
        diff = np.flatnonzero(a != b)
        p = int(diff[0]) if diff.size else p
        if p == 0:
            break
    return p


@torch.inference_mode()
def prefix_cached_logprobs(
    model: Any,
    items: Sequence[Encoded],
    *,
    batch_tokens: int = 8192,
    max_batch_size: int = 16,
    pad_id: int = 0,
    min_prefix: int = 64,
    on_batch: Callable[[int], None] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """:func:`continuation_logprobs` with the prompt prefix all items share run through the model once.

    A k-shot prompt repeats the same exemplar turns in front of every test row (~1,500 tokens of
    ``gsm``'s 4 worked solutions before a ~250-token question and answer): their key/value cache
    is computed once and repeated for each right-padded batch of the rows' remainders. Same
    numbers as scoring each sequence whole, up to float rounding; falls back to whole sequences
    when the shared prefix is shorter than ``min_prefix`` tokens (e.g. 0-shot, or a left-truncated
    row). Returns ``(logprob_sum float64[n], n_tokens int64[n])``.
    """
    from transformers import DynamicCache

    p = common_prompt_prefix(items)
    if len(items) < 2 or p < min_prefix:
        return continuation_logprobs(model, items, batch_tokens=batch_tokens, pad_id=pad_id, on_batch=on_batch)
    device = next(model.parameters()).device
    decoder, head = base_model(model), _logit_head(model)
    pre = decoder(input_ids=torch.from_numpy(items[0].input_ids[:p]).unsqueeze(0).to(device),
                  past_key_values=DynamicCache(), use_cache=True)
    first_lp = torch.log_softmax(head(pre.last_hidden_state[0, -1]), dim=-1).double().cpu().numpy()
    sums = np.zeros(len(items), dtype=np.float64)
    counts = np.array([it.n_targets for it in items], dtype=np.int64)
    for batch in plan_batches([len(it.input_ids) - p for it in items], batch_tokens, max_batch_size):
        t = max(len(items[i].input_ids) for i in batch) - p
        ids = np.full((len(batch), t), pad_id, dtype=np.int64)
        attn = np.zeros((len(batch), p + t), dtype=np.int64)
        attn[:, :p] = 1
        target = np.zeros((len(batch), t), dtype=bool)
        for r, i in enumerate(batch):
            rest = items[i].input_ids[p:]
            ids[r, :len(rest)] = rest
            attn[r, p:p + len(rest)] = 1
            target[r, :len(rest)] = items[i].target_mask[p:]
        first = np.flatnonzero(target[:, 0])  # a remainder whose first token is scored
        sums[np.asarray(batch)[first]] += first_lp[ids[first, 0]]
        cache = copy.deepcopy(pre.past_key_values)
        cache.batch_repeat_interleave(len(batch))
        ids_t = torch.from_numpy(ids).to(device)
        pos = torch.arange(p, p + t, device=device).unsqueeze(0).expand(len(batch), t)
        hidden = decoder(input_ids=ids_t, attention_mask=torch.from_numpy(attn).to(device), position_ids=pos,
                         past_key_values=cache, use_cache=True).last_hidden_state
        rows, cols = np.nonzero(target[:, 1:])  # remainder position j predicts its token j + 1
        tok_lp = next_token_logprobs(head, hidden, ids_t, rows, cols)
        np.add.at(sums, np.asarray(batch)[rows], tok_lp)
        if on_batch is not None:
            on_batch(len(batch))
    return sums, counts
