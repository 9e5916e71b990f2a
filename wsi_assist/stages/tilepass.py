"""One stream pass per slide that feeds every tile consumer of the run.

The stages that read tiles (``tiles``: quality scores; ``embed``; ``submodels``: the
built-in nuclei and the ONNX sub-models) do not stream the slide themselves: each
*opens* (lays out what it needs and returns a :class:`Planned`: its consumers and how
to store their results), the planner (:func:`wsi_assist.stages.run_stages`) runs one
:func:`run_pass` for every consumer of the stages still to run, then each stage
*finishes* (stores its results). A stage run alone does the same with itself only.

A consumer is a function over an iterator of :class:`TileBatch` (the same functions the
stages called on a stream of their own: ``qc.tile_qc``, ``embed_batches``,
``run_models``, ``nuclei.analyse``), with its own batch size and rows, run in a thread
of its own fed through a short queue: consumers work in parallel with each other and
with the decoding threads, off the main thread.

Data flow of one pass::

    stream(carrier) ──► block consumers (haloed blocks, e.g. the built-in nuclei)
        └─ crops of each block's tiles ─► grid order ─► per-consumer batches ─► tile consumers

The carrier is the tile grid when no consumer reads haloed blocks. When one does, the
carrier is the block grid and every tile of the tile grid is cut out of its block:
each compressed chunk is decoded once for all. A tile equals its crop exactly when the
block is the same integer scale of the level as the tiles and their corners are aligned
to it (area resizing at an integer factor works cell by cell); otherwise the blocks are
streamed at level resolution and both blocks and tiles are area-resized here, as the
stream does. Tiles reach every tile consumer in grid order and in batches of the same
rows as a stream of their own would give, so results are those of separate passes.
"""

from __future__ import annotations

import dataclasses
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from wsi_assist.slide import Layout
from wsi_assist.stages.context import SlideContext
from wsi_assist.stream import TileBatch, resize_area, resize_tiles
from wsi_assist.tiling import TileGrid

log = logging.getLogger(__name__)

#: Batches queued ahead of each consumer.
QUEUE_DEPTH = 2
_END = object()


@dataclass(eq=False)
class Consumer:
    """One reader of the pass. ``run`` consumes the batches and returns a result (kept
    in ``result``). Tile consumers read ``grid`` (the slide's tile grid) at ``rows``
    (all when None); their batch ``index`` counts positions among those rows. A block
    consumer sets ``blocks`` and ``block_of`` (``TileGrid.blocks`` of ``grid``) and
    reads the blocks in their order, ``batch_size`` at a time."""

    stage: str
    name: str
    run: Callable[[Iterator[TileBatch]], Any]
    grid: TileGrid
    batch_size: int
    rows: np.ndarray | None = None
    blocks: TileGrid | None = None
    block_of: np.ndarray | None = None
    result: Any = None
    #: Seconds the consumer worked (its thread's time not spent waiting for tiles).
    busy_s: float = 0.0


@dataclass
class Planned:
    """What an opened stage asks of the pass, and how it stores the results."""

    consumers: list[Consumer]
    finish: Callable[[], dict[str, Any]]


@dataclass
class PassReport:
    """What one pass did: its wall time, what it streamed, the carrier batches, and each
    consumer's busy seconds."""

    seconds: float = 0.0
    carrier: str = ""
    n_batches: int = 0
    busy_s: dict[str, float] = field(default_factory=dict)


def run_alone(slide: SlideContext, planned: Planned) -> dict[str, Any]:
    """A stage run by itself: its consumers in one pass, then its ``finish``."""
    run_pass(slide, planned.consumers)
    return planned.finish()


def run_pass(slide: SlideContext, consumers: list[Consumer]) -> PassReport:
    """Stream the slide once for ``consumers`` (all over the same tile grid; block
    consumers of one block grid share its batch size, the first one's). An error of a
    consumer is raised with ``.stage`` set to the consumer's stage."""
    report = PassReport()
    if not consumers:
        return report
    t0 = time.perf_counter()
    tiles = [c for c in consumers if c.blocks is None]
    by_blocks: dict[int, list[Consumer]] = {}
    for c in consumers:
        if c.blocks is not None:
            by_blocks.setdefault(id(c.blocks), []).append(c)
    groups = list(by_blocks.values()) or [[]]
    for i, group in enumerate(groups):  # one group but for unusual configs
        _Pass(slide, group, tiles if i == 0 else [], report).run()
    report.seconds = time.perf_counter() - t0
    report.busy_s = {c.name: c.busy_s for c in consumers}
    log.debug("%s: one pass (%s) fed %s in %.2f s", slide.slide_id, report.carrier,
              ", ".join(f"{c.name} {c.busy_s:.2f} s" for c in consumers), report.seconds)
    return report


