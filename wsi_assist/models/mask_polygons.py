"""Segmentation masks to QuPath-ready polygons (level-0 px, holes kept).

Per-tile masks become exact pixel-edge polygons placed at the tile's level-0 corner; the
pieces of one class from all tiles are dissolved with ``shapely.union_all`` (objects cut
by tile borders become one polygon again), then simplified (Douglas-Peucker, topology
kept, to a stated tolerance) and small islands dropped. A promptable segmenter's mask
becomes the outline of the part under its prompt point.
"""

from __future__ import annotations

import numpy as np
import shapely
from shapely import affinity

from wsi_assist.tissue import as_multipolygon, mask_to_polygons

#: Vertices are snapped to this grid (level-0 px) when pieces are merged, so edges
#: shared by neighbouring tiles coincide exactly despite float placement.
MERGE_GRID_PX = 1e-3


def tile_polygons(mask: np.ndarray, px_scale: float, corner: tuple[float, float]
                  ) -> shapely.MultiPolygon:
    """A tile's boolean mask as polygons in level-0 px: ``px_scale`` level-0 px per mask
    pixel, the mask's top-left at ``corner``."""
    poly = mask_to_polygons(mask, px_scale)
    return affinity.translate(poly, float(corner[0]), float(corner[1]))


def merge_polygons(parts: list[shapely.Geometry], simplify_px: float = 0.0,
                   min_area_px2: float = 0.0) -> shapely.MultiPolygon:
    """Pieces of one class dissolved across tile borders, simplified to ``simplify_px``
    (topology kept: holes stay holes), polygons under ``min_area_px2`` dropped."""
    if not parts:
        return shapely.MultiPolygon()
    merged = as_multipolygon(shapely.union_all(parts, grid_size=MERGE_GRID_PX))
    if simplify_px > 0:
        merged = as_multipolygon(shapely.simplify(merged, simplify_px,
                                                  preserve_topology=True))
    return shapely.MultiPolygon([g for g in merged.geoms if g.area >= min_area_px2])


def outline_at(mask: np.ndarray, point: tuple[float, float], px_scale: float,
               corner: tuple[float, float], simplify_px: float = 0.0
               ) -> shapely.Polygon | None:
    """The outline (level-0 px) of the connected part of ``mask`` under ``point`` (mask
    px), else of its part nearest the point; None for an empty mask."""
    from scipy import ndimage

    parts, n = ndimage.label(mask)
    if n == 0:
        return None
    h, w = mask.shape
    cx = min(max(int(point[0]), 0), w - 1)
    cy = min(max(int(point[1]), 0), h - 1)
    k = int(parts[cy, cx])
    if k == 0:
        _, (iy, ix) = ndimage.distance_transform_edt(parts == 0, return_indices=True)
        k = int(parts[iy[cy, cx], ix[cy, cx]])
    polys = tile_polygons(parts == k, px_scale, corner)
    if polys.is_empty:
        return None
    poly = max(polys.geoms, key=lambda g: g.area)
    if simplify_px > 0:
        poly = shapely.simplify(poly, simplify_px, preserve_topology=True)
    return poly if isinstance(poly, shapely.Polygon) and not poly.is_empty else None
