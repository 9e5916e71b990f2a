"""Low-resolution pixels of a slide: the tissue overview and the report's picture.

A box of one pyramid level is decoded chunk by chunk in threads (the stream's unit
sources, :mod:`wsi_assist.chunks`: the same pixels as tiffslide's ``read_region``, about
2-2.5x faster on two cores) and block-averaged by an integer factor, in strips of rows so
a single-level gigapixel slide never sits in memory whole.
"""

from __future__ import annotations

import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing
from typing import Any

import numpy as np

from wsi_assist.chunks import UnitSource, open_units, unit_bounds
from wsi_assist.errors import SlideError, in_words
from wsi_assist.slide import SlideInfo

#: Rows of one strip at most, and its bytes at the level's resolution (about).
STRIP_ROWS = 4096
STRIP_BYTES = 128_000_000


def read_lowres(slide: Any, info: SlideInfo, target_mpp: float = 8.0,
                max_pixels: int = 64_000_000) -> tuple[np.ndarray, float]:
    """An overview at about ``target_mpp`` and its downsample from level 0: 8-bit RGB,
    or for a multichannel slide one plane per channel (H, W, C) in the slide's dtype.

    Uses the coarsest level at least as fine as the target, block-averaged by an integer
    factor."""
    want = max(target_mpp / info.require_mpp(), 1.0)
    level, factor = level_and_factor(info, want)
    w, h = info.level_dimensions[level]
    out_w, out_h = max(w // factor, 1), max(h // factor, 1)
    if out_w * out_h > max_pixels:
        raise SlideError(f"{info.path}: overview of {out_w} x {out_h} px is too large")
    out = read_reduced(slide, info, level, (0, 0), (out_w, out_h), factor)
    return out, float(info.level_downsamples[level] * factor)


def level_and_factor(info: SlideInfo, want: float) -> tuple[int, int]:
    """The coarsest level whose downsample is at most ``want`` (level-0 px per output
    px), and the integer factor that level is block-averaged by."""
    level = max((i for i, d in enumerate(info.level_downsamples) if d <= want * 1.001),
                default=0)
    return level, max(int(want / info.level_downsamples[level]), 1)


def read_reduced(slide: Any, info: SlideInfo, level: int, corner: tuple[int, int],
                 size: tuple[int, int], factor: int, threads: int = 0) -> np.ndarray:
    """``size`` (w, h) output px of ``level`` from its px ``corner`` (x, y), each the
    mean of ``factor`` x ``factor`` level px: 8-bit RGB, or (H, W, C) in the slide's
    dtype for a multichannel slide (integers rounded half to even). ``threads``
    decoding threads (0: all cores)."""
    (x0, y0), (w, h) = corner, size
    nc = len(info.channels) if info.multichannel else 3
    dtype = np.dtype(info.dtype) if info.multichannel else np.dtype(np.uint8)
    out = np.empty((h, w, nc), dtype)
    budget = min(STRIP_ROWS, STRIP_BYTES // max(1, w * factor * nc * dtype.itemsize))
    strip = max(factor, (budget // factor) * factor)
    try:
        src = open_units(slide, level, info.path)
    except ValueError as e:
        raise SlideError(f"{info.path}: level {level} cannot be read ({e})") from e
    try:
        with closing(src), warnings.catch_warnings(), \
                ThreadPoolExecutor(threads or len(os.sched_getaffinity(0))) as pool:
            warnings.simplefilter("ignore")
            for r in range(0, h * factor, strip):
                rows = min(strip, h * factor - r)
                arr = read_box(src, (x0, y0 + r, x0 + w * factor, y0 + r + rows), pool)
                block = box_mean(arr[..., :nc].reshape(rows // factor, factor, w, factor, nc))
                out[r // factor:(r + rows) // factor] = (
                    block.round() if block.dtype.kind == "f" and dtype.kind in "ui" else block)
    except SlideError:
        raise  # a unit's: names the file, level and chunk
    except Exception as e:
        raise SlideError(f"{info.path}: pixel data cannot be decoded at level {level} "
                         f"({in_words(e, 'damaged or inconsistent image data')})") from e
    return out


def read_box(src: UnitSource, box: tuple[int, int, int, int],
             pool: ThreadPoolExecutor) -> np.ndarray:
    """Level px ``box`` (x0, y0, x1, y1), inside the level, decoded unit by unit in
    ``pool``'s threads (each copies its unit out of its own buffer)."""
    x0, y0, x1, y1 = box
    uh, uw = src.unit_shape
    out = np.empty((y1 - y0, x1 - x0, src.channels), src.dtype)

    def paste(unit: tuple[int, int]) -> None:
        ty0, ty1, tx0, tx1 = unit_bounds(src, *unit)
        a, b, c, d = max(ty0, y0), min(ty1, y1), max(tx0, x0), min(tx1, x1)
        out[a - y0:b - y0, c - x0:d - x0] = src.decode(*unit)[a - ty0:b - ty0, c - tx0:d - tx0]

    units = [(uy, ux) for uy in range(y0 // uh, -(-y1 // uh))
             for ux in range(x0 // uw, -(-x1 // uw))]
    list(pool.map(paste, units))  # raises the first unit's error
    return out


def box_mean(blocks: np.ndarray) -> np.ndarray:
    """Mean of ``blocks`` (H, f, W, f, C) over its f x f blocks. 8-bit blocks: summed as
    integers, then rounded half to even as ``np.round`` rounds the float mean (the same
    values, 2-5x faster than integer rounding after a sum one block offset at a time,
    itself 5-9x faster than numpy's mean over the two strided axes); others float64."""
    f = blocks.shape[1]
    if blocks.dtype != np.uint8 or blocks.shape[3] != f:
        return np.asarray(blocks.mean(axis=(1, 3)))
    if f == 1:
        return blocks[:, 0, :, 0].copy()
    out = np.empty((blocks.shape[0], blocks.shape[2], blocks.shape[4]), np.uint8)
    step = max(1, BOX_ROWS // f)
    for r in range(0, blocks.shape[0], step):
        out[r:r + step] = _rounded_block_mean(blocks[r:r + step])
    return out


#: Level rows summed at a time by :func:`box_mean` (its buffers stay in the CPU's caches).
BOX_ROWS = 128


def _rounded_block_mean(blocks: np.ndarray) -> np.ndarray:
    f = blocks.shape[1]
    n = f * f
    # the f rows of each block added as whole rows (contiguous, one cast each), then the
    # f columns; 255 * 16^2 fits 16 bits
    rows = blocks[:, 0].astype(np.uint16 if f <= 16 else np.uint32)
    for i in range(1, f):
        np.add(rows, blocks[:, i], out=rows)
    acc = rows[:, :, 0].copy()
    for j in range(1, f):
        np.add(acc, rows[:, :, j], out=acc)
    # the float32 quotient of sums below 2**24 by n < 2**16 is exact at a tie and
    # otherwise off by at most 2**-17, less than the 1 / (2 n) from v to the nearest
    # half: np.rint rounds it as np.round rounds the exact mean
    x = acc.astype(np.float32 if n < 2**16 else np.float64)
    np.divide(x, n, out=x)
    np.rint(x, out=x)
    return x.astype(np.uint8)
