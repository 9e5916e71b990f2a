"""Findings aggregated to slide level: class regions, and pictures of them.

Per-tile zero-shot classes become per-class region polygons (adjacent tiles dissolved,
islands below a minimum area dropped, clipped to tissue), with areas in mm^2 and
fractions of tissue. Tile probabilities become heatmaps drawn over the overview, with a
legend and a scale bar. Coordinates are level-0 pixels throughout.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import shapely
from PIL import Image, ImageDraw, ImageFont

from wsi_assist.tiling import TileGrid
from wsi_assist.tissue import as_multipolygon

Color = tuple[int, int, int]

#: A perceptual ramp (viridis control points) for probabilities 0..1.
_RAMP = np.array([[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98],
                  [253, 231, 37]], dtype=np.float64)


@dataclass(frozen=True)
class ClassRegion:
    """The tiles of one class dissolved into polygons (level-0 px), with their area."""

    name: str
    color: Color
    geometry: shapely.MultiPolygon
    n_tiles: int
    area_mm2: float
    fraction: float | None  # of tissue area; None when the tissue area is unknown

    def __post_init__(self) -> None:
        if self.n_tiles < 0:
            raise ValueError(f"n_tiles must be >= 0, got {self.n_tiles!r}")
        if not self.area_mm2 >= 0:
            raise ValueError(f"area_mm2 must be >= 0, got {self.area_mm2!r}")


def class_regions(grid: TileGrid, top: np.ndarray, classes: list[str],
                  colors: list[Color], *, min_region_um2: float = 0.0,
                  tissue: shapely.Geometry | None = None,
                  tissue_area_um2: float | None = None,
                  exclude: np.ndarray | None = None) -> list[ClassRegion]:
    """One region per class: the union of its tiles, clipped to ``tissue`` when given,
    with polygons smaller than ``min_region_um2`` dropped. ``exclude`` marks tiles left
    out (e.g. uncertain ones)."""
    top = np.asarray(top)
    if top.shape != (len(grid.coords),):
        raise ValueError(f"top must have one class per tile ({len(grid.coords)}), "
                         f"got shape {top.shape}")
    if len(colors) != len(classes):
        raise ValueError(f"colors must have one entry per class ({len(classes)}), "
                         f"got {len(colors)}")
    keep = np.ones(len(top), bool) if exclude is None else ~np.asarray(exclude, bool)
    px_um2 = grid.mpp ** 2
    if tissue is not None and not tissue.is_empty:
        shapely.prepare(tissue)
    out = []
    for k, (name, color) in enumerate(zip(classes, colors, strict=True)):
        rows = np.flatnonzero((top == k) & keep)
        geom = _dissolve(grid.boxes(rows)) if len(rows) else shapely.MultiPolygon()
        if tissue is not None and not geom.is_empty:
            geom = as_multipolygon(shapely.intersection(geom, tissue))
        parts = [p for p in geom.geoms if p.area * px_um2 >= min_region_um2]
        geom = shapely.MultiPolygon(parts)
        area_um2 = geom.area * px_um2
        fraction = (area_um2 / tissue_area_um2 if tissue_area_um2 and tissue_area_um2 > 0
                    else None)
        rgb = (int(color[0]), int(color[1]), int(color[2]))
        out.append(ClassRegion(name=name, color=rgb, geometry=geom, n_tiles=len(rows),
                               area_mm2=area_um2 / 1e6, fraction=None if fraction is None else min(1.0, fraction)))
    return out


def _dissolve(boxes: np.ndarray) -> shapely.MultiPolygon:
    """Union of tile boxes; edge-sharing tiles merge into one polygon."""
    return as_multipolygon(shapely.union_all(boxes, grid_size=1e-3))


def prob_grid(tiles: TileGrid, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Tile values on the regular tile lattice: ``(lattice (rows, cols) float, NaN where
    no tile; origin (x, y) level-0 px of cell (0, 0))``."""
    values = np.asarray(values, np.float64)
    if len(tiles.coords) == 0:
        return np.full((0, 0), np.nan), np.zeros(2)
    origin = tiles.coords.min(axis=0).astype(np.float64)
    cells = np.rint((tiles.coords - origin) / tiles.stride_l0).astype(np.int64)
    rows, cols = cells[:, 1].max() + 1, cells[:, 0].max() + 1
    lattice = np.full((rows, cols), np.nan)
    lattice[cells[:, 1], cells[:, 0]] = values
    return lattice, origin


def colormap(values: np.ndarray) -> np.ndarray:
    """Probabilities 0..1 to RGB uint8 along the ramp."""
    v = np.clip(np.nan_to_num(np.asarray(values, np.float64)), 0.0, 1.0) * (len(_RAMP) - 1)
    i = np.minimum(np.floor(v).astype(np.int64), len(_RAMP) - 2)
    t = (v - i)[..., None]
    return np.rint(_RAMP[i] * (1 - t) + _RAMP[i + 1] * t).astype(np.uint8)


