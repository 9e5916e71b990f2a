"""The tile grid: which tiles to read, from which level, at which size.

Tiles are laid on the source level, the coarsest level still at least as fine as the
target mpp. When that level's mpp is within ``mpp_tolerance`` of the target, tiles are
read at ``tile_px`` and not resized (the delivered mpp is the level's, and is recorded);
otherwise ``read_px`` level pixels are read and resized to ``tile_px``. When the target
is within the same tolerance of 2, 4 or 8 times the level's mpp (a 40x scan at 0.2527
um/px read at 0.5), ``read_px`` is exactly that multiple of ``tile_px`` (delivered:
0.5054 um/px, recorded), so the stream can decode JPEG at that scale in the DCT domain.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import numpy as np
import shapely

from wsi_assist.settings import TilingParams
from wsi_assist.slide import SlideInfo


@dataclass(frozen=True)
class TileGrid:
    """Tiles kept on tissue. ``coords`` are level-0 (x, y) of each tile's top-left corner."""

    coords: np.ndarray
    tissue_fraction: np.ndarray
    level: int
    level_downsample: float
    read_px: int
    stride_px: int
    tile_px: int
    target_mpp: float
    mpp: float
    delivered_mpp: float
    level_dimensions: tuple[int, int] = field(default=(0, 0))

    def __post_init__(self) -> None:
        if self.coords.ndim != 2 or self.coords.shape[1] != 2 or self.coords.dtype != np.int64:
            raise ValueError(f"coords must be (N, 2) int64, got {self.coords.dtype} "
                             f"{self.coords.shape}")
        if self.tissue_fraction.shape != (len(self.coords),):
            raise ValueError("tissue_fraction must have one value per tile")
        if self.read_px < 1 or self.tile_px < 1 or self.stride_px < 1:
            raise ValueError("read_px, tile_px and stride_px must be positive")

    def __len__(self) -> int:
        return len(self.coords)

    @property
    def resized(self) -> bool:
        return self.read_px != self.tile_px

    @property
    def size_l0(self) -> float:
        """Tile side in level-0 pixels."""
        return self.read_px * self.level_downsample

    @property
    def stride_l0(self) -> float:
        """Grid step in level-0 pixels."""
        return self.stride_px * self.level_downsample

    @property
    def cell_area_mm2(self) -> float:
        """Area of one grid cell (stride x stride, level-0 scale) in mm^2."""
        return (self.stride_px * self.level_downsample * self.mpp) ** 2 / 1e6

    def level_coords(self) -> np.ndarray:
        """Tile corners in source-level pixels (exact inverse of the level-0 rounding)."""
        return np.rint(self.coords / self.level_downsample).astype(np.int64)

    def boxes(self, rows: np.ndarray | None = None) -> np.ndarray:
        """Tile footprints (all, or those at ``rows``) as shapely boxes in level-0 px."""
        xy = self.coords if rows is None else self.coords[rows]
        x, y = xy[:, 0].astype(np.float64), xy[:, 1].astype(np.float64)
        s = self.size_l0
        return shapely.box(x, y, x + s, y + s)

    def blocks(self, cells: int, halo_px: int) -> tuple[TileGrid, np.ndarray]:
        """The tiles grouped into blocks of ``cells`` x ``cells`` grid cells, each grown
        by ``halo_px`` delivered pixels on every side (read from the same level, white off
        the slide), for analyses that need context around every tile; and, per tile,
        the row of its block. A block covers all its tiles entirely; its halo in level
        pixels is rounded, so its delivered mpp may differ slightly (it is recorded)."""
        if cells < 1 or halo_px < 0:
            raise ValueError(f"cells must be >= 1 and halo_px >= 0, got {cells!r}, "
                             f"{halo_px!r}")
        s, r = self.stride_px, self.read_px
        xy = self.level_coords()
        corner, block_of = np.unique(xy // s // cells, axis=0, return_inverse=True)
        order = np.lexsort((corner[:, 0], corner[:, 1]))  # row by row
        rank = np.empty_like(order)
        rank[order] = np.arange(len(order))
        read_b = (cells - 1) * s + r
        tile_b = max(1, int(round(read_b * self.tile_px / r)))
        halo_read = int(round(halo_px * read_b / tile_b))
        read, tile = read_b + 2 * halo_read, tile_b + 2 * halo_px
        level_xy = corner[order].reshape(-1, 2) * cells * s - halo_read
        level_mpp = self.delivered_mpp * self.tile_px / r
        grid = TileGrid(coords=np.rint(level_xy * self.level_downsample).astype(np.int64),
                        tissue_fraction=np.bincount(rank[block_of.ravel()],
                                                    self.tissue_fraction,
                                                    minlength=len(order)).astype(np.float32),
                        level=self.level, level_downsample=self.level_downsample,
                        read_px=read, stride_px=cells * s, tile_px=tile,
                        target_mpp=self.target_mpp, mpp=self.mpp,
                        delivered_mpp=level_mpp * read / tile,
                        level_dimensions=self.level_dimensions)
        return grid, rank[block_of.ravel()]

    def owners(self, points: np.ndarray) -> np.ndarray:
        """For each level-0 point (N, 2) x, y, the row of the tile it belongs to: of the
        tiles holding it, the last in raster order (the lowest, then the rightmost), so
        that overlapping tiles share out their union; -1 for a point in no tile."""
        pts = np.asarray(points, np.float64).reshape(-1, 2) / self.level_downsample
        out = np.full(len(pts), -1, np.int64)
        if not len(self) or not len(pts):
            return out
        s, r = self.stride_px, self.read_px
        origin, occupied = self._lattice
        rel = pts - origin
        last = np.floor(rel / s).astype(np.int64)  # the last cell whose tile may hold it
        reach = -(-r // s)  # cells back a tile of read_px still reaches
        for dy in range(reach):
            for dx in range(reach):
                c = last - (dx, dy)
                inside = ((c >= 0).all(axis=1) & (c[:, 0] < occupied.shape[1])
                          & (c[:, 1] < occupied.shape[0])
                          & (rel < c * s + r).all(axis=1) & (out < 0))
                hit = np.full(len(pts), -1, np.int64)
                hit[inside] = occupied[c[inside, 1], c[inside, 0]]
                out = np.where(hit >= 0, hit, out)
        return out

    @functools.cached_property
    def _lattice(self) -> tuple[np.ndarray, np.ndarray]:
        """The level-px corner of cell (0, 0) and, per cell of the stride lattice, the row
        of the tile there (-1: none); built once per grid, as :meth:`owners` is called
        for every block of a slide."""
        xy = self.level_coords()
        origin = xy.min(axis=0)
        cell = (xy - origin) // self.stride_px
        if ((xy - origin) % self.stride_px).any():
            raise ValueError("tiles are not on a lattice of the grid's stride")
        occupied = np.full(tuple(cell.max(axis=0)[::-1] + 1), -1, np.int64)
        occupied[cell[:, 1], cell[:, 0]] = np.arange(len(xy))
        return origin, occupied

    def attrs(self) -> dict[str, float | int]:
        return {"level": self.level, "level_downsample": self.level_downsample,
                "read_px": self.read_px, "stride_px": self.stride_px,
                "tile_px": self.tile_px, "target_mpp": self.target_mpp, "mpp": self.mpp,
                "delivered_mpp": self.delivered_mpp, "n_tiles": len(self)}


def source_level(info: SlideInfo, target_mpp: float, tolerance: float) -> int:
    """The coarsest level whose mpp is at most the target (within tolerance); else 0."""
    ok = [i for i in range(info.level_count)
          if info.level_mpp(i) <= target_mpp * (1 + tolerance)]
    return max(ok) if ok else 0


def grid(info: SlideInfo, tissue: shapely.Geometry, params: TilingParams = TilingParams()
         ) -> TileGrid:
    """Lay tiles over the whole source level and keep those with enough tissue."""
    mpp = info.require_mpp()
    level = source_level(info, params.target_mpp, params.mpp_tolerance)
    ds = info.level_downsamples[level]
    level_mpp = mpp * ds
    f = power_of_two(params.target_mpp / level_mpp, params.mpp_tolerance)
    if abs(level_mpp - params.target_mpp) <= params.mpp_tolerance * params.target_mpp:
        read_px, delivered = params.tile_px, level_mpp
    elif f:  # a 40x scan read at 20x (0.2527 -> 0.5054 um/px): decoded at 1/f scale
        read_px, delivered = f * params.tile_px, level_mpp * f
    else:
        read_px = max(1, int(round(params.tile_px * params.target_mpp / level_mpp)))
        delivered = level_mpp * read_px / params.tile_px
    stride = max(1, int(round((params.tile_px - params.overlap_px) * read_px
                              / params.tile_px)))
    lw, lh = info.level_dimensions[level]
    xs = np.arange(0, lw, stride, dtype=np.int64)
    ys = np.arange(0, lh, stride, dtype=np.int64)
    gy, gx = np.meshgrid(ys, xs, indexing="ij")
    level_xy = np.stack([gx.ravel(), gy.ravel()], axis=1)
    coords = np.rint(level_xy * ds).astype(np.int64)
    fraction = tissue_fraction(coords, read_px * ds, tissue)
    keep = fraction >= params.min_tissue if params.min_tissue > 0 else fraction > 0
    return TileGrid(coords=coords[keep], tissue_fraction=fraction[keep].astype(np.float32),
                    level=level, level_downsample=float(ds), read_px=read_px,
                    stride_px=stride, tile_px=params.tile_px, target_mpp=params.target_mpp,
                    mpp=mpp, delivered_mpp=float(delivered), level_dimensions=(lw, lh))


#: Resize factors read as such when the target is within tolerance of them: the stream
#: decodes JPEG at these scales in the DCT domain (``stream.reduced_source``).
POWER_OF_TWO = (2, 4, 8)


def power_of_two(ratio: float, tolerance: float) -> int | None:
    """The factor of POWER_OF_TWO within ``tolerance`` (relative) of ``ratio``, or None."""
    for f in POWER_OF_TWO:
        if abs(ratio - f) <= tolerance * f:
            return f
    return None


def tissue_fraction(coords: np.ndarray, size: float, tissue: shapely.Geometry) -> np.ndarray:
    """Exact area fraction of each square tile covered by ``tissue``."""
    out = np.zeros(len(coords), np.float64)
    if tissue.is_empty or len(coords) == 0:
        return out
    x, y = coords[:, 0].astype(np.float64), coords[:, 1].astype(np.float64)
    boxes = shapely.box(x, y, x + size, y + size)
    shapely.prepare(tissue)
    inside = shapely.contains_properly(tissue, boxes)
    out[inside] = 1.0
    edge = ~inside & shapely.intersects(tissue, boxes)
    if edge.any():
        out[edge] = shapely.area(shapely.intersection(boxes[edge], tissue)) / (size * size)
    return np.clip(out, 0.0, 1.0)

