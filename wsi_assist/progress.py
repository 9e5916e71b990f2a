"""Batch progress: rich bars on a terminal, periodic plain log lines elsewhere (cluster logs)."""

from __future__ import annotations

import logging
import time
from typing import Any

log = logging.getLogger("wsi_assist")


class BatchProgress:
    """Counts slides as they finish; ``rich`` when ``live``, log lines every ``every`` s."""

    def __init__(self, live: bool, quiet: bool = False, every: float = 30.0) -> None:
        self.live, self.quiet, self.every = live and not quiet, quiet, every
        self.total = self.done = 0
        self.t0 = self.last = time.monotonic()
        self._bar: Any = None
        self._task: Any = None

    def start(self, total: int) -> None:
        self.total = total
        self.t0 = self.last = time.monotonic()
        if self.live:
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )

            self._bar = Progress(TextColumn("[bold]slides"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("{task.description}"), TimeElapsedColumn(),
                                 TextColumn("ETA"), TimeRemainingColumn())
            self._bar.start()
            self._task = self._bar.add_task("", total=total)
        elif not self.quiet:
            log.info("%d slides to process", total)

    def advance(self, result: Any) -> None:
        self.done += 1
        tps = result.tiles_per_s
        note = f"{result.slide_id}: {result.status}" + (f", {tps:.0f} tiles/s" if tps else "")
        if self._bar is not None:
            self._bar.update(self._task, advance=1, description=note)
        elif not self.quiet:
            now = time.monotonic()
            if now - self.last >= self.every or self.done == self.total:
                self.last = now
                rate = self.done / max(now - self.t0, 1e-9)
                eta = (self.total - self.done) / rate if rate else float("nan")
                log.info("%d/%d slides (%s); ETA %.0f s", self.done, self.total, note, eta)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
