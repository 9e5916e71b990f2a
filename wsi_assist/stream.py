"""Tile batches for the models: ``stream(path, grid)`` yields (indices, uint8 tiles).

Reference implementation: one tiffslide ``read_region`` per tile, in grid order, with
tiles running off the slide edge padded white and resized with area interpolation
when the grid says so. (Issue 3 replaces the reading with native-tile-aligned Dask
decoding; the interface stays.)
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from wsi_assist.tiling import TileGrid


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


def stream(path: str | Path, grid: TileGrid, batch_size: int = 64, prefetch: int = 4,
           threads: int = 0) -> Iterator[TileBatch]:
    """Yield the grid's tiles in order, ``batch_size`` at a time."""
    from wsi_assist.slide import open_slide

    n = len(grid)
    with open_slide(path) as slide:
        lw, lh = slide.level_dimensions[grid.level]
        for start in range(0, n, batch_size):
            idx = np.arange(start, min(start + batch_size, n), dtype=np.int64)
            tiles = np.stack([read_tile(slide, grid, int(i), (lw, lh)) for i in idx])
            yield TileBatch(index=idx, tiles=tiles)


def read_tile(slide: object, grid: TileGrid, i: int, level_size: tuple[int, int]) -> np.ndarray:
    """One tile via ``read_region``, white outside the slide, resized to ``tile_px``."""
    x0, y0 = (int(v) for v in grid.coords[i])
    r = grid.read_px
    arr = np.asarray(slide.read_region((x0, y0), grid.level, (r, r),  # type: ignore[attr-defined]
                                       as_array=True))[..., :3]
    lx, ly = (int(v) for v in grid.level_coords()[i])
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
