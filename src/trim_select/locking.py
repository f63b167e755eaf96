"""One running command per output folder: ``OUT/.trim-select.lock`` holds pid, host and command.

A second live command into a locked folder stops at once with :class:`FolderLockedError` naming the
holder's pid, host and command (it does not wait: two commands racing on the same parts is always a
mistake, and a clear error is better than a silent queue). The lock is removed on exit, on
exceptions and on Ctrl-C/SIGTERM; a lock left by a process that was killed (``kill -9``, a crashed
node) is detected — same host and that pid no longer runs — and taken over with a one-line warning.

Shard jobs (``score --shard i/n``) write into one folder by design: each takes its own lock
``.trim-select.shard-i-of-n.lock``, so shards run side by side, the same shard twice does not, and a
whole-folder command (``select``, ``merge`` ...) refuses while any shard of that folder is live (and
vice versa). Locks are re-entrant inside one process (``run`` -> ``select`` on the same folder).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

LOCK_NAME = ".trim-select.lock"
_HELD: dict[str, int] = {}  # lock files this process holds -> nesting depth


class FolderLockedError(RuntimeError):
    """Another live command holds the output folder."""


def shard_lock_name(shard: tuple[int, int]) -> str:
    return f".trim-select.shard-{shard[0]}-of-{shard[1]}.lock"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _read(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):  # half-written by a process killed mid-write: treat as stale
        return {}


def _is_live(info: dict[str, Any]) -> bool:
    if info.get("host") != socket.gethostname():
        return True  # cannot check another host's processes: assume it runs
    pid = info.get("pid")
    return isinstance(pid, int) and _alive(pid)


def _describe(path: Path, info: dict[str, Any]) -> str:
    return (f"{path.parent} is in use by pid {info.get('pid')} on {info.get('host')} "
            f"({info.get('command')!r}, since {info.get('started')}); wait for it to finish, or, if that "
            f"process is gone, delete {path}")


def _live_others(folder: Path, name: str) -> list[tuple[Path, dict[str, Any]]]:
    """Live locks that exclude ``name``: whole-folder vs shard locks exclude each other."""
    shard = name != LOCK_NAME
    pattern = LOCK_NAME if shard else ".trim-select.shard-*.lock"
    out = []
    for p in folder.glob(pattern):
        info = _read(p)
        if info and _is_live(info) and info.get("pid") != os.getpid():
            out.append((p, info))
    return out


def _acquire(path: Path, command: str) -> None:
    info = {"pid": os.getpid(), "host": socket.gethostname(), "command": command,
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    for _ in range(3):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            held = _read(path)
            if held is None:
                continue  # released meanwhile
            if held and _is_live(held):
                raise FolderLockedError(_describe(path, held)) from None
            log.warning("taking over the stale lock %s of pid %s (%s), which no longer runs",
                        path, held.get("pid"), held.get("command"))
            path.unlink(missing_ok=True)
            continue
        with os.fdopen(fd, "w") as fh:
            fh.write(json.dumps(info) + "\n")
        return
    raise FolderLockedError(f"could not take the lock {path}: another command keeps taking it")


@contextlib.contextmanager
def folder_lock(folder: str | Path, command: str | None = None, *,
                shard: tuple[int, int] | None = None) -> Iterator[Path]:
    """Hold the lock of ``folder`` (created if missing) for the block; see the module docstring."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    name = LOCK_NAME if shard is None else shard_lock_name(shard)
    path = folder.resolve() / name
    key = str(path)
    if key in _HELD:
        _HELD[key] += 1
        try:
            yield path
        finally:
            _HELD[key] -= 1
        return
    others = _live_others(path.parent, name)
    if others:
        raise FolderLockedError(_describe(*others[0]))
    _acquire(path, command or " ".join(sys.argv))
    _HELD[key] = 1
    try:
        yield path
    finally:
        del _HELD[key]
        path.unlink(missing_ok=True)
