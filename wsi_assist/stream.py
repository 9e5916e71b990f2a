"""Tile batches for the models: ``stream(path, grid)`` yields (grid rows, tiles).

Tiles are (N, H, W, 3) uint8 for RGB slides; for multichannel (CYX) slides (N, H, W, C)
in the slide's dtype, one plane per channel, padded with 0 (dark) instead of white.

Each compressed chunk of the source level is decoded once (:mod:`wsi_assist.chunks`) and
scattered straight into every grid tile it overlaps (:mod:`wsi_assist.pieces`), then
dropped. Decoding and scattering run in a thread pool (imagecodecs and numpy release the
GIL), a few units per task, in the order the grid needs them. Batch arrays exist only for
a window of batches: ``prefetch`` ahead of the consumer plus those still sharing units
with it (about one row of tiles), so memory depends on the batch size, the prefetch window
and the width of the slide, never on its area. Batch arrays are recycled once the consumer
has dropped them (``BufferPool``). Tiles are padded white off the slide edge and resized
with area interpolation only when ``grid.resized``: by an integer factor with Pillow's
SIMD ``reduce`` (an exact box average), other ratios by its box filter. When
``read_px`` is 2, 4 or 8 times ``tile_px`` on a JPEG-tiled level (40x scans read at 20x),
units are instead decoded at that reduced scale in the DCT domain and scattered straight
into ``tile_px`` tiles (:func:`reduced_source`, :class:`chunks.ScaledUnits`): about
2.3x the rate of a full decode and area reduce, within a stated tolerance of the area
average.

Opened slides are kept per process (``chunks.SOURCES``, checked against the file's size
and mtime), so the stages that stream one slide in turn open it once. Slides, not
batches, are the unit of distribution: under Dask each slide is one task
(``batch._run_on_cluster``), the worker opens the slide itself and its tiles stream in
that worker's threads.

``read_tile`` is the naive reference: one tiffslide ``read_region`` per tile.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from wsi_assist.chunks import SCALES, SOURCES, DamagedRows, Engine, UnitSource
from wsi_assist.pieces import Pieces, plan_pieces, scatter
from wsi_assist.slide import Layout, slide_layout
from wsi_assist.tiling import TileGrid

log = logging.getLogger(__name__)

#: Consecutive units a worker takes at a time (fewer lock round trips, and one thread
#: fills neighbouring tiles).
RUN_LEN = 8


#: Tile dtypes of multichannel batches (the slide's own).
CHANNEL_DTYPES = (np.uint8, np.uint16, np.int16, np.float32)


@dataclass(frozen=True)
class TileBatch:
    """Rows ``index`` of the grid and their tiles: (N, tile_px, tile_px, 3) uint8 for
    ``layout`` rgb; (N, tile_px, tile_px, C) of the slide's dtype for ``channels``.
    ``damaged`` (N,) bool, when any is: the tile holds pixels of a compressed chunk
    whose data is damaged but decodable (see :func:`chunks.jpeg_damaged`);
    ``damaged_boxes`` then (M, 4): those chunks, (x0, y0, x1, y1) level pixels."""

    index: np.ndarray
    tiles: np.ndarray
    layout: Layout = "rgb"
    damaged: np.ndarray | None = None
    damaged_boxes: np.ndarray | None = None

    def __post_init__(self) -> None:
        if self.layout == "rgb":
            if self.tiles.ndim != 4 or self.tiles.shape[3] != 3 or \
                    self.tiles.dtype != np.uint8:
                raise ValueError(f"tiles must be (N, H, W, 3) uint8, got "
                                 f"{self.tiles.dtype} {self.tiles.shape}")
        elif self.layout == "channels":
            if self.tiles.ndim != 4 or self.tiles.shape[3] < 1 or \
                    self.tiles.dtype not in CHANNEL_DTYPES:
                raise ValueError(f"multichannel tiles must be (N, H, W, C) of "
                                 f"{', '.join(np.dtype(d).name for d in CHANNEL_DTYPES)}, "
                                 f"got {self.tiles.dtype} {self.tiles.shape}")
        else:
            raise ValueError(f"layout must be 'rgb' or 'channels', got {self.layout!r}")
        if self.index.shape != (len(self.tiles),):
            raise ValueError("index must have one entry per tile")

    def __len__(self) -> int:
        return len(self.index)


def stream(path: str | Path, grid: TileGrid, batch_size: int = 64, prefetch: int = 4,
           threads: int = 0, *, engine: Engine = "auto") -> Iterator[TileBatch]:
    """Yield the grid's tiles in order, ``batch_size`` at a time.

    ``threads`` decoding threads (0: all cores); ``prefetch`` batches decoded ahead.
    """
    if batch_size < 1 or prefetch < 1 or threads < 0:
        raise ValueError(f"batch_size and prefetch must be >= 1 and threads >= 0, got "
                         f"{batch_size!r}, {prefetch!r}, {threads!r}")
    if len(grid) == 0:
        return
    with SOURCES.lease(str(path), grid.level, engine) as full:
        src, level_xy, px = reduced_source(full, grid)
        pieces = plan_pieces(level_xy, px, src.level_shape, src.unit_shape)
        log.debug("%s: %d tiles, %d units, %d pieces, read %d px of 1/%d scale", path,
                  len(grid), len(pieces), len(pieces.rows), px, grid.read_px // px)
        yield from _Scatter(src, grid, pieces, batch_size, prefetch, px).run(
            threads or len(os.sched_getaffinity(0)))


def reduced_source(src: UnitSource, grid: TileGrid
                   ) -> tuple[UnitSource, np.ndarray, int]:
    """(source, tile corners in its pixels, px read per tile): the level decoded at
    1 / f scale in the DCT domain when ``read_px`` is ``f * tile_px`` for f in 2, 4, 8,
    every tile corner is on a multiple of f and the level is JPEG-tiled
    (:meth:`chunks.TiffUnits.scaled`); else the level itself."""
    level_xy = grid.level_coords()
    f, rem = divmod(grid.read_px, grid.tile_px)
    scaled = getattr(src, "scaled", None)
    if rem == 0 and f in SCALES and scaled is not None and not (level_xy % f).any():
        reduced = scaled(f)
        if reduced is not None:
            return reduced, level_xy // f, grid.tile_px
    return src, level_xy, grid.read_px


class _Scatter:
    """One local stream. Worker threads take units in order, decode each and scatter it
    into the batch arrays it feeds; the consumer's generator allocates batch arrays up
    to a frontier, a unit is taken only once all its batches exist, and a batch is
    yielded once all its units are in."""

    def __init__(self, src: UnitSource, grid: TileGrid, pieces: Pieces, batch_size: int,
                 prefetch: int, read_px: int) -> None:
        self.src, self.grid, self.p, self.bs = src, grid, pieces, batch_size
        self.read_px, self.resized = read_px, read_px != grid.tile_px
        self.scale: int = getattr(src, "factor", 1)  # level px per source px (DCT-scaled)
        self.layout, self.dtype = src.layout, src.dtype
        self.fill = 255 if src.layout == "rgb" else 0  # white glass; dark for fluorescence
        n, nu = len(grid), len(pieces)
        self.nb = nb = -(-n // batch_size)
        self.units, self.start = pieces.units.tolist(), pieces.start.tolist()
        # units per batch still to come; a batch is complete at zero
        per_unit = np.repeat(np.arange(nu), np.diff(pieces.start))
        pairs = np.unique(per_unit * nb + pieces.rows[:, 0] // batch_size)
        self.remaining = np.bincount(pairs % nb, minlength=nb).tolist()
        self.feeds = [a.tolist() for a in np.split(pairs % nb, np.searchsorted(
            pairs // nb, np.arange(1, nu)))] if nu else []
        # a unit is taken once the arrays of every batch it feeds exist (``made``); batch
        # b is yielded once every unit feeding it is in, so arrays exist up to frontier[b]
        lo, hi = pieces.first // batch_size, pieces.last // batch_size
        self.unit_hi = hi.tolist()
        upto = np.searchsorted(lo, np.arange(nb), side="right")
        need = np.where(upto > 0, np.maximum.accumulate(hi)[np.maximum(upto - 1, 0)], -1) \
            if nu else np.full(nb, -1)
        self.frontier = np.minimum(np.maximum(need, np.arange(nb) + prefetch - 1),
                                   nb - 1).tolist()
        window = int(max(f - b for b, f in enumerate(self.frontier))) + 1
        BUFFERS.reserve(2 * window + 4 if self.resized else window + 4)
        self.filling: dict[int, np.ndarray] = {}  # batch -> read_px array being filled
        self.done: dict[int, np.ndarray] = {}  # batch -> finished tile_px array
        lock = threading.Lock()
        self.batch_done = threading.Condition(lock)  # the consumer waits on this
        self.batch_made = threading.Condition(lock)  # workers wait on this
        self.made, self.next_unit = -1, 0
        self.errors: list[BaseException] = []
        self.stopped = False
        # rows of damaged chunks, which the source records while decoding -> tiles
        self.damaged_rows: DamagedRows = getattr(src, "damaged_rows", DamagedRows())
        self.damaged = np.zeros(n, bool)

    def run(self, n_threads: int) -> Iterator[TileBatch]:
        workers = [threading.Thread(target=self._work, name=f"wsi-tiles-{i}", daemon=True)
                   for i in range(n_threads)]
        for t in workers:
            t.start()
        n = len(self.grid)
        try:
            for b in range(self.nb):
                while self.made < self.frontier[b]:
                    self._allocate(self.made + 1)
                with self.batch_done:
                    while b not in self.done and not self.errors:
                        self.batch_done.wait()
                    if self.errors:
                        raise self.errors[0]
                    tiles = self.done.pop(b)
                first, last = b * self.bs, min((b + 1) * self.bs, n)
                bad = self.damaged[first:last]
                hurt = bool(bad.any())
                yield TileBatch(index=np.arange(first, last), tiles=tiles, layout=self.layout,
                                damaged=bad.copy() if hurt else None,
                                damaged_boxes=self.damaged_rows.boxes(
                                    self.src.unit_shape, self.scale) if hurt else None)
                del tiles
        finally:
            with self.batch_made:
                self.stopped = True
                self.batch_made.notify_all()
            for t in workers:
                t.join()

    def _shape(self, b: int, px: int) -> tuple[int, int, int, int]:
        return min(self.bs, len(self.grid) - b * self.bs), px, px, self.src.channels

    def _allocate(self, b: int) -> None:
        arr = BUFFERS.take(self._shape(b, self.read_px), self.dtype)
        arr[self.p.partial[b * self.bs:b * self.bs + len(arr)]] = self.fill
        with self.batch_made:
            self.filling[b] = arr
            self.made = b
            self.batch_made.notify_all()
        if self.remaining[b] == 0:  # off the slide entirely
            self._finish(b)

    def _work(self) -> None:
        bs, nu, rows_of = self.bs, len(self.units), self.p.rows
        try:
            while True:
                with self.batch_made:
                    while (not self.stopped and self.next_unit < nu
                           and self.unit_hi[self.next_unit] > self.made):
                        self.batch_made.wait()
                    if self.stopped or self.next_unit >= nu:
                        return
                    k0 = k1 = self.next_unit
                    while k1 < min(nu, k0 + RUN_LEN) and self.unit_hi[k1] <= self.made:
                        k1 += 1
                    self.next_unit = k1
                fed = []
                for k in range(k0, k1):
                    uy, ux = self.units[k]
                    rows = rows_of[self.start[k]:self.start[k + 1]].tolist()
                    scatter(self.src.decode(uy, ux), rows, self.filling, bs)
                    if self.damaged_rows:
                        hit = self.damaged_rows.hit
                        for r in rows:  # r: tile, then its rows in the unit
                            if hit(uy, ux, r[1], r[2]):
                                self.damaged[r[0]] = True
                    fed.extend(self.feeds[k])
                with self.batch_made:
                    for b in fed:
                        self.remaining[b] -= 1
                    complete = [b for b in set(fed) if self.remaining[b] == 0]
                for b in complete:
                    self._finish(b)
        except BaseException as e:  # noqa: BLE001  (the consumer re-raises it)
            with self.batch_done:
                self.errors.append(e)
                self.stopped = True
                self.batch_done.notify_all()
                self.batch_made.notify_all()

    def _finish(self, b: int) -> None:
        tiles = self.filling[b]
        if self.resized:
            out = BUFFERS.take(self._shape(b, self.grid.tile_px), self.dtype)
            tiles = resize_tiles(tiles, self.grid.tile_px, out)
        with self.batch_done:
            del self.filling[b]
            self.done[b] = tiles
            self.batch_done.notify_all()


class BufferPool:
    """Reuses batch arrays the consumer has dropped, so that no batch pays page faults.

    An array is free again when nothing but the pool refers to it (any view, memoryview
    or torch tensor of it holds a reference); otherwise a new one is allocated. At most
    ``size`` arrays are kept, the least recently used idle one making room.
    """

    def __init__(self, size: int) -> None:
        self._size = size
        self._arrays: list[np.ndarray] = []
        self._lock = threading.Lock()
        self._idle = _refcounts([np.zeros(1)])[0]

    def take(self, shape: tuple[int, ...], dtype: np.dtype | type = np.uint8
             ) -> np.ndarray:
        with self._lock:
            idle = [i for i, n in enumerate(_refcounts(self._arrays)) if n == self._idle]
            for i in idle:
                if self._arrays[i].shape == shape and self._arrays[i].dtype == dtype:
                    a = self._arrays.pop(i)
                    self._arrays.append(a)
                    return a
            out = np.empty(shape, dtype)
            if len(self._arrays) >= self._size and idle:
                del self._arrays[idle[0]]
            if len(self._arrays) < self._size:
                self._arrays.append(out)
            return out

    def reserve(self, size: int) -> None:
        """Keep at least ``size`` arrays from now on."""
        with self._lock:
            self._size = max(self._size, size)

    def clear(self) -> None:
        """Drop every kept array (those still in use live on with their users)."""
        with self._lock:
            self._arrays, self._size = [], 0


def _refcounts(arrays: list[np.ndarray]) -> list[int]:
    """References to each array; the same expression measures the idle count."""
    return [sys.getrefcount(a) for a in arrays]


#: Batch arrays shared by the process's streams: the next stream (the next stage over the
#: same slide, the next slide) reuses the last one's arrays instead of faulting in new
#: memory. It keeps the largest window any stream needed (see ``reserve``).
BUFFERS = BufferPool(0)


def stream_naive(path: str | Path, grid: TileGrid, batch_size: int = 64
                 ) -> Iterator[TileBatch]:
    """The reference: one ``read_region`` per tile, in one thread."""
    from wsi_assist.slide import open_slide

    n = len(grid)
    with open_slide(path) as slide:
        lw, lh = slide.level_dimensions[grid.level]
        layout = slide_layout(slide)
        for start in range(0, n, batch_size):
            idx = np.arange(start, min(start + batch_size, n), dtype=np.int64)
            tiles = np.stack([read_tile(slide, grid, int(i), (lw, lh)) for i in idx])
            yield TileBatch(index=idx, tiles=tiles, layout=layout)


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
    """One tile via ``read_region``, resized to ``tile_px``: RGB, white outside the
    slide; or every channel of a multichannel slide, 0 outside it."""
    lx, ly = (int(v) for v in np.rint(grid.coords[i] / grid.level_downsample))
    r = grid.read_px
    loc = l0_location((lx, ly), slide.level_downsamples[grid.level])
    arr = np.asarray(slide.read_region(loc, grid.level, (r, r), as_array=True))
    rgb = slide_layout(slide) == "rgb"
    if rgb:
        arr = arr[..., :3]
    valid_w, valid_h = max(0, min(r, level_size[0] - lx)), max(0, min(r, level_size[1] - ly))
    if valid_w < r or valid_h < r:
        arr = arr.copy()
        arr[valid_h:, :] = 255 if rgb else 0
        arr[:, valid_w:] = 255 if rgb else 0
    if grid.resized:
        arr = resize_area(arr, grid.tile_px)
    return arr


def resize_tiles(tiles: np.ndarray, size: int, out: np.ndarray) -> np.ndarray:
    """Area-resize each of ``tiles`` (n, r, r, C) into ``out`` (n, size, size, C)."""
    for j, t in enumerate(tiles):
        out[j] = resize_area(t, size)
    return out


def resize_area(tile: np.ndarray, size: int) -> np.ndarray:
    """Resize a square tile to ``size`` px with area (box) interpolation: RGB uint8 at
    once; other tiles one channel at a time (8-bit as such, others in float32, rounded
    back to their dtype)."""
    if tile.dtype == np.uint8 and tile.shape[2] == 3:
        image = Image.fromarray(tile)
        f, rem = divmod(tile.shape[0], size)
        if rem == 0 and tile.shape[1] == tile.shape[0]:  # SIMD box average
            return np.asarray(image.reduce(f))
        return np.asarray(image.resize((size, size), Image.Resampling.BOX))
    out = np.empty((size, size, tile.shape[2]), tile.dtype)
    for c in range(tile.shape[2]):
        plane = np.ascontiguousarray(tile[..., c])
        if tile.dtype == np.uint8:
            out[..., c] = Image.fromarray(plane).resize((size, size), Image.Resampling.BOX)
            continue
        small = np.asarray(Image.fromarray(plane.astype(np.float32)).resize(
            (size, size), Image.Resampling.BOX))
        if tile.dtype.kind in "ui":
            info = np.iinfo(tile.dtype)
            small = np.clip(np.rint(small), info.min, info.max)
        out[..., c] = small
    return out