@dataclass(frozen=True)
class View:
    """A picture of part of the slide: ``image`` shows level-0 px ``(x, y)`` at
    ``((x - x0) * scale, (y - y0) * scale)``."""

    image: Image.Image
    x0: float
    y0: float
    scale: float

    def xy(self, x: float, y: float) -> tuple[float, float]:
        return (x - self.x0) * self.scale, (y - self.y0) * self.scale


def view(overview: np.ndarray, downsample: float, max_px: int,
         bounds: tuple[float, float, float, float] | None = None,
         origin: tuple[float, float] = (0.0, 0.0)) -> View:
    """The overview cropped to level-0 ``bounds`` (plus a margin) and scaled to fit
    ``max_px`` (small ones enlarged up to 8x). ``origin``: the level-0 position of the
    overview's first pixel (a picture of part of the slide)."""
    h, w = overview.shape[:2]
    ox, oy = origin
    c0, r0, c1, r1 = 0, 0, w, h
    if bounds is not None:
        m = 0.04 * max(bounds[2] - bounds[0], bounds[3] - bounds[1])
        c0 = max(0, int((bounds[0] - m - ox) / downsample))
        r0 = max(0, int((bounds[1] - m - oy) / downsample))
        c1 = min(w, math.ceil((bounds[2] + m - ox) / downsample))
        r1 = min(h, math.ceil((bounds[3] + m - oy) / downsample))
        if c1 <= c0 or r1 <= r0:
            c0, r0, c1, r1 = 0, 0, w, h
    img = Image.fromarray(np.ascontiguousarray(overview[r0:r1, c0:c1, :3]))
    scale = min(8.0, max_px / max(img.size))
    if scale != 1.0:
        img = img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))),
                         Image.Resampling.LANCZOS)
    return View(img, ox + c0 * downsample, oy + r0 * downsample, scale / downsample)


def heatmap(overview: np.ndarray, downsample: float, tiles: TileGrid,
            probs: np.ndarray, title: str, *, max_px: int = 768, alpha: float = 0.7,
            bounds: tuple[float, float, float, float] | None = None,
            label: str = "probability", vmax: float = 1.0,
            origin: tuple[float, float] = (0.0, 0.0)) -> Image.Image:
    """Tile values in 0..``vmax`` (a class's probabilities, or ``label``) over a faded
    overview (its first pixel at level-0 ``origin``), with legend and scale bar; tiles
    whose value is NaN are left clear."""
    if not vmax > 0:
        raise ValueError(f"vmax must be positive, got {vmax!r}")
    v = view(overview, downsample, max_px, bounds, origin)
    faded = Image.blend(v.image.convert("L").convert("RGB"),
                        Image.new("RGB", v.image.size, (255, 255, 255)), 0.35)
    lattice, corner = prob_grid(tiles, np.asarray(probs, np.float64) / vmax)
    if lattice.size:
        rgba = np.dstack([colormap(lattice), np.where(np.isnan(lattice), 0,
                                                   round(255 * alpha)).astype(np.uint8)])
        layer = Image.fromarray(rgba, "RGBA")
        w = max(1, round(lattice.shape[1] * tiles.stride_l0 * v.scale))
        h = max(1, round(lattice.shape[0] * tiles.stride_l0 * v.scale))
        layer = layer.resize((w, h), Image.Resampling.NEAREST)
        x, y = v.xy(*corner)
        faded.paste(layer, (round(x), round(y)), layer)
    return _frame(faded, title, tiles.mpp / v.scale,
                  legend=lambda d, x, y, u: _ramp_legend(d, x, y, u, label, vmax))


