"""Tissue detection on a low-resolution overview, returning smooth level-0 polygons.

Every size below is in um and converted with the overview's pixel size, so the same
settings hold at any resolution. Names in ``code`` are keys of the ``tissue`` config
section (``TissueParams``, defaults in brackets); CAPITALS are constants of this module.

**Overview.** :func:`overview_mpp` picks its resolution: at most ``overview_mpp`` um/px
[8], finer when that would leave fewer than ``overview_min_px`` [1,000] px on the slide's
longer side (down to level 0, so a 1,400 px TMA core is read whole, not as 86 px), and
coarser when it would exceed ``overview_max_pixels`` [16 MP] on huge slides; a pyramid
level giving at least LEVEL_SLACK [3/4] of ``overview_min_px`` is read rather than one 4 x
finer. Tissue is
decided on *cells* of k x k overview pixels, k chosen so a cell is about ``smoothing_um``
/ WORK_STEPS [16 / 8 = 2 um] wide (k = 1 when the overview is coarser): cells hold the
mean colour of their pixels and the spread of their grey.

**Background kind** (``background`` [auto]): ``dark`` (fluorescence) when the median grey
of the overview's border (its outer 5 %) is below DARK_BORDER_GREY [80 of 255], else
``bright``. Cells are blurred by a Gaussian of sigma ``blur_um`` [1 um].

**Brightfield** (H&E, IHC, other stains on glass).

1. *Glass.* A cell is glass-like when it is bright (grey >= GLASS_MIN_GREY [180]),
   neutral (HSV saturation <= GLASS_MAX_SATURATION [0.10]) and flat (standard deviation
   of the overview's grey within GLASS_SD_RADIUS_UM [3 um], at least the 3 x 3 cells
   around it, <= GLASS_MAX_SD [3 grey levels]), in patches at least GLASS_MIN_WIDTH_UM
   [10 um] wide (an opening). These are absolute levels: pale tissue, even nearly
   colourless cytoplasm, has texture; glass has none.
2. *No glass* (fewer than GLASS_MIN_FRACTION [1 %] of the cells are glass, e.g. a crop
   filled with tissue): every cell that is not glass is tissue (method
   ``brightfield-no-glass``). No relative threshold is used, so none can split the
   tissue into a pale and a dark half.
3. *Glass present* (method ``brightfield-od``): the glass level I0 is the per-channel
   median of the glass cells; the signal is the optical density above glass summed over
   R, G and B, ``sum(max(0, log10(I0 / I)))``, which sees pale, unsaturated haematoxylin
   (IHC counterstain) as well as eosin. The threshold is Otsu's on the cells, clipped to
   [``od_floor``, ``od_ceiling``] [0.03, 0.05]: the floor keeps glass noise, uneven
   illumination and faint smears out; the ceiling keeps Otsu, which on pale IHC falls
   between pale and dark tissue, from cutting the pale tissue away.

**Fluorescence** (method ``fluorescence``). The signal is the brightest channel (the
nuclear stain of a DAPI/RGB image) in [0, 1]; the background level b is its
DARK_BACKGROUND_PERCENTILE [2nd] percentile; the threshold is Otsu's clipped to
[b + ``dark_floor``, b + ``dark_ceiling``] [b + 0.02, b + 0.05], which finds nuclei and
autofluorescent stroma; a closing with a disc of radius ``dark_close_um`` [25 um] joins
nuclei into the section.

**Clean-up and outline** (both kinds). Closing then opening with a disc of diameter
``smoothing_um`` [16 um]; holes under ``min_hole_um2`` [5,000 um^2] filled; pieces under
``min_area_um2`` [20,000 um^2] dropped. The outline is the 0.5 level line
(``skimage.measure.find_contours``, sub-pixel) of the mask blurred by a Gaussian of sigma
``smoothing_um / 4`` [4 um] (at least one cell), so it follows the tissue instead of a
pixel staircase; it is simplified (Douglas-Peucker, topology kept) to ``simplify_um``
[1 um], made valid, holes and pieces are filtered by the same areas again, and tissue
reaching the image edge is cut along the edge exactly. ``smoothing_um: 0`` turns all
smoothing off: cells are overview pixels and outlines their exact edges.

The method, the threshold and the levels behind it (Otsu's value, floor, ceiling, glass
or background level, glass fraction) are returned in :class:`Tissue`, stored with the
slide and shown in the report; an empty result gives the warning NO_TISSUE. Anchors:
QuPath's "Simple tissue detection" (a threshold on a smoothed, downsampled image, with a
minimum area and a maximum hole size in um^2), HistoQC (absolute brightness limits for
glass), hs2p and LazySlide (Otsu on saturation or a colour contrast, with absolute lower
bounds).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import shapely
from scipy import ndimage
from shapely import affinity
from skimage import measure
from skimage.filters import threshold_otsu

from wsi_assist.settings import TissueParams

#: Border median grey below which the background is dark (fluorescence).
DARK_BORDER_GREY = 80.0
#: Glass-like cells: at least this bright (blurred mean of R, G, B, 0-255) ...
GLASS_MIN_GREY = 180.0
#: ... at most this saturated (HSV saturation, 0-1) ...
GLASS_MAX_SATURATION = 0.10
#: ... and flat: standard deviation of the overview's grey within GLASS_SD_RADIUS_UM
#: (at least the 3 x 3 cells around) at most this.
GLASS_MAX_SD = 3.0
GLASS_SD_RADIUS_UM = 3.0
#: Glass-like patches narrower than this (um) are ignored (flat spots inside tissue).
GLASS_MIN_WIDTH_UM = 10.0
#: Below this fraction of glass cells the image has no glass: it is all tissue.
GLASS_MIN_FRACTION = 0.01
#: Tissue is decided on cells of about smoothing_um / WORK_STEPS um (or overview px).
WORK_STEPS = 8
#: A pyramid level giving at least this fraction of overview_min_px is read rather
#: than a finer one.
LEVEL_SLACK = 0.75
#: Discs up to this radius (px) are applied row by row (faster there, same result),
#: larger ones by distance transform.
SMALL_DISC = 32.0
#: Percentile of the fluorescence signal taken as the dark background level.
DARK_BACKGROUND_PERCENTILE = 2.0

Method = Literal["brightfield-od", "brightfield-no-glass", "fluorescence"]
#: The warning of a slide on which no tissue was found (manifest, index and report).
NO_TISSUE = "no tissue found: nothing was tiled or analysed"


@dataclass(frozen=True)
class Tissue:
    """Detected tissue: polygons in level-0 px plus the overview mask they came from.

    ``threshold`` is the signal threshold used (OD above glass for ``brightfield-od``,
    brightness for ``fluorescence``, 0 for ``brightfield-no-glass``); ``levels`` holds the
    other numbers that decided it (Otsu's value, floor, ceiling, glass or background
    level, glass-like fraction).
    """

    geometry: shapely.MultiPolygon
    mask: np.ndarray
    downsample: float
    background: Literal["bright", "dark"]
    threshold: float
    mpp: float
    method: Method = "brightfield-od"
    levels: dict[str, float] = field(default_factory=dict)

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

    @property
    def overview_mpp(self) -> float:
        """um per overview pixel."""
        return self.downsample * self.mpp


def overview_mpp(width: int, height: int, mpp: float, params: TissueParams = TissueParams(),
                 level_downsamples: tuple[float, ...] = (1.0,)) -> float:
    """The um/px to read a ``width`` x ``height`` px slide's overview at (see module doc).

    A pyramid level coarser than that is taken instead when it still gives at least
    LEVEL_SLACK x ``overview_min_px`` px and is no coarser than ``overview_mpp``, so a
    slide is not decoded at 4 x the resolution for a few more px."""
    long_um = mpp * max(width, height)
    want = min(params.overview_mpp, long_um / params.overview_min_px)
    ok = min(params.overview_mpp, long_um / (LEVEL_SLACK * params.overview_min_px))
    coarser = [mpp * d for d in sorted(level_downsamples) if want < mpp * d <= ok * 1.001]
    if coarser:
        want = coarser[0]
    cap = mpp * math.sqrt(width * height / params.overview_max_pixels)
    return max(want, cap, mpp)


def detect(overview: np.ndarray, downsample: float, mpp: float,
           params: TissueParams = TissueParams()) -> Tissue:
    """Find tissue in an RGB ``overview`` whose pixels are ``downsample`` level-0 px wide."""
    if overview.ndim != 3 or overview.shape[2] < 3:
        raise ValueError(f"overview must be (H, W, 3), got {overview.shape}")
    rgb = overview[..., :3]
    h, w = rgb.shape[:2]
    k = work_factor(downsample * mpp, params)
    cell_um = k * downsample * mpp
    background = params.background if params.background != "auto" else guess_background(rgb)
    cells = block_mean(rgb, k)
    blurred = _blur(cells, params.blur_um / cell_um)
    method: Method
    if background == "dark":
        method = "fluorescence"
        mask, threshold, levels = _fluorescence(blurred, params)
        mask = _close(mask, params.dark_close_um / cell_um)
    else:
        grey = _grey(rgb)
        # k = 1: cells are the overview as float32, so their grey is the overview's
        cell_grey = grey if k == 1 else _grey(cells)
        grey2 = block_mean(np.square(grey), k)
        # unblurred cells of 8-bit pixels: the same values read as 8 bits (saturation,
        # glass level and optical density by counts and table look-ups)
        rgb8 = rgb if k == 1 and blurred is cells and rgb.dtype == np.uint8 else None
        glass = _open(glass_like(cell_grey, grey2, blurred if rgb8 is None else rgb8,
                                 cell_um, cell_grey if blurred is cells else None),
                      GLASS_MIN_WIDTH_UM / 2 / cell_um)
        levels = {"glass_fraction": float(glass.mean())}
        if levels["glass_fraction"] < GLASS_MIN_FRACTION:
            method, threshold = "brightfield-no-glass", 0.0
            mask = ~glass
        else:
            method = "brightfield-od"
            mask, threshold, more = _brightfield(blurred, glass, params, rgb8)
            levels.update(more)
    mask = clean_mask(mask, cell_um, params)
    geometry, smooth = outline(mask, k * downsample, mpp, params,
                               extent=(w * downsample, h * downsample))
    return Tissue(geometry=geometry, mask=_upsample(smooth, k, (h, w)), downsample=downsample,
                  background=background, threshold=float(threshold), mpp=mpp,
                  method=method, levels={n: round(v, 4) for n, v in levels.items()})


def work_factor(px_um: float, params: TissueParams) -> int:
    """Overview px per side of the cells tissue is decided on: cells of about
    ``smoothing_um / WORK_STEPS`` um, never finer than the overview (1 when smoothing is off)."""
    if params.smoothing_um == 0:
        return 1
    return max(1, int(params.smoothing_um / WORK_STEPS / px_um))


def block_mean(a: np.ndarray, k: int) -> np.ndarray:
    """float32 mean of ``a`` (H, W[, C]) over k x k blocks; edge blocks are padded by
    repeating the edge."""
    if k == 1:
        return a.astype(np.float32)
    h, w = a.shape[:2]
    hh, ww = -(-h // k) * k, -(-w // k) * k
    if (hh, ww) != (h, w):
        a = np.pad(a, ((0, hh - h), (0, ww - w)) + ((0, 0),) * (a.ndim - 2), mode="edge")
    blocks = a.reshape(hh // k, k, ww // k, k, *a.shape[2:])
    # k x k strided adds into one buffer: several times faster than a sum over the block
    # axes. 8-bit input adds into uint16 (exact up to 257 terms: k <= 16), about 1.4x
    # faster at k = 2 than float32, which is exact too (integer sums below 2**24)
    exact: type[np.generic] = np.uint16 if a.dtype == np.uint8 and k <= 16 else np.float32
    acc: np.ndarray = blocks[:, 0, :, 0].astype(exact)
    for i in range(k):
        for j in range(k):
            if i or j:
                acc += blocks[:, i, :, j]
    return acc.astype(np.float32, copy=False) / np.float32(k * k)


def _upsample(smooth: np.ndarray, k: int, shape: tuple[int, int]) -> np.ndarray:
    """``smooth >= 0.5`` at the overview's resolution, interpolating the k-times coarser
    field linearly (cell centres aligned).

    A pixel interpolates the 2 x 2 cells from (y0, x0), so it lies between their least
    and greatest value: it is decided by the cells alone unless the level passes between
    them (by more than rounding), and only those pixels are interpolated (the same
    products and sums as everywhere; 3-4x faster on real overviews, whose smoothed
    field crosses the level along the tissue's outline only)."""
    if k == 1:
        return smooth >= 0.5
    (y0, y1, fy, rows), (x0, x1, fx, cols) = (_axis(n, m, k) for n, m in
                                              zip(shape, smooth.shape, strict=True))
    pad = np.pad(smooth, ((0, 1), (0, 1)), mode="edge")
    a, b, c, d = pad[:-1, :-1], pad[1:, :-1], pad[:-1, 1:], pad[1:, 1:]
    above = np.minimum(np.minimum(a, b), np.minimum(c, d)) >= 0.5 + _LEVEL_SLACK
    mixed = ~above & (np.maximum(np.maximum(a, b), np.maximum(c, d)) >= 0.5 - _LEVEL_SLACK)
    r, q = np.nonzero(mixed)
    if 8 * len(r) > mixed.size:  # the level everywhere (a fine field): every pixel
        along_x = smooth[:, x0] * (1 - fx) + smooth[:, x1] * fx
        return np.asarray(along_x[y0] * (1 - fy[:, None]) + along_x[y1] * fy[:, None] >= 0.5)
    out = np.take(np.take(above, y0, axis=0), x0, axis=1)
    # the pixels of each mixed cell (r, q): rows rows[r]:rows[r + 1], likewise columns
    nr, nc = rows[r + 1] - rows[r], cols[q + 1] - cols[q]
    n = nr * nc
    cell = np.repeat(np.arange(len(n)), n)
    at = np.arange(int(n.sum())) - np.repeat(np.cumsum(n) - n, n)
    i, j = rows[r][cell] + at // nc[cell], cols[q][cell] + at % nc[cell]
    u, v = fy[i], fx[j]
    top = smooth[y0[i], x0[j]] * (1 - v) + smooth[y0[i], x1[j]] * v
    bottom = smooth[y1[i], x0[j]] * (1 - v) + smooth[y1[i], x1[j]] * v
    out[i, j] = top * (1 - u) + bottom * u >= 0.5
    return out


def _axis(n: int, m: int, k: int) -> tuple[np.ndarray, ...]:
    """For ``n`` pixels over ``m`` cells of ``k``: each pixel's two cells and weight of
    the second, and where each cell's pixels (those whose first cell it is) start."""
    at = (np.arange(n, dtype=np.float32) + 0.5) / k - 0.5
    first = np.clip(np.floor(at).astype(int), 0, m - 1)
    weight = np.clip(at - first, 0, 1)
    return first, np.minimum(first + 1, m - 1), weight, np.searchsorted(first, np.arange(m + 1))


#: Far more than the rounding error of one linear interpolation between values within
#: [0, 1], far less than a difference that matters.
_LEVEL_SLACK = 1e-6


def warnings(geometry: shapely.Geometry) -> list[str]:
    """What a user must be told about a detection: ``[NO_TISSUE]`` when it is empty."""
    return [NO_TISSUE] if geometry.is_empty else []


def _blur(rgb: np.ndarray, sigma_px: float) -> np.ndarray:
    # a kernel of radius int(3 sigma + 0.5) = 0 is [1.0]: scipy would return the same
    # values after a full pass over the image (0.4 s on a 1250 px overview)
    if sigma_px < 0.1 or int(3.0 * sigma_px + 0.5) == 0:
        return rgb
    return ndimage.gaussian_filter(rgb, (sigma_px, sigma_px, 0), mode="nearest", truncate=3.0)


def _brightfield(blurred: np.ndarray, glass: np.ndarray, params: TissueParams,
                 rgb8: np.ndarray | None = None
                 ) -> tuple[np.ndarray, float, dict[str, float]]:
    """Optical density above the glass level, thresholded by clipped Otsu. ``rgb8``: the
    8-bit pixels ``blurred`` holds as floats, read through a table of the same values."""
    i0 = np.median(blurred[glass], axis=0) if rgb8 is None else _median8(rgb8, glass)
    od = np.zeros(blurred.shape[:2], np.float32)
    values = np.arange(256, dtype=np.float32)
    for c in range(3):
        if rgb8 is not None and rgb8.dtype == np.uint8:
            od += np.log10(np.float32(i0[c]) / np.maximum(values, 1.0)).clip(0.0, None)[
                rgb8[..., c]]
        else:
            od += np.log10(np.float32(i0[c]) / np.maximum(blurred[..., c], 1.0)).clip(0.0,
                                                                                     None)
    ot = _otsu(od)
    t = min(max(ot, params.od_floor), params.od_ceiling)
    levels = {"otsu": ot, "floor": params.od_floor, "ceiling": params.od_ceiling,
              "glass_r": float(i0[0]), "glass_g": float(i0[1]), "glass_b": float(i0[2])}
    return od > t, t, levels


def _median8(rgb8: np.ndarray, where: np.ndarray) -> np.ndarray:
    """Per-channel median of the 8-bit pixels ``where`` is True, from their counts (what
    ``np.median`` gives: the mean of the two middle values when their number is even)."""
    out = np.zeros(3, np.float32)
    n = int(where.sum())
    for c in range(3):
        v = np.where(where, rgb8[..., c].astype(np.int16), np.int16(256))
        counts = np.bincount(v.ravel(), minlength=257)
        cum = np.cumsum(counts[:256])
        lo, hi = np.searchsorted(cum, [(n - 1) // 2, n // 2], side="right")
        out[c] = (np.float32(lo) + np.float32(hi)) / np.float32(2)
    return out


def _fluorescence(blurred: np.ndarray, params: TissueParams
                  ) -> tuple[np.ndarray, float, dict[str, float]]:
    """Brightest channel above the dark background (nuclei, before they are joined)."""
    signal = _cmax(blurred) / 255.0
    bg = float(np.percentile(signal[::2, ::2], DARK_BACKGROUND_PERCENTILE))
    ot = _otsu(signal)
    lo, hi = bg + params.dark_floor, bg + params.dark_ceiling
    t = min(max(ot, lo), hi)
    return signal > t, t, {"otsu": ot, "background": bg, "floor": lo, "ceiling": hi}


def _otsu(values: np.ndarray) -> float:
    v = values[::2, ::2] if values.size > 4_000_000 else values
    if v.size < 2 or float(v.min()) == float(v.max()):
        return float(v.max()) if v.size else 0.0
    return float(threshold_otsu(v))


def guess_background(rgb: np.ndarray) -> Literal["bright", "dark"]:
    """``dark`` when the overview's border is mostly dark (fluorescence), else ``bright``."""
    b = max(1, min(rgb.shape[:2]) // 20)
    border = np.concatenate([_grey(part).ravel() for part in
                             (rgb[:b], rgb[-b:], rgb[:, :b], rgb[:, -b:])])
    return "dark" if np.median(border) < DARK_BORDER_GREY else "bright"


def _grey(rgb: np.ndarray) -> np.ndarray:
    """Mean of R, G and B as float32 (per channel: faster than a mean over axis 2)."""
    r, g, b = (rgb[..., c].astype(np.float32) for c in range(3))
    return (r + g + b) / 3


def _cmax(rgb: np.ndarray) -> np.ndarray:
    return np.maximum(np.maximum(rgb[..., 0], rgb[..., 1]), rgb[..., 2])


def _cmin(rgb: np.ndarray) -> np.ndarray:
    return np.minimum(np.minimum(rgb[..., 0], rgb[..., 1]), rgb[..., 2])


def saturation(rgb: np.ndarray) -> np.ndarray:
    """HSV saturation in [0, 1]."""
    hi = _cmax(rgb).astype(np.float32)
    lo = _cmin(rgb).astype(np.float32)
    return (hi - lo) / np.maximum(hi, 1e-6)


def glass_like(grey: np.ndarray, grey2: np.ndarray, blurred: np.ndarray, cell_um: float,
               blurred_grey: np.ndarray | None = None) -> np.ndarray:
    """Cells that look like bare glass by absolute levels: bright, neutral and flat.

    ``grey`` and ``grey2`` are the cells' means of the overview's grey and grey squared,
    so the flatness is the standard deviation of the overview's pixels within
    GLASS_SD_RADIUS_UM of a cell (at least its 3 x 3 neighbourhood). ``blurred_grey``:
    the grey of ``blurred`` when already computed."""
    r = max(1, round(GLASS_SD_RADIUS_UM / cell_um))
    m1 = ndimage.uniform_filter(grey, 2 * r + 1, mode="nearest")
    m2 = ndimage.uniform_filter(grey2, 2 * r + 1, mode="nearest")
    flat = (m2 - m1 * m1) <= GLASS_MAX_SD**2
    bgrey = _grey(blurred) if blurred_grey is None else blurred_grey
    return (flat & (bgrey >= GLASS_MIN_GREY)
            & (saturation(blurred) <= GLASS_MAX_SATURATION))


def _dilate(mask: np.ndarray, r: float) -> np.ndarray:
    """Dilation by a Euclidean disc of radius ``r`` px (pixel centres within ``r``)."""
    if r < 0.5 or not mask.any() or mask.all():
        return mask
    if r <= SMALL_DISC:
        return _dilate_rows(mask, r)
    return np.asarray(ndimage.distance_transform_edt(~mask) <= r)


def _erode(mask: np.ndarray, r: float) -> np.ndarray:
    """Erosion by a disc of radius ``r`` px; the image edge does not erode."""
    if r < 0.5 or not mask.any() or mask.all():
        return mask
    if r <= SMALL_DISC:  # the disc is symmetric: erosion is the complement's dilation
        return ~_dilate_rows(~mask, r)
    return np.asarray(ndimage.distance_transform_edt(mask) > r)


def _dilate_rows(mask: np.ndarray, r: float) -> np.ndarray:
    """``ndimage.binary_dilation(mask, _disc(r))`` (outside the image is False), row by
    row of the disc: the mask widened along x by each half-width (one pair of shifted ORs
    per px of width), then one shifted OR per row of the disc (tested equal; several
    times faster than scipy's and the distance transform up to SMALL_DISC)."""
    n = int(np.floor(r))
    h, w = mask.shape
    half = [max(x for x in range(n + 1) if x * x + dy * dy <= r * r) for dy in range(-n, n + 1)]
    wide = [mask]
    for x in range(1, max(half) + 1):
        cur = wide[-1].copy()
        if x < w:
            cur[:, x:] |= mask[:, :-x]
            cur[:, :-x] |= mask[:, x:]
        wide.append(cur)
    out = np.zeros(mask.shape, bool)
    for dy, hw in zip(range(-n, n + 1), half, strict=True):
        src = wide[hw]
        if abs(dy) >= h:
            continue
        if dy >= 0:
            out[:h - dy] |= src[dy:]
        else:
            out[-dy:] |= src[:h + dy]
    return out


def _disc(r: float) -> np.ndarray:
    n = int(np.floor(r))
    y, x = np.ogrid[-n:n + 1, -n:n + 1]
    return np.asarray(x * x + y * y <= r * r)


def _close(mask: np.ndarray, r: float) -> np.ndarray:
    return _erode(_dilate(mask, r), r)


def _open(mask: np.ndarray, r: float) -> np.ndarray:
    return _dilate(_erode(mask, r), r)


def clean_mask(mask: np.ndarray, px_um: float, params: TissueParams) -> np.ndarray:
    """Close then open with a disc of diameter ``smoothing_um``, fill small holes, drop
    small islands."""
    r = params.smoothing_um / px_um / 2
    mask = _open(_close(mask, r), r)
    return fill_and_drop(mask, px_um**2, params)


def fill_and_drop(mask: np.ndarray, px_area_um2: float, params: TissueParams) -> np.ndarray:
    """Fill holes under ``min_hole_um2`` and drop islands under ``min_area_um2``."""
    # holes: 4-connected pieces of background not touching the image edge, as
    # ndimage.binary_fill_holes finds them, from one labelling (not its iterated dilation)
    labels, n = ndimage.label(~mask)
    if n:
        sizes = np.bincount(labels.ravel())
        small = sizes * px_area_um2 < params.min_hole_um2
        small[0] = False
        small[np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0],
                                        labels[:, -1]]))] = False
        mask = mask | small[labels]
    labels, n = ndimage.label(mask)
    if n == 0:
        return mask
    keep = np.bincount(labels.ravel()) * px_area_um2 >= params.min_area_um2
    keep[0] = False
    return keep[labels]


