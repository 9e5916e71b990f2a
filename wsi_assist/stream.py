"""Tile batches for the models: ``stream(path, grid)`` yields (grid rows, uint8 tiles).

Each compressed chunk of the source level is decoded once (see :mod:`wsi_assist.chunks`):
the grid is cut into batches, each batch needs a set of decode *units*, a unit is decoded
by the first batch that needs it and dropped after the last one. Units are decoded in a
thread pool (imagecodecs releases the GIL) at most ``prefetch`` batches ahead of the
consumer, so memory depends on the batch size, the prefetch window and the width of the
slide, never on its area. Tiles are cut out of the units, padded white off the slide
edge, and resized with area interpolation only when ``grid.resized``.

Under a ``dask.distributed`` Client each batch is a task carrying only the slide path,
level and the batch's tile corners; workers open the slide themselves (cached per
process). Units shared by two batches are then decoded by both.

``read_tile`` is the naive reference: one tiffslide ``read_region`` per tile.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from wsi_assist.chunks import SOURCES, Engine, UnitSource, open_units
from wsi_assist.tiling import TileGrid

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TileBatch:
    """Rows ``index`` of the grid and their tiles, (N, tile_px, tile_px, 3) uint8."""

    index: np.ndarray
    tiles: np.ndarray

    def __post_init__(self) -> None:
        if self.tiles.ndim != 4 or self.tiles.shape[3] != 3 or self.tiles.dtype != np.uint8:
            raise ValueError(f"tiles must be (N, H, W, 3) uint8, got {self.tiles.dtype} "
                             f"{self.tiles.shape}")
        if self.index.shape != (len(self.tiles),):
            raise ValueError("index must have one entry per tile")

    def __len__(self) -> int:
        return len(self.index)


@dataclass(frozen=True)
class Plan:
    """Which units each batch decodes first (``decode``) and drops after (``release``)."""

    batches: tuple[np.ndarray, ...]
    decode: tuple[np.ndarray, ...]
    release: tuple[np.ndarray, ...]

    @property
    def n_units(self) -> int:
        return sum(len(d) for d in self.decode)


def unit_spans(level_xy: np.ndarray, read_px: int, level_shape: tuple[int, int],
               unit_shape: tuple[int, int]) -> tuple[np.ndarray, ...]:
    """Per tile, first and last unit row and column it overlaps, and whether any."""
    (h, w), (uh, uw) = level_shape, unit_shape
    x0, y0 = level_xy[:, 0], level_xy[:, 1]
    x1, y1 = np.minimum(x0 + read_px, w), np.minimum(y0 + read_px, h)
    xa, ya = np.maximum(x0, 0), np.maximum(y0, 0)
    valid = (x1 > xa) & (y1 > ya)
    return ya // uh, (y1 - 1) // uh, xa // uw, (x1 - 1) // uw, valid


def plan_units(level_xy: np.ndarray, read_px: int, level_shape: tuple[int, int],
               unit_shape: tuple[int, int], batch_size: int) -> Plan:
    """Split tiles into batches and schedule each unit's decode and release."""
    n = len(level_xy)
    starts = range(0, n, batch_size)
    batches = tuple(np.arange(s, min(s + batch_size, n), dtype=np.int64) for s in starts)
    nb = len(batches)
    uy0, uy1, ux0, ux1, valid = unit_spans(level_xy, read_px, level_shape, unit_shape)
    ncols = -(-level_shape[1] // unit_shape[1])
    pos = np.arange(n)
    keys, owners = [], []
    for dy in range(int((uy1 - uy0)[valid].max(initial=-1)) + 1):
        for dx in range(int((ux1 - ux0)[valid].max(initial=-1)) + 1):
            m = valid & (uy0 + dy <= uy1) & (ux0 + dx <= ux1)
            keys.append((uy0[m] + dy) * ncols + ux0[m] + dx)
            owners.append(pos[m] // batch_size)
    key = np.concatenate(keys) if keys else np.zeros(0, np.int64)
    owner = np.concatenate(owners) if owners else np.zeros(0, np.int64)
    order = np.lexsort((owner, key))
    key, owner = key[order], owner[order]
    first = np.r_[True, key[1:] != key[:-1]] if len(key) else np.zeros(0, bool)
    last = np.r_[key[1:] != key[:-1], True] if len(key) else np.zeros(0, bool)

    def by_batch(k: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, ...]:
        uk = np.stack([k // ncols, k % ncols], axis=1)
        return tuple(uk[b == i] for i in range(nb))

    return Plan(batches, by_batch(key[first], owner[first]), by_batch(key[last], owner[last]))


class BufferPool:
    """Reuses batch arrays the consumer has dropped, so that no batch pays page faults.

    An array is free again when nothing but the pool refers to it (any view, memoryview
    or torch tensor of it holds a reference); otherwise a new one is allocated.
    """

    def __init__(self, size: int) -> None:
        self._size = size
        self._arrays: list[np.ndarray] = []
        self._lock = threading.Lock()
        self._idle = _refcounts([np.zeros(1)])[0]

    def take(self, shape: tuple[int, ...]) -> np.ndarray:
        with self._lock:
            counts = _refcounts(self._arrays)
            for i, n in enumerate(counts):
                if n == self._idle and self._arrays[i].shape == shape:
                    a = self._arrays.pop(i)
                    self._arrays.append(a)
                    return a
            out = np.empty(shape, np.uint8)
            if len(self._arrays) < self._size:
                self._arrays.append(out)
            return out


def _refcounts(arrays: list[np.ndarray]) -> list[int]:
    """References to each array; the same expression measures the idle count."""
    return [sys.getrefcount(a) for a in arrays]


def assemble(src: UnitSource, level_xy: np.ndarray, read_px: int, tile_px: int,
             units: dict[tuple[int, int], np.ndarray], pool: BufferPool | None = None
             ) -> np.ndarray:
    """Cut tiles out of decoded units, white off the slide, resized to ``tile_px``."""
    r = read_px
    shape = (len(level_xy), r, r, 3)
    out = pool.take(shape) if pool is not None else np.empty(shape, np.uint8)
    uy0, uy1, ux0, ux1, valid = unit_spans(level_xy, r, src.level_shape, src.unit_shape)
    (h, w), (x, y) = src.level_shape, (level_xy[:, 0], level_xy[:, 1])
    partial = (x < 0) | (y < 0) | (x + r > w) | (y + r > h) | ~valid
    out[partial] = 255
    (uh, uw) = src.unit_shape
    spans = zip(level_xy.tolist(), uy0.tolist(), uy1.tolist(), ux0.tolist(), ux1.tolist(),
                valid.tolist())
    for j, ((tx, ty), ya, yb, xa, xb, ok) in enumerate(spans):
        if not ok:
            continue
        for uy in range(ya, yb + 1):
            y0 = uy * uh
            a, b = max(y0, ty), min(y0 + uh, ty + r, h)
            for ux in range(xa, xb + 1):
                x0 = ux * uw
                c, d = max(x0, tx), min(x0 + uw, tx + r, w)
                out[j, a - ty:b - ty, c - tx:d - tx] = units[uy, ux][a - y0:b - y0,
                                                                     c - x0:d - x0]
    if r != tile_px:
        small = pool.take((len(out), tile_px, tile_px, 3)) if pool is not None else None
        small = np.empty((len(out), tile_px, tile_px, 3), np.uint8) if small is None else small
        for j, t in enumerate(out):
            small[j] = resize_area(t, tile_px)
        return small
    return out


def stream(path: str | Path, grid: TileGrid, batch_size: int = 64, prefetch: int = 4,
           threads: int = 0, *, client: Any = None, engine: Engine = "auto"
           ) -> Iterator[TileBatch]:
    """Yield the grid's tiles in order, ``batch_size`` at a time.

    ``threads`` decoding threads (0: all cores); ``prefetch`` batches decoded ahead;
    ``client`` a ``dask.distributed.Client`` to read on its workers instead.
    """
    if batch_size < 1 or prefetch < 1 or threads < 0:
        raise ValueError(f"batch_size and prefetch must be >= 1 and threads >= 0, got "
                         f"{batch_size!r}, {prefetch!r}, {threads!r}")
    if len(grid) == 0:
        return
    if client is not None:
        yield from _stream_distributed(client, str(path), grid, batch_size, prefetch, engine)
        return
    from wsi_assist.slide import open_slide

    n_threads = threads or len(os.sched_getaffinity(0))
    with open_slide(path) as slide:
        src = open_units(slide, grid.level, path, engine)
        try:
            yield from _stream_local(src, grid, batch_size, prefetch, n_threads)
        finally:
            getattr(src, "close", lambda: None)()


def _stream_local(src: UnitSource, grid: TileGrid, batch_size: int, prefetch: int,
                  n_threads: int) -> Iterator[TileBatch]:
    level_xy = grid.level_coords()
    p = plan_units(level_xy, grid.read_px, src.level_shape, src.unit_shape, batch_size)
    log.debug("%d tiles, %d batches, %d units", len(grid), len(p.batches), p.n_units)
    futures: dict[tuple[int, int], Future[np.ndarray]] = {}
    buffers = BufferPool(2 * prefetch + 4)
    pending: list[Future[np.ndarray]] = []

    def submit(b: int) -> None:
        for uy, ux in p.decode[b].tolist():
            futures[uy, ux] = pool.submit(src.decode, uy, ux)
        rows = p.batches[b]
        needed = _needed(src, level_xy[rows], grid.read_px)
        mine = {k: futures[k] for k in needed}
        pending.append(pool.submit(_assemble_when_ready, src, level_xy[rows], grid, mine,
                                   buffers))

    with ThreadPoolExecutor(n_threads, thread_name_prefix="wsi-tiles") as pool:
        try:
            for b in range(min(prefetch, len(p.batches))):
                submit(b)
            for b, rows in enumerate(p.batches):
                tiles = pending[b].result()
                pending[b] = None  # type: ignore[call-overload]
                for uy, ux in p.release[b].tolist():
                    del futures[uy, ux]
                if b + prefetch < len(p.batches):
                    submit(b + prefetch)
                yield TileBatch(index=rows, tiles=tiles)
        finally:
            for f in [*futures.values(), *(f for f in pending if f is not None)]:
                f.cancel()


def _needed(src: UnitSource, level_xy: np.ndarray, read_px: int) -> set[tuple[int, int]]:
    uy0, uy1, ux0, ux1, valid = unit_spans(level_xy, read_px, src.level_shape, src.unit_shape)
    return {(uy, ux) for j in np.flatnonzero(valid)
            for uy in range(int(uy0[j]), int(uy1[j]) + 1)
            for ux in range(int(ux0[j]), int(ux1[j]) + 1)}


def _assemble_when_ready(src: UnitSource, level_xy: np.ndarray, grid: TileGrid,
                         futures: dict[tuple[int, int], Future[np.ndarray]],
                         buffers: BufferPool) -> np.ndarray:
    # Safe in the same pool: these decodes were submitted first, so they already run.
    units = {k: f.result() for k, f in futures.items()}
    return assemble(src, level_xy, grid.read_px, grid.tile_px, units, buffers)


def read_batch(path: str, level: int, engine: Engine, level_xy: np.ndarray, read_px: int,
               tile_px: int) -> np.ndarray:
    """One batch, self-contained: open (cached), decode its units, cut. A dask task."""
    src = SOURCES.get(path, level, engine)
    units = {k: src.decode(*k) for k in _needed(src, level_xy, read_px)}
    return assemble(src, level_xy, read_px, tile_px, units)


def _stream_distributed(client: Any, path: str, grid: TileGrid, batch_size: int,
                        prefetch: int, engine: Engine) -> Iterator[TileBatch]:
    level_xy = grid.level_coords()
    n = len(grid)
    batches = [np.arange(s, min(s + batch_size, n), dtype=np.int64)
               for s in range(0, n, batch_size)]

    def submit(rows: np.ndarray) -> Any:
        return client.submit(read_batch, path, grid.level, engine, level_xy[rows],
                             grid.read_px, grid.tile_px, pure=False)

    window = [submit(rows) for rows in batches[:prefetch]]
    try:
        for b, rows in enumerate(batches):
            tiles = window[b].result()
            window[b] = None
            if b + prefetch < len(batches):
                window.append(submit(batches[b + prefetch]))
            yield TileBatch(index=rows, tiles=tiles)
    finally:
        for f in window:
            if f is not None:
                f.cancel()


def stream_naive(path: str | Path, grid: TileGrid, batch_size: int = 64
                 ) -> Iterator[TileBatch]:
    """The reference: one ``read_region`` per tile, in one thread."""
    from wsi_assist.slide import open_slide

    n = len(grid)
    with open_slide(path) as slide:
        lw, lh = slide.level_dimensions[grid.level]
        for start in range(0, n, batch_size):
            idx = np.arange(start, min(start + batch_size, n), dtype=np.int64)
            tiles = np.stack([read_tile(slide, grid, int(i), (lw, lh)) for i in idx])
            yield TileBatch(index=idx, tiles=tiles)


def l0_location(level_xy: tuple[int, int], downsample: float) -> tuple[int, int]:
    """A level-0 point that tiffslide's ``int(x / downsample)`` maps to ``level_xy``."""
    out = []
    for v in level_xy:
        x = int(np.ceil(v * downsample))
        while int(x / downsample) > v:
            x -= 1
        while int(x / downsample) < v:
            x += 1
        out.append(x)
    return out[0], out[1]


def read_tile(slide: Any, grid: TileGrid, i: int, level_size: tuple[int, int]) -> np.ndarray:
    """One tile via ``read_region``, white outside the slide, resized to ``tile_px``."""
    lx, ly = (int(v) for v in np.rint(grid.coords[i] / grid.level_downsample))
    r = grid.read_px
    loc = l0_location((lx, ly), slide.level_downsamples[grid.level])
    arr = np.asarray(slide.read_region(loc, grid.level, (r, r), as_array=True))[..., :3]
    valid_w, valid_h = max(0, min(r, level_size[0] - lx)), max(0, min(r, level_size[1] - ly))
    if valid_w < r or valid_h < r:
        arr = arr.copy()
        arr[valid_h:, :] = 255
        arr[:, valid_w:] = 255
    if grid.resized:
        arr = resize_area(arr, grid.tile_px)
    return arr


def resize_area(tile: np.ndarray, size: int) -> np.ndarray:
    """Resize a square RGB tile to ``size`` px with area (box) interpolation."""
    return np.asarray(Image.fromarray(tile).resize((size, size), Image.Resampling.BOX))
