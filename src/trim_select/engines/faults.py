"""The engines' documented fault-injection hook (tests): a worker that dies right after writing a part,
as a killed worker would. Every engine passes :meth:`FaultInjector.part_written` as the ``on_part``
callback of the chunk scoring (:func:`trim_select.engines.base.score_chunk`), so no test patches
:class:`~trim_select.io.ScoreWriter`. Off unless ``TRIM_SELECT_FAULT_AFTER_PARTS`` is set."""

from __future__ import annotations

import os
from typing import Any

# a worker dies (os._exit) right after writing this many parts
FAULT_AFTER_ENV = "TRIM_SELECT_FAULT_AFTER_PARTS"
# with the hook: only the first worker to get there dies (it creates this file)
FAULT_ONCE_ENV = "TRIM_SELECT_FAULT_ONCE"
FAULT_EXIT_CODE = 17


class FaultInjector:
    """The documented fault-injection hook of the engines (tests): every engine passes
    :meth:`part_written` as the ``on_part`` callback of the chunk scoring, so no test patches
    :class:`~trim_select.io.ScoreWriter`. With ``TRIM_SELECT_FAULT_AFTER_PARTS=N`` in the driver's
    environment a worker dies (exit code 17, no clean-up) right after writing its N-th part; with
    ``TRIM_SELECT_FAULT_ONCE=FILE`` only the first worker to get there does (it creates FILE). Off
    unless the variable is set."""

    def __init__(self, after: int = 0, once: str | None = None) -> None:
        self.after, self.once = after, once
        self.count = 0

    @staticmethod
    def settings() -> dict[str, Any]:
        """The driver's settings, passed on to its workers."""
        return {"after": int(os.environ.get(FAULT_AFTER_ENV, "0") or 0),
                "once": os.environ.get(FAULT_ONCE_ENV)}

    def part_written(self) -> None:
        if self.after <= 0:
            return
        self.count += 1
        if self.count < self.after:
            return
        if self.once:
            try:
                os.close(os.open(self.once, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            except FileExistsError:
                return
        os._exit(FAULT_EXIT_CODE)