class _Feed:
    """A consumer's thread and queue."""

    def __init__(self, c: Consumer) -> None:
        self.c = c
        self.q: queue.Queue[Any] = queue.Queue(QUEUE_DEPTH)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._main, name=f"wsi-pass-{c.name}",
                                       daemon=True)

    def _batches(self) -> Iterator[TileBatch]:
        while True:
            t0 = time.perf_counter()
            item = self.q.get()
            self.c.busy_s -= time.perf_counter() - t0
            if item is _END:
                return
            yield item

    def _main(self) -> None:
        t0 = time.perf_counter()
        try:
            self.c.result = self.c.run(self._batches())
        except BaseException as e:  # noqa: BLE001  (re-raised in the main thread)
            self.error = e
        finally:
            self.c.busy_s += time.perf_counter() - t0

    def put(self, item: Any, failed: Callable[[], bool]) -> None:
        while self.thread.is_alive() and not failed():
            try:
                self.q.put(item, timeout=0.05)
                return
            except queue.Full:
                continue


class _Rebatch:
    """Tiles in grid order -> the batches of one tile consumer (its rows, its size)."""

    def __init__(self, c: Consumer, feed: _Feed, tile_shape: tuple[int, ...],
                 dtype: np.dtype, layout: Layout) -> None:
        n = len(c.grid)
        self.pos = np.full(n, -1, np.int64)  # grid row -> position among the rows
        rows = np.arange(n) if c.rows is None else np.asarray(c.rows, np.int64)
        self.pos[rows] = np.arange(len(rows))
        self.n, self.bs, self.feed = len(rows), c.batch_size, feed
        self.shape, self.dtype, self.layout = tile_shape, dtype, layout
        self.sent = 0  # positions handed on so far
        self.buf = np.empty((0, *tile_shape), dtype)
        self.bad = np.zeros(0, bool)
        self.fill = 0

    def whole(self, batch: TileBatch) -> TileBatch | None:
        """``batch`` (grid rows) as the consumer's next batch, when it is exactly that."""
        if self.fill or len(batch) != min(self.bs, self.n - self.sent):
            return None
        pos = self.pos[batch.index]
        if pos[0] != self.sent or not (np.diff(pos) == 1).all():
            return None
        self.sent += len(batch)
        return dataclasses.replace(batch, index=pos)

    def add(self, rows: np.ndarray, tiles: Any, damaged: np.ndarray | None,
            failed: Callable[[], bool]) -> None:
        """Copy the consumer's tiles among ``rows`` (grid order; ``tiles`` indexable
        alike) into its batches, handing each on once full."""
        pos = self.pos[rows]
        for j in np.flatnonzero(pos >= 0).tolist():
            if self.fill == 0:
                self.buf = np.empty((min(self.bs, self.n - self.sent), *self.shape),
                                    self.dtype)
                self.bad = np.zeros(len(self.buf), bool)
            self.buf[self.fill] = tiles[j]
            self.bad[self.fill] = damaged is not None and bool(damaged[j])
            self.fill += 1
            if self.fill == len(self.buf):
                idx = np.arange(self.sent, self.sent + self.fill)
                self.feed.put(TileBatch(index=idx, tiles=self.buf, layout=self.layout,
                                        damaged=self.bad if self.bad.any() else None),
                              failed)
                self.sent += self.fill
                self.fill = 0

    def complete(self) -> bool:
        return self.sent == self.n


def crop_scale(grid: TileGrid, blocks: TileGrid) -> int | None:
    """k when every tile of ``grid`` is, exactly, the crop of its delivered block at
    (level offset) / k: blocks and tiles the same integer scale ``k`` of the level, and
    the tiles' corners on that scale's lattice within their block; else None."""
    if grid.read_px % grid.tile_px or blocks.read_px % blocks.tile_px:
        return None
    k = grid.read_px // grid.tile_px
    if blocks.read_px // blocks.tile_px != k:
        return None
    aligned = not (blocks.level_coords() % k).any() and not (grid.level_coords() % k).any()
    return k if k == 1 or aligned else None


