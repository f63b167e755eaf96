"""Records -> token sequences: input formats, rendering and scope masks.

Data flows one way: a pool or target *file* is read into :class:`Record` objects (one per row,
validated, with the original bytes kept for verbatim copy-through), each record is rendered with
the model's chat template into ``input_ids`` plus the masks docs/SPEC.md defines:

- ``special_mask``: token id is one of ``tokenizer.all_special_ids``;
- ``scope_mask``: token lies in the chosen scope (``all``, ``prompt`` = user turns,
  ``response`` = assistant turns).

Supported formats (auto-detected from the first record, ``format=`` overrides):
``messages`` (open-instruct / LESS), ``sharegpt`` (``conversations`` with ``from``/``value``),
``alpaca`` (``instruction``/``input``/``output``), ``prompt_response`` (``prompt`` with
``response`` or ``completion``) and ``text``. Files: ``.jsonl``, ``.jsonl.gz``, ``.json``,
``.parquet`` or a folder written by ``datasets.Dataset.save_to_disk``.

Modules: ``records`` (the types, `DataError`), ``formats`` (detect and parse one row), ``readers``
(files -> records), ``render`` (messages -> `TokenSequence`), ``budget`` (`parse_budget`).
"""

from __future__ import annotations

from .budget import parse_budget
from .formats import FORMATS, ROLES, detect_format, parse_raw_row, parse_row
from .readers import load_records, read_records
from .records import DataError, FieldError, Message, ReadStats, Record
from .render import PLAIN_TEMPLATE_HEADERS, Renderer, TokenSequence, as_sequence

__all__ = [
    "FORMATS", "PLAIN_TEMPLATE_HEADERS", "ROLES", "DataError", "FieldError", "Message", "ReadStats", "Record",
    "Renderer", "TokenSequence", "as_sequence", "detect_format", "load_records", "parse_budget",
    "parse_raw_row", "parse_row", "read_records",
]
