"""The host pipeline: records -> rendered token sequences, in this process or in worker processes.

One process renders with the chat template and tokenises with the tokenizer's batch encoding
(:meth:`Renderer.render_many`); ``workers > 0`` spreads chunks of records over that many worker
processes (``RuntimeConfig.tokenizer_workers``), each holding its own copy of the renderer, and
returns the sequences in input order. Results are identical either way.
"""

from __future__ import annotations

import multiprocessing as mp
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from itertools import islice
from typing import Any

from .config import RenderConfig
from .data import Message, Record, Renderer, TokenSequence

_RENDERER: Renderer | None = None  # one per worker process


def _init_worker(tokenizer: Any, config: RenderConfig) -> None:
    global _RENDERER
    import os

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    _RENDERER = Renderer(tokenizer, config)


def _render_chunk(conversations: list[tuple[Message, ...]]) -> list[TokenSequence]:
    assert _RENDERER is not None, "worker not initialised"
    return _RENDERER.render_many(conversations)


class RenderPool:
    """Render records in ``workers`` processes (0: in this one); a context manager."""

    def __init__(self, renderer: Renderer, workers: int = 0, chunk: int = 256):
        if workers < 0:
            raise ValueError(f"workers must be >= 0, got {workers}")
        self.renderer, self.workers, self.chunk = renderer, workers, chunk
        self._ex: ProcessPoolExecutor | None = None
        if workers:
            self._ex = ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn"), initializer=_init_worker,
                                           initargs=(renderer.tokenizer, renderer.config))

    def __enter__(self) -> RenderPool:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        if self._ex is not None:
            self._ex.shutdown(cancel_futures=True)
            self._ex = None

    def render(self, records: Sequence[Record | Sequence[Message]]) -> list[TokenSequence]:
        """Sequences of ``records`` (or conversations) in order."""
        return list(self.iter_render(records))

    def iter_render(self, records: Iterable[Record | Sequence[Message]]) -> Iterator[TokenSequence]:
        convs = (tuple(r.messages) if isinstance(r, Record) else tuple(r) for r in records)
        chunks = iter(lambda: list(islice(convs, self.chunk)), [])
        if self._ex is None:
            for c in chunks:
                yield from self.renderer.render_many(c)
            return
        # bounded read-ahead: at most 2 chunks per worker in flight
        pending: list[Any] = []
        for c in chunks:
            pending.append(self._ex.submit(_render_chunk, c))
            if len(pending) >= 2 * self.workers:
                yield from pending.pop(0).result()
        for fut in pending:
            yield from fut.result()