class _Pass:
    """One stream over one carrier grid, dispatched to its consumers' threads."""

    def __init__(self, slide: SlideContext, block_consumers: list[Consumer],
                 tile_consumers: list[Consumer], report: PassReport) -> None:
        self.slide, self.report = slide, report
        self.bcs, self.tcs = block_consumers, tile_consumers
        self.feeds = {id(c): _Feed(c) for c in [*block_consumers, *tile_consumers]}
        self.rebatch: list[_Rebatch] = []

    def failed(self) -> bool:
        return any(f.error is not None for f in self.feeds.values())

    def run(self) -> None:
        for f in self.feeds.values():
            f.thread.start()
        try:
            if self.bcs:
                self._blocks()
            else:
                self._tiles()
        finally:
            for f in self.feeds.values():
                f.put(_END, lambda: False)
            for f in self.feeds.values():
                f.thread.join()
        for c in [*self.bcs, *self.tcs]:
            err = self.feeds[id(c)].error
            if err is not None:
                err.stage = c.stage  # type: ignore[attr-defined]
                raise err
        if not all(r.complete() for r in self.rebatch):
            raise ValueError(f"{self.slide.path}: the tile pass delivered too few tiles")

    def _start(self, tile: np.ndarray, layout: Layout) -> None:
        self.rebatch = [_Rebatch(c, self.feeds[id(c)], tile.shape, tile.dtype, layout)
                        for c in self.tcs]

    def _to_tiles(self, batch: TileBatch) -> None:
        if not self.rebatch:
            self._start(batch.tiles[0], batch.layout)
        for r in self.rebatch:
            same = r.whole(batch)
            if same is not None:
                r.feed.put(same, self.failed)
            else:
                r.add(batch.index, batch.tiles, batch.damaged, self.failed)

    def _tiles(self) -> None:
        grid = self.tcs[0].grid
        self.report.carrier = f"{len(grid)} tiles"
        for batch in self.slide.stream(grid):
            self._to_tiles(batch)
            self.report.n_batches += 1
            if self.failed():
                return

    def _blocks(self) -> None:
        c0 = self.bcs[0]
        grid, blocks, block_of = c0.grid, c0.blocks, c0.block_of
        if blocks is None or block_of is None:
            raise ValueError(f"block consumer {c0.name} names no blocks")
        k = crop_scale(grid, blocks) if self.tcs else 1
        carrier = blocks if k is not None else dataclasses.replace(
            blocks, tile_px=blocks.read_px)
        self.report.carrier = (f"{len(blocks)} blocks ({len(grid)} tiles cut out of "
                               f"them{'' if k is not None else ', resized here'})")
        crops = _Crops(grid, blocks, block_of, k)
        for batch in self.slide.stream(carrier, c0.batch_size):
            out = batch
            if carrier is not blocks and blocks.resized:
                shape = (len(batch), blocks.tile_px, blocks.tile_px, batch.tiles.shape[3])
                out = dataclasses.replace(batch, tiles=resize_tiles(
                    batch.tiles, blocks.tile_px, np.empty(shape, batch.tiles.dtype)))
            for c in self.bcs:
                self.feeds[id(c)].put(out, self.failed)
            if self.tcs:
                for rows, tiles, bad in crops.add(batch):
                    if not self.rebatch:
                        self._start(tiles[0], batch.layout)
                    for r in self.rebatch:
                        r.add(rows, tiles, bad, self.failed)
            self.report.n_batches += 1
            if self.failed():
                return


class _Crops:
    """The tiles of the tile grid cut out of streamed blocks, handed on in grid order."""

    def __init__(self, grid: TileGrid, blocks: TileGrid, block_of: np.ndarray,
                 k: int | None) -> None:
        self.grid, self.k = grid, k
        self.xy = grid.level_coords()
        off = self.xy - blocks.level_coords()[block_of]
        self.off = (off // k if k is not None else off).tolist()
        self.px = grid.tile_px if k is not None else grid.read_px
        order = np.argsort(block_of, kind="stable")
        cut = np.searchsorted(block_of[order], np.arange(1, len(blocks)))
        self.members = [m.tolist() for m in np.split(order, cut)]
        self.pending: dict[int, np.ndarray] = {}
        self.bad: dict[int, bool] = {}
        self.next = 0

    def add(self, batch: TileBatch) -> Iterator[tuple[np.ndarray, list[np.ndarray],
                                                       np.ndarray | None]]:
        """Cut the tiles of ``batch``'s blocks; yield the runs now complete in grid order
        (rows, tiles, damaged or None)."""
        p = self.px
        for i, (b, block) in enumerate(zip(batch.index.tolist(), batch.tiles, strict=True)):
            hurt = batch.damaged is not None and bool(batch.damaged[i])
            for j in self.members[b]:
                x, y = self.off[j]
                tile = block[y:y + p, x:x + p]
                self.pending[j] = resize_area(np.ascontiguousarray(tile), self.grid.tile_px
                                              ) if self.k is None and self.grid.resized \
                    else tile.copy()
                self.bad[j] = hurt and self._overlaps_damage(j, batch.damaged_boxes)
        start = self.next
        while self.next in self.pending:
            self.next += 1
        if self.next > start:
            rows = np.arange(start, self.next)
            tiles = [self.pending.pop(j) for j in range(start, self.next)]
            bad = np.array([self.bad.pop(j) for j in range(start, self.next)])
            yield rows, tiles, bad if bad.any() else None

    def _overlaps_damage(self, j: int, boxes: np.ndarray | None) -> bool:
        """Whether tile ``j`` of a damaged block holds pixels of one of its damaged chunks
        ``boxes`` (every tile of the block when the stream names none)."""
        if boxes is None:
            return True
        (x, y), r = self.xy[j], self.grid.read_px
        return bool(((boxes[:, 0] < x + r) & (boxes[:, 2] > x) &
                     (boxes[:, 1] < y + r) & (boxes[:, 3] > y)).any())
