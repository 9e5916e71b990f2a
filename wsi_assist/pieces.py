"""Where each grid tile's pixels come from: the overlaps of tiles and decode units.

A *piece* is the overlap of one grid tile with one decode unit (see
:mod:`wsi_assist.chunks`): a rectangle copied from the decoded unit into the tile. Every
in-slide pixel of every tile belongs to exactly one piece, so tiles can be filled by
scattering each unit into its tiles as soon as it is decoded, in any order and from any
thread, and the unit dropped at once. Tile pixels off the slide belong to no piece and
are filled white beforehand (``partial``).

Units are listed in the order the grid first needs them, so a stream that decodes them
in this order completes batches in grid order.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

#: Columns of ``Pieces.rows``.
TILE, SY0, SY1, SX0, SX1, DY0, DX0 = range(7)


@dataclass(frozen=True)
class Pieces:
    """The pieces of a grid, grouped by unit.

    ``units`` (U, 2) unit (row, column) in first-needed order; the pieces of unit ``k`` are
    ``rows[start[k]:start[k + 1]]``, each (tile, sy0, sy1, sx0, sx1, dy0, dx0): copy
    ``unit[sy0:sy1, sx0:sx1]`` into the tile at (dy0, dx0). ``first`` and ``last`` are the
    lowest and highest tile each unit feeds; ``partial`` marks tiles not wholly on the slide.
    """

    units: np.ndarray
    start: np.ndarray
    rows: np.ndarray
    first: np.ndarray
    last: np.ndarray
    partial: np.ndarray

    def __post_init__(self) -> None:
        u = len(self.units)
        if self.units.shape != (u, 2) or self.start.shape != (u + 1,):
            raise ValueError("units must be (U, 2) and start (U + 1,)")
        if self.rows.ndim != 2 or self.rows.shape[1] != 7 or int(self.start[-1]) != len(
                self.rows):
            raise ValueError("rows must be (P, 7) with start[-1] == P")
        if self.first.shape != (u,) or self.last.shape != (u,):
            raise ValueError("first and last must have one entry per unit")

    def __len__(self) -> int:
        return len(self.units)


def unit_spans(level_xy: np.ndarray, read_px: int, level_shape: tuple[int, int],
               unit_shape: tuple[int, int]) -> tuple[np.ndarray, ...]:
    """Per tile, first and last unit row and column it overlaps, and whether any."""
    (h, w), (uh, uw) = level_shape, unit_shape
    x0, y0 = level_xy[:, 0], level_xy[:, 1]
    x1, y1 = np.minimum(x0 + read_px, w), np.minimum(y0 + read_px, h)
    xa, ya = np.maximum(x0, 0), np.maximum(y0, 0)
    valid = (x1 > xa) & (y1 > ya)
    return ya // uh, (y1 - 1) // uh, xa // uw, (x1 - 1) // uw, valid


def plan_pieces(level_xy: np.ndarray, read_px: int, level_shape: tuple[int, int],
                unit_shape: tuple[int, int]) -> Pieces:
    """The pieces of tiles with corners ``level_xy`` (level px), ``read_px`` wide."""
    (h, w), (uh, uw), r = level_shape, unit_shape, read_px
    ncols = -(-w // uw)
    xy = np.asarray(level_xy, np.int64).reshape(-1, 2)
    uy0, uy1, ux0, ux1, valid = unit_spans(xy, r, level_shape, unit_shape)
    tiles, uys, uxs = [], [], []
    for dy in range(int((uy1 - uy0)[valid].max(initial=-1)) + 1):
        for dx in range(int((ux1 - ux0)[valid].max(initial=-1)) + 1):
            m = valid & (uy0 + dy <= uy1) & (ux0 + dx <= ux1)
            tiles.append(np.flatnonzero(m))
            uys.append(uy0[m] + dy)
            uxs.append(ux0[m] + dx)
    j = np.concatenate(tiles) if tiles else np.zeros(0, np.int64)
    uy = np.concatenate(uys) if uys else np.zeros(0, np.int64)
    ux = np.concatenate(uxs) if uxs else np.zeros(0, np.int64)
    tx, ty = xy[j, 0], xy[j, 1]
    top, left = uy * uh, ux * uw
    a, b = np.maximum(top, ty), np.minimum(np.minimum(top + uh, ty + r), h)
    c, d = np.maximum(left, tx), np.minimum(np.minimum(left + uw, tx + r), w)
    rows = np.stack([j, a - top, b - top, c - left, d - left, a - ty, c - tx], axis=1)
    # group by unit, units in the order of the first tile that needs them
    key = uy * ncols + ux
    order = np.lexsort((j, key))
    key, rows = key[order], rows[order]
    head = np.flatnonzero(np.r_[True, key[1:] != key[:-1]]) if len(key) else np.zeros(0, int)
    start = np.r_[head, len(key)].astype(np.int64)
    first, last = rows[head, TILE], rows[start[1:] - 1, TILE]
    rank = np.argsort(first, kind="stable")
    place = np.empty_like(rank)
    place[rank] = np.arange(len(rank))
    take = np.argsort(np.repeat(place, np.diff(start)), kind="stable")
    x, y = xy[:, 0], xy[:, 1]
    partial = (x < 0) | (y < 0) | (x + r > w) | (y + r > h) | ~valid
    units = np.stack([key[head] // ncols, key[head] % ncols], axis=1)[rank].reshape(-1, 2)
    return Pieces(units=units, start=np.r_[0, np.cumsum(np.diff(start)[rank])].astype(np.int64),
                  rows=rows[take].reshape(-1, 7), first=first[rank], last=last[rank],
                  partial=partial)


def scatter(unit: np.ndarray, rows: list[list[int]], buffers: Mapping[int, np.ndarray],
            batch_size: int) -> None:
    """Copy a decoded unit's pieces ``rows`` into their tiles: tile ``j`` is row
    ``j % batch_size`` of ``buffers[j // batch_size]``. A unit whose pixels are
    padded (the first channels of wider pixels, e.g. RGB of RGBA read through zarr) is
    copied one channel at a time: numpy copies a 3-byte inner axis pixel by pixel, 3-4x
    slower."""
    if unit.ndim == 3 and unit.strides[1] != unit.shape[2] * unit.itemsize:
        for j, sy0, sy1, sx0, sx1, dy0, dx0 in rows:
            b, s = divmod(j, batch_size)
            dst = buffers[b][s, dy0:dy0 + sy1 - sy0, dx0:dx0 + sx1 - sx0]
            src = unit[sy0:sy1, sx0:sx1]
            for c in range(unit.shape[2]):
                dst[..., c] = src[..., c]
        return
    for j, sy0, sy1, sx0, sx1, dy0, dx0 in rows:
        b, s = divmod(j, batch_size)
        buffers[b][s, dy0:dy0 + sy1 - sy0, dx0:dx0 + sx1 - sx0] = unit[sy0:sy1, sx0:sx1]
