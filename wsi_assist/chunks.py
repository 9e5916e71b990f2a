"""Decoded native chunks of one pyramid level, for the tile stream.

A *unit* is a block of the level's native chunks (TIFF tiles or strips) that is decoded
as one piece: one tile for tiled levels, several consecutive strips stacked for strip
levels (NDPI reports 8-row strips as wide as the image), so that a grid tile needs a
few units, not dozens. Units are cropped to the image, so edge units may be smaller.

Two engines decode a unit:

- ``tifffile``: the compressed bytes are read with ``os.pread`` (thread-safe, no lock)
  and decoded with tifffile's arguments for the page, so the pixels are identical to
  tiffslide's zarr store. 8-bit RGB/YCbCr JPEG is decoded by imagecodecs straight into a
  buffer each thread keeps (a fresh 200 kB array per tile costs page faults in worker
  threads: 1.5x the decode time, measured); other codecs go through the page's decoder.
- ``zarr``: slicing tiffslide's zarr array (``slide.zarr_group``) over the unit. The
  library path; used where the level is not a single plain TIFF page.

Multichannel levels (CYX or YX series: OME-TIFF, QPTIFF) are decoded per channel plane:
a unit holds the same chunk of every plane, interleaved (h, w, C) in the slide's dtype.
A plane is a page of its own (one page per channel, as OME-TIFF and QPTIFF write them)
or a sample plane of a planar-separate page; the ``tifffile`` engine decodes each
plane's chunk with that page's own decoder and tables.
"""

from __future__ import annotations

import logging
import os
import re
import threading
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, NamedTuple, Protocol

import numpy as np

from wsi_assist.errors import SlideError
from wsi_assist.files import file_state
from wsi_assist.slide import Layout, slide_layout

log = logging.getLogger(__name__)

Engine = Literal["auto", "tifffile", "zarr"]
#: Strip levels are decoded this many rows at a time (at least one strip).
UNIT_ROWS = 256
#: The chunks of one column decoded at a reduced scale (:class:`ScaledUnits`) are
#: stacked this many rows tall: a grid tile is then cut from fewer pieces, and every
#: piece copied is a GIL hand-over between the decode threads (``bench/gil_handoff.py``:
#: two threads copying 10-38 k element pieces get 0.56-0.72x of one thread's copies).
#: 1,024 rows against 256: ratio_to_limit up by 0.01-0.11 in each of 5 paired runs
#: (``bench/tiles.py --target-mpp 0.5``); the batch window grows with the unit's height.
SCALED_UNIT_ROWS = 1024


class UnitSource(Protocol):
    """Decodes units ``(uy, ux)`` of one level into (h, w, 3) uint8 arrays (``rgb``), or
    (h, w, C) arrays of the slide's dtype, one plane per channel (``channels``)."""

    level_shape: tuple[int, int]  # (height, width)
    unit_shape: tuple[int, int]  # (height, width) before cropping to the image
    layout: Layout
    channels: int  # C: 3 for RGB
    dtype: np.dtype

    def decode(self, uy: int, ux: int) -> np.ndarray: ...

    def close(self) -> None: ...


def unit_bounds(src: UnitSource, uy: int, ux: int) -> tuple[int, int, int, int]:
    """(y0, y1, x0, x1) level pixels of a unit, cropped to the image."""
    (h, w), (uh, uw) = src.level_shape, src.unit_shape
    return uy * uh, min(h, (uy + 1) * uh), ux * uw, min(w, (ux + 1) * uw)


