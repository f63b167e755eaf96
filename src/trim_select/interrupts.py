"""Ctrl-C and SIGTERM stop a run, even when their KeyboardInterrupt is swallowed.

A signal handler's exception is raised wherever the main thread happens to be. When that is
inside a finalizer (``__del__``, a weakref callback, a GC callback), CPython prints "Exception
ignored in ..." and carries on: pyarrow's ``ParquetWriter.__del__`` runs after every part is
written, so a SIGTERM landing there used to be lost and the run finished with exit code 0.
:func:`stop_on_signals` records each signal before raising, and the chunk loops call
:func:`check_stop` after each part, so a swallowed interrupt still stops the run one part later.
"""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Iterator
from typing import Any

_RECEIVED: list[int] = []  # signals received inside stop_on_signals(); never cleared by a handler


def _on_signal(signum: int, frame: Any) -> None:
    _RECEIVED.append(signum)
    raise KeyboardInterrupt(f"received {signal.Signals(signum).name}")


@contextlib.contextmanager
def stop_on_signals() -> Iterator[None]:
    """For the block, SIGINT and SIGTERM raise KeyboardInterrupt and are recorded for
    :func:`check_stop` (main thread only); the previous handlers and an empty record after it."""
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    _RECEIVED.clear()
    for sig in previous:
        signal.signal(sig, _on_signal)
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
        _RECEIVED.clear()


def check_stop() -> None:
    """Raise KeyboardInterrupt if a stop signal was received (its own exception may have been
    swallowed by a finalizer); a no-op outside :func:`stop_on_signals` (library calls, engine workers)."""
    if _RECEIVED:
        raise KeyboardInterrupt(f"received {signal.Signals(_RECEIVED[0]).name}")