def outline(mask: np.ndarray, downsample: float, mpp: float, params: TissueParams,
            extent: tuple[float, float] | None = None
            ) -> tuple[shapely.MultiPolygon, np.ndarray]:
    """Level-0 polygons of a cleaned mask whose cells are ``downsample`` level-0 px wide,
    clipped to ``extent`` (level-0 width, height; default the mask's), and the smoothed
    mask they enclose."""
    px_um = downsample * mpp
    if params.smoothing_um == 0 or not mask.any():
        return mask_to_polygons(mask, downsample), mask
    sigma = max(params.smoothing_um / 4 / px_um, 1.0)
    smooth = ndimage.gaussian_filter(mask.astype(np.float32), sigma, mode="nearest")
    geometry = smooth_polygons(smooth, downsample, params.simplify_um / mpp, extent)
    geometry = filter_areas(geometry, params.min_area_um2 / mpp**2,
                            params.min_hole_um2 / mpp**2)
    return geometry, smooth >= 0.5


def smooth_polygons(field_: np.ndarray, downsample: float = 1.0, tolerance: float = 0.0,
                    extent: tuple[float, float] | None = None) -> shapely.MultiPolygon:
    """Polygons (holes kept) enclosing ``field_ >= 0.5``, traced at sub-pixel precision
    between pixel centres, scaled to level 0, simplified to ``tolerance`` level-0 px and
    clipped to ``extent`` (level-0 width and height; default the field's).

    Pixel ``(i, j)`` covers level-0 ``[j, j+1) x [i, i+1)`` times ``downsample``, so its
    centre is at ``(j + 0.5, i + 0.5) * downsample``. A region reaching the image edge is
    cut along the edge itself, corners included (the field is traced with its edge
    repeated twice beyond the image, then clipped).
    """
    pad = 3
    padded = np.zeros((field_.shape[0] + 2 * pad, field_.shape[1] + 2 * pad))
    padded[1:-1, 1:-1] = np.pad(field_, pad - 1, mode="edge")
    outers: list[shapely.Polygon] = []
    holes: list[shapely.Polygon] = []
    for c in measure.find_contours(padded, 0.5, positive_orientation="high"):
        if len(c) < 4:
            continue
        xy = (c[:, ::-1] - (pad - 0.5)) * downsample
        x, y = xy[:, 0], xy[:, 1]
        signed = 0.5 * float(np.dot(x[:-1], y[1:]) - np.dot(x[1:], y[:-1]))
        if signed == 0:
            continue
        # find_contours goes counter-clockwise (in row, col) around values above the
        # level; with y pointing down that is a negative shoelace area in (x, y).
        (outers if signed < 0 else holes).append(shapely.Polygon(xy))
    if not outers:
        return shapely.MultiPolygon()
    tree = shapely.STRtree(outers)
    areas = shapely.area(outers)
    inner: list[list[shapely.LinearRing]] = [[] for _ in outers]
    for h in holes:
        hit = tree.query(shapely.Point(h.exterior.coords[0]), predicate="within")
        if len(hit):
            inner[int(hit[np.argmin(areas[hit])])].append(h.exterior)
    polys = [shapely.Polygon(o.exterior, rings) for o, rings in zip(outers, inner, strict=True)]
    geom: shapely.Geometry = shapely.MultiPolygon(polys)
    if tolerance > 0:
        geom = shapely.simplify(geom, tolerance, preserve_topology=True)
    w, h = extent or (field_.shape[1] * downsample, field_.shape[0] * downsample)
    return as_multipolygon(shapely.make_valid(geom).intersection(shapely.box(0, 0, w, h)))


def filter_areas(geom: shapely.MultiPolygon, min_area: float, min_hole: float
                 ) -> shapely.MultiPolygon:
    """Drop pieces smaller than ``min_area`` and fill holes smaller than ``min_hole``."""
    keep = []
    for p in geom.geoms:
        rings = [r for r in p.interiors if shapely.Polygon(r).area >= min_hole]
        q = shapely.Polygon(p.exterior, rings)
        if q.area >= min_area:
            keep.append(q)
    return as_multipolygon(shapely.MultiPolygon(keep))


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
