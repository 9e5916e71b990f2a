"""The slide thumbnail with the tissue outline and the kept tiles drawn on it; the
report's picture of the tissue region, read from the slide at the page's resolution."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import numpy as np
import shapely
from PIL import Image, ImageDraw

from wsi_assist.lowres import level_and_factor, read_reduced
from wsi_assist.slide import SlideInfo

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


#: Margin around the tissue in the report picture, as a fraction of its longer side
#: (the same as the overlay's crop, so the whole picture is used).
PICTURE_MARGIN = 0.04


def picture_box(bounds: tuple[float, float, float, float], width: int, height: int
                ) -> tuple[int, int, int, int]:
    """Level-0 box (x0, y0, x1, y1) of the report picture: ``bounds`` (tissue and tiles)
    with a margin, inside the slide."""
    m = PICTURE_MARGIN * max(bounds[2] - bounds[0], bounds[3] - bounds[1])
    x0, y0 = max(0, math.floor(bounds[0] - m)), max(0, math.floor(bounds[1] - m))
    x1, y1 = min(width, math.ceil(bounds[2] + m)), min(height, math.ceil(bounds[3] + m))
    if x1 <= x0 or y1 <= y0:
        return 0, 0, width, height
    return x0, y0, x1, y1


def read_picture(slide: Any, info: SlideInfo, box: tuple[int, int, int, int],
                 long_px: int) -> tuple[np.ndarray, float]:
    """The level-0 ``box`` of an RGB slide as a picture about ``long_px`` on its long side
    (never enlarged), and its downsample: read from the coarsest pyramid level at least
    as fine, block-averaged by an integer factor (:func:`lowres.read_reduced`), then
    resized to size with Lanczos."""
    x0, y0, x1, y1 = box
    level, factor = level_and_factor(info, max(1.0, max(x1 - x0, y1 - y0) / long_px))
    ds = info.level_downsamples[level]
    lw, lh = info.level_dimensions[level]
    cx0, cy0 = int(x0 / ds), int(y0 / ds)
    w = max(1, min(lw - cx0, math.ceil((x1 - x0) / ds)) // factor)
    h = max(1, min(lh - cy0, math.ceil((y1 - y0) / ds)) // factor)
    out = read_reduced(slide, info, level, (cx0, cy0), (w, h), factor)
    scale = min(1.0, long_px / max(w, h))
    if scale < 1.0:
        size = (max(1, round(w * scale)), max(1, round(h * scale)))
        out = np.asarray(Image.fromarray(out).resize(size, Image.Resampling.LANCZOS))
    return out, ds * factor * w / out.shape[1]