class ZarrUnits:
    """Units read by slicing tiffslide's zarr array of the level."""

    layout: Layout
    channels: int
    dtype: np.dtype

    def __init__(self, slide: Any, level: int, path: str | Path) -> None:
        self._where = f"{path} level {level}"
        arr = slide.zarr_group[str(level)]
        axes = slide.properties.get("tiffslide.series-axes")
        self._axes = axes
        if axes == "YXS" and arr.ndim == 3:
            self.layout, self.channels, self.dtype = "rgb", 3, np.dtype(np.uint8)
            yx = 0
        elif slide_layout(slide) == "channels" and arr.ndim == len(axes):
            self.layout, self.dtype = "channels", np.dtype(arr.dtype)
            self.channels = int(arr.shape[0]) if axes == "CYX" else 1
            yx = 1 if axes == "CYX" else 0
        else:
            raise ValueError(f"level {level}: only RGB (YXS) and multichannel (CYX) levels "
                             f"are supported, got axes {axes!r} with shape {arr.shape!r}")
        self._arr = arr
        self.level_shape = (int(arr.shape[yx]), int(arr.shape[yx + 1]))
        ch, cw = int(arr.chunks[yx]), int(arr.chunks[yx + 1])
        self.unit_shape = (ch * max(1, UNIT_ROWS // ch), cw)

    def close(self) -> None:
        """Nothing to close: the slide owns the zarr store."""

    def decode(self, uy: int, ux: int) -> np.ndarray:
        y0, y1, x0, x1 = unit_bounds(self, uy, ux)
        try:
            if self._axes == "CYX":
                return np.asarray(self._arr[:, y0:y1, x0:x1]).transpose(1, 2, 0)
            if self._axes == "YX":
                return np.asarray(self._arr[y0:y1, x0:x1])[..., None]
            return np.asarray(self._arr[y0:y1, x0:x1, :3])
        except Exception as e:  # codec errors have no common base class
            raise SlideError(f"{self._where}: cannot decode rows {y0}-{y1}, columns "
                             f"{x0}-{x1}: {e}") from e


class TiffUnits:
    """Units decoded straight from the TIFF page's segments (see module docstring).

    ``decode`` returns a view of a buffer owned by the calling thread, overwritten by
    that thread's next call: use (or copy) it before decoding again.
    """

    _fd: int = -1

    def __init__(self, slide: Any, level: int, path: str | Path) -> None:
        page = tiff_page(slide, level)
        planes = [(page, 0)] if page is not None else tiff_planes(slide, level)
        if planes is None:
            raise ValueError(f"level {level} is neither one plain RGB TIFF page nor one "
                             "plain plane per channel")
        rgb = page is not None
        page = planes[0][0]
        self.layout: Layout = "rgb" if rgb else "channels"
        self.channels = 3 if rgb else len(planes)
        self.dtype = np.dtype(np.uint8) if rgb else np.dtype(page.dtype)
        #: per plane: (decode, jpegtables, offsets, counts, index of its first segment)
        self._planes = [(p.decode, p.jpegtables, p.dataoffsets, p.databytecounts, base)
                        for p, base in planes]
        self._page = page
        self._where = f"{path} level {level}"
        self._decode = page.decode
        self._tables = page.jpegtables
        self._header = getattr(page, "jpegheader", None) if rgb and page.is_ndpi \
            else None
        self._jpeg = jpeg_colorspaces(page)
        if self._jpeg is not None:
            import imagecodecs

            self._jpeg8 = imagecodecs.jpeg8_decode
        #: JPEG chunks checked for damage libjpeg decodes through (see jpeg_damaged);
        #: as units decode, the rows of each damaged one go in ``damaged_rows``
        self._check_jpeg = page.compression == 7 and self._header is None
        self.damaged_rows = DamagedRows()
        self._offsets = page.dataoffsets
        self._counts = page.databytecounts
        self._fd = os.open(str(path), os.O_RDONLY)
        self.level_shape = (int(page.imagelength), int(page.imagewidth))
        ch, cw = int(page.chunks[0]), int(page.chunks[1])
        self._chunk_rows = ch
        self._strips = not page.is_tiled  # the last strip may be shorter
        self._ncols = -(-self.level_shape[1] // cw)
        self._nrows = -(-self.level_shape[0] // ch)
        self.n_chunks = self._ncols * self._nrows  # per plane
        self._rows_per_unit = max(1, UNIT_ROWS // ch)
        self.unit_shape = (ch * self._rows_per_unit, cw)
        self._local = threading.local()

    def close(self) -> None:
        fd, self._fd = self._fd, -1
        if fd >= 0:
            os.close(fd)

    def __del__(self) -> None:
        self.close()

    def chunk_rows(self, i: int) -> int:
        """Rows of chunk ``i`` (a last strip may be shorter than the others)."""
        ch = self._chunk_rows
        return min(ch, self.level_shape[0] - (i // self._ncols) * ch) if self._strips else ch

    def read_chunk(self, i: int) -> bytes | None:
        """The compressed bytes of chunk ``i`` (None where the file has none)."""
        count = int(self._counts[i])
        return os.pread(self._fd, count, int(self._offsets[i])) if count else None

    def decode_chunk(self, data: bytes | None, i: int, out: np.ndarray) -> None:
        """Decode chunk ``i`` into ``out`` (its rows, width, 3), with tifffile's
        arguments; straight into ``out`` with imagecodecs for 8-bit RGB/YCbCr JPEG."""
        if data is None:  # missing chunk: tifffile fills with zeros as well
            out[:] = 0
            return
        if self._jpeg is not None:
            # imagecodecs.jpeg_decode minus its Python wrapper: the GIL is held for less
            # time per tile, which is what two decoding threads wait on
            if self._header is not None:
                data = b"".join((self._header, data, b"\xff\xd9"))
            got = self._jpeg8(data, tables=self._tables, colorspace=self._jpeg[0],
                              outcolorspace=self._jpeg[1], shape=out.shape[:2], out=out)
        else:
            kwargs: dict[str, Any] = {"jpegtables": self._tables}
            if self._header is not None:
                kwargs["jpegheader"] = self._header
            got = self._decode(data, i, **kwargs)[0]
        if got is not out:
            out[:] = got.reshape(got.shape[-3:])[:, :, :3]

    def decode_planes(self, i: int, out: np.ndarray) -> None:
        """Decode chunk ``i`` of every channel plane into ``out`` (its rows, width, C)."""
        for c, (decode, tables, offsets, counts, base) in enumerate(self._planes):
            count = int(counts[base + i])
            if not count:  # missing chunk: zeros, as tifffile
                out[..., c] = 0
                continue
            data = os.pread(self._fd, count, int(offsets[base + i]))
            got = decode(data, base + i, jpegtables=tables)[0]
            out[..., c] = got.reshape(got.shape[-3:-1])

    def scaled(self, factor: int) -> ScaledUnits | None:
        """This level's units decoded at 1 / ``factor`` scale in the DCT domain
        (:class:`ScaledUnits`), or None where that cannot be done: not 8-bit RGB/YCbCr
        JPEG tiles, NDPI strips, or chunks not divisible by ``factor``."""
        ch, cw = self.unit_shape[0] // self._rows_per_unit, self.unit_shape[1]
        if (factor not in SCALES or self._jpeg is None or self._header is not None
                or self._strips or ch % factor or cw % factor):
            return None
        return ScaledUnits(self, factor)

    def decode(self, uy: int, ux: int) -> np.ndarray:
        y0, y1, x0, x1 = unit_bounds(self, uy, ux)
        ch = self._chunk_rows
        buf = getattr(self._local, "buf", None)
        if buf is None:
            buf = self._local.buf = np.empty((*self.unit_shape, self.channels), self.dtype)
        cy0 = uy * self._rows_per_unit
        cy1 = min(self._nrows, cy0 + self._rows_per_unit)
        rgb = self.layout == "rgb"
        try:
            for k, cy in enumerate(range(cy0, cy1)):
                i = cy * self._ncols + ux
                rows = buf[k * ch:k * ch + self.chunk_rows(i)]
                if rgb:
                    data = self.read_chunk(i)
                    if self._check_jpeg and data is not None and \
                            jpeg_damaged(data, self._tables):
                        self.damaged_rows.add(uy, ux, k * ch, k * ch + len(rows))
                    self.decode_chunk(data, i, rows)
                else:
                    self.decode_planes(i, rows)
        except Exception as e:  # codec errors have no common base class
            raise SlideError(f"{self._where}: cannot decode chunk row {cy0}, column {ux}: "
                             f"{e}") from e
        return buf[: y1 - y0, : x1 - x0]


class DamagedRows:
    """Where a source's units hold damaged chunks: unit (row, column) -> spans of rows
    within the unit. Filled by the decode threads as they go (a dict update under
    the GIL); read by the stream to flag the tiles those rows feed."""

    def __init__(self) -> None:
        self._spans: dict[tuple[int, int], list[tuple[int, int]]] = {}

    def __bool__(self) -> bool:
        return bool(self._spans)

    def add(self, uy: int, ux: int, y0: int, y1: int) -> None:
        """Rows ``y0:y1`` of unit (``uy``, ``ux``) come from a damaged chunk."""
        self._spans.setdefault((uy, ux), []).append((y0, y1))

    def hit(self, uy: int, ux: int, y0: int, y1: int) -> bool:
        """Whether rows ``y0:y1`` of unit (``uy``, ``ux``) touch a damaged chunk."""
        return any(a < y1 and y0 < b for a, b in self._spans.get((uy, ux), ()))

    def boxes(self, unit_shape: tuple[int, int], scale: int = 1) -> np.ndarray:
        """(M, 4) int64 boxes (x0, y0, x1, y1) of the damaged chunks in level pixels, for
        units of ``unit_shape`` decoded at 1 / ``scale``."""
        uh, uw = unit_shape
        out = [(ux * uw, uy * uh + a, (ux + 1) * uw, uy * uh + b)
               for (uy, ux), rows in list(self._spans.items()) for a, b in rows]
        return np.array(out, np.int64).reshape(-1, 4) * scale


#: Reduced scales libjpeg decodes at in the DCT domain (1/2, 1/4, 1/8).
SCALES = (2, 4, 8)
#: An Adobe APP14 segment with transform 0: the three components are R, G, B. Aperio
#: writes RGB JPEG without a JFIF or Adobe marker, which libjpeg would read as YCbCr
#: (tifffile tells imagecodecs the colour space instead; TurboJPEG takes no such argument).
ADOBE_RGB = b"\xff\xee\x00\x0eAdobe\x00\x64\x00\x00\x00\x00\x00"


class ScaledUnits:
    """The units of a JPEG-tiled level decoded at 1 / ``factor`` scale in the DCT domain
    (libjpeg-turbo's scaled IDCT through simplejpeg's TurboJPEG binding, which releases
    the GIL, straight into a packed RGB buffer): the coefficients of each 8 x 8 block
    give a ``8 / factor`` px block directly. Not exactly an area average: on H&E tiles
    the mean absolute difference from area (box) resizing is about 0.1 grey levels,
    single pixels differ by up to about 20 at sharp edges (tested in
    tests/test_stream.py). Coordinates and shapes are those of the level divided by
    ``factor`` (rows and columns of a last partial pixel are dropped); a unit stacks
    the chunks of one column until it is ``SCALED_UNIT_ROWS`` rows tall at that scale
    (fewer, larger pieces to copy into tiles). A chunk libjpeg decodes only with warnings
    (damaged, cut short) is decoded in full as :class:`TiffUnits` does, then
    area-reduced, so that both paths read it alike. The rows of such a chunk, or of one
    with damage libjpeg does not warn about (:func:`jpeg_damaged_silently`), go in
    ``damaged_rows``: libjpeg's strict decode is this path's check of markers and
    ends, which spares the byte search of :func:`jpeg_damaged` (6 % of a decode thread).

    ``decode`` returns a view of a buffer owned by the calling thread, as
    :class:`TiffUnits` does.
    """

    layout: Layout = "rgb"
    channels = 3
    dtype = np.dtype(np.uint8)

    def __init__(self, src: TiffUnits, factor: int) -> None:
        import simplejpeg

        self._src, self.factor = src, factor
        self._jpeg_decode = simplejpeg.decode_jpeg
        self._where = src._where
        h, w = src.level_shape
        self.level_shape = (h // factor, w // factor)
        #: (rows, columns) of one decoded chunk
        self.chunk_shape = (src._chunk_rows // factor, src.unit_shape[1] // factor)
        self._chunks_per_unit = max(1, SCALED_UNIT_ROWS // self.chunk_shape[0])
        self.unit_shape = (self.chunk_shape[0] * self._chunks_per_unit, self.chunk_shape[1])
        adobe = ADOBE_RGB if src._jpeg == (2, 2) else b""
        tables = src._tables[2:-2] if src._tables else b""  # without their SOI and EOI
        #: what goes before a chunk's bytes after its SOI (nothing: the chunk as it is)
        self._prefix = b"\xff\xd8" + adobe + tables if adobe or tables else b""
        #: the rows of damaged chunks in this source's units; see TiffUnits
        self.damaged_rows = DamagedRows()
        self._local = threading.local()

    def close(self) -> None:
        """Nothing to close: the full-scale source owns the file."""

    def decode(self, uy: int, ux: int) -> np.ndarray:
        src, ch = self._src, self.chunk_shape[0]
        y0, y1, x0, x1 = unit_bounds(self, uy, ux)
        buf = getattr(self._local, "buf", None)
        if buf is None:
            buf = self._local.buf = np.empty((*self.unit_shape, 3), np.uint8)
        cy0 = uy * self._chunks_per_unit
        try:
            for k, cy in enumerate(range(cy0, min(src._nrows, cy0 + self._chunks_per_unit))):
                data = src.read_chunk(cy * src._ncols + ux)
                warned = self.decode_chunk(data, buf[k * ch:(k + 1) * ch])
                if data is not None and src._check_jpeg and (
                        warned or jpeg_damaged_silently(data, src._tables)):
                    self.damaged_rows.add(uy, ux, k * ch, (k + 1) * ch)
        except Exception as e:  # codec errors have no common base class
            raise SlideError(f"{self._where}: cannot decode chunk row {cy0}, column {ux} "
                             f"at 1/{self.factor} scale: {e}") from e
        return buf[: y1 - y0, : x1 - x0]

    def decode_chunk(self, data: bytes | None, out: np.ndarray) -> bool:
        """Decode one chunk's compressed bytes at reduced scale straight into ``out``, a
        C-contiguous ``chunk_shape + (3,)`` uint8 array. True when libjpeg warned
        (damaged, cut short: then it is decoded in full and area-reduced)."""
        if data is None:  # missing chunk: zeros, as tifffile
            out[:] = 0
            return False
        h, w = self.chunk_shape
        try:
            jpeg = b"".join((self._prefix, memoryview(data)[2:])) if self._prefix else data
            got = self._jpeg_decode(jpeg, "RGB", min_height=h, min_width=w, buffer=out)
        except ValueError:  # libjpeg warned (strict): read it as the full path does
            out[:] = self._full_then_reduce(data)
            return True
        if got.shape[:2] != (h, w):
            raise ValueError(f"JPEG chunk of {got.shape[1]} x {got.shape[0]} px at 1/"
                             f"{self.factor} scale, expected {w} x {h}")
        return False

    def _full_then_reduce(self, data: bytes) -> np.ndarray:
        """A chunk libjpeg decodes only with warnings (damaged, cut short): decoded in
        full as :class:`TiffUnits` does, then area-reduced."""
        from PIL import Image

        src = self._src
        full = np.empty((src._chunk_rows, src.unit_shape[1], 3), np.uint8)
        src.decode_chunk(data, 0, full)
        return np.asarray(Image.fromarray(full).reduce(self.factor))


#: This many zero bytes in a row inside JPEG scan data are a hole (unwritten or zeroed
#: blocks), unless the Huffman tables code uniform blocks as zero bits (see
#: :meth:`Coding.zeros_are_blank`): 128 zero bits in a row are otherwise blocks of 63
#: coefficients of -1 or the like, which no image has.
ZERO_RUN = bytes(16)
#: 0xFF in scan data is followed by 0x00 (stuffing), a fill byte or, where a restart
#: interval is defined, a restart marker.
_MARKER_IN_SCAN = re.compile(rb"\xff[^\x00\xd0-\xd7\xff]")
_MARKER_IN_SCAN_NO_RESTARTS = re.compile(rb"\xff[^\x00\xff]")


class Coding(NamedTuple):
    """What a JPEG header, or a page's JPEG tables, says of the scan's coding."""

    #: the first symbol of each Huffman table (class, id): its all-zero-bits code
    firsts: dict[tuple[int, int], int]
    #: a restart interval is defined (DRI): restart markers belong in the scan
    restarts: bool

    def over(self, tables: Coding) -> Coding:
        """This header's coding, completed by the page's JPEG ``tables``."""
        return Coding({**tables.firsts, **self.firsts}, self.restarts or tables.restarts)

    def zeros_are_blank(self) -> bool:
        """Whether zero bits are uniform blocks: every DC table's shortest code is "no
        change" and every AC table's is end-of-block, as in tables optimised for a tile
        of blank glass or padding. There a run of zero bytes is valid data (and a hole
        in it changes nothing)."""
        return {c for c, _ in self.firsts} == {0, 1} and not any(self.firsts.values())


def jpeg_damaged(data: bytes, tables: bytes | None = None) -> bool:
    """Whether one JPEG tile or strip is damaged in ways libjpeg decodes through with
    only a warning ("Corrupt JPEG data: premature end of data segment", ...): no scan
    header, no end-of-image marker (cut short, or padded with zeros), a stray marker
    inside the scan data (a restart marker too, where no restart interval is defined),
    or a hole of zero bytes in it. ``tables``: the page's JPEG tables (TIFF JPEGTables),
    where the chunks' Huffman tables may be. A few byte searches, no decoding: bit
    errors that keep this structure intact are not seen."""
    scan = _scan(data, tables)
    if scan is None or _holed(data, scan):
        return True
    start, end, restarts, _ = scan
    stray = _MARKER_IN_SCAN if restarts else _MARKER_IN_SCAN_NO_RESTARTS
    return stray.search(data, start, end) is not None


def jpeg_damaged_silently(data: bytes, tables: bytes | None = None) -> bool:
    """The part of :func:`jpeg_damaged` that libjpeg decodes through without even a
    warning: a hole of zero bytes in the scan data, or bytes after the end-of-image
    marker. For chunks libjpeg decoded strictly (no warning), whose markers and end
    it has checked itself, more thoroughly than the byte search (a restart marker out
    of sequence or a broken Huffman code warns too)."""
    scan = _scan(data, tables)
    return scan is None or _holed(data, scan)


def _scan(data: bytes, tables: bytes | None) -> tuple[int, int, bool, bool] | None:
    """(start and end of the scan data, whether a restart interval is defined, whether
    zero bits are blank blocks; see :func:`_scan_header`), or None when there is no
    scan header or no end-of-image marker after it."""
    head = _scan_header(data, tables)
    if head is None:
        return None
    start, restarts, blank = head
    end = data.rfind(b"\xff\xd9")
    return None if end < start else (start, end, restarts, blank)


def _holed(data: bytes, scan: tuple[int, int, bool, bool]) -> bool:
    """Whether the scan data holds a hole of zero bytes (not looked for where zero bits
    are blank blocks), or bytes other than zero padding follow the end-of-image
    marker."""
    start, end, _, zeros_are_blank = scan
    return bool(data[end + 2:].strip(b"\x00")) or (
        not zeros_are_blank and data.find(ZERO_RUN, start, end) >= 0)


#: (header up to its scan data, the page's JPEG tables) last parsed -> see
#: :func:`_scan_header`: the chunks of one level almost always share one header, and a
#: header parses the same whatever follows it. A few entries (slides streamed side by
#: side).
_SCAN_HEADERS: dict[tuple[bytes, bytes | None], tuple[int, bool, bool]] = {}


def _scan_header(data: bytes, tables: bytes | None = None
                 ) -> tuple[int, bool, bool] | None:
    """(offset of the entropy-coded data after the first start-of-scan header, whether
    a restart interval is defined, whether zero bits are blank blocks), with the page's
    JPEG ``tables``; None when there is no such header."""
    for (header, tabs), found in list(_SCAN_HEADERS.items()):
        if (tabs is tables or tabs == tables) and data.startswith(header):
            return found
    start, coding = _walk(data)
    if start is None:
        return None
    if tables:
        coding = coding.over(_walk(tables)[1])
    if len(_SCAN_HEADERS) >= 8:
        _SCAN_HEADERS.clear()
    found = _SCAN_HEADERS[(data[:start], tables)] = (start, coding.restarts,
                                                     coding.zeros_are_blank())
    return found


def _walk(data: bytes) -> tuple[int | None, Coding]:
    """Walk the marker segments from SOI: (where the scan data of the first SOS starts,
    or None when there is none or the segments are broken; the coding they define on
    the way: each Huffman table's first symbol, a restart interval)."""
    firsts: dict[tuple[int, int], int] = {}
    restarts = False
    pos, n = 2, len(data)
    if data[:2] != b"\xff\xd8":
        return None, Coding(firsts, restarts)
    while pos + 4 <= n:
        if data[pos] != 0xFF:
            return None, Coding(firsts, restarts)
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        length = int.from_bytes(data[pos + 2:pos + 4], "big")
        if marker == 0xDA:
            return (pos + 2 + length if pos + 2 + length <= n else None), \
                Coding(firsts, restarts)
        if marker == 0xDD:  # DRI: the restart interval, in MCUs (0: none)
            restarts = data[pos + 4:pos + 6] != b"\x00\x00"
        if marker == 0xC4:  # DHT: (class << 4 | id, 16 counts, symbols) repeated
            at, stop = pos + 4, min(n, pos + 2 + length)
            while at + 17 <= stop:
                count = sum(data[at + 1:at + 17])
                if count and at + 17 < stop:
                    firsts[(data[at] >> 4, data[at] & 15)] = data[at + 17]
                at += 17 + count
        pos += 2 + length
    return None, Coding(firsts, restarts)


def jpeg_colorspaces(page: Any) -> tuple[int | None, int] | None:
    """(colorspace, outcolorspace) that tifffile gives imagecodecs for an 8-bit, 3-sample
    JPEG page (``tifffile.jpeg_decode_colorspace``); None for anything else."""
    if (page.compression != 7 or page.bitspersample != 8 or page.samplesperpixel != 3
            or page.extrasamples or page.planarconfig != 1):
        return None
    if page.photometric == 6:  # YCbCr
        return None, 2
    if page.photometric == 2:  # RGB; Aperio writes it without a JFIF marker
        return (None if page.is_jfif else 2), 2
    return None


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


def tiff_planes(slide: Any, level: int) -> list[tuple[Any, int]] | None:
    """The channel planes behind a multichannel (CYX or YX) ``level``: (page, index of
    the plane's first segment in that page) for each channel, or None when the level is
    not plain planes of one chunking (then the zarr engine reads it)."""
    props = slide.properties
    if slide_layout(slide) != "channels":
        return None
    if slide.zarr_group.attrs.get("tiffslide.series-composition") is not None:
        return None
    try:
        series = slide.ts_tifffile.series[int(props.get("tiffslide.series-index", 0))]
        lvl = series.levels[level]
        n = int(lvl.shape[0]) if props.get("tiffslide.series-axes") == "CYX" else 1
        pages = list(lvl.pages)
    except (AttributeError, IndexError, ValueError, TypeError):
        return None
    if not pages or any(p is None for p in pages):
        return None
    key = lvl.keyframe  # frames share its geometry; each page is checked against it
    w, h = slide.level_dimensions[level]
    if not ((key.imagelength, key.imagewidth) == (h, w) and key.imagedepth == 1
            and key.bitspersample >= 8):
        return None
    if len(pages) == n and key.samplesperpixel == 1:
        planes = [(p, 0) for p in pages]
    elif len(pages) == 1 and key.planarconfig == 2 and key.samplesperpixel == n:
        per_plane = len(key.dataoffsets) // n
        planes = [(key, c * per_plane) for c in range(n)]
    else:
        return None
    for p, _ in planes:
        if not (p.shape == key.shape and p.chunks == key.chunks and p.dtype == key.dtype
                and p.compression == key.compression
                and len(p.dataoffsets) == int(np.prod(key.chunked))):
            return None
    return planes


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
    return ZarrUnits(slide, level, path)


@dataclass
class _Open:
    """A cached open slide and unit source; closed once evicted and no longer leased."""

    ident: tuple[str, int, int, int] | None
    slide: Any
    src: UnitSource
    users: int = 0
    evicted: bool = False

    def close(self) -> None:
        self.src.close()
        self.slide.close()


class SourceCache:
    """Open slides and their unit sources, kept per process: the stages streaming one
    slide in turn, and dask workers, open it once. An entry is reopened when the file's
    identity (inode, size, mtime) changed, and closed when evicted but not before the
    last stream using it ends."""

    def __init__(self, size: int = 8) -> None:
        self._size = size
        self._lock = threading.Lock()
        self._items: OrderedDict[tuple[str, int, str], _Open] = OrderedDict()

    @contextmanager
    def lease(self, path: str, level: int, engine: Engine) -> Iterator[UnitSource]:
        """The unit source of ``path`` at ``level``, kept open while the block runs."""
        entry = self._get(str(path), level, engine)
        try:
            yield entry.src
        finally:
            with self._lock:
                entry.users -= 1
                close = entry.evicted and entry.users == 0
            if close:
                entry.close()

    def _get(self, path: str, level: int, engine: Engine) -> _Open:
        from wsi_assist.slide import open_slide

        key = (path, level, engine)
        ident = file_state(Path(path))  # None: open_slide says why
        with self._lock:
            entry = self._items.get(key)
            if entry is not None and entry.ident == ident:
                self._items.move_to_end(key)
                entry.users += 1
                return entry
        slide = open_slide(path)
        try:
            entry = _Open(ident, slide, open_units(slide, level, path, engine), users=1)
        except BaseException:
            slide.close()
            raise
        with self._lock:
            evicted = [old] if (old := self._items.pop(key, None)) is not None else []
            self._items[key] = entry
            while len(self._items) > self._size:
                evicted.append(self._items.popitem(last=False)[1])
            for old in evicted:
                old.evicted = True
            idle = [old for old in evicted if old.users == 0]
        for old in idle:
            old.close()
        return entry

    def clear(self) -> None:
        """Drop every entry (closed once unused); the bench times cold opens with this."""
        with self._lock:
            items, self._items = list(self._items.values()), OrderedDict()
            for entry in items:
                entry.evicted = True
            idle = [entry for entry in items if entry.users == 0]
        for entry in idle:
            entry.close()

    def __len__(self) -> int:
        return len(self._items)


SOURCES = SourceCache()
