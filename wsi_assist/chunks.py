"""Decoded native chunks of one pyramid level, for the tile stream.

A *unit* is a block of the level's native chunks (TIFF tiles or strips) that is decoded
as one piece: one tile for tiled levels, several consecutive strips stacked for strip
levels (NDPI reports 8-row strips as wide as the image), so that a grid tile needs a
few units, not dozens. Units are cropped to the image, so edge units may be smaller.

Two engines decode a unit:

- ``tifffile``: the compressed bytes are read with ``os.pread`` (thread-safe, no lock)
  and decoded by the page's own tifffile decoder (imagecodecs, releases the GIL). Same
  decoder as tiffslide's zarr store, so the pixels are identical.
- ``zarr``: slicing tiffslide's zarr array (``slide.zarr_group``) over the unit. The
  library path; used where the level is not a single plain TIFF page.
"""

from __future__ import annotations

import logging
import os
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np

log = logging.getLogger(__name__)

Engine = Literal["auto", "tifffile", "zarr"]
#: Strip levels are decoded this many rows at a time (at least one strip).
UNIT_ROWS = 256


class UnitSource(Protocol):
    """Decodes units ``(uy, ux)`` of one level into (h, w, 3) uint8 arrays."""

    level_shape: tuple[int, int]  # (height, width)
    unit_shape: tuple[int, int]  # (height, width) before cropping to the image

    def decode(self, uy: int, ux: int) -> np.ndarray: ...


def unit_bounds(src: UnitSource, uy: int, ux: int) -> tuple[int, int, int, int]:
    """(y0, y1, x0, x1) level pixels of a unit, cropped to the image."""
    (h, w), (uh, uw) = src.level_shape, src.unit_shape
    return uy * uh, min(h, (uy + 1) * uh), ux * uw, min(w, (ux + 1) * uw)


class ZarrUnits:
    """Units read by slicing tiffslide's zarr array of the level."""

    def __init__(self, slide: Any, level: int) -> None:
        arr = slide.zarr_group[str(level)]
        if arr.ndim != 3 or slide.properties.get("tiffslide.series-axes") != "YXS":
            raise ValueError(f"level {level}: only YXS (RGB) levels are supported, got "
                             f"shape {arr.shape!r}")
        self._arr = arr
        self.level_shape = (int(arr.shape[0]), int(arr.shape[1]))
        ch, cw = int(arr.chunks[0]), int(arr.chunks[1])
        self.unit_shape = (ch * max(1, UNIT_ROWS // ch), cw)

    def decode(self, uy: int, ux: int) -> np.ndarray:
        y0, y1, x0, x1 = unit_bounds(self, uy, ux)
        return np.asarray(self._arr[y0:y1, x0:x1, :3])


class TiffUnits:
    """Units decoded straight from the TIFF page's segments (see module docstring)."""

    _fd: int = -1

    def __init__(self, slide: Any, level: int, path: str | Path) -> None:
        page = tiff_page(slide, level)
        if page is None:
            raise ValueError(f"level {level} is not one plain RGB TIFF page")
        self._page = page
        self._decode = page.decode
        self._tables = page.jpegtables
        self._header = getattr(page, "jpegheader", None) if page.is_ndpi else None
        self._offsets = page.dataoffsets
        self._counts = page.databytecounts
        self._fd = os.open(str(path), os.O_RDONLY)
        self.level_shape = (int(page.imagelength), int(page.imagewidth))
        ch, cw = int(page.chunks[0]), int(page.chunks[1])
        self._ncols = int(page.chunked[1])
        self._nrows = int(page.chunked[0])
        self._rows_per_unit = max(1, UNIT_ROWS // ch)
        self.unit_shape = (ch * self._rows_per_unit, cw)

    def close(self) -> None:
        fd, self._fd = self._fd, -1
        if fd >= 0:
            os.close(fd)

    def __del__(self) -> None:
        self.close()

    def _chunk_array(self, cy: int, cx: int) -> np.ndarray:
        i = cy * self._ncols + cx
        count = int(self._counts[i])
        data = os.pread(self._fd, count, int(self._offsets[i])) if count else None
        kwargs: dict[str, Any] = {"jpegtables": self._tables}
        if self._header is not None:
            kwargs["jpegheader"] = self._header
        seg, _, shape = self._decode(data, i, **kwargs)
        if seg is None:  # missing chunk: tifffile fills with zeros as well
            seg = np.zeros(shape, np.uint8)
        return seg.reshape(seg.shape[-3:])

    def decode(self, uy: int, ux: int) -> np.ndarray:
        y0, y1, x0, x1 = unit_bounds(self, uy, ux)
        cy0 = uy * self._rows_per_unit
        cy1 = min(self._nrows, cy0 + self._rows_per_unit)
        parts = [self._chunk_array(cy, ux) for cy in range(cy0, cy1)]
        block = parts[0] if len(parts) == 1 else np.concatenate(parts, axis=0)
        return block[: y1 - y0, : x1 - x0, :3]


def tiff_page(slide: Any, level: int) -> Any | None:
    """The single contiguous RGB TIFF page behind ``level``, or None."""
    props = slide.properties
    if props.get("tiffslide.series-axes") != "YXS":
        return None
    if slide.zarr_group.attrs.get("tiffslide.series-composition") is not None:
        return None
    try:
        tf = slide.ts_tifffile
        series = tf.series[int(props.get("tiffslide.series-index", 0))]
        lvl = series.levels[level]
    except (AttributeError, IndexError, ValueError):
        return None
    if len(lvl.pages) != 1:
        return None
    page = lvl.keyframe
    w, h = slide.level_dimensions[level]
    ok = (page.planarconfig == 1 and page.samplesperpixel >= 3 and page.dtype == np.uint8
          and (page.imagelength, page.imagewidth) == (h, w) and page.imagedepth == 1
          and len(page.dataoffsets) == int(np.prod(page.chunked)))
    return page if ok else None


def open_units(slide: Any, level: int, path: str | Path, engine: Engine = "auto"
               ) -> UnitSource:
    """The unit source of ``level``: ``tifffile`` where possible under ``auto``."""
    if engine not in ("auto", "tifffile", "zarr"):
        raise ValueError(f"engine must be 'auto', 'tifffile' or 'zarr', got {engine!r}")
    if engine in ("auto", "tifffile"):
        try:
            return TiffUnits(slide, level, path)
        except ValueError as e:
            if engine == "tifffile":
                raise
            log.debug("%s: zarr engine for level %d (%s)", path, level, e)
    return ZarrUnits(slide, level)


class SourceCache:
    """Open slides and their unit sources, kept per process (for dask workers)."""

    def __init__(self, size: int = 8) -> None:
        self._size = size
        self._lock = threading.Lock()
        self._items: OrderedDict[tuple[str, int, str], tuple[Any, UnitSource]] = OrderedDict()

    def get(self, path: str, level: int, engine: Engine) -> UnitSource:
        key = (str(path), level, engine)
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key][1]
        from wsi_assist.slide import open_slide

        slide = open_slide(path)
        src = open_units(slide, level, path, engine)
        with self._lock:
            self._items[key] = (slide, src)
            while len(self._items) > self._size:
                _, (old, _) = self._items.popitem(last=False)
                old.close()
        return src


SOURCES = SourceCache()