def outlines(field: Image.Image, objects: list[tuple[np.ndarray, Color]],
             entries: list[tuple[str, Color]], um_per_px: float, title: str) -> Image.Image:
    """Object outlines (vertices in ``field`` pixels) drawn in their colours on ``field``,
    each over a thin white halo so that a dark class colour stays visible on dark nuclei,
    with a legend of ``entries`` and a scale bar."""
    img = field.convert("RGB")
    draw = ImageDraw.Draw(img)
    width = max(1, img.width // 320)
    rings = [([(float(x), float(y)) for x, y in xy], color) for xy, color in objects
             if len(xy) >= 3]
    for pts, _ in rings:  # halos first, so no halo covers another object's outline
        draw.line([*pts, pts[0]], fill=(255, 255, 255), width=width + 2)
    for pts, color in rings:
        draw.line([*pts, pts[0]], fill=(int(color[0]), int(color[1]), int(color[2])),
                  width=width)
    return _frame(img, title, um_per_px,
                  legend=lambda d, x, y, u: _class_legend(d, x, y, u, entries))


def class_overlay(overview: np.ndarray, downsample: float, regions: list[ClassRegion],
                  tissue: shapely.Geometry | None, mpp: float, *, max_px: int = 1024,
                  title: str = "Tissue classes",
                  bounds: tuple[float, float, float, float] | None = None,
                  origin: tuple[float, float] = (0.0, 0.0)) -> Image.Image:
    """The overview (its first pixel at level-0 ``origin``) with class regions filled
    translucently and outlined, with a legend."""
    v = view(overview, downsample, max_px, bounds, origin)
    layer = Image.new("RGBA", v.image.size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(layer)
    width = max(2, v.image.width // 300)
    for r in regions:
        for poly in r.geometry.geoms:
            draw.polygon([v.xy(x, y) for x, y in poly.exterior.coords], fill=(*r.color, 80),
                         outline=(*r.color, 255), width=width)
            for ring in poly.interiors:
                draw.polygon([v.xy(x, y) for x, y in ring.coords], fill=(0, 0, 0, 0),
                             outline=(*r.color, 255), width=width)
    for poly in getattr(tissue, "geoms", []):
        draw.line([v.xy(x, y) for x, y in poly.exterior.coords], fill=(0, 120, 50, 255),
                  width=max(1, width // 2))
    img = Image.alpha_composite(v.image.convert("RGBA"), layer).convert("RGB")
    entries = [(r.name, r.color) for r in regions if not r.geometry.is_empty]
    return _frame(img, title, mpp / v.scale,
                  legend=lambda d, x, y, u: _class_legend(d, x, y, u, entries))


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    """DejaVu Sans when installed (it has the micro sign), else Pillow's own font."""
    try:
        return ImageFont.truetype("DejaVuSans.ttf", size)
    except OSError:
        pass
    try:
        return ImageFont.load_default(size=size)
    except (OSError, TypeError, ValueError):  # Pillow without FreeType
        return ImageFont.load_default()


Legend = Callable[[ImageDraw.ImageDraw, int, int, int], None]


def _frame(img: Image.Image, title: str, um_per_px: float, legend: Legend) -> Image.Image:
    """Add a title bar above and a legend plus scale bar below ``img``; text scales with
    the image width so it stays readable when the page shrinks the picture."""
    u = max(12, round(max(img.width, 360) / 38))  # text size, px
    pad, top_h, bottom_h = u // 2, round(u * 1.8), round(u * 3.4)
    out = Image.new("RGB", (max(img.width, 360) + 2 * pad, img.height + top_h + bottom_h),
                    (255, 255, 255))
    out.paste(img, (pad, top_h))
    d = ImageDraw.Draw(out)
    d.text((pad, u // 3), title, fill=(20, 20, 20), font=_font(round(u * 1.15)))
    y = top_h + img.height + u // 2
    legend(d, pad, y, u)
    _scale_bar(d, out.width - pad, y, um_per_px, max(60, img.width // 4), u)
    return out


def _ramp_legend(d: ImageDraw.ImageDraw, x: int, y: int, u: int,
                 label: str = "probability", vmax: float = 1.0) -> None:
    width = 10 * u
    ramp = colormap(np.linspace(0, 1, width))
    for i, c in enumerate(ramp):
        d.line([(x + i, y), (x + i, y + u)], fill=tuple(int(v) for v in c))
    font = _font(u)
    d.text((x, y + u + 2), "0", fill=(40, 40, 40), font=font)
    d.text((x + width // 2 - u, y + u + 2), f"{vmax / 2:g}", fill=(40, 40, 40), font=font)
    d.text((x + width - u // 2, y + u + 2), f"{vmax:g}", fill=(40, 40, 40), font=font)
    d.text((x + width + u, y), label, fill=(40, 40, 40), font=font)


def _class_legend(d: ImageDraw.ImageDraw, x: int, y: int, u: int,
                  entries: list[tuple[str, Color]]) -> None:
    font = _font(u)
    cx, cy = x, y
    for name, color in entries[:12]:
        w = round(1.5 * u) + int(d.textlength(name, font=font)) + u
        if cx + w > x + 30 * u and cx > x:
            cx, cy = x, cy + round(1.3 * u)
        d.rectangle([cx, cy + 1, cx + u, cy + u], fill=color, outline=(60, 60, 60))
        d.text((cx + round(1.3 * u), cy), name, fill=(30, 30, 30), font=font)
        cx += w


def nice_length(max_um: float) -> float:
    """The largest 1/2/5 x 10^k micrometres not above ``max_um``."""
    if not max_um > 0:
        raise ValueError(f"max_um must be positive, got {max_um!r}")
    k = 10 ** math.floor(math.log10(max_um))
    return max(m * k for m in (1, 2, 5) if m * k <= max_um)


def _scale_bar(d: ImageDraw.ImageDraw, right: int, y: int, um_per_px: float,
               max_len_px: int, u: int) -> None:
    um = nice_length(max_len_px * um_per_px)
    px = max(1, round(um / um_per_px))
    label = f"{um / 1000:g} mm" if um >= 1000 else f"{um:g} \u00b5m"
    d.rectangle([right - px, y + 2, right, y + 2 + max(3, u // 3)], fill=(0, 0, 0))
    d.text((right - px, y + u // 2 + 4), label, fill=(0, 0, 0), font=_font(u))
