"""The slide thumbnail with the tissue outline and the kept tiles drawn on it."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import shapely
from PIL import Image, ImageDraw

if TYPE_CHECKING:
    from wsi_assist.tiling import TileGrid


def draw(overview: np.ndarray, downsample: float, tissue: shapely.Geometry,
         grid: TileGrid | None = None, max_px: int = 1024,
         synthetic: bool = False) -> Image.Image:
    """Overview scaled to ``max_px``; tissue outlined green, tiles outlined blue."""
    img = Image.fromarray(overview[..., :3])
    scale = min(1.0, max_px / max(img.size))
    if scale < 1.0:
        img = img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))),
                         Image.Resampling.LANCZOS)
    f = scale / downsample  # level-0 px -> thumbnail px
    canvas = ImageDraw.Draw(img, "RGBA")
    if grid is not None and len(grid):
        s = grid.size_l0 * f
        for x, y in grid.coords * f:
            canvas.rectangle([x, y, x + s, y + s], outline=(40, 90, 220, 150))
    for poly in getattr(tissue, "geoms", [tissue]):
        if poly.is_empty:
            continue
        for ring in [poly.exterior, *poly.interiors]:
            pts = [(x * f, y * f) for x, y in ring.coords]
            canvas.line(pts, fill=(0, 170, 70, 255), width=2)
    if synthetic:
        canvas.text((6, 6), "SYNTHETIC SLIDE", fill=(200, 0, 0, 255))
    return img
