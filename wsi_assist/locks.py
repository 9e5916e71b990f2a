"""Per-slide lock files, so two runs on one output folder never process a slide at once.

A lock is a file created with O_EXCL holding host, pid and start time. A lock left by a
dead process on this host is taken over; a lock from another host is respected until it
is older than ``stale_after`` seconds.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path

from wsi_assist.files import pid_alive

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Lock:
    path: Path
    host: str
    pid: int

    def release(self) -> None:
        if _read(self.path) == (self.host, self.pid):
            self.path.unlink(missing_ok=True)


def acquire(path: Path, stale_after: float = 24 * 3600) -> Lock | str:
    """Take the lock at ``path``; returns the Lock, or who holds it ("host pid N")."""
    path.parent.mkdir(parents=True, exist_ok=True)
    me = (socket.gethostname(), os.getpid())
    for _ in range(3):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder = _read(path)
            if holder is None or _is_stale(path, holder, stale_after):
                log.warning("taking over stale lock %s (held by %s)", path, holder)
                path.unlink(missing_ok=True)
                continue
            return f"host {holder[0]} pid {holder[1]}"
        try:
            with os.fdopen(fd, "w") as f:
                json.dump({"host": me[0], "pid": me[1], "since": time.time()}, f)
        except OSError:  # a full disk: no empty lock left behind to block others
            path.unlink(missing_ok=True)
            raise
        return Lock(path, *me)
    return "another process (lock changed hands repeatedly)"


def live_holder(path: Path, stale_after: float = 24 * 3600) -> tuple[str, int] | None:
    """(host, pid) of the process holding the lock at ``path``; None when the lock is
    free or stale (its holder died)."""
    holder = _read(path)
    if holder is None or _is_stale(path, holder, stale_after):
        return None
    return holder


def _read(path: Path) -> tuple[str, int] | None:
    try:
        d = json.loads(path.read_text())
        return str(d["host"]), int(d["pid"])
    except FileNotFoundError:
        return None
    except (ValueError, KeyError, TypeError):
        # half-written by a process killed between create and write: stale only if old
        return None if time.time() - _mtime(path) > 5 else ("?", -1)


def _is_stale(path: Path, holder: tuple[str, int], stale_after: float) -> bool:
    host, pid = holder
    if host == socket.gethostname() and pid > 0:
        return not pid_alive(pid)
    return time.time() - _mtime(path) > stale_after


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except FileNotFoundError:
        return 0.0
