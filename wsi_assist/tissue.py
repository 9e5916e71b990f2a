"""Tissue detection on a low-resolution overview, returning level-0 polygons.

Brightfield (H&E, IHC): Otsu threshold on saturation, which separates stained tissue
from white glass and grey dust. Dark-background fluorescence: Otsu on brightness. The
background kind is detected from the overview's border unless given. The mask is then
closed and opened, small holes are filled and small islands dropped.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import numpy as np
import shapely
from scipy import ndimage
from shapely import affinity

from wsi_assist.settings import TissueParams



@dataclass(frozen=True)
class Tissue:
    """Detected tissue: polygons in level-0 px plus the overview mask they came from."""

    geometry: shapely.MultiPolygon
    mask: np.ndarray
    downsample: float
    background: Literal["bright", "dark"]
    threshold: float
    mpp: float

    def __post_init__(self) -> None:
        if self.mask.ndim != 2 or self.mask.dtype != bool:
            raise ValueError(f"mask must be a 2-D bool array, got {self.mask.dtype} "
                             f"{self.mask.shape}")
        if not self.geometry.is_valid:
            raise ValueError("tissue geometry is not valid")

    @property
    def area_um2(self) -> float:
        return float(self.geometry.area * self.mpp**2)

    @property
    def polygons(self) -> list[shapely.Polygon]:
        return list(self.geometry.geoms)


def detect(overview: np.ndarray, downsample: float, mpp: float,
           params: TissueParams = TissueParams()) -> Tissue:
    """Find tissue in an RGB ``overview`` whose pixels are ``downsample`` level-0 px wide."""
    if overview.ndim != 3 or overview.shape[2] < 3:
        raise ValueError(f"overview must be (H, W, 3), got {overview.shape}")
    rgb = overview[..., :3]
    background = params.background if params.background != "auto" else guess_background(rgb)
    if background == "bright":
        signal = saturation(rgb)
        floor = 0.05  # glass and grey dust stay below this saturation
    else:
        signal = rgb.max(axis=2).astype(np.float32) / 255.0
        floor = 0.02
    threshold = max(otsu(signal), floor) if signal.size > 1 else 1.0
    mask = signal > threshold
    px_um = downsample * mpp
    mask = clean_mask(mask, px_um, params)
    geometry = mask_to_polygons(mask, downsample)
    return Tissue(geometry=geometry, mask=mask, downsample=downsample,
                  background=background, threshold=float(threshold), mpp=mpp)


def guess_background(rgb: np.ndarray) -> Literal["bright", "dark"]:
    """``dark`` when the overview's border is mostly dark (fluorescence), else ``bright``."""
    grey = rgb.mean(axis=2)
    b = max(1, min(grey.shape) // 20)
    border = np.concatenate([grey[:b].ravel(), grey[-b:].ravel(),
                             grey[:, :b].ravel(), grey[:, -b:].ravel()])
    return "dark" if np.median(border) < 80 else "bright"


def saturation(rgb: np.ndarray) -> np.ndarray:
    """HSV saturation in [0, 1]."""
    rgb = rgb.astype(np.float32)
    hi = rgb.max(axis=2)
    lo = rgb.min(axis=2)
    return np.where(hi > 0, (hi - lo) / np.maximum(hi, 1e-6), 0.0)


def otsu(values: np.ndarray, bins: int = 256) -> float:
    """Otsu's threshold of values in [0, 1]."""
    hist, edges = np.histogram(values, bins=bins, range=(0.0, 1.0))
    hist = hist.astype(np.float64)
    centers = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(hist)
    w1 = w0[-1] - w0
    m0 = np.cumsum(hist * centers)
    mean0 = m0 / np.maximum(w0, 1e-12)
    mean1 = (m0[-1] - m0) / np.maximum(w1, 1e-12)
    between = w0 * w1 * (mean0 - mean1) ** 2
    return float(edges[int(np.argmax(between)) + 1])


def clean_mask(mask: np.ndarray, px_um: float, params: TissueParams) -> np.ndarray:
    """Close then open with a disc, fill small holes, drop small islands."""
    r = int(round(params.smoothing_um / px_um / 2))
    if r >= 1:
        disc = _disc(r)
        mask = ndimage.binary_closing(np.pad(mask, r), disc)[r:-r, r:-r]
        mask = ndimage.binary_opening(mask, disc)
    px_area = px_um**2
    holes = ndimage.binary_fill_holes(mask) & ~mask
    mask = mask | _keep_components(holes, lambda n: n * px_area < params.min_hole_um2)
    return _keep_components(mask, lambda n: n * px_area >= params.min_area_um2)


def _keep_components(mask: np.ndarray, keep: Callable[[int], bool]) -> np.ndarray:
    labels, n = ndimage.label(mask)
    if n == 0:
        return mask
    sizes = np.bincount(labels.ravel())
    ok = np.array([False] + [bool(keep(s)) for s in sizes[1:]])
    return ok[labels]


def _disc(r: int) -> np.ndarray:
    y, x = np.ogrid[-r:r + 1, -r:r + 1]
    return np.asarray(x * x + y * y <= r * r)


def mask_to_polygons(mask: np.ndarray, downsample: float = 1.0) -> shapely.MultiPolygon:
    """Exact pixel-edge polygons of a boolean mask (holes kept), scaled to level 0.

    Each row's runs of True become rectangles and are dissolved; fast enough for
    overview masks of a few megapixels.
    """
    if not mask.any():
        return shapely.MultiPolygon()
    padded = np.zeros((mask.shape[0], mask.shape[1] + 2), np.int8)
    padded[:, 1:-1] = mask
    diff = np.diff(padded, axis=1)
    ys, xs0 = np.nonzero(diff == 1)
    _, xs1 = np.nonzero(diff == -1)
    boxes = shapely.box(xs0, ys, xs1, ys + 1)
    merged = shapely.union_all(boxes)
    merged = affinity.scale(merged, downsample, downsample, origin=(0, 0))
    merged = shapely.simplify(merged, 0)  # drop collinear vertices
    return as_multipolygon(merged)


def as_multipolygon(geom: shapely.Geometry) -> shapely.MultiPolygon:
    """Polygonal parts of ``geom`` as a valid MultiPolygon."""
    geom = shapely.make_valid(geom)
    if isinstance(geom, shapely.MultiPolygon):
        return geom
    if isinstance(geom, shapely.Polygon):
        return shapely.MultiPolygon([geom]) if not geom.is_empty else shapely.MultiPolygon()
    parts = [g for g in getattr(geom, "geoms", []) if isinstance(g, shapely.Polygon)]
    parts += [p for g in getattr(geom, "geoms", []) if isinstance(g, shapely.MultiPolygon)
              for p in g.geoms]
    return shapely.MultiPolygon(parts)
