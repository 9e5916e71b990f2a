"""The per-slide result store: a zarr v3 group ``slide.zarr``.

Arrays are row-aligned with ``coords`` (one row per tile). Every stage writes its own
arrays and attributes, so any stage can be rerun alone.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import zarr

from wsi_assist.tiling import TileGrid


def open_store(path: Path, mode: str = "a") -> zarr.Group:
    """Open (or create, with mode ``a``/``w``) a zarr v3 group at ``path``."""
    return zarr.open_group(str(path), mode=mode, zarr_format=3)


def write_array(group: zarr.Group, name: str, data: np.ndarray,
                rows_per_chunk: int = 65536, **attrs: Any) -> zarr.Array:
    """Write ``data`` as array ``name`` (replacing it), chunked along rows."""
    data = np.asarray(data)
    chunks = (max(1, min(rows_per_chunk, data.shape[0] or 1)),) + data.shape[1:]
    arr = group.create_array(name, shape=data.shape, dtype=data.dtype, chunks=chunks,
                             overwrite=True)
    if data.size:
        arr[...] = data
    if attrs:
        arr.attrs.update(attrs)
    return arr


def write_grid(group: zarr.Group, grid: TileGrid) -> None:
    """Store the grid's coordinates, tissue fractions and geometry attributes."""
    write_array(group, "coords", grid.coords, axes=["tile", "xy"],
                description="level-0 x, y of each tile's top-left corner")
    write_array(group, "tissue_fraction", grid.tissue_fraction, axes=["tile"])
    group.attrs.update(grid.attrs())


def read_grid(group: zarr.Group) -> TileGrid:
    """Rebuild the TileGrid stored by :func:`write_grid`."""
    a = dict(group.attrs)
    try:
        coords = np.asarray(group["coords"][...], dtype=np.int64).reshape(-1, 2)
        fraction = np.asarray(group["tissue_fraction"][...], dtype=np.float32)
        return TileGrid(coords=coords, tissue_fraction=fraction, level=int(a["level"]),
                        level_downsample=float(a["level_downsample"]),
                        read_px=int(a["read_px"]), stride_px=int(a["stride_px"]),
                        tile_px=int(a["tile_px"]), target_mpp=float(a["target_mpp"]),
                        mpp=float(a["mpp"]), delivered_mpp=float(a["delivered_mpp"]))
    except KeyError as e:
        raise KeyError(f"slide.zarr has no tile grid ({e.args[0]!r} missing); "
                       "run the 'tiles' stage first") from e
